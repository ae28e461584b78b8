"""The demo harness: two turns of the Lean AI loop on the bundled digits, driven the way the
daemon would drive them (sensor ticks, job runs), with a simulated fleet and an oracle that answers
the annotation queue, and a summary of what was decided and why. Not an operator command: the
demo is how a newcomer sees the whole loop run (`./dev demo`, `cvops-demo`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cvops_pipelines import settings
from cvops_pipelines.core.build.registry import load
from cvops_pipelines.demo.data import write_demo_data
from cvops_pipelines.runs import (
    Runner,
    RunSummary,
    dagster_home,
    ensure_signing_key,
    mlflow_ui_hint,
    print_checks,
    print_fleet,
    print_ingest,
    production_stream,
    progress,
)


@dataclass
class Timings:
    """Where the demo's time went: stage compute vs everything else (orchestration)."""

    started: float = field(default_factory=time.perf_counter)
    runner: Runner = field(default_factory=Runner)
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
        compute = sum(r.steps_s for r in self.runner.runs) + self.outside_s
        return {
            "wall_s": round(wall, 1),
            "stage_compute_s": round(compute, 1),
            "dagster_runs": len(self.runner.runs),
            "orchestration_s": round(wall - compute, 1),
            "orchestration_share": round((wall - compute) / wall, 4),
            "runs": [
                {
                    "job": r.job,
                    "run_id": r.run_id,
                    "wall_s": round(r.wall_s, 1),
                    "steps_s": round(r.steps_s, 1),
                }
                for r in self.runner.runs
            ],
        }


DEMO_SHIFT = (0.3, 5, 30.0)  # brightness, blur, rotate
CANARY_LOOKS = 4  # fleet rounds a canary may take to decide: canary_decision's max_looks


def make_data(drops: str | None, holdback: str | None, seed: int) -> int:
    """Render scikit-learn's digits as the initial drop and hold back later drops and the
    production stream."""
    drops = Path(drops or settings.drops_uri())
    holdback = Path(holdback or settings.cvops_home() / "holdback")
    with progress(1797, "rendering digits") as bar:
        data = write_demo_data(drops, holdback, seed=seed, progress=bar.update)
    print(
        f"demo drop 'initial' ({data.counts['initial']} labelled images, marked complete) "
        f"-> {drops / 'initial'}"
    )
    print(
        "held back for later turns: "
        + ", ".join(f"{k} ({v})" for k, v in data.counts.items() if k != "initial")
        + f" -> {holdback}"
    )
    return 0


def gate_refused(run: RunSummary) -> bool:
    from cvops_pipelines.defs.measure.assets import GATE_CHECK

    return GATE_CHECK in run.checks and not run.checks[GATE_CHECK][0]


def print_curate(run: RunSummary) -> None:
    pool, issues = run.assets.get("labeled_pool", {}), run.assets.get("label_issues", {})
    dataset = run.assets.get("dataset_version", {})
    print(f"\n== curate: {'OK' if run.ok else 'FAILED'} (Dagster run {run.run_id})")
    if pool:
        origins = ", ".join(f"{k} {v}" for k, v in (pool.get("origins") or {}).items())
        print(f"   pool   : {pool['images']} labeled images by origin: {origins}")
    if issues:
        print(
            f"   QA     : {issues['suspects']} suspect labels {issues['suspects_by_reason']} "
            f"-> review {issues['review_csv']}"
        )
    if dataset:
        print(
            f"   dataset: {dataset['version']}: {dataset['train_images']} train / "
            f"{dataset['val_images']} val / {dataset['test_images']} test, "
            f"{dataset['excluded']} excluded"
        )
    print_checks(run)


