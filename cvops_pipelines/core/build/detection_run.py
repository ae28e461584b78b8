"""One tracked detector training run: the same MLflow run, dataset input, model files and
`challenger` registration as a classifier's (core/build/run.py), with mAP on the validation split
as the run's judge."""

from __future__ import annotations

from dataclasses import asdict, replace
from time import perf_counter

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.handoffs import TrainedModelRecord
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.base.tracking import Tracking
from cvops_pipelines.core.build.detection_training import (
    DetectorConfig,
    DetectorSpec,
    predict_torch,
    train_detector,
)
from cvops_pipelines.core.build.registry import load
from cvops_pipelines.core.build.tracked import Log, TrainedModel, tracked_run
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


def train_detector_tracked(
    tracking: Tracking,
    store: Store,
    rows: pd.DataFrame,
    config: DetectorConfig,
    device: str,
    tags: dict,
    log: Log,
) -> TrainedModel:
    from cvops_pipelines.core.base.box_metrics import (
        evaluate_detections,
        operating_point,
    )

    tracking.check()
    version = str(rows["dataset_version"].iloc[0])
    classes = detection_classes(rows)
    train, val = rows[rows["split"] == "train"], rows[rows["split"] == "val"]
    log(f"loading {len(train) + len(val)} images of {version}; training a detector on {device}")
    train_images, train_truth = load_scenes(store, train)
    val_images, val_truth = load_scenes(store, val)
    index = {c: i + 1 for i, c in enumerate(classes)}  # 0 is background
    tags = {**tags, "dataset_version": version, "task": "detection"}
    spec = DetectorSpec.of(config, classes)
    params = {
        **asdict(config),
        "task": "detection",
        "device": device,
        "classes": len(classes),
        "train_images": len(train),
        "val_images": len(val),
        "train_boxes": int(train["n_boxes"].sum()),
    }
    title = f"train {config.architecture} on {version}"
    with tracked_run(tracking, title, tags, params, config.epochs, log, rows, store) as run:
        started = perf_counter()
        model = train_detector(
            train_images,
            [t["boxes"] for t in train_truth],
            [[index[c] for c in t["labels"]] for t in train_truth],
            len(classes),
            config,
            lambda epoch, loss: run.epoch(epoch, {"train_loss": loss}),
            device,
        )
        seconds = perf_counter() - started
        val_found = predict(model, val_images, spec)
        report = evaluate_detections(val_found, val_truth, classes)
        point = operating_point(val_found, val_truth, classes)
        spec = replace(spec, answer_threshold=round(point.threshold, 4))
        metrics = {
            "val_map": report.map,
            "val_map_50": report.map_50,
            "answer_threshold": spec.answer_threshold,
            "val_precision_50": point.precision,
            "val_recall_50": point.recall,
        }
        log(
            f"validation: mAP {report.map:.3f}, mAP@.5 {report.map_50:.3f}; answering at score "
            f">= {spec.answer_threshold} (best F1 {point.f1:.3f}: precision "
            f"{point.precision:.3f}, recall {point.recall:.3f})"
        )
        run.finish(model, spec, metrics)
    model_version = run.register("challenger", tags)
    record = TrainedModelRecord(
        task="detection",
        model_name=tracking.model_name,
        model_version=model_version,
        run_id=run.run_id,
        dataset_version=version,
        dataset_images=len(rows),
        architecture=config.architecture,
        image_size=config.image_size,
        classes=list(classes),
        best_epoch=config.epochs,
        stopped_early=False,
        train_images_per_second=len(train) * config.epochs / max(seconds, 1e-9),
        validation={
            "map": report.map,
            "map_50": report.map_50,
            "precision_50": point.precision,
            "recall_50": point.recall,
        },
        answer_threshold=spec.answer_threshold,
        config=asdict(config),
    )
    return TrainedModel(
        record,
        pd.DataFrame(run.history),
        pd.DataFrame(),
        config,
        tracking.run_url(run.run_id),
        tracking.model_version_url(model_version),
    )


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
