"""When to retrain: the typed facts the assets hand over, and the rule that reads them."""

from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.learn.retraining import (
    AlertFacts,
    DatasetFacts,
    ModelFacts,
    RetrainingPolicy,
    SubBatchFacts,
    read_facts,
    retraining_decision,
    write_facts,
)


def test_facts_round_trip_through_the_store(tmp_path):
    store = LocalStore(tmp_path)
    assert read_facts(store, DatasetFacts) is None
    facts = DatasetFacts("ds-1", 300, ("dataset_version_balance",), at=5.0)
    write_facts(store, facts)
    write_facts(store, AlertFacts(("accuracy_sla",), at=6.0))
    assert read_facts(store, DatasetFacts) == facts
    assert read_facts(store, AlertFacts) == AlertFacts(("accuracy_sla",), at=6.0)
    assert read_facts(store, ModelFacts) is None


def test_the_rule_in_order():
    model = ModelFacts("1", "ds-1", 300, at=10.0)
    decide = retraining_decision
    assert not decide(None, None, None).train
    refused = decide(DatasetFacts("ds-2", 900, ("dataset_version_leakage",)), model, None)
    assert not refused.train and "failed dataset_version_leakage" in refused.why
    first = decide(DatasetFacts("ds-1", 300), None, None)
    assert first.train and first.why == "no model yet" and first.dataset_version == "ds-1"
    same = decide(DatasetFacts("ds-1", 300), model, None)
    assert not same.train and "already" in same.why
    few = decide(DatasetFacts("ds-2", 310), model, None)
    assert not few.train and "10 new labels" in few.why and "waiting for 200" in few.why
    many = decide(DatasetFacts("ds-2", 500), model, None)
    assert many.train and many.dataset_version == "ds-2" and "200 new labels" in many.why


def test_an_alert_after_the_model_lowers_the_bar_but_an_older_one_does_not():
    model = ModelFacts("1", "ds-1", 300, at=10.0)
    dataset = DatasetFacts("ds-2", 330)
    policy = RetrainingPolicy(min_new_labels=200, min_labels_after_alert=20)
    fresh = retraining_decision(dataset, model, AlertFacts(("no_output_drift",), at=11.0), policy)
    assert fresh.train and fresh.why.startswith("no_output_drift failed; 30 new labels")
    stale = retraining_decision(dataset, model, AlertFacts(("no_output_drift",), at=9.0), policy)
    assert not stale.train and "waiting for 200" in stale.why
    passed = retraining_decision(dataset, model, AlertFacts((), at=11.0), policy)
    assert not passed.train


def test_after_output_drift_the_retrain_asks_for_broader_augmentation():
    model, dataset = ModelFacts("1", "ds-1", 300, at=10.0), DatasetFacts("ds-2", 330)
    drift = retraining_decision(dataset, model, AlertFacts(("no_output_drift",), at=11.0))
    assert drift.train and drift.overrides == {"augmentation": "strong"}
    assert "augmentation strong" in drift.why
    sla_only = retraining_decision(dataset, model, AlertFacts(("accuracy_sla",), at=11.0))
    assert sla_only.train and sla_only.overrides == {}
    off = RetrainingPolicy(augmentation_after_drift=None)
    assert (
        retraining_decision(dataset, model, AlertFacts(("no_output_drift",), 11.0), off).overrides
        == {}
    )
    plenty = retraining_decision(DatasetFacts("ds-2", 600), model, None)
    assert plenty.train and plenty.overrides == {}  # labels alone: the configured preset


def test_a_sub_batch_asks_for_a_quick_retrain_once_a_newer_dataset_version_exists():
    model = ModelFacts("1", "ds-1", 300, at=10.0)
    asked = SubBatchFacts("q-1", 1, epochs=2, at=20.0)
    before = retraining_decision(DatasetFacts("ds-2", 310, at=15.0), model, None, sub_batch=asked)
    assert not before.train  # the version holding its answers is not built yet
    quick = retraining_decision(DatasetFacts("ds-3", 325, at=25.0), model, None, sub_batch=asked)
    assert quick.train and quick.quick_epochs == 2 and quick.dataset_version == "ds-3"
    assert quick.why.startswith("sub-batch 1 of q-1 answered: a quick retrain (2 epochs)")
    trained = ModelFacts("2", "ds-3", 325, at=30.0)  # it trained: asked no more
    after = retraining_decision(DatasetFacts("ds-4", 340, at=35.0), trained, None, sub_batch=asked)
    assert not after.train and after.quick_epochs is None


def test_the_quick_retrain_asks_each_task_for_its_own_epochs(tmp_path):
    from dagster import RunRequest, build_sensor_context

    from cvops_pipelines.defs.learn.sensors import retraining_sensor
    from cvops_pipelines.defs.resources import build_resources

    resources = build_resources()
    store = resources["storage"].store()
    write_facts(store, ModelFacts("1", "ds-1", 300, at=10.0))
    write_facts(store, SubBatchFacts("q-1", 1, epochs=2, at=20.0))
    write_facts(store, DatasetFacts("ds-2", 325, at=25.0))
    used = {k: resources[k] for k in ("storage", "contracts", "loop")}
    with build_sensor_context(resources=used) as context:
        request = retraining_sensor(context)
    assert isinstance(request, RunRequest)
    assert request.run_config == {"ops": {"trained_model": {"config": {"epochs": 2}}}}


def test_each_tasks_quick_retrain_is_a_config_trained_model_accepts():
    from cvops_pipelines.core.tasks import TASKS
    from cvops_pipelines.defs.build.assets import TrainedModelConfig

    for task in TASKS.values():
        config = TrainedModelConfig(**task.quick(3))
        epochs = config.detector.epochs if task.labels == "boxes" else config.epochs
        assert epochs == 3, task.name
