"""The device's end of a detector: from the exported graph's per-anchor boxes and class
probabilities to a short list of (class, score, box), in numpy.

It repeats what torchvision's SSD does after its head (per-class score threshold, per-class
top-k, class-wise NMS, a cap per image), so the edge finds the boxes the trained model found;
the export parity test holds it to that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in image pixels


def summary_label(labels: list[str]) -> str:
    """An image's one-word summary of its boxes: the most frequent class (ties: the first
    name), "" for an image with nothing in it."""
    if not labels:
        return ""
    counts = {label: labels.count(label) for label in labels}
    top = max(counts.values())
    return sorted(label for label, n in counts.items() if n == top)[0]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
    classes: list[str],
    score_threshold: float,
    nms_iou: float,
    candidates_per_class: int,
    detections_per_image: int,
) -> list[Detection]:
    """One image: `boxes` (anchors x 4, in [0, 1] of the input), `scores` (anchors x classes+1,
    column 0 background) -> detections in the image's own pixels, best first.

    Per class: boxes above the threshold, the top `candidates_per_class` by score; then greedy
    class-wise NMS in one pass over all classes in score order, stopped once the image's cap is
    reached: the boxes kept are those the per-class NMS would keep first, in the same order,
    without suppressing the thousands of low-score boxes nobody will see."""
    per_class = scores[:, 1:]
    anchor, label = np.nonzero(per_class > score_threshold)  # anchor-major: ties by anchor
    score = per_class[anchor, label]
    order = np.lexsort((-score, label))  # by class, then score (stable: ties by anchor)
    anchor, label, score = anchor[order], label[order], score[order]
    rank = np.arange(len(label)) - np.searchsorted(label, label, side="left")
    top = rank < candidates_per_class
    anchor, label, score = anchor[top], label[top], score[top]
    candidates = boxes[anchor].astype(np.float64)
    alive = np.ones(len(score), bool)
    kept: list[int] = []
    for i in np.argsort(-score, kind="stable"):  # ties: lower class first, as concatenated
        if not alive[i]:
            continue
        kept.append(int(i))
        if len(kept) == detections_per_image:
            break
        alive[i] = False
        rivals = np.nonzero(alive & (label == label[i]))[0]  # a 3 never suppresses an 8
        if rivals.size:
            alive[rivals[box_iou(candidates[i], candidates[rivals])[0] > nms_iou]] = False
    scale = np.array([width, height, width, height], np.float64)
    return [
        Detection(
            classes[label[i]], float(score[i]), tuple(float(v) for v in candidates[i] * scale)
        )
        for i in kept
    ]
