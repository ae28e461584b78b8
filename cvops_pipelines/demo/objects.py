"""Objects in the wild, made by the project: one of scikit-learn's digits per image, at a random
position, scale, rotation and colour, on a noisy, unevenly lit, tinted background.

Where the demo digits are centred, aligned and dark on white (raw pixels cluster by class),
here they do not: the same class looks different in every image, the way field images do. The
data for the label QA and self-supervised benchmarks; real glyphs, a known truth, no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from cvops_pipelines.demo.digit_model import _digits

CLASSES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class ObjectsConfig:
    side: int = 48
    min_scale: int = 28  # pixel side of the glyph before rotation
    max_scale: int = 40
    max_rotation: float = 15.0  # degrees either way
    noise: float = 0.08


def _background(rng: np.random.Generator, side: int, noise: float) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side] / side
    angle = rng.uniform(0, 2 * np.pi)
    light = 0.25 + 0.6 * (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2
    tint = rng.uniform(0.5, 1.0, size=3)
    return light[..., None] * tint[None, None, :] + rng.normal(0, noise, (side, side, 3))


def object_image(
    index: int, seed: int = 0, config: ObjectsConfig = ObjectsConfig()
) -> tuple[np.ndarray, str]:
    """The `index`-th image of a seeded series (H x W x 3 uint8) and its true class."""
    rng = np.random.default_rng([seed, index, 7])
    digits = _digits()
    which = int(rng.integers(len(digits.images)))
    image = _background(rng, config.side, config.noise)
    size = int(rng.integers(config.min_scale, config.max_scale + 1))
    glyph = Image.fromarray((digits.images[which] / 16.0 * 255).astype(np.uint8))
    glyph = glyph.resize((size, size), Image.BILINEAR).rotate(
        float(rng.uniform(-config.max_rotation, config.max_rotation)),
        Image.BILINEAR,
        expand=True,
    )
    mask = np.asarray(glyph, np.float64) / 255.0
    h, w = mask.shape
    if h > config.side:  # a large glyph rotated: keep its middle
        cut = (h - config.side) // 2
        mask = mask[cut : cut + config.side, cut : cut + config.side]
        h, w = mask.shape
    y, x = (int(v) for v in rng.integers(0, config.side - h + 1, size=2))
    ink = rng.uniform(0, 1, size=3)
    patch = image[y : y + h, x : x + w]
    # keep the ink visible: push it away from the local background's brightness
    if abs(ink.mean() - patch.mean()) < 0.3:
        ink = np.clip(ink + (0.4 if patch.mean() < 0.5 else -0.4), 0, 1)
    image[y : y + h, x : x + w] = patch * (1 - mask[..., None]) + ink * mask[..., None]
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return pixels, str(digits.target[which])


def objects(
    count: int, seed: int = 0, config: ObjectsConfig = ObjectsConfig()
) -> tuple[list[np.ndarray], np.ndarray]:
    """`count` images and their true class indices."""
    made = [object_image(i, seed, config) for i in range(count)]
    return [m[0] for m in made], np.array([CLASSES.index(m[1]) for m in made])
