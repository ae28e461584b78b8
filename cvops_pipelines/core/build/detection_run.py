"""One tracked detector training run: the same MLflow run, dataset input, model files and
`challenger` registration as a classifier's (core/build/run.py), with mAP on the validation split
as the run's judge."""

from __future__ import annotations

from dataclasses import asdict, replace
from time import perf_counter

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.base.tracking import Tracking
from cvops_pipelines.core.build.detection_training import (
    ARCHITECTURES,
    DetectorConfig,
    DetectorSpec,
    build_detector,
    predict_torch,
    state_from_encoder,
    train_detector,
)
from cvops_pipelines.core.build.registry import load
from cvops_pipelines.core.build.run import (
    RunPlan,
    Start,
    Trainer,
    TrainInputs,
    auto_start,
    registered_state,
)
from cvops_pipelines.core.build.tracked import Log, TrainedModel, tracked_run, trained_model
from cvops_pipelines.core.build.training import FitResult
from cvops_pipelines.core.curate.dataset import images_trained_on
from cvops_pipelines.core.curate.detection_pool import box_rows, decode
from cvops_pipelines.edge.preprocess import load_rgb


def detection_classes(rows: pd.DataFrame) -> list[str]:
    """The detector's classes: every class with a box in the dataset version, sorted."""
    return sorted(box_rows(rows)["label"].unique())


def load_scenes(store: Store, rows: pd.DataFrame) -> tuple[list[np.ndarray], list[dict]]:
    """Stored originals as oriented RGB arrays at their own size (boxes are in those pixels),
    with their truth as {"boxes", "labels"}."""
    images = [np.asarray(load_rgb(store.read_bytes(key))) for key in rows["key"]]
    truths = []
    for text in rows["boxes"]:
        boxes, labels = decode(text)
        truths.append({"boxes": boxes.astype(np.float32), "labels": labels})
    return images, truths


def predict(model, images: list[np.ndarray], spec: DetectorSpec) -> list[dict]:
    """torchvision's inference at the spec's input side, boxes in each image's pixels, classes
    by name (what the metrics and label QA read)."""
    out = []
    for found in predict_torch(model, images, spec.image_size):
        out.append(
            {
                "boxes": found["boxes"],
                "scores": found["scores"],
                "labels": [spec.classes[i - 1] for i in found["labels"]],
            }
        )
    return out


def train_detector_in_process(inputs: TrainInputs) -> FitResult:
    """The default detector trainer: this process, one device (under torchrun, this process's
    shard: `train_detector`)."""
    images, truth = load_scenes(inputs.store, inputs.rows[inputs.rows["split"] == "train"])
    return fit_scenes(
        images,
        truth,
        inputs.classes,
        inputs.config,
        inputs.device,
        inputs.on_epoch,
        inputs.initial_state,
    )


def fit_scenes(
    images, truth, classes, config: DetectorConfig, device: str, on_epoch, initial_state=None
) -> FitResult:
    """A detector trained on decoded scenes and their truth; `on_epoch(epoch, metrics)`."""
    index = {c: i + 1 for i, c in enumerate(classes)}  # 0 is background
    history: list[dict] = []

    def report(epoch: int, loss: float) -> None:
        history.append({"epoch": epoch, "train_loss": loss})
        on_epoch(epoch, {"train_loss": loss})

    started = perf_counter()
    model = train_detector(
        images,
        [t["boxes"] for t in truth],
        [[index[c] for c in t["labels"]] for t in truth],
        len(classes),
        config,
        report,
        device,
        initial_state,
    )
    seconds = perf_counter() - started
    return FitResult(
        model,
        DetectorSpec.of(config, classes),
        history,
        best_epoch=config.epochs,
        train_images_per_second=len(images) * config.epochs / max(seconds, 1e-9),
    )


def initial_detector_state(
    tracking: Tracking, plan: RunPlan, config: DetectorConfig, classes: list[str], log: Log
) -> Start:
    """`init_from` for a detector: a registered detector of the same architecture and classes
    (auto: the champion's while the ontology is unchanged), or the ssl_encoder in its backbone
    (a fresh head and extra layers)."""
    if plan.init_from == "none":
        return Start("none")
    if plan.init_from == "auto":
        return auto_start(tracking, config.architecture, classes, log)
    if plan.init_from != "ssl_encoder":
        state = registered_state(tracking, plan.init_from, config.architecture, classes, log)
        return Start(plan.init_from if state is not None else "none", state)
    from cvops_pipelines.core.build.ssl_run import init_from_encoder

    def transplant(encoder, detector) -> dict:
        state, started, total = state_from_encoder(encoder, detector)
        log(
            f"the backbone starts with {started} of its {total} tensors from the encoder "
            f"({total - started} of MobileNetV3's reduced last stage stay fresh)"
        )
        return state

    state = init_from_encoder(
        tracking,
        build_detector(len(classes), config),
        ARCHITECTURES[config.architecture],
        log,
        transplant,
        f"{config.architecture}'s backbone",
    )
    return Start("ssl_encoder" if state is not None else "none", state)


