"""Detection through the stages, in-process with the real resources: a drop of real scenes (PNG +
COCO, some images empty, some boxes bad) through ingest, curate, build, measure and export."""

import json

import pytest
from dagster import DagsterInstance, materialize

from cvops_pipelines.core.base.tables import read_table
from cvops_pipelines.core.ship import detection_onnx_model
from cvops_pipelines.defs.build.assets import trained_model
from cvops_pipelines.defs.learn.assets import feedback
from cvops_pipelines.defs.measure.assets import model_evaluation
from cvops_pipelines.defs.resources import build_resources
from cvops_pipelines.defs.ship.assets import onnx_model
from cvops_pipelines.demo import scenes
from cvops_pipelines.edge.detect import Detection
from cvops_pipelines.settings import REPO_ROOT
from cvops_pipelines_tests import stages

SCENES = 120
DETECTOR = {"detector": {"epochs": 1, "batch_size": 8}}
EXPORT = {"calibration_images": 16, "latency_repeats": 3}


@pytest.fixture
def detection_home(isolated_homes, monkeypatch):
    monkeypatch.setenv("CVOPS_ONTOLOGY", str(REPO_ROOT / "data_contracts" / "scenes.yaml"))
    drop = isolated_homes / "drops" / "s1"
    items = scenes.scenes(SCENES, seed=3)
    names = scenes.write_drop(drop, items)
    bad = scenes.coco(names[:2], items[:2], annotator="careless")
    bad["annotations"][0]["bbox"] = [150.0, 150.0, 40.0, 40.0]  # runs off the 160 px image
    bad["annotations"][1]["category_id"] = 42  # no such category
    (drop / "second_pass.json").write_text(json.dumps(bad))
    return isolated_homes, items


def test_detection_drop_to_gated_exported_detector(detection_home, monkeypatch):
    home, items = detection_home
    instance = DagsterInstance.ephemeral()
    stages.ingest(instance, "s1")
    quarantine = read_table(
        build_resources()["storage"].store(), "quarantine/s1/annotations.parquet"
    )
    assert sorted(quarantine["reason_code"]) == ["invalid_box", "unknown_class"]

    curated = stages.curate(
        instance, run_config={"ops": {"dataset_version": {"config": {"min_per_class": 0}}}}
    )
    assert curated.success
    pool = stages.metadata(curated, "labeled_pool")
    empty = sum(1 for s in items if not s.labels)
    assert pool["images"] == SCENES and pool["images_without_objects"] == empty  # negatives kept
    version = stages.metadata(curated, "dataset_version")
    assert version["images_without_objects"] + version["excluded"] >= empty
    checks = {e.check_name: e.passed for e in curated.get_asset_check_evaluations()}
    assert checks["dataset_version_boxes"] and checks["dataset_version_contract"]
    issues = stages.metadata(curated, "label_issues")
    assert issues["reviewer"].startswith("none yet")  # no champion detector to review with

    built = stages.train(instance, DETECTOR, extra=[onnx_model], export_config=EXPORT)
    assert built.success
    model = stages.metadata(built, "trained_model")
    assert model["model"].startswith("cvops-detector v1")
    evaluation = stages.metadata(built, "model_evaluation")
    for key in ("map", "map_50", "per_class", "precision_recall", "examples"):
        assert key in evaluation
    assert "data:image/png;base64," in evaluation["precision_recall"]
    gate = stages.gate(built)
    assert gate.passed and gate.metadata["first_model"].value  # the first detector

    export = stages.metadata(built, "onnx_model")
    parity = export["fp32_parity"]
    assert parity["ok"] and parity["unmatched"] == 0 and parity["min_iou"] >= 0.99
    record = json.loads((home / "artifacts" / "onnx_model" / "all.json").read_text())
    by_name = {m["artifact"]: m for m in record["measurements"]}
    for chosen in record["choices"].values():
        if chosen:  # every choice agrees with the numbers it printed
            assert by_name[chosen]["deployable"]
            assert by_name[chosen]["accuracy_drop_points"] <= 1.0 + 1e-9

    # a device path that moves every box: the export stops, with its numbers
    real = detection_onnx_model.edge_detections

    def shifted(sess, images, spec, batch_size=16):
        return [
            [Detection(d.label, d.score, tuple(v + 6 for v in d.box)) for d in image]
            for image in real(sess, images, spec, batch_size)
        ]

    monkeypatch.setattr("cvops_pipelines.core.ship.detection_export.edge_detections", shifted)
    failed = materialize(
        [*stages.INGEST, feedback, *stages.CURATE, trained_model, model_evaluation, onnx_model],
        selection=[onnx_model],
        instance=instance,
        resources=build_resources(),
        raise_on_error=False,
        run_config={"ops": {"onnx_model": {"config": EXPORT}}},
    )
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert "does not find the boxes" in message and "boxes unmatched" in message


