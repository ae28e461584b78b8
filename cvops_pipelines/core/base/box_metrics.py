"""Detection metrics as the COCO evaluation defines them, through torchmetrics'
`MeanAveragePrecision` on the faster-coco-eval backend (both Apache-2.0), plus recall at IoU 0.5
per class, which is what an operator asks ("of the objects there, how many did it find?"); and
the frame-level matching every stage judges one frame's answer by (field precision and recall,
the gate's and the canary's paired replays). Here, below the stages, because training validates,
label QA reviews and the loop measures with the same rules."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


@dataclass
class DetectionReport:
    map: float  # mAP@[.5:.95]
    map_50: float
    ap_per_class: dict[str, float] = field(default_factory=dict)  # AP@[.5:.95]; nan: no truth
    recall_50: dict[str, float] = field(default_factory=dict)  # at the reported score threshold
    objects: dict[str, int] = field(default_factory=dict)
    # precision at 101 recall points (0, 0.01, ... 1) at IoU 0.5, per class with truth
    pr_50: dict[str, list[float]] = field(default_factory=dict)


def _greedy_hits(pred_boxes, pred_scores, truth_boxes, iou: float) -> np.ndarray:
    """Which predictions find a truth box at IoU >= `iou`, matched greedily by score (COCO's
    matching). A prediction's outcome depends only on the higher-scored ones, so the hits at any
    score threshold are these hits among the boxes it keeps."""
    from cvops_pipelines.edge.detect import box_iou

    hit = np.zeros(len(pred_boxes), bool)
    if not len(truth_boxes) or not len(pred_boxes):
        return hit
    overlaps = box_iou(pred_boxes, truth_boxes)
    taken = np.zeros(len(truth_boxes), bool)
    for p in np.argsort(-np.asarray(pred_scores), kind="stable"):
        candidates = np.where(~taken & (overlaps[p] >= iou))[0]
        if candidates.size:
            taken[candidates[np.argmax(overlaps[p][candidates])]] = hit[p] = True
    return hit


def _by_class(prediction: dict, truth: dict, classes: list[str]):
    """(class, predicted boxes, their scores, true boxes) of one image, class by class."""
    labels, truth_labels = np.asarray(prediction["labels"]), np.asarray(truth["labels"])
    boxes = np.asarray(prediction["boxes"], float).reshape(-1, 4)
    truth_boxes = np.asarray(truth["boxes"], float).reshape(-1, 4)
    scores = np.asarray(prediction["scores"], float)
    for name in classes:
        mine = labels == name
        yield name, boxes[mine], scores[mine], truth_boxes[truth_labels == name]


def evaluate_detections(
    predictions: list[dict], truths: list[dict], classes: list[str]
) -> DetectionReport:
    """`predictions[i]`: boxes (N x 4 pixels), scores, labels (class names); `truths[i]`: boxes,
    labels. Images without truth boxes count: every box predicted there is a false positive."""
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    index = {c: i for i, c in enumerate(classes)}

    def tensors(item: dict, scores: bool) -> dict:
        out = {
            "boxes": torch.as_tensor(np.asarray(item["boxes"], np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor([index[c] for c in item["labels"]], dtype=torch.int64),
        }
        if scores:
            out["scores"] = torch.as_tensor(np.asarray(item["scores"], np.float32))
        return out

    metric = MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        class_metrics=True,
        backend="faster_coco_eval",
        extended_summary=True,
    )
    metric.update([tensors(p, True) for p in predictions], [tensors(t, False) for t in truths])
    result = metric.compute()
    per_class = dict.fromkeys(classes, float("nan"))
    pr_50 = {}
    precision = result["precision"].numpy()  # IoU x recall x class x area x max detections
    for k, (label, ap) in enumerate(
        zip(
            np.atleast_1d(result["classes"].numpy()),
            np.atleast_1d(result["map_per_class"].numpy()),
        )
    ):
        per_class[classes[int(label)]] = float(ap) if ap >= 0 else float("nan")
        if ap >= 0:
            pr_50[classes[int(label)]] = [max(float(p), 0.0) for p in precision[0, :, k, 0, -1]]
    found, objects = dict.fromkeys(classes, 0), dict.fromkeys(classes, 0)
    for p, t in zip(predictions, truths):
        for name, boxes, scores, truth_boxes in _by_class(p, t, classes):
            found[name] += int(_greedy_hits(boxes, scores, truth_boxes, 0.5).sum())
            objects[name] += len(truth_boxes)
    recall = {c: found[c] / objects[c] if objects[c] else float("nan") for c in classes}
    return DetectionReport(
        float(result["map"]), float(result["map_50"]), per_class, recall, objects, pr_50
    )


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float  # boxes at or above this score are the detector's answer
    precision: float
    recall: float
    f1: float


def operating_point(
    predictions: list[dict], truths: list[dict], classes: list[str], iou: float = 0.5
) -> OperatingPoint:
    """The score threshold with the best F1 at IoU `iou` on these images (ties: the higher
    threshold): where a young detector's low, uncalibrated scores become a usable answer. Exact:
    every distinct score is a candidate, all scored in one pass (the greedy matching once, then
    the hits summed down the score order)."""
    scores, hits = [np.zeros(0)], [np.zeros(0, bool)]
    for p, t in zip(predictions, truths):
        for _, boxes, box_scores, truth_boxes in _by_class(p, t, classes):
            scores.append(box_scores)
            hits.append(_greedy_hits(boxes, box_scores, truth_boxes, iou))
    score, hit = np.concatenate(scores), np.concatenate(hits)
    order = np.argsort(-score, kind="stable")
    score, found_so_far = score[order], np.cumsum(hit[order])
    truth_total = sum(len(t["labels"]) for t in truths)
    best = OperatingPoint(1.0, 0.0, 0.0, 0.0)
    # a threshold keeps every box scored at or above it: the last box of each run of equal scores
    for last in np.flatnonzero(np.append(score[1:] != score[:-1], True)) if len(score) else []:
        found, answered = int(found_so_far[last]), int(last) + 1
        precision, recall = found / answered, found / truth_total if truth_total else 0.0
        f1 = 2 * precision * recall / (precision + recall) if found else 0.0
        if f1 > best.f1:
            best = OperatingPoint(float(score[last]), precision, recall, f1)
    return best


def parse_boxes(text) -> list[dict]:
    """A record's boxes column (JSON text, or empty) as a list of {label, box, score}."""
    return json.loads(text) if isinstance(text, str) and text else []


