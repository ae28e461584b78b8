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


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, highest score first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(best)
        if order.size:
            order = order[box_iou(boxes[best], boxes[order])[0] <= iou]
    return np.array(keep, dtype=np.int64)


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
    column 0 background) -> detections in the image's own pixels, best first."""
    kept_boxes, kept_scores, kept_labels = [], [], []
    for label in range(1, scores.shape[1]):
        score = scores[:, label]
        candidates = np.nonzero(score > score_threshold)[0]
        top = candidates[np.argsort(-score[candidates], kind="stable")[:candidates_per_class]]
        kept_boxes.append(boxes[top])
        kept_scores.append(score[top])
        kept_labels.append(np.full(len(top), label))
    all_boxes = np.concatenate(kept_boxes)
    all_scores, all_labels = np.concatenate(kept_scores), np.concatenate(kept_labels)
    keep = []
    for label in np.unique(all_labels):  # class-wise: a 3 never suppresses an 8
        index = np.nonzero(all_labels == label)[0]
        keep.extend(index[nms(all_boxes[index], all_scores[index], nms_iou)])
    keep = np.array(keep, dtype=np.int64)
    keep = keep[np.argsort(-all_scores[keep], kind="stable")][:detections_per_image]
    scale = np.array([width, height, width, height], np.float64)
    return [
        Detection(
            classes[all_labels[i] - 1],
            float(all_scores[i]),
            tuple(float(v) for v in all_boxes[i] * scale),
        )
        for i in keep
    ]
