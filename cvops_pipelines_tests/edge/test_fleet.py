"""A seeded fleet with outages and crashes (mid-download and mid-upload), then the paired canary
loop: a worse model is rolled back by a shadow replay on the field's reviewed images, a better one
is promoted and becomes champion."""

import collections

import pytest
from mlflow import MlflowClient

from cvops_pipelines.core.base.tracking import Tracking
from cvops_pipelines.core.learn.feedback import batch_ids
from cvops_pipelines.core.measure.replay import NonInferiority
from cvops_pipelines.core.ship.canary import decide_canary, replay_classifiers
from cvops_pipelines.core.ship.release import apply_verdict
from cvops_pipelines.demo.digit_model import png, trained_model
from cvops_pipelines.edge import agent as agent_module
from cvops_pipelines.edge.agent import EdgeAgent
from cvops_pipelines.edge.simulator import FleetConfig, Shift, run_fleet
from cvops_pipelines_tests.corpus import digit_label
from cvops_pipelines_tests.edge.fleet_kit import central, field_records


def stream(start: int, n: int):
    return [(png(i), digit_label(i)) for i in range(start, start + n)]


def test_seeded_fleet_loses_and_duplicates_no_record(tmp_path, monkeypatch):
    monkeypatch.setattr(agent_module, "CHUNK", 2048)  # several chunks: crashes land mid-download
    c = central(tmp_path)
    r1 = c.release(trained_model(), "1")
    c.releases.point("stable", r1.id, "first", "test")
    config = FleetConfig(
        devices=5,
        steps=16,
        images_per_step=3,
        p_offline=0.3,
        p_crash=0.08,
        review_share=0.5,
        seed=11,
    )
    first = run_fleet(c.remote, tmp_path / "fleet", c.public_key, stream(1000, 200), config)
    r2 = c.release(trained_model(n=300), "2", parent=r1.id)
    c.releases.point("canary", r2.id, "try", "test", share=0.5)
    second = run_fleet(
        c.remote,
        tmp_path / "fleet",
        c.public_key,
        stream(1200, 200),
        FleetConfig(**{**config.__dict__, "seed": 12}),
    )
    assert first.crashes + second.crashes >= 5 and first.offline_steps + second.offline_steps > 10

    made = {**first.predictions, **second.predictions}
    records = field_records(c.releases.store)
    counts = collections.Counter(records["record_id"])
    assert set(counts) == set(made) and set(counts.values()) == {1}  # each exactly once
    # most of the 400 images went through despite the faults (each store call may crash)
    assert len(made) == first.stream_used + second.stream_used > 300
    for device, release in second.releases.items():  # every device runs a verified release
        agent = EdgeAgent(tmp_path / "fleet" / device, c.remote, c.public_key, device)
        assert agent.release == release and release in (r1.id, r2.id)
        assert agent._verified_dir(release)["release"] == release
        assert release == agent.target()  # and the one its channel names
    assert {r for r in second.releases.values()} == {r1.id, r2.id}  # canary share reached some


def test_a_fleet_on_video_records_every_frame_once_and_keeps_some_images(tmp_path):
    c = central(tmp_path)
    r1 = c.release(trained_model(), "1")
    c.releases.point("stable", r1.id, "first", "test")
    config = FleetConfig(
        devices=3, steps=6, images_per_step=4, p_crash=0.05, seed=5, video_hold=4,
        shift=Shift(rotate=20.0),
    )  # fmt: skip
    result = run_fleet(c.remote, tmp_path / "fleet", c.public_key, stream(1000, 80), config)
    records = field_records(c.releases.store)
    counts = collections.Counter(records["record_id"])
    assert set(counts) == set(result.predictions) and set(counts.values()) == {1}
    assert len(result.predictions) == 4 * result.stream_used  # each image filmed 4 frames
    kept = records["image_kept"] != False  # noqa: E712  (a column of booleans and nulls)
    assert 0 < kept.sum() < len(records)  # selective: some images, never all
    assert set(records["source"].dropna().str.endswith(".mp4")) == {True}
    assert result.image_truth and set(result.image_truth) <= set(records["image_id"])


def registered(tracking: Tracking, versions: int, tmp_path_source) -> None:
    """Registry versions 1..n (the models themselves are the ONNX files in the releases)."""
    client = tracking.client()
    client.create_registered_model(tracking.model_name)
    for _ in range(versions):
        client.create_model_version(tracking.model_name, str(tmp_path_source), None)


@pytest.fixture
def good_and_bad():
    return trained_model(n=900), trained_model(n=900, quality="bad"), trained_model(n=120)


def test_canary_rollback_and_promotion(tmp_path, good_and_bad):
    good, bad, weak = good_and_bad
    c = central(tmp_path)
    tracking = Tracking(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"))
    registered(tracking, 3, tmp_path / "artifacts")
    champion = lambda manifest: tracking.set_alias("champion", manifest["model_version"])  # noqa
    config = FleetConfig(
        devices=6,
        steps=20,
        images_per_step=4,
        p_offline=0.1,
        p_crash=0.0,
        review_share=0.8,
        shift=Shift(brightness=0.1),
        seed=5,
    )

    def field_round(release, start):
        run_fleet(c.remote, tmp_path / "fleet", c.public_key, stream(start, 480), config)
        verdict, comparison = decide_canary(
            c.releases,
            field_records(c.releases.store),
            release,
            (c.releases.channel("stable") or {}).get("release"),
            c.releases.channel("canary")["updated_at"],
            NonInferiority(min_records=40),
            replay=replay_classifiers,
        )
        # paired: both releases scored on every reviewed record since the canary went live
        assert comparison.records >= 40 and set(comparison.table()["records"]) == {
            comparison.records
        }
        return verdict

    stable = c.release(weak, "1")
    c.releases.point("stable", stable.id, "first", "test")
    tracking.set_alias("champion", "1")

    worse = c.release(bad, "2", parent=stable.id)
    c.releases.point("canary", worse.id, "try v2", "test", share=0.5)
    verdict = field_round(worse.id, 0)
    assert verdict.action == "rollback", verdict
    apply_verdict(c.releases, worse.id, verdict, "test", champion)
    assert c.releases.channel("canary")["release"] is None
    assert c.releases.channel("stable")["release"] == stable.id
    assert (
        str(
            MlflowClient(tracking.tracking_uri)
            .get_model_version_by_alias(tracking.model_name, "champion")
            .version
        )
        == "1"
    )

    better = c.release(good, "3", parent=stable.id)
    c.releases.point("canary", better.id, "try v3", "test", share=0.5)
    verdict = field_round(better.id, 480)
    assert verdict.action == "promote", verdict
    apply_verdict(c.releases, better.id, verdict, "test", champion)
    assert c.releases.channel("stable")["release"] == better.id
    assert (
        str(
            MlflowClient(tracking.tracking_uri)
            .get_model_version_by_alias(tracking.model_name, "champion")
            .version
        )
        == "3"
    )
    history = c.releases.history()
    assert list(history["to_release"]) == [stable.id, worse.id, None, better.id, better.id, None]
    assert "rolled back" in history.iloc[2]["reason"] and len(batch_ids(c.releases.store)) > 0
