"""Feedback batches uploaded by edge agents: read them back into one table of records.

A batch is `feedback/batches/<batch_id>.zip` (records.jsonl, corrections.jsonl, images/); batch ids
are unique per device and re-sending one overwrites it with the same bytes, so a record is read
once. Late corrections (sent in a later batch than their record) are applied here.
"""

from __future__ import annotations

import io
import json
import zipfile

import pandas as pd

from cvops_pipelines.core.storage import Store

BATCH_PREFIX = "feedback/batches/"
RECORD_COLUMNS = ["record_id", "device_id", "cohort", "release", "image_id", "predicted",
                  "confidence", "top_k", "corrected_label", "captured_at", "batch_id"]


def batch_keys(store: Store) -> list[str]:
    return sorted(e.key for e in store.list(BATCH_PREFIX) if e.key.endswith(".zip"))


def read_batch(data: bytes) -> tuple[list[dict], list[dict], dict[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        records = [json.loads(x) for x in archive.read("records.jsonl").decode().splitlines() if x]
        fixes = [json.loads(x) for x in archive.read("corrections.jsonl").decode().splitlines() if x]
        images = {n.split("/", 1)[1].removesuffix(".bin"): archive.read(n)
                  for n in archive.namelist() if n.startswith("images/")}
    return records, fixes, images


def feedback_records(store: Store, keys: list[str] | None = None) -> pd.DataFrame:
    records, fixes = [], []
    for key in keys if keys is not None else batch_keys(store):
        r, f, _ = read_batch(store.read_bytes(key))
        records += r
        fixes += f
    frame = pd.DataFrame(records, columns=RECORD_COLUMNS)
    frame["top_k"] = frame["top_k"].map(json.dumps)  # [[label, probability], ...] as JSON text
    for fix in sorted(fixes, key=lambda x: x["corrected_at"]):
        frame.loc[frame["record_id"] == fix["record_id"], "corrected_label"] = fix["corrected_label"]
    return frame
