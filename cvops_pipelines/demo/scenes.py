"""Detection scenes made by the project: scikit-learn's digits pasted at random positions and
scales on noisy, unevenly lit backgrounds, several per image, some images empty.

Real glyphs (scikit-learn's bundled digits), a known truth for every box, no download: the data
for the detection path's tests, benchmarks and demo. Boxes are pixel coordinates
[x_min, y_min, x_max, y_max) on the image as written.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cvops_pipelines.demo.digit_model import _digits
from cvops_pipelines.edge.detect import box_iou

CLASSES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class SceneConfig:
    side: int = 160
    max_objects: int = 4
    p_empty: float = 0.1  # images with nothing to find: negatives the detector must keep quiet on
    min_scale: int = 24  # pixel side of a pasted digit
    max_scale: int = 56
    noise: float = 0.06
    max_overlap: float = 0.1  # IoU allowed between two pasted digits of one scene


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # H x W x 3 uint8
    boxes: np.ndarray  # N x 4 float32, pixels
    labels: list[str]

    def png(self) -> bytes:
        out = io.BytesIO()
        Image.fromarray(self.image).save(out, "PNG")
        return out.getvalue()


def _background(rng: np.random.Generator, config: SceneConfig) -> np.ndarray:
    """A lighting gradient in a random direction, a tint, and sensor noise."""
    side = config.side
    yy, xx = np.mgrid[0:side, 0:side] / side
    angle = rng.uniform(0, 2 * np.pi)
    light = 0.35 + 0.35 * (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2
    tint = rng.uniform(0.8, 1.0, size=3)
    image = light[..., None] * tint[None, None, :]
    return image + rng.normal(0, config.noise, image.shape)


def scene(index: int, seed: int = 0, config: SceneConfig = SceneConfig()) -> Scene:
    """The `index`-th scene of a seeded series: same (index, seed), same scene."""
    rng = np.random.default_rng([seed, index])
    digits = _digits()
    image = _background(rng, config)
    count = 0 if rng.random() < config.p_empty else int(rng.integers(1, config.max_objects + 1))
    boxes, labels, placed = [], [], []
    for _ in range(count * 10):  # placement attempts
        if len(boxes) == count:
            break
        size = int(rng.integers(config.min_scale, config.max_scale + 1))
        x, y = (int(v) for v in rng.integers(0, config.side - size + 1, size=2))
        box = np.array([x, y, x + size, y + size], np.float32)
        if placed and box_iou(box, np.array(placed)).max() > config.max_overlap:
            continue
        which = int(rng.integers(len(digits.images)))
        placed.append(box)
        glyph = Image.fromarray((digits.images[which] / 16.0 * 255).astype(np.uint8))
        mask = np.asarray(glyph.resize((size, size), Image.BILINEAR), np.float64) / 255.0
        ink = rng.uniform(0.0, 0.25, size=3) if rng.random() < 0.7 else rng.uniform(0.8, 1, 3)
        patch = image[y : y + size, x : x + size]
        image[y : y + size, x : x + size] = patch * (1 - mask[..., None]) + ink * mask[..., None]
        rows, cols = np.nonzero(mask > 0.25)  # the box is the ink, not the pasted square
        boxes.append(
            np.array([x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1])
        )
        labels.append(str(digits.target[which]))
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return Scene(pixels, np.array(boxes, np.float32).reshape(-1, 4), labels)


def scenes(count: int, seed: int = 0, config: SceneConfig = SceneConfig()) -> list[Scene]:
    return [scene(i, seed, config) for i in range(count)]


def coco(names: list[str], items: list[Scene], annotator: str = "scene-truth") -> dict:
    """A COCO document for scenes saved under `names`: images without objects are listed
    without annotations (negatives)."""
    images, annotations = [], []
    for image_id, (name, item) in enumerate(zip(names, items), start=1):
        height, width = item.image.shape[:2]
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for box, label in zip(item.boxes, item.labels):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CLASSES.index(label),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "annotator": annotator,
                }
            )
    categories = [{"id": i, "name": name} for i, name in enumerate(CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_drop(folder: Path, items: list[Scene], first: int = 0) -> list[str]:
    """A drop as a labelling tool would deliver it: PNGs, one COCO file, the `_SUCCESS`
    marker last. Returns the image names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"images/scene_{first + i:05d}.png" for i in range(len(items))]
    for name, item in zip(names, items):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(item.png())
    (folder / "annotations.json").write_text(json.dumps(coco(names, items)))
    (folder / "_SUCCESS").write_text("")
    return names
