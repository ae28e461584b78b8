"""What the code location declares, checked through Dagster's own CLI and webserver."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from cvops_pipelines_tests.helpers import free_port, wait_for_port

VENV_BIN = Path(sys.executable).parent


def test_definitions_validate(repo_root, isolated_homes):
    proc = subprocess.run(
        [str(VENV_BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "All code locations passed validation" in proc.stderr + proc.stdout


STAGES = {
    "raw_images": "ingest",
    "annotations": "ingest",
    "labeled_pool": "curate",
    "replay_set": "curate",
    "label_issues": "curate",
    "dataset_version": "curate",
    "trained_model": "build",
    "ssl_encoder": "build",
    "model_evaluation": "measure",
    "onnx_model": "ship",
    "edge_release": "ship",
    "canary_decision": "ship",
    "feedback": "learn",
    "production_metrics": "learn",
    "annotation_queue": "learn",
    "ontology_report": "learn",
}
CHECKS = {
    "raw_images_contract": True,
    "annotations_contract": True,
    "labels_imported": True,  # annotation files held records and none could be imported
    "dataset_version_contract": True,
    "dataset_version_balance": True,
    "dataset_version_leakage": True,
    "dataset_version_boxes": True,
    "challenger_not_worse_than_champion": True,
    "replay_set_contract": True,
    "feedback_contract": True,
    "no_quarantined_batches": False,
    # field alerts do not block: a failing SLA is exactly when the queue is needed
    "accuracy_sla": False,
    "no_output_drift": False,
}


def test_definitions_declare_every_stage_with_blocking_contracts():
    from dagster import AssetKey

    from cvops_pipelines.definitions import defs

    graph = defs.resolve_asset_graph()
    groups = {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}
    assert groups == STAGES
    checks = {key.name: graph.get_check_spec(key).blocking for key in graph.asset_check_keys}
    assert checks == CHECKS
    assert defs.resolve_sensor_def("new_drop_sensor").job_name == "ingest_job"
    # typed hand-offs from training to the fleet: each asset's output type is its record, and
    # the next asset's input asks for the same type
    from cvops_pipelines.core.base import handoffs

    for record in (
        handoffs.TrainedModelRecord,
        handoffs.EvaluationRecord,
        handoffs.ExportRecord,
        handoffs.ReleaseRecord,
    ):
        produced = defs.resolve_assets_def(record.asset).op.output_defs[0]
        assert produced.dagster_type.typing_type is record
    onnx_ins = defs.resolve_assets_def("onnx_model").op.ins
    assert onnx_ins["model_evaluation"].dagster_type.typing_type is handoffs.EvaluationRecord
    # lineage: each stage takes the previous one as an input, never "the newest file"
    assert graph.get(AssetKey("dataset_version")).parent_keys == {
        AssetKey("labeled_pool"),
        AssetKey("label_issues"),
        AssetKey("replay_set"),
    }
    assert graph.get(AssetKey("replay_set")).parent_keys == {
        AssetKey("feedback"),
        AssetKey("labeled_pool"),
    }
    assert graph.get(AssetKey("labeled_pool")).parent_keys == {
        AssetKey("raw_images"),
        AssetKey("annotations"),
        AssetKey("feedback"),
    }  # the loop closes
    assert graph.get(AssetKey("model_evaluation")).parent_keys == {
        AssetKey("trained_model"),
        AssetKey("dataset_version"),
        AssetKey("replay_set"),
    }
    assert graph.get(AssetKey("onnx_model")).parent_keys == {
        AssetKey("trained_model"),
        AssetKey("model_evaluation"),
        AssetKey("dataset_version"),
    }
    assert graph.get(AssetKey("edge_release")).parent_keys == {AssetKey("onnx_model")}
    assert graph.get(AssetKey("canary_decision")).parent_keys == {
        AssetKey("edge_release"),
        AssetKey("feedback"),
    }
    for learned in ("production_metrics", "annotation_queue", "ontology_report"):
        assert AssetKey("feedback") in graph.get(AssetKey(learned)).parent_keys
    assert defs.resolve_schedule_def("canary_schedule").job_name == "canary_job"
    assert defs.resolve_schedule_def("learn_schedule").job_name == "learn_job"
    assert defs.resolve_sensor_def("feedback_sensor").job_name == "feedback_job"
    assert defs.resolve_sensor_def("retraining_sensor").job_name == "train_job"
    assert defs.resolve_sensor_def("ssl_encoder_sensor").job_name == "ssl_job"
    assert graph.get(AssetKey("ssl_encoder")).parent_keys == {
        AssetKey("raw_images"),
        AssetKey("feedback"),
    }


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["data"]


def test_webserver_serves_the_assets_and_blocking_checks(repo_root, isolated_homes):
    """The real Dagster webserver (what `./dev ui` starts) loading workspace.yaml."""
    port = free_port()
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "dagster-webserver"),
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=repo_root,
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=120)
        data = graphql(
            port,
            "{ assetNodes { assetKey { path } groupName assetChecksOrError "
            "{ ... on AssetChecks { checks { name blocking } } } } }",
        )
        # two loops side by side (workspace.yaml: the default one and the detection demo's),
        # the same graph under their own keys
        for loop in ((), ("detection",)):
            nodes = {
                n["assetKey"]["path"][-1]: n
                for n in data["assetNodes"]
                if tuple(n["assetKey"]["path"][:-1]) == loop
            }
            assert {k: n["groupName"] for k, n in nodes.items()} == STAGES, loop
            served = {
                c["name"]: c["blocking"]
                for n in nodes.values()
                for c in n["assetChecksOrError"]["checks"]
            }
            assert served == CHECKS, loop
        assert len(data["assetNodes"]) == 2 * len(STAGES)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_canary_schedule_runs_only_while_a_release_is_on_canary(isolated_homes):
    from dagster import RunRequest, SkipReason, build_schedule_context

    from cvops_pipelines.core.base.store import LocalStore
    from cvops_pipelines.core.ship.release import ReleaseStore
    from cvops_pipelines.defs.resources import build_resources
    from cvops_pipelines.defs.ship.jobs import canary_schedule
    from cvops_pipelines.demo.digit_model import trained_model
    from cvops_pipelines_tests.edge.fleet_kit import central

    resources = {"storage": build_resources()["storage"]}
    with build_schedule_context(resources=resources) as context:
        assert isinstance(canary_schedule(context), SkipReason)
    c = central(isolated_homes.parent / "kit")
    release = c.release(trained_model(n=200), "1")
    mine = ReleaseStore(LocalStore(isolated_homes))  # the schedule only reads the pointer
    for path in (c.root / "releases").rglob("*"):
        if path.is_file():
            mine.store.write_bytes(str(path.relative_to(c.root)), path.read_bytes())
    mine.point("canary", release.id, "test", "test", share=0.5)
    with build_schedule_context(resources=resources) as context:
        assert isinstance(canary_schedule(context), RunRequest)


def _settled_loop():
    """An instance where every curate..release asset is materialized and automation has seen it:
    (evaluate(instance, cursor) -> result, instance, cursor)."""
    import dagster as dg
    from dagster import AssetMaterialization, DagsterInstance

    from cvops_pipelines.definitions import defs

    instance = DagsterInstance.ephemeral()
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    for key in (
        "labeled_pool",
        "replay_set",
        "label_issues",
        "dataset_version",
        "trained_model",
        "model_evaluation",
        "onnx_model",
        "edge_release",
    ):
        instance.report_runless_asset_event(AssetMaterialization(key))
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)

    def evaluate(cursor):
        return dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)

    return evaluate, instance, result.cursor


def test_a_new_dataset_version_alone_does_not_evaluate_or_export_again():
    """Only retraining_sensor starts training; evaluation and export follow a new model, not a
    new dataset version (which would re-export the same model on every feedback batch)."""
    from dagster import AssetKey, AssetMaterialization

    evaluate, instance, cursor = _settled_loop()
    instance.report_runless_asset_event(AssetMaterialization("dataset_version"))
    result = evaluate(cursor)
    assert result.total_requested == 0
    instance.report_runless_asset_event(AssetMaterialization("trained_model"))
    result = evaluate(result.cursor)
    requested = {
        k: result.get_num_requested(AssetKey(k))
        for k in ("trained_model", "model_evaluation", "onnx_model")
    }
    assert requested == {"trained_model": 0, "model_evaluation": 1, "onnx_model": 1}


def test_a_challenger_the_gate_refused_is_not_exported():
    from dagster import AssetCheckEvaluation, AssetKey, AssetMaterialization

    from cvops_pipelines.defs.measure.assets import GATE_CHECK

    evaluate, instance, cursor = _settled_loop()
    for passed in (False, True):
        instance.report_runless_asset_event(AssetMaterialization("model_evaluation"))
        instance.report_runless_asset_event(
            AssetCheckEvaluation(
                asset_key=AssetKey("model_evaluation"), check_name=GATE_CHECK, passed=passed
            )
        )
        result = evaluate(cursor)
        cursor = result.cursor
        assert result.get_num_requested(AssetKey("onnx_model")) == int(passed)


def test_without_a_labelstudio_the_answers_sensor_says_queues_stay_files():
    from dagster import build_sensor_context

    from cvops_pipelines.defs.learn.sensors import labelstudio_answers
    from cvops_pipelines.defs.resources import build_resources

    resources = build_resources()
    used = {k: resources[k] for k in ("storage", "drop_source", "annotation", "loop")}
    with build_sensor_context(resources=used) as context:
        assert "no Label Studio configured" in labelstudio_answers(context).skip_message


def test_the_labelstudio_token_comes_from_the_environment_and_is_never_shown(monkeypatch):
    from dagster import build_sensor_context

    from cvops_pipelines.defs.resources import build_resources

    monkeypatch.setenv("CVOPS_LABELSTUDIO_URL", "http://labelstudio.internal:8080")
    monkeypatch.setenv("CVOPS_LABELSTUDIO_TOKEN", "s3cret-token")
    backend = build_resources()["annotation"]
    assert "s3cret-token" not in repr(backend)  # the definition holds the variable's name
    with build_sensor_context(resources={"annotation": backend}) as context:
        ls = context.resources.annotation.labelstudio()
    assert ls.token == "s3cret-token" and "s3cret-token" not in repr(ls)
