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
    """Pairwise IoU (len(a) x len(b))."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    return _iou(_columns(a, 1), _columns(b, 0))


def _columns(boxes: np.ndarray, axis: int) -> list[np.ndarray]:
    """x0, y0, x1, y1 as contiguous arrays, with a new axis at `axis` to pair against."""
    return [np.expand_dims(np.ascontiguousarray(boxes[..., i]), axis) for i in range(4)]


def _iou(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """IoU of boxes given as columns that broadcast against each other: column by column is
    an order of magnitude faster than broadcasting whole boxes, which the device's NMS feels."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a, b
    width = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None)
    height = np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    inter = width * height
    return inter / np.maximum((ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter, 1e-12)


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

    Per class: boxes above the threshold, the top `candidates_per_class` by score (ties: the
    lower anchor); then class-wise NMS; then the best `detections_per_image` over all classes
    (ties: the lower class). A young detector scores nearly every anchor above the threshold,
    so nothing here looks at all of them more than once: a partition finds each class's k-th
    score, only what reaches it is sorted, and each class's NMS runs on its own few boxes."""
    per_class = scores[:, 1:]
    k = min(candidates_per_class, len(per_class))
    if k == 0:
        return []
    kth = np.partition(per_class, len(per_class) - k, axis=0)[len(per_class) - k]
    # every box of a class's top k, and its ties at the k-th score (cut below, by anchor)
    anchor, label = np.nonzero((per_class >= kth) & (per_class > score_threshold))
    score = per_class[anchor, label]
    order = np.lexsort((-score, label))  # by class, then score (stable: ties by anchor)
    anchor, label, score = anchor[order], label[order], score[order]
    rank = np.arange(len(label)) - np.searchsorted(label, label, side="left")
    top = rank < k
    anchor, label, score = anchor[top], label[top], score[top]
    candidates = boxes[anchor].astype(np.float64)
    kept = _classwise_nms(candidates, label, nms_iou)
    best = kept[np.argsort(-score[kept], kind="stable")][:detections_per_image]
    scale = np.array([width, height, width, height], np.float64)
    return [
        Detection(
            classes[label[i]], float(score[i]), tuple(float(v) for v in candidates[i] * scale)
        )
        for i in best
    ]


def _classwise_nms(boxes: np.ndarray, label: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS within each class, all classes at once: `boxes` sorted by class, then best
    first. Each class's boxes go in a row of a (classes x k) grid; step j keeps every class's
    j-th box still alive and retires what it overlaps. The indices kept, in input order."""
    if not len(label):
        return np.zeros(0, int)
    starts = np.flatnonzero(np.r_[True, np.diff(label) != 0])
    row = np.cumsum(np.r_[False, np.diff(label) != 0])
    column = np.arange(len(label)) - starts[row]
    grid = np.zeros((len(starts), column.max() + 1, 4))
    grid[row, column] = boxes
    alive = np.zeros(grid.shape[:2], bool)
    alive[row, column] = True
    overlaps = _iou(_columns(grid, 2), _columns(grid, 1)) > iou
    kept = np.zeros_like(alive)
    for j in range(grid.shape[1]):
        take = alive[:, j].copy()
        kept[:, j] = take
        alive &= ~(overlaps[:, j, :] & take[:, None])
    return np.flatnonzero(kept[row, column])
