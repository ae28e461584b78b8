"""The encoder keeps up with the fleet: pretrain again once enough new images were stored."""

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from cvops_pipelines.core.build.ssl_run import EncoderPolicy, encoder_due, stored_images
from cvops_pipelines.core.learn.retraining import EncoderFacts, read_facts
from cvops_pipelines.defs.loop import loop_job
from cvops_pipelines.defs.resources import CvopsStorage

ssl_job = loop_job(
    "ssl_job",
    assets=("ssl_encoder",),
    tags={"cvops/stage": "build"},  # queued with training: one heavy run at a time
    description="Pretrain the self-supervised encoder on every ingested image.",
)


@sensor(
    job_name="ssl_job",
    minimum_interval_seconds=600,
    default_status=DefaultSensorStatus.STOPPED,
    description="Requests ssl_encoder when the image store holds min_images and no encoder "
    "yet, or a quarter more images than the current encoder saw. Off by default: pretraining "
    "is the loop's heaviest run (turn it on where a GPU or a quiet night is at hand).",
)
def ssl_encoder_sensor(context: SensorEvaluationContext, storage: CvopsStorage):
    store = storage.store()
    facts = read_facts(store, EncoderFacts)
    stored = stored_images(store)
    due, why = encoder_due(stored, facts.images if facts else None, EncoderPolicy())
    if not due:
        return SkipReason(why)
    context.log.info(f"pretraining: {why}")
    return RunRequest(run_key=f"ssl:{stored}", tags={"cvops/trigger": why})
