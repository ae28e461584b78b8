"""Label Studio exports: "JSON" (a list of tasks with their annotations), and the flat ones
("JSON_MIN", "CSV", "TSV": a row per annotation, each control's answer in a field of its name),
read as the JSON export they flatten.

Choices become image-level labels; rectangle labels become boxes (Label Studio stores them in
percent of the image; a rotated one becomes the box around it). Cancelled annotations
("skipped" in the UI) carry no label; a submitted annotation that marks nothing is a negative
(`NO_OBJECTS`), one vote of its annotator's, so a disagreement with another annotator shows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from urllib.parse import parse_qs, unquote, urlparse

from cvops_pipelines.core.base.ontology import NO_OBJECTS
from cvops_pipelines.core.ingest.formats.common import (
    FRACTION,
    PIXELS,
    LabelProblem,
    LabelRecord,
    box_numbers,
)

# Uploaded files are renamed "<8 hex chars>-<original name>" by Label Studio, the name made
# safe the way Django's get_valid_filename does (spaces to "_", then only word characters, "-"
# and "."), and exports name them URL-quoted.
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
_UNSAFE = re.compile(r"(?u)[^-\w.]")


def upload_key(name: str) -> str:
    """The stem an image's name and Label Studio's name for its upload have in common:
    `digit 04 ünï.png` and `/data/upload/3/b4e8b12a-digit_04_%C3%BCn%C3%AF.png` (or that
    stem's YOLO label `b4e8b12a-digit_04_%C3%BCn%C3%AF.txt`) give `digit_04_ünï`."""
    base = _UPLOAD_PREFIX.sub("", unquote(name.rsplit("/", 1)[-1]))
    return _UNSAFE.sub("", base.rsplit(".", 1)[0].strip().replace(" ", "_"))


# The flat exports' own fields; every other field but the control's is the task's data.
MIN_FIELDS = ("id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time")
# The control cvops' labeling configs name "label" (choices or rectangle labels): the field a
# flat export answers in. Another config's control names are not known from the export alone.
CONTROL = "label"


def looks_like_labelstudio(doc: object) -> bool:
    return isinstance(doc, list) and all(isinstance(t, dict) and "data" in t for t in doc)


def looks_like_yolo_notes(doc: object) -> bool:
    """The notes.json Label Studio's YOLO export carries: its classes again, no labels."""
    return (
        isinstance(doc, dict)
        and doc.keys() <= {"categories", "info"}
        and (doc.get("info") or {}).get("contributor") == "Label Studio"
    )


def looks_like_labelstudio_min(doc: object) -> bool:
    return (
        isinstance(doc, list)
        and bool(doc)
        and all(isinstance(r, dict) and {"annotation_id", "annotator"} <= r.keys() for r in doc)
    )


def parse_labelstudio_min(
    name: str, rows: list[dict], kind: str = "JSON_MIN"
) -> Iterator[LabelRecord | LabelProblem]:
    """A flat export's rows (one per annotation), as the JSON export's tasks. Its answers are
    read from the field `CONTROL`; a file without that field anywhere is refused whole: a row
    without it is a negative only when the control is known."""
    if not any(CONTROL in r for r in rows):
        yield LabelProblem(
            "unrecognized_file",
            f"a Label Studio {kind} export without a {CONTROL!r} field: cvops reads the control "
            f"its labeling configs name {CONTROL!r}; for another config export as JSON (the "
            "full export), which names every control",
            name,
        )
        return
    tasks = []
    for row in rows:
        answer = row.get(CONTROL)
        tasks.append(
            {
                "id": row.get("id"),
                "data": {k: v for k, v in row.items() if k not in (*MIN_FIELDS, CONTROL)},
                "annotations": [
                    {
                        "completed_by": row.get("annotator", ""),
                        "created_at": row.get("created_at"),
                        "updated_at": row.get("updated_at"),
                        "result": _min_results(answer),
                    }
                ],
            }
        )
    yield from parse_labelstudio(name, tasks, "rows")


def _min_results(answer) -> list[dict]:
    """A flat export's answer as the JSON export's results: a choice is text (or {"choices":
    [...]}), rectangles a list of regions in percent; nothing marked, no field or []."""
    if answer is None or answer == [] or answer == "":
        return []
    if isinstance(answer, str):
        return [{"type": "choices", "value": {"choices": [answer]}}]
    if isinstance(answer, dict) and "choices" in answer:
        return [{"type": "choices", "value": answer}]
    if isinstance(answer, list) and all(isinstance(a, dict) for a in answer):
        size = ("original_width", "original_height")
        return [
            {
                # a region names its kind by its labels' key: rectanglelabels, polygonlabels...
                "type": next((k for k in a if k.endswith("labels")), "region"),
                "value": {k: v for k, v in a.items() if k not in size},
                **{k: a[k] for k in size if k in a},
            }
            for a in answer
        ]
    return [{"type": type(answer).__name__, "value": {}}]  # refused below, by its type


def image_ref_from_task(value: str) -> str:
    """The drop-relative name hidden in a task's image URL (upload, local-files, s3, http)."""
    parsed = urlparse(value)
    if "d" in parse_qs(parsed.query):  # /data/local-files/?d=folder/img.png
        return unquote(parse_qs(parsed.query)["d"][0])
    name = unquote(parsed.path.rsplit("/", 1)[-1])
    if "/data/upload/" in parsed.path:
        name = _UPLOAD_PREFIX.sub("", name)
    return name


def parse_labelstudio(
    name: str, tasks: list, items: str = "tasks"
) -> Iterator[LabelRecord | LabelProblem]:
    for t, task in enumerate(tasks):
        where = f"{items}[{t}] (id={task.get('id')})"
        data = task.get("data") or {}
        value = data.get("image") or next((v for v in data.values() if isinstance(v, str)), None)
        if not value:
            yield LabelProblem("malformed_record", "task has no image URL in 'data'", name, where)
            continue
        ref = image_ref_from_task(value)
        origin = "annotation_queue" if data.get("cvops_queue") else "drop"
        for a, annotation in enumerate(task.get("annotations") or []):
            if annotation.get("was_cancelled"):
                continue
            annotator = annotation.get("completed_by", "")
            if isinstance(annotator, dict):
                annotator = annotator.get("email") or annotator.get("id", "")
            labeled_at = annotation.get("updated_at") or annotation.get("created_at")
            if not annotation.get("result"):  # submitted with nothing marked: a negative vote
                yield LabelRecord(
                    ref,
                    NO_OBJECTS,
                    name,
                    f"{where} annotations[{a}]",
                    str(annotator),
                    labeled_at=labeled_at,
                    origin=origin,
                )
                continue
            for r, result in enumerate(annotation.get("result")):
                position = f"{where} annotations[{a}] result[{r}]"
                yield from _result(result, ref, name, position, str(annotator), labeled_at, origin)


def _result(
    result: dict,
    ref: str,
    name: str,
    position: str,
    annotator: str,
    labeled_at: str | None,
    origin: str,
) -> Iterator[LabelRecord | LabelProblem]:
    kind, value = result.get("type"), result.get("value") or {}
    if kind == "choices":
        choices = value.get("choices") or []
        if len(choices) != 1:
            yield LabelProblem(
                "malformed_record",
                f"expected exactly one choice, got {choices!r}",
                name,
                position,
                ref,
            )
            return
        yield LabelRecord(
            ref, str(choices[0]), name, position, annotator, labeled_at=labeled_at, origin=origin
        )
    elif kind == "rectanglelabels":
        labels = value.get("rectanglelabels") or []
        numbers = box_numbers(
            [value.get(k) for k in ("x", "y", "width", "height", "rotation")], "rectangle"
        ) if value.get("rotation") is not None else box_numbers(
            [value.get(k) for k in ("x", "y", "width", "height")], "rectangle"
        )  # fmt: skip
        if isinstance(numbers, str):
            yield LabelProblem(
                "malformed_record",
                f"{numbers} (needs numeric x, y, width, height)",
                name,
                position,
                ref,
            )
            return
        if len(labels) != 1:
            yield LabelProblem(
                "malformed_record",
                f"expected one rectangle label, got {labels!r}",
                name,
                position,
                ref,
            )
            return
        box = _rectangle(numbers, result)
        if isinstance(box, str):
            yield LabelProblem("malformed_record", box, name, position, ref)
            return
        yield LabelRecord(
            ref,
            str(labels[0]),
            name,
            position,
            annotator,
            box[0],
            box[1],
            labeled_at,
            origin,
            object_annotation=True,
        )
    else:
        yield LabelProblem(
            "malformed_record", f"unsupported result type {kind!r}", name, position, ref
        )


def _rectangle(numbers: tuple[float, ...], result: dict):
    """(box, units) of a rectangle given in percent of the image. A rotated one (degrees
    clockwise about its top-left corner, in pixels) becomes the axis-aligned box around it, as
    Label Studio's own COCO export does; that needs the image size the result records."""
    x, y, w, h = (v / 100.0 for v in numbers[:4])
    rotation = numbers[4] if len(numbers) > 4 else 0.0
    if rotation % 360 == 0:
        return (x, y, x + w, y + h), FRACTION
    size = box_numbers([result.get("original_width"), result.get("original_height")], "size")
    if isinstance(size, str) or min(size) <= 0:
        return "a rotated rectangle needs the image's original_width and original_height"
    width, height = size
    x0, y0, w, h = x * width, y * height, w * width, h * height
    cos, sin = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    corners = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]
    xs = [x0 + dx * cos - dy * sin for dx, dy in corners]
    ys = [y0 + dx * sin + dy * cos for dx, dy in corners]
    return (min(xs), min(ys), max(xs), max(ys)), PIXELS
