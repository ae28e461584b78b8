"""Detection: a set of boxes per image (an image annotated as empty is a negative). Each stage's
piece, from the stage modules that hold the logic (core/<stage>/)."""

from __future__ import annotations

import pandas as pd

from cvops_pipelines.core.base.handoffs import TrainedModelRecord
from cvops_pipelines.core.base.ontology import NO_OBJECTS
from cvops_pipelines.core.base.report import Json, Link, Plot, StageResult, Table
from cvops_pipelines.core.build.detection_run import (
    detection_classes,
    reviewer_predictions,
    train_detector_in_process,
    train_detector_tracked,
)
from cvops_pipelines.core.build.detection_training import DetectorConfig
from cvops_pipelines.core.curate.detection_label_qa import (
    BoxQAConfig,
    image_review,
    review_boxes,
    reviewer_agreement,
    write_box_review,
)
from cvops_pipelines.core.curate.detection_pool import box_rows, build_box_pool
from cvops_pipelines.core.learn.active import expert_labeled
from cvops_pipelines.core.learn.detection_active import detection_queue, publish_detection_queue
from cvops_pipelines.core.learn.detection_production import answer_thresholds, release_threshold
from cvops_pipelines.core.learn.detection_production_state import stored_detection_state
from cvops_pipelines.core.learn.feedback_query import queue_candidates
from cvops_pipelines.core.learn.retraining import AlertFacts, write_facts
from cvops_pipelines.core.measure.detection_evaluation import (
    evaluate_detector,
    log_detection_evaluation,
)
from cvops_pipelines.core.measure.replay import NonInferiority
from cvops_pipelines.core.ship.detection_canary import replay_detectors
from cvops_pipelines.core.ship.detection_onnx_model import export_detector_model
from cvops_pipelines.core.tasks.classification import CLASSIFICATION
from cvops_pipelines.core.tasks.common import absorb_new, field_checks, gate_check, queue_metadata
from cvops_pipelines.core.tasks.task import StageContext, Task


