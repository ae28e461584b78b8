"""Measure stage: the challenger and the champion on the same test images and, paired, on the
production holdout of the replay set; the gate decides on both."""

import json

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetSelection,
    AutomationCondition,
    MetadataValue,
    Output,
    asset,
)
from pydantic import Field

from cvops_pipelines.core.base.plots import md_image
from cvops_pipelines.core.base.tables import markdown_table
from cvops_pipelines.core.measure.detection_evaluation import (
    DetectionGateConfig,
    evaluate_detector,
    log_detection_evaluation,
)
from cvops_pipelines.core.measure.evaluation import (
    EvaluationPolicy,
    EvaluationReport,
    evaluate_challenger,
    log_evaluation,
)
from cvops_pipelines.core.measure.gate import GateConfig
from cvops_pipelines.core.measure.replay import NonInferiority
from cvops_pipelines.defs.operator import OperatorConfig
from cvops_pipelines.defs.resources import CvopsStorage, DataContracts, MlflowTracking
from cvops_pipelines.edge.wire import FEEDBACK

GATE_CHECK = "challenger_not_worse_than_champion"


class ModelEvaluationConfig(OperatorConfig):
    max_macro_f1_drop: float = Field(0.01, description="Gate ε: macro-F1 may drop this much.")
    max_class_recall_drop: float = Field(
        0.05, description="Gate δ: any class's recall may drop this much."
    )
    min_net_images: int = Field(
        2,
        description="Gate noise floor: a drop worth fewer net test "
        "images than this does not block.",
    )
    cohort_column: str = Field("source", description="Dataset column that defines cohorts.")
    replay_margin: float = Field(
        0.02,
        description="Replay non-inferiority margin: the challenger may be this much less accurate.",
    )
    replay_alpha: float = Field(
        0.05,
        description="One-sided error rate of the gate's exact paired tests: the replay's, and "
        "the test split's check that a drop beyond its limit is more than noise.",
    )
    replay_min_records: int = Field(
        30, description="Fewer holdout records: not enough field data to judge."
    )
    require_field_evidence: bool = Field(
        False,
        description="Pass only a challenger the replay "
        "shows non-inferior (default: refuse one it shows "
        "worse; the paired canary decides the rest).",
    )

    max_map_drop: float = Field(0.02, description="Detection gate: mAP may drop this much.")
    max_class_ap_drop: float = Field(
        0.05, description="Detection gate: any class's AP may drop this much."
    )
    min_class_objects: int = Field(
        5, description="Detection gate: test objects a class needs before its AP can block."
    )

    def detection_gate(self) -> DetectionGateConfig:
        return DetectionGateConfig(
            self.max_map_drop, self.max_class_ap_drop, self.min_class_objects
        )

    def policy(self, event_classes) -> EvaluationPolicy:
        return EvaluationPolicy(
            GateConfig(
                max_macro_f1_drop=self.max_macro_f1_drop,
                max_class_recall_drop=self.max_class_recall_drop,
                require_field_evidence=self.require_field_evidence,
                min_net_images=self.min_net_images,
                alpha=self.replay_alpha,
            ),
            self.operator(),
            NonInferiority(self.replay_margin, self.replay_alpha, self.replay_min_records),
            tuple(event_classes),
            self.cohort_column,
        )


@asset(
    group_name="measure",
    io_manager_key="tables",
    kinds={"pytorch", "mlflow"},
    # after a new model only: a new dataset version (or replay set) alone waits for
    # retraining_sensor
    automation_condition=AutomationCondition.eager().ignore(
        AssetSelection.assets("dataset_version", "replay_set")
    ),
    check_specs=[
        AssetCheckSpec(
            GATE_CHECK,
            asset="model_evaluation",
            blocking=True,
            description="Non-inferiority: on the test split the challenger's macro-F1 drops at "
            "most ε and no class's recall more than δ (beyond a noise floor of "
            "min_net_images); replayed on the production holdout, paired with the "
            "champion, it is not shown worse (exact McNemar) and, strict, shown "
            "non-inferior within the margin. The first model passes by definition. "
            "Failing stops everything downstream.",
        )
    ],
    description="Challenger vs champion on the dataset version's test split (accuracy, "
    "macro-F1, per-class table, confusion matrix, reliability + ECE, cohorts) "
    "and replayed on the production holdout (automatic and operator-assisted "
    "accuracy, per class and cohort, paired tests).",
)
def model_evaluation(
    context: AssetExecutionContext,
    config: ModelEvaluationConfig,
    trained_model: dict,
    dataset_version: pd.DataFrame,
    replay_set: pd.DataFrame,
    storage: CvopsStorage,
    tracking: MlflowTracking,
    contracts: DataContracts,
):
    mlflow = tracking.open()
    challenger = mlflow.load_version(trained_model["model_version"])
    champion = mlflow.load(alias="champion")
    if champion is None:
        context.log.info("no champion yet: the challenger passes the gate by definition")
    if trained_model.get("task") == "detection":
        yield from _evaluate_detector(
            challenger,
            champion,
            trained_model,
            dataset_version,
            replay_set,
            storage,
            mlflow,
            config,
        )
        return
    report = evaluate_challenger(
        challenger,
        champion,
        storage.store(),
        dataset_version,
        replay_set,
        config.policy(contracts.ontology().event_classes),
    )
    log_evaluation(mlflow, trained_model["run_id"], report)
    record = report.record(
        mlflow.model_name, trained_model["run_id"], trained_model["dataset_version"]
    )
    replay_set_version = str(replay_set["replay_set"].iloc[0]) if len(replay_set) else "none"
    yield Output(
        record,
        metadata={
            **_evaluation_metadata(report),
            **_replay_metadata(report, replay_set_version),
            "mlflow_run": MetadataValue.url(mlflow.run_url(trained_model["run_id"])),
        },
    )
    yield _gate_check(report, config)


