"""Learn stage: field feedback in, production metrics and drift, what to annotate next, and
whether the ontology still fits."""

from pathlib import Path

import pandas as pd
from dagster import (
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    BackfillPolicy,
    Config,
    MetadataValue,
    Output,
)
from pydantic import Field

from cvops_pipelines import settings
from cvops_pipelines.core.base.contracts import validate
from cvops_pipelines.core.base.ledger import instance_ledger
from cvops_pipelines.core.base.plots import md_image, ontology_png
from cvops_pipelines.core.base.tables import PartitionedTable, markdown_table
from cvops_pipelines.core.curate.neardup import NearDupConfig
from cvops_pipelines.core.learn.detection_production import DetectionPolicy
from cvops_pipelines.core.learn.enrolment import read_register
from cvops_pipelines.core.learn.feedback import vet_batches
from cvops_pipelines.core.learn.feedback_query import predictions
from cvops_pipelines.core.learn.ontology_report import OntologyPolicy
from cvops_pipelines.core.learn.ontology_report import ontology_report as build_report
from cvops_pipelines.core.learn.production import ProductionPolicy
from cvops_pipelines.core.ship.release import ReleaseStore, release_public_keys
from cvops_pipelines.defs.contract_checks import check_result, contract_check_result, contract_spec
from cvops_pipelines.defs.loop import FEEDBACK_BATCHES, loop_asset
from cvops_pipelines.defs.metadata import output, outputs
from cvops_pipelines.defs.resources import (
    AnnotationBackend,
    CvopsStorage,
    DataContracts,
    MlflowTracking,
    stage_context,
)

WARN = AssetCheckSeverity.WARN
FEEDBACK_CONTRACT = contract_spec(
    "feedback",
    what="Schema, published release, known classes, "
    "confidence in [0, 1]; a failing batch is "
    "quarantined whole.",
)


class FeedbackConfig(Config):
    signing_key: str = Field(
        "",
        description="Release private key whose signature makes a device enrolment valid; "
        "default CVOPS_SIGNING_KEY or $CVOPS_HOME/keys/release_signing.key.",
    )


@loop_asset(
    group_name="learn",
    partitions_def=FEEDBACK_BATCHES,
    io_manager_key="tables",
    backfill_policy=BackfillPolicy.single_run(),
    check_specs=[
        FEEDBACK_CONTRACT,
        AssetCheckSpec(
            "no_quarantined_batches",
            asset="feedback",
            description="Warns with the reason when a batch of the run was quarantined whole "
            "(the accepted ones go on).",
        ),
    ],
    kinds={"python", "parquet"},
    description="One uploaded feedback batch, signed by an enrolled device: records "
    "(prediction, confidence, top-k, the operator's correction) with their images stored "
    "content-addressed. A run may cover many batches; a bad batch, or one that speaks for "
    "another device, is quarantined whole, with the reason.",
)
def feedback(
    context: AssetExecutionContext,
    config: FeedbackConfig,
    storage: CvopsStorage,
    contracts: DataContracts,
):
    store = storage.store()
    register = read_register(
        store,
        release_public_keys(Path(config.signing_key or settings.signing_key_path())),
        instance_ledger(context.instance, store),  # a replayed older enrolment is refused
    )
    for problem in register.problems:
        context.log.warning(f"device enrolment refused: {problem}")
    # a detector answers "" for a frame where it finds nothing; an operator, for an empty one
    classes = contracts.ontology().image_labels
    params = {"known_releases": ReleaseStore(store).ids(), "classes": classes}
    docs = store if contracts.build_docs else None

    def check(records: pd.DataFrame, label: str | None):  # label None: a culprit hunt, no docs
        return validate(
            records,
            contracts.suite("feedback"),
            params,
            docs if label is not None else None,
            f"feedback-{context.run.run_id[:8]}{label or ''}",
        )

    vetted = vet_batches(store, list(context.partition_keys), params["classes"], check, register)
    _log_refusals(context.log, vetted)
    out, quarantined = vetted.frames, vetted.quarantined
    quarantine = MetadataValue.md(markdown_table(quarantined, 20))
    yield Output(
        out if len(out) > 1 else out[context.partition_keys[0]],
        metadata={
            **vetted.summary(),
            "enrolled_devices": len(register.keys),
            "quarantine": quarantine,
        },
    )
    yield contract_check_result("feedback", vetted.contract)  # on the accepted: it gates the pool
    first = quarantined.iloc[0] if len(quarantined) else None
    why = None if first is None else f"batch {first.batch_id}: {first.reason_code}: {first.reason}"
    yield check_result("no_quarantined_batches", why, WARN, quarantined_batches=len(quarantined))