def print_train(run: RunSummary) -> None:
    model, evaluation = run.assets.get("trained_model", {}), run.assets.get("model_evaluation", {})
    print(
        f"\n== train + evaluate + export: {'OK' if run.ok else 'FAILED'} (Dagster run {run.run_id})"
    )
    if model:
        print(
            f"   model  : {model['model']} on {model['dataset_version']}: best epoch "
            f"{model['best_epoch']}, val accuracy {model['val_accuracy']}, "
            f"{model['train_images_per_second']} train img/s (MLflow run {model['mlflow_run_id']})"
        )
    if evaluation:
        print(
            f"   test   : {evaluation['test_images']} images: accuracy {evaluation['accuracy']}, "
            f"macro-F1 {evaluation['macro_f1']}, ECE {evaluation['ece']} "
            f"(champion: {evaluation['champion']})"
        )
        for line in str(evaluation.get("replay", "")).splitlines():
            print(f"   replay : {line}")
    print_checks(run)
    if gate_refused(run):
        print("   refused: the gate kept the champion; nothing was exported or released")
    export = run.assets.get("onnx_model", {})
    if export:
        print(
            f"   export : {export['source_model']} -> ONNX fp32 parity "
            f"{export['fp32_parity']['max_abs_logit_diff']:.2g} max |logit diff|, "
            f"int8 top-1 agreement {export['int8_parity']['top1_agreement']}"
        )
        for line in export["measurements"].splitlines():
            print(f"            {line}")
        print(f"   chosen : {export['chosen']}")


def print_feedback(runs: list[RunSummary]) -> None:
    for run in runs:
        info = run.assets.get("feedback", {})
        print(f"\n== feedback: {'OK' if run.ok else 'FAILED'} (Dagster run {run.run_id})")
        if info:
            print(
                f"   back   : {info['records']} records ({info['reviewed']} reviewed) in "
                f"{info['accepted_batches']} batches from {info['devices']} devices; "
                f"{info['quarantined_batches']} batches quarantined"
            )


def print_canary(run: RunSummary) -> dict:
    decision = run.assets.get("canary_decision", {})
    print(f"\n== canary: {'OK' if run.ok else 'FAILED'} (Dagster run {run.run_id})")
    if decision:
        reasons = str(decision.get("why", "")).splitlines() or [""]
        print(f"   verdict: {decision['action']}: {reasons[0]}")
        for line in reasons[1:]:
            print(f"            {line}")
    return decision


def print_learn(run: RunSummary) -> dict:
    metrics = run.assets.get("production_metrics", {})
    queue = run.assets.get("annotation_queue", {})
    report = run.assets.get("ontology_report", {})
    print(f"\n== learn: {'OK' if run.success else 'FAILED'} (Dagster run {run.run_id})")
    if metrics:
        print(
            f"   field     : {metrics['records']} records, coverage {metrics['coverage']:.0%} "
            f"reviewed; missed-event share {metrics['missed_event_share']}"
        )
        for line in metrics["per_release"].splitlines():
            print(f"            {line}")
    for name in ("accuracy_sla", "no_output_drift"):
        if name in run.checks:
            passed, why = run.checks[name]
            print(f"   check  : {name} {'passed' if passed else 'FAILED: ' + why}")
    if queue:
        print(
            f"   queue  : {queue['queued']} images to label {queue['by_reason']} in "
            f"{queue['distinct_class_pairs']} class pairs -> {queue['labelstudio_import']}"
        )
    if report:
        print(f"   classes: {report['suggestions']} ontology suggestion(s) (ontology_report)")
    return {"metrics": metrics, "queue": queue}


def channel_releases() -> dict:
    from cvops_pipelines.core.base.store import LocalStore
    from cvops_pipelines.core.ship.release import ReleaseStore

    releases = ReleaseStore(LocalStore(settings.cvops_home()))
    return {c: (releases.channel(c) or {}).get("release") for c in ("stable", "canary")}


def champion_version() -> str | None:

    return loop_tracking().alias_version("champion")


def loop_tracking():
    """This loop's registry (its model name: a detection loop registers cvops-detector)."""
    from cvops_pipelines.core.base.tracking import Tracking

    return Tracking(settings.mlflow_tracking_uri(), model_name=settings.model_name())