class Detection(Task):
    name = "detection"
    labels = "boxes"
    model_name = "cvops-detector"

    def pool(self, raw_images: pd.DataFrame, annotations: pd.DataFrame) -> StageResult:
        pool = build_box_pool(raw_images, annotations)
        per_class = box_rows(pool).groupby("label").size().rename("boxes").reset_index()
        return StageResult(
            pool,
            {
                "boxes": int(pool["n_boxes"].sum()),
                "images_without_objects": int((pool["label"] == NO_OBJECTS).sum()),
                "images_per_class": Table(per_class),
            },
        )

    def label_issues(self, ctx: StageContext, pool: pd.DataFrame, settings) -> StageResult:
        """Model-free checks (duplicates, annotator disagreement), and, with a registered
        detector (`settings.reviewer`), its boxes on images it did not train on."""
        store = ctx.store
        predictions, operating_point = reviewer_predictions(
            ctx.tracking, store, pool, settings.reviewer, ctx.log
        )
        qa = BoxQAConfig(
            match_iou=settings.box_match_iou,
            min_overlap=settings.box_min_overlap,
            duplicate_iou=settings.box_duplicate_iou,
            min_reviewer_f1=settings.min_reviewer_f1,
        )
        score = settings.box_min_score if settings.box_min_score is not None else operating_point
        qa = qa.at(score) if score is not None else qa
        agreement = reviewer_agreement(pool, predictions, qa) if predictions else None
        if agreement is not None and not agreement.can_judge:
            ctx.warn(agreement.why_not())
        judged = predictions if agreement is not None and agreement.can_judge else None
        issues = review_boxes(pool, judged, qa)
        classes = sorted(box_rows(pool)["label"].unique())
        uris = write_box_review(store, f"reports/label_issues/{ctx.run_id}", issues, pool, classes)
        review = image_review(issues, pool)
        return StageResult(
            review,
            {
                "suspects": len(review),
                "box_issues": len(issues),
                "scored_images": len(predictions),
                "reviewer": _reviewer(settings.reviewer, qa, agreement),
                "issues_by_type": Json(issues["issue"].value_counts().to_dict()),
                "top_issues": Table(issues, 15),
                "box_issues_csv": Link(uris["box_issues.csv"]),
                "labelstudio_import": Link(uris["labelstudio_tasks.json"]),
                "labelstudio_config": Link(uris["labelstudio_config.xml"]),
            },
        )

    hyperparameters = DetectorConfig
    classes = staticmethod(detection_classes)
    fit = staticmethod(train_detector_in_process)

    def quick(self, epochs: int) -> dict:
        return {"detector": {"epochs": epochs}}

    def train(self, ctx: StageContext, dataset: pd.DataFrame, settings, trainer=None):
        runner, params = trainer or (train_detector_in_process, {})
        return train_detector_tracked(
            ctx.tracking,
            ctx.store,
            dataset,
            settings.detector_config(),
            settings.plan(),
            ctx.tags,
            ctx.log,
            runner,
            params,
        )

    def evaluate(
        self, ctx, challenger, champion, trained: TrainedModelRecord, dataset, replay, settings
    ) -> StageResult:
        if settings.require_field_evidence:
            raise self.refuse(
                "require_field_evidence is a classifier gate setting; the detector gate refuses "
                "a challenger the replay shows worse and leaves the rest to the paired canary"
            )
        mlflow = ctx.tracking
        rule = NonInferiority(
            settings.replay_margin, settings.replay_alpha, settings.replay_min_records
        )
        evaluation = evaluate_detector(
            challenger,
            champion,
            ctx.store,
            dataset,
            settings.detection_gate(),
            replay=replay,
            rule=rule,
        )
        log_detection_evaluation(mlflow, trained.run_id, evaluation)
        record = evaluation.record(self.name, mlflow.model_name, trained)
        thresholds = settings.model_dump(
            include={
                "max_map_drop",
                "max_class_ap_drop",
                "min_class_objects",
                "replay_margin",
                "replay_alpha",
                "replay_min_records",
            }
        )
        extra = (
            {"replay_paired": Table(pd.DataFrame([evaluation.replayed.as_row()]), 5)}
            if evaluation.replayed is not None
            else {}
        )
        champion_version = evaluation.champion_version
        return StageResult(
            record,
            {
                "challenger": f"v{evaluation.challenger_version}",
                "champion": f"v{champion_version}" if champion_version else "none yet",
                "test_images": evaluation.test_images,
                "map": round(evaluation.mine.map, 4),
                "map_50": round(evaluation.mine.map_50, 4),
                "per_class": Table(evaluation.per_class, 100),
                "precision_recall": Plot(evaluation.pr_png, "precision-recall at IoU 0.5"),
                "examples": Plot(evaluation.examples_png, "true boxes (green) and predicted (red)"),
                "mlflow_run": Link(mlflow.run_url(trained.run_id)),
            },
            [gate_check(evaluation.gate, thresholds, extra)],
        )

    def export(self, ctx: StageContext, loaded, dataset: pd.DataFrame, policy):
        return export_detector_model(
            loaded, dataset, ctx.store, ctx.tracking, policy, ctx.tags, ctx.log
        )

    canary_replay = staticmethod(replay_detectors)

    def production(self, ctx: StageContext, feedback, releases, settings) -> StageResult:
        """Precision and recall at IoU 0.5 on reviewed frames, per release and cohort, and box
        output drift. Incremental: absorbs only the batches the stored state has not seen.
        Before any detector answered, the image-level report."""
        policy, store = settings.detection_policy(), ctx.store
        with stored_detection_state(store, policy, release_threshold(store)) as state:
            absorbed = absorb_new(ctx, state, feedback, settings.rebuild_state)
            frames = state.frames()
            report = state.report() if frames else None
        if not frames:
            return CLASSIFICATION.production(ctx, feedback, releases, settings)
        write_facts(store, AlertFacts(report.alerts(policy)))  # what retraining_sensor reads
        summary = report.summary(policy)
        return StageResult(
            summary,
            {
                **absorbed,
                "records": summary["records"],
                "reviewed": summary["reviewed"],
                "coverage": round(summary["reviewed"] / max(1, summary["records"]), 4),
                "precision_recall_by_release_cohort": Table(report.table, 50),
                "per_release": Table(report.per_release, 20),
                "drift": Table(report.drift, 20),
                "devices": Table(report.devices, 50),  # frames answered vs kept vs reviewed
            },
            field_checks(
                report,
                policy,
                report.per_release,
                {
                    "min_precision_50": policy.min_precision,
                    "min_recall_50": policy.min_recall,
                    "min_reviewed": policy.min_reviewed,
                },
                {"alpha": policy.alpha, "window": policy.window},
            ),
        )

    def queue(self, ctx: StageContext, feedback, pool: pd.DataFrame, settings) -> StageResult:
        """Frames to review, most uncertain first; before any detector answered, the
        image-level queue."""
        experts = expert_labeled(pool)
        records = queue_candidates(feedback, experts)
        if not (len(records) and records["boxes"].notna().any()):
            return CLASSIFICATION.queue(ctx, feedback, pool, settings)
        store = ctx.store
        thresholds = answer_thresholds(store, records["release"])
        queue = detection_queue(
            records, experts, settings.size, settings.explore_share, thresholds=thresholds
        )
        queue_id, prefix = publish_detection_queue(store, queue, ctx.ontology.names)
        columns = ["rank", "reason", "score", "why", "predicted"]
        return StageResult(
            queue.assign(queue_id=queue_id),
            queue_metadata(queue, queue_id, prefix, store, experts, columns),
        )


def _reviewer(name: str, qa: BoxQAConfig, agreement) -> str:
    if agreement is None:
        return "none yet (model-free checks only)"
    if not agreement.can_judge:
        return f"{name}: {agreement.why_not()}"
    return (
        f"{name} (boxes from score {qa.overlooked_score}; agrees with the given boxes at F1 "
        f"{agreement.f1:.3f} on {agreement.images} images)"
    )


DETECTION = Detection()
