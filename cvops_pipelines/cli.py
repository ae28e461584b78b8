"""`cvops`: run the demo loop, make the demo data, ingest a drop, list drops, show status.

Runs go through a persistent Dagster instance ($DAGSTER_HOME, default ./.dagster_home), so every
run started here shows up in the Dagster UI (`./dev ui`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cvops_pipelines import settings

EPILOG = """environment:
  CVOPS_HOME             local root for images, tables, quarantine, reports (default ./.cvops)
  CVOPS_DROPS            watched drop source: folder or s3://bucket/prefix (default $CVOPS_HOME/drops)
  CVOPS_S3_BUCKET        store artifacts in this S3 bucket instead of CVOPS_HOME
  CVOPS_S3_PREFIX        key prefix inside that bucket
  CVOPS_S3_REGION        region (default AWS_REGION or us-east-1)
  CVOPS_S3_ENDPOINT_URL  S3-compatible endpoint (MinIO, moto, ...)
  CVOPS_CONTRACTS_DIR    ontology + GX suites (default ./data_contracts)
  CVOPS_SIGNING_KEY      release signing key (default $CVOPS_HOME/keys/release_signing.key)
  MLFLOW_TRACKING_URI    MLflow server (default sqlite:///$CVOPS_HOME/mlflow.db)
  TORCH_HOME             torch cache holding pretrained weights (hub/checkpoints/)
  DAGSTER_HOME           Dagster instance (default ./.dagster_home)
"""


def _dagster_home() -> Path:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").absolute())))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(settings.REPO_ROOT / "infra" / "dagster" / "dagster.yaml", home / "dagster.yaml")
    return home


def _progress(total: int | None, desc: str, unit: str = "img"):
    """A tqdm bar on stderr when it is a terminal (quiet in logs and tests)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty() or None)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from cvops_pipelines.core.demo_data import write_demo_data

    drops = Path(args.drops or settings.drops_uri())
    holdback = Path(args.holdback or settings.cvops_home() / "holdback")
    with _progress(1797, "rendering digits") as bar:
        data = write_demo_data(drops, holdback, seed=args.seed, progress=bar.update)
    print(f"demo drop 'initial' ({data.counts['initial']} labelled images, marked complete) "
          f"-> {drops / 'initial'}")
    print(f"held back for later turns: {', '.join(f'{k} ({v})' for k, v in data.counts.items() if k != 'initial')}"
          f" -> {holdback}")
    return 0


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


