"""Challenger vs champion, end to end: both on the test split, both replayed (paired) on the
production holdout, the gate's decision on both, and what goes to MLflow."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.handoffs import EvaluationRecord, TrainedModelRecord
from cvops_pipelines.core.base.images import load_images
from cvops_pipelines.core.base.ontology import class_indices
from cvops_pipelines.core.base.plots import confusion_png, reliability_png
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.base.tracking import Tracking
from cvops_pipelines.core.build.registry import LoadedModel
from cvops_pipelines.core.build.training import predict_probs
from cvops_pipelines.core.measure.gate import GateConfig, GateDecision, PairedHits, decide
from cvops_pipelines.core.measure.metrics import Evaluation, evaluate_predictions, per_cohort
from cvops_pipelines.core.measure.replay import (
    NonInferiority,
    Operator,
    ReplayComparison,
    compare_on_replay,
)
from cvops_pipelines.core.measure.saliency import examples_png


@dataclass(frozen=True)
class EvaluationPolicy:
    gate: GateConfig
    operator: Operator
    replay_rule: NonInferiority
    event_classes: tuple[str, ...] = ()
    cohort_column: str = "source"


@dataclass
class EvaluationReport:
    challenger: LoadedModel
    champion: LoadedModel | None
    test: pd.DataFrame  # the test split
    mine: Evaluation
    theirs: Evaluation | None
    cohorts: pd.DataFrame  # the challenger per cohort on the test split
    replayed: ReplayComparison | None
    replay_note: str  # why there is no replay, when there is none
    gate: GateDecision
    confusion_png: bytes
    reliability_png: bytes
    saliency_png: bytes | None = None  # Grad-CAM of the wrong and least confident test answers

    def replay_summary(self) -> str:
        return self.replay_note or "\n".join(self.replayed.sentences())

    def record(self, task: str, model_name: str, trained: TrainedModelRecord) -> EvaluationRecord:
        """The asset value export reads."""
        return EvaluationRecord(
            task=task,
            model_name=model_name,
            challenger_version=self.challenger.version,
            champion_version=self.champion.version if self.champion else None,
            run_id=trained.run_id,
            dataset_version=trained.dataset_version,
            test_images=len(self.test),
            challenger=self.mine.headline(),
            champion=self.theirs.headline() if self.theirs else None,
            gate_passed=self.gate.passed,
            gate_reasons=list(self.gate.reasons),
            gate_notes=list(self.gate.notes),
            replay=None
            if self.replayed is None
            else self.replayed.table().to_dict(orient="records"),
        )

    def files(self) -> dict[str, bytes]:
        files = {
            "confusion_matrix.png": self.confusion_png,
            "reliability.png": self.reliability_png,
            **({"saliency.png": self.saliency_png} if self.saliency_png else {}),
            "per_class.csv": self.mine.per_class.to_csv(index=False).encode(),
            "per_cohort.csv": self.cohorts.to_csv(index=False).encode(),
            "gate.csv": self.gate.table.to_csv(index=False).encode(),
        }
        if self.replayed is not None:
            files.update(
                {
                    "replay.csv": self.replayed.table().to_csv(index=False).encode(),
                    "replay_per_class.csv": self.replayed.per_class.to_csv(index=False).encode(),
                    "replay_per_cohort.csv": self.replayed.per_cohort.to_csv(index=False).encode(),
                }
            )
        return files


def evaluate_challenger(
    challenger: LoadedModel,
    champion: LoadedModel | None,
    store: Store,
    dataset: pd.DataFrame,
    replay_set: pd.DataFrame,
    policy: EvaluationPolicy,
) -> EvaluationReport:
    test = dataset[dataset["split"] == "test"].reset_index(drop=True)
    cache: dict = {}
    mine, probs = _evaluate(challenger, store, test, cache)
    theirs, paired = None, None
    if champion is not None:
        theirs, old_probs = _evaluate(champion, store, test, cache)
        paired = PairedHits(
            test["label"].to_numpy(),
            probs.argmax(1) == class_indices(test["label"], challenger.preprocess.classes),
            old_probs.argmax(1) == class_indices(test["label"], champion.preprocess.classes),
        )
    holdout = replay_set[replay_set["holdout"].astype(bool)] if len(replay_set) else replay_set
    replayed, note = replay_pair(challenger, champion, store, holdout, policy)
    gate = decide(mine, theirs, policy.gate, replayed, paired)
    labels = class_indices(test["label"], challenger.preprocess.classes)
    cohorts = (
        per_cohort(probs, labels, test[policy.cohort_column])
        if policy.cohort_column in test
        else pd.DataFrame()
    )
    names = {
        "mine": f"challenger v{challenger.version}",
        "theirs": f"champion v{champion.version}" if champion else "",
    }
    conf = confusion_png(
        mine.confusion, mine.classes, f"{names['mine']} on {len(test)} test images"
    )
    rel = reliability_png(
        {
            names["mine"]: mine.reliability,
            **({names["theirs"]: theirs.reliability} if theirs else {}),
        },
        {names["mine"]: mine.ece, **({names["theirs"]: theirs.ece} if theirs else {})},
    )
    saliency, _ = examples_png(
        challenger.model,
        cache[challenger.preprocess.image_size],
        probs,
        labels,
        challenger.preprocess,
    )
    return EvaluationReport(
        challenger, champion, test, mine, theirs, cohorts, replayed, note, gate, conf, rel, saliency
    )


def _evaluate(
    loaded: LoadedModel, store: Store, test: pd.DataFrame, cache: dict
) -> tuple[Evaluation, np.ndarray]:
    size = loaded.preprocess.image_size
    if size not in cache:  # decoded once per input size
        cache[size] = load_images(store, list(test["key"]), size)
    classes = list(loaded.preprocess.classes)
    unknown = sorted(set(test["label"]) - set(classes))
    if unknown:
        raise ValueError(
            f"model v{loaded.version} does not know classes {unknown} of the test "
            "split (the ontology changed): retrain before comparing"
        )
    probs = predict_probs(loaded.model, cache[size], loaded.preprocess)
    return evaluate_predictions(probs, class_indices(test["label"], classes), classes), probs


def replay_pair(
    challenger: LoadedModel,
    champion: LoadedModel | None,
    store: Store,
    holdout: pd.DataFrame,
    policy: EvaluationPolicy,
) -> tuple[ReplayComparison | None, str]:
    """Both models on the same holdout records (images as the devices shot them)."""
    if champion is None:
        return None, "no champion: nothing to replay against"
    classes = list(challenger.preprocess.classes)
    known = holdout["label"].isin(classes) & holdout["label"].isin(champion.preprocess.classes)
    records = holdout[known].reset_index(drop=True)
    probs, cache = {}, {}
    for side, loaded in (("new", challenger), ("old", champion)):
        size = loaded.preprocess.image_size
        if size not in cache:
            cache[size] = load_images(store, list(records["key"]), size)
        out = predict_probs(loaded.model, cache[size], loaded.preprocess)
        order = [list(loaded.preprocess.classes).index(c) for c in classes]
        probs[side] = out[:, order] if len(out) else np.zeros((0, len(classes)))
    comparison = compare_on_replay(
        probs["new"],
        probs["old"],
        class_indices(records["label"], classes),
        classes,
        records["cohort"].to_numpy(),
        policy.operator,
        policy.replay_rule,
        [c for c in policy.event_classes if c in classes],
        # the holdout's operator labels were chosen among the champion's own suggestions
        assisted_on=(records["label_source"] == "expert").to_numpy(),
        unbiased=(records["label_source"] == "expert").to_numpy(),
    )
    if (~known).any():
        comparison.notes.append(
            f"{int((~known).sum())} holdout records with classes a model lacks left out"
        )
    return comparison, ""


def log_evaluation(tracking: Tracking, run_id: str, report: EvaluationReport) -> None:
    """Into the challenger's training run: test and replay metrics, tables and plots; the
    gate's verdict as a tag of the model version."""
    for prefix, evaluation in (("", report.mine), ("champion_", report.theirs)):
        for name, value in evaluation.headline().items() if evaluation else ():
            tracking.log_metric(run_id, f"{prefix}test_{name}", value)
    if report.replayed is not None:
        for outcome in report.replayed.outcomes:
            name = "replay_" + outcome.metric.split(" (")[0].replace(" ", "_")
            for key, value in (("", outcome.new_accuracy), ("champion_", outcome.old_accuracy)):
                if np.isfinite(value):
                    tracking.log_metric(run_id, f"{key}{name}", value)
        tracking.log_metric(run_id, "replay_records", report.replayed.records)
    tracking.log_files(run_id, "evaluation", report.files())
    tracking.tag_version(
        report.challenger.version, "gate", "passed" if report.gate.passed else "failed"
    )
