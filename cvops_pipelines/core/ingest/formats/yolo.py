"""YOLO txt: `labels/<stem>.txt` per image, one `class cx cy w h` line per box (normalised),
with class names from `classes.txt` (one per line) or a `data.yaml` with `names`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath

import yaml

from cvops_pipelines.core.base.ontology import NO_OBJECTS
from cvops_pipelines.core.ingest.formats.common import (
    FRACTION,
    LabelProblem,
    LabelRecord,
)

CLASS_FILES = ("classes.txt", "obj.names", "data.yaml", "dataset.yaml")


def parse_class_names(name: str, data: bytes) -> list[str] | LabelProblem:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return LabelProblem("malformed_file", "not UTF-8 text", name)
    if name.endswith((".yaml", ".yml")):
        try:
            names = (yaml.safe_load(text) or {}).get("names")
        except (yaml.YAMLError, AttributeError) as exc:
            return LabelProblem("malformed_file", f"invalid YAML: {exc}", name)
        if isinstance(names, dict):  # {0: cat, 1: dog}
            names = [names[k] for k in sorted(names)]
        if not isinstance(names, list) or not names:
            return LabelProblem("malformed_file", "needs a non-empty 'names' list", name)
        return [str(n) for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def image_stem_key(label_key: str) -> str:
    """labels/a/b.txt -> a/b (matched against images/a/b.* or a/b.* in the drop)."""
    parts = PurePosixPath(label_key).with_suffix("").parts
    if "labels" in parts:
        parts = parts[parts.index("labels") + 1 :]
    return "/".join(parts)


def parse_yolo_labels(
    name: str, data: bytes, classes: list[str]
) -> Iterator[LabelRecord | LabelProblem]:
    ref = image_stem_key(name)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        yield LabelProblem("malformed_file", "not UTF-8 text", name, image_ref=ref)
        return
    if not text.strip():  # YOLO's negative: a label file with no boxes
        yield LabelRecord(ref, NO_OBJECTS, name, "empty file")
        return
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        position = f"line {line_no}"
        fields = line.split()
        try:
            if len(fields) != 5:
                raise ValueError(f"expected 5 fields 'class cx cy w h', got {len(fields)}")
            index = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError as exc:
            yield LabelProblem(
                "malformed_record", f"{exc}: {line.strip()[:80]!r}", name, position, ref
            )
            continue
        if not 0 <= index < len(classes):
            yield LabelProblem(
                "unknown_class",
                f"class index {index} is outside the {len(classes)} names in the classes file",
                name,
                position,
                ref,
            )
            continue
        yield LabelRecord(
            ref,
            classes[index],
            name,
            position,
            "",
            (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2),
            FRACTION,
        )