def _logs(instance, run_id: str) -> str:
    return "\n".join(e.user_message for e in instance.all_logs(run_id))


def test_every_training_setting_applies_to_a_detector(detection_home):
    """init_from (the ssl_encoder's backbone, a registered detector), search_trials and
    distributed train a detector through the same asset, run, registry entry and gate."""
    from cvops_pipelines import settings
    from cvops_pipelines.core.base.tracking import Tracking
    from cvops_pipelines.defs.build.assets import ssl_encoder

    instance = DagsterInstance.ephemeral()
    stages.ingest(instance, "s1")
    curate = {"ops": {"dataset_version": {"config": {"min_per_class": 0}}}}
    assert stages.curate(instance, run_config=curate).success
    encoder = materialize(
        [*stages.INGEST, feedback, ssl_encoder],
        selection=[ssl_encoder],
        instance=instance,
        resources=build_resources(),
        run_config={
            "ops": {
                "ssl_encoder": {
                    "config": {
                        "architecture": "mobilenet_v3_large",
                        "image_size": 32,
                        "epochs": 1,
                        "batch_size": 64,
                    }
                }
            }
        },
    )
    assert encoder.success

    searched = stages.train(
        instance,
        {**DETECTOR, "init_from": "ssl_encoder", "search_trials": 2, "search_epochs": 1},
    )
    assert searched.success
    logs = _logs(instance, searched.run_id)
    assert "starting from ssl_encoder v1" in logs and "the backbone starts with" in logs
    assert "search trial 0:" in logs and "search trial 1:" in logs
    model = stages.metadata(searched, "trained_model")
    assert "search_trials" in model and model["val_map"] >= 0
    client = Tracking(settings.mlflow_tracking_uri()).client()
    run = client.get_run(model["mlflow_run_id"])
    assert run.data.params["init_from"] == "ssl_encoder"
    trials = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert len(trials) == 2 and all("val_map" in t.data.metrics for t in trials)
    best = max(trials, key=lambda t: t.data.metrics["val_map"])
    searched_lr = float(run.data.params["searched_learning_rate"])
    assert searched_lr == float(best.data.params["learning_rate"])
    assert model["config"]["learning_rate"] == searched_lr  # the full run trained with it

    two = stages.train(
        instance, {**DETECTOR, "init_from": "challenger", "distributed": {"processes": 2}}
    )
    assert two.success
    logs = _logs(instance, two.run_id)
    assert f"starting from challenger v{model['model_version']}" in logs
    assert "launching 2 process(es) x 1 node(s) with torchrun" in logs
    assert "rank 0 of 2: epoch 1: train_loss" in logs  # the children's epochs, through Pipes
    double = stages.metadata(two, "trained_model")
    assert int(double["model_version"]) == int(model["model_version"]) + 1
    assert set(stages.metadata(two, "model_evaluation")) == set(
        stages.metadata(searched, "model_evaluation")
    )
    run = client.get_run(double["mlflow_run_id"])
    assert run.data.params["distributed_processes"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
