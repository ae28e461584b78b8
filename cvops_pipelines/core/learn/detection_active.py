"""What a detector fleet should have annotated next (the paired module of active.py): frames
whose review disagrees with the device first (most boxes wrong first), then unreviewed frames by
uncertainty (a box scored near 0.5, or two boxes of different classes on one object), plus a
seeded random share; a Label Studio import with the device's boxes pre-filled as predictions.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.box_metrics import matches, parse_boxes
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.curate.detection_label_qa import labelstudio_box_config, labelstudio_rect
from cvops_pipelines.core.curate.label_qa import export_json
from cvops_pipelines.core.learn.detection_production import DetectionPolicy
from cvops_pipelines.edge.detect import box_iou


def uncertainty(
    boxes: list[dict], threshold: float = 0.5, match_iou: float = 0.5
) -> tuple[float, str]:
    """(score in [0, 1], why): the box nearest the operating point `threshold` (where the
    device hesitates between answering and not), or two classes claiming one object."""
    best, why = 0.0, "confident"
    span = max(threshold, 1 - threshold)
    for b in boxes:
        s = 1 - abs(b.get("score", 1.0) - threshold) / span
        if s > best:
            best, why = s, f"a {b['label']!r} box scored {b.get('score', 1.0):.2f}"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if a["label"] != b["label"]:
                overlap = box_iou(np.array(a["box"]), np.array(b["box"]))[0, 0]
                if overlap >= match_iou:
                    s = min(a.get("score", 1.0), b.get("score", 1.0)) / max(
                        a.get("score", 1.0), b.get("score", 1.0), 1e-9
                    )
                    if s > best:
                        best, why = s, f"{a['label']!r} and {b['label']!r} on one object"
    return best, why


def detection_queue(
    records: pd.DataFrame,
    experts: set[str],
    size: int,
    explore_share: float,
    policy: DetectionPolicy = DetectionPolicy(),
    seed: int = 0,
    thresholds: dict[str, float] | None = None,
) -> pd.DataFrame:
    """What to label next, ranked (see the module docstring); images an expert has already
    labelled are left out, and each image is queued once. `thresholds`: each release's
    operating point (else `policy.min_score`)."""
    thresholds = thresholds or {}
    records = records[records["boxes"].notna() & ~records["image_id"].isin(experts)]
    records = records.drop_duplicates("image_id", keep="last")
    rows = []
    for r in records.itertuples(index=False):
        boxes, threshold = parse_boxes(r.boxes), thresholds.get(r.release, policy.min_score)
        if isinstance(r.corrected_boxes, str):
            corrected = parse_boxes(r.corrected_boxes)
            hits, answered = matches(boxes, corrected, threshold, policy.match_iou)
            wrong = (answered - hits) + (len(corrected) - hits)
            if wrong:
                rows.append((r, "field_error", 1.0 + wrong, f"{wrong} boxes wrong in review"))
            continue
        score, why = uncertainty(boxes, threshold, policy.match_iou)
        rows.append((r, "uncertain", score, why))
    ranked = sorted(rows, key=lambda t: (t[1] != "field_error", -t[2], t[0].image_id))
    explore = int(round(size * explore_share))
    chosen = ranked[: max(0, size - explore)]
    rest = ranked[len(chosen) :]
    if rest and explore:
        picks = np.random.default_rng(seed).choice(len(rest), min(explore, len(rest)), False)
        chosen += [(*rest[i][:1], "explore", rest[i][2], rest[i][3]) for i in sorted(picks)]
    return pd.DataFrame(
        [
            {
                "rank": rank,
                "image_id": r.image_id,
                "reason": reason,
                "score": round(float(score), 4),
                "why": why,
                "predicted": r.predicted,
                "boxes": r.boxes,
                "corrected_boxes": r.corrected_boxes,
                "record_id": r.record_id,
                "release": r.release,
                "device_id": r.device_id,
                "width": r.width,
                "height": r.height,
                "uri": r.uri,
                "key": r.key,
            }
            for rank, (r, reason, score, why) in enumerate(chosen, 1)
        ]
    )


def publish_detection_queue(
    store: Store, queue: pd.DataFrame, classes: list[str]
) -> tuple[str, str]:
    """(queue id, folder): images, a Label Studio import with the device's boxes (scored at
    least 0.3) pre-filled as the prediction to correct, its config, and a CSV."""
    queue_id = "q-" + hashlib.sha256("".join(queue["image_id"]).encode()).hexdigest()[:12]
    prefix = f"annotation/queues/{queue_id}"
    tasks = []
    for row in queue.itertuples(index=False):
        name = row.key.rsplit("/", 1)[-1]
        store.write_bytes(f"{prefix}/images/{name}", store.read_bytes(row.key))
        size = (int(row.width), int(row.height))
        shown = [b for b in parse_boxes(row.boxes) if b.get("score", 1.0) >= 0.3]
        tasks.append(
            {
                "data": {
                    "image": f"/data/local-files/?d=images/{name}",
                    "image_id": row.image_id,
                    "cvops_queue": queue_id,  # what marks the answers as the queue's
                },
                "predictions": [
                    {
                        "model_version": row.release,
                        "score": row.score,
                        "result": [
                            labelstudio_rect(row.image_id, size, b["box"], b["label"], i)
                            for i, b in enumerate(shown)
                        ],
                    }
                ],
                "meta": {"reason": row.reason, "why": row.why, "record_id": row.record_id},
            }
        )
    store.write_bytes(f"{prefix}/tasks.json", export_json(tasks))
    store.write_bytes(f"{prefix}/labelstudio_config.xml", labelstudio_box_config(classes).encode())
    store.write_bytes(f"{prefix}/queue.csv", queue.to_csv(index=False).encode())
    return queue_id, prefix
