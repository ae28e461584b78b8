"""`cvops-demo --task detection`: one turn of the loop on boxes, hands-off, on scenes the project
renders (demo/scenes.py): ingest a COCO drop, curate (box QA, box contracts), train a detector,
evaluate and gate it, export and prove it, release it to a simulated fleet of cameras that
answer with boxes, operators who fix the boxes, feedback, the canary decision, production
metrics and the annotation queue, and the reviewed frames flowing back into the pool.

It runs as its own loop, `detection` (settings.Project): its data in `<CVOPS_HOME>-detection`
(`.cvops-detection` by default), the ontology `data_contracts/scenes.yaml` (task: detection),
its asset keys and partitions under `detection/`, in the same Dagster instance as the
classification demo, so both show side by side in the UI (workspace.yaml loads this loop's
code location from demo/detection_loop.py) with no shared history.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from cvops_pipelines import settings

# Splits with more room for evaluation than the default 0.8/0.1/0.1: a few hundred scenes of ten
# classes leave the test split a handful of objects per class otherwise (the balance contract
# wants two of each), and the operating point is chosen on validation.
CURATE = {"ops": {"dataset_version": {"config": {"train": 0.7, "val": 0.15, "test": 0.15}}}}
LOOP = "detection"


def detection_project() -> settings.Project:
    """The detection demo's loop, beside the default one."""
    return settings.Project.named(
        LOOP,
        ontology=settings.REPO_ROOT / "data_contracts" / "scenes.yaml",
        model_name="cvops-detector",
    )


def use_detection_project() -> None:
    """Before anything reads the environment: this process runs the detection loop."""
    if os.environ.get("CVOPS_LOOP") != LOOP:
        os.environ.update(detection_project().environment())


@dataclass(frozen=True)
class DetectionDemoConfig:
    scenes: int = 320  # the labelled drop
    frames: int = 120  # production frames the fleet shoots
    devices: int = 3
    review_share: float = 0.7  # frames an operator reviews
    epochs: int = 10
    learning_rate: float = 0.004  # a short schedule from scratch: a higher peak than the default
    seed: int = 0


@dataclass
class FleetOutcome:
    frames: int = 0
    reviewed: int = 0
    boxes_answered: int = 0
    edits: dict = field(default_factory=lambda: {"added": 0, "deleted": 0, "relabelled": 0})
    uploaded_records: int = 0


def review(answer: list[dict], truth: list[dict], edits: dict, min_score: float) -> None:
    """Count what an operator changes to turn the device's confident boxes into the truth."""
    from cvops_pipelines.core.base.box_metrics import matches

    shown = [b for b in answer if b["score"] >= min_score]
    hits, _ = matches(shown, truth, min_score)
    relabelled, _ = matches(
        [{**b, "label": "*"} for b in shown],
        [{**t, "label": "*"} for t in truth],
        min_score,
    )
    relabelled -= hits
    edits["relabelled"] += relabelled
    edits["deleted"] += len(shown) - hits - relabelled
    edits["added"] += len(truth) - hits - relabelled


def run_detection_fleet(config: DetectionDemoConfig, frames, store_root: Path) -> FleetOutcome:
    """Cameras (enrolled on first boot) sync the canary, answer every frame with boxes; an
    operator reviews a share of the frames and leaves the true box set; each camera uploads."""
    from cvops_pipelines.core.learn.enrolment import enroller
    from cvops_pipelines.core.ship.release import load_private_key
    from cvops_pipelines.edge.agent import EdgeAgent
    from cvops_pipelines.edge.remote import DirRemote

    public = settings.signing_key_path().with_suffix(".pub").read_bytes()
    enrol = enroller(
        settings.cvops_store(), load_private_key(settings.signing_key_path()), "cvops-demo"
    )
    rng, outcome = random.Random(config.seed), FleetOutcome()
    for d in range(config.devices):
        device = f"cam-{d + 1:02d}"
        agent = EdgeAgent(
            store_root / "fleet" / device, DirRemote(store_root), public, device, f"line-{d % 2}"
        )
        enrol(device, agent.public_key_pem())
        agent.sync()
        threshold = float((agent.spec or {}).get("answer_threshold", 0.5))
        for scene in frames[d :: config.devices]:
            answer = agent.predict(scene.png())
            outcome.frames += 1
            outcome.boxes_answered += sum(b["score"] >= threshold for b in answer.boxes)
            if rng.random() < config.review_share:
                truth = [
                    {"label": label, "box": [float(v) for v in box]}
                    for label, box in zip(scene.labels, scene.boxes)
                ]
                review(answer.boxes, truth, outcome.edits, threshold)
                agent.correct_boxes(answer.record_id, truth)
                outcome.reviewed += 1
        outcome.uploaded_records += agent.upload().records
        agent.close()
    return outcome


