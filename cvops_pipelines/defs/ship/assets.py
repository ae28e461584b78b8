"""Ship stage: ONNX artifacts proven against the trained model, and a measured choice per target."""

import json

import numpy as np
import pandas as pd
from dagster import (AssetExecutionContext, AssetSelection, AutomationCondition, Config,
                     DataVersion, Failure, MetadataValue, Output, asset)
from pydantic import Field

from cvops_pipelines.core.artifact_choice import (REFERENCE, TargetProfile, choose,
                                                  measure_artifacts, table)
from cvops_pipelines.core.export import (describe, export_onnx, ort_logits, parity, quantize_int8,
                                         session, sha256, torch_logits)
from cvops_pipelines.core.tables import markdown_table
from cvops_pipelines.core.training import load_images
from cvops_pipelines.defs.resources import CvopsStorage, MlflowTracking


class TargetConfig(Config):
    name: str
    max_p95_ms_batch1: float = Field(50.0, description="Latency budget, batch 1, p95.")
    max_accuracy_drop_points: float = Field(1.0, description="vs torch eager fp32 on the test split.")
    max_size_mb: float = 100.0
    prefer: str = Field("latency", description="Among qualifying artifacts: latency or size.")


class OnnxModelConfig(Config):
    parity_tolerance: float = Field(1e-3, description="fp32 ONNX vs torch: max |logit diff|.")
    calibration_images: int = Field(256, description="Real training images for int8 calibration.")
    latency_repeats: int = Field(50, description="Timed calls per artifact and batch size.")
    targets: list[TargetConfig] = Field(
        default_factory=lambda: [TargetConfig(name="edge"),
                                 TargetConfig(name="edge-small", max_size_mb=16.0, prefer="size")],
        description="Target profiles; each gets the artifact its budgets allow.")


