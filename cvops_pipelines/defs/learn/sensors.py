"""The loop runs itself: feedback batches become partitions, metrics refresh on a schedule, and
a failed SLA or drift check (with new labels to learn from), or enough new labels, retrains."""

import json

from dagster import (
    AssetObservation,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    MetadataValue,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    TableRecord,
    sensor,
)

from cvops_pipelines.core.learn.feedback import batch_ids, invalid_batch_names
from cvops_pipelines.core.learn.labelstudio import collect_answers
from cvops_pipelines.core.learn.labelstudio_client import LabelStudioError
from cvops_pipelines.core.learn.retraining import (
    AlertFacts,
    DatasetFacts,
    ModelFacts,
    SubBatchFacts,
    read_facts,
    retraining_decision,
)
from cvops_pipelines.defs.loop import Loop, loop_job
from cvops_pipelines.defs.resources import (
    AnnotationBackend,
    CvopsStorage,
    DataContracts,
    DropSource,
)

feedback_job = loop_job(
    "feedback_job", assets=("feedback",), description="Vet and ingest uploaded feedback batches."
)
learn_job = loop_job(
    "learn_job",
    assets=("production_metrics", "annotation_queue", "ontology_report"),
    description="Refresh production metrics (SLA, drift), the annotation queue and the "
    "ontology report from every feedback batch.",
)
learn_schedule = ScheduleDefinition(
    name="learn_schedule",
    job_name="learn_job",
    cron_schedule="0 * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Hourly: production metrics and their checks (which the retraining sensor "
    "reads), the annotation queue and the ontology report.",
)

# Dagster's documented run tags for a single run over a partition range (a single-run backfill).
PARTITION_RANGE_START, PARTITION_RANGE_END = (
    "dagster/asset_partition_range_start",
    "dagster/asset_partition_range_end",
)


def feedback_run_request(new: list[str]) -> RunRequest:
    """One run for every new batch (a partition range, single-run backfill): one run per batch
    would spend more time orchestrating than ingesting."""
    return RunRequest(
        run_key=f"feedback:{new[0]}..{new[-1]}:{len(new)}",
        tags={PARTITION_RANGE_START: new[0], PARTITION_RANGE_END: new[-1]},
    )


@sensor(
    job_name="feedback_job",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Watches feedback/batches/ in the cvops store for batches devices uploaded.",
)
def feedback_sensor(context: SensorEvaluationContext, storage: CvopsStorage, loop: Loop):
    store = storage.store()
    for name in invalid_batch_names(store):
        context.log.error(
            f"feedback batch {name!r} has a name that cannot be a partition key "
            "(letters, digits, '.', '_', '-'); it is left where it is"
        )
    existing = set(context.instance.get_dynamic_partitions(loop.feedback_batches.name))
    new = [b for b in batch_ids(store) if b not in existing]
    if not new:
        return SkipReason("no new feedback batches")
    return SensorResult(
        run_requests=[feedback_run_request(new)],
        dynamic_partitions_requests=[loop.feedback_batches.build_add_request(new)],
    )


@sensor(
    job_name="train_job",
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Requests a training run (then evaluate, export; release follows by "
    "automation) when production_metrics' SLA or drift check failed and new "
    "labels arrived, when a queue asked for a quick retrain between its Label Studio "
    "sub-batches, or when enough new labels arrived; never twice for one dataset version.",
)
def retraining_sensor(
    context: SensorEvaluationContext, storage: CvopsStorage, contracts: DataContracts, loop: Loop
):
    store = storage.store()
    decision = retraining_decision(
        read_facts(store, DatasetFacts),
        read_facts(store, ModelFacts),
        read_facts(store, AlertFacts),
        sub_batch=read_facts(store, SubBatchFacts),
    )
    if not decision.train:
        return SkipReason(decision.why)
    context.log.info(f"retraining: {decision.why}")
    version = decision.dataset_version
    overrides = decision.overrides
    if decision.quick_epochs:
        overrides = {**overrides, **contracts.task().quick(decision.quick_epochs)}
    config = {"ops": {loop.op("trained_model"): {"config": overrides}}} if overrides else None
    return RunRequest(
        run_key=f"train:{version}",
        run_config=config,
        tags={
            "cvops/dataset_version": version,
            "cvops/trigger": "first model" if decision.why == "no model yet" else decision.why,
        },
    )


@sensor(
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="With a Label Studio configured (CVOPS_LABELSTUDIO_URL): writes each answered "
    "sub-batch (and answers edited later) as a Label Studio export drop, exactly once, for "
    "new_drop_sensor to ingest; records its findings and the queue's progress on "
    "annotation_queue; then pushes the next sub-batch; pushes queues Label Studio could not "
    "take earlier; reports tasks deleted in Label Studio.",
)
def labelstudio_answers(
    context: SensorEvaluationContext,
    storage: CvopsStorage,
    drop_source: DropSource,
    annotation: AnnotationBackend,
    loop: Loop,
):
    ls = annotation.labelstudio()
    if ls is None:
        return SkipReason("no Label Studio configured (CVOPS_LABELSTUDIO_URL): queues stay files")
    try:
        poll = collect_answers(ls, storage.store(), drop_source.store())
    except LabelStudioError as e:
        context.log.error(str(e))
        return SkipReason(f"retrying next tick: {e}")
    for task in poll.malformed:
        context.log.warning(
            f"Label Studio task {task} (project/task) holds answers in a shape cvops cannot "
            "read (annotations not a list of objects with a result list): its sub-batch waits; "
            "fix or re-submit the task in Label Studio"
        )
    for task in poll.deleted:
        context.log.warning(
            f"Label Studio task {task} (project/task) was deleted before it was answered: its "
            "image stays in the pool unlabelled and may be queued again"
        )
    said = [
        f"pushed late: {', '.join(poll.pushed)}" if poll.pushed else "",
        f"wrote {poll.answered} answer(s) as drop(s) {', '.join(poll.drops)}" if poll.drops else "",
        f"sub-batch(es) pushed: {', '.join(poll.next_pushed)}" if poll.next_pushed else "",
        f"waiting for a quick retrain: {', '.join(poll.retraining)}" if poll.retraining else "",
        f"{poll.pending} pushed task(s) waiting for an answer",
    ]
    summary = "; ".join(s for s in said if s)
    context.log.info(summary)
    # the UI hears of a change, not of every poll (the pace alone moves every minute)
    pace = ("answers_last_hour", "answers_per_hour")
    counts = [{k: v for k, v in p.items() if k not in pace} for p in poll.progress]
    shown = json.dumps([counts, poll.completed], sort_keys=True)
    events = []
    if shown != context.cursor:
        events.append(
            AssetObservation(
                loop.key("annotation_queue"),
                metadata={
                    "annotation_progress": MetadataValue.table(
                        [TableRecord(p) for p in poll.progress]
                    )
                    if poll.progress
                    else "no queue pushed",
                    "sub_batches_completed_now": MetadataValue.json(poll.completed),
                    "summary": summary,
                },
            )
        )
    return SensorResult(skip_reason=summary, asset_events=events, cursor=shown)
