"""COCO JSON: boxes per annotation, plus an image-level label where all boxes agree.

Category ids are looked up by id (COCO ids are often non-contiguous). An image listed without
annotations is a negative (`NO_OBJECTS`): kept by a detection dataset, unlabeled for a
classification one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from cvops_pipelines.core.base.ontology import NO_OBJECTS
from cvops_pipelines.core.ingest.formats.common import (
    PIXELS,
    LabelProblem,
    LabelRecord,
)


def looks_like_coco(doc: object) -> bool:
    return isinstance(doc, dict) and {"images", "annotations", "categories"} <= doc.keys()


def parse_coco(name: str, doc: dict) -> Iterator[LabelRecord | LabelProblem]:
    categories: dict[int, str] = {}
    for i, cat in enumerate(doc.get("categories") or []):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            yield LabelProblem(
                "malformed_record", "category needs 'id' and 'name'", name, f"categories[{i}]"
            )
            continue
        categories[cat["id"]] = str(cat["name"])
    images: dict[int, str] = {}
    for i, image in enumerate(doc.get("images") or []):
        if not isinstance(image, dict) or "id" not in image or not image.get("file_name"):
            yield LabelProblem(
                "malformed_record", "image needs 'id' and 'file_name'", name, f"images[{i}]"
            )
            continue
        images[image["id"]] = str(image["file_name"])
    labels_per_image: dict[int, set[str]] = defaultdict(set)
    annotated: set = set()
    for i, ann in enumerate(doc.get("annotations") or []):
        position = f"annotations[{i}]" + (f" (id={ann.get('id')})" if isinstance(ann, dict) else "")
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            yield LabelProblem(
                "malformed_record", "annotation needs 'image_id' and 'category_id'", name, position
            )
            continue
        if ann["image_id"] not in images:
            yield LabelProblem(
                "missing_image", f"image_id {ann['image_id']} is not in 'images'", name, position
            )
            continue
        annotated.add(ann["image_id"])
        file_name = images[ann["image_id"]]
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
        annotator = str(ann.get("annotator", ann.get("attributes", {}).get("annotator", "")))
        bbox = ann.get("bbox")
        if bbox:
            if not (
                isinstance(bbox, list)
                and len(bbox) == 4
                and all(isinstance(v, (int, float)) for v in bbox)
            ):
                yield LabelProblem(
                    "malformed_record",
                    f"bbox must be [x, y, w, h], got {bbox!r}",
                    name,
                    position,
                    file_name,
                )
                continue
            x, y, w, h = (float(v) for v in bbox)
            yield LabelRecord(
                file_name, label, name, position, annotator, (x, y, x + w, y + h), PIXELS
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