@dataclass
class Timings:
    """Where the demo's time went: stage compute vs everything else (orchestration)."""

    started: float = field(default_factory=time.perf_counter)
    runs: list[RunSummary] = field(default_factory=list)
    outside_s: float = 0.0  # stage work outside Dagster: fleet simulation, oracle, demo data

    @contextmanager
    def stage(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.outside_s += time.perf_counter() - started

    def report(self) -> dict:
        wall = time.perf_counter() - self.started
        compute = sum(r.steps_s for r in self.runs) + self.outside_s
        return {"wall_s": round(wall, 1), "stage_compute_s": round(compute, 1),
                "dagster_runs": len(self.runs),
                "orchestration_s": round(wall - compute, 1),
                "orchestration_share": round((wall - compute) / wall, 4),
                "runs": [{"job": r.job, "run_id": r.run_id, "wall_s": round(r.wall_s, 1),
                          "steps_s": round(r.steps_s, 1)} for r in self.runs]}


TIMINGS = Timings()


def _run_job(job: str, partition: str | None = None, tags: dict | None = None,
             run_config: dict | None = None) -> RunSummary:
    """Run a job of the code location in this process, recorded in the persistent instance."""
    from dagster import DagsterEventType, DagsterInstance

    from cvops_pipelines.definitions import defs
    from cvops_pipelines.defs.partitions import drops_partitions

    _dagster_home()
    started = time.perf_counter()
    instance = DagsterInstance.get()
    if partition and partition not in instance.get_dynamic_partitions(drops_partitions.name):
        instance.add_dynamic_partitions(drops_partitions.name, [partition])
    result = defs.resolve_job_def(job).execute_in_process(
        instance=instance, partition_key=partition, raise_on_error=False, tags=tags,
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}, **(run_config or {})})
    summary = RunSummary(result.success, result.run_id, job=job)
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        summary.assets[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
    for evaluation in result.get_asset_check_evaluations():
        why = evaluation.metadata.get("first_failure")
        summary.checks[evaluation.check_name] = (evaluation.passed, why.value if why else "")
    summary.success = result.success
    summary.ok = result.success and all(passed for passed, _ in summary.checks.values())
    summary.steps_s = sum(e.event_specific_data.duration_ms for e in result.all_events
                          if e.event_type == DagsterEventType.STEP_SUCCESS) / 1000
    summary.wall_s = time.perf_counter() - started
    TIMINGS.runs.append(summary)
    return summary


def gate_refused(run: RunSummary) -> bool:
    from cvops_pipelines.defs.measure.assets import GATE_CHECK

    return GATE_CHECK in run.checks and not run.checks[GATE_CHECK][0]


def _print_checks(summary: RunSummary) -> None:
    for name, (passed, why) in summary.checks.items():
        print(f"   check  : {name} {'passed' if passed else 'FAILED'}")
        if why:
            print(f"            {why}")


def _print_ingest(drop: str, run: RunSummary) -> None:
    images, labels = run.assets.get("raw_images", {}), run.assets.get("annotations", {})
    print(f"\n== ingest drop {drop}: {'OK' if run.ok else 'FAILED'} (Dagster run {run.run_id})")
    if images:
        print(f"   images : {images['files_seen']} files -> {images['accepted']} accepted, "
              f"{images['duplicates']} duplicates, {images['quarantined']} quarantined")
    if labels:
        print(f"   labels : {labels['labels']} imported, {labels['quarantined']} quarantined, "
              f"{labels['unlabeled_images']} images unlabelled")
    _print_checks(run)


def _print_curate(run: RunSummary) -> None:
    pool, issues = run.assets.get("labeled_pool", {}), run.assets.get("label_issues", {})
    dataset = run.assets.get("dataset_version", {})
    print(f"\n== curate: {'OK' if run.ok else 'FAILED'} (Dagster run {run.run_id})")
    if pool:
        origins = ", ".join(f"{k} {v}" for k, v in (pool.get("origins") or {}).items())
        print(f"   pool   : {pool['images']} labeled images by origin: {origins}")
    if issues:
        print(f"   QA     : {issues['suspects']} suspect labels {issues['suspects_by_reason']} "
              f"-> review {issues['review_csv']}")
    if dataset:
        print(f"   dataset: {dataset['version']}: {dataset['train_images']} train / "
              f"{dataset['val_images']} val / {dataset['test_images']} test, "
              f"{dataset['excluded']} excluded")
    _print_checks(run)


def _print_train(run: RunSummary) -> None:
    model, evaluation = run.assets.get("trained_model", {}), run.assets.get("model_evaluation", {})
    print(f"\n== train + evaluate + export: {'OK' if run.ok else 'FAILED'} (Dagster run {run.run_id})")
    if model:
        print(f"   model  : {model['model']} on {model['dataset_version']}: best epoch "
              f"{model['best_epoch']}, val accuracy {model['val_accuracy']}, "
              f"{model['train_images_per_second']} train img/s (MLflow run {model['mlflow_run_id']})")
    if evaluation:
        print(f"   test   : {evaluation['test_images']} images: accuracy {evaluation['accuracy']}, "
              f"macro-F1 {evaluation['macro_f1']}, ECE {evaluation['ece']} "
              f"(champion: {evaluation['champion']})")
        for line in str(evaluation.get("replay", "")).splitlines():
            print(f"   replay : {line}")
    _print_checks(run)
    if gate_refused(run):
        print("   refused: the gate kept the champion; nothing was exported or released")
    export = run.assets.get("onnx_model", {})
    if export:
        print(f"   export : {export['source_model']} -> ONNX fp32 parity "
              f"{export['fp32_parity']['max_abs_logit_diff']:.2g} max |logit diff|, "
              f"int8 top-1 agreement {export['int8_parity']['top1_agreement']}")
        for line in export["measurements"].splitlines():
            print(f"            {line}")
        print(f"   chosen : {export['chosen']}")


def _ensure_signing_key() -> Path:
    from cvops_pipelines.core.release import generate_keypair

    private = settings.signing_key_path()
    if not private.exists():
        generate_keypair(private.parent)
        print(f"created the release signing key pair in {private.parent} (keep "
              f"{private.name} private; devices pin {private.with_suffix('.pub').name})")
    return private


def cmd_keygen(args: argparse.Namespace) -> int:
    from cvops_pipelines.core.release import generate_keypair

    folder = Path(args.out) if args.out else settings.signing_key_path().parent
    try:
        private, public = generate_keypair(folder)
    except FileExistsError as exc:
        print(f"cvops keygen: {exc}", file=sys.stderr)
        return 2
    print(f"private key (sign releases; never commit): {private}\npublic key (pin on devices): {public}")
    return 0


def production_stream(folder: Path) -> list[tuple[bytes, str]]:
    import csv

    with open(folder / "ground_truth.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [((folder / "images" / r["filename"]).read_bytes(), r["label"]) for r in rows]


def cmd_fleet(args: argparse.Namespace) -> int:
    from cvops_pipelines.edge.remote import DirRemote
    from cvops_pipelines.edge.simulator import FleetConfig, Shift, run_fleet

    if settings.s3_settings()["bucket"]:
        print("cvops fleet: the simulator drives devices against the local store; unset "
              "CVOPS_S3_BUCKET (real devices reach S3 over HTTP: cvops-edge --store https://...)",
              file=sys.stderr)
        return 2
    stream_dir = Path(args.stream or settings.cvops_home() / "holdback" / "production")
    if not (stream_dir / "ground_truth.csv").exists():
        print(f"cvops fleet: no production stream in {stream_dir} (run `cvops demo-data`)",
              file=sys.stderr)
        return 2
    config = FleetConfig(devices=args.devices, steps=args.steps,
                         images_per_step=args.images_per_step, p_offline=args.p_offline,
                         p_crash=args.p_crash, review_share=args.review_share,
                         shift=Shift(args.brightness, args.blur, args.rotate), seed=args.seed)
    home = settings.cvops_home()
    public = settings.signing_key_path().with_suffix(".pub").read_bytes()
    stream = production_stream(stream_dir)
    with _progress(config.steps, "fleet", "step") as bar:
        result = run_fleet(DirRemote(home), home / "fleet", public, stream, config, bar.update)
    _print_fleet(result, config)
    return 0


def _print_fleet(result, config) -> None:
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(result.syncs.items()))
    running = sorted({r or "none" for r in result.releases.values()})
    print(f"\n== fleet: {config.devices} devices, {config.steps} steps, shift {config.shift}")
    print(f"   field  : {len(result.predictions)} predictions, {result.reviewed} reviewed by the "
          f"operator, {result.crashes} crashes, {result.offline_steps} offline device-steps")
    print(f"   syncs  : {statuses}; running {', '.join(running)}")
    for line in result.events[:5]:
        print(f"   event  : {line}")


def _drop_source():
    from cvops_pipelines.core.storage import store_from_uri

    s3 = settings.s3_settings()
    return store_from_uri(settings.drops_uri(), region=s3["region"], endpoint_url=s3["endpoint_url"])


def cmd_ingest(args: argparse.Namespace) -> int:
    from cvops_pipelines.core.drops import DropNotReady, require_complete

    try:
        require_complete(_drop_source(), args.drop)
    except DropNotReady as exc:
        print(f"cvops ingest: {exc}", file=sys.stderr)
        return 2
    run = _run_job("ingest_job", args.drop)
    _print_ingest(args.drop, run)
    return 0 if run.ok else 1


def cmd_drops(args: argparse.Namespace) -> int:
    from cvops_pipelines.core.drops import scan_drops

    scan = scan_drops(_drop_source())
    for status, names in (("complete", scan.complete), ("waiting for _SUCCESS", scan.incomplete),
                          ("invalid name", scan.invalid)):
        for name in names:
            print(f"{name}\t{status}")
    return 0


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _tick(sensor_name: str, run_config: dict | None = None) -> list[RunSummary]:
    """Evaluate one of the code location's sensors now, as the daemon would, and run what it
    requests (in this process, recorded in the instance), with `run_config` merged into the
    request's. Prints the sensor's skip reason."""
    from dagster import (DagsterInstance, RunRequest, SensorResult, SkipReason,
                         build_sensor_context)

    from cvops_pipelines.definitions import defs
    from cvops_pipelines.defs.resources import build_resources

    _dagster_home()
    instance = DagsterInstance.get()
    sensor = defs.resolve_sensor_def(sensor_name)
    with build_sensor_context(instance=instance, definitions=defs,
                              resources=build_resources()) as context:
        result = sensor(context)
    requests = []
    if isinstance(result, SensorResult):
        for add in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
        requests = list(result.run_requests or [])
    elif isinstance(result, RunRequest):
        requests = [result]
    elif isinstance(result, SkipReason):
        print(f"   sensor : {sensor_name}: skipped ({result.skip_message})")
    job = sensor.job_name
    runs = []
    for request in requests:
        why = request.tags.get("cvops/trigger")
        print(f"   sensor : {sensor_name} -> {job}" + (f" ({why})" if why else ""))
        runs.append(_run_job(job, request.partition_key, dict(request.tags),
                             _merge(request.run_config or {}, run_config or {}) or None))
    return runs


def _print_feedback(runs: list[RunSummary]) -> None:
    for run in runs:
        info = run.assets.get("feedback", {})
        print(f"\n== feedback: {'OK' if run.ok else 'FAILED'} (Dagster run {run.run_id})")
        if info:
            print(f"   back   : {info['records']} records ({info['reviewed']} reviewed) in "
                  f"{info['accepted_batches']} batches from {info['devices']} devices; "
                  f"{info['quarantined_batches']} batches quarantined")


def _print_canary(run: RunSummary) -> dict:
    decision = run.assets.get("canary_decision", {})
    print(f"\n== canary: {'OK' if run.ok else 'FAILED'} (Dagster run {run.run_id})")
    if decision:
        reasons = str(decision.get("why", "")).splitlines() or [""]
        print(f"   verdict: {decision['action']}: {reasons[0]}")
        for line in reasons[1:]:
            print(f"            {line}")
    return decision


def _print_learn(run: RunSummary) -> dict:
    metrics = run.assets.get("production_metrics", {})
    queue = run.assets.get("annotation_queue", {})
    report = run.assets.get("ontology_report", {})
    print(f"\n== learn: {'OK' if run.success else 'FAILED'} (Dagster run {run.run_id})")
    if metrics:
        print(f"   field     : {metrics['records']} records, coverage {metrics['coverage']:.0%} "
              f"reviewed; missed-event share {metrics['missed_event_share']}")
        for line in metrics["per_release"].splitlines():
            print(f"            {line}")
    for name in ("accuracy_sla", "no_output_drift"):
        if name in run.checks:
            passed, why = run.checks[name]
            print(f"   check  : {name} {'passed' if passed else 'FAILED: ' + why}")
    if queue:
        print(f"   queue  : {queue['queued']} images to label {queue['by_reason']} in "
              f"{queue['distinct_class_pairs']} class pairs -> {queue['labelstudio_import']}")
    if report:
        print(f"   classes: {report['suggestions']} ontology suggestion(s) (ontology_report)")
    return {"metrics": metrics, "queue": queue}


def _release(cohorts: list[str]) -> RunSummary:
    _ensure_signing_key()
    release = _run_job("release_job", run_config={"ops": {"edge_release": {"config": {
        "canary_share": 0.0 if cohorts else 1.0, "canary_cohorts": cohorts}}}})
    info = release.assets.get("edge_release", {})
    print(f"\n== release: {'OK' if release.ok else 'FAILED'} (Dagster run {release.run_id})")
    if info:
        canary = info["canary"] or {}
        where = (f"canary for {canary['share']:.0%} of devices"
                 + (f" + cohorts {', '.join(canary['cohorts'])}" if canary.get("cohorts") else "")
                 if canary.get("release") == info["release"] else "not on canary")
        delta = info["delta_bytes"]
        print(f"   bundle : {info['release']} ({info['artifact']}, {info['model_bytes']} bytes, "
              f"delta {delta if isinstance(delta, int) else delta}) -> {where}")
    return release


DEMO_SHIFT = (0.3, 5, 30.0)  # brightness, blur, rotate
CANARY_LOOKS = 3  # fleet rounds a canary may take to decide (canary_decision's max_looks is 4)


def _fleet(stream, seed: int, steps: int):
    from cvops_pipelines.edge.remote import DirRemote
    from cvops_pipelines.edge.simulator import FleetConfig, Shift, run_fleet

    home = settings.cvops_home()
    # The field rotates up to 30 degrees (training augments up to 10) and is blurrier and
    # darker: a shift the first model was not built for, which field labels can teach.
    config = FleetConfig(devices=6, steps=steps, images_per_step=4, upload_every=10,
                         shift=Shift(*DEMO_SHIFT), seed=seed)
    public = settings.signing_key_path().with_suffix(".pub").read_bytes()
    with TIMINGS.stage(), _progress(config.steps, "fleet", "step") as bar:
        result = run_fleet(DirRemote(home), home / "fleet", public, stream, config, bar.update)
    _print_fleet(result, config)
    return result


def _audit(versions: list[str], shots: list[tuple[bytes, str]]) -> dict[str, float]:
    """Each registered model version on the same production images (as shot), against the
    oracle's truth: what the demo can know and a real site cannot."""
    import numpy as np

    from cvops_pipelines.core.tracking import Tracking
    from cvops_pipelines.core.training import predict_probs
    from cvops_pipelines.edge.preprocess import load_rgb, resize

    tracking = Tracking(settings.mlflow_tracking_uri())
    out = {}
    for version in versions:
        loaded = tracking.load(version=version)
        with TIMINGS.stage():
            images = [resize(load_rgb(b), loaded.preprocess.image_size) for b, _ in shots]
            probs = predict_probs(loaded.model, images, loaded.preprocess)
        predicted = np.array(loaded.preprocess.classes)[probs.argmax(1)]
        out[version] = float(np.mean(predicted == np.array([label for _, label in shots])))
    return out


def _annotate(queue_info: dict, truth: dict[str, str]) -> str | None:
    """The oracle answers the queue; the answers land as a marked drop, like a Label Studio
    export a team copies back."""
    from cvops_pipelines.core.demo_data import complete_queue

    queue_id = queue_info["queue_id"]
    drop = Path(settings.drops_uri()) / f"annotated-{queue_id}"
    with TIMINGS.stage():
        answered = complete_queue(settings.cvops_home() / "annotation" / "queues" / queue_id,
                                  truth, drop)
    print(f"\n== annotate: the oracle labelled {answered} queued images -> drop {drop.name} "
          "(Label Studio JSON export + images, marked complete)")
    return drop.name


def _channels() -> dict:
    from cvops_pipelines.core.release import ReleaseStore
    from cvops_pipelines.core.storage import LocalStore

    releases = ReleaseStore(LocalStore(settings.cvops_home()))
    return {c: (releases.channel(c) or {}).get("release") for c in ("stable", "canary")}


def _champion() -> str | None:
    from mlflow.exceptions import MlflowException

    from cvops_pipelines.core.tracking import Tracking

    tracking = Tracking(settings.mlflow_tracking_uri())
    try:
        return str(tracking.client().get_model_version_by_alias(tracking.model_name,
                                                                "champion").version)
    except MlflowException:
        return None


def _turn(number: int, stream, seed: int, steps: int, cohorts: list[str]) -> dict | None:
    """One turn; None when the pipeline itself failed. A refusal (gate, canary) is an outcome."""
    print(f"\n######## turn {number}: build -> ship -> measure -> learn")
    before = {**_channels(), "champion": _champion()}
    train_seed = {"ops": {"trained_model": {"config": {"seed": seed}}}}
    trains = _tick("retraining_sensor", train_seed)
    for train in trains:
        _print_train(train)
    refused = any(gate_refused(t) for t in trains)
    if any(not t.success and not gate_refused(t) for t in trains):
        return None
    evaluation = trains[-1].assets.get("model_evaluation", {}) if trains else {}
    gate = {"trained": bool(trains), "refused": refused,
            "model_version": evaluation.get("challenger"),
            "checks": {k: v[0] for t in trains for k, v in t.checks.items()},
            "replay": evaluation.get("replay"), "replay_verdict": evaluation.get("replay_verdict"),
            "replay_outcomes": evaluation.get("replay_outcomes")}
    released = None
    if trains and not refused:
        release = _release(cohorts)
        if not release.ok:
            return None
        released = release.assets["edge_release"]["release"]
    fleet, shots, decision, looks = None, [], {}, 0
    while fleet is None or (released and decision.get("action") == "wait"
                            and looks < CANARY_LOOKS):
        if fleet is not None:
            print("\n   canary : keeps collecting: the fleet runs on (the simulator shoots the "
                  "turn's stream again, with new shifts)")
        fleet = _fleet(stream, seed + 1000 * looks, steps)
        shots += fleet.shots
        feedback = _tick("feedback_sensor")
        _print_feedback(feedback)
        if not feedback or not all(run.success for run in feedback):
            return None
        if released:
            decision, looks = _print_canary(_run_job("canary_job")), looks + 1
    learn = _print_learn(_run_job("learn_job"))
    return {"release": released, "fleet": fleet, "shots": shots, "decision": decision,
            "gate": gate, "looks": looks,
            "before": before, "after": {**_channels(), "champion": _champion()}, **learn}


def _report_turn(turn: dict) -> dict:
    decision = turn["decision"] or {}
    return {"release": turn["release"], "gate": turn["gate"], "before": turn["before"],
            "after": turn["after"],
            "canary": {k: decision.get(k) for k in ("action", "why", "paired_records", "paired")},
            "canary_looks": turn["looks"], "field_images": len(turn["shots"])}


def _demo_loop(args: argparse.Namespace, report: dict) -> bool:
    stream = production_stream(settings.cvops_home() / "holdback" / "production")
    cut = int(len(stream) * 0.4)
    first = _turn(1, stream[:cut], args.seed, steps=20, cohorts=[])
    if first is None:
        return False
    report["turns"].append(_report_turn(first))
    truth = dict(first["fleet"].image_truth)
    drop = _annotate(first["queue"], truth)
    print(f"\n== ingest drop {drop} (new_drop_sensor)")
    for run in _tick("new_drop_sensor"):
        _print_ingest(drop, run)
    curate = _run_job("curate_job")
    _print_curate(curate)
    if not curate.success:
        return False
    second = _turn(2, stream[cut:], args.seed + 1, steps=30, cohorts=["site-b"])
    if second is None:
        return False
    report["turns"].append(_report_turn(second))
    stable, champion = _channels()["stable"], _champion()
    versions = [v.lstrip("v") for v in (first["gate"]["model_version"],
                                       second["gate"]["model_version"]) if v]
    audit = _audit(versions, second["shots"])
    print("\n######## summary")
    for number, turn in ((1, first), (2, second)):
        metrics, gate = turn["metrics"], turn["gate"]
        verdict = ("refused by the gate" if gate["refused"] else
                   f"canary {turn['decision'].get('action')}" if turn["release"] else "no model")
        print(f"   turn {number} : {turn['release'] or 'no release'}: field accuracy "
              f"{_field_accuracy(metrics, turn['release'] or turn['before']['stable'])}; SLA "
              f"{'met' if metrics.get('sla_ok') else 'missed'}, drift "
              f"{'flagged' if metrics.get('drift_flagged') else 'not flagged'}; {verdict}")
    print(f"   stable : {stable} (MLflow alias champion: v{champion})")
    print(f"   audit  : every turn-2 production image ({len(second['shots'])}, as shot) "
          "against the oracle's true labels, which the pipeline never saw:")
    for number, version in enumerate(versions, 1):
        print(f"            turn {number}'s model v{version}: accuracy {audit[version]:.4f}"
              + ("   <- shipped (stable)" if version == champion else ""))
    report.update({"stable": stable, "champion": champion, "audit": audit,
                   "turn_models": versions, "audit_images": len(second["shots"])})
    if not second["metrics"].get("sla_ok"):
        print("            the SLA is still missed: the next turn starts from the new queue "
              f"({second['queue'].get('queued')} images)")
    return True


def _field_accuracy(metrics: dict, release: str) -> str:
    row = (metrics.get("accuracy_by_release") or {}).get(release)
    if not row or row["accuracy"] is None:
        return "n/a (nothing reviewed)"
    return (f"{row['accuracy']:.4f} on {row['reviewed']} reviewed of {row['records']} records "
            f"(coverage {row['coverage']:.0%})")


def cmd_demo(args: argparse.Namespace) -> int:
    import json

    home = settings.cvops_home()
    print(f"cvops demo: data and artifacts under {home}, Dagster instance in {_dagster_home()}")
    if not (Path(settings.drops_uri()) / "initial").exists():
        with TIMINGS.stage():
            cmd_demo_data(argparse.Namespace(drops=None, holdback=None, seed=args.seed))
    print("\n== ingest drop initial (new_drop_sensor)")
    ingests = _tick("new_drop_sensor")
    for run in ingests:
        _print_ingest("initial", run)
    curate = _run_job("curate_job") if ingests and all(r.ok for r in ingests) else None
    if curate:
        _print_curate(curate)
    report: dict = {"seed": args.seed, "turns": []}
    ok = curate is not None and curate.ok and _demo_loop(args, report)
    timing = TIMINGS.report()
    report.update({"ok": ok, "timings": timing})
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, default=str))
    print(f"\n   time   : {timing['wall_s']} s in all, {timing['stage_compute_s']} s stage compute, "
          f"{timing['orchestration_s']} s orchestration ({timing['orchestration_share']:.1%}) over "
          f"{timing['dagster_runs']} Dagster runs")
    if args.timings:
        Path(args.timings).write_text(json.dumps(timing, indent=2))
    print("\nwhere to look:")
    print("   Dagster UI : ./dev ui   then http://127.0.0.1:3000 (runs, asset metadata, checks)")
    print(f"   GX reports : {home / 'reports' / 'gx' / 'index.html'}")
    print(f"   field      : {home / 'reports' / 'production_metrics'}   annotation queues: "
          f"{home / 'annotation' / 'queues'}")
    print(f"   datasets   : {home / 'datasets'}   label review: {home / 'reports' / 'label_issues'}")
    print(f"   MLflow     : {_mlflow_ui_hint()}")
    print(f"   releases   : {home / 'releases'}   fleet state: {home / 'fleet'}   feedback: "
          f"{home / 'feedback'}   quarantine: {home / 'quarantine'}")
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    """The operator's one-screen view: what runs where, how it does, what waits for people."""
    import json

    import pandas as pd

    from cvops_pipelines.core.feedback import OPERATOR_PREFIX
    from cvops_pipelines.core.release import ReleaseStore
    from cvops_pipelines.core.tables import read_table
    from cvops_pipelines.core.tracking import Tracking, TrackingUnavailable

    store = settings.cvops_store()
    releases = ReleaseStore(store)
    print(f"cvops status ({store.uri()})")
    for channel in ("stable", "canary"):
        pointer = releases.channel(channel) or {}
        release = pointer.get("release")
        if not release:
            print(f"   {channel:<10}: none")
            continue
        manifest = releases.manifest(release)
        extra = (f", {pointer.get('share', 0):.0%} of devices"
                 + (f" + cohorts {', '.join(pointer['cohorts'])}" if pointer.get("cohorts") else "")
                 if channel == "canary" else "")
        print(f"   {channel:<10}: {release} (model v{manifest['model_version']}, "
              f"{manifest['artifact']}, dataset {manifest['dataset_version']}{extra}; "
              f"since {pointer.get('updated_at', '?')})")
    tracking = Tracking(settings.mlflow_tracking_uri())
    local_db = tracking.tracking_uri.removeprefix("sqlite:///")
    if tracking.tracking_uri.startswith("sqlite:///") and not Path(local_db).exists():
        print(f"   MLflow    : no tracking database yet ({local_db})")
    else:
        from mlflow.exceptions import MlflowException

        try:
            client = tracking.client()
            for alias in ("champion", "challenger"):
                try:
                    version = client.get_model_version_by_alias(tracking.model_name, alias)
                    print(f"   {alias:<10}: {tracking.model_name} v{version.version} "
                          f"(MLflow run {version.run_id})")
                except MlflowException:  # the alias is not set yet
                    print(f"   {alias:<10}: not set")
        except TrackingUnavailable as exc:
            print(f"   MLflow    : {exc}")
    metrics_key = "artifacts/production_metrics/all.json"
    if store.exists(metrics_key):
        metrics = json.loads(store.read_bytes(metrics_key))
        print(f"   field     : {metrics['records']} records, {metrics['reviewed']} reviewed; SLA "
              f"{'met' if metrics['sla_ok'] else 'MISSED'}, drift "
              f"{'FLAGGED' if metrics['drift_flagged'] else 'not flagged'}")
        for row in metrics["per_release"]:
            accuracy = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
            print(f"               {row['release']}: accuracy {accuracy} on {row['reviewed']} "
                  f"reviewed of {row['records']} (coverage {row['coverage']:.0%})")
    else:
        print("   field     : no production_metrics yet (learn_job / learn_schedule)")
    queue_key = "tables/annotation_queue/all.parquet"
    if store.exists(queue_key):
        queue = read_table(store, queue_key)
        pool_key = "tables/labeled_pool/all.parquet"
        done: set = set()
        if store.exists(pool_key):
            pool = read_table(store, pool_key)
            expert = pool["annotators"].map(
                lambda names: any(not str(n).startswith(OPERATOR_PREFIX) for n in names))
            done = set(pool.loc[expert, "image_id"])
        pending = queue[~queue["image_id"].isin(done)]
        queue_id = queue["queue_id"].iloc[0] if len(queue) else "-"
        print(f"   labels    : {len(pending)} of {len(queue)} queued images still to annotate "
              f"(queue {queue_id}: {store.uri(f'annotation/queues/{queue_id}/tasks.json')})")
        if len(pending):
            print(f"               by reason: {pd.Series(pending['reason']).value_counts().to_dict()}")
    else:
        print("   labels    : no annotation queue yet")
    return 0


