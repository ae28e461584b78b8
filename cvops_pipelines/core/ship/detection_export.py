"""Detector export: the raw-head ONNX graph, proof that the device path finds the boxes the
trained model finds, and int8 calibrated on training images with its mAP cost measured.

The device path is the device runtime (`edge.runtime`: `edge.preprocess` pixels, onnxruntime, then
`edge.detect.detections`); the
reference is torchvision's own inference (its postprocess and NMS) on the same pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from cvops_pipelines.core.build.detection_training import DetectorSpec, RawHeads, predict_torch
from cvops_pipelines.core.ship.export import quantize_int8, to_onnx
from cvops_pipelines.edge.detect import Detection, box_iou
from cvops_pipelines.edge.preprocess import resize
from cvops_pipelines.edge.runtime import Runtime

OUTPUTS = ("boxes", "scores")


def export_detector(model, spec: DetectorSpec) -> bytes:
    """The raw heads as ONNX (`to_onnx`: dynamo, dynamic batch, spec inside, checked)."""
    raw = RawHeads(model.cpu().eval(), spec.image_size)
    return to_onnx(raw, spec.image_size, list(OUTPUTS), spec.to_json(), spec.architecture, 256)


def edge_detections(
    sess, images: list[np.ndarray], spec: DetectorSpec, batch_size: int = 16
) -> list[list[Detection]]:
    """What a device reports for each RGB uint8 image (any size): the device runtime's boxes."""
    answers = Runtime(sess, json.loads(spec.to_json())).run(images, batch_size)
    return [a.boxes for a in answers]


@dataclass(frozen=True)
class DetectionParity:
    images: int
    boxes_compared: int
    unmatched: int  # boxes one side reported that the other did not (IoU < min_iou or class)
    min_iou: float  # worst IoU among matched boxes
    max_score_diff: float
    iou_floor: float = 0.99
    score_tolerance: float = 1e-3

    @property
    def ok(self) -> bool:
        return (
            self.boxes_compared > 0
            and self.unmatched == 0
            and self.min_iou >= self.iou_floor
            and self.max_score_diff <= self.score_tolerance
        )


def detection_parity(model, sess, images: list[np.ndarray], spec: DetectorSpec) -> DetectionParity:
    """Both ways: each box one side reports above the comparison floor must be a box of the same
    class on the other side. The floor sits just above the threshold and, when the list was cut
    at `detections_per_image`, above the cut: a 1e-6 difference between the paths may decide
    which of two near-tied boxes makes the list, which is no disagreement."""
    reference = predict_torch(model, images, spec.image_size)
    edge = edge_detections(sess, images, spec)
    compared = unmatched = 0
    worst_iou, worst_diff = 1.0, 0.0
    for mine, ref in zip(edge, reference):
        cut = mine[-1].score if len(mine) == spec.detections_per_image else 0.0
        floor = max(cut, spec.score_threshold) + 2e-3
        theirs = [
            (spec.classes[label - 1], float(score), box)
            for box, score, label in zip(ref["boxes"], ref["scores"], ref["labels"])
        ]
        ours = [(d.label, d.score, np.array(d.box)) for d in mine]
        for a, b in ((ours, theirs), (theirs, ours)):
            for label, score, box in a:
                if score <= floor:
                    continue
                same = [(s, bx) for lab, s, bx in b if lab == label]
                if not same:
                    unmatched += 1
                    continue
                overlaps = box_iou(box, np.array([bx for _, bx in same]))[0]
                j = int(np.argmax(overlaps))
                if overlaps[j] < DetectionParity.iou_floor:
                    unmatched += 1
                    continue
                compared += 1
                worst_iou = min(worst_iou, float(overlaps[j]))
                worst_diff = max(worst_diff, abs(same[j][0] - score))
    return DetectionParity(len(images), compared, unmatched, worst_iou, worst_diff)


def quantize_detector_int8(fp32: bytes, calibration: list[np.ndarray], spec: DetectorSpec) -> bytes:
    """Static QDQ int8 calibrated on real training images (resized to the input side here)."""
    from PIL import Image

    pixels = [resize(Image.fromarray(image), spec.image_size) for image in calibration]
    return quantize_int8(fp32, pixels, spec)


def detections_as_dicts(found: list[list[Detection]]) -> list[dict]:
    """For `evaluate_detections`."""
    return [
        {
            "boxes": np.array([d.box for d in image], np.float32).reshape(-1, 4),
            "scores": np.array([d.score for d in image], np.float32),
            "labels": [d.label for d in image],
        }
        for image in found
    ]
