"""Transfer-learning training in plain functions: data, augmentation presets, one epoch, fit.

Configuration is one typed object passed down; determinism is explicit (seeds for torch, numpy,
random and every loader worker); the device is explicit (`auto` picks cuda, then mps, then cpu).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cvops_pipelines.core.build.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRECISIONS,
    Preprocess,
    adamw,
    autocast,
    build_model,
    pick_precision,
    set_train_mode,
)

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

AUGMENTATIONS = ("none", "light", "strong")


def _hp(default, help: str):
    """A hyperparameter: declared once here, shown by the trained_model asset's config and the
    torchrun entry point's --help alike."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    architecture: str = _hp(
        "resnet18",
        "Any torchvision classification model by name (resnet18, mobilenet_v3_small, ...).",
    )
    weights: str = _hp(
        "none",
        "torchvision weights enum name (IMAGENET1K_V1, DEFAULT, ...) read "
        "from $TORCH_HOME/hub/checkpoints; 'none' trains from scratch.",
    )
    freeze_backbone: bool = _hp(False, "Fine-tune the head only (tiny OTA deltas).")
    freeze_before: str = _hp(
        "",
        "Freeze every parameter before the first whose name starts with this (e.g. layer3 of a "
        "resnet): the early backbone keeps its start and its backward pass is skipped; '' = none.",
    )
    image_size: int = _hp(64, "Square input side in pixels.")
    epochs: int = _hp(10, "Epochs at most (early stopping may end sooner).")
    batch_size: int = _hp(64, "Images per step (per process under torchrun).")
    learning_rate: float = _hp(2e-3, "AdamW learning rate (cosine schedule).")
    weight_decay: float = _hp(1e-4, "AdamW weight decay.")
    augmentation: str = _hp("light", f"albumentations preset: {', '.join(AUGMENTATIONS)}.")
    label_smoothing: float = _hp(
        0.0, "Cross-entropy label smoothing (0.1 tempers what noisy labels teach)."
    )
    seed: int = _hp(0, "Seeds torch, numpy, random and every loader worker.")
    patience: int = _hp(3, "Early stopping: epochs without a better validation loss.")
    device: str = _hp("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps.")
    workers: int = _hp(0, "DataLoader worker processes (0 = in the training process).")
    precision: str = _hp(
        "fp32",
        "Training arithmetic: fp32; bf16 (mixed precision: weights, validation and the exported "
        "model stay fp32); auto (bf16 where the device computes it natively: a CPU with AVX-512 "
        "BF16 or AMX, a CUDA GPU with bf16; else fp32). bf16 trains 1.5-1.8x faster on such a "
        "CPU, but cost audit accuracy on the demo's shifted field (docs/benchmarks.md).",
    )
    images_per_epoch: int = _hp(
        0,
        "0 = every train image each epoch; else each epoch draws this many at random (a "
        "fresh draw per epoch), so an epoch's time stays flat as the pool grows (one process "
        "only: under torchrun every rank reads its whole shard).",
    )
    ema_epochs: float = _hp(
        4.0,
        "Keep an exponential moving average of the weights over about "
        "this many epochs (it is what validation judges and what "
        "ships); 0 = off.",
    )

    def __post_init__(self) -> None:
        if self.images_per_epoch < 0:
            raise ValueError(
                f"images_per_epoch must be >= 0 (0: every train image), got {self.images_per_epoch}"
            )
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"augmentation must be one of {AUGMENTATIONS}, got {self.augmentation!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class FitResult:
    model: object
    preprocess: Preprocess
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    train_images_per_second: float = 0.0


