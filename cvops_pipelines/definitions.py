"""The one Definitions object of the cvops code location: every stage's assets, jobs, sensors
and schedules (each declared under defs/<stage>/), plus the one sensor that belongs to no stage."""

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
)

from cvops_pipelines import settings  # noqa: F401  (sets the no-telemetry environment first)
from cvops_pipelines.defs.build.assets import ssl_encoder, trained_model
from cvops_pipelines.defs.build.jobs import train_job
from cvops_pipelines.defs.build.sensors import ssl_encoder_sensor, ssl_job
from cvops_pipelines.defs.curate.assets import (
    dataset_version,
    label_issues,
    labeled_pool,
    replay_set,
)
from cvops_pipelines.defs.curate.jobs import curate_job
from cvops_pipelines.defs.ingest.assets import annotations, raw_images
from cvops_pipelines.defs.ingest.sensors import ingest_job, new_drop_sensor
from cvops_pipelines.defs.learn.assets import (
    annotation_queue,
    feedback,
    ontology_report,
    production_metrics,
)
from cvops_pipelines.defs.learn.sensors import (
    feedback_job,
    feedback_sensor,
    learn_job,
    learn_schedule,
    retraining_sensor,
)
from cvops_pipelines.defs.measure.assets import model_evaluation
from cvops_pipelines.defs.resources import build_resources
from cvops_pipelines.defs.ship.assets import canary_decision, edge_release, onnx_model
from cvops_pipelines.defs.ship.jobs import canary_job, canary_schedule, release_job

# Eager assets (curate after every ingested drop; evaluation, export and release after a new
# model) materialize when this sensor finds their automation condition met; the daemon runs it.
automation_sensor = AutomationConditionSensorDefinition(
    "cvops_automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Materializes assets whose automation condition (e.g. eager) is met.",
)

defs = Definitions(
    assets=[
        raw_images,
        annotations,
        labeled_pool,
        replay_set,
        label_issues,
        dataset_version,
        ssl_encoder,
        trained_model,
        model_evaluation,
        onnx_model,
        edge_release,
        canary_decision,
        feedback,
        production_metrics,
        annotation_queue,
        ontology_report,
    ],
    jobs=[
        ingest_job,
        curate_job,
        train_job,
        ssl_job,
        release_job,
        canary_job,
        feedback_job,
        learn_job,
    ],
    sensors=[
        new_drop_sensor,
        automation_sensor,
        feedback_sensor,
        retraining_sensor,
        ssl_encoder_sensor,
    ],
    schedules=[canary_schedule, learn_schedule],
    resources=build_resources(),
)