def report_turn(turn: dict) -> dict:
    decision = turn["decision"] or {}
    return {
        "release": turn["release"],
        "labels": turn["labels"],
        "wall_s": round(turn["wall_s"], 1),
        "latency_s": None if turn["latency_s"] is None else round(turn["latency_s"], 1),
        "gate": turn["gate"],
        "before": turn["before"],
        "after": turn["after"],
        "canary": {k: decision.get(k) for k in ("action", "why", "paired_records", "paired")},
        "canary_looks": turn["looks"],
        "field_images": len(turn["shots"]),
    }


def per_turn(turns: list[dict], audit: dict[str, float]) -> list[dict]:
    """One row per turn: the labels bought before it trained, what was shipped when it ended
    (the champion) and how that model does on the audit, the gate's and canary's verdicts, the
    turn's wall time and its loop latency (answers landed -> the challenger's signed release)."""
    rows = []
    for number, turn in enumerate(turns, 1):
        gate, shipped = turn["gate"], turn["after"]["champion"]
        rows.append(
            {
                "turn": number,
                "labels": turn["labels"],
                "shipped": f"v{shipped}" if shipped else None,
                "audit_accuracy": audit.get(shipped) if shipped else None,
                "gate": "refused" if gate["refused"] else "passed" if gate["trained"] else "-",
                "gate_replay": gate.get("replay_verdict"),
                "canary": (turn["decision"] or {}).get("action"),
                "wall_s": round(turn["wall_s"], 1),
                "latency_s": None if turn["latency_s"] is None else round(turn["latency_s"], 1),
            }
        )
    return rows


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def audit_shots(holdback: Path, seed: int, shots_per_image: int = 3) -> list[tuple[bytes, str]]:
    """The audit: the held-back drops (which the demo never ingests), each image shot a few
    times under the field's shift. The same images every turn, so turns compare; never seen by
    the pipeline, so nothing it labelled or trained on leaks in."""
    from cvops_pipelines.edge.simulator import Shift, shifted

    images = sorted(p for name in ("drop_2", "drop_3") for p in (holdback / name).glob("*/*.png"))
    out = []
    for k in range(shots_per_image):
        transform = Shift(*DEMO_SHIFT).transform(seed + 7919 * (k + 1))
        out += [(shifted(p.read_bytes(), transform), p.parent.name) for p in images]
    return out


def field_accuracy(metrics: dict, release: str) -> str:
    row = (metrics.get("accuracy_by_release") or {}).get(release)
    if not row or row["accuracy"] is None:
        return "n/a (nothing reviewed)"
    return (
        f"{row['accuracy']:.4f} on {row['reviewed']} reviewed of {row['records']} records "
        f"(coverage {row['coverage']:.0%})"
    )


