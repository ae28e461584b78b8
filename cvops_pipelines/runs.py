"""Running the code location's jobs and sensors from a command, in this process, recorded in the
persistent Dagster instance ($DAGSTER_HOME, default ./.dagster_home): every run a command starts
shows up in the Dagster UI (`./dev ui`) like one the daemon started."""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cvops_pipelines import settings


def dagster_home() -> Path:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").absolute())))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(
            settings.REPO_ROOT / "infra" / "dagster" / "dagster.yaml", home / "dagster.yaml"
        )
    return home


def progress(total: int | None, desc: str, unit: str = "img"):
    """A tqdm bar on stderr when it is a terminal (quiet in logs and tests)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty() or None)


@dataclass
class RunSummary:
    ok: bool
    run_id: str
    job: str = ""
    assets: dict[str, dict] = field(default_factory=dict)  # asset -> its metadata values
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)  # name -> (passed, why)
    success: bool = False  # the run itself (ok also needs every check to pass)
    wall_s: float = 0.0  # the run, start to end, in this process
    steps_s: float = 0.0  # of which: the steps' own compute (Dagster step durations)
    partition: str | None = None


@dataclass
class Runner:
    """Runs jobs and ticks sensors; keeps every run's summary (what the demo's timings read)."""

    runs: list[RunSummary] = field(default_factory=list)
    _instances: dict = field(default_factory=dict, repr=False)

    def instance(self):
        """The Dagster instance of $DAGSTER_HOME, opened once per home: opening one reads its
        config and checks its storages' schema (about 0.05 s, which every run and tick paid)."""
        from dagster import DagsterInstance

        home = str(dagster_home())
        if home not in self._instances:
            self._instances[home] = DagsterInstance.get()
        return self._instances[home]

    def job(
        self,
        job: str,
        partition: str | None = None,
        tags: dict | None = None,
        run_config: dict | None = None,
    ) -> RunSummary:
        from dagster import DagsterEventType

        from cvops_pipelines.definitions import loop_defs
        from cvops_pipelines.defs.loop import Loop

        project = settings.Project.from_env()
        loop = Loop(name=project.name)
        defs, drops = loop_defs(project), loop.drops
        started = time.perf_counter()
        instance = self.instance()
        if partition and partition not in instance.get_dynamic_partitions(drops.name):
            instance.add_dynamic_partitions(drops.name, [partition])
        result = defs.resolve_job_def(job).execute_in_process(
            instance=instance,
            partition_key=partition,
            raise_on_error=False,
            tags=tags,
            run_config={
                "loggers": {"console": {"config": {"log_level": "INFO"}}},
                **_ops_of(loop, run_config or {}),
            },
        )
        summary = RunSummary(result.success, result.run_id, job=job, partition=partition)
        for event in result.get_asset_materialization_events():
            mat = event.event_specific_data.materialization
            summary.assets[mat.asset_key.path[-1]] = {  # the asset's name in its loop
                k: v.value for k, v in mat.metadata.items()
            }
        for evaluation in result.get_asset_check_evaluations():
            why = evaluation.metadata.get("first_failure")
            summary.checks[evaluation.check_name] = (evaluation.passed, why.value if why else "")
        summary.success = result.success
        summary.ok = result.success and all(passed for passed, _ in summary.checks.values())
        summary.steps_s = (
            sum(
                e.event_specific_data.duration_ms
                for e in result.all_events
                if e.event_type == DagsterEventType.STEP_SUCCESS
            )
            / 1000
        )
        summary.wall_s = time.perf_counter() - started
        self.runs.append(summary)
        return summary

    def tick(self, sensor_name: str, run_config: dict | None = None) -> list[RunSummary]:
        """Evaluate one of the code location's sensors now, as the daemon would, and run what it
        requests, with `run_config` merged into the request's. Prints the skip reason."""
        from dagster import (
            RunRequest,
            SensorResult,
            SkipReason,
            build_sensor_context,
        )

        from cvops_pipelines.definitions import loop_defs
        from cvops_pipelines.defs.loop import Loop
        from cvops_pipelines.defs.resources import build_resources

        instance = self.instance()
        project = settings.Project.from_env()
        defs, loop = loop_defs(project), Loop(name=project.name)
        sensor = defs.resolve_sensor_def(sensor_name)
        with build_sensor_context(
            instance=instance, definitions=defs, resources=build_resources(project)
        ) as context:
            result = sensor(context)
        requests = []
        if isinstance(result, SensorResult):
            for add in result.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
            for event in result.asset_events or []:  # as the daemon records them
                instance.report_runless_asset_event(event)
            requests = list(result.run_requests or [])
            if result.skip_reason and not requests:
                print(f"   sensor : {sensor_name}: {result.skip_reason.skip_message}")
        elif isinstance(result, RunRequest):
            requests = [result]
        elif isinstance(result, SkipReason):
            print(f"   sensor : {sensor_name}: skipped ({result.skip_message})")
        runs = []
        for request in requests:
            why = request.tags.get("cvops/trigger")
            print(f"   sensor : {sensor_name} -> {sensor.job_name}" + (f" ({why})" if why else ""))
            runs.append(
                self.job(
                    sensor.job_name,
                    request.partition_key,
                    dict(request.tags),
                    _merge(request.run_config or {}, _ops_of(loop, run_config or {})) or None,
                )
            )
        return runs


