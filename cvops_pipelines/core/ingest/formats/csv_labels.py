"""CSV labels: `filename,label[,annotator]`, with or without that header row; and Label
Studio's CSV and TSV exports (both named .csv), known by their header."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

from cvops_pipelines.core.ingest.formats.common import LabelProblem, LabelRecord
from cvops_pipelines.core.ingest.formats.labelstudio import CONTROL, parse_labelstudio_min

HEADER = ("filename", "label")


def parse_csv(name: str, data: bytes) -> Iterator[LabelRecord | LabelProblem]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        yield LabelProblem(
            "malformed_file", f"not UTF-8 text ({exc.reason} at byte {exc.start})", name
        )
        return
    # Label Studio's header decides the delimiter (its TSV is named .csv); anything else is read
    # as plain CSV, once
    first = text.split("\n", 1)[0]
    tab = "\t" in first and {"annotation_id", "annotator"} <= _cells(first, "\t")
    labelstudio = tab or {"annotation_id", "annotator"} <= _cells(first, ",")
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tab else ","))
    except csv.Error as exc:
        yield LabelProblem("malformed_file", f"CSV syntax error: {exc}", name)
        return
    if labelstudio:
        yield from _labelstudio_rows(name, rows, "TSV" if tab else "CSV")
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


def _cells(line: str, delimiter: str) -> set[str]:
    try:
        return {cell.strip() for cell in next(csv.reader([line], delimiter=delimiter), [])}
    except csv.Error:
        return set()


def _labelstudio_rows(name: str, rows: list[list[str]], kind: str):
    """Label Studio's flat export as text: the control's answer is JSON unless it is a choice."""
    header, records = [c.strip() for c in rows[0]], []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        record = dict(zip(header, row))
        answer = record.get(CONTROL, "").strip()
        if answer[:1] in ("[", "{"):
            try:
                record[CONTROL] = json.loads(answer)
            except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
                detail = f"{CONTROL!r} is not JSON: {exc or type(exc).__name__}"[:300]
                yield LabelProblem("malformed_record", detail, name, f"line {line}")
                continue
        elif CONTROL in record:
            record[CONTROL] = answer or None
        records.append(record)
    yield from parse_labelstudio_min(name, records, kind)