def run(config: DetectionDemoConfig, report_path: str | None = None) -> int:
    from cvops_pipelines.demo import scenes
    from cvops_pipelines.demo.harness import Timings
    from cvops_pipelines.runs import (
        Runner,
        dagster_home,
        ensure_signing_key,
        print_ingest,
    )

    home, runner = settings.cvops_home(), Runner()
    timings = Timings(runner=runner)
    print(
        f"cvops demo (detection): loop {LOOP!r}, data under {home}, "
        f"Dagster instance in {dagster_home()}"
    )
    drop = Path(settings.drops_uri()) / "scenes-initial"
    if not drop.exists():
        with timings.stage():
            scenes.write_drop(drop, scenes.scenes(config.scenes, config.seed))
    steps: dict[str, bool] = {}

    def ok(name: str, runs) -> bool:
        runs = runs if isinstance(runs, list) else [runs]
        steps[name] = bool(runs) and all(r.ok for r in runs)
        return steps[name]

    print("\n== ingest drop scenes-initial (new_drop_sensor)")
    ingests = runner.tick("new_drop_sensor")
    for r in ingests:
        print_ingest(drop.name, r)
    if not ok("ingest", ingests):
        return _finish(1, steps, timings, report_path)
    curate = runner.job("curate_job", run_config=CURATE)
    pool, dataset = curate.assets.get("labeled_pool", {}), curate.assets.get("dataset_version", {})
    print(
        f"\n== curate: {pool.get('images')} images, {pool.get('boxes')} boxes, "
        f"{pool.get('images_without_objects')} without objects (kept as negatives); dataset "
        f"{dataset.get('version')} ({dataset.get('train_images')} train / "
        f"{dataset.get('val_images')} val / {dataset.get('test_images')} test); checks "
        + ", ".join(f"{k} {'ok' if v[0] else 'FAILED: ' + v[1]}" for k, v in curate.checks.items())
    )
    if not ok("curate", curate):
        return _finish(1, steps, timings, report_path)

    detector = {
        "detector": {
            "epochs": config.epochs,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
        }
    }
    trains = runner.tick("retraining_sensor", {"ops": {"trained_model": {"config": detector}}})
    for train in trains:
        model = train.assets.get("trained_model", {})
        evaluation = train.assets.get("model_evaluation", {})
        export = train.assets.get("onnx_model", {})
        print(
            f"\n== train + evaluate + export (Dagster run {train.run_id}): {model.get('model')}, "
            f"val mAP {model.get('val_map')}, answering at score >= "
            f"{model.get('answer_threshold')}; test mAP {evaluation.get('map')}, mAP@.5 "
            f"{evaluation.get('map_50')}; gate: "
            + "; ".join(
                f"{k}: {'passed' if v[0] else 'FAILED ' + v[1]}" for k, v in train.checks.items()
            )
            + f"; export: {export.get('chosen')}"
        )
    if not ok("train", trains):
        return _finish(1, steps, timings, report_path)

    ensure_signing_key()
    release = runner.job(
        "release_job",
        run_config={"ops": {"edge_release": {"config": {"canary_share": 1.0}}}},
    )
    info = release.assets.get("edge_release", {})
    print(f"\n== release: {info.get('release')} ({info.get('artifact')}) on canary")
    if not ok("release", release):
        return _finish(1, steps, timings, report_path)

    frames = scenes.scenes(
        config.frames, config.seed + 7919, scenes.SceneConfig(noise=0.09, p_empty=0.15)
    )
    with timings.stage():
        fleet = run_detection_fleet(config, frames, home)
    print(
        f"\n== fleet: {config.devices} cameras answered {fleet.frames} frames "
        f"({fleet.boxes_answered} boxes at the release's operating point); operators reviewed "
        f"{fleet.reviewed} "
        f"(added {fleet.edits['added']}, deleted {fleet.edits['deleted']}, relabelled "
        f"{fleet.edits['relabelled']} boxes); {fleet.uploaded_records} records uploaded, signed"
    )
    feedback = runner.tick("feedback_sensor")
    for r in feedback:
        got = r.assets.get("feedback", {})
        print(
            f"\n== feedback (Dagster run {r.run_id}): {got.get('records')} records, "
            f"{got.get('reviewed')} reviewed, {got.get('quarantined_batches')} batches quarantined"
        )
    if not ok("feedback", feedback):
        return _finish(1, steps, timings, report_path)
    canary = runner.job("canary_job")
    decision = canary.assets.get("canary_decision", {})
    print(f"\n== canary: {decision.get('action')} ({decision.get('why')})")
    if not ok("canary", canary):
        return _finish(1, steps, timings, report_path)
    learn = runner.job("learn_job")
    metrics = learn.assets.get("production_metrics", {})
    queue = learn.assets.get("annotation_queue", {})
    print(
        f"\n== learn: {metrics.get('reviewed')} of {metrics.get('records')} frames reviewed; "
        f"per release:\n{metrics.get('per_release')}\n   drift:\n{metrics.get('drift')}\n"
        f"   annotation queue {queue.get('queue_id')}: {queue.get('queued')} frames "
        f"{queue.get('by_reason')} -> {queue.get('labelstudio_import')}\n   checks: "
        + ", ".join(f"{k} {'ok' if v[0] else 'failed: ' + v[1]}" for k, v in learn.checks.items())
    )
    steps["learn"] = learn.success  # an SLA missed is an outcome the turn reports, not a failure
    again = runner.job("curate_job", run_config=CURATE)
    grown = again.assets.get("labeled_pool", {})
    print(
        f"\n== curate again: the pool now holds {grown.get('images')} images "
        f"({grown.get('feedback_labeled')} reviewed field frames as box labels); dataset "
        f"{again.assets.get('dataset_version', {}).get('version')}"
    )
    steps["curate_again"] = again.success
    return _finish(0 if all(steps.values()) else 1, steps, timings, report_path)


def _finish(code: int, steps: dict, timings, report_path: str | None) -> int:
    timing = timings.report()
    print(
        f"\n   time   : {timing['wall_s']} s in all over {timing['dagster_runs']} Dagster runs; "
        f"steps {steps}"
    )
    print(
        f"\nwhere to look:\n   Dagster UI : ./dev ui (code location cvops-{LOOP}, assets under "
        f"{LOOP}/; the classification demo's loop is the location cvops)"
    )
    if report_path:
        Path(report_path).write_text(
            json.dumps({"ok": code == 0, "steps": steps, "timings": timing}, indent=2)
        )
    return code
