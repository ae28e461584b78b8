"""ssl_encoder in-process on real images: pretrained on every ingested image, registered, then
used by label QA (a candidate scorer) and by training (`init_from: ssl_encoder`)."""

from dagster import build_sensor_context, materialize

from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.build.ssl_run import EncoderPolicy, encoder_due
from cvops_pipelines.core.learn.retraining import EncoderFacts, read_facts
from cvops_pipelines.defs.build.assets import ssl_encoder
from cvops_pipelines.defs.build.sensors import ssl_encoder_sensor
from cvops_pipelines.defs.learn.assets import feedback
from cvops_pipelines.defs.resources import build_resources
from cvops_pipelines_tests.stages import INGEST, SMALL, curate, curated, metadata, train

TINY_SSL = {"image_size": 32, "epochs": 1, "batch_size": 64}


def _sensor(instance, resources):
    with build_sensor_context(instance=instance, resources=resources) as context:
        return ssl_encoder_sensor(context)


def _logs(instance, run_id: str) -> str:
    return "\n".join(e.user_message for e in instance.all_logs(run_id))


def test_the_encoder_feeds_label_qa_and_starts_training(isolated_homes):
    instance = curated(isolated_homes)  # 600 digits ingested and curated, no encoder yet
    store = LocalStore(isolated_homes)
    resources = build_resources()
    before = _sensor(instance, resources)
    assert before.run_key == "ssl:600"  # no encoder, more than min_images stored

    result = materialize(
        [*INGEST, feedback, ssl_encoder],
        selection=[ssl_encoder],
        instance=instance,
        resources=resources,
        run_config={"ops": {"ssl_encoder": {"config": TINY_SSL}}},
    )
    assert result.success
    encoder = metadata(result, "ssl_encoder")
    assert encoder["images"] == 600 and encoder["field_images"] == 0
    assert encoder["encoder"] == "cvops-classifier-encoder v1 (alias current)"
    assert read_facts(store, EncoderFacts).images == 600
    after = _sensor(instance, resources)
    assert "retrains at 750" in after.skip_message

    qa = metadata(curate(instance), "label_issues")
    candidates = qa["scorer_candidates_oof_accuracy"]
    assert set(candidates) == {
        "thumbnails (k-nearest neighbours on 16x16)",
        "ssl_encoder v1 (linear probe)",
    }
    assert qa["scorer"] == max(candidates, key=candidates.get)
    assert qa["scorer_oof_accuracy"] == round(max(candidates.values()), 4)

    # asked for, a network fine-tuned from the encoder once per fold (4 of them) competes too
    tuned = {"finetune_scorer": "always", "finetune_epochs": 1}
    asked = curate(instance, run_config={"ops": {"label_issues": {"config": tuned}}})
    qa = metadata(asked, "label_issues")
    candidates = qa["scorer_candidates_oof_accuracy"]
    name = "resnet18 fine-tuned out of fold from ssl_encoder v1"
    assert name in candidates and qa["scorer"] == max(candidates, key=candidates.get)
    assert f"{name}: fold 4/4 (150 held-out images" in _logs(instance, asked.run_id)

    started = train(instance, config={**SMALL, "init_from": "ssl_encoder"})
    assert started.success
    assert "starting from ssl_encoder v1" in _logs(instance, started.run_id)

    refused = train(
        instance, config={**SMALL, "architecture": "mobilenet_v3_small", "init_from": "ssl_encoder"}
    )
    assert not refused.success
    (failure,) = [e for e in refused.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.cause.message
    assert "cannot start a mobilenet_v3_small from ssl_encoder v1" in message


def test_the_encoder_is_due_with_enough_images_and_again_after_enough_new_ones():
    policy = EncoderPolicy(min_images=100, min_growth=0.5)
    assert encoder_due(99, None, policy) == (False, "99 images stored, fewer than min_images=100")
    assert encoder_due(100, None, policy)[0]
    assert not encoder_due(149, 100, policy)[0] and encoder_due(150, 100, policy)[0]


def test_label_qa_goes_on_on_thumbnails_when_the_tracking_server_is_down(
    isolated_homes, monkeypatch
):
    from cvops_pipelines_tests.helpers import free_port

    instance = curated(isolated_homes)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    result = curate(instance)
    assert result.success
    qa = metadata(result, "label_issues")
    assert set(qa["scorer_candidates_oof_accuracy"]) == {
        "thumbnails (k-nearest neighbours on 16x16)"
    }
    assert "is unreachable" in _logs(instance, result.run_id)
