"""Self-supervised start vs scratch: test accuracy of a classifier trained on 5%, 20% and 100%
of the labels, the same epochs, seeds and everything else.

Data: demo/objects.py (a digit glyph at a random position, scale, rotation and colour on a
noisy, unevenly lit background): 2,000 training images, 300 validation and 1,000 test images
from separate seeds of the generator. The encoder is pretrained once (SimCLR, core/build/ssl.py)
on the 2,000 training images plus 2,000 unlabeled "field" images, never on a label, validation
or test image; each run then trains a resnet18 at 32 px on a class-stratified share of the
training labels, from that encoder (`init_from: ssl_encoder`) or from scratch.
"""

import time
from dataclasses import asdict, replace

import numpy as np

from cvops_pipelines.core.build.ssl import SSLConfig
from cvops_pipelines.core.build.training import TrainConfig

SSL = SSLConfig(image_size=32, epochs=60, batch_size=128)
TRAIN = TrainConfig(image_size=32, epochs=30, batch_size=32, patience=30, augmentation="strong")
FRACTIONS = (0.05, 0.2, 1.0)


def _share(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A class-stratified share of the indices (at least 2 per class)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        out += list(rng.choice(members, max(2, round(fraction * len(members))), replace=False))
    return np.array(sorted(out))


def run(quick: bool = False) -> dict:
    from cvops_pipelines.core.build.models import build_model
    from cvops_pipelines.core.build.ssl import classifier_state, pretrain
    from cvops_pipelines.core.build.training import fit, predict_probs
    from cvops_pipelines.demo.objects import CLASSES, objects

    n, field, n_test = (600, 600, 300) if quick else (2000, 2000, 1000)
    seeds = [0] if quick else [0, 1, 2]
    ssl = replace(SSL, epochs=max(2, SSL.epochs // 10)) if quick else SSL
    train_config = replace(TRAIN, epochs=max(2, TRAIN.epochs // 5)) if quick else TRAIN
    train, labels = objects(n, seed=100)
    unlabeled, _ = objects(field, seed=200)
    val, val_labels = objects(300, seed=300)
    test, test_labels = objects(n_test, seed=400)
    started = time.perf_counter()
    encoder = pretrain(
        train + unlabeled,
        ssl,
        on_epoch=lambda e, m: print(f"ssl epoch {e}: {m['ssl_loss']:.4f}", flush=True),
    )
    pretrain_s = time.perf_counter() - started
    runs = []
    for fraction in FRACTIONS:
        for seed in seeds:
            chosen = _share(labels, fraction, seed)
            data = ([train[i] for i in chosen], labels[chosen])
            config = replace(train_config, seed=seed)
            row = {"fraction": fraction, "seed": seed, "labels": len(chosen)}
            for start in ("scratch", "ssl_encoder"):
                initial = (
                    classifier_state(encoder.model, build_model(config.architecture, 10))
                    if start == "ssl_encoder"
                    else None
                )
                began = time.perf_counter()
                result = fit(data, (val, val_labels), CLASSES, config, "cpu", None, initial)
                probs = predict_probs(result.model, test, result.preprocess)
                row[start] = round(float((probs.argmax(1) == test_labels).mean()), 4)
                row[f"{start}_s"] = round(time.perf_counter() - began, 1)
            row["gain_points"] = round(100 * (row["ssl_encoder"] - row["scratch"]), 2)
            print(row, flush=True)
            runs.append(row)
    summary = {
        str(fraction): {
            key: round(float(np.mean([r[key] for r in runs if r["fraction"] == fraction])), 4)
            for key in ("scratch", "ssl_encoder", "gain_points")
        }
        for fraction in FRACTIONS
    }
    return {
        "benchmark": "ssl_label_efficiency",
        "train_images": n,
        "unlabeled_field_images": field,
        "val_images": len(val),
        "test_images": len(test),
        "seeds": seeds,
        "ssl": {**asdict(ssl), "pretrain_s": round(pretrain_s, 1)},
        "train": asdict(train_config),
        "mean_test_accuracy": summary,
        "runs": runs,
        "target": "at 5% labels, ssl_encoder start >= scratch + 10 points",
    }
