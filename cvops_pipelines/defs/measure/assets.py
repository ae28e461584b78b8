"""Measure stage: the challenger and the champion on the same test images and, paired, on the
production holdout of the replay set; the gate decides on both."""

import json

import numpy as np
import pandas as pd
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext,
                     AssetSelection, AutomationCondition, MetadataValue, Output, asset)
from pydantic import Field

from cvops_pipelines.core.gate import GateConfig, decide
from cvops_pipelines.core.metrics import Evaluation, evaluate_predictions, per_cohort
from cvops_pipelines.core.plots import confusion_png, md_image, reliability_png
from cvops_pipelines.core.replay import (NonInferiority, ReplayComparison,
                                         compare_on_replay)
from cvops_pipelines.core.tables import markdown_table
from cvops_pipelines.core.training import load_images, predict_probs
from cvops_pipelines.defs.operator import OperatorConfig
from cvops_pipelines.defs.resources import CvopsStorage, DataContracts, MlflowTracking

GATE_CHECK = "challenger_not_worse_than_champion"


class ModelEvaluationConfig(OperatorConfig):
    max_macro_f1_drop: float = Field(0.01, description="Gate ε: macro-F1 may drop this much.")
    max_class_recall_drop: float = Field(0.05, description="Gate δ: any class's recall may "
                                                           "drop this much.")
    min_net_images: int = Field(2, description="Gate noise floor: a drop worth fewer net test "
                                               "images than this does not block.")
    cohort_column: str = Field("source", description="Dataset column that defines cohorts.")
    replay_margin: float = Field(0.02, description="Replay non-inferiority margin: the "
                                                   "challenger may be this much less accurate.")
    replay_alpha: float = Field(0.05, description="One-sided error rate of the replay's exact "
                                                  "paired tests.")
    replay_min_records: int = Field(30, description="Fewer holdout records: not enough field "
                                                    "data to judge.")
    require_field_evidence: bool = Field(False, description="Pass only a challenger the replay "
                                         "shows non-inferior (default: refuse one it shows "
                                         "worse; the paired canary decides the rest).")


