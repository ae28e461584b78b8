"""Measure stage: the challenger and the champion on the same test images and, paired, on the
production holdout of the replay set; the gate decides on both."""

import pandas as pd
from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    AssetSelection,
    AutomationCondition,
    Failure,
)
from pydantic import Field

from cvops_pipelines.core.base.handoffs import EvaluationRecord, TrainedModelRecord
from cvops_pipelines.core.build.registry import load, load_version
from cvops_pipelines.core.measure.detection_evaluation import (
    DetectionGateConfig,
)
from cvops_pipelines.core.measure.evaluation import (
    EvaluationPolicy,
)
from cvops_pipelines.core.measure.gate import GateConfig
from cvops_pipelines.core.measure.replay import NonInferiority
from cvops_pipelines.core.tasks import TaskRefused
from cvops_pipelines.core.tasks.common import GATE_CHECK
from cvops_pipelines.defs.loop import PerLoop, loop_asset
from cvops_pipelines.defs.metadata import outputs
from cvops_pipelines.defs.operator import OperatorConfig
from cvops_pipelines.defs.resources import (
    CvopsStorage,
    DataContracts,
    MlflowTracking,
    stage_context,
)


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


@loop_asset(
    group_name="measure",
    io_manager_key="tables",
    dagster_type=EvaluationRecord,
    kinds={"pytorch", "mlflow"},
    # after a new model only: a new dataset version (or replay set) alone waits for
    # retraining_sensor
    automation_condition=PerLoop(
        lambda loop: AutomationCondition.eager().ignore(
            AssetSelection.assets(*loop.asset_keys("dataset_version", "replay_set"))
        )
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
    trained_model: TrainedModelRecord,
    dataset_version: pd.DataFrame,
    replay_set: pd.DataFrame,
    storage: CvopsStorage,
    tracking: MlflowTracking,
    contracts: DataContracts,
):
    ctx = stage_context(context, storage, tracking, contracts, "model_evaluation")
    challenger = load_version(ctx.tracking, trained_model.model_version)
    champion = load(ctx.tracking, alias="champion")
    if champion is None:
        context.log.info("no champion yet: the challenger passes the gate by definition")
    try:
        result = contracts.task().evaluate(
            ctx, challenger, champion, trained_model, dataset_version, replay_set, config
        )
    except TaskRefused as exc:
        raise Failure(str(exc)) from None
    yield from outputs(result)
