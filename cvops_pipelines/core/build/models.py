"""Torchvision classifiers for transfer learning, with weights from the local torch cache only.

Any torchvision classification architecture works by name; pretrained weights are named by their
torchvision enum (`IMAGENET1K_V1`, `DEFAULT`, ...) and read from $TORCH_HOME/hub/checkpoints/. A
file not there is fetched once through torch.hub's download with its hash check (the sha256
prefix in the published file name), unless CVOPS_OFFLINE is set. Models are saved as state dicts
plus a JSON preprocessing spec and loaded with `weights_only=True`: no pickled code ever crosses
a boundary.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotAvailable(FileNotFoundError):
    """Requested pretrained weights are not in the local torch cache and could not be fetched."""


DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: an offline machine fails fast, not in minutes


def offline() -> bool:
    """The operator's switch (CVOPS_OFFLINE=1): never reach the internet for weights."""
    return os.environ.get("CVOPS_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def fetch_weights(url: str, path: Path) -> None:
    """Download `url` to `path` through torch.hub, which checks the sha256 prefix torchvision
    publishes in each file name and writes through a temp file: a partial or tampered download
    never lands in the cache."""
    import socket
    import urllib.error

    import torch.hub

    match = torch.hub.HASH_REGEX.search(os.path.basename(url))
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(
            url, str(path), hash_prefix=match.group(1) if match else None, progress=True
        )
    except (urllib.error.URLError, OSError) as exc:
        raise WeightsNotAvailable(f"could not download {url}: {exc}") from exc
    except RuntimeError as exc:  # torch.hub's hash mismatch
        raise WeightsNotAvailable(f"{url} failed its hash check, not cached: {exc}") from exc
    finally:
        socket.setdefaulttimeout(previous)


@dataclass(frozen=True)
class Preprocess:
    """Everything a runtime needs to turn an image into the model's input."""

    architecture: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...]
    task: str = "classification"  # every spec names its task (a runtime picks its head by it)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        doc = json.loads(text)
        task = doc.get("task", "classification")
        if task != "classification":  # same keys as a detector's spec: never read one as this
            raise ValueError(f"this is a {task} model's spec, not a classifier's")
        return cls(
            doc["architecture"],
            int(doc["image_size"]),
            tuple(doc["mean"]),
            tuple(doc["std"]),
            tuple(doc["classes"]),
        )


def torch_cache_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(architecture: str, weights: str):
    """(torchvision weights enum member, path in the local cache), or None for random init."""
    if weights.lower() in ("", "none"):
        return None
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(architecture)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"unknown torchvision architecture {architecture!r}") from exc
    try:
        member = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError:
        raise ValueError(
            f"{architecture} has no weights {weights!r}; available: "
            f"DEFAULT, {', '.join(m.name for m in enum)}"
        ) from None
    path = torch_cache_dir() / os.path.basename(member.url)
    if path.exists():
        return member, path
    fix = (
        f"put {path.name} (from {member.url}) in {path.parent} (or set TORCH_HOME to a cache "
        "that has it), or train with weights='none'"
    )
    if offline():
        raise WeightsNotAvailable(
            f"pretrained weights {architecture}/{member.name} are not cached and CVOPS_OFFLINE "
            f"is set: {fix}"
        )
    try:
        fetch_weights(member.url, path)
    except WeightsNotAvailable as exc:
        raise WeightsNotAvailable(
            f"pretrained weights {architecture}/{member.name} are not cached and {exc}: {fix}"
        ) from None
    return member, path


