"""The learn stage for a detector: production metrics on reviewed frames, output drift on box
scores and counts, and what to annotate next.

- Precision and recall at IoU 0.5 per release x cohort, counting the device's boxes at or above
  the release's operating point (its `answer_threshold`, chosen on validation at training time)
  against the operator's corrected set, with coverage (reviewed / frames): the SLA judges a
  release once it has `min_reviewed` reviewed frames.
- Drift: for each live release, its latest `window` frames against its first `window`
  (two-sample Kolmogorov-Smirnov on each frame's top box score, and on the boxes per frame at the
  operating point), Bonferroni over the two tests: a detector's answers moving while the field
  is unreviewed is the early warning.
- The queue: frames whose review disagrees with the device first (most boxes wrong first), then
  unreviewed frames by uncertainty (a box scored near 0.5, or two boxes of different classes on
  one object), plus a seeded random share; a Label Studio import with the device's boxes
  pre-filled as predictions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.box_metrics import matches, parse_boxes
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.curate.box_qa import labelstudio_box_config, labelstudio_rect
from cvops_pipelines.core.curate.label_qa import export_json
from cvops_pipelines.core.learn.production import FieldReport
from cvops_pipelines.edge.detect import box_iou


@dataclass(frozen=True)
class DetectionPolicy:
    min_score: float = 0.5  # device boxes counted as an answer (when its release names none)
    match_iou: float = 0.5
    min_precision: float = 0.5
    min_recall: float = 0.5
    min_reviewed: int = 30
    window: int = 48
    alpha: float = 0.05


@dataclass
class DetectionProduction(FieldReport):
    table: pd.DataFrame  # release x cohort: frames, reviewed, coverage, precision, recall
    per_release: pd.DataFrame
    drift: pd.DataFrame  # release, frames, p_scores, p_counts, flagged / why not tested

    def sla_failure(self, policy: DetectionPolicy) -> str | None:
        judged = self.per_release[self.per_release["reviewed"] >= policy.min_reviewed]
        for row in judged.itertuples(index=False):
            if row.precision_50 < policy.min_precision or row.recall_50 < policy.min_recall:
                return (
                    f"{row.release}: precision {row.precision_50:.3f} / recall "
                    f"{row.recall_50:.3f} at IoU {policy.match_iou} on {row.reviewed} reviewed "
                    f"frames (SLA {policy.min_precision} / {policy.min_recall})"
                )
        return None

    def drift_failure(self) -> str | None:
        flagged = self.drift[self.drift["flagged"] == True]  # noqa: E712 - object column
        if flagged.empty:
            return None
        row = flagged.iloc[0]
        return (
            f"{row['release']}: box outputs moved (score p={row['p_scores']:.2g}, count "
            f"p={row['p_counts']:.2g})"
        )

    def summary(self, policy: DetectionPolicy) -> dict:
        return {
            "task": "detection",
            "sla_ok": self.sla_failure(policy) is None,
            "drift_flagged": self.drift_failure() is not None,
            "records": int(self.per_release["frames"].sum()) if len(self.per_release) else 0,
            "reviewed": int(self.per_release["reviewed"].sum()) if len(self.per_release) else 0,
            "per_release": self.per_release.to_dict(orient="records"),
            "drift": self.drift.to_dict(orient="records"),
            "release_lines": [  # what `cvops status` prints per release
                f"{r['release']}: precision {r['precision_50']} / recall {r['recall_50']} at IoU "
                f"0.5 on {r['reviewed']} reviewed of {r['frames']} frames "
                f"(coverage {r['coverage']:.0%})"
                for r in self.per_release.to_dict(orient="records")
            ],
        }


DRIFT_COLUMNS = ["release", "frames", "p_scores", "p_counts", "flagged", "note"]


def per_release_columns() -> list[str]:
    return [
        "release",
        "answer_threshold",
        "frames",
        "reviewed",
        "coverage",
        "precision_50",
        "recall_50",
        "answers_per_frame",
    ]


def drift_rows(groups: dict, policy: DetectionPolicy) -> pd.DataFrame:
    """Per release, its first and latest `window` frames by capture time, one value each per
    frame (frames are the independent samples; the boxes of one frame are not): its top box
    score (`top`) and how many boxes reach the release's operating point (`answered_any`).
    `groups`: release -> (frames, first, last)."""
    from scipy.stats import ks_2samp

    rows = []
    for release, (frames, first, last) in sorted(groups.items()):
        if frames < 2 * policy.window:
            rows.append(
                {
                    "release": release,
                    "frames": frames,
                    "p_scores": float("nan"),
                    "p_counts": float("nan"),
                    "flagged": False,
                    "note": f"needs {2 * policy.window} frames",
                }
            )
            continue
        p_scores = float(ks_2samp(list(first["top"]), list(last["top"])).pvalue)
        p_counts = float(ks_2samp(list(first["answered_any"]), list(last["answered_any"])).pvalue)
        rows.append(
            {
                "release": release,
                "frames": frames,
                "p_scores": p_scores,
                "p_counts": p_counts,
                "flagged": min(p_scores, p_counts) < policy.alpha / 2,
                "note": f"latest {policy.window} vs first {policy.window} frames",
            }
        )
    return pd.DataFrame(rows, columns=DRIFT_COLUMNS)


def release_threshold(store: Store):
    """A release's operating point, from the spec it shipped with (None: it names none)."""
    from cvops_pipelines.edge.wire import SPEC_FILE, release_key

    def threshold(release: str) -> float | None:
        try:
            spec = json.loads(store.read_bytes(release_key(release, SPEC_FILE)))
        except FileNotFoundError:
            return None
        return float(spec["answer_threshold"]) if "answer_threshold" in spec else None

    return threshold


def answer_thresholds(store: Store, releases) -> dict[str, float]:
    """Each release's operating point, where its spec names one."""
    threshold = release_threshold(store)
    found = {release: threshold(release) for release in sorted(set(releases))}
    return {release: point for release, point in found.items() if point is not None}


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
                "data": {"image": f"images/{name}", "image_id": row.image_id, "queue": queue_id},
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
