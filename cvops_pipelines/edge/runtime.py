"""A release answering images the device's way, built from its model and its spec.

The one place a released ONNX model is run: the agent serves with it, and the pipeline replays
with it (the canary's paired replay, export parity, production drift), so what the pipeline
judges is what devices answer. The spec's `task` picks the head that reads the model's outputs;
a new task adds a head to HEADS. Runs on devices: onnxruntime, Pillow and numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cvops_pipelines.edge.bundle import BundleError
from cvops_pipelines.edge.detect import Detection, detections
from cvops_pipelines.edge.preprocess import load_rgb, normalize, resize


@dataclass(frozen=True)
class Answer:
    """One image's answer. `label`, `confidence`, `top`: what an operator is shown (a detector's:
    its boxes at the operating point, best first; "" when none). `probs`: a classifier's softmax
    over the spec's classes. `boxes`: a detector's every box at its score threshold."""

    label: str
    confidence: float
    top: list[tuple[str, float]]
    probs: np.ndarray | None = None
    boxes: list[Detection] | None = None

    def answered(self, threshold: float) -> list[dict]:
        """A detector's boxes at `threshold` or above, as the records carry them."""
        return [
            {"label": d.label, "score": d.score, "box": list(d.box)}
            for d in self.boxes or ()
            if d.score >= threshold
        ]


class ClassifierHead:
    """Logits (N x classes) -> softmax, top-k."""

    def check(self, outputs: list[np.ndarray], spec: dict) -> None:
        out, classes = outputs[0], len(spec["classes"])
        if out.shape != (1, classes) or not np.isfinite(out).all():
            raise BundleError(
                "health",
                f"model answers {out.shape} (finite: {bool(np.isfinite(out).all())}) for "
                f"{classes} classes",
            )

    def answers(self, outputs, sizes, spec: dict, top_k: int) -> list[Answer]:
        logits = outputs[0] - outputs[0].max(1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(1, keepdims=True)
        classes, out = spec["classes"], []
        for p in probs:
            order = np.argsort(-p)[:top_k]
            top = [(classes[i], round(float(p[i]), 6)) for i in order]
            out.append(Answer(top[0][0], top[0][1], top, probs=p))
        return out


class DetectorHead:
    """Per-anchor boxes (N x A x 4) and class scores (N x A x classes+1) -> the image's boxes,
    as torchvision's SSD post-processing finds them (edge/detect.py)."""

    def check(self, outputs: list[np.ndarray], spec: dict) -> None:
        classes, shapes = len(spec["classes"]), [tuple(o.shape) for o in outputs]
        ok = (
            len(outputs) == 2
            and outputs[0].ndim == 3
            and outputs[0].shape[0] == 1
            and outputs[0].shape[2] == 4
            and outputs[1].shape == (1, outputs[0].shape[1], classes + 1)
            and all(np.isfinite(o).all() for o in outputs)
        )
        if not ok:
            raise BundleError(
                "health", f"detector answers {shapes} for {classes} classes (+ background)"
            )

    def answers(self, outputs, sizes, spec: dict, top_k: int) -> list[Answer]:
        boxes, scores = outputs[:2]
        operating_point = float(spec.get("answer_threshold", 0.5))
        out = []
        for i, (width, height) in enumerate(sizes):
            found = detections(
                boxes[i],
                scores[i],
                width,
                height,
                list(spec["classes"]),
                spec["score_threshold"],
                spec["nms_iou"],
                spec["candidates_per_class"],
                spec["detections_per_image"],
            )
            top = [(d.label, round(d.score, 6)) for d in found if d.score >= operating_point]
            label, confidence = top[0] if top else ("", 0.0)
            out.append(Answer(label, confidence, top[:top_k], boxes=found))
        return out


HEADS = {"classification": ClassifierHead(), "detection": DetectorHead()}


class Runtime:
    """`model`: ONNX bytes, a path, or an onnxruntime session already open; `spec`: the
    release's preprocess.json as a dict. A spec naming a task no head reads is refused."""

    def __init__(self, model, spec: dict, threads: int = 0, top_k: int = 3):
        import onnxruntime as ort

        task = spec.get("task", "classification")
        if task not in HEADS:
            raise BundleError("task", f"this device cannot answer for task {task!r}")
        self.spec, self.head, self.top_k = spec, HEADS[task], top_k
        if isinstance(model, bytes | str):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.log_severity_level = 3
            model = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.session = model
        self.input = self.session.get_inputs()[0].name
        self.size = int(spec["image_size"])

    def health(self) -> None:
        """Run once on a blank input; a model that cannot answer is never served."""
        blank = np.zeros((1, 3, self.size, self.size), np.float32)
        try:
            outputs = self.session.run(None, {self.input: blank})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError("health", f"model does not load or run: {exc}") from None
        self.head.check(outputs, self.spec)

    def prepare(self, images: list) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The model's input batch for decoded images (PIL RGB images or HWC uint8 arrays, any
        size) and their sizes: the half of `run` that needs no model, so a stream can prepare
        the next frame while this one is predicted."""
        from PIL import Image

        rgbs = [Image.fromarray(i) if isinstance(i, np.ndarray) else i for i in images]
        batch = normalize(
            [resize(rgb, self.size) for rgb in rgbs], self.spec["mean"], self.spec["std"]
        )
        return batch, [rgb.size for rgb in rgbs]

    def infer(self, batch: np.ndarray, sizes: list[tuple[int, int]]) -> list[Answer]:
        outputs = self.session.run(None, {self.input: batch})
        return self.head.answers(outputs, sizes, self.spec, self.top_k)

    def run(self, images: list, batch_size: int = 32) -> list[Answer]:
        """Answers for decoded images (PIL RGB images or HWC uint8 arrays, any size)."""
        out: list[Answer] = []
        for start in range(0, len(images), batch_size):
            out += self.infer(*self.prepare(images[start : start + batch_size]))
        return out

    def answers(self, images: list[bytes], batch_size: int = 32) -> list[Answer]:
        """Answers for stored original bytes, decoded as on the device."""
        out: list[Answer] = []
        for start in range(0, len(images), batch_size):
            chunk = [load_rgb(data) for data in images[start : start + batch_size]]
            out += self.run(chunk, batch_size)
        return out

    def probabilities(self, images: list[bytes]) -> np.ndarray:
        """A classifier's softmax outputs (images x classes), as drift and the canary compare."""
        probs = [a.probs for a in self.answers(images)]
        return np.stack(probs) if probs else np.zeros((0, len(self.spec["classes"])))
