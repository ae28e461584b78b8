"""new_drop_sensor: turns each completed drop into a partition and an ingest run."""

import json

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from cvops_pipelines.core.ingest.drops import scan_drops
from cvops_pipelines.defs.loop import Loop, loop_job
from cvops_pipelines.defs.resources import DropSource

ingest_job = loop_job(
    "ingest_job",
    assets=("raw_images", "annotations"),
    description="Ingest one drop: images, then labels.",
    # drops ingest in parallel runs, as many at once as the production queue allows
    tags={"cvops/stage": "ingest"},
)


@sensor(
    job_name="ingest_job",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Watches the drop source for folders carrying the _SUCCESS marker.",
)
def new_drop_sensor(context: SensorEvaluationContext, drop_source: DropSource, loop: Loop):
    # The cursor holds the drops already requested, so a restart neither misses nor repeats one
    # (and a drop whose marker time is older than the last one seen is still picked up).
    requested = set(json.loads(context.cursor)) if context.cursor else set()
    scan = scan_drops(drop_source.store())
    for name in scan.invalid:
        context.log.error(
            f"drop folder {name!r} is marked complete but its name is not a valid "
            "partition key (letters, digits, '.', '_', '-'); rename it"
        )
    existing = set(context.instance.get_dynamic_partitions(loop.drops.name))
    new = [d for d in scan.complete if d not in requested and d not in existing]
    if not new:
        waiting = f"; {len(scan.incomplete)} drop(s) without marker" if scan.incomplete else ""
        return SkipReason(f"no new completed drops{waiting}")
    return SensorResult(
        run_requests=[RunRequest(partition_key=d, run_key=f"drop:{d}") for d in new],
        dynamic_partitions_requests=[loop.drops.build_add_request(new)],
        cursor=json.dumps(sorted(requested | set(new))),
    )
