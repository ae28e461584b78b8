"""Find the annotation files in a drop, import them, and tie every label to an ingested image.

A drop is labelled by whichever annotation files it carries (CSV, COCO JSON, Label Studio JSON,
YOLO txt + classes file); a drop with none is read as an ImageFolder (`<class>/<image>`).
Every label is checked against the ontology; anything that cannot become a label is returned as a
quarantine row with its file and position, never dropped.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import pandas as pd

from cvops_pipelines.core.base.ontology import MAX_BOXES_PER_IMAGE, NO_OBJECTS, Ontology
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.base.tables import TableFile
from cvops_pipelines.core.ingest.formats.coco import looks_like_coco, parse_coco
from cvops_pipelines.core.ingest.formats.common import (
    FRACTION,
    LabelProblem,
    LabelRecord,
)
from cvops_pipelines.core.ingest.formats.csv_labels import parse_csv
from cvops_pipelines.core.ingest.formats.imagefolder import parse_imagefolder
from cvops_pipelines.core.ingest.formats.labelstudio import (
    looks_like_labelstudio,
    looks_like_labelstudio_min,
    looks_like_yolo_notes,
    parse_labelstudio,
    parse_labelstudio_min,
    upload_key,
)
from cvops_pipelines.core.ingest.formats.yolo import (
    CLASS_FILES,
    parse_class_names,
    parse_yolo_labels,
)
from cvops_pipelines.core.ingest.intake import (
    ANNOTATION_SUFFIXES,
    MARKER,
    QUARANTINE_COLUMNS,
    is_image_candidate,
    now_utc,
)

LABEL_COLUMNS = [
    "image_id",
    "label",
    "x_min",
    "y_min",
    "x_max",
    "y_max",
    "annotator",
    "labeled_at",
    "origin",
    "source",
    "original_name",
    "annotation_file",
    "position",
    "image_width",
    "image_height",
]
BOX_TOLERANCE_PX = 0.5  # float round-off from relative boxes; beyond this a box is invalid


@dataclass
class AnnotationResult:
    labels: pd.DataFrame
    quarantine: pd.DataFrame
    formats: Counter  # labels imported per format
    unlabeled_images: int
    records_read: int = 0  # label records and problems the annotation files held

    def nothing_usable(self) -> str | None:
        """Why this drop's annotations came to nothing, when files held records: a drop whose
        every label was refused must not look like an unlabeled one."""
        if self.records_read and self.labels.empty:
            reasons = self.quarantine["reason_code"].value_counts()
            top = ", ".join(f"{code} x{n}" for code, n in reasons.head(3).items())
            return (
                f"imported 0 of {self.records_read} label records "
                f"({top or 'none usable'}): see the quarantine table"
            )
        return None


@dataclass(frozen=True)
class _Image:
    image_id: str
    name: str
    width: int
    height: int


class _ImageIndex:
    """Resolves the many ways annotation tools name an image to one ingested image."""

    def __init__(self, manifest: pd.DataFrame, all_image_names: Iterable[str]) -> None:
        self.by_name: dict[str, _Image] = {}
        for row in manifest.itertuples(index=False):
            for name in [row.original_name, *list(row.aliases)]:
                self.by_name[name] = _Image(row.image_id, name, int(row.width), int(row.height))
        self.rejected = {n for n in all_image_names if n not in self.by_name}
        known = [*self.by_name, *self.rejected]
        self.by_stem = self._unique_index(known, lambda n: _strip_images_dir(_stem(n)))
        self.by_base = self._unique_index(known, posixpath.basename)
        self.by_upload = self._unique_index(known, upload_key)

    @staticmethod
    def _unique_index(names: list[str], key) -> dict[str, str | None]:
        index: dict[str, str | None] = {}
        for name in names:
            k = key(name)
            index[k] = None if k in index else name  # None marks an ambiguous key
        return index

    def resolve(self, ref: str, annotation_file: str) -> tuple[str | None, str]:
        """(drop-relative name, problem code or '')."""
        ref = ref[2:] if ref.startswith("./") else ref
        folder = posixpath.dirname(annotation_file)
        candidates = [ref, posixpath.normpath(posixpath.join(folder, ref)) if folder else ref]
        for name in candidates:
            if name in self.by_name or name in self.rejected:
                return name, ""
        for index, key in (
            (self.by_stem, _strip_images_dir(_stem(ref))),
            (self.by_base, posixpath.basename(ref)),
            (self.by_upload, upload_key(ref)),
        ):
            if key in index:
                return (None, "ambiguous_image") if index[key] is None else (index[key], "")
        return None, "missing_image"


def _stem(name: str) -> str:
    return str(PurePosixPath(name).with_suffix(""))


def _strip_images_dir(name: str) -> str:
    parts = PurePosixPath(name).parts
    return "/".join(parts[parts.index("images") + 1 :]) if "images" in parts else name


def _read_annotation_files(
    source: Store, keys: list[str]
) -> Iterator[tuple[str, LabelRecord | LabelProblem]]:
    """(format, record-or-problem) for every annotation file in the drop."""
    class_files = [k for k in keys if posixpath.basename(k) in CLASS_FILES]
    yolo_labels = [
        k for k in keys if k.endswith(".txt") and "labels" in PurePosixPath(k).parts[:-1]
    ]
    classes: list[str] | None = None
    if class_files:
        parsed = parse_class_names(class_files[0], source.read_bytes(class_files[0]))
        if isinstance(parsed, LabelProblem):
            yield "yolo", parsed
        else:
            classes = parsed
    for key in keys:
        if key in class_files:
            continue
        if key in yolo_labels:
            if classes is None:
                yield (
                    "yolo",
                    LabelProblem(
                        "malformed_file",
                        "YOLO label file but no classes.txt or data.yaml with 'names' in the drop",
                        key,
                    ),
                )
            else:
                for item in parse_yolo_labels(key, source.read_bytes(key), classes):
                    yield "yolo", item
        elif key.lower().endswith(".csv"):
            for item in parse_csv(key, source.read_bytes(key)):
                yield "csv", item
        elif key.lower().endswith(".json"):
            yield from _read_json(key, source.read_bytes(key))
        else:
            yield (
                "unknown",
                LabelProblem(
                    "unrecognized_file",
                    "not a CSV, COCO, Label Studio or YOLO file; remove it or rename it",
                    key,
                ),
            )


def _read_json(key: str, data: bytes) -> Iterator[tuple[str, LabelRecord | LabelProblem]]:
    try:
        doc = json.loads(data.decode("utf-8-sig"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        yield "json", LabelProblem("malformed_file", "not UTF-8 text", key)
        return
    except RecursionError:
        yield "json", LabelProblem("malformed_file", "JSON nested too deeply", key)
        return
    except json.JSONDecodeError as exc:
        yield (
            "json",
            LabelProblem(
                "malformed_file",
                f"invalid JSON: {exc.msg}",
                key,
                f"line {exc.lineno} column {exc.colno}",
            ),
        )
        return
    except ValueError as exc:  # an integer of thousands of digits, NaN, Infinity
        yield "json", LabelProblem("malformed_file", f"invalid JSON: {exc}"[:300], key)
        return
    if looks_like_coco(doc):
        for item in parse_coco(key, doc):
            yield "coco", item
    elif looks_like_labelstudio(doc):
        for item in parse_labelstudio(key, doc):
            yield "labelstudio", item
    elif looks_like_labelstudio_min(doc):
        for item in parse_labelstudio_min(key, doc):
            yield "labelstudio", item
    elif looks_like_yolo_notes(doc):
        return  # Label Studio's YOLO export repeats classes.txt here: no label in it
    else:
        yield (
            "json",
            LabelProblem(
                "unrecognized_file",
                "JSON is neither COCO (images, annotations, categories) nor a Label Studio "
                "export (JSON or JSON_MIN)",
                key,
            ),
        )


def _no_constant(text: str):
    raise ValueError(f"{text} is not a number an annotation may hold")


def _pixel_box(record: LabelRecord, image: _Image) -> tuple[float, ...] | str:
    x0, y0, x1, y1 = record.box
    if record.box_units == FRACTION:
        x0, x1 = x0 * image.width, x1 * image.width
        y0, y1 = y0 * image.height, y1 * image.height
    t = BOX_TOLERANCE_PX
    if not (x0 < x1 and y0 < y1):
        return f"box ({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}) is empty or inverted"
    if x0 < -t or y0 < -t or x1 > image.width + t or y1 > image.height + t:
        return (
            f"box ({x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}) lies outside the "
            f"{image.width}x{image.height} image"
        )
    return (max(x0, 0.0), max(y0, 0.0), min(x1, float(image.width)), min(y1, float(image.height)))


INDEX_COLUMNS = ["image_id", "original_name", "aliases", "width", "height"]


def _bounded_boxes(labels: list[dict], problems: list, limit: int) -> list[dict]:
    """Drop every box of an image that holds more than `limit` in this drop, with one problem
    per image: every later step compares an image's boxes pairwise, so their number is bounded
    where they enter."""
    counts = Counter(row["image_id"] for row in labels if row["x_min"] is not None)
    over = {image for image, n in counts.items() if n > limit}
    if not over:
        return labels
    for image in sorted(over):
        first = next(r for r in labels if r["image_id"] == image and r["x_min"] is not None)
        problems.append(
            LabelProblem(
                "too_many_boxes",
                f"{counts[image]} boxes on {first['original_name']!r} (at most {limit}: "
                "max_boxes_per_image); none of them imported",
                first["annotation_file"],
                first["position"],
                first["original_name"],
            )
        )
    return [r for r in labels if r["image_id"] not in over or r["x_min"] is None]


def import_annotations(
    source: Store,
    store: Store,
    drop: str,
    manifest: TableFile,
    ontology: Ontology,
    max_boxes_per_image: int = MAX_BOXES_PER_IMAGE,
) -> AnnotationResult:
    """The drop's labels. The image index (every name of every image) is built only when
    there are labels to resolve, from the manifest columns it needs: an unlabeled drop of a
    million images costs a listing, not a million rows in memory."""
    annotation_keys, nested = [], []
    for entry in source.list():
        if entry.is_symlink or entry.key == MARKER:
            continue
        if entry.key.lower().endswith(ANNOTATION_SUFFIXES):
            annotation_keys.append(entry.key)
        elif "/" in entry.key and is_image_candidate(entry.key):
            nested.append(entry.key)  # the ImageFolder layout reads labels from folders
    detected_at = now_utc()

    items: Iterable[tuple[str, LabelRecord | LabelProblem]] = list(
        _read_annotation_files(source, annotation_keys)
    )
    if not any(isinstance(item, LabelRecord) for _, item in items) and not annotation_keys:
        items = [("imagefolder", r) for r in parse_imagefolder(nested)]
    del nested
    index = None
    if items:
        image_names = (
            e.key for e in source.list() if not e.is_symlink and is_image_candidate(e.key)
        )
        index = _ImageIndex(manifest.read(INDEX_COLUMNS), image_names)
    labels, problems, formats = [], [], Counter()
    for fmt, item in items:
        if isinstance(item, LabelProblem):
            problems.append(item)
            continue
        if item.label == NO_OBJECTS and not ontology.boxes:
            continue  # a classification dataset: the image stays unlabeled
        if item.object_annotation and item.box is None:
            if ontology.boxes:  # never an image label in disguise
                problems.append(
                    LabelProblem(
                        "missing_box",
                        f"{item.label!r} has no bbox",
                        item.annotation_file,
                        item.position,
                        item.image_ref,
                    )
                )
            continue  # a classification dataset: the file's image-level label carries it
        name, code = index.resolve(item.image_ref, item.annotation_file)
        if not code and name in index.rejected:
            code = "image_quarantined"
        if code:
            problems.append(
                LabelProblem(
                    code,
                    f"image {item.image_ref!r}",
                    item.annotation_file,
                    item.position,
                    item.image_ref,
                )
            )
            continue
        if item.label not in ontology and item.label != NO_OBJECTS:
            problems.append(
                LabelProblem(
                    "unknown_class",
                    ontology.unknown_class_message(item.label),
                    item.annotation_file,
                    item.position,
                    item.image_ref,
                )
            )
            continue
        image = index.by_name[name]
        box: tuple | str = (None,) * 4
        if item.box is not None:
            box = _pixel_box(item, image)
            if isinstance(box, str):
                problems.append(
                    LabelProblem(
                        "invalid_box", box, item.annotation_file, item.position, item.image_ref
                    )
                )
                continue
        formats[fmt] += 1
        labels.append(
            {
                "image_id": image.image_id,
                "label": item.label,
                "x_min": box[0],
                "y_min": box[1],
                "x_max": box[2],
                "y_max": box[3],
                "annotator": item.annotator,
                "labeled_at": pd.Timestamp(item.labeled_at) if item.labeled_at else detected_at,
                "origin": item.origin,
                "source": drop,
                "original_name": name,
                "annotation_file": item.annotation_file,
                "position": item.position,
                "image_width": image.width,
                "image_height": image.height,
            }
        )
    labels = _bounded_boxes(labels, problems, max_boxes_per_image)
    quarantine = _quarantine_rows(problems, source, store, drop, detected_at)
    labelled = {row["image_id"] for row in labels}
    unlabeled = manifest.rows - len(labelled)
    labels_df = pd.DataFrame(labels, columns=LABEL_COLUMNS)
    for col in ("x_min", "y_min", "x_max", "y_max"):
        labels_df[col] = labels_df[col].astype("float64")
    labels_df["labeled_at"] = pd.to_datetime(labels_df["labeled_at"], utc=True)
    return AnnotationResult(
        labels_df,
        quarantine,
        formats,
        unlabeled_images=unlabeled,
        records_read=len(items),
    )


def _quarantine_rows(
    problems: list[LabelProblem], source: Store, store: Store, drop: str, detected_at
) -> pd.DataFrame:
    copied: dict[str, tuple[str, int]] = {}
    rows = []
    for problem in problems:
        file = problem.annotation_file
        if file not in copied:
            try:  # keep the offending file next to its record so nothing is lost
                data = source.read_bytes(file)
                qkey = f"quarantine/{drop}/files/{file}"
                store.write_bytes(qkey, data)
                copied[file] = (store.uri(qkey), len(data))
            except (OSError, ValueError):
                copied[file] = ("", 0)  # folder layout: the images themselves are the record
        uri, size = copied[file]
        rows.append(
            {
                "source": drop,
                "stage": "annotations",
                "original_name": file,
                "position": problem.position,
                "reason_code": problem.code,
                "reason": problem.message,
                "bytes": size,
                "quarantine_uri": uri,
                "detected_at": detected_at,
            }
        )
    return pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)
