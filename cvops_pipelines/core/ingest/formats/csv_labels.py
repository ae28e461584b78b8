"""CSV labels: `filename,label[,annotator]`, with or without that header row."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from cvops_pipelines.core.ingest.formats.common import LabelProblem, LabelRecord

HEADER = ("filename", "label")


def parse_csv(name: str, data: bytes) -> Iterator[LabelRecord | LabelProblem]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        yield LabelProblem(
            "malformed_file", f"not UTF-8 text ({exc.reason} at byte {exc.start})", name
        )
        return
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        yield LabelProblem("malformed_file", f"CSV syntax error: {exc}", name)
        return
    for line, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row]
        if line == 1 and tuple(c.lower() for c in cells[:2]) == HEADER:
            continue
        position = f"line {line}"
        if len(cells) not in (2, 3):
            yield LabelProblem(
                "malformed_record",
                f"expected 2 or 3 columns (filename,label[,annotator]), got "
                f"{len(cells)}: {','.join(cells)[:120]!r}",
                name,
                position,
            )
            continue
        if not cells[0] or not cells[1]:
            yield LabelProblem(
                "malformed_record", "empty filename or label", name, position, cells[0]
            )
            continue
        yield LabelRecord(
            cells[0], cells[1], name, position, annotator=cells[2] if len(cells) == 3 else ""
        )
