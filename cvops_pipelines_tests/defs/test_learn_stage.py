"""The Learn stage through Dagster on real parts: devices upload real batches, feedback_sensor turns
them into partitions and one range run; a malformed batch and one with an unknown class are
quarantined whole while the good one is ingested; production_metrics fails its SLA on a shifted
stream and retraining_sensor then requests a training run."""

import json

import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dagster import (
    DagsterInstance,
    RunRequest,
    SensorResult,
    SkipReason,
    build_sensor_context,
    materialize,
)

from cvops_pipelines import settings
from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.base.tables import read_table
from cvops_pipelines.core.learn.enrolment import enroller
from cvops_pipelines.core.learn.retraining import (
    AlertFacts,
    DatasetFacts,
    ModelFacts,
    read_facts,
    write_facts,
)
from cvops_pipelines.core.ship.release import (
    generate_keypair,
    load_private_key,
)
from cvops_pipelines.defs.learn.assets import feedback, production_metrics
from cvops_pipelines.defs.learn.sensors import feedback_sensor, retraining_sensor
from cvops_pipelines.defs.resources import build_resources
from cvops_pipelines.demo.digit_model import png, publish_live_release
from cvops_pipelines.edge.identity import load_or_create
from cvops_pipelines.edge.remote import DirRemote
from cvops_pipelines.edge.simulator import FleetConfig, Shift, run_fleet
from cvops_pipelines.edge.wire import batch_key, batch_signature_key
from cvops_pipelines_tests.corpus import digit_label
from cvops_pipelines_tests.helpers import rezip


def published_release(home) -> str:
    """The LR digit model released and live in the cvops store (demo.digit_model)."""
    generate_keypair(settings.signing_key_path().parent)
    key = load_private_key(settings.signing_key_path())
    return publish_live_release(LocalStore(home), key)


def fleet(home, shift=Shift(), steps=6, seed=0):
    public = settings.signing_key_path().with_suffix(".pub").read_bytes()
    stream = [(png(i), digit_label(i)) for i in range(900, 1300)]
    key = load_private_key(settings.signing_key_path())
    return run_fleet(
        DirRemote(home),
        home / "fleet",
        public,
        stream,
        FleetConfig(
            devices=3,
            steps=steps,
            images_per_step=4,
            p_offline=0.0,
            p_crash=0.0,
            upload_every=2,
            shift=shift,
            review_share=0.8,
            seed=seed,
        ),
        enrol=enroller(LocalStore(home), key, "test operator"),
    )


def tick(instance, sensor):
    with build_sensor_context(instance=instance, resources=build_resources()) as context:
        result = sensor(context)
    if isinstance(result, SensorResult):
        for add in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
    return result


def test_feedback_range_run_quarantines_bad_batches_whole(isolated_homes):
    """Through the sensor and one range run: the fleet's signed batches are ingested; a
    malformed and an off-contract batch of an enrolled device, and a batch forged in the name of
    an unenrolled device, are each quarantined whole with their reason."""
    instance = DagsterInstance.ephemeral()
    release = published_release(isolated_homes)
    fleet(isolated_homes, steps=2)
    store = LocalStore(isolated_homes)
    good = sorted(e.key for e in store.list("feedback/batches/") if e.key.endswith(".zip"))
    payload = store.read_bytes(good[0])
    device = load_or_create(isolated_homes / "fleet" / "dev-000")  # the device's own key

    def upload(batch: str, data: bytes, key) -> None:
        store.write_bytes(batch_key(batch), data)
        store.write_bytes(batch_signature_key(batch), key.sign(data))

    upload("dev-000-b000900", b"this is not a zip", device)
    unknown = rezip(
        payload,
        lambda f: f.update(
            {
                "records.jsonl": f["records.jsonl"]
                .replace(b'"predicted": "', b'"predicted": "cat')
                .replace(good[0].split("/")[-1][:-4].encode(), b"dev-000-b000901")
            }
        ),
    )
    upload("dev-000-b000901", unknown, device)
    forged = rezip(payload, lambda f: None)
    upload("dev-900-b000001", forged, Ed25519PrivateKey.generate())  # nobody enrolled dev-900

    result = tick(instance, feedback_sensor)
    (request,) = result.run_requests
    assert len(instance.get_dynamic_partitions("feedback_batches")) == len(good) + 3
    run = materialize(
        [feedback],
        instance=instance,
        resources=build_resources(),
        tags=request.tags,
        raise_on_error=False,
    )
    assert run.success
    checks = {c.check_name: c for c in run.get_asset_check_evaluations()}
    assert checks["feedback_contract"].passed  # what was accepted meets the contract
    warning = checks["no_quarantined_batches"]
    assert not warning.passed and warning.metadata["quarantined_batches"].value == 3
    assert "dev-" in warning.metadata["first_failure"].value
    materializations = run.asset_materializations_for_node("feedback")  # one per partition
    assert {m.metadata["enrolled_devices"].value for m in materializations} == {3}
    for bad, code in (
        ("dev-000-b000900", "malformed_batch"),
        ("dev-000-b000901", "contract_failed"),
        ("dev-900-b000001", "unknown_device"),
    ):
        note = json.loads(store.read_bytes(f"quarantine/feedback/{bad}.json"))
        assert note["reason_code"] == code and note["reason"]
        assert store.exists(f"quarantine/feedback/{bad}.zip")  # kept, not dropped
        assert read_table(store, f"tables/feedback/{bad}.parquet").empty
    accepted = pd.concat(
        [read_table(store, f"tables/feedback/{k.split('/')[-1][:-4]}.parquet") for k in good]
    )
    assert len(accepted) > 0 and set(accepted["release"].dropna()) == {release}
    assert all(store.exists(k) for k in accepted["key"].dropna())  # images content-addressed
    assert isinstance(tick(instance, feedback_sensor), SkipReason)  # nothing new: no second run


