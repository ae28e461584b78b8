"""Running stages the way several test modules need them: real drops written to disk, ingest
and curate materialized in-process with the real resources, a small training run and its gate."""

from dagster import DagsterInstance, materialize

from cvops_pipelines.defs.build.assets import trained_model
from cvops_pipelines.defs.curate.assets import (
    dataset_version,
    label_issues,
    labeled_pool,
    replay_set,
)
from cvops_pipelines.defs.ingest.assets import annotations, raw_images
from cvops_pipelines.defs.learn.assets import feedback
from cvops_pipelines.defs.measure.assets import GATE_CHECK, model_evaluation
from cvops_pipelines.defs.resources import build_resources
from cvops_pipelines.defs.ship.assets import onnx_model
from cvops_pipelines.demo import digit_model
from cvops_pipelines_tests import corpus

INGEST = [raw_images, annotations]

CURATE = [labeled_pool, replay_set, label_issues, dataset_version]

# from scratch every time: these tests compare models trained side by side (the default, a
# fine-tune of the champion, has its own test in test_build_measure_stage.py)
SMALL = {
    "image_size": 32,
    "epochs": 3,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "seed": 3,
    "init_from": "none",
}


def write_drop(root, name, indices, extra: dict | None = None):
    drop = root / name
    for i in indices:
        path = drop / digit_model.digit_label(i) / f"digit_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(corpus.encode(digit_model.digit(i), "PNG"))
    for rel, data in (extra or {}).items():
        (drop / rel).parent.mkdir(parents=True, exist_ok=True)
        (drop / rel).write_bytes(data)
    (drop / "_SUCCESS").write_text("")


def ingest(instance, drop):
    instance.add_dynamic_partitions("drops", [drop])
    result = materialize(
        INGEST,
        partition_key=drop,
        instance=instance,
        resources=build_resources(),
        run_config={"ops": {"raw_images": {"config": {"workers": 1}}}},
    )
    assert result.success


def curate(instance, extra_assets=(), run_config=None):
    # feedback (no batches yet) is an input of labeled_pool: loaded empty
    return materialize(
        [*INGEST, feedback, *CURATE, *extra_assets],
        instance=instance,
        resources=build_resources(),
        selection=[*CURATE, *extra_assets],
        raise_on_error=False,
        run_config=run_config,
    )


def metadata(result, node):
    (mat,) = result.asset_materializations_for_node(node)
    return {k: v.value for k, v in mat.metadata.items()}


def curated(home):
    instance = DagsterInstance.ephemeral()
    write_drop(home / "drops", "d1", range(0, 600))
    ingest(instance, "d1")
    assert curate(instance).success
    return instance


def train(instance, config=SMALL, extra=(), export_config=None):
    ops = {"trained_model": {"config": config}}
    if export_config:
        ops["onnx_model"] = {"config": export_config}
    return materialize(
        [*INGEST, feedback, *CURATE, trained_model, model_evaluation, onnx_model, *extra],
        selection=[trained_model, model_evaluation, *extra],
        instance=instance,
        resources=build_resources(),
        raise_on_error=False,
        run_config={"ops": ops},
    )


def gate(result):
    (check,) = [e for e in result.get_asset_check_evaluations() if e.check_name == GATE_CHECK]
    return check
