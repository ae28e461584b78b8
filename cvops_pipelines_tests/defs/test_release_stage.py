"""edge_release materialized with the real resources: signed, published, put on canary; a re-run
publishes nothing new; a missing key and a target nothing qualifies for fail clearly."""

import json

from dagster import DagsterInstance, SourceAsset, materialize

from cvops_pipelines import settings
from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.ship.release import ReleaseStore, generate_keypair
from cvops_pipelines.defs.resources import build_resources
from cvops_pipelines.defs.ship.assets import edge_release
from cvops_pipelines.demo.digit_model import PREPROCESS, trained_model
from cvops_pipelines.edge.bundle import sha256


def exported(home, choice="onnx_fp32"):
    """What onnx_model hands on: its record (JSON, via the IO manager) and the ONNX file."""
    model = trained_model(n=200)
    store = LocalStore(home)
    store.write_bytes("models/digits/v1/model.fp32.onnx", model)
    record = {
        "task": "classification",
        "model_name": "digits",
        "run_id": "r1",
        "source_model_version": "1",
        "dataset_version": "ds-x",
        "preprocess": PREPROCESS,
        "choices": {"edge": choice},
        "artifacts": {
            "onnx_fp32": {
                "key": "models/digits/v1/model.fp32.onnx",
                "uri": store.uri("models/digits/v1/model.fp32.onnx"),
                "sha256": sha256(model),
            }
        },
    }
    store.write_bytes("artifacts/onnx_model/all.json", json.dumps(record).encode())
    return model


def release(instance):
    upstream = SourceAsset("onnx_model", io_manager_key="tables")  # read through the IO manager
    return materialize(
        [upstream, edge_release],
        instance=instance,
        resources=build_resources(),
        raise_on_error=False,
    )


def failure_message(result) -> str:
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return event.event_specific_data.error.message


def test_release_is_signed_published_and_idempotent(isolated_homes):
    instance = DagsterInstance.ephemeral()
    exported(isolated_homes)
    missing_key = release(instance)
    assert not missing_key.success and "cvops keygen" in failure_message(missing_key)

    generate_keypair(settings.signing_key_path().parent)
    first = release(instance)
    assert first.success
    (mat,) = first.asset_materializations_for_node("edge_release")
    release_id = mat.metadata["release"].value
    releases = ReleaseStore(LocalStore(isolated_homes))
    assert releases.channel("canary")["release"] == release_id
    assert releases.channel("canary")["share"] == 1.0  # the first release: every device
    assert set(releases.manifest(release_id)["files"]) == {
        "model.onnx",
        "preprocess.json",
        "classes.json",
    }
    from cvops_pipelines.edge.keep import KeepPolicy

    shipped = releases.spec(release_id)  # the devices' buffer policy travels in the spec
    assert KeepPolicy.from_spec(shipped) == KeepPolicy() and "budget_bytes" in shipped["buffer"]
    again = release(instance)
    assert again.success
    (mat,) = again.asset_materializations_for_node("edge_release")
    assert mat.metadata["republished"].value is False
    assert len(releases.history()) == 1


def test_nothing_qualifies_for_the_target(isolated_homes):
    exported(isolated_homes, choice=None)
    generate_keypair(settings.signing_key_path().parent)
    result = release(DagsterInstance.ephemeral())
    assert "no artifact qualifies for target 'edge'" in failure_message(result)