def _ops_of(loop, run_config: dict) -> dict:
    """Run config whose `ops` name assets (`trained_model`) as the loop's ops."""
    if not loop.name or "ops" not in run_config:
        return run_config
    ops = {
        name if name.startswith(f"{loop.name}__") else loop.op(name): config
        for name, config in run_config["ops"].items()
    }
    return {**run_config, "ops": ops}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def print_checks(summary: RunSummary) -> None:
    for name, (passed, why) in summary.checks.items():
        print(f"   check  : {name} {'passed' if passed else 'FAILED'}")
        if why:
            print(f"            {why}")


def print_ingest(drop: str, run: RunSummary) -> None:
    images, labels = run.assets.get("raw_images", {}), run.assets.get("annotations", {})
    print(f"\n== ingest drop {drop}: {'OK' if run.ok else 'FAILED'} (Dagster run {run.run_id})")
    if images:
        print(
            f"   images : {images['files_seen']} files -> {images['accepted']} accepted, "
            f"{images['duplicates']} duplicates, {images['quarantined']} quarantined"
        )
    if labels:
        print(
            f"   labels : {labels['labels']} imported, {labels['quarantined']} quarantined, "
            f"{labels['unlabeled_images']} images unlabelled"
        )
    print_checks(run)


def print_fleet(result, config) -> None:
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(result.syncs.items()))
    running = sorted({r or "none" for r in result.releases.values()})
    print(f"\n== fleet: {config.devices} devices, {config.steps} steps, shift {config.shift}")
    print(
        f"   field  : {len(result.predictions)} predictions, {result.reviewed} reviewed by the "
        f"operator, {result.crashes} crashes, {result.offline_steps} offline device-steps"
    )
    print(f"   syncs  : {statuses}; running {', '.join(running)}")
    for line in result.events[:5]:
        print(f"   event  : {line}")


def production_stream(folder: Path) -> list[tuple[bytes, str]]:
    """(image bytes, true label) from a folder with ground_truth.csv + images/."""
    import csv

    with open(folder / "ground_truth.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [((folder / "images" / r["filename"]).read_bytes(), r["label"]) for r in rows]


def ensure_signing_key() -> Path:
    from cvops_pipelines.core.ship.release import generate_keypair

    private = settings.signing_key_path()
    if not private.exists():
        generate_keypair(private.parent)
        print(
            f"created the release signing key pair in {private.parent} (keep "
            f"{private.name} private; devices pin {private.with_suffix('.pub').name})"
        )
    return private


def mlflow_ui_hint() -> str:
    uri = settings.mlflow_tracking_uri()
    if uri.startswith("sqlite:"):
        return f".venv/bin/mlflow ui --backend-store-uri {uri}   then http://127.0.0.1:5000"
    return uri
