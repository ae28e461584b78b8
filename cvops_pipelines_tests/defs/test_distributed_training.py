"""trained_model with `distributed.processes: 2`: torchrun launched from the asset through
Dagster Pipes, two gloo processes on the CPU, and the same run, metrics, registry entry,
metadata and gate as the single-process run."""

from cvops_pipelines import settings
from cvops_pipelines.core.base.tracking import Tracking
from cvops_pipelines_tests.stages import SMALL, curated, gate, metadata, train


def _logs(instance, run_id: str) -> str:
    return "\n".join(e.user_message for e in instance.all_logs(run_id))


def test_two_gloo_processes_train_register_and_report_like_one(isolated_homes):
    instance = curated(isolated_homes)
    one = train(instance)
    two = train(instance, config={**SMALL, "distributed": {"processes": 2}})
    assert one.success and two.success
    single, double = metadata(one, "trained_model"), metadata(two, "trained_model")
    assert set(single) == set(double)
    assert int(double["model_version"]) == int(single["model_version"]) + 1
    assert double["model"].endswith("(alias challenger)")
    assert set(metadata(one, "model_evaluation")) == set(metadata(two, "model_evaluation"))
    assert gate(two) is not None

    logs = _logs(instance, two.run_id)
    assert "launching 2 process(es) x 1 node(s) with torchrun" in logs
    assert "rank 0 of 2: epoch 1:" in logs  # streamed from the child through Pipes
    assert "rank 0 of" not in _logs(instance, one.run_id)

    client = Tracking(settings.mlflow_tracking_uri()).client()
    run = client.get_run(double["mlflow_run_id"])
    assert run.data.params["distributed_processes"] == "2"
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= double["best_epoch"]
    assert run.data.metrics["best_epoch"] == double["best_epoch"]
