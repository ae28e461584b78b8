"""Self-supervised pretraining (SimCLR) on every ingested image, labeled or not.

No pretrained weights can be downloaded here, but the fleet sends images all day: a contrastive
encoder learns from them what stays the same when position, scale, rotation, colour and light
change, without a single label. Its features feed label QA and it can start a classifier
(`init_from: ssl_encoder`). Plain PyTorch (the SSL libraries worth using are AGPL or heavy); the
encoder is a torchvision classifier of the same name as trained_model's, without its head, so
its tensors load into that classifier as they are.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from cvops_pipelines.core.build.models import IMAGENET_MEAN, IMAGENET_STD, adamw, build_model
from cvops_pipelines.core.build.training import ImageDataset, _hp, make_loader, seed_everything

TASK = "ssl_encoder"


@dataclass(frozen=True)
class SSLConfig:
    architecture: str = _hp(
        "resnet18", "torchvision classification model; trained_model must name the same one."
    )
    image_size: int = _hp(32, "Square input side in pixels while pretraining.")
    epochs: int = _hp(60, "Passes over all images.")
    batch_size: int = _hp(256, "Images per step (each seen twice: more negatives, better).")
    learning_rate: float = _hp(2e-3, "AdamW learning rate (cosine schedule, 2-epoch warm-up).")
    weight_decay: float = _hp(1e-4, "AdamW weight decay.")
    temperature: float = _hp(0.2, "NT-Xent temperature.")
    rotation: float = _hp(
        180.0, "Views turn by up to this many degrees either way (lower it where up matters)."
    )
    seed: int = _hp(0, "Seeds torch, numpy, random and the augmentations.")


@dataclass(frozen=True)
class EncoderSpec:
    """What a consumer needs to embed an image with the encoder (shipped as JSON beside the
    tensors, read with weights_only=True)."""

    architecture: str
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    task: str = TASK

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> EncoderSpec:
        doc = json.loads(text)
        if doc.get("task") != TASK:
            raise ValueError(f"this is a {doc.get('task', 'classification')} model's spec")
        return cls(
            doc["architecture"], int(doc["image_size"]), tuple(doc["mean"]), tuple(doc["std"])
        )


@dataclass
class Pretrained:
    model: object  # the backbone: images -> features
    spec: EncoderSpec
    history: list[dict]
    images_per_second: float = 0.0


def views(image_size: int, seed: int | None = 0, rotation: float = 180.0):
    """Two random views of one image must agree: crop, scale, rotation, light, contrast,
    polarity, blur, noise. What the augmentations vary is what the encoder learns to ignore.

    The background is the shortcut: two crops of one image share its lighting gradient and
    tint, which tell 2,000 images apart as well as their objects do. So each view is turned
    by its own angle (the gradient turns with it), loses its colour, and gets its own light."""
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    return A.Compose(
        [
            A.Affine(rotate=(-rotation, rotation), border_mode=cv2.BORDER_REFLECT_101, p=1.0),
            A.RandomResizedCrop((image_size, image_size), scale=(0.55, 1.0), ratio=(0.8, 1.25)),
            A.Illumination(intensity_range=(0.05, 0.2), p=0.8),
            A.ColorJitter(0.5, 0.5, 0.0, 0.0, p=0.9),
            A.ToGray(p=1.0),
            A.InvertImg(p=0.5),
            A.GaussianBlur(blur_limit=(3, 3), p=0.2),
            A.GaussNoise(std_range=(0.02, 0.1), p=0.5),
            A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
            ToTensorV2(),
        ],
        seed=seed,
    )


class _TwoViews:
    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, image):
        import torch

        return {"image": torch.stack([self.transform(image=image)["image"] for _ in range(2)])}

    def set_random_seed(self, seed: int) -> None:
        self.transform.set_random_seed(seed)


def without_head(model):
    """The classifier with its head replaced by the identity: images -> penultimate features."""
    import torch.nn as nn

    for attr in ("fc", "classifier", "head", "heads"):
        if isinstance(getattr(model, attr, None), nn.Module):
            setattr(model, attr, nn.Identity())
            return model
    raise ValueError(f"{type(model).__name__}: no classifier head to remove")


def backbone(architecture: str):
    return without_head(build_model(architecture, 1))


def penultimate(classifier):
    """A copy of a trained classifier that answers features instead of classes."""
    import copy

    return without_head(copy.deepcopy(classifier)).eval()


def nt_xent(z, temperature: float):
    """SimCLR's loss: rows 2k and 2k+1 are two views of one image, every other row a negative."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(z, dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    partner = torch.arange(len(z), device=z.device) ^ 1
    return F.cross_entropy(similarity, partner)


