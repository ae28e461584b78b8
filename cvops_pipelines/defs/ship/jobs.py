"""Jobs from an exported model to the fleet, and the schedule that decides canaries hands-off."""

from dagster import DefaultScheduleStatus, RunRequest, SkipReason, schedule

from cvops_pipelines.core.ship.release import ReleaseStore
from cvops_pipelines.defs.loop import loop_job
from cvops_pipelines.defs.resources import CvopsStorage

release_job = loop_job(
    "release_job",
    assets=("edge_release",),
    description="Sign and publish the chosen artifact and put it on the canary channel.",
)
canary_job = loop_job(
    "canary_job",
    assets=("canary_decision",),
    description="Promote or roll back the canary on the fleet's reviewed feedback.",
)


@schedule(
    job_name="canary_job",
    cron_schedule="*/15 * * * *",
    default_status=DefaultScheduleStatus.RUNNING,
)
def canary_schedule(context, storage: CvopsStorage):
    """Every 15 minutes while a release is on canary: decide on the feedback ingested so far."""
    canary = ReleaseStore(storage.store()).channel("canary") or {}
    if not canary.get("release"):
        return SkipReason("no release on the canary channel")
    return RunRequest()
