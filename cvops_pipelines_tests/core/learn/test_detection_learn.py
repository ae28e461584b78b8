"""Production metrics, drift and the annotation queue for a detector fleet."""

import json

import numpy as np
import pandas as pd
import pytest

from cvops_pipelines.core.base.box_metrics import matches
from cvops_pipelines.core.learn.detection_learn import (
    DetectionPolicy,
    detection_production,
    detection_queue,
)

A = {"label": "3", "box": [10, 10, 40, 40]}
B = {"label": "7", "box": [60, 10, 90, 40]}


def scored(box, score):
    return {**box, "score": score}


def record(i, boxes, corrected=None, release="r1", cohort="site-a"):
    return {
        "record_id": f"cam-{i:08d}",
        "image_id": f"{i:064x}",
        "release": release,
        "cohort": cohort,
        "device_id": "cam",
        "predicted": boxes[0]["label"] if boxes else "",
        "boxes": json.dumps(boxes),
        "corrected_boxes": None if corrected is None else json.dumps(corrected),
        "captured_at": f"2026-11-01T00:{i // 60:02d}:{i % 60:02d}",
        "width": 100,
        "height": 80,
        "uri": "",
        "key": "",
    }


def test_a_box_counts_once_for_its_own_class_and_only_when_confident():
    assert matches([scored(A, 0.9), scored(A, 0.8)], [A], 0.5) == (1, 2)  # double box
    assert matches([scored({**A, "label": "8"}, 0.9)], [A], 0.5) == (0, 1)  # wrong class
    assert matches([scored(A, 0.4)], [A], 0.5) == (0, 0)  # below the answer threshold


def test_precision_and_recall_per_release_and_an_sla_that_agrees_with_them():
    rows = [record(i, [scored(A, 0.9)], [A, B]) for i in range(30)]  # finds 1 of 2
    rows += [record(100 + i, [scored(A, 0.9)], None) for i in range(10)]  # unreviewed
    report = detection_production(pd.DataFrame(rows), DetectionPolicy(min_reviewed=30))
    (row,) = report.per_release.to_dict(orient="records")
    assert (row["frames"], row["reviewed"]) == (40, 30)
    assert row["precision_50"] == 1.0 and row["recall_50"] == 0.5
    failure = report.sla_failure(DetectionPolicy(min_recall=0.6, min_reviewed=30))
    assert "recall 0.500" in failure
    assert report.sla_failure(DetectionPolicy(min_recall=0.5, min_reviewed=30)) is None
    assert report.sla_failure(DetectionPolicy(min_recall=0.6, min_reviewed=31)) is None


def test_box_outputs_that_move_are_flagged_and_steady_ones_are_not():
    rng = np.random.default_rng(0)
    steady = [record(i, [scored(A, float(rng.uniform(0.6, 0.9)))]) for i in range(100)]
    report = detection_production(pd.DataFrame(steady), DetectionPolicy(window=48))
    assert not report.drift["flagged"].any() and report.drift_failure() is None
    moved = steady[:50] + [record(100 + i, [scored(A, 0.2), scored(B, 0.25)]) for i in range(50)]
    report = detection_production(pd.DataFrame(moved), DetectionPolicy(window=48))
    assert report.drift["flagged"].all() and "box outputs moved" in report.drift_failure()
    short = detection_production(pd.DataFrame(steady[:20]), DetectionPolicy(window=48))
    assert short.drift["note"].iloc[0] == "needs 96 frames"


def test_the_queue_puts_field_errors_first_then_the_least_certain():
    rows = [
        record(1, [scored(A, 0.95)], [A]),  # reviewed, right: not queued
        record(2, [scored(A, 0.95)], [A, B]),  # reviewed, one box missed
        record(3, [scored(A, 0.52)]),  # a coin flip
        record(4, [scored(A, 0.97)]),  # sure
        record(5, [scored(A, 0.8), scored({**A, "label": "8"}, 0.7)]),  # two classes, one object
    ]
    queue = detection_queue(pd.DataFrame(rows), experts=set(), size=4, explore_share=0.0)
    assert list(queue["reason"]) == ["field_error", "uncertain", "uncertain", "uncertain"]
    assert queue["record_id"].tolist()[:3] == ["cam-00000002", "cam-00000003", "cam-00000005"]
    assert "two" not in queue["why"].iloc[0] and "'3' and '8'" in queue["why"].iloc[2]
    experts = {rows[1]["image_id"]}
    assert rows[1]["record_id"] not in set(
        detection_queue(pd.DataFrame(rows), experts, 4, 0.0)["record_id"]
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_the_exploration_share_is_a_seeded_sample_of_the_rest(seed):
    rows = [record(i, [scored(A, 0.5 + i / 200)]) for i in range(40)]
    queue = detection_queue(pd.DataFrame(rows), set(), 10, 0.3, seed=seed)
    assert (queue["reason"] == "explore").sum() == 3
    again = detection_queue(pd.DataFrame(rows), set(), 10, 0.3, seed=seed)
    assert queue["record_id"].tolist() == again["record_id"].tolist()


def test_each_release_is_judged_at_its_own_operating_point():
    rows = [record(i, [scored(A, 0.3)], [A], release="young") for i in range(5)]
    rows += [record(10 + i, [scored(A, 0.3)], [A], release="default") for i in range(5)]
    report = detection_production(pd.DataFrame(rows), DetectionPolicy(), {"young": 0.2})
    by_release = report.per_release.set_index("release")
    assert by_release.loc["young", "recall_50"] == 1.0
    assert by_release.loc["default", "recall_50"] == 0.0  # 0.3 < the policy's 0.5
    assert by_release.loc["young", "answer_threshold"] == 0.2