def augmentation(
    preset: str, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int | None = 0
):
    """albumentations pipelines; no flips (they change the meaning of digits, text, arrows).
    Seeded: albumentations 2 draws from its own generators, not numpy's global one."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    steps = []
    if preset in ("light", "strong"):
        steps += [
            A.Affine(
                scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-10, 10), fill=255, p=0.8
            ),
            A.RandomBrightnessContrast(0.2, 0.2, p=0.5),
        ]
    if preset == "strong":
        steps += [
            A.GaussianBlur(blur_limit=(3, 5), p=0.3),
            A.GaussNoise(std_range=(0.02, 0.08), p=0.3),
        ]
    steps += [A.Resize(image_size, image_size), A.Normalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(steps, seed=seed)


class ImageDataset:
    """In-memory RGB uint8 images + class indices, transformed on access."""

    def __init__(self, images: list[np.ndarray], labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(image=self.images[index])["image"], int(self.labels[index])


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    """Each loader worker gets its own reproducible stream (derived from the loader's seed)."""
    import torch

    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info.dataset.transform.set_random_seed(seed)


def distributed() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed was initialised (e.g. by torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    workers: int,
    shard: bool = False,
    per_epoch: int = 0,
):
    """`shard`: under DDP each rank reads its own 1/world of the data (DistributedSampler).
    `per_epoch` > 0 (shuffled, one process): each epoch draws that many images at random. A
    training epoch whose last batch would hold one image drops it: batch norm cannot train on
    a single image (a train split of 321 at batch 32 would otherwise fail every run)."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    generator = torch.Generator().manual_seed(seed)
    rank, world = distributed()
    sampler = None
    if shard and world > 1:
        sampler = DistributedSampler(dataset, world, rank, shuffle=shuffle, seed=seed)
    elif shuffle and 0 < per_epoch < len(dataset):
        sampler = RandomSampler(dataset, num_samples=per_epoch, generator=generator)
    per_rank = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        drop_last=shuffle and per_rank % batch_size == 1,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        worker_init_fn=_worker_init,
        persistent_workers=workers > 0,
    )


def train_one_epoch(
    model,
    loader,
    optimizer,
    loss_fn,
    device: str,
    epoch: int = 0,
    after_step: Callable[[], None] | None = None,
    precision: str = "fp32",
) -> dict:
    set_train_mode(model)
    total_loss, correct, seen = 0.0, 0, 0
    started = time.perf_counter()
    if hasattr(loader.sampler, "set_epoch"):  # DDP: a new shuffle per epoch, the same on every rank
        loader.sampler.set_epoch(epoch)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(images)
            loss = loss_fn(logits, labels)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
    elapsed = time.perf_counter() - started
    if distributed()[1] > 1:  # every rank saw a shard: report the whole epoch
        import torch
        import torch.distributed as dist

        totals = torch.tensor([total_loss, correct, seen], dtype=torch.float64)
        dist.all_reduce(totals)
        total_loss, correct, seen = totals[0].item(), int(totals[1]), int(totals[2])
    return {
        "train_loss": total_loss / seen,
        "train_accuracy": correct / seen,
        "train_images": seen,
        "train_images_per_second": seen / elapsed if elapsed else 0.0,
    }


def evaluate(model, loader, device: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """(metrics, softmax probabilities, labels) without gradient."""
    import torch
    import torch.nn.functional as F

    model.eval()
    probs, labels, loss = [], [], 0.0
    with torch.no_grad():
        for images, targets in loader:
            logits = model(images.to(device))
            loss += F.cross_entropy(logits, targets.to(device), reduction="sum").item()
            probs.append(F.softmax(logits, 1).cpu().numpy())
            labels.append(targets.numpy())
    p, y = np.concatenate(probs), np.concatenate(labels)
    return {"val_loss": loss / len(y), "val_accuracy": float((p.argmax(1) == y).mean())}, p, y


def fit(
    train: tuple[list[np.ndarray], np.ndarray],
    val: tuple[list[np.ndarray], np.ndarray] | None,
    classes: list[str],
    config: TrainConfig,
    device: str = "cpu",
    on_epoch: Callable[[int, dict], None] | None = None,
    initial_state: dict | None = None,
) -> FitResult:
    """Train, keep the weights of the best validation epoch, stop after `patience` epochs
    without improvement in validation loss; with no `val`, train every epoch and keep the last
    (averaged) weights. `initial_state` continues from an earlier model of the same
    architecture and classes (e.g. the champion: with `freeze_backbone`, only the head changes
    and the OTA delta stays tiny)."""
    import copy

    import torch

    seed_everything(config.seed)
    precision = pick_precision(config.precision, device)
    preprocess = Preprocess(
        config.architecture, config.image_size, IMAGENET_MEAN, IMAGENET_STD, tuple(classes)
    )
    model = build_model(
        config.architecture,
        len(classes),
        config.weights,
        config.freeze_backbone,
        config.freeze_before,
    )
    if initial_state is not None:
        model.load_state_dict(initial_state)
    model = model.to(device)
    rank, world = distributed()
    trained = model
    if world > 1:  # torchrun: gradients averaged across ranks; validation is the same on each
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(
            model, device_ids=[device] if device.startswith("cuda") else None
        )
    train_loader = make_loader(
        ImageDataset(
            *train, augmentation(config.augmentation, config.image_size, seed=config.seed + rank)
        ),
        config.batch_size,
        True,
        config.seed,
        config.workers,
        shard=True,
        per_epoch=config.images_per_epoch,
    )
    val_loader = None
    if val is not None:
        val_loader = make_loader(
            ImageDataset(*val, augmentation("none", config.image_size)),
            config.batch_size,
            False,
            config.seed,
            config.workers,
        )
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(parameters, config.learning_rate, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    result = FitResult(model, preprocess)
    best_loss, best_state, waited, speeds = float("inf"), None, 0, []
    averaged = None
    if config.ema_epochs > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        # never longer than 40% of the run: a short run's early weights are not worth keeping
        horizon = min(config.ema_epochs, 0.4 * config.epochs) * max(1, len(train_loader))
        decay = 1 - 1 / max(1.0, horizon)
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    for epoch in range(1, config.epochs + 1):
        averaging = averaged is not None and epoch > 1  # the first epoch's weights start it
        metrics = train_one_epoch(
            trained,
            train_loader,
            optimizer,
            loss_fn,
            device,
            epoch,
            (lambda: averaged.update_parameters(model)) if averaging else None,
            precision,
        )
        if averaged is not None and epoch == 1:
            averaged.update_parameters(model)
        judged = averaged.module if averaged is not None else model
        scheduler.step()
        if val_loader is not None:
            metrics.update(evaluate(judged, val_loader, device)[0])
        metrics["learning_rate"] = scheduler.get_last_lr()[0]
        speeds.append(metrics["train_images_per_second"])
        result.history.append({"epoch": epoch, **metrics})
        if on_epoch:
            on_epoch(epoch, metrics)
        if val_loader is None:  # the last weights
            best_state, result.best_epoch = judged.state_dict(), epoch
        elif metrics["val_loss"] < best_loss - 1e-6:
            best_loss, best_state, waited = (
                metrics["val_loss"],
                copy.deepcopy(judged.state_dict()),
                0,
            )
            result.best_epoch = epoch
        else:
            waited += 1
            if waited >= config.patience:
                result.stopped_early = True
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    result.model = model.eval()
    result.train_images_per_second = float(np.median(speeds)) if speeds else 0.0
    return result


def predict_probs(
    model,
    images: list[np.ndarray],
    preprocess: Preprocess,
    device: str = "cpu",
    batch_size: int = 128,
    views: int = 0,
) -> np.ndarray:
    """Softmax probabilities; `views` > 0 averages them with that many seeded "light"
    augmentations of each image (test-time augmentation: smoother probabilities, which is what
    confident learning's per-class thresholds read)."""
    import torch
    import torch.nn.functional as F

    size, mean, std = preprocess.image_size, preprocess.mean, preprocess.std
    transforms = [augmentation("none", size, mean, std)] + [
        augmentation("light", size, mean, std, seed=view) for view in range(views)
    ]
    model = model.to(device).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            summed = 0
            for transform in transforms:
                batch = torch.stack([transform(image=im)["image"] for im in chunk])
                summed = summed + F.softmax(model(batch.to(device)), 1).cpu().numpy()
            out.append(summed / len(transforms))
    return np.concatenate(out) if out else np.zeros((0, len(preprocess.classes)))


def search_space(trials: int, seed: int) -> list[dict]:
    """Seeded log-uniform samples of learning rate and weight decay (the two that matter most
    when fine-tuning); trial 0 is always the base configuration's own values."""
    rng = np.random.default_rng(seed)
    return [
        {
            "learning_rate": float(10 ** rng.uniform(-4, -2)),
            "weight_decay": float(10 ** rng.uniform(-5, -2)),
        }
        for _ in range(trials)
    ]


def hyperparameter_search(
    train,
    val,
    classes: list[str],
    base: TrainConfig,
    trials: int,
    epochs_per_trial: int,
    device: str = "cpu",
    on_trial: Callable[[int, dict, FitResult], None] | None = None,
) -> tuple[dict, list[dict]]:
    """Short runs over `search_space`; returns (best overrides, one row per trial)."""
    from dataclasses import replace

    rows, candidates = (
        [],
        [{"learning_rate": base.learning_rate, "weight_decay": base.weight_decay}],
    )
    candidates += search_space(max(0, trials - 1), base.seed)
    for index, overrides in enumerate(candidates):
        config = replace(base, epochs=epochs_per_trial, **overrides)
        result = fit(train, val, classes, config, device)
        best = result.history[result.best_epoch - 1]
        rows.append(
            {
                "trial": index,
                **overrides,
                "val_loss": best["val_loss"],
                "val_accuracy": best["val_accuracy"],
            }
        )
        if on_trial:
            on_trial(index, overrides, result)
    winner = min(rows, key=lambda r: r["val_loss"])
    return {"learning_rate": winner["learning_rate"], "weight_decay": winner["weight_decay"]}, rows