def _evaluate_detector(challenger, champion, trained_model, rows, replay, storage, mlflow, config):
    rule = NonInferiority(config.replay_margin, config.replay_alpha, config.replay_min_records)
    evaluation = evaluate_detector(
        challenger,
        champion,
        storage.store(),
        rows,
        config.detection_gate(),
        replay=replay,
        rule=rule,
    )
    log_detection_evaluation(mlflow, trained_model["run_id"], evaluation)
    record = evaluation.record(
        mlflow.model_name, trained_model["run_id"], trained_model["dataset_version"]
    )
    gate = evaluation.gate
    yield Output(
        record,
        metadata={
            "challenger": f"v{evaluation.challenger_version}",
            "champion": f"v{evaluation.champion_version}"
            if evaluation.champion_version
            else "none yet",
            "test_images": evaluation.test_images,
            "map": round(evaluation.mine.map, 4),
            "map_50": round(evaluation.mine.map_50, 4),
            "per_class": MetadataValue.md(markdown_table(evaluation.per_class, 100)),
            "precision_recall": MetadataValue.md(
                md_image(evaluation.pr_png, "precision-recall at IoU 0.5")
            ),
            "examples": MetadataValue.md(
                md_image(evaluation.examples_png, "true boxes (green) and predicted (red)")
            ),
            "mlflow_run": MetadataValue.url(mlflow.run_url(trained_model["run_id"])),
        },
    )
    thresholds = config.model_dump(
        include={
            "max_map_drop",
            "max_class_ap_drop",
            "min_class_objects",
            "replay_margin",
            "replay_alpha",
            "replay_min_records",
        }
    )
    replay = (
        {
            "replay_paired": MetadataValue.md(
                markdown_table(pd.DataFrame([evaluation.replayed.as_row()]), 5)
            )
        }
        if evaluation.replayed is not None
        else {}
    )
    yield _gate_result(gate, evaluation.per_class, thresholds, replay)


def _evaluation_metadata(report: EvaluationReport) -> dict:
    mine, test = report.mine, report.test
    return {
        "challenger": f"v{report.challenger.version}",
        "champion": f"v{report.champion.version}" if report.champion else "none yet",
        "test_images": len(test),
        "accuracy": round(mine.accuracy, 4),
        "macro_f1": round(mine.macro_f1, 4),
        "ece": round(mine.ece, 4),
        "per_class": MetadataValue.md(markdown_table(mine.per_class.round(4), 100)),
        "per_cohort": MetadataValue.md(markdown_table(report.cohorts.round(4), 50)),
        "confusion_matrix": MetadataValue.md(md_image(report.confusion_png, "confusion matrix")),
        "reliability": MetadataValue.md(md_image(report.reliability_png, "reliability diagram")),
        **(
            {
                "saliency": MetadataValue.md(
                    md_image(report.saliency_png, "Grad-CAM of wrong and unsure test answers")
                )
            }
            if report.saliency_png
            else {}
        ),
        # reviewed field images reach the pool through feedback; their share of the test split
        "field_test_images": int(test["source"].str.startswith(FEEDBACK).sum()),
    }


def _replay_metadata(report: EvaluationReport, replay_set_version: str) -> dict:
    replayed = report.replayed
    meta = {"replay": report.replay_summary()}
    if replayed is not None:
        meta.update(
            {
                "replay_set": replay_set_version,
                "replay_records": replayed.records,
                "replay_verdict": replayed.verdict,
                "replay_paired": MetadataValue.md(markdown_table(replayed.table(), 10)),
                "replay_outcomes": MetadataValue.json(
                    json.loads(replayed.table().to_json(orient="records"))
                ),
                "replay_per_class": MetadataValue.md(markdown_table(replayed.per_class, 100)),
                "replay_per_cohort": MetadataValue.md(markdown_table(replayed.per_cohort, 50)),
                "replay_business": MetadataValue.md(markdown_table(replayed.business, 10)),
            }
        )
    return meta


def _gate_check(report: EvaluationReport, config: ModelEvaluationConfig) -> AssetCheckResult:
    gate = report.gate
    thresholds = config.model_dump(
        include={
            "max_macro_f1_drop",
            "max_class_recall_drop",
            "min_net_images",
            "replay_margin",
            "replay_alpha",
            "replay_min_records",
            "require_field_evidence",
        }
    )
    replay = (
        {"replay_paired": MetadataValue.md(markdown_table(report.replayed.table(), 10))}
        if report.replayed is not None
        else {}
    )
    return _gate_result(gate, gate.table, thresholds, replay)


def _gate_result(gate, side_by_side, thresholds: dict, extra: dict | None = None):
    """The gate's check, one shape for both tasks: its decision, the numbers it read, its
    thresholds."""
    return AssetCheckResult(
        check_name=GATE_CHECK,
        passed=gate.passed,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "first_model": gate.first_model,
            "decision": "; ".join(gate.reasons),
            "notes": "; ".join(gate.notes) or "none",
            **({} if gate.passed else {"first_failure": gate.reasons[0]}),
            **(extra or {}),
            "side_by_side": MetadataValue.md(markdown_table(side_by_side, 100)),
            "thresholds": MetadataValue.json(thresholds),
        },
    )
