"""Detection metrics on a case small enough to work out by hand, cross-checked against
pycocotools, the reference implementation of the COCO evaluation."""

import json

import numpy as np
import pytest

from cvops_pipelines.core.base.box_metrics import evaluate_detections

CLASSES = ["a", "b", "c"]
TRUTHS = [
    {"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": ["a", "a"]},
    {"boxes": [[0, 0, 100, 100]], "labels": ["b"]},
    {"boxes": [], "labels": []},  # an empty image: a negative
]
PREDICTIONS = [
    {"boxes": [[0, 0, 10, 10], [50, 50, 60, 60]], "scores": [0.9, 0.8], "labels": ["a", "a"]},
    {"boxes": [[0, 0, 100, 83]], "scores": [0.7], "labels": ["b"]},  # IoU 0.83
    {"boxes": [], "scores": [], "labels": []},
]
# By hand (COCO: 101 recall points, IoU thresholds .50:.05:.95, match when IoU >= threshold):
# a: one of two found at every threshold, the false positive ranked after the hit: precision 1
#    up to recall 0.5, so AP = 51/101 at every threshold.
# b: its one box is found at thresholds .50-.80 (7 of 10): AP@[.5:.95] = 0.7, AP@.5 = 1.
AP_A, AP_B = 51 / 101, 0.7


def test_metrics_match_the_hand_computed_figures():
    report = evaluate_detections(PREDICTIONS, TRUTHS, CLASSES)
    assert report.ap_per_class["a"] == pytest.approx(AP_A, abs=1e-6)
    assert report.ap_per_class["b"] == pytest.approx(AP_B, abs=1e-6)
    assert np.isnan(report.ap_per_class["c"])  # no truth, no AP: not a zero
    assert report.map == pytest.approx((AP_A + AP_B) / 2, abs=1e-6)
    assert report.map_50 == pytest.approx((AP_A + 1.0) / 2, abs=1e-6)
    assert report.recall_50 == pytest.approx({"a": 0.5, "b": 1.0, "c": float("nan")}, nan_ok=True)
    assert report.objects == {"a": 2, "b": 1, "c": 0}


def test_metrics_agree_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box):
        return [box[0], box[1], box[2] - box[0], box[3] - box[1]]

    images, annotations, results = [], [], []
    for i, (truth, pred) in enumerate(zip(TRUTHS, PREDICTIONS), 1):
        images.append({"id": i, "width": 200, "height": 200})
        for box, label in zip(truth["boxes"], truth["labels"]):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": CLASSES.index(label) + 1,
                    "bbox": xywh(box),
                    "area": xywh(box)[2] * xywh(box)[3],
                    "iscrowd": 0,
                }
            )
        for box, score, label in zip(pred["boxes"], pred["scores"], pred["labels"]):
            results.append(
                {
                    "image_id": i,
                    "category_id": CLASSES.index(label) + 1,
                    "bbox": xywh(box),
                    "score": score,
                }
            )
    path = tmp_path / "truth.json"
    categories = [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    truth = COCO(str(path))
    evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    report = evaluate_detections(PREDICTIONS, TRUTHS, CLASSES)
    assert report.map == pytest.approx(evaluation.stats[0], abs=1e-6)
    assert report.map_50 == pytest.approx(evaluation.stats[1], abs=1e-6)


def test_the_operating_point_is_the_threshold_with_the_best_f1():
    from cvops_pipelines.core.base.box_metrics import operating_point

    truth = [{"boxes": np.array([[0, 0, 10, 10]], float), "labels": ["a"]}]
    found = [
        {
            "boxes": np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float),
            "scores": np.array([0.3, 0.6]),
            "labels": ["a", "a"],
        }
    ]
    point = operating_point(found, truth, ["a"])
    assert point.threshold == 0.3 and point.precision == 0.5 and point.recall == 1.0
    assert point.f1 == pytest.approx(2 / 3)
    none = operating_point([{**found[0], "labels": ["b", "b"]}], truth, ["a", "b"])
    assert none.f1 == 0.0 and none.threshold == 1.0  # nothing right: answer nothing


def test_field_scores_count_every_answered_box_and_every_missed_one():
    from cvops_pipelines.core.base.box_metrics import field_scores

    truth = [
        [{"label": "1", "box": [0, 0, 10, 10]}, {"label": "2", "box": [20, 20, 30, 30]}],
        [],  # an empty frame: anything answered there is wrong
    ]
    answers = [
        [
            {"label": "1", "box": [0, 0, 10, 9], "score": 0.9},  # found
            {"label": "3", "box": [20, 20, 30, 30], "score": 0.8},  # wrong class: a miss
        ],
        [{"label": "1", "box": [5, 5, 9, 9], "score": 0.6}],
    ]
    scores = field_scores(answers, truth)
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1 / 2)
    assert scores["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert field_scores([[]], [[]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "frames": 1}


def test_the_one_pass_operating_point_agrees_with_matching_at_every_threshold():
    """Against the frame matcher (`matches`, written separately) run at every distinct score:
    jittered boxes, confused classes, duplicates, tied scores and an empty frame."""
    from cvops_pipelines.core.base.box_metrics import matches, operating_point

    rng = np.random.default_rng(7)
    classes = ["a", "b", "c"]
    predictions, truths = [], []
    for image in range(12):
        n = 0 if image == 5 else int(rng.integers(1, 5))
        corners = rng.uniform(0, 80, (n, 2))
        truth = np.hstack([corners, corners + rng.uniform(8, 20, (n, 2))])
        labels = list(rng.choice(classes, n))
        guesses = np.vstack([truth + rng.normal(0, 3, truth.shape) for _ in range(2)])
        guesses = np.vstack([guesses, rng.uniform(0, 90, (3, 4)).cumsum(1) / 2])
        guessed = [c if rng.random() < 0.8 else "b" for c in labels * 2] + ["a", "c", "b"]
        predictions.append(
            {
                "boxes": guesses,
                "scores": rng.choice(np.linspace(0.05, 0.95, 19), len(guesses)),
                "labels": guessed,
            }
        )
        truths.append({"boxes": truth, "labels": labels})

    def records(boxes, labels, scores=None):
        return [
            {"label": label, "box": list(box), **({} if scores is None else {"score": score})}
            for box, label, score in zip(boxes, labels, scores if scores is not None else labels)
        ]

    best = (0.0, 1.0)  # f1, threshold; ties: the higher threshold
    total = sum(len(t["labels"]) for t in truths)
    for threshold in sorted({s for p in predictions for s in p["scores"]}, reverse=True):
        hits = answered = 0
        for p, t in zip(predictions, truths):
            found, given = matches(
                records(p["boxes"], p["labels"], p["scores"]),
                records(t["boxes"], t["labels"]),
                min_score=threshold,
            )
            hits, answered = hits + found, answered + given
        f1 = 2 * hits / (answered + total) if hits else 0.0
        best = max(best, (f1, threshold), key=lambda b: b[0])
    point = operating_point(predictions, truths, classes)
    assert 0 < point.f1 < 1
    assert point.f1 == pytest.approx(best[0]) and point.threshold == best[1]
