"""A detector fleet's production metrics as the feedback backlog grows.

`production_metrics` of a detector fleet absorbs each feedback batch once into its state
(core/learn/detection_production_state.py), so a run costs the new batches, not the backlog: the
classifier's `feedback_scale` figure, for boxes. Feedback batches of detector records (1-4 boxes
a frame with scores, a third reviewed in the record, late corrections, re-deliveries, two
releases) are written as the feedback asset writes them (one Parquet table per batch); then one
production run (catch up on 10 new batches, then the report and drift) is timed after 20 batches
and after the whole backlog (1,000,000 frames, the classifier's `feedback_scale` size). Beside
it, what a run cost before the state: every partition read and counted in memory (the pandas
reference the state is tested against). Target: run after the backlog / run after 10 batches <=
2.
"""

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.base.tables import PartitionedTable, table_key, write_table
from cvops_pipelines.core.learn.detection_production import DetectionPolicy
from cvops_pipelines.core.learn.detection_production_state import DetectionState
from cvops_pipelines.core.learn.production_state import catch_up

CLASSES = [str(d) for d in range(10)]


def _box(rng, scored: bool) -> dict:
    x, y = (float(v) for v in rng.integers(0, 280, 2))
    w, h = (float(v) for v in rng.integers(12, 40, 2))
    box = {"label": CLASSES[rng.integers(10)], "box": [x, y, x + w, y + h]}
    return {**box, "score": round(float(rng.random()), 3)} if scored else box


def batch(rng, index: int, size: int) -> pd.DataFrame:
    rows = []
    for i in range(size):
        rid = f"cam-{index:05d}-{i:05d}" if rng.random() > 0.02 else f"cam-00000-{i:05d}"
        answer = [_box(rng, True) for _ in range(rng.integers(1, 5))]
        reviewed = rng.random() < 0.33
        truth = [{k: b[k] for k in ("label", "box")} for b in answer if b["score"] > 0.4]
        rows.append(
            {
                "kind": "record",
                "record_id": rid,
                "release": f"rel-{rng.integers(2)}",
                "cohort": f"site-{rng.integers(4)}",
                "boxes": json.dumps(answer),
                "corrected_label": None,
                "corrected_boxes": json.dumps(truth) if reviewed else None,
                "corrected_at": None,
                "captured_at": f"2026-11-{1 + index // 200:02d}T{index % 24:02d}:{i % 60:02d}:00",
                "key": f"feedback/images/{rid}.png",
            }
        )
    for i in range(size // 20):  # late corrections for earlier frames
        rows.append(
            {
                "kind": "correction",
                "record_id": f"cam-{rng.integers(max(1, index)):05d}-{rng.integers(size):05d}",
                "corrected_label": None,
                "corrected_boxes": json.dumps([_box(rng, False)]),
                "corrected_at": f"2026-12-01T00:{i % 60:02d}:00",
            }
        )
    return pd.DataFrame(rows)


def _run(path: Path, partitions: PartitionedTable, policy, thresholds) -> tuple[float, int]:
    started = time.perf_counter()
    state = DetectionState(path, policy, thresholds.get)
    absorbed = catch_up(state, partitions)
    report = state.report()
    state.close()
    assert len(report.per_release) == 2
    return time.perf_counter() - started, absorbed["rows_absorbed"]


def run(quick: bool = False) -> dict:
    from cvops_pipelines_tests.reference import detection_production_reference, resolve_records

    n_batches, size = (40, 200) if quick else (1000, 1000)  # 1M frames: feedback_scale's size
    rng = np.random.default_rng(0)
    policy, thresholds = DetectionPolicy(window=48), {"rel-0": 0.5, "rel-1": 0.6}
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp))
        keys = {}
        for b in range(n_batches):
            key = f"b{b:05d}"
            keys[key] = table_key("feedback", key)
            write_table(store, keys[key], batch(rng, b, size))

        def upto(n: int) -> PartitionedTable:
            return PartitionedTable(store, {k: keys[k] for k in list(keys)[:n]})

        state = Path(tmp) / "state.sqlite"
        _run(state, upto(10), policy, thresholds)  # the first batches absorbed
        early_s, early_rows = _run(state, upto(20), policy, thresholds)  # 10 new on 10
        _run(state, upto(n_batches - 10), policy, thresholds)  # the backlog absorbed
        late_s, late_rows = _run(state, upto(n_batches), policy, thresholds)  # 10 new on it
        started = time.perf_counter()
        records = resolve_records(upto(n_batches).read_all())
        detection_production_reference(records[records["boxes"].notna()], policy, thresholds)
        before_s = time.perf_counter() - started
        state_bytes = state.stat().st_size
    frames = n_batches * size
    return {
        "batches": n_batches,
        "frames": frames,
        "run_after_20_batches_s": round(early_s, 3),
        "run_after_backlog_s": round(late_s, 3),
        "rows_absorbed_per_run": [early_rows, late_rows],
        "ratio_backlog_to_early": round(late_s / early_s, 2),
        "target_ratio": 2.0,
        "met": late_s / early_s <= 2.0,
        "every_record_in_memory_s": round(before_s, 2),
        "state_bytes_per_frame": round(state_bytes / frames, 1),
    }
