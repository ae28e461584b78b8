"""The paired canary for detectors: both releases replayed on the same reviewed frames.

Each release's ONNX model runs centrally on the frames, preprocessed and post-processed as its
devices do (`edge.detect`), and answers with its boxes at its own operating point. A frame is
right for a release when its answer is the reviewed box set: every reviewed box found (same
class, IoU >= 0.5) and nothing else answered. The paired right/wrong outcomes go through the same
exact non-inferiority rule as a classifier's canary (`core.measure.replay.paired_test`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.box_metrics import frame_right, parse_boxes
from cvops_pipelines.core.measure.replay import NonInferiority, ReplayComparison, paired_test
from cvops_pipelines.core.ship.canary import balanced
from cvops_pipelines.edge.runtime import Runtime


def release_answers(releases, release: str, images: list[bytes]) -> tuple[list[list[dict]], float]:
    """(each frame's boxes at the release's operating point, as its devices answer, that point)."""
    spec = releases.spec(release)
    threshold = float(spec.get("answer_threshold", 0.5))
    answers = Runtime(releases.model(release), spec).answers(images)
    return [a.answered(threshold) for a in answers], threshold


def replay_detectors(
    releases, paired: pd.DataFrame, canary: str, stable: str, rule: NonInferiority, operator
) -> tuple[ReplayComparison, pd.DataFrame]:
    """The detection task's paired replay: the frames reviewed as box sets, half from each
    side; (comparison, the frames replayed). The operator plays no part for boxes."""
    paired = balanced(paired[paired["corrected_boxes"].notna()], canary, stable)
    return compare_detectors(releases, paired, canary, stable, rule), paired


def compare_detectors(
    releases, paired: pd.DataFrame, canary: str, stable: str, rule: NonInferiority
) -> ReplayComparison:
    """`paired`: reviewed frames (`corrected_boxes` set) from both sides, balanced."""
    images = [releases.store.read_bytes(key) for key in paired["key"]]
    truth = [parse_boxes(text) for text in paired["corrected_boxes"]]
    new, _ = release_answers(releases, canary, images)
    old, _ = release_answers(releases, stable, images)
    new_hits = np.array([frame_right(a, t) for a, t in zip(new, truth)], bool)
    old_hits = np.array([frame_right(a, t) for a, t in zip(old, truth)], bool)
    outcome = paired_test(new_hits, old_hits, "frames answered right", rule)
    cohorts = (
        pd.DataFrame({"cohort": paired["cohort"], "new": new_hits, "old": old_hits})
        .groupby("cohort")
        .agg(records=("new", "size"), new_accuracy=("new", "mean"), old_accuracy=("old", "mean"))
        .reset_index()
    )
    return ReplayComparison(
        [outcome],
        pd.DataFrame(columns=["label", "records", "new_accuracy", "old_accuracy"]),
        cohorts,
        pd.DataFrame(),
        rule,
        ["a frame is right when the answer is the reviewed box set (IoU >= 0.5, same class)"],
    )
