"""Publishing a release: verified artifact, idempotent publish, the canary pointer; and a look at
the canary that decides, waits, or hands over to people once its error budget is spent."""

import json

import pytest

from cvops_pipelines.core.base.handoffs import ExportRecord
from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.measure.replay import NonInferiority, Operator
from cvops_pipelines.core.ship.canary import look_at_canary
from cvops_pipelines.core.ship.canary import replay_classifiers as replay
from cvops_pipelines.core.ship.release import (
    ReleaseRefused,
    ReleaseStore,
    chosen_artifact,
    generate_keypair,
    load_private_key,
    publish_release,
    release_meta,
)
from cvops_pipelines.demo.digit_model import PREPROCESS, trained_model
from cvops_pipelines.edge.bundle import sha256


@pytest.fixture
def setup(tmp_path):
    store = LocalStore(tmp_path / "store")
    private, _ = generate_keypair(tmp_path / "keys")
    return ReleaseStore(store), load_private_key(private)


def onnx_record(store, model: bytes, version: str) -> ExportRecord:
    key = f"models/digits/v{version}/model.fp32.onnx"
    store.write_bytes(key, model)
    return ExportRecord(
        task="classification",
        model_name="digits",
        source_model_version=version,
        dataset_version="ds-1",
        run_id="r1",
        preprocess=PREPROCESS,
        choices={"edge": "onnx_fp32", "tiny": None},
        artifacts={"onnx_fp32": {"key": key, "uri": store.uri(key), "sha256": sha256(model)}},
    )


def test_chosen_artifact_is_verified_and_a_target_without_one_is_refused(setup):
    releases, _ = setup
    record = onnx_record(releases.store, trained_model(n=200), "1")
    artifact, model = chosen_artifact(releases.store, record, "edge")
    assert artifact == "onnx_fp32" and sha256(model) == record.artifacts["onnx_fp32"]["sha256"]
    with pytest.raises(ReleaseRefused, match="no artifact qualifies for target 'tiny'"):
        chosen_artifact(releases.store, record, "tiny")
    releases.store.write_bytes(record.artifacts["onnx_fp32"]["key"], b"tampered")
    with pytest.raises(ReleaseRefused, match="sha256 mismatch"):
        chosen_artifact(releases.store, record, "edge")


def test_publish_is_idempotent_and_points_canary(setup):
    releases, key = setup
    first_model = trained_model(n=200)
    meta = release_meta(onnx_record(releases.store, first_model, "1"), "onnx_fp32", "edge")
    first = publish_release(releases, first_model, PREPROCESS, meta, key, "test", 0.3)
    assert first.new and first.record.parent is None
    assert releases.channel("canary")["share"] == 1.0  # the first release: every device
    history = len(releases.history())
    again = publish_release(releases, first_model, PREPROCESS, meta, key, "test", 0.3)
    assert not again.new and again.record.release == first.record.release
    assert len(releases.history()) == history  # a re-run moves no pointer

    releases.point("stable", first.record.release, "promoted", "test")
    second_model = trained_model(n=300)
    meta2 = release_meta(onnx_record(releases.store, second_model, "2"), "onnx_fp32", "edge")
    second = publish_release(
        releases, second_model, PREPROCESS, meta2, key, "test", 0.3, ("site-b",)
    )
    canary = releases.channel("canary")
    assert second.record.parent == first.record.release
    assert canary["release"] == second.record.release and canary["share"] == 0.3
    assert list(canary["cohorts"]) == ["site-b"]


def test_a_canary_look_waits_then_hands_over_when_its_budget_is_spent(setup):
    releases, key = setup
    model = trained_model(n=200)
    meta = release_meta(onnx_record(releases.store, model, "1"), "onnx_fp32", "edge")
    release = publish_release(releases, model, PREPROCESS, meta, key, "test", 1.0).record.release
    rule, records = NonInferiority(min_records=50), _no_records()
    looks = [
        look_at_canary(releases, records, release, rule, 2, Operator(), "test", replay=replay)
        for _ in range(3)
    ]
    assert [look.action for look in looks] == ["wait", "wait", "undecided"]
    assert [look.look for look in looks] == [1, 2, 3]
    assert "promote or roll it back by hand" in looks[-1].reasons[0]
    assert releases.channel("canary")["release"] == release  # nothing moved
    releases.point("canary", None, "retired", "test")
    gone = look_at_canary(releases, records, release, rule, 2, Operator(), "test", replay=replay)
    assert gone.action == "none" and gone.look is None
    assert json.loads(releases.store.read_bytes(f"releases/looks/{release}.json"))["looks"] == 3


def _no_records():
    from cvops_pipelines.core.learn.feedback import no_records
    from cvops_pipelines_tests.reference import resolve_records

    return resolve_records(no_records())
