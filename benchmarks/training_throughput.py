"""Training throughput (images/s): the trained_model asset's loop vs a plain PyTorch loop.

Same run, same model (resnet18 from scratch, 10 classes), same batch size, same albumentations
preset and image size, same images (demo digits rendered as the demo renders them). The two
loops alternate epoch by epoch so drift in the machine's speed hits both; the ratio of medians
is the figure (target >= 0.9). The asset's loop is `core.training.train_one_epoch` on the loader
`fit` builds, which is what `trained_model` runs; `fit_images_per_second` adds the end-to-end
figure including per-epoch validation, early-stopping bookkeeping and checkpointing the best state.
"""

import time

import numpy as np

from cvops_pipelines.core.build.training import (
    ImageDataset,
    TrainConfig,
    augmentation,
    fit,
    make_loader,
    seed_everything,
    train_one_epoch,
)
from cvops_pipelines.demo.data import render_digit


def _data(n: int, size: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [
        np.asarray(render_digit(digits.images[i]).convert("RGB").resize((size, size)))
        for i in range(n)
    ]
    return images, digits.target[:n].astype(int)


def _plain_epoch(model, loader, optimizer) -> float:
    import torch.nn.functional as F

    model.train()
    seen, started = 0, time.perf_counter()
    for images, labels in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen / (time.perf_counter() - started)


def run(quick: bool = False) -> dict:
    import torch
    import torchvision

    n, rounds = (256, 2) if quick else (1024, 5)
    config = TrainConfig(image_size=64, batch_size=64, augmentation="light", epochs=rounds)
    images, labels = _data(n, config.image_size)
    seed_everything(0)

    def loader():
        dataset = ImageDataset(images, labels, augmentation(config.augmentation, config.image_size))
        return make_loader(dataset, config.batch_size, True, config.seed, config.workers)

    from cvops_pipelines.core.build.models import build_model

    asset_model = build_model(config.architecture, 10)
    plain_model = torchvision.models.resnet18(num_classes=10)
    asset_opt = torch.optim.AdamW(asset_model.parameters(), lr=config.learning_rate)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=config.learning_rate)
    asset_loader, plain_loader = loader(), loader()
    loss_fn = torch.nn.CrossEntropyLoss()
    train_one_epoch(asset_model, asset_loader, asset_opt, loss_fn, "cpu")  # warm-up, both
    _plain_epoch(plain_model, plain_loader, plain_opt)
    asset, plain = [], []
    for _ in range(rounds):
        asset.append(
            train_one_epoch(asset_model, asset_loader, asset_opt, loss_fn, "cpu")[
                "train_images_per_second"
            ]
        )
        plain.append(_plain_epoch(plain_model, plain_loader, plain_opt))
    split = int(0.85 * n)
    started = time.perf_counter()
    result = fit(
        (images[:split], labels[:split]),
        (images[split:], labels[split:]),
        [str(c) for c in range(10)],
        config,
    )
    fit_wall = time.perf_counter() - started
    ratio = float(np.median(asset) / np.median(plain))
    return {
        "benchmark": "training_throughput",
        "images": n,
        "rounds": rounds,
        "model": "resnet18",
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "augmentation": config.augmentation,
        "torch_threads": torch.get_num_threads(),
        "asset_loop_images_per_second": [round(x, 1) for x in asset],
        "plain_loop_images_per_second": [round(x, 1) for x in plain],
        "ratio_of_medians": round(ratio, 3),
        "target": ">= 0.9",
        "met": ratio >= 0.9,
        "fit_images_per_second_incl_validation": round(split * len(result.history) / fit_wall, 1),
    }