def build_model(
    architecture: str,
    num_classes: int,
    weights: str = "none",
    freeze_backbone: bool = False,
    freeze_before: str = "",
):
    """A torchvision classifier with a fresh head for `num_classes`.

    Pretrained tensors are read from the cache with `weights_only=True` (torchvision's own
    loader would unpickle the file); the architecture still comes from torchvision by name.
    """
    import torch
    import torchvision.models as tvm

    if architecture not in tvm.list_models(module=tvm):
        raise ValueError(
            f"unknown torchvision classification model {architecture!r}; e.g. "
            "resnet18, mobilenet_v3_small, efficientnet_b0, convnext_tiny"
        )
    resolved = resolve_weights(architecture, weights)
    if resolved is None:
        model = tvm.get_model(architecture, weights=None)
    else:
        member, path = resolved
        model = tvm.get_model(
            architecture, weights=None, num_classes=len(member.meta["categories"])
        )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    head_name, _ = _replace_head(model, num_classes)
    if freeze_backbone:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(head_name)
    if freeze_before:
        names = [name for name, _ in model.named_parameters()]
        first = next((i for i, n in enumerate(names) if n.startswith(freeze_before)), None)
        if first is None:
            raise ValueError(
                f"freeze_before {freeze_before!r} names no parameter of {architecture} (its "
                f"parameters start {', '.join(dict.fromkeys(n.split('.')[0] for n in names))})"
            )
        for _, parameter in list(model.named_parameters())[:first]:
            parameter.requires_grad = False
    return model


def adamw(parameters, lr: float, weight_decay: float):
    """AdamW, fused where PyTorch has the kernel (CPU, CUDA): the same update in one pass over
    the weights, which on a CPU is much of a small-image step (benchmarks/optimizer_step.py:
    1.37x the images per CPU-second of resnet18 at 32 px, batch 32; 1.05x at 64 px, batch 64)."""
    import torch

    parameters = list(parameters)
    fused = bool(parameters) and all(p.device.type in ("cpu", "cuda") for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


def set_train_mode(model) -> None:
    """Train mode, except batch-norm layers whose parameters are frozen keep their running
    statistics: a frozen backbone then stays bit-identical, which keeps OTA deltas tiny."""
    import torch.nn as nn

    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def _replace_head(model, num_classes: int):
    """Swap the last Linear layer of the classifier for one with `num_classes` outputs."""
    import torch.nn as nn

    for attr in ("fc", "classifier", "head", "heads"):
        block = getattr(model, attr, None)
        if block is None:
            continue
        if isinstance(block, nn.Linear):
            new = nn.Linear(block.in_features, num_classes)
            setattr(model, attr, new)
            return attr, new
        linears = [(name, m) for name, m in block.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            name, last = linears[-1]
            new = nn.Linear(last.in_features, num_classes)
            parent = block
            *path, leaf = name.split(".")
            for part in path:
                parent = getattr(parent, part)
            setattr(parent, leaf, new)
            return f"{attr}.{name}", new
    raise ValueError(f"{type(model).__name__}: no Linear classifier head found")


def state_dict_bytes(model) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def load_model(state: bytes, preprocess: Preprocess):
    """Rebuild the architecture and load trusted tensors only (`weights_only=True`)."""
    import torch

    model = build_model(preprocess.architecture, len(preprocess.classes))
    model.load_state_dict(torch.load(io.BytesIO(state), map_location="cpu", weights_only=True))
    return model.eval()


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


PRECISIONS = ("auto", "fp32", "bf16")


def pick_precision(requested: str, device: str) -> str:
    """auto: bf16 mixed precision where the device computes bf16 natively (a CPU with AVX-512
    BF16 or AMX, where the classifier's loop ran about 1.5x its fp32 speed: see
    benchmarks/training_precision.py; a CUDA GPU with bf16), else fp32: emulated bf16 is
    slower than fp32."""
    import torch

    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device == "cpu":
        native = (
            getattr(torch.cpu, name, lambda: False)()
            for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
        return "bf16" if any(native) else "fp32"
    return "fp32"


def autocast(device: str, precision: str):
    """The forward pass (and loss) in bf16 under `precision` bf16; the weights, their gradients
    and the optimizer state stay fp32, and what is exported is fp32."""
    import torch

    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16")
