"""Out-of-fold fine-tuning: a network trained k times, each image judged by the one copy that
never saw it.

This is the label QA scorer for images where neither raw pixels nor a linear probe on
embeddings know the classes well enough (benchmarks/label_qa.py, the objects set): confident
learning needs out-of-fold probabilities close to the truth, and on such images only a
fine-tuned network gets there. It costs k trainings, so label_issues runs it only when the cheap
scorers cannot judge, and within a time budget: a short timed probe says what an epoch costs on
this machine, and the folds train as many epochs as fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from cvops_pipelines.core.build.training import TrainConfig, fit, predict_probs
from cvops_pipelines.core.curate.label_qa import ScorerDeclined

# What fine-tunes well on a few thousand small images in minutes on a CPU (measured in
# benchmarks/ssl_label_efficiency.py: 0.96 test accuracy on the objects set with 2,000 labels);
# the labels it learns from are the suspect ones, so the loss is label-smoothed, and no split of
# them picks an epoch: each fold trains on all its images and keeps its last averaged weights.
OOF_TRAINING = TrainConfig(
    image_size=32,
    epochs=30,
    batch_size=32,
    patience=30,
    augmentation="strong",
    label_smoothing=0.1,
)
# From a self-supervised encoder the folds converge in fewer epochs than from scratch. On the
# objects set of benchmarks/label_qa.py (one thread, 2,000 images) 5 folds x 20 epochs at
# batch 32 in fp32, with 10% of each fold held for picking an epoch, cost 10-11.5
# CPU-minutes for F1 0.79 over 3 seeds; a fold's cost grows with the images it trains on, so
# k folds cost about k - 1 times the pool: 4 folds x 16 epochs at batch 64 (half the
# optimizer steps) in bf16 where the CPU computes it cost 4.3 for F1 0.82 (3 folds x 20
# epochs, 1,333 images a fold and not 1,500, gave 0.78 on seed 1 where 4 x 16 gave 0.82).
# Freezing the early backbone (layer3 onwards trained) cost 10 points of agreement there.
ENCODER_FOLDS = 4
ENCODER_EPOCHS = 16
ENCODER_BATCH = 64
# Each held-out image is judged on itself and this many light augmentations of it, averaged:
# the same models' smoother probabilities are what confident learning's per-class thresholds
# read (same benchmark, 3 folds: F1 0.78 with one view, 0.82 with 4 on seed 0; 0.78 with 4,
# 0.79 with 8 on seed 1), for seconds of inference.
VIEWS = 8
MIN_EPOCHS = 3  # fewer and the folds' models are too young to judge labels: decline instead
PROBE_BATCHES = 4


def fold_recipe(
    epochs: int | None = None, architecture: str | None = None, image_size: int = 0
) -> TrainConfig:
    """What each fold trains with: from an encoder (its `architecture` and input size; None:
    from scratch) fewer epochs, bigger batches, bf16 where native. `epochs` overrides the
    count."""
    if architecture is None:
        return replace(OOF_TRAINING, epochs=epochs or OOF_TRAINING.epochs)
    return replace(
        OOF_TRAINING,
        architecture=architecture,
        image_size=image_size,
        epochs=epochs or ENCODER_EPOCHS,
        batch_size=ENCODER_BATCH,
        precision="auto",
    )


def epochs_within(budget_s: float, epoch_s: float, wanted: int) -> int:
    """Epochs (of every fold together) that fit `budget_s`; ScorerDeclined when not even
    MIN_EPOCHS do."""
    fits, least = budget_s / max(epoch_s, 1e-9), min(MIN_EPOCHS, wanted)  # inf: no limit
    if not fits >= least:  # NaN too
        raise ScorerDeclined(
            f"fine-tuning out of fold would take about {epoch_s * least / 60:.1f} min for "
            f"{least} epochs on this machine, over its budget of "
            f"{budget_s / 60:.1f} min (raise finetune_budget_minutes, or run label_issues "
            "where there is a GPU)"
        )
    return int(min(wanted, fits))


def probe_epoch_seconds(
    images: list[np.ndarray],
    labels: np.ndarray,
    classes: list[str],
    folds: int,
    config: TrainConfig,
    initial_state: dict | None,
    device: str,
) -> float:
    """Seconds one epoch of every fold will take, from the second of two short timed epochs on
    a few batches (the first pays for warm-up)."""
    n = min(len(images), PROBE_BATCHES * config.batch_size)
    probe = replace(config, epochs=2, patience=2, ema_epochs=0.0, images_per_epoch=0)
    sample = (images[:n], labels[:n])
    result = fit(sample, None, classes, probe, device, None, initial_state)
    per_image = 1.0 / max(result.history[-1]["train_images_per_second"], 1e-9)
    # each fold trains on (folds - 1) / folds of the images; predicting its held-out fold (a
    # forward pass per view, about a third of a training step each) is noise beside that
    return per_image * len(images) * (folds - 1)


def finetuned_oof_probabilities(
    images: list[np.ndarray],
    labels: np.ndarray,
    classes: list[str],
    folds: int,
    seed: int,
    config: TrainConfig = OOF_TRAINING,
    initial_state: dict | None = None,
    device: str = "cpu",
    on_fold: Callable[[int, np.ndarray], None] | None = None,
    budget_s: float | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> np.ndarray:
    """Probabilities (images x classes) in which row i comes from the model of the fold that
    held image i out. The folds are sklearn's StratifiedKFold(folds, shuffle, seed): the split
    repeats, and with the other label QA candidates' fold count it is theirs.
    `on_fold(fold, held_out_indices)` reports progress before each training. `budget_s`: the
    folds train as many of `config.epochs` as a timed probe says fit (ScorerDeclined if fewer
    than MIN_EPOCHS)."""
    from sklearn.model_selection import StratifiedKFold

    if budget_s is not None:
        epoch_s = probe_epoch_seconds(images, labels, classes, folds, config, initial_state, device)
        epochs = epochs_within(budget_s, epoch_s, config.epochs)
        log(
            f"fine-tuning {folds} folds x {epochs} epochs (about {epoch_s * epochs / 60:.1f} min "
            f"on {device}; budget {budget_s / 60:.1f} min)"
        )
        config = replace(config, epochs=epochs, patience=min(config.patience, epochs))
    probs = np.zeros((len(images), len(classes)), dtype=np.float32)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for fold, (train_idx, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        if on_fold:
            on_fold(fold, held_out)
        result = fit(
            ([images[i] for i in train_idx], labels[train_idx]),
            None,
            classes,
            replace(config, seed=seed + fold),
            device,
            None,
            initial_state,
        )
        probs[held_out] = predict_probs(
            result.model, [images[i] for i in held_out], result.preprocess, device, views=VIEWS
        )
    return probs
