"""The export sequence for a detector, behind the same onnx_model asset as a classifier's: export
the raw heads, prove the device path against torchvision on real test images (stop with the
numbers when it differs), calibrate int8 on training images, measure mAP and latency of each on
this machine, choose per target, store and register.

In the measurements a detector's quality is its mAP@[.5:.95] (`accuracy`) and mAP@.5
(`macro_f1`), so a target's `max_accuracy_drop_points` bounds the mAP lost, in points.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from cvops_pipelines.core.base.box_metrics import evaluate_detections
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.base.tracking import Tracking
from cvops_pipelines.core.build.detection_run import load_scenes, predict
from cvops_pipelines.core.build.registry import LoadedModel
from cvops_pipelines.core.ship.artifact_choice import (
    REFERENCE,
    Measurement,
    latency_ms,
)
from cvops_pipelines.core.ship.detection_export import (
    detection_parity,
    detections_as_dicts,
    edge_detections,
    export_detector,
    quantize_detector_int8,
)
from cvops_pipelines.core.ship.export import ExportError, session
from cvops_pipelines.core.ship.onnx_model import (
    ExportedModel,
    ExportPolicy,
    export_inputs,
    finish_export,
)


def export_detector_model(
    loaded: LoadedModel,
    dataset: pd.DataFrame,
    store: Store,
    tracking: Tracking,
    policy: ExportPolicy,
    tags: dict,
    log: Callable[[str], None],
) -> ExportedModel:
    spec, model = loaded.preprocess, loaded.model
    tags, test, calibration_rows = export_inputs(loaded, dataset, policy, tags)
    images, truths = load_scenes(store, test)
    calibration, _ = load_scenes(store, calibration_rows)

    log(f"exporting detector v{loaded.version} ({spec.architecture}) to ONNX")
    fp32 = export_detector(model, spec)
    proof = detection_parity(model, session(fp32), images, spec)
    if not proof.ok:
        raise ExportError(
            f"the ONNX fp32 device path does not find the boxes the trained detector finds on "
            f"{proof.images} test images: {proof.unmatched} boxes unmatched, worst IoU "
            f"{proof.min_iou:.4f} (floor {proof.iou_floor}), worst score difference "
            f"{proof.max_score_diff:.3g} (tolerance {proof.score_tolerance}), "
            f"{proof.boxes_compared} boxes compared"
        )
    log(
        f"fp32 parity ok ({proof.boxes_compared} boxes, worst IoU {proof.min_iou:.6f}); "
        f"calibrating int8 on {len(calibration)} training images"
    )
    artifacts = {
        "onnx_fp32": fp32,
        "onnx_int8": quantize_detector_int8(fp32, calibration, spec),
    }
    measurements = _measure(model, artifacts, images, truths, spec, policy.latency_repeats)
    parities = {"onnx_fp32": {**proof.__dict__, "ok": proof.ok, "verdict": True}}
    int8 = detection_parity(model, session(artifacts["onnx_int8"]), images, spec)
    parities["onnx_int8"] = {**int8.__dict__, "ok": int8.ok, "verdict": False}
    return finish_export(
        loaded, artifacts, measurements, parities, spec, store, tracking, policy, tags, log, "map"
    )


def _measure(model, artifacts, images, truths, spec, repeats: int) -> list[Measurement]:
    """mAP on the test images and latency at batch 1 and 8 of the whole path each artifact
    takes: torchvision's inference for the reference, onnxruntime + the device's numpy
    postprocess for each ONNX file."""
    from cvops_pipelines.core.build.models import state_dict_bytes

    classes = list(spec.classes)
    sessions = {name: session(data) for name, data in artifacts.items()}
    found = {
        REFERENCE: predict(model, images, spec),
        **{n: detections_as_dicts(edge_detections(s, images, spec)) for n, s in sessions.items()},
    }
    runners = {
        REFERENCE: lambda batch: predict(model, batch, spec),
        **{n: (lambda batch, s=s: edge_detections(s, batch, spec)) for n, s in sessions.items()},
    }
    sizes = {REFERENCE: len(state_dict_bytes(model)), **{n: len(d) for n, d in artifacts.items()}}
    batches = {b: [images[i % len(images)] for i in range(b)] for b in (1, 8)}
    out = []
    for name, run in runners.items():
        timings = {}
        for b, batch in batches.items():
            t = latency_ms(lambda run=run, batch=batch: run(batch), repeats=repeats)
            timings.update({f"p50_b{b}": t["p50"], f"p95_b{b}": t["p95"]})
        report = evaluate_detections(found[name], truths, classes)
        out.append(
            Measurement(name, sizes[name], report.map, report.map_50, timings, name in artifacts)
        )
    return out
