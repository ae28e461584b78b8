"""Train + evaluate + export materialized in-process on real digit images, against a real MLflow
server over HTTP and against the default local SQLite store; the gate blocks what comes after it."""

import urllib.request

import pytest
from dagster import asset, materialize
from mlflow import MlflowClient

from cvops_pipelines.core.base.tracking import Tracking
from cvops_pipelines.core.build.registry import load
from cvops_pipelines.core.build.training import TrainConfig
from cvops_pipelines.defs.build.assets import trained_model
from cvops_pipelines.defs.learn.assets import feedback
from cvops_pipelines.defs.measure.assets import model_evaluation
from cvops_pipelines.defs.resources import build_resources
from cvops_pipelines.defs.ship.assets import onnx_model
from cvops_pipelines.demo import digit_model
from cvops_pipelines_tests import corpus
from cvops_pipelines_tests.stages import CURATE, INGEST, SMALL, curated, gate, metadata, train


@asset(deps=[model_evaluation])
def downstream_of_gate() -> None:
    """Stands in for export: must not run when the gate fails."""


def test_training_is_tracked_on_a_real_mlflow_server(isolated_homes, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    instance = curated(isolated_homes)
    searched = {**SMALL, "search_trials": 2, "search_epochs": 1}
    result = train(instance, searched, extra=[onnx_model], export_config={"latency_repeats": 5})
    assert result.success, result
    model = metadata(result, "trained_model")
    evaluation = metadata(result, "model_evaluation")
    assert gate(result).passed and gate(result).metadata["first_model"].value is True
    assert evaluation["accuracy"] > 0.5  # chance is 0.1
    assert "data:image/png;base64," in evaluation["confusion_matrix"]

    client = MlflowClient(mlflow_server)
    run = client.get_run(model["mlflow_run_id"])
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert run.data.tags["dagster_asset_key"] == "trained_model"
    assert run.data.tags["dataset_version"] == model["dataset_version"]
    trials = client.search_runs(  # nested under the run, in its experiment (not "Default")
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert sorted(t.info.run_name for t in trials) == ["trial 0", "trial 1"]
    assert run.data.params["image_size"] == "32" and run.data.params["architecture"] == "resnet18"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == list(range(1, len(history) + 1)) and len(history) >= 1
    assert run.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"], abs=1e-4)
    # links from Dagster metadata to the run's page in this server's UI
    page = f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert model["mlflow_run"] == evaluation["mlflow_run"] == page
    assert model["mlflow_model"] == f"{mlflow_server}/#/models/cvops-classifier/versions/1"
    with urllib.request.urlopen(page.split("#")[0], timeout=30) as ui:
        assert ui.status == 200 and b"<html" in ui.read(2000).lower()
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == model["dataset_version"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in artifacts and "evaluation/gate.csv" in artifacts

    version = client.get_model_version_by_alias("cvops-classifier", "challenger")
    assert version.version == "1" and version.run_id == run.info.run_id
    assert version.tags["gate"] == "passed"
    loaded = load(Tracking(mlflow_server), alias="challenger")  # weights_only round trip over HTTP
    assert loaded.preprocess.classes == tuple(str(d) for d in range(10))

    export = metadata(result, "onnx_model")
    assert export["fp32_parity"]["ok"] and export["fp32_parity"]["top1_agreement"] == 1.0
    assert "| onnx_int8 |" in export["measurements"] and "edge -> onnx_" in export["chosen"]
    for name in ("cvops-classifier-onnx-fp32", "cvops-classifier-onnx-int8"):
        onnx_version = client.get_model_version_by_alias(name, "challenger")
        assert client.get_run(onnx_version.run_id).data.tags["source_model_version"] == "1"
    export_run = client.get_run(export["mlflow_run_id"])
    assert export_run.data.metrics["onnx_fp32_accuracy"] == pytest.approx(
        evaluation["accuracy"], abs=1e-4
    )


def test_an_unreachable_server_is_a_clear_error(isolated_homes, monkeypatch):
    from cvops_pipelines_tests.helpers import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    instance = curated(isolated_homes)
    result = train(instance)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.cause.message
    assert "is unreachable" in message and "MLFLOW_TRACKING_URI" in message


def test_gate_blocks_a_worse_challenger_and_passes_an_equal_one(isolated_homes):
    instance = curated(isolated_homes)
    first = train(instance)
    assert first.success
    tracking = build_resources()["tracking"].open()
    tracking.set_alias("champion", metadata(first, "trained_model")["model_version"])

    worse = train(
        instance, {**SMALL, "epochs": 1, "learning_rate": 1e-6}, [downstream_of_gate, onnx_model]
    )
    check = gate(worse)
    assert not check.passed and "macro_f1" in check.metadata["decision"].value
    assert "| macro_f1 |" in check.metadata["side_by_side"].value
    assert not worse.asset_materializations_for_node("downstream_of_gate")
    assert not worse.asset_materializations_for_node("onnx_model")  # nothing ships

    equal = train(instance, SMALL, [downstream_of_gate])  # same seed, same data: same model
    assert gate(equal).passed
    assert metadata(equal, "model_evaluation")["champion"] == "v1"
    assert equal.asset_materializations_for_node("downstream_of_gate")


def test_a_retrain_fine_tunes_the_champion_until_the_ontology_changes(isolated_homes):
    """init_from auto (the default): no champion -> scratch; a champion over the same classes
    -> a short fine-tune from its tensors; a champion over other classes -> scratch again."""
    from mlflow import MlflowClient

    from cvops_pipelines import settings
    from cvops_pipelines.core.build.models import pick_precision

    auto = {**SMALL, "init_from": "auto", "epochs": 5, "finetune_epochs": 2}
    instance = curated(isolated_homes)
    first = train(instance, auto)
    assert first.success
    tracking = build_resources()["tracking"].open()
    client = MlflowClient(settings.mlflow_tracking_uri())

    def params(result) -> dict:
        return client.get_run(metadata(result, "trained_model")["mlflow_run_id"]).data.params

    assert params(first)["started_from"] == "none" and params(first)["epochs"] == "5"
    assert params(first)["precision"] == "fp32"  # the default; bf16 is opt-in
    tracking.set_alias("champion", metadata(first, "trained_model")["model_version"])
    second = train(instance, {**auto, "precision": "auto"})
    assert second.success
    tuned = params(second)
    assert tuned["precision"] == pick_precision("auto", "cpu")  # what it used, not "auto"
    assert tuned["started_from"] == "champion" and tuned["epochs"] == "2"
    assert tuned["images_per_epoch"] == "1024"  # a draw per epoch, where the pool outgrows it
    assert float(tuned["learning_rate"]) == pytest.approx(SMALL["learning_rate"] * 0.5)
    assert metadata(second, "trained_model")["best_epoch"] <= 2
    # the champion is renamed into other classes: the ontology changed, so from scratch
    champion = load(tracking, alias="champion")
    assert champion.preprocess.classes == tuple(str(d) for d in range(10))
    from cvops_pipelines.core.build import run as build_run

    logged = []
    start = build_run.auto_start(tracking, "resnet18", [*map(str, range(9)), "ten"], logged.append)
    assert start.source == "none" and start.state is None and "ontology" in logged[-1]
    start = build_run.auto_start(tracking, "resnet18", list(champion.preprocess.classes), print)
    assert start.fine_tune and start.state.keys() == champion.model.state_dict().keys()
    # the same recipe: the usual few epochs; another augmentation preset: the longer fine-tune
    classes, trained_with = list(champion.preprocess.classes), params(first)["augmentation"]
    same = build_run.auto_start(
        tracking, "resnet18", classes, logged.append, {"augmentation": trained_with}
    )
    plan = build_run.RunPlan("cpu")
    assert same.fine_tune and not same.new_recipe
    assert same.config(TrainConfig(epochs=10), plan).epochs == plan.finetune_epochs
    other = "strong" if trained_with != "strong" else "light"
    new = build_run.auto_start(
        tracking, "resnet18", classes, logged.append, {"augmentation": other}
    )
    assert new.fine_tune and new.new_recipe
    assert f"augmentation {trained_with} -> {other}" in logged[-1]
    assert new.config(TrainConfig(epochs=10), plan).epochs == plan.finetune_epochs_new_recipe
    # asked for the encoder while none is registered: from scratch, and logged as such
    plan = build_run.RunPlan("cpu", init_from="ssl_encoder")
    start = build_run.initial_state(tracking, plan, TrainConfig(), ["0", "1"], logged.append)
    assert start.source == "none" and start.state is None and "no ssl_encoder" in logged[-1]


def field_shots(indices, degrees: float = 35.0) -> list[bytes]:
    """Digits as a tilted field camera shot them (the test split has none of these)."""
    return [
        corpus.encode(digit_model.digit(i).convert("RGB").rotate(degrees, fillcolor="white"), "PNG")
        for i in indices
    ]


def test_replay_refuses_a_challenger_the_test_split_would_pass(isolated_homes):
    """The champion and a challenger both pass the test-split rules; on the production holdout,
    replayed paired, the challenger is clearly worse: refused, nothing downstream runs."""
    import hashlib

    import pandas as pd

    from cvops_pipelines.core.base.images import load_images
    from cvops_pipelines.core.base.store import LocalStore
    from cvops_pipelines.core.base.tables import table_key, write_table
    from cvops_pipelines.core.build.training import predict_probs

    instance = curated(isolated_homes)
    first = train(instance)
    tracking = build_resources()["tracking"].open()
    tracking.set_alias("champion", metadata(first, "trained_model")["model_version"])
    challenger = materialize(
        [*INGEST, feedback, *CURATE, trained_model],
        instance=instance,
        selection=[trained_model],
        resources=build_resources(),
        run_config={"ops": {"trained_model": {"config": {**SMALL, "seed": 11}}}},
    )
    assert challenger.success
    # production records: tilted digits, labelled (as an expert would) with what the champion
    # sees in them, so wherever the challenger disagrees it is wrong
    store = LocalStore(isolated_homes)
    shots = field_shots(range(600, 760))
    keys = []
    for shot in shots:
        digest = hashlib.sha256(shot).hexdigest()
        keys.append(f"images/{digest[:2]}/{digest}.png")
        store.write_bytes(keys[-1], shot)
    champion, new = load(tracking, alias="champion"), load(tracking, version="2")
    images = load_images(store, keys, champion.preprocess.image_size)
    seen = predict_probs(champion.model, images, champion.preprocess).argmax(1)
    other = predict_probs(new.model, images, new.preprocess).argmax(1)
    assert (seen != other).sum() >= 10  # enough disagreement to be clearly worse
    records = pd.DataFrame(
        {
            "record_id": [f"dev-1-{i:04d}" for i in range(len(keys))],
            "device_id": "dev-1",
            "cohort": "site-a",
            "release": "rel-1-x",
            "image_id": [k.split("/")[-1][:-4] for k in keys],
            "key": keys,
            "label": [champion.preprocess.classes[i] for i in seen],
            "label_source": "expert",
            "labeled_by": "ann@lab",
            "predicted": "0",
            "captured_at": "2026-12-01T10:00:00+00:00",
            "holdout": True,
            "replay_set": "rs-test",
        }
    )
    write_table(store, table_key("replay_set", None), records)

    loose = {"max_macro_f1_drop": 1.0, "max_class_recall_drop": 1.0}
    result = materialize(
        [
            *INGEST,
            feedback,
            *CURATE,
            trained_model,
            model_evaluation,
            onnx_model,
            downstream_of_gate,
        ],
        instance=instance,
        selection=[model_evaluation, onnx_model, downstream_of_gate],
        resources=build_resources(),
        raise_on_error=False,
        run_config={"ops": {"model_evaluation": {"config": loose}}},
    )
    check = gate(result)
    assert not check.passed
    decision = check.metadata["decision"].value
    assert decision.startswith("replay automatic accuracy (top-1): worse")
    assert "macro_f1" not in decision and "recall[" not in decision  # the test split passed it
    evaluation = metadata(result, "model_evaluation")
    assert evaluation["replay_records"] == len(keys) and evaluation["replay_verdict"] == "worse"
    (automatic, _) = evaluation["replay_outcomes"]
    assert automatic["old"] == 1.0 and automatic["only_old_right"] == (seen != other).sum()
    assert not result.asset_materializations_for_node("downstream_of_gate")
    assert not result.asset_materializations_for_node("onnx_model")  # nothing ships
    run_id = metadata(challenger, "trained_model")["mlflow_run_id"]
    artifacts = {a.path for a in tracking.client().list_artifacts(run_id, "evaluation")}
    assert "evaluation/replay.csv" in artifacts and "evaluation/replay_per_class.csv" in artifacts
    assert tracking.client().get_run(run_id).data.metrics["replay_records"] == len(keys)


def test_export_whose_parity_fails_stops_with_the_numbers(isolated_homes):
    instance = curated(isolated_homes)
    result = train(
        instance,
        {**SMALL, "epochs": 1},
        [onnx_model],
        {"parity_tolerance": 0.0, "latency_repeats": 5},
    )
    assert not result.asset_materializations_for_node("onnx_model")
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "onnx_model"
    description = failure.event_specific_data.error.message
    assert "does not behave like the trained model" in description
    assert "max |logit diff|" in description and "tolerance 0.0" in description