def pretrain(
    images: list[np.ndarray],
    config: SSLConfig = SSLConfig(),
    device: str = "cpu",
    on_epoch: Callable[[int, dict], None] | None = None,
) -> Pretrained:
    import torch
    import torch.nn as nn

    if len(images) < 2:
        raise ValueError("self-supervised pretraining needs at least 2 images")
    seed_everything(config.seed)
    encoder = backbone(config.architecture).to(device)
    width = encoder(torch.zeros(2, 3, config.image_size, config.image_size, device=device)).shape[1]
    head = nn.Sequential(nn.Linear(width, 512), nn.ReLU(), nn.Linear(512, 128)).to(device)
    loader = make_loader(
        ImageDataset(
            images,
            np.zeros(len(images)),
            _TwoViews(views(config.image_size, config.seed, config.rotation)),
        ),
        min(config.batch_size, len(images)),
        True,
        config.seed,
        0,
    )
    parameters = list(encoder.parameters()) + list(head.parameters())
    optimizer = adamw(parameters, config.learning_rate, config.weight_decay)
    steps = config.epochs * len(loader)
    warmup = min(2 * len(loader), steps // 4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + np.cos(np.pi * s / steps)),
    )
    history, speeds = [], []
    for epoch in range(1, config.epochs + 1):
        encoder.train()
        head.train()
        started, total, seen = time.perf_counter(), 0.0, 0
        for pairs, _ in loader:
            if len(pairs) < 2:
                continue
            batch = pairs.reshape(-1, *pairs.shape[2:]).to(device)  # view pairs interleaved
            loss = nt_xent(head(encoder(batch)), config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(pairs)
            seen += len(pairs)
        speed = seen / max(time.perf_counter() - started, 1e-9)
        speeds.append(speed)
        metrics = {"ssl_loss": total / max(seen, 1), "images_per_second": speed}
        history.append({"epoch": epoch, **metrics})
        if on_epoch:
            on_epoch(epoch, metrics)
    spec = EncoderSpec(config.architecture, config.image_size)
    return Pretrained(encoder.cpu().eval(), spec, history, float(np.median(speeds)))


def load_encoder(state: bytes, spec: EncoderSpec):
    """The backbone from trusted tensors only (`weights_only=True`)."""
    import torch

    model = backbone(spec.architecture)
    model.load_state_dict(torch.load(io.BytesIO(state), map_location="cpu", weights_only=True))
    return model.eval()


def classifier_state(encoder, classifier) -> dict:
    """The classifier's state with the encoder's tensors in place of its own (the head stays
    fresh): how trained_model starts `init_from: ssl_encoder`."""
    state = classifier.state_dict()
    mine = encoder.state_dict()
    missing = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
    if missing:
        raise ValueError(f"the encoder does not fit this classifier ({missing[:3]} ...)")
    return {**state, **mine}


def embed(model, images: list[np.ndarray], spec, batch_size: int = 256) -> np.ndarray:
    """Features of each image (the penultimate layer), L2-normalised. `spec`: the encoder's or a
    classifier's (image size, mean, std)."""
    import torch
    import torch.nn.functional as F

    from cvops_pipelines.core.build.training import augmentation

    transform = augmentation("none", spec.image_size, spec.mean, spec.std)
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.stack(
                [transform(image=im)["image"] for im in images[start : start + batch_size]]
            )
            out.append(F.normalize(model(batch.to(device)), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
