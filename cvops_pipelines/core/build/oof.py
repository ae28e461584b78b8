"""Out-of-fold fine-tuning: a network trained k times, each image judged by the one copy that
never saw it.

This is the label QA scorer for images where neither raw pixels nor a linear probe on
embeddings know the classes well enough (benchmarks/label_qa.py, the objects set): confident
learning needs out-of-fold probabilities close to the truth, and on such images only a
fine-tuned network gets there. It costs k trainings, so label_issues runs it only when asked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from cvops_pipelines.core.build.training import TrainConfig, fit, predict_probs

# What fine-tunes well on a few thousand small images in minutes on a CPU (measured in
# benchmarks/ssl_label_efficiency.py: 0.96 test accuracy on the objects set with 2,000 labels);
# the labels it learns from are the suspect ones, so the loss is label-smoothed.
OOF_TRAINING = TrainConfig(
    image_size=32,
    epochs=30,
    batch_size=32,
    patience=30,
    augmentation="strong",
    label_smoothing=0.1,
)
VAL_SHARE = 0.1  # of each fold's training images: model selection never sees the judged fold


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
) -> np.ndarray:
    """Probabilities (images x classes) in which row i comes from the model of the fold that
    held image i out. The folds are sklearn's StratifiedKFold(folds, shuffle, seed), the same
    split the other label QA candidates use, so their accuracies compare row for row.
    `on_fold(fold, held_out_indices)` reports progress before each training."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    probs = np.zeros((len(images), len(classes)), dtype=np.float32)
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for fold, (train_idx, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        if on_fold:
            on_fold(fold, held_out)
        counts = np.bincount(labels[train_idx])
        stratified = counts[counts > 0].min() >= 2  # else a class too small to split
        fit_idx, val_idx = train_test_split(
            train_idx,
            test_size=max(len(classes) if stratified else 1, round(VAL_SHARE * len(train_idx))),
            stratify=labels[train_idx] if stratified else None,
            random_state=seed + fold,
        )
        result = fit(
            ([images[i] for i in fit_idx], labels[fit_idx]),
            ([images[i] for i in val_idx], labels[val_idx]),
            classes,
            replace(config, seed=seed + fold),
            device,
            None,
            initial_state,
        )
        probs[held_out] = predict_probs(
            result.model, [images[i] for i in held_out], result.preprocess, device
        )
    return probs
