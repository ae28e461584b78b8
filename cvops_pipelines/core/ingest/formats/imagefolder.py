"""ImageFolder layout: `<drop>/<class>/<image>`; images at the drop's top level are unlabeled."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from cvops_pipelines.core.ingest.formats.common import LabelRecord


def parse_imagefolder(image_names: Iterable[str], annotator: str = "") -> Iterator[LabelRecord]:
    for name in image_names:
        if "/" in name:
            label = name.split("/", 1)[0]
            yield LabelRecord(name, label, "(folder layout)", f"folder {label}/", annotator)
