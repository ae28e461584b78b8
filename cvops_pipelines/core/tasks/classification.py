"""Classification: one class per image. Each stage's piece, from the stage modules that hold
the logic (core/<stage>/)."""

from __future__ import annotations

import json

import pandas as pd

from cvops_pipelines.core.base.handoffs import TrainedModelRecord
from cvops_pipelines.core.base.report import Json, Link, Plot, StageResult, Table
from cvops_pipelines.core.base.tables import PartitionedTable
from cvops_pipelines.core.base.tracking import TrackingUnavailable
from cvops_pipelines.core.build.registry import load
from cvops_pipelines.core.build.run import dataset_classes, train_in_process, train_tracked
from cvops_pipelines.core.build.ssl_run import current_encoder, finetuned_scorer, learned_embeddings
from cvops_pipelines.core.build.training import TrainConfig
from cvops_pipelines.core.curate.dataset import images_trained_on
from cvops_pipelines.core.curate.label_qa import LabelQAConfig, review_label_quality, write_review
from cvops_pipelines.core.curate.neardup import NearDupConfig
from cvops_pipelines.core.curate.pool import build_labeled_pool
from cvops_pipelines.core.learn.active import QueuePolicy, expert_labeled, publish_queue
from cvops_pipelines.core.learn.active import annotation_queue as build_queue
from cvops_pipelines.core.learn.feedback_query import queue_candidates
from cvops_pipelines.core.learn.production import production_report
from cvops_pipelines.core.learn.production_state import stored_state
from cvops_pipelines.core.learn.retraining import AlertFacts, write_facts
from cvops_pipelines.core.measure.evaluation import (
    EvaluationReport,
    evaluate_challenger,
    log_evaluation,
)
from cvops_pipelines.core.measure.saliency import explain, saliency_metadata, write_overlays
from cvops_pipelines.core.ship.canary import replay_classifiers
from cvops_pipelines.core.ship.onnx_model import export_model
from cvops_pipelines.core.tasks.common import absorb_new, field_checks, gate_check, queue_metadata
from cvops_pipelines.core.tasks.task import StageContext, Task
from cvops_pipelines.edge.wire import FEEDBACK