def _mlflow_ui_hint() -> str:
    uri = settings.mlflow_tracking_uri()
    if uri.startswith("sqlite:"):
        return f".venv/bin/mlflow ui --backend-store-uri {uri}   then http://127.0.0.1:5000"
    return uri


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvops", description="cvops: the Lean AI loop for computer vision on Dagster.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="two turns of the loop on the bundled demo data: ingest, curate, train, evaluate, export, release to a simulated fleet, feedback, canary decision, production metrics and drift, annotation queue answered by an oracle, retrain, release again")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the demo data split, the training runs and the fleet")
    p.add_argument("--timings", help="write where the time went (JSON) to this file")
    p.add_argument("--report", help="write every turn's decisions and figures (JSON) to this "
                                    "file: gate and canary verdicts, channels before and after, "
                                    "the oracle's audit of the releases")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("demo-data", help="render scikit-learn's digits as PNG drops")
    p.add_argument("--drops", help="drop source folder (default $CVOPS_DROPS)")
    p.add_argument("--holdback", help="folder for later drops and the production stream "
                                      "(default $CVOPS_HOME/holdback)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("ingest", help="ingest one drop from the drop source now (no sensor)")
    p.add_argument("drop", help="the drop's folder name under $CVOPS_DROPS")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("drops", help="list drops in the drop source and whether they are complete")
    p.set_defaults(func=cmd_drops)

    p = sub.add_parser("status", help="champion, stable and canary releases, the latest "
                                      "production metrics and pending annotation work")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("keygen", help="create the ed25519 key pair that signs edge releases")
    p.add_argument("--out", help="folder (default: the folder of $CVOPS_SIGNING_KEY, "
                                 "$CVOPS_HOME/keys)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("fleet", help="simulate edge devices running the released model on the "
                                     "production stream, with outages, crashes and operators")
    p.add_argument("--stream", help="folder with ground_truth.csv + images/ "
                                    "(default $CVOPS_HOME/holdback/production)")
    p.add_argument("--devices", type=int, default=6)
    p.add_argument("--steps", type=int, default=30, help="rounds of sync, predict, upload")
    p.add_argument("--images-per-step", type=int, default=4)
    p.add_argument("--p-offline", type=float, default=0.25, help="chance a device is offline in a step")
    p.add_argument("--p-crash", type=float, default=0.03, help="chance a store call crashes the device")
    p.add_argument("--review-share", type=float, default=0.6,
                   help="share of predictions an operator reviews (top-2 choice)")
    p.add_argument("--brightness", type=float, default=0.0, help="shift: brightness change limit")
    p.add_argument("--blur", type=int, default=0, help="shift: max Gaussian blur kernel (odd)")
    p.add_argument("--rotate", type=float, default=0.0, help="shift: rotation limit in degrees")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_fleet)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
