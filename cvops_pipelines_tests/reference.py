"""Pandas statements of what the pipeline computes elsewhere, for frames in memory: the
references its engines are held to. "The latest correction wins" (`resolve_records`) for the
feedback query (core/learn/feedback_query.py, DuckDB over the stored partitions; the fleet tests
also read it instead of writing partitions), and a detector fleet's production figures
(`detection_production_reference`) for the incremental state
(core/learn/detection_production_state.py), and the device's detector postprocess as one greedy
pass (`detections_reference`) for the vectorised one (edge/detect.py). Not pipeline code: the
pipeline computes each in one place."""

from dataclasses import replace

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.box_metrics import matches, parse_boxes
from cvops_pipelines.core.learn.detection_production import DetectionPolicy, DetectionProduction
from cvops_pipelines.core.learn.feedback import RECORD_COLUMNS


def resolve_records(feedback: pd.DataFrame) -> pd.DataFrame:
    """One row per record, with the latest correction applied (late ones included)."""
    if feedback.empty:
        return pd.DataFrame(columns=RECORD_COLUMNS)
    records = feedback[feedback["kind"] == "record"].drop_duplicates("record_id", keep="last")
    records = records.set_index("record_id")
    fixes = feedback[feedback["kind"] == "correction"].sort_values("corrected_at", kind="stable")
    fixes = fixes[fixes["record_id"].isin(records.index)].drop_duplicates("record_id", keep="last")
    records.loc[fixes["record_id"], "corrected_label"] = fixes["corrected_label"].to_numpy()
    records.loc[fixes["record_id"], "corrected_at"] = fixes["corrected_at"].to_numpy()
    records.loc[fixes["record_id"], "corrected_boxes"] = fixes["corrected_boxes"].to_numpy()
    return (  # reindex: a table written before a column existed reads it as missing
        records.reset_index()
        .reindex(columns=RECORD_COLUMNS)
        .sort_values("captured_at", kind="stable")
        .reset_index(drop=True)
    )


def _rates(group: pd.DataFrame, policy: DetectionPolicy) -> dict:
    reviewed = group[group["corrected_boxes"].notna()]
    hits = answered = truth = 0
    for row in reviewed.itertuples(index=False):
        corrected = parse_boxes(row.corrected_boxes)
        tp, n = matches(parse_boxes(row.boxes), corrected, policy.min_score, policy.match_iou)
        hits, answered, truth = hits + tp, answered + n, truth + len(corrected)
    return {
        "frames": len(group),
        "reviewed": len(reviewed),
        "coverage": round(len(reviewed) / max(1, len(group)), 4),
        "precision_50": round(hits / answered, 4) if answered else float("nan"),
        "recall_50": round(hits / truth, 4) if truth else float("nan"),
        "answers_per_frame": round(  # boxes at the operating point
            float(
                np.mean(
                    [
                        sum(b.get("score", 1.0) >= policy.min_score for b in parse_boxes(text))
                        for text in group["boxes"]
                    ]
                )
            )
            if len(group)
            else 0.0,
            3,
        ),
    }


def _drift(
    records: pd.DataFrame, policy: DetectionPolicy, thresholds: dict[str, float]
) -> pd.DataFrame:
    """Per frame, one value each (frames are the independent samples; the boxes of one frame
    are not): its top box score, and how many boxes reach the release's operating point."""
    from scipy.stats import ks_2samp

    rows = []
    for release, group in records.groupby("release", sort=True):
        group = group.sort_values("captured_at", kind="stable")
        threshold = thresholds.get(release, policy.min_score)
        if len(group) < 2 * policy.window:
            rows.append(
                {
                    "release": release,
                    "frames": len(group),
                    "p_scores": float("nan"),
                    "p_counts": float("nan"),
                    "flagged": False,
                    "note": f"needs {2 * policy.window} frames",
                }
            )
            continue
        first, last = group.iloc[: policy.window], group.iloc[-policy.window :]

        def top(part):
            return [max((b.get("score", 0.0) for b in parse_boxes(t)), default=0.0) for t in part]

        def answered(part, threshold=threshold):
            return [sum(b.get("score", 0.0) >= threshold for b in parse_boxes(t)) for t in part]

        p_scores = float(ks_2samp(top(first["boxes"]), top(last["boxes"])).pvalue)
        p_counts = float(ks_2samp(answered(first["boxes"]), answered(last["boxes"])).pvalue)
        rows.append(
            {
                "release": release,
                "frames": len(group),
                "p_scores": p_scores,
                "p_counts": p_counts,
                "flagged": min(p_scores, p_counts) < policy.alpha / 2,
                "note": f"latest {policy.window} vs first {policy.window} frames",
            }
        )
    return pd.DataFrame(
        rows, columns=["release", "frames", "p_scores", "p_counts", "flagged", "note"]
    )


def detection_production_reference(
    records: pd.DataFrame, policy: DetectionPolicy, thresholds: dict[str, float] | None = None
) -> DetectionProduction:
    """Every resolved detector record in memory, counted in pandas: what the incremental
    state (core/learn/detection_production_state.py) is held to."""
    records = records[records["boxes"].notna()]
    thresholds = thresholds or {}

    def rates(release, group):
        return _rates(group, replace(policy, min_score=thresholds.get(release, policy.min_score)))

    table = pd.DataFrame(
        [
            {"release": release, "cohort": cohort, **rates(release, group)}
            for (release, cohort), group in records.groupby(["release", "cohort"], sort=True)
        ]
    )
    per_release = pd.DataFrame(
        [
            {
                "release": release,
                "answer_threshold": thresholds.get(release, policy.min_score),
                **rates(release, group),
            }
            for release, group in records.groupby("release", sort=True)
        ],
        columns=[
            "release",
            "answer_threshold",
            "frames",
            "reviewed",
            "coverage",
            "precision_50",
            "recall_50",
            "answers_per_frame",
        ],
    )
    return DetectionProduction(table, per_release, _drift(records, policy, thresholds))


def _iou_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def detections_reference(
    boxes, scores, width, height, classes, score_threshold, nms_iou, candidates_per_class, cap
) -> list[tuple[str, float, tuple]]:
    """torchvision SSD's postprocess, plainly: per class every box above the threshold sorted
    by score (ties: lower anchor), its top k; then one greedy pass over all classes in score
    order (ties: lower class), each kept box retiring its class's overlaps, up to `cap`."""
    candidates = []
    for c in range(scores.shape[1] - 1):
        column = scores[:, c + 1]
        above = [a for a in np.argsort(-column, kind="stable") if column[a] > score_threshold]
        candidates += [(c, a, column[a]) for a in above[:candidates_per_class]]
    order = sorted(range(len(candidates)), key=lambda i: -candidates[i][2])  # stable
    alive, kept = [True] * len(candidates), []
    for i in order:
        if not alive[i]:
            continue
        kept.append(i)
        if len(kept) == cap:
            break
        c, a, _ = candidates[i]
        for j, (other, b, _) in enumerate(candidates):
            if alive[j] and other == c and j != i:
                box = np.asarray(boxes[[a, b]], np.float64)
                if _iou_rows(box[:1], box[1:])[0, 0] > nms_iou:
                    alive[j] = False
        alive[i] = False
    scale = np.array([width, height, width, height], np.float64)
    return [
        (
            classes[candidates[i][0]],
            float(candidates[i][2]),
            tuple(float(v) for v in np.asarray(boxes[candidates[i][1]], np.float64) * scale),
        )
        for i in kept
    ]