def _labels(frame: pd.DataFrame, classes) -> np.ndarray:
    return frame["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()


@asset(group_name="ship", io_manager_key="tables", kinds={"onnx", "mlflow"},
       # after a new model only (a new dataset version alone waits for retraining_sensor), and
       # only once the gate passed: a refused challenger is not exported
       automation_condition=AutomationCondition.eager().ignore(
           AssetSelection.assets("dataset_version"))
       & ~AutomationCondition.any_deps_match(AutomationCondition.any_checks_match(
           AutomationCondition.check_failed(), blocking_only=True)),
       description="The gated challenger exported to ONNX fp32 and calibrated int8, each proven on "
                   "real test images, measured on this machine, and chosen per target profile.")
def onnx_model(context: AssetExecutionContext, config: OnnxModelConfig, trained_model: dict,
               model_evaluation: dict, dataset_version: pd.DataFrame, storage: CvopsStorage,
               mlflow: MlflowTracking):
    import mlflow as mlflow_api
    import onnx
    import onnxruntime

    if not model_evaluation["gate_passed"]:
        raise Failure(f"model v{model_evaluation['challenger_version']} did not pass the gate")
    tracking, store = mlflow.tracking(), storage.store()
    loaded = tracking.load(version=trained_model["model_version"])
    preprocess, model = loaded.preprocess, loaded.model
    test = dataset_version[dataset_version["split"] == "test"]
    train = dataset_version[dataset_version["split"] == "train"]
    calibration_rows = train.sample(min(config.calibration_images, len(train)), random_state=0)
    test_images = load_images(store, list(test["key"]), preprocess.image_size)
    calibration = load_images(store, list(calibration_rows["key"]), preprocess.image_size)
    labels = _labels(test, preprocess.classes)

    context.log.info(f"exporting v{loaded.version} ({preprocess.architecture}) to ONNX")
    fp32 = export_onnx(model, preprocess)
    reference = torch_logits(model, test_images, preprocess)
    fp32_parity = parity(reference, ort_logits(session(fp32), test_images, preprocess),
                         config.parity_tolerance)
    if not fp32_parity.ok:
        raise Failure(f"ONNX fp32 does not behave like the trained model on {len(test_images)} "
                      f"test images: max |logit diff| {fp32_parity.max_abs_logit_diff:.3g} "
                      f"(tolerance {config.parity_tolerance}), top-1 agreement "
                      f"{fp32_parity.top1_agreement:.4f}", metadata=fp32_parity.as_dict())
    context.log.info(f"fp32 parity ok ({fp32_parity.max_abs_logit_diff:.2g} max |logit diff|); "
                     f"calibrating int8 on {len(calibration)} training images")
    int8 = quantize_int8(fp32, calibration, preprocess)
    artifacts = {"onnx_fp32": fp32, "onnx_int8": int8}
    measurements, logits = measure_artifacts(model, artifacts, test_images, labels, preprocess,
                                             config.latency_repeats, reference)
    parities = {name: parity(logits[REFERENCE], logits[name], config.parity_tolerance)
                .as_dict(verdict=name == "onnx_fp32") for name in artifacts}
    choices = [choose(measurements, TargetProfile(**t.model_dump())) for t in config.targets]
    frame = table(measurements)
    for choice in choices:
        context.log.info(f"target {choice.profile.name}: {choice.artifact or 'nothing qualifies'} "
                         f"({json.dumps(choice.verdicts)})")

    prefix = f"models/{tracking.model_name}/v{loaded.version}"
    files = {}
    for name, data in artifacts.items():
        key = f"{prefix}/{name.replace('onnx_', 'model.')}.onnx"
        store.write_bytes(key, data)
        files[name] = {"key": key, "uri": store.uri(key), "sha256": sha256(data),
                       "size_bytes": len(data), **describe(data)}
    store.write_bytes(f"{prefix}/preprocess.json", preprocess.to_json().encode())

    tags = {"dagster_run_id": context.run.run_id, "dagster_asset_key": "onnx_model",
            "dataset_version": trained_model["dataset_version"],
            "source_model_version": loaded.version}
    registered = {}  # explicit requirements: MLflow's inference spawns a slow subprocess
    requirements = [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"]
    with tracking.start_run(f"export v{loaded.version} to ONNX", tags) as run:
        mlflow_api.log_dict(json.loads(frame.to_json(orient="records")), "measurements.json")
        mlflow_api.log_dict({c.profile.name: c.as_dict() for c in choices}, "choices.json")
        mlflow_api.log_dict(parities, "parity.json")
        for m in measurements:
            mlflow_api.log_metrics({f"{m.artifact}_accuracy": m.accuracy,
                                    f"{m.artifact}_p50_ms_b1": m.latency_ms["p50_b1"]})
        for name, data in artifacts.items():
            info = mlflow_api.onnx.log_model(onnx.load_from_string(data), name=name,
                                             registered_model_name=f"{tracking.model_name}-{name.replace('_', '-')}",
                                             save_as_external_data=False,
                                             pip_requirements=requirements)
            registered[name] = {"model_name": f"{tracking.model_name}-{name.replace('_', '-')}",
                                "version": str(info.registered_model_version)}
    for name, reg in registered.items():
        tracking.client().set_registered_model_alias(reg["model_name"], "challenger", reg["version"])

    record = {"source_model_version": loaded.version, "model_name": tracking.model_name,
              "dataset_version": trained_model["dataset_version"], "run_id": run.info.run_id,
              "preprocess": json.loads(preprocess.to_json()), "artifacts": files,
              "registered": registered, "parity": parities,
              "measurements": json.loads(frame.to_json(orient="records")),
              "choices": {c.profile.name: c.artifact for c in choices}}
    return Output(record, data_version=DataVersion(f"{loaded.version}:{files['onnx_fp32']['sha256'][:16]}"),
                  metadata={
        "source_model": f"{tracking.model_name} v{loaded.version}",
        "fp32_parity": MetadataValue.json(parities["onnx_fp32"]),
        "int8_parity": MetadataValue.json(parities["onnx_int8"]),
        "measurements": MetadataValue.md(markdown_table(frame, 10)),
        "choices": MetadataValue.md(markdown_table(pd.DataFrame(
            [{"target": c.profile.name, "chosen": c.artifact or "none qualifies",
              **{a: v for a, v in c.verdicts.items()}} for c in choices]), 20)),
        "chosen": ", ".join(f"{c.profile.name} -> {c.artifact or 'none'}" for c in choices),
        "mlflow_run_id": run.info.run_id,
        "mlflow_run": MetadataValue.url(tracking.run_url(run.info.run_id)),
        "artifacts": MetadataValue.json({n: f["uri"] for n, f in files.items()}),
    })