def _evaluate(loaded, store, test: pd.DataFrame, cache: dict) -> tuple[Evaluation, np.ndarray]:
    size = loaded.preprocess.image_size
    if size not in cache:
        cache[size] = load_images(store, list(test["key"]), size)
    classes = list(loaded.preprocess.classes)
    unknown = sorted(set(test["label"]) - set(classes))
    if unknown:
        raise ValueError(f"model v{loaded.version} does not know classes {unknown} of the test "
                         "split (the ontology changed): retrain before comparing")
    probs = predict_probs(loaded.model, cache[size], loaded.preprocess)
    labels = test["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    return evaluate_predictions(probs, labels, classes), probs


def _replay(challenger, champion, store, holdout: pd.DataFrame, config: ModelEvaluationConfig,
            event_classes: list[str]) -> tuple[ReplayComparison | None, str]:
    """Both models on the same holdout records (images as the devices shot them)."""
    if champion is None:
        return None, "no champion: nothing to replay against"
    classes = list(challenger.preprocess.classes)
    known = holdout["label"].isin(classes) & holdout["label"].isin(champion.preprocess.classes)
    records = holdout[known].reset_index(drop=True)
    note = f"{int((~known).sum())} holdout records with classes a model lacks left out" \
        if (~known).any() else ""
    probs, cache = {}, {}
    for side, loaded in (("new", challenger), ("old", champion)):
        size = loaded.preprocess.image_size
        if size not in cache:  # decoded once per input size, as for the test split
            cache[size] = load_images(store, list(records["key"]), size)
        out = predict_probs(loaded.model, cache[size], loaded.preprocess)
        order = [list(loaded.preprocess.classes).index(c) for c in classes]
        probs[side] = out[:, order] if len(out) else np.zeros((0, len(classes)))
    labels = records["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=int)
    comparison = compare_on_replay(
        probs["new"], probs["old"], labels, classes, records["cohort"].to_numpy(),
        config.operator(),
        NonInferiority(config.replay_margin, config.replay_alpha, config.replay_min_records),
        [c for c in event_classes if c in classes],
        # the holdout's operator labels were chosen among the champion's own suggestions
        assisted_on=(records["label_source"] == "expert").to_numpy())
    if note:
        comparison.notes.append(note)
    return comparison, ""


def _log_to_mlflow(tracking, run_id: str, prefix: str, evaluation: Evaluation) -> None:
    client = tracking.client()
    for name, value in evaluation.headline().items():
        client.log_metric(run_id, f"{prefix}test_{name}", value)


@asset(group_name="measure", io_manager_key="tables", kinds={"pytorch", "mlflow"},
       # after a new model only: a new dataset version (or replay set) alone waits for
       # retraining_sensor
       automation_condition=AutomationCondition.eager().ignore(
           AssetSelection.assets("dataset_version", "replay_set")),
       check_specs=[AssetCheckSpec(
           GATE_CHECK, asset="model_evaluation", blocking=True,
           description="Non-inferiority: on the test split the challenger's macro-F1 drops at "
                       "most ε and no class's recall more than δ (beyond a noise floor of "
                       "min_net_images); replayed on the production holdout, paired with the "
                       "champion, it is not shown worse (exact McNemar) and, strict, shown "
                       "non-inferior within the margin. The first model passes by definition. "
                       "Failing stops everything downstream.")],
       description="Challenger vs champion on the dataset version's test split (accuracy, "
                   "macro-F1, per-class table, confusion matrix, reliability + ECE, cohorts) "
                   "and replayed on the production holdout (automatic and operator-assisted "
                   "accuracy, per class and cohort, paired tests).")
def model_evaluation(context: AssetExecutionContext, config: ModelEvaluationConfig,
                     trained_model: dict, dataset_version: pd.DataFrame,
                     replay_set: pd.DataFrame, storage: CvopsStorage, mlflow: MlflowTracking,
                     contracts: DataContracts):
    tracking = mlflow.tracking()
    store = storage.store()
    test = dataset_version[dataset_version["split"] == "test"].reset_index(drop=True)
    challenger = tracking.load(version=trained_model["model_version"])
    if challenger is None:
        raise RuntimeError(f"model version {trained_model['model_version']} of "
                           f"{tracking.model_name} is not in the registry at "
                           f"{tracking.tracking_uri}")
    champion = tracking.load(alias="champion")
    cache: dict = {}
    mine, probs = _evaluate(challenger, store, test, cache)
    theirs = _evaluate(champion, store, test, cache)[0] if champion else None
    holdout = replay_set[replay_set["holdout"].astype(bool)] if len(replay_set) else replay_set
    replayed, why_not = _replay(challenger, champion, store, holdout, config,
                                contracts.ontology().event_classes)
    gate = decide(mine, theirs, GateConfig(max_macro_f1_drop=config.max_macro_f1_drop,
                                           max_class_recall_drop=config.max_class_recall_drop,
                                           min_net_images=config.min_net_images,
                                           require_field_evidence=config.require_field_evidence),
                  replayed)
    if champion is None:
        context.log.info("no champion yet: the challenger passes the gate by definition")

    run_id = trained_model["run_id"]
    _log_to_mlflow(tracking, run_id, "", mine)
    if theirs:
        _log_to_mlflow(tracking, run_id, "champion_", theirs)
    labels = test["label"].map({c: i for i, c in enumerate(challenger.preprocess.classes)})
    cohorts = per_cohort(probs, labels.to_numpy(), test[config.cohort_column]) \
        if config.cohort_column in test else pd.DataFrame()
    conf_png = confusion_png(mine.confusion, mine.classes,
                             f"challenger v{challenger.version} on {len(test)} test images")
    rel_png = reliability_png(
        {f"challenger v{challenger.version}": mine.reliability,
         **({f"champion v{champion.version}": theirs.reliability} if theirs else {})},
        {f"challenger v{challenger.version}": mine.ece,
         **({f"champion v{champion.version}": theirs.ece} if theirs else {})})
    files = {"confusion_matrix.png": conf_png, "reliability.png": rel_png,
             "per_class.csv": mine.per_class.to_csv(index=False).encode(),
             "per_cohort.csv": cohorts.to_csv(index=False).encode(),
             "gate.csv": gate.table.to_csv(index=False).encode()}
    replay_meta = {"replay": why_not or "\n".join(replayed.sentences())}
    if replayed is not None:
        files.update({"replay.csv": replayed.table().to_csv(index=False).encode(),
                      "replay_per_class.csv": replayed.per_class.to_csv(index=False).encode(),
                      "replay_per_cohort.csv": replayed.per_cohort.to_csv(index=False).encode()})
        client = tracking.client()
        for outcome in replayed.outcomes:
            name = "replay_" + outcome.metric.split(" (")[0].replace(" ", "_")
            for key, value in (("", outcome.new_accuracy), ("champion_", outcome.old_accuracy)):
                if np.isfinite(value):
                    client.log_metric(run_id, f"{key}{name}", value)
        client.log_metric(run_id, "replay_records", replayed.records)
        replay_meta.update({
            "replay_set": str(replay_set["replay_set"].iloc[0]) if len(replay_set) else "none",
            "replay_records": replayed.records, "replay_verdict": replayed.verdict,
            "replay_paired": MetadataValue.md(markdown_table(replayed.table(), 10)),
            "replay_outcomes": MetadataValue.json(json.loads(
                replayed.table().to_json(orient="records"))),
            "replay_per_class": MetadataValue.md(markdown_table(replayed.per_class, 100)),
            "replay_per_cohort": MetadataValue.md(markdown_table(replayed.per_cohort, 50)),
            "replay_business": MetadataValue.md(markdown_table(replayed.business, 10))})
    tracking.log_files(run_id, "evaluation", files)
    tracking.client().set_model_version_tag(tracking.model_name, challenger.version, "gate",
                                 "passed" if gate.passed else "failed")

    record = {"model_name": tracking.model_name, "challenger_version": challenger.version,
              "champion_version": champion.version if champion else None,
              "run_id": run_id, "dataset_version": trained_model["dataset_version"],
              "test_images": len(test), "challenger": mine.headline(),
              "champion": theirs.headline() if theirs else None,
              "gate_passed": gate.passed, "gate_reasons": gate.reasons,
              "gate_notes": gate.notes,
              "replay": None if replayed is None else replayed.table().to_dict(orient="records")}
    per_class = mine.per_class.round(4)
    yield Output(record, metadata={
        "challenger": f"v{challenger.version}", "champion": f"v{champion.version}" if champion
        else "none yet",
        "test_images": len(test),
        "mlflow_run": MetadataValue.url(tracking.run_url(run_id)),
        "accuracy": round(mine.accuracy, 4), "macro_f1": round(mine.macro_f1, 4),
        "ece": round(mine.ece, 4),
        "per_class": MetadataValue.md(markdown_table(per_class, 100)),
        "per_cohort": MetadataValue.md(markdown_table(cohorts.round(4), 50)),
        "confusion_matrix": MetadataValue.md(md_image(conf_png, "confusion matrix")),
        "reliability": MetadataValue.md(md_image(rel_png, "reliability diagram")),
        # reviewed field images reach the pool through feedback; their share of the test split
        "field_test_images": int(test["source"].str.startswith("feedback/").sum()),
        **replay_meta,
    })
    yield AssetCheckResult(
        check_name=GATE_CHECK, passed=gate.passed, severity=AssetCheckSeverity.ERROR,
        metadata={"first_model": gate.first_model, "decision": "; ".join(gate.reasons),
                  "notes": "; ".join(gate.notes) or "none",
                  **({} if gate.passed else {"first_failure": gate.reasons[0]}),
                  **({"replay_paired": MetadataValue.md(markdown_table(replayed.table(), 10))}
                     if replayed is not None else {}),
                  "side_by_side": MetadataValue.md(markdown_table(gate.table, 100)),
                  "thresholds": MetadataValue.json(json.loads(json.dumps(
                      {"max_macro_f1_drop": config.max_macro_f1_drop,
                       "max_class_recall_drop": config.max_class_recall_drop,
                       "min_net_images": config.min_net_images,
                       "replay_margin": config.replay_margin, "replay_alpha": config.replay_alpha,
                       "replay_min_records": config.replay_min_records,
                       "require_field_evidence": config.require_field_evidence})))})

