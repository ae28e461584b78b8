"""Boxes in the pool and in dataset versions: the detection task's label is a set of boxes.

Each image's boxes travel as one JSON column (`boxes`: `[{"label": "7", "box": [x0, y0, x1, y1]}]`,
pixels on the stored, orientation-corrected image) beside the same columns a classification pool
has, so splits, holdout, near-duplicate leakage and snapshots work unchanged. `label` is the
image's most frequent class (ties: the first name), or `NO_OBJECTS` for a negative: an image
annotated as holding nothing is kept, never dropped.

Within an image, the latest annotation set wins (one annotator's boxes from one file), as the
latest vote wins for classification; `agreement` is the share of annotators whose latest set
matches the winner box for box (same class, IoU >= 0.5).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.ontology import NO_OBJECTS, has_boxes
from cvops_pipelines.core.curate.pool import IMAGE_COLUMNS, POOL_COLUMNS
from cvops_pipelines.edge.detect import box_iou, summary_label

BOX_POOL_COLUMNS = [*POOL_COLUMNS, "boxes", "n_boxes"]
COORDS = ["x_min", "y_min", "x_max", "y_max"]
MATCH_IOU = 0.5


def encode(boxes: list[dict]) -> str:
    ordered = sorted(boxes, key=lambda b: (b["box"], b["label"]))
    return json.dumps(
        [{"label": b["label"], "box": [round(float(v), 2) for v in b["box"]]} for b in ordered]
    )


def decode(text: str) -> tuple[np.ndarray, list[str]]:
    items = json.loads(text) if text else []
    boxes = np.array([i["box"] for i in items], np.float64).reshape(-1, 4)
    return boxes, [i["label"] for i in items]


def sets_agree(a: str, b: str, min_iou: float = MATCH_IOU) -> bool:
    """Two box sets agree when each box of one has its own same-class box in the other."""
    boxes_a, labels_a = decode(a)
    boxes_b, labels_b = decode(b)
    if len(labels_a) != len(labels_b):
        return False
    if not labels_a:
        return True
    overlap = box_iou(boxes_a, boxes_b)
    same = np.array(labels_a)[:, None] == np.array(labels_b)[None, :]
    overlap = np.where(same, overlap, 0.0)
    used: set[int] = set()
    for i in np.argsort(-overlap.max(axis=1)):
        candidates = [j for j in np.argsort(-overlap[i]) if j not in used]
        if not candidates or overlap[i, candidates[0]] < min_iou:
            return False
        used.add(candidates[0])
    return True


def annotation_sets(labels: pd.DataFrame) -> pd.DataFrame:
    """One row per (image, annotator, file): the boxes that annotator drew there, as JSON. Rows
    without a box count only as `NO_OBJECTS` (a negative); an image-level class label is
    classification data and is left out."""
    boxed = labels["x_min"].notna() if "x_min" in labels else pd.Series(False, labels.index)
    usable = labels[boxed | (labels["label"] == NO_OBJECTS)]
    keys = ["image_id", "annotator", "source", "annotation_file"]
    rows = []
    for key, group in usable.groupby(keys, sort=True, dropna=False):
        drawn = group[group["x_min"].notna()]
        boxes = [
            {"label": label, "box": list(coords)}
            for label, coords in zip(drawn["label"], drawn[COORDS].to_numpy())
        ]
        rows.append(
            {
                **dict(zip(keys, key)),
                "boxes": encode(boxes),
                "labels": sorted(b["label"] for b in boxes),
                "origin": group["origin"].iloc[-1],
                "labeled_at": group["labeled_at"].max(),
            }
        )
    return pd.DataFrame(rows, columns=[*keys, "boxes", "labels", "origin", "labeled_at"])


def build_box_pool(manifest: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    if labels.empty or manifest.empty:
        return pd.DataFrame(columns=BOX_POOL_COLUMNS)
    sets = annotation_sets(labels).sort_values("labeled_at", kind="stable")
    latest = sets.drop_duplicates(["image_id", "annotator"], keep="last")
    rows = []
    for image_id, group in latest.groupby("image_id", sort=True):
        winner = group.iloc[-1]
        agree = [sets_agree(winner["boxes"], other) for other in group["boxes"]]
        rows.append(
            {
                "image_id": image_id,
                "label": summary_label(winner["labels"]),
                "n_votes": len(group),
                "agreement": float(np.mean(agree)),
                "annotators": list(group["annotator"]),
                "votes": [len(b) for b in group["labels"]],
                "origin": winner["origin"],
                "labeled_at": group["labeled_at"].max(),
                "boxes": winner["boxes"],
                "n_boxes": len(winner["labels"]),
            }
        )
    images = manifest.sort_values("ingested_at", kind="stable").drop_duplicates(
        "image_id", keep="first"
    )
    pool = pd.DataFrame(rows).merge(images[IMAGE_COLUMNS], on="image_id", how="inner")
    return pool[BOX_POOL_COLUMNS].sort_values("image_id").reset_index(drop=True)


def box_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per box (image_id, split, label, coordinates) with what the contracts check: its
    width and height, its margins to the image's right and bottom edges, and its image's count."""
    out = []
    for row in rows.itertuples(index=False) if has_boxes(rows) else ():
        boxes, labels = decode(row.boxes)
        for label, (x0, y0, x1, y1) in zip(labels, boxes):
            count = len(labels)
            out.append(
                {
                    "image_id": row.image_id,
                    "split": getattr(row, "split", ""),
                    "label": label,
                    "x_min": x0,
                    "y_min": y0,
                    "x_max": x1,
                    "y_max": y1,
                    "box_width": x1 - x0,
                    "box_height": y1 - y0,
                    "right_margin": row.width - x1,
                    "bottom_margin": row.height - y1,
                    "boxes_in_image": count,
                }
            )
    columns = [
        "image_id",
        "split",
        "label",
        *COORDS,
        "box_width",
        "box_height",
        "right_margin",
        "bottom_margin",
        "boxes_in_image",
    ]
    frame = pd.DataFrame(out, columns=columns)
    numeric = columns[3:]
    frame[numeric] = frame[numeric].astype("float64")
    return frame
