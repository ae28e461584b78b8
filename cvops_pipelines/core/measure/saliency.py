"""Grad-CAM: where in the image the classifier looked for the class it was asked about.

A reviewer who sees a wrong answer wants to know whether the model looked at the object or at
the background; the overlay answers that at a glance. Hook-based (a forward hook keeps the
feature map, autograd gives its gradient), for any torchvision classifier: the map is the last
one at least `min_side` pixels on a side, so a 64px resnet's 2x2 last stage is not the answer.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _feature_layer(model, image_size: int, min_side: int):
    """The last module whose output is a feature map at least `min_side` on a side."""
    import torch

    seen: list = []
    hooks = [
        m.register_forward_hook(
            lambda module, _, out: (
                seen.append(module)
                if isinstance(out, torch.Tensor)
                and out.dim() == 4
                and min(out.shape[2:]) >= min_side
                else None
            )
        )
        for m in model.modules()
        if not list(m.children())  # leaves only: a block's output is its last leaf's, or a sum
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__}: no feature map of side >= {min_side}")
    return seen[-1]


def grad_cam(model, batch, targets: list[int], image_size: int, min_side: int = 4) -> np.ndarray:
    """Heatmaps in [0, 1] (N x image_size x image_size) for class `targets[i]` of image i.
    `batch` is the model's preprocessed input (N x 3 x S x S)."""
    import torch
    import torch.nn.functional as F

    model = model.eval()
    layer = _feature_layer(model, image_size, min_side)
    kept: dict = {}

    def keep(_, __, out):
        out.retain_grad()
        kept["maps"] = out

    hook = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(batch.detach().clone().requires_grad_(True))
            chosen = logits[torch.arange(len(targets)), torch.as_tensor(targets)]
            chosen.sum().backward()
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    maps, grads = kept["maps"], kept["maps"].grad
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * maps).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=(image_size, image_size), mode="bilinear", align_corners=False)
    cam = cam[:, 0].detach().numpy()
    peak = cam.reshape(len(cam), -1).max(1)[:, None, None]
    return np.where(peak > 0, cam / np.maximum(peak, 1e-12), 0.0)


def saliency(model, images: list[np.ndarray], targets: list[int], preprocess) -> np.ndarray:
    """Grad-CAM for RGB uint8 images, preprocessed as the classifier's spec says."""
    import torch

    from cvops_pipelines.core.build.training import augmentation

    if not images:
        return np.zeros((0, preprocess.image_size, preprocess.image_size))
    transform = augmentation("none", preprocess.image_size, preprocess.mean, preprocess.std)
    batch = torch.stack([transform(image=im)["image"] for im in images])
    return grad_cam(model.cpu(), batch, targets, preprocess.image_size)


def _jet(heat: np.ndarray) -> np.ndarray:
    """A blue-to-red colour ramp (no matplotlib on the hot path)."""
    r = np.clip(1.5 - np.abs(4 * heat - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * heat - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * heat - 1), 0, 1)
    return np.stack([r, g, b], -1)