def matches(
    predicted: list[dict], truth: list[dict], min_score: float, match_iou: float = 0.5
) -> tuple[int, int]:
    """(true positives, answered boxes): each truth box found at most once, same class,
    greedily by score."""
    from cvops_pipelines.edge.detect import box_iou

    answered = [p for p in predicted if p.get("score", 1.0) >= min_score]
    answered.sort(key=lambda p: -p.get("score", 1.0))
    taken, hits = set(), 0
    for p in answered:
        best, where = match_iou, None
        for j, t in enumerate(truth):
            if j in taken or t["label"] != p["label"]:
                continue
            overlap = box_iou(np.array(p["box"]), np.array(t["box"]))[0, 0]
            if overlap >= best:
                best, where = overlap, j
        if where is not None:
            taken.add(where)
            hits += 1
    return hits, len(answered)


def frame_right(answer: list[dict], truth: list[dict]) -> bool:
    """A frame answered right: every box it gave matches one, and every true box was found."""
    hits, answered = matches(answer, truth, min_score=0.0)
    return hits == answered == len(truth)


def field_scores(answers: list[list[dict]], truths: list[list[dict]]) -> dict[str, float]:
    """Precision, recall and F1 at IoU 0.5 of answered box sets (every box given counts)
    against the true ones, frame by frame: what an operator would count in the field."""
    hits = answered = total = 0
    for answer, truth in zip(answers, truths, strict=True):
        found, given = matches(answer, truth, min_score=0.0)
        hits, answered, total = hits + found, answered + given, total + len(truth)
    precision = hits / answered if answered else 0.0
    recall = hits / total if total else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "frames": len(answers)}
