"""ONNX export, int8 calibration and proof that each artifact behaves like the trained model.

The edge runs onnxruntime on images preprocessed by `edge_inputs` (numpy only, no torch, no
albumentations); parity compares that whole path against torch eager on the training-side
preprocessing, so a wrong mean, a swapped channel order or a broken graph shows up as numbers.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cvops_pipelines.core.build.models import Preprocess
from cvops_pipelines.edge.preprocess import normalize

INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportError(RuntimeError):
    """Export, the ONNX checker or parity failed; the message carries the numbers."""


def edge_inputs(images: list[np.ndarray], preprocess: Preprocess) -> np.ndarray:
    """RGB uint8 images already at the model's size -> the edge agent's input batch."""
    return normalize(images, preprocess.mean, preprocess.std)


def export_onnx(model, preprocess: Preprocess) -> bytes:
    """torch.onnx.export (dynamo) with a dynamic batch axis; full onnx.checker; the
    preprocessing JSON travels inside the file as metadata."""
    return to_onnx(
        model.cpu().eval(),
        preprocess.image_size,
        [OUTPUT_NAME],
        preprocess.to_json(),
        preprocess.architecture,
        max_batch=1024,
    )


def to_onnx(
    module, image_size: int, outputs: list[str], spec_json: str, what: str, max_batch: int
) -> bytes:
    """Any image model (N x 3 x side x side in) as ONNX bytes: the dynamo exporter with a
    dynamic batch axis, the spec as `cvops.preprocess` metadata, then the full checker."""
    import onnx
    import torch

    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_shapes={"x": {0: batch}},
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many types; the stage needs one
        raise ExportError(f"torch.onnx.export failed for {what}: {exc}") from exc
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = "cvops.preprocess", spec_json
    data = proto.SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:  # full_check needs a path for large models
        path = Path(tmp) / "model.onnx"
        path.write_bytes(data)
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"onnx.checker rejected the exported model: {exc}") from exc
    return data


def preprocess_of(onnx_bytes: bytes) -> Preprocess:
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    for entry in proto.metadata_props:
        if entry.key == "cvops.preprocess":
            return Preprocess.from_json(entry.value)
    raise ExportError("ONNX model carries no cvops.preprocess metadata")


def session(onnx_bytes: bytes, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def ort_logits(
    sess, images: list[np.ndarray], preprocess: Preprocess, batch_size: int = 64
) -> np.ndarray:
    out = [
        sess.run([OUTPUT_NAME], {INPUT_NAME: edge_inputs(images[i : i + batch_size], preprocess)})[
            0
        ]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def torch_logits(
    model, images: list[np.ndarray], preprocess: Preprocess, batch_size: int = 64
) -> np.ndarray:
    """Eager logits on the training-side preprocessing (albumentations), the reference."""
    import torch

    from cvops_pipelines.core.build.training import augmentation

    transform = augmentation("none", preprocess.image_size, preprocess.mean, preprocess.std)
    model = model.cpu().eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = torch.stack([transform(image=im)["image"] for im in images[i : i + batch_size]])
            out.append(model(batch).numpy())
    return np.concatenate(out)


@dataclass(frozen=True)
class Parity:
    images: int
    max_abs_logit_diff: float
    top1_agreement: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.top1_agreement == 1.0 and self.max_abs_logit_diff <= self.tolerance

    def as_dict(self, verdict: bool = True) -> dict:
        """With the pass/fail verdict for fp32; without it for int8, which is judged on
        accuracy (quantized logits are not meant to match to a tight tolerance)."""
        out = asdict(self)
        if verdict:
            out["ok"] = self.ok
        else:
            del out["tolerance"]
        return out


def parity(reference: np.ndarray, candidate: np.ndarray, tolerance: float = 1e-3) -> Parity:
    if reference.shape != candidate.shape:
        raise ExportError(
            f"output shapes differ: torch {reference.shape} vs onnx {candidate.shape}"
        )
    return Parity(
        len(reference),
        float(np.abs(reference - candidate).max()),
        float((reference.argmax(1) == candidate.argmax(1)).mean()),
        tolerance,
    )


class _Calibration:
    """Feeds real training images to the ORT calibrator, one batch at a time."""

    def __init__(self, images: list[np.ndarray], preprocess: Preprocess, batch_size: int = 16):
        self._batches = iter(
            [
                edge_inputs(images[i : i + batch_size], preprocess)
                for i in range(0, len(images), batch_size)
            ]
        )

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(
    fp32: bytes, calibration: list[np.ndarray], preprocess: Preprocess, per_channel: bool = True
) -> bytes:
    """Static QDQ int8 (ORT quantization tools): shape inference + graph pre-processing first,
    then MinMax calibration on real images; the preprocessing metadata is carried over.

    Activations uint8, weights int8 (U8S8): x86 int8 kernels (VNNI) multiply u8 by s8; with int8
    activations (S8S8) ORT measured 5x slower than U8S8 for the demo resnet18 on this CPU.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ExportError("int8 calibration needs at least one real training image")
    with tempfile.TemporaryDirectory() as tmp:
        source, prepared, quantized = (
            Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx")
        )
        source.write_bytes(fp32)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        quantize_static(
            str(prepared),
            str(quantized),
            _Calibration(calibration, preprocess),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        proto = onnx.load(str(quantized))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = "cvops.preprocess", preprocess.to_json()
    return proto.SerializeToString()


def describe(onnx_bytes: bytes) -> dict:
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    ops = sorted({n.op_type for n in proto.graph.node})
    return {
        "opset": max(
            (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0
        ),
        "nodes": len(proto.graph.node),
        "operators": json.dumps(ops),
    }
