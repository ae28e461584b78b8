"""The paired canary for detectors: both releases replayed on the same reviewed frames.

Each release's ONNX model runs centrally on the frames, preprocessed and post-processed as its
devices do (`edge.detect`), and answers with its boxes at its own operating point. A frame is
right for a release when its answer is the reviewed box set: every reviewed box found (same
class, IoU >= 0.5) and nothing else answered. The paired right/wrong outcomes go through the same
exact non-inferiority rule as a classifier's canary (`core.measure.replay.paired_test`).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from cvops_pipelines.core.learn.detection_learn import DetectionPolicy, matches, parse
from cvops_pipelines.core.measure.replay import NonInferiority, ReplayComparison, paired_test
from cvops_pipelines.edge.wire import release_key


def release_answers(releases, release: str, images: list[bytes]) -> tuple[list[list[dict]], float]:
    """(each frame's answered boxes, the release's answer threshold)."""
    import onnxruntime as ort

    from cvops_pipelines.edge.detect import detections
    from cvops_pipelines.edge.preprocess import load_rgb, normalize, resize

    spec = json.loads(releases.store.read_bytes(release_key(release, "preprocess.json")))
    threshold = float(spec.get("answer_threshold", 0.5))
    session = ort.InferenceSession(releases.model(release), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = []
    for data in images:
        rgb = load_rgb(data)
        batch = normalize([resize(rgb, spec["image_size"])], spec["mean"], spec["std"])
        boxes, scores = session.run(None, {name: batch})
        found = detections(
            boxes[0],
            scores[0],
            rgb.size[0],
            rgb.size[1],
            list(spec["classes"]),
            threshold,
            spec["nms_iou"],
            spec["candidates_per_class"],
            spec["detections_per_image"],
        )
        out.append([{"label": d.label, "score": d.score, "box": list(d.box)} for d in found])
    return out, threshold


def frame_right(answer: list[dict], truth: list[dict]) -> bool:
    hits, answered = matches(answer, truth, DetectionPolicy(min_score=0.0))
    return hits == answered == len(truth)


def is_detector(releases, release: str) -> bool:
    spec = json.loads(releases.store.read_bytes(release_key(release, "preprocess.json")))
    return spec.get("task") == "detection"


def compare_detectors(
    releases, paired: pd.DataFrame, canary: str, stable: str, rule: NonInferiority
) -> ReplayComparison:
    """`paired`: reviewed frames (`corrected_boxes` set) from both sides, balanced."""
    images = [releases.store.read_bytes(key) for key in paired["key"]]
    truth = [parse(text) for text in paired["corrected_boxes"]]
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