def _log_refusals(log, vetted) -> None:
    for row in vetted.quarantined.itertuples():
        log.error(
            f"feedback batch {row.batch_id} quarantined whole: {row.reason_code}: {row.reason}"
        )
    for row in vetted.refused_records.itertuples():
        log.warning(
            f"record {row.record_id} of batch {row.batch_id} turned away alone: "
            f"{row.reason_code}: {row.reason}"
        )


class ProductionMetricsConfig(Config):
    period: str = Field("1D", description="Reporting period (pandas frequency: 1h, 1D, 7D, ...).")
    min_accuracy: float = Field(0.97, description="SLA: accuracy on reviewed field records.")
    min_reviewed: int = Field(
        30, description="Reviewed records a live release needs before the SLA judges it."
    )
    drift_window: int = Field(48, description="Latest records per live release tested for drift.")
    drift_alpha: float = Field(0.05, description="Family-wise false-alarm rate per window.")
    reference_images: int = Field(
        300,
        description="Held-out images of the release's dataset version used as the drift reference.",
    )
    event_classes: list[str] = Field(
        default_factory=list,
        description="Classes that are 'events' for the business metrics; empty = every class.",
    )
    rebuild_state: bool = Field(
        False,
        description="Forget the absorbed feedback and rebuild the production state from every "
        "batch (it rebuilds by itself when the period or the drift window changes).",
    )

    min_precision_50: float = Field(
        0.5, description="Detection SLA: precision at IoU 0.5 on reviewed frames."
    )
    min_recall_50: float = Field(
        0.5, description="Detection SLA: recall at IoU 0.5 on reviewed frames."
    )
    min_box_score: float = Field(
        0.5,
        description="Detection: a device box at this score or more counts as an answer, for "
        "a release whose spec names no answer_threshold of its own.",
    )

    def detection_policy(self) -> DetectionPolicy:
        return DetectionPolicy(
            self.min_box_score,
            0.5,
            self.min_precision_50,
            self.min_recall_50,
            self.min_reviewed,
            self.drift_window,
            self.drift_alpha,
        )

    def policy(self) -> ProductionPolicy:
        return ProductionPolicy(
            self.period,
            self.min_accuracy,
            self.min_reviewed,
            self.drift_window,
            self.drift_alpha,
            self.reference_images,
            tuple(self.event_classes),
        )


@loop_asset(
    group_name="learn",
    io_manager_key="tables",
    kinds={"python"},
    check_specs=[
        AssetCheckSpec(
            "accuracy_sla",
            asset="production_metrics",
            description="Every live release meets the accuracy SLA on reviewed "
            "field records (once it has min_reviewed of them).",
        ),
        AssetCheckSpec(
            "no_output_drift",
            asset="production_metrics",
            description="The latest window of each live release's predictions "
            "matches the training reference (BBSD two-sample tests).",
        ),
    ],
    description="Accuracy from corrective feedback per release x cohort x period (with "
    "coverage), business metrics, and drift of the model's outputs against its "
    "training reference. Incremental: each run absorbs only the feedback batches it has not "
    "seen into a state kept in the store, so its cost follows the new batches, not the backlog.",
)
def production_metrics(
    context: AssetExecutionContext,
    config: ProductionMetricsConfig,
    feedback: PartitionedTable,
    storage: CvopsStorage,
    contracts: DataContracts,
):
    ctx = stage_context(context, storage, None, contracts, "production_metrics")
    task = contracts.task()
    yield from outputs(task.production(ctx, feedback, ReleaseStore(ctx.store), config))