def overlay(
    image: np.ndarray, heat: np.ndarray, side: int = 128, alpha: float = 0.35
) -> Image.Image:
    """The image with the heatmap over it, `side` pixels square."""
    base = np.asarray(Image.fromarray(image).convert("RGB").resize((side, side)), np.float64) / 255
    hot = Image.fromarray((heat * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    colour = _jet(np.asarray(hot, np.float64) / 255)
    mixed = (1 - alpha) * base + alpha * colour
    return Image.fromarray((mixed * 255).round().astype(np.uint8))


def overlay_png(image: np.ndarray, heat: np.ndarray, side: int = 128) -> bytes:
    out = io.BytesIO()
    overlay(image, heat, side).save(out, "PNG")
    return out.getvalue()


def grid_png(tiles: list[tuple[np.ndarray, np.ndarray, str]], columns: int = 4) -> bytes:
    """Overlays with a caption each (image, heatmap, caption), in a grid: one picture for the
    asset's metadata."""
    import matplotlib

    from cvops_pipelines.core.base.plots import _png

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(tiles) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.45 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (image, heat, caption) in zip(axes.ravel(), tiles):
        ax.imshow(overlay(image, heat))
        ax.set_title(caption, fontsize=7)
    return _png(plt, fig)


def examples_png(
    model,
    images: list[np.ndarray],
    probs: np.ndarray,
    labels: np.ndarray,
    preprocess,
    wrong: int = 8,
    unsure: int = 4,
) -> tuple[bytes | None, int]:
    """(grid, tiles): the most confidently wrong and the least confident right answers, each
    with a map of what the model looked at for the class it answered; None when there are none."""
    classes = list(preprocess.classes)
    answered, confidence = probs.argmax(1), probs.max(1)
    misses = np.flatnonzero(answered != labels)
    misses = misses[np.argsort(-confidence[misses], kind="stable")][:wrong]
    hits = np.flatnonzero(answered == labels)
    hits = hits[np.argsort(confidence[hits], kind="stable")][:unsure]
    chosen = list(misses) + list(hits)
    if not chosen:
        return None, 0
    heat = saliency(
        model, [images[i] for i in chosen], [int(answered[i]) for i in chosen], preprocess
    )
    tiles = [
        (
            images[i],
            heat[k],
            f"{'WRONG' if answered[i] != labels[i] else 'unsure'}: said {classes[answered[i]]} "
            f"({confidence[i]:.2f}), is {classes[labels[i]]}",
        )
        for k, i in enumerate(chosen)
    ]
    return grid_png(tiles), len(tiles)


def explain(loaded, store, keys: list[str], batch_size: int = 64) -> list[tuple]:
    """(image, heatmap, caption) per stored image: where a registered classifier looked for the
    class it answers, for a reviewer deciding whether to trust that answer."""
    from cvops_pipelines.core.base.images import load_images
    from cvops_pipelines.core.build.training import predict_probs

    spec = loaded.preprocess
    images = load_images(store, keys, spec.image_size)
    probs = predict_probs(loaded.model, images, spec)
    answered = probs.argmax(1) if len(probs) else np.zeros(0, int)
    heat = np.concatenate(
        [
            saliency(
                loaded.model,
                images[start : start + batch_size],
                answered[start : start + batch_size].tolist(),
                spec,
            )
            for start in range(0, len(images), batch_size)
        ]
        or [np.zeros((0, spec.image_size, spec.image_size))]
    )
    return [
        (
            images[i],
            heat[i],
            f"v{loaded.version}: {spec.classes[answered[i]]} ({probs[i].max():.2f})",
        )
        for i in range(len(images))
    ]


def write_overlays(store, prefix: str, image_ids: list[str], explained: list[tuple]) -> dict:
    """One overlay PNG per image under `prefix/`; returns image_id -> key."""
    keys = {}
    for image_id, (image, heat, _) in zip(image_ids, explained):
        keys[image_id] = f"{prefix}/{image_id}.png"
        store.write_bytes(keys[image_id], overlay_png(image, heat))
    return keys


SHOWN = 12  # overlays in the metadata grid; every one is in the files and the Label Studio tasks


def saliency_metadata(explained: list[tuple], model, what: str) -> dict:
    """How review tables (label QA, the annotation queue) show their Grad-CAM overlays."""
    from cvops_pipelines.core.base.report import Plot

    if model is None:
        return {"saliency": f"no champion classifier yet: no Grad-CAM overlays for the {what}"}
    if not explained:
        return {"saliency": f"no {what}"}
    return {  # the picture first: the UI lists metadata in this order
        "saliency": Plot(grid_png(explained[:SHOWN]), f"Grad-CAM of the {what}"),
        "saliency_by": f"champion v{model.version}: where it looked for the class it answers",
    }