class Demo:
    """One demo run: its seed, the runs it started and where the time went."""

    def __init__(
        self,
        seed: int = 0,
        annotator=None,
        turns: int = 2,
        explore_share: float | None = None,
        init_from: str | None = None,
    ) -> None:
        from cvops_pipelines.demo.labelstudio import FileAnnotator

        self.seed, self.turns = seed, turns
        self.explore_share, self.init_from = explore_share, init_from  # None: the defaults
        self.annotator = annotator or FileAnnotator()
        self.truth: dict[str, str] = {}  # every field image as shot -> its true label
        self.runner = Runner()
        self.timings = Timings(runner=self.runner)

    def release(self, cohorts: list[str]) -> RunSummary:
        ensure_signing_key()
        release = self.runner.job(
            "release_job",
            run_config={
                "ops": {
                    "edge_release": {
                        "config": {
                            "canary_share": 0.0 if cohorts else 1.0,
                            "canary_cohorts": cohorts,
                        }
                    }
                }
            },
        )
        info = release.assets.get("edge_release", {})
        print(f"\n== release: {'OK' if release.ok else 'FAILED'} (Dagster run {release.run_id})")
        if info:
            canary = info["canary"] or {}
            where = (
                f"canary for {canary['share']:.0%} of devices"
                + (f" + cohorts {', '.join(canary['cohorts'])}" if canary.get("cohorts") else "")
                if canary.get("release") == info["release"]
                else "not on canary"
            )
            delta = info["delta_bytes"]
            print(
                f"   bundle : {info['release']} ({info['artifact']}, {info['model_bytes']} bytes, "
                f"delta {delta if isinstance(delta, int) else delta}) -> {where}"
            )
        return release

    def fleet(self, stream, seed: int, steps: int):
        from cvops_pipelines.core.learn.enrolment import enroller
        from cvops_pipelines.core.ship.release import load_private_key
        from cvops_pipelines.edge.remote import DirRemote
        from cvops_pipelines.edge.simulator import FleetConfig, Shift, run_fleet

        home = settings.cvops_home()
        # The field rotates up to 30 degrees (training augments up to 10) and is blurrier and
        # darker: a shift the first model was not built for, which field labels can teach.
        config = FleetConfig(
            devices=6,
            steps=steps,
            images_per_step=4,
            upload_every=10,
            shift=Shift(*DEMO_SHIFT),
            seed=seed,
        )
        public = settings.signing_key_path().with_suffix(".pub").read_bytes()
        key = load_private_key(settings.signing_key_path())
        enrol = enroller(settings.cvops_store(), key, "cvops-demo (the operator)")
        with self.timings.stage(), progress(config.steps, "fleet", "step") as bar:
            result = run_fleet(
                DirRemote(home), home / "fleet", public, stream, config, bar.update, enrol
            )
        print_fleet(result, config)
        return result

    def audit(self, versions: list[str], shots: list[tuple[bytes, str]]) -> dict[str, float]:
        """Each registered model version on the same production images (as shot), against the
        oracle's truth: what the demo can know and a real site cannot."""
        import numpy as np

        from cvops_pipelines.core.build.training import predict_probs
        from cvops_pipelines.edge.preprocess import load_rgb, resize

        tracking = loop_tracking()
        out = {}
        for version in versions:
            with self.timings.stage():  # the demo's own measurement, not the loop's
                loaded = load(tracking, version=version)
                images = [resize(load_rgb(b), loaded.preprocess.image_size) for b, _ in shots]
                probs = predict_probs(loaded.model, images, loaded.preprocess)
            predicted = np.array(loaded.preprocess.classes)[probs.argmax(1)]
            out[version] = float(np.mean(predicted == np.array([label for _, label in shots])))
        return out

    def annotate(self, queue_info: dict, truth: dict[str, str]) -> list[str]:
        """The oracle answers the queue (its files, or in Label Studio); the answers land as
        marked drops."""
        from cvops_pipelines.demo.data import choice

        with self.timings.stage():
            return self.annotator.answer(self.runner, queue_info["queue_id"], truth, choice)

    def turn(self, number: int, stream, seed: int, steps: int, cohorts: list[str]) -> dict | None:
        """One turn; None when the pipeline itself failed. A refusal (gate, canary) is an
        outcome."""
        print(f"\n######## turn {number}: build -> ship -> measure -> learn")
        before = {**channel_releases(), "champion": champion_version()}
        train_config = {"seed": seed, **({"init_from": self.init_from} if self.init_from else {})}
        trains = self.runner.tick(
            "retraining_sensor", {"ops": {"trained_model": {"config": train_config}}}
        )
        for train in trains:
            print_train(train)
        refused = any(gate_refused(t) for t in trains)
        if any(not t.success and not gate_refused(t) for t in trains):
            return None
        evaluation = trains[-1].assets.get("model_evaluation", {}) if trains else {}
        gate = {
            "trained": bool(trains),
            "refused": refused,
            "model_version": evaluation.get("challenger"),
            "checks": {k: v[0] for t in trains for k, v in t.checks.items()},
            "replay": evaluation.get("replay"),
            "replay_verdict": evaluation.get("replay_verdict"),
            "replay_outcomes": evaluation.get("replay_outcomes"),
        }
        released, released_at = None, None
        if trains and not refused:
            release = self.release(cohorts)
            if not release.ok:
                return None
            released = release.assets["edge_release"]["release"]
            released_at = time.perf_counter()
        fleet, shots, decision, looks = None, [], {}, 0
        while fleet is None or (
            released and decision.get("action") == "wait" and looks < CANARY_LOOKS
        ):
            if fleet is not None:
                print(
                    "\n   canary : keeps collecting: the fleet runs on (the simulator shoots the "
                    "turn's stream again, with new shifts)"
                )
            fleet = self.fleet(stream, seed + 1000 * looks, steps)
            shots += fleet.shots
            self.truth.update(fleet.image_truth)
            feedback = self.runner.tick("feedback_sensor")
            print_feedback(feedback)
            if not feedback or not all(run.success for run in feedback):
                return None
            if released:
                decision, looks = print_canary(self.runner.job("canary_job")), looks + 1
        queue = {} if self.explore_share is None else {"explore_share": self.explore_share}
        learn = print_learn(
            self.runner.job(
                "learn_job", run_config={"ops": {"annotation_queue": {"config": queue}}}
            )
        )
        return {
            "release": released,
            "released_at": released_at,
            "fleet": fleet,
            "shots": shots,
            "decision": decision,
            "gate": gate,
            "looks": looks,
            "before": before,
            "after": {**channel_releases(), "champion": champion_version()},
            **learn,
        }

    def loop(self, report: dict) -> bool:
        """`self.turns` turns. Turn 1 sees the first 40 % of the stream; every later turn the
        rest, shot again with new shifts, as a site sees the same kinds of scenes day after
        day. Between turns the oracle answers the queue and the answers are ingested."""
        stream = production_stream(settings.cvops_home() / "holdback" / "production")
        cut = int(len(stream) * 0.4)
        turns, labels, answered_at = [], 0, None
        for number in range(1, self.turns + 1):
            started = time.perf_counter()
            turn = self.turn(
                number,
                stream[:cut] if number == 1 else stream[cut:],
                self.seed + number - 1,
                steps=20 if number == 1 else 30,
                cohorts=[] if number == 1 else ["site-b"],
            )
            if turn is None:
                return False
            turn.update(labels=labels, wall_s=time.perf_counter() - started)
            turn["latency_s"] = (
                turn["released_at"] - answered_at if answered_at and turn["released_at"] else None
            )
            turns.append(turn)
            report["turns"].append(report_turn(turn))
            if number == self.turns:
                break
            started = time.perf_counter()
            drops = self.annotate(turn["queue"], self.truth)
            labels += int(turn["queue"].get("queued") or 0)
            answered_at = time.perf_counter()
            print(f"\n== ingest {', '.join(drops)} (new_drop_sensor)")
            for run in self.runner.tick("new_drop_sensor"):
                print_ingest(run.partition, run)
            curate = self.runner.job("curate_job")
            print_curate(curate)
            if not curate.success:
                return False
            turn["wall_s"] += time.perf_counter() - started
            report["turns"][-1]["wall_s"] = round(turn["wall_s"], 1)
        self.summary(turns, report)
        return True

    def summary(self, turns: list[dict], report: dict) -> None:
        stable, champion = channel_releases()["stable"], champion_version()
        versions = [
            t["gate"]["model_version"].lstrip("v") for t in turns if t["gate"]["model_version"]
        ]
        with self.timings.stage():
            shots = audit_shots(settings.cvops_home() / "holdback", self.seed)
        audit = self.audit(versions, shots)
        print("\n######## summary")
        for number, turn in enumerate(turns, 1):
            metrics, gate = turn["metrics"], turn["gate"]
            verdict = (
                "refused by the gate"
                if gate["refused"]
                else f"canary {turn['decision'].get('action')}"
                if turn["release"]
                else "no model"
            )
            print(
                f"   turn {number} : {turn['release'] or 'no release'}: field accuracy "
                f"{field_accuracy(metrics, turn['release'] or turn['before']['stable'])}; SLA "
                f"{'met' if metrics.get('sla_ok') else 'missed'}, drift "
                f"{'flagged' if metrics.get('drift_flagged') else 'not flagged'}; {verdict}"
            )
        print(f"   stable : {stable} (MLflow alias champion: v{champion})")
        print(
            f"   audit  : {len(shots)} images the pipeline never saw (the held-back drops, shot "
            "as the field shoots) against the oracle's true labels:"
        )
        for number, version in enumerate(versions, 1):
            print(
                f"            v{version} (turn {number}'s model): accuracy {audit[version]:.4f}"
                + ("   <- shipped (stable)" if version == champion else "")
            )
        rows = per_turn(turns, audit)
        print("\n   per turn (shipped: the champion when the turn ended):")
        print(
            "   turn | labels bought | shipped | audit acc | gate | gate replay | canary | "
            "turn wall s | latency s"
        )
        for row in rows:
            print(
                f"   {row['turn']:>4} | {row['labels']:>13} | {row['shipped'] or '-':>7} | "
                f"{_fmt(row['audit_accuracy'])} | {row['gate']} | {row['gate_replay'] or '-'} | "
                f"{row['canary'] or '-'} | {row['wall_s']} | {_fmt(row['latency_s'], 1)}"
            )
        report.update(
            {
                "stable": stable,
                "champion": champion,
                "audit": audit,
                "turn_models": versions,
                "audit_images": len(shots),
                "per_turn": rows,
            }
        )
        last = turns[-1]
        if not last["metrics"].get("sla_ok"):
            print(
                "            the SLA is still missed: the next turn starts from the new queue "
                f"({last['queue'].get('queued')} images)"
            )

    def run(self, report_path: str | None = None, timings_path: str | None = None) -> int:
        import json

        home = settings.cvops_home()
        print(f"cvops demo: data and artifacts under {home}, Dagster instance in {dagster_home()}")
        if not (Path(settings.drops_uri()) / "initial").exists():
            with self.timings.stage():
                make_data(None, None, self.seed)
        print("\n== ingest drop initial (new_drop_sensor)")
        ingests = self.runner.tick("new_drop_sensor")
        for run in ingests:
            print_ingest("initial", run)
        curate = self.runner.job("curate_job") if ingests and all(r.ok for r in ingests) else None
        if curate:
            print_curate(curate)
        report: dict = {"seed": self.seed, "turns": []}
        ok = curate is not None and curate.ok and self.loop(report)
        timing = self.timings.report()
        report.update({"ok": ok, "timings": timing})
        if report_path:
            Path(report_path).write_text(json.dumps(report, indent=2, default=str))
        print(
            f"\n   time   : {timing['wall_s']} s in all, {timing['stage_compute_s']} s stage "
            f"compute, {timing['orchestration_s']} s orchestration "
            f"({timing['orchestration_share']:.1%}) over "
            f"{timing['dagster_runs']} Dagster runs"
        )
        if timings_path:
            Path(timings_path).write_text(json.dumps(timing, indent=2))
        print("\nwhere to look:")
        print(
            "   Dagster UI : ./dev ui   then http://127.0.0.1:3000 (runs, asset metadata, checks)"
        )
        print(f"   GX reports : {home / 'reports' / 'gx' / 'index.html'}")
        print(
            f"   field      : {home / 'reports' / 'production_metrics'}   annotation queues: "
            f"{home / 'annotation' / 'queues'}"
        )
        print(
            f"   datasets   : {home / 'datasets'}   "
            f"label review: {home / 'reports' / 'label_issues'}"
        )
        print(f"   MLflow     : {mlflow_ui_hint()}")
        print(
            f"   releases   : {home / 'releases'}   fleet state: {home / 'fleet'}   feedback: "
            f"{home / 'feedback'}   quarantine: {home / 'quarantine'}"
        )
        return 0 if ok else 1