def test_sla_failure_on_a_shifted_stream_requests_retraining(isolated_homes):
    instance, store = DagsterInstance.ephemeral(), LocalStore(isolated_homes)
    published_release(isolated_homes)
    write_facts(store, DatasetFacts("ds-test", 300))
    write_facts(store, ModelFacts("1", "ds-test", 300))
    skip = tick(instance, retraining_sensor)
    assert isinstance(skip, SkipReason) and "already" in skip.skip_message

    fleet(isolated_homes, shift=Shift(brightness=0.3, blur=5, rotate=20), steps=8)
    materialize(
        [feedback],
        instance=instance,
        resources=build_resources(),
        tags=tick(instance, feedback_sensor).run_requests[0].tags,
    )

    def metrics_run():
        return materialize(
            [feedback.to_source_asset(), production_metrics],
            instance=instance,
            resources=build_resources(),
            raise_on_error=False,
            selection=["production_metrics"],
            run_config={
                "ops": {
                    "production_metrics": {"config": {"min_accuracy": 0.95, "min_reviewed": 20}}
                }
            },
        )

    metrics = metrics_run()
    checks = {c.check_name: c for c in metrics.get_asset_check_evaluations()}
    assert not checks["accuracy_sla"].passed and not checks["no_output_drift"].passed
    (mat,) = metrics.asset_materializations_for_node("production_metrics")
    assert mat.metadata["coverage"].value > 0.5 and mat.metadata["sla_ok"].value is False
    # the asset handed its alerts over as a typed record, which is what the sensor reads
    assert set(read_facts(store, AlertFacts).failed) == {"accuracy_sla", "no_output_drift"}
    batches = instance.get_dynamic_partitions("feedback_batches")
    assert mat.metadata["batches_absorbed"].value == len(batches) > 0
    (second,) = metrics_run().asset_materializations_for_node("production_metrics")
    # nothing new: nothing read, the same figures from the state
    assert second.metadata["batches_absorbed"].value == 0
    for name in ("records", "reviewed", "coverage", "sla_ok"):
        assert second.metadata[name].value == mat.metadata[name].value

    write_facts(store, DatasetFacts("ds-new", 310))  # 10 new labels: too few even after an alert
    assert isinstance(tick(instance, retraining_sensor), SkipReason)
    write_facts(store, DatasetFacts("ds-newer", 340))
    request = tick(instance, retraining_sensor)
    assert isinstance(request, RunRequest) and request.run_key == "train:ds-newer"
    assert "accuracy_sla" in request.tags["cvops/trigger"]
    # the field drifted: the retrain is asked for broader augmentation, in its run config
    assert request.run_config["ops"]["trained_model"]["config"] == {"augmentation": "strong"}


def test_no_training_on_a_dataset_version_its_contracts_refused(isolated_homes):
    instance, store = DagsterInstance.ephemeral(), LocalStore(isolated_homes)
    write_facts(store, DatasetFacts("ds-bad", 30, ("dataset_version_balance",)))
    skip = tick(instance, retraining_sensor)
    assert isinstance(skip, SkipReason)
    assert skip.skip_message == "dataset version ds-bad failed dataset_version_balance"
    write_facts(store, DatasetFacts("ds-good", 30))
    request = tick(instance, retraining_sensor)
    assert isinstance(request, RunRequest) and request.tags["cvops/trigger"] == "first model"
