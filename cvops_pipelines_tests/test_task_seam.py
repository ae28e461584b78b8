"""The task seam is real: a third task, defined here only, reaches every stage through the
registry (core/tasks/) without editing an asset; and a setting a task cannot honour is refused
by name, never ignored."""

import pandas as pd
import pytest
from dagster import DagsterInstance

from cvops_pipelines.core import tasks
from cvops_pipelines.core.base.report import StageResult
from cvops_pipelines.core.curate.label_qa import REVIEW_COLUMNS
from cvops_pipelines.core.tasks.classification import Classification
from cvops_pipelines.demo import digit_model
from cvops_pipelines_tests import corpus, stages


class Parity(Classification):
    """Is the digit even or odd: a two-class task from the classifier's pieces, with its own
    labeled pool (it counts each class's share) and its own label QA (none: it trusts labels)."""

    name = "parity"
    pools = 0

    def pool(self, raw_images, annotations):
        Parity.pools += 1
        result = super().pool(raw_images, annotations)
        shares = result.value["label"].value_counts(normalize=True).round(3).to_dict()
        return StageResult(result.value, {**result.metadata, "parity_shares": str(shares)})

    def label_issues(self, ctx, pool, settings):
        ctx.log("parity trusts its labels: no scorer")
        return StageResult(pd.DataFrame(columns=REVIEW_COLUMNS), {"scorer": "parity: none"})


@pytest.fixture
def parity_home(isolated_homes, monkeypatch, tmp_path):
    ontology = tmp_path / "parity.yaml"
    ontology.write_text(
        "version: 1\ntask: parity\nclasses:\n"
        "  - {name: even, id: 0, description: an even digit}\n"
        "  - {name: odd, id: 1, description: an odd digit}\n"
    )
    monkeypatch.setenv("CVOPS_ONTOLOGY", str(ontology))
    monkeypatch.setitem(tasks.TASKS, "parity", Parity())
    return isolated_homes


def write_parity_drop(root, name, indices):
    drop = root / name
    for i in indices:
        label = "even" if int(digit_model.digit_label(i)) % 2 == 0 else "odd"
        path = drop / label / f"digit_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(corpus.encode(digit_model.digit(i), "PNG"))
    (drop / "_SUCCESS").write_text("")


def test_a_third_task_runs_ingest_to_measure_through_the_registry(parity_home):
    instance = DagsterInstance.ephemeral()
    write_parity_drop(parity_home / "drops", "d1", range(0, 400))
    stages.ingest(instance, "d1")
    curated = stages.curate(instance)
    assert curated.success
    pool = stages.metadata(curated, "labeled_pool")
    assert Parity.pools >= 1 and "even" in pool["parity_shares"]  # its own pool piece ran
    assert stages.metadata(curated, "label_issues")["scorer"] == "parity: none"

    result = stages.train(instance)
    assert result.success
    trained = result.output_for_node("trained_model")
    assert trained.task == "parity"  # every record names its task
    assert result.output_for_node("model_evaluation").task == "parity"
    evaluation = stages.metadata(result, "model_evaluation")
    assert evaluation["test_images"] > 0
    assert stages.gate(result).passed  # the first model passes by definition


def test_an_ontology_naming_an_unregistered_task_is_refused_by_name(tmp_path):
    from cvops_pipelines.core.base.ontology import OntologyError, load_ontology

    path = tmp_path / "o.yaml"
    path.write_text("version: 1\ntask: segmentation\nclasses:\n  - {name: a, id: 0}\n")
    with pytest.raises(OntologyError, match="task must be one of classification, detection"):
        load_ontology(path, tasks.task_labels())
    with pytest.raises(tasks.TaskRefused, match="no task 'segmentation' is registered"):
        tasks.task_named("segmentation")


def test_a_detector_refuses_a_gate_setting_it_cannot_honour():
    """Refused before any evaluation, naming the task: never silently ignored. (Training
    settings apply to detectors too: test_detection_stage.)"""
    from cvops_pipelines.core.tasks.detection import DETECTION
    from cvops_pipelines.defs.measure.assets import ModelEvaluationConfig

    settings = ModelEvaluationConfig(require_field_evidence=True)
    with pytest.raises(tasks.TaskRefused, match="task 'detection': require_field_evidence"):
        DETECTION.evaluate(None, None, None, None, pd.DataFrame(), None, settings)