class AnnotationQueueConfig(Config):
    size: int = Field(100, description="Images per queue (the annotation budget of one turn).")
    diversity_decay: float = Field(
        0.5, description="Score factor per queued image with the same top-2 class pair."
    )
    max_hamming: int = Field(
        NearDupConfig.max_hamming,
        description="pHash bits within which an image is a near-duplicate of one already queued.",
    )
    explore_share: float = Field(
        0.2,
        description="Share of the queue filled with a seeded random "
        "sample of the other candidates (exploration).",
    )
    sub_batch: int = Field(
        25,
        ge=0,
        description="With Label Studio: tasks per sub-batch, by rank; the next goes out once "
        "the one before is answered and its findings are shown (0: the whole queue at once).",
    )
    quick_retrain_epochs: int = Field(
        0,
        ge=0,
        description="With Label Studio: after each answered sub-batch, retrain for this many "
        "epochs on the grown pool (retraining_sensor) before the next goes out, to catch "
        "annotation problems on the way; the gate judges that model as any other (0: off).",
    )


@loop_asset(
    group_name="learn",
    io_manager_key="tables",
    kinds={"python", "labelstudio"},
    description="What to label next: field errors first, then the most uncertain, kept "
    "diverse, plus a random share; a Label Studio import (+ images) and a CSV. Drop the completed "
    "export back as a marked drop and it flows through ingest into the pool.",
)
def annotation_queue(
    context: AssetExecutionContext,
    config: AnnotationQueueConfig,
    feedback: PartitionedTable,
    labeled_pool: pd.DataFrame,
    storage: CvopsStorage,
    contracts: DataContracts,
    tracking: MlflowTracking,
    annotation: AnnotationBackend,
):
    ctx = stage_context(context, storage, tracking, contracts, "annotation_queue")
    result = contracts.task().queue(ctx, feedback, labeled_pool, config)
    if len(result.value):
        prefix = f"annotation/queues/{result.metadata['queue_id']}"
        result.metadata |= annotation.push(
            ctx,
            prefix,
            "annotation queue",
            config.sub_batch,
            retrain_epochs=config.quick_retrain_epochs,
        )
    return output(result)


class OntologyReportConfig(Config):
    rare_share: float = Field(
        0.2,
        description="Rarely predicted: predicted share below this "
        "fraction of the class's reviewed share.",
    )
    merge_rate: float = Field(0.15, description="Merge candidates: confused both ways this often.")


@loop_asset(
    group_name="learn",
    io_manager_key="tables",
    kinds={"python"},
    description="Classes never or rarely predicted in the field, the most confused pairs, and "
    "merge/split suggestions for the next ontology version.",
)
def ontology_report(
    context: AssetExecutionContext,
    config: OntologyReportConfig,
    feedback: PartitionedTable,
    contracts: DataContracts,
):
    records = predictions(feedback)
    ontology = contracts.ontology()
    per_class, pairs, suggestions = build_report(
        records, ontology.names, OntologyPolicy(config.rare_share, config.merge_rate)
    )
    png = ontology_png(per_class)
    return Output(
        {
            "ontology_version": ontology.version,
            "per_class": per_class.to_dict(orient="records"),
            "confused_pairs": pairs.head(20).to_dict(orient="records"),
            "suggestions": suggestions.to_dict(orient="records"),
        },
        metadata={
            "ontology_version": ontology.version,
            "suggestions": len(suggestions),
            "suggestion_list": MetadataValue.md(markdown_table(suggestions, 20)),
            "most_confused_pairs": MetadataValue.md(markdown_table(pairs, 10)),
            "per_class": MetadataValue.md(markdown_table(per_class, 100)),
            "plot": MetadataValue.md(md_image(png, "predicted vs reviewed class shares")),
        },
    )