def train_detector_tracked(
    tracking: Tracking,
    store: Store,
    rows: pd.DataFrame,
    config: DetectorConfig,
    plan: RunPlan,
    tags: dict,
    log: Log,
    trainer: Trainer = train_detector_in_process,
    trainer_params: dict | None = None,
) -> TrainedModel:
    """A classifier's tracked run (core/build/run.py) for a detector: the same `init_from`,
    search and trainers (in process or torchrun), with validation mAP as the judge and the
    operating point (the score that maximises validation F1) in the spec."""
    from cvops_pipelines.core.base.box_metrics import evaluate_detections, operating_point

    tracking.check()
    version = str(rows["dataset_version"].iloc[0])
    classes = detection_classes(rows)
    train, val = rows[rows["split"] == "train"], rows[rows["split"] == "val"]
    log(f"training a detector on {len(train)} images of {version} on {plan.device}")
    if plan.search_trials > 0 and trainer is not train_detector_in_process:
        raise ValueError("a hyperparameter search runs in the asset's process: search_trials 0")
    tags = {**tags, "dataset_version": version, "task": "detection"}
    start = initial_detector_state(tracking, plan, config, classes, log)
    config = start.config(config, plan)
    params = {
        **asdict(config),
        "task": "detection",
        "device": plan.device,
        "classes": len(classes),
        "init_from": plan.init_from,
        "started_from": start.source,
        "train_images": len(train),
        "val_images": len(val),
        "train_boxes": int(train["n_boxes"].sum()),
        **(trainer_params or {}),
    }
    title = f"train {config.architecture} on {version}"
    with tracked_run(tracking, title, tags, params, config.epochs, log, rows, store) as run:
        val_images, val_truth = load_scenes(store, val)
        trials = pd.DataFrame()
        if plan.search_trials > 0:
            config, trials = _search(
                tracking, store, rows, classes, config, plan, tags, log, (val_images, val_truth)
            )
            run.epochs = config.epochs
        result = trainer(
            TrainInputs(
                store, rows, classes, config, plan.device, run.epoch, start.state, run.run_id
            )
        )
        spec = result.preprocess
        val_found = predict(result.model, val_images, spec)
        report = evaluate_detections(val_found, val_truth, classes)
        point = operating_point(val_found, val_truth, classes)
        spec = replace(spec, answer_threshold=round(point.threshold, 4))
        result = replace(result, preprocess=spec)
        validation = {
            "map": report.map,
            "map_50": report.map_50,
            "precision_50": point.precision,
            "recall_50": point.recall,
        }
        log(
            f"validation: mAP {report.map:.3f}, mAP@.5 {report.map_50:.3f}; answering at score "
            f">= {spec.answer_threshold} (best F1 {point.f1:.3f}: precision "
            f"{point.precision:.3f}, recall {point.recall:.3f})"
        )
        closing = {f"val_{k}": v for k, v in validation.items()}
        run.finish(result.model, spec, {**closing, "answer_threshold": spec.answer_threshold})
    model_version = run.register("challenger", tags)
    return trained_model(
        "detection",
        run,
        model_version,
        rows,
        config,
        result,
        validation,
        trials,
        spec.answer_threshold,
    )


def _log_step(tracking: Tracking):
    return lambda epoch, metrics: tracking.log_metrics(metrics, step=epoch)


def search_space(trials: int, seed: int) -> list[dict]:
    """Seeded log-uniform learning rates (what decides a short detector run most); trial 0 is
    always the base configuration's own."""
    rng = np.random.default_rng(seed)
    return [{"learning_rate": float(10 ** rng.uniform(-3.5, -2))} for _ in range(trials)]


def _search(
    tracking: Tracking, store, rows, classes, config: DetectorConfig, plan: RunPlan, tags, log, val
) -> tuple[DetectorConfig, pd.DataFrame]:
    """Short runs (`search_epochs` each, each a nested MLflow run) judged by validation mAP
    (`val`: its decoded scenes and truth); the winner's learning rate trains the full run."""
    from cvops_pipelines.core.base.box_metrics import evaluate_detections

    val_images, val_truth = val
    images, truth = load_scenes(store, rows[rows["split"] == "train"])  # once for every trial
    candidates = [{"learning_rate": config.learning_rate}]
    candidates += search_space(plan.search_trials - 1, config.seed)
    out = []
    for index, overrides in enumerate(candidates):
        trial = replace(config, epochs=plan.search_epochs, **overrides)
        with tracking.start_run(f"trial {index}", tags, nested=True):
            tracking.log_params(overrides)
            result = fit_scenes(images, truth, classes, trial, plan.device, _log_step(tracking))
            found = predict(result.model, val_images, result.preprocess)
            report = evaluate_detections(found, val_truth, classes)
            tracking.log_metrics({"val_map": report.map, "val_map_50": report.map_50})
        out.append(
            {"trial": index, **overrides, "val_map": report.map, "val_map_50": report.map_50}
        )
        log(f"search trial {index}: {overrides} -> val mAP {report.map:.4f}")
    winner = max(out, key=lambda row: row["val_map"])
    best = {"learning_rate": winner["learning_rate"]}
    tracking.log_params({f"searched_{k}": v for k, v in best.items()})
    return replace(config, **best), pd.DataFrame(out)


def reviewer_predictions(
    tracking, store, pool: pd.DataFrame, alias: str, log
) -> tuple[dict[str, dict], float | None]:
    """(the `alias` model's boxes on the pool images it did not train on, its operating point).
    Its run's dataset version says which images it trained on: a model agrees with its own
    training labels, so those would hide their issues. Empty, None without such a model."""
    loaded = load(tracking, alias=alias)
    if loaded is None or getattr(loaded.preprocess, "task", "") != "detection":
        log(f"no detector registered as {alias!r} yet: box QA runs its model-free checks only")
        return {}, None
    fresh = pool[~pool["image_id"].isin(images_trained_on(tracking, store, loaded))]
    log(
        f"reviewing {len(fresh)} images with {alias} v{loaded.version} "
        f"({len(pool) - len(fresh)} it trained on are left to the model-free checks)"
    )
    images, _ = load_scenes(store, fresh)
    found = predict(loaded.model, images, loaded.preprocess)
    return dict(zip(fresh["image_id"], found)), loaded.preprocess.answer_threshold
