"""The Definitions of a cvops code location, found rather than listed: every asset, job, sensor
and schedule a module under `cvops_pipelines/defs/` declares joins the loop, so a new stage or
asset module needs no edit here.

`defs` is the loop the environment names (the default project, or CVOPS_LOOP's). A deployment
that runs several loops side by side gives each its own code location built by `build_defs`
(see workspace.yaml and docs/extending.md): each loop's asset keys and partitions carry its
name, so no run of one loop touches another's history.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from dagster import (
    AssetsDefinition,
    Definitions,
    ScheduleDefinition,
    SensorDefinition,
)
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)

from cvops_pipelines import defs as defs_package
from cvops_pipelines import settings
from cvops_pipelines.defs.loop import Loop, declared, for_loop
from cvops_pipelines.defs.resources import build_resources

_KINDS = {
    AssetsDefinition: "assets",
    UnresolvedAssetJobDefinition: "jobs",
    SensorDefinition: "sensors",
    ScheduleDefinition: "schedules",
}


def declarations() -> dict[str, list]:
    """Every asset, job, sensor and schedule declared under `cvops_pipelines/defs/`, once each
    (a job a sensor module imports is the job module's), in module order."""
    found: dict[str, dict[int, object]] = {kind: {} for kind in _KINDS.values()}
    for module in pkgutil.walk_packages(defs_package.__path__, f"{defs_package.__name__}."):
        for value in vars(importlib.import_module(module.name)).values():
            kind = next((k for t, k in _KINDS.items() if isinstance(value, t)), None)
            if kind is None or (kind in ("assets", "jobs") and not declared(value)):
                continue
            found[kind].setdefault(id(value), value)
    return {kind: list(values.values()) for kind, values in found.items()}


def build_defs(project: settings.Project) -> Definitions:
    """One loop's Definitions: the declared stages under the project's name and places."""
    loop = Loop(name=project.name)
    found = declarations()
    return Definitions(
        assets=[for_loop(a, loop) for a in found["assets"]],
        jobs=[for_loop(j, loop) for j in found["jobs"]],
        sensors=found["sensors"],
        schedules=found["schedules"],
        resources=build_resources(project),
    )


@cache
def loop_defs(project: settings.Project) -> Definitions:
    """`build_defs`, once per project in a process (the demo and the CLI run jobs from it)."""
    return build_defs(project)


defs = loop_defs(settings.Project.from_env())
