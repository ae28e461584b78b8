"""The one sensor that belongs to no stage: eager assets (curate after every ingested drop;
evaluation, export and release after a new model) materialize when it finds their automation
condition met; the daemon runs it."""

from dagster import AssetSelection, AutomationConditionSensorDefinition, DefaultSensorStatus

automation_sensor = AutomationConditionSensorDefinition(
    "cvops_automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Materializes assets whose automation condition (e.g. eager) is met.",
)