class Classification(Task):
    name = "classification"
    labels = "class"
    model_name = "cvops-classifier"

    def pool(self, raw_images: pd.DataFrame, annotations: pd.DataFrame) -> StageResult:
        pool = build_labeled_pool(raw_images, annotations)
        per_class = pool.groupby("label").size().rename("images").reset_index()
        return StageResult(pool, {"images_per_class": Table(per_class)})

    def label_issues(self, ctx: StageContext, pool: pd.DataFrame, settings) -> StageResult:
        """Every candidate scorer (thumbnails, the SSL encoder's and the champion's embeddings,
        optionally fine-tuned folds) scores the pool out of fold; labels are flagged only when
        the best of them agrees with enough labels to judge. Without the tracking server:
        thumbnails only, no overlays."""
        qa = LabelQAConfig(
            settings.folds,
            settings.neighbors,
            settings.seed,
            neardup=NearDupConfig(settings.max_hamming, settings.max_mad),
            min_scorer_accuracy=settings.min_scorer_accuracy,
        )
        store, mlflow = ctx.store, ctx.tracking
        try:
            if mlflow is None:
                raise TrackingUnavailable("no tracking server configured")
            mlflow.check()
            champion = load(mlflow, alias="champion")
        except TrackingUnavailable as exc:
            ctx.warn(f"{exc}; label QA scores with the thumbnails only, no overlays")
            champion, mlflow = None, None
        finetune = settings.finetune_scorer != "never"
        wanted = mlflow is not None and (settings.learned_features or finetune)
        encoder = current_encoder(mlflow) if wanted else None
        embeddings, scorers = {}, {}
        if settings.learned_features and mlflow is not None:
            seen = images_trained_on(mlflow, store, champion) if champion else set()
            embeddings = learned_embeddings(encoder, champion, store, pool, ctx.log, seen)
        if finetune:
            budget = settings.finetune_budget_minutes * 60 or None
            epochs = settings.finetune_epochs or None
            scorers = finetuned_scorer(encoder, store, pool, ctx.log, epochs, budget)
        always = settings.finetune_scorer == "always"
        result = review_label_quality(
            pool, qa, embeddings, scorers if always else {}, {} if always else scorers
        )
        if result.escalated:
            ctx.log(f"label QA escalated to the fine-tuned scorer: {result.escalated}")
        if result.unscored_reason:
            ctx.warn(result.unscored_reason)
        prefix = f"reports/label_issues/{ctx.run_id}"
        explained = []
        if champion is not None and len(result.review):
            shown = result.review.head(settings.max_overlays)
            keys = pool.set_index("image_id").loc[shown["image_id"], "key"]
            explained = [  # captions a reviewer reads: the given label first
                (image, heat, f"given {label} · {said}")
                for (image, heat, said), label in zip(
                    explain(champion, store, list(keys)), shown["label"]
                )
            ]
            written = write_overlays(
                store, f"{prefix}/saliency", list(shown["image_id"]), explained
            )
            result.review["saliency"] = result.review["image_id"].map(
                {i: store.uri(k) for i, k in written.items()}
            )
        classes = sorted(pool["label"].unique())
        png, uris = write_review(store, prefix, result, classes)
        return StageResult(
            result.review,
            {
                **_label_issues_metadata(result, png, uris),
                **saliency_metadata(explained, champion, "suspects"),
            },
        )

    hyperparameters = TrainConfig
    classes = staticmethod(dataset_classes)
    fit = staticmethod(train_in_process)

    def quick(self, epochs: int) -> dict:
        return {"epochs": epochs}

    def train(self, ctx: StageContext, dataset: pd.DataFrame, settings, trainer=None):
        runner, params = trainer or (train_in_process, {})
        return train_tracked(
            ctx.tracking,
            ctx.store,
            dataset,
            settings.train_config(),
            settings.plan(),
            ctx.tags,
            ctx.log,
            runner,
            params,
        )

    def evaluate(
        self, ctx, challenger, champion, trained: TrainedModelRecord, dataset, replay, settings
    ) -> StageResult:
        mlflow = ctx.tracking
        report = evaluate_challenger(
            challenger,
            champion,
            ctx.store,
            dataset,
            replay,
            settings.policy(ctx.ontology.event_classes),
        )
        log_evaluation(mlflow, trained.run_id, report)
        record = report.record(self.name, mlflow.model_name, trained)
        replay_version = str(replay["replay_set"].iloc[0]) if len(replay) else "none"
        thresholds = settings.model_dump(
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
        extra = (
            {"replay_paired": Table(report.replayed.table(), 10)}
            if report.replayed is not None
            else {}
        )
        return StageResult(
            record,
            {
                **_evaluation_metadata(report),
                **_replay_metadata(report, replay_version),
                "mlflow_run": Link(mlflow.run_url(trained.run_id)),
            },
            [gate_check(report.gate, thresholds, extra)],
        )

    def export(self, ctx: StageContext, loaded, dataset: pd.DataFrame, policy):
        return export_model(loaded, dataset, ctx.store, ctx.tracking, policy, ctx.tags, ctx.log)

    canary_replay = staticmethod(replay_classifiers)

    def production(
        self, ctx: StageContext, feedback: PartitionedTable, releases, settings
    ) -> StageResult:
        """Incremental: absorbs only the batches the stored state has not seen."""
        store, policy = ctx.store, settings.policy()
        with stored_state(store, policy.period, policy.drift_window) as state:
            absorbed = absorb_new(ctx, state, feedback, settings.rebuild_state)
            report = production_report(store, state, policy, releases)
        csv_uri = report.save(store)
        write_facts(store, AlertFacts(report.alerts(policy)))  # what retraining_sensor reads
        return StageResult(
            report.summary(policy),
            {**_production_metadata(report, csv_uri), **absorbed},
            field_checks(
                report,
                policy,
                report.sla,
                {"min_accuracy": policy.min_accuracy, "min_reviewed": policy.min_reviewed},
                {"alpha": policy.drift_alpha, "window": policy.drift_window},
            ),
        )

    def queue(self, ctx: StageContext, feedback, pool: pd.DataFrame, settings) -> StageResult:
        store = ctx.store
        experts = expert_labeled(pool)
        records = queue_candidates(feedback, experts)
        queue = build_queue(
            records,
            experts,
            QueuePolicy(
                settings.size, settings.diversity_decay, settings.max_hamming,
                settings.explore_share,
            ),
        )  # fmt: skip
        champion = load(ctx.tracking, alias="champion")
        explained = explain(champion, store, list(queue["key"])) if champion and len(queue) else []
        explained = [  # captions a reviewer reads: the queue's rank and reason first
            (image, heat, f"#{rank} {reason} · {said}")
            for (image, heat, said), rank, reason in zip(explained, queue["rank"], queue["reason"])
        ]
        queue_id, prefix = publish_queue(store, queue, ctx.ontology.names, explained)
        pairs = queue.groupby(["predicted", "second"]).size().sort_values(ascending=False)
        columns = ["rank", "reason", "score", "predicted", "second", "corrected_label"]
        return StageResult(
            queue.assign(queue_id=queue_id),
            {
                **queue_metadata(queue, queue_id, prefix, store, experts, columns),
                "distinct_class_pairs": len(pairs),
                "largest_pair_share": round(float(pairs.iloc[0] / len(queue)), 3)
                if len(queue)
                else 0.0,
                **saliency_metadata(explained, champion, "queued images"),
            },
        )


def _label_issues_metadata(result, png: bytes, uris: dict[str, str]) -> dict:
    review = result.review
    reasons = (
        review["reasons"].str.split(";").explode().value_counts().to_dict() if len(review) else {}
    )
    noise = result.noise_per_class.assign(
        estimated_noise_rate=lambda d: (d["estimated_noise_rate"] * 100).round(1)
    )
    columns = ["image_id", "label", "suggested_label", "severity", "reasons", "details"]
    return {
        "suspects": len(review),
        "scored_images": result.scored,
        "scorer": result.scorer or "none (too few labels per class)",
        "scorer_rule": "every candidate scores the pool out of fold; each image is scored by "
        "the one that agrees most with the given labels among those allowed to judge it (a "
        "champion not on its own training images); labels are flagged only if the result "
        "reaches min_scorer_accuracy",
        "scorer_candidates_oof_accuracy": Json(
            {k: round(v, 4) for k, v in result.candidates.items()}
        ),
        "scorer_oof_accuracy": round(result.scorer_accuracy, 4)
        if result.scorer_accuracy is not None
        else "not scored",
        "scorer_judges": result.judged,
        "escalated_to_finetuned_scorer": result.escalated or "no",
        **({"scorer_note": result.unscored_reason} if result.unscored_reason else {}),
        "suspects_by_reason": Json(reasons),
        "top_suspects": Table(review[columns], 15),
        "confused_pairs": Table(result.confused_pairs, 10),
        "noise_per_class_percent": Table(noise, 100),
        "annotators": Table(result.annotators, 50),
        "plot": Plot(png, "confused class pairs and noise per class"),
        "review_csv": Link(uris["review.csv"]),
        "labelstudio_import": Link(uris["labelstudio_tasks.json"]),
        "labelstudio_config": Link(uris["labelstudio_config.xml"]),
    }


def _evaluation_metadata(report: EvaluationReport) -> dict:
    mine, test = report.mine, report.test
    return {
        "challenger": f"v{report.challenger.version}",
        "champion": f"v{report.champion.version}" if report.champion else "none yet",
        "test_images": len(test),
        "accuracy": round(mine.accuracy, 4),
        "macro_f1": round(mine.macro_f1, 4),
        "ece": round(mine.ece, 4),
        "per_class": Table(mine.per_class.round(4), 100),
        "per_cohort": Table(report.cohorts.round(4), 50),
        "confusion_matrix": Plot(report.confusion_png, "confusion matrix"),
        "reliability": Plot(report.reliability_png, "reliability diagram"),
        **(
            {"saliency": Plot(report.saliency_png, "Grad-CAM of wrong and unsure test answers")}
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
                "replay_paired": Table(replayed.table(), 10),
                "replay_outcomes": Json(json.loads(replayed.table().to_json(orient="records"))),
                "replay_per_class": Table(replayed.per_class, 100),
                "replay_per_cohort": Table(replayed.per_cohort, 50),
                "replay_business": Table(replayed.business, 10),
            }
        )
    return meta


def _production_metadata(report, csv_uri: str) -> dict:
    summary = report.summary()
    return {
        "records": summary["records"],
        "reviewed": summary["reviewed"],
        "coverage": round(summary["reviewed"] / max(1, summary["records"]), 4),
        "pending_corrections": summary["pending_corrections"],
        "sla_ok": report.sla_ok,
        "drift_flagged": report.drift_flagged,
        "missed_event_share": report.business["missed_event_share"],
        "accuracy_by_release_cohort_period": Table(report.table, 50),
        "per_release": Table(report.per_release, 20),
        "devices": Table(report.devices, 50),  # frames predicted vs images kept vs reviewed
        "accuracy_by_release": Json(
            {
                r["release"]: {k: r[k] for k in ("records", "reviewed", "coverage", "accuracy")}
                for r in summary["per_release"]
            }
        ),
        "business": Json(report.business),
        "plot": Plot(report.plot, "field accuracy and output drift"),
        "accuracy_csv": Link(csv_uri),
    }


CLASSIFICATION = Classification()
