"""Image preprocessing shared by training, export parity and the edge agent.

One definition, so a model sees the same pixels in training, in the parity proof and on a device.
Pillow + numpy only: this module runs on devices.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, whatever the source mode. The one conversion training and the edge share."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(image)
        scale = 257.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        arr8 = np.clip(arr.astype(np.float64) / scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("P", "PA") and "transparency" in image.info or mode in ("RGBA", "LA", "PA", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(data: bytes) -> Image.Image:
    """Decode stored original bytes to the oriented 8-bit RGB image the models see."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def resize(rgb: Image.Image, size: int) -> np.ndarray:
    """Square bilinear resize to the model's input side, as HWC uint8."""
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR))


def normalize(images: list[np.ndarray], mean, std) -> np.ndarray:
    """RGB uint8 images at the model's size -> normalised float32 NCHW batch. Laid out once
    (bytes are cheap to move) and computed in place: the same float32 steps as
    `(x / 255 - mean) / std`, so the same bits, without four temporary arrays."""
    batch = np.stack(images).transpose(0, 3, 1, 2).astype(np.float32, order="C")
    batch /= np.float32(255.0)
    batch -= np.asarray(mean, np.float32)[:, None, None]
    batch /= np.asarray(std, np.float32)[:, None, None]
    return batch
