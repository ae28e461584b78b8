"""The export sequence behind the onnx_model asset: export fp32, prove it against torch, calibrate
int8, measure both on this machine, choose one per target, store and register them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from cvops_pipelines.core.base.handoffs import ExportRecord
from cvops_pipelines.core.base.images import load_images
from cvops_pipelines.core.base.ontology import class_indices
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.base.tracking import Tracking
from cvops_pipelines.core.build.registry import LoadedModel
from cvops_pipelines.core.ship.artifact_choice import (
    REFERENCE,
    Choice,
    TargetProfile,
    choose,
    measure_artifacts,
    table,
)
from cvops_pipelines.core.ship.export import (
    ExportError,
    describe,
    export_onnx,
    ort_logits,
    parity,
    quantize_int8,
    session,
    torch_logits,
)
from cvops_pipelines.edge.bundle import sha256


@dataclass(frozen=True)
class ExportPolicy:
    targets: tuple[TargetProfile, ...]
    parity_tolerance: float = 1e-3  # fp32 ONNX vs torch: max |logit diff|
    calibration_images: int = 256  # real training images for int8 calibration
    latency_repeats: int = 50


@dataclass
class ExportedModel:
    record: ExportRecord  # the asset value edge_release reads
    measurements: pd.DataFrame
    choices: list[Choice]
    parities: dict[str, dict]
    run_url: str


def export_inputs(
    loaded: LoadedModel, dataset: pd.DataFrame, policy: ExportPolicy, tags: dict
) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """The run's tags, the test rows (parity and measurements) and the training rows int8 is
    calibrated on (a seeded sample: the same dataset gives the same calibration)."""
    tags = {
        **tags,
        "dataset_version": str(dataset["dataset_version"].iloc[0]),
        "source_model_version": loaded.version,
    }
    test = dataset[dataset["split"] == "test"]
    train = dataset[dataset["split"] == "train"]
    calibration_rows = train.sample(min(policy.calibration_images, len(train)), random_state=0)
    return tags, test, calibration_rows


def export_model(
    loaded: LoadedModel,
    dataset: pd.DataFrame,
    store: Store,
    tracking: Tracking,
    policy: ExportPolicy,
    tags: dict,
    log: Callable[[str], None],
) -> ExportedModel:
    preprocess, model = loaded.preprocess, loaded.model
    tags, test, calibration_rows = export_inputs(loaded, dataset, policy, tags)
    test_images = load_images(store, list(test["key"]), preprocess.image_size)
    calibration = load_images(store, list(calibration_rows["key"]), preprocess.image_size)
    labels = class_indices(test["label"], preprocess.classes)

    log(f"exporting v{loaded.version} ({preprocess.architecture}) to ONNX")
    fp32 = export_onnx(model, preprocess)
    reference = torch_logits(model, test_images, preprocess)
    fp32_parity = parity(
        reference, ort_logits(session(fp32), test_images, preprocess), policy.parity_tolerance
    )
    if not fp32_parity.ok:
        raise ExportError(
            f"ONNX fp32 does not behave like the trained model on "
            f"{len(test_images)} test images: max |logit diff| "
            f"{fp32_parity.max_abs_logit_diff:.3g} (tolerance "
            f"{policy.parity_tolerance}), top-1 agreement "
            f"{fp32_parity.top1_agreement:.4f}"
        )
    log(
        f"fp32 parity ok ({fp32_parity.max_abs_logit_diff:.2g} max |logit diff|); "
        f"calibrating int8 on {len(calibration)} training images"
    )
    artifacts = {"onnx_fp32": fp32, "onnx_int8": quantize_int8(fp32, calibration, preprocess)}
    measurements, logits = measure_artifacts(
        model, artifacts, test_images, labels, preprocess, policy.latency_repeats, reference
    )
    parities = {
        name: parity(logits[REFERENCE], logits[name], policy.parity_tolerance).as_dict(
            verdict=name == "onnx_fp32"
        )
        for name in artifacts
    }
    return finish_export(
        loaded, artifacts, measurements, parities, preprocess, store, tracking, policy, tags, log
    )


def finish_export(
    loaded: LoadedModel,
    artifacts: dict[str, bytes],
    measurements,
    parities: dict,
    spec,
    store: Store,
    tracking: Tracking,
    policy: ExportPolicy,
    tags: dict,
    log: Callable[[str], None],
    quality: str = "accuracy",
) -> ExportedModel:
    """What every task's export ends with: the per-target choice from the measurements, the
    artifacts stored and registered, and the record edge_release reads. `spec`: the model's
    Preprocess or DetectorSpec (its JSON travels with the artifacts)."""
    choices = [choose(measurements, target) for target in policy.targets]
    for choice in choices:
        log(
            f"target {choice.profile.name}: {choice.artifact or 'nothing qualifies'} "
            f"({json.dumps(choice.verdicts)})"
        )
    frame = table(measurements)
    files = store_artifacts(
        store, f"models/{tracking.model_name}/v{loaded.version}", artifacts, spec.to_json()
    )
    run_id, registered = register_artifacts(
        tracking, loaded, artifacts, frame, choices, parities, measurements, tags, quality
    )
    record = ExportRecord(
        task=spec.task,
        source_model_version=loaded.version,
        model_name=tracking.model_name,
        dataset_version=tags["dataset_version"],
        run_id=run_id,
        preprocess=json.loads(spec.to_json()),
        artifacts=files,
        choices={c.profile.name: c.artifact for c in choices},
        registered=registered,
        parity=parities,
        measurements=json.loads(frame.to_json(orient="records")),
    )
    return ExportedModel(record, frame, choices, parities, tracking.run_url(run_id))


def store_artifacts(
    store: Store, prefix: str, artifacts: dict[str, bytes], preprocess_json: str
) -> dict[str, dict]:
    files = {}
    for name, data in artifacts.items():
        key = f"{prefix}/{name.replace('onnx_', 'model.')}.onnx"
        store.write_bytes(key, data)
        files[name] = {
            "key": key,
            "uri": store.uri(key),
            "sha256": sha256(data),
            "size_bytes": len(data),
            **describe(data),
        }
    store.write_bytes(f"{prefix}/preprocess.json", preprocess_json.encode())
    return files


def register_artifacts(
    tracking: Tracking,
    loaded: LoadedModel,
    artifacts: dict[str, bytes],
    frame: pd.DataFrame,
    choices: list[Choice],
    parities: dict,
    measurements,
    tags: dict,
    quality: str = "accuracy",  # what Measurement.accuracy is: "map" for a detector
) -> tuple[str, dict]:
    """One MLflow run holding the measurements, choices and parity, and each artifact as a
    registered ONNX model (`<model>-onnx-fp32`, `-onnx-int8`) with alias `challenger`."""
    import onnx
    import onnxruntime

    requirements = [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"]
    registered = {}
    with tracking.start_run(f"export v{loaded.version} to ONNX", tags) as run:
        tracking.log_dict(json.loads(frame.to_json(orient="records")), "measurements.json")
        tracking.log_dict({c.profile.name: c.as_dict() for c in choices}, "choices.json")
        tracking.log_dict(parities, "parity.json")
        for m in measurements:
            tracking.log_metrics(
                {
                    f"{m.artifact}_{quality}": m.accuracy,
                    f"{m.artifact}_p50_ms_b1": m.latency_ms["p50_b1"],
                }
            )
        for name, data in artifacts.items():
            model_name = f"{tracking.model_name}-{name.replace('_', '-')}"
            registered[name] = {
                "model_name": model_name,
                "version": tracking.log_onnx(data, name, model_name, requirements),
            }
    return run.info.run_id, registered
