"""COCO JSON: boxes per annotation, plus an image-level label where all boxes agree.

Category ids are looked up by id (COCO ids are often non-contiguous). An image listed without
annotations is a negative (`NO_OBJECTS`): kept by a detection dataset, unlabeled for a
classification one. Ids must be unique: a repeated annotation, image or category id is a
problem with its position, never a silent merge or overwrite. A file that lists one image
several times under different ids (Label Studio's COCO export, one entry per annotation) gives
one vote per entry, so two people's boxes stay two sets.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator

from cvops_pipelines.core.base.ontology import NO_OBJECTS
from cvops_pipelines.core.ingest.formats.common import (
    PIXELS,
    LabelProblem,
    LabelRecord,
    box_numbers,
)


def looks_like_coco(doc: object) -> bool:
    return isinstance(doc, dict) and {"images", "annotations", "categories"} <= doc.keys()


def _hashable(value) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def parse_coco(name: str, doc: dict) -> Iterator[LabelRecord | LabelProblem]:
    categories: dict[object, str] = {}
    conflicting: dict[object, list[str]] = {}
    for i, cat in enumerate(doc.get("categories") or []):
        if not isinstance(cat, dict) or not _hashable(cat.get("id")) or "name" not in cat:
            yield LabelProblem(
                "malformed_record", "category needs 'id' and 'name'", name, f"categories[{i}]"
            )
            continue
        if cat["id"] in categories:
            yield LabelProblem(
                "duplicate_id",
                f"category id {cat['id']} is already {categories[cat['id']]!r}; "
                f"here it names {str(cat['name'])!r}",
                name,
                f"categories[{i}]",
            )
            if str(cat["name"]) != categories[cat["id"]]:
                conflicting.setdefault(cat["id"], [categories[cat["id"]]]).append(str(cat["name"]))
            continue
        categories[cat["id"]] = str(cat["name"])
    images: dict[object, str] = {}
    repeated: set = set()
    for i, image in enumerate(doc.get("images") or []):
        if (
            not isinstance(image, dict)
            or not _hashable(image.get("id"))
            or not image.get("file_name")
        ):
            yield LabelProblem(
                "malformed_record", "image needs 'id' and 'file_name'", name, f"images[{i}]"
            )
            continue
        if image["id"] in images:
            repeated.add(image["id"])
            yield LabelProblem(
                "duplicate_id",
                f"image id {image['id']} is already {images[image['id']]!r}; here it names "
                f"{str(image['file_name'])!r}: its annotations cannot be attributed",
                name,
                f"images[{i}]",
                str(image["file_name"]),
            )
            continue
        images[image["id"]] = str(image["file_name"])
    entries_per_file = Counter(images.values())
    labels_per_image: dict[object, set[str]] = defaultdict(set)
    annotated: set = set()
    seen_ids: set = set()
    for i, ann in enumerate(doc.get("annotations") or []):
        position = f"annotations[{i}]" + (f" (id={ann.get('id')})" if isinstance(ann, dict) else "")
        if (
            not isinstance(ann, dict)
            or not _hashable(ann.get("image_id"))
            or not _hashable(ann.get("category_id"))
        ):
            yield LabelProblem(
                "malformed_record", "annotation needs 'image_id' and 'category_id'", name, position
            )
            continue
        if ann.get("id") is not None:
            if not _hashable(ann["id"]) or ann["id"] in seen_ids:
                yield LabelProblem(
                    "duplicate_id",
                    f"annotation id {ann['id']!r} was used before in this file",
                    name,
                    position,
                    images.get(ann["image_id"], ""),
                )
                continue
            seen_ids.add(ann["id"])
        if ann["image_id"] in repeated:
            annotated.add(ann["image_id"])
            yield LabelProblem(
                "ambiguous_image",
                f"image_id {ann['image_id']} names several images",
                name,
                position,
            )
            continue
        if ann["image_id"] not in images:
            yield LabelProblem(
                "missing_image", f"image_id {ann['image_id']} is not in 'images'", name, position
            )
            continue
        annotated.add(ann["image_id"])
        file_name = images[ann["image_id"]]
        if ann["category_id"] in conflicting:
            yield LabelProblem(
                "unknown_class",
                f"category_id {ann['category_id']} names {conflicting[ann['category_id']]}",
                name,
                position,
                file_name,
            )
            continue
        if ann["category_id"] not in categories:
            yield LabelProblem(
                "unknown_class",
                f"category_id {ann['category_id']} is not in 'categories'",
                name,
                position,
                file_name,
            )
            continue
        label = categories[ann["category_id"]]
        annotator = ann.get("annotator", (ann.get("attributes") or {}).get("annotator", ""))
        if not annotator and entries_per_file[file_name] > 1:
            annotator = f"{name}#image-{ann['image_id']}"  # one entry per annotation: a vote
        bbox = ann.get("bbox")
        if bbox is None or bbox == []:
            yield LabelRecord(file_name, label, name, position, str(annotator), None, PIXELS,
                              object_annotation=True)  # fmt: skip
            labels_per_image[ann["image_id"]].add(label)
            continue
        numbers = box_numbers(bbox, "bbox [x, y, w, h]")
        if isinstance(numbers, str) or len(numbers) != 4:
            yield LabelProblem(
                "malformed_record",
                numbers if isinstance(numbers, str) else f"bbox must be [x, y, w, h], got {bbox}",
                name,
                position,
                file_name,
            )
            continue
        x, y, w, h = numbers
        yield LabelRecord(
            file_name,
            label,
            name,
            position,
            str(annotator),
            (x, y, x + w, y + h),
            PIXELS,
            object_annotation=True,
        )
        labels_per_image[ann["image_id"]].add(label)
    for image_id, labels in labels_per_image.items():
        if len(labels) == 1:
            yield LabelRecord(
                images[image_id], next(iter(labels)), name, f"images (id={image_id})", ""
            )
    for image_id, file_name in images.items():
        if image_id not in annotated:
            yield LabelRecord(file_name, NO_OBJECTS, name, f"images (id={image_id})")
