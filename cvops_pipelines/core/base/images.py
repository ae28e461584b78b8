"""Decode and vet one image file, and the single RGB normalisation every stage shares.

Policy (documented in the README):
- Accepted formats: JPEG (and MPO), PNG, WebP, BMP, TIFF, static GIF. The original bytes are kept
  untouched; `to_rgb` converts CMYK, 16-bit, palette(+transparency) and alpha images to 8-bit RGB
  (alpha composited on white, 16-bit scaled, not clipped) when pixels are needed.
- Animated images (GIF/WebP/APNG with more than one frame) are rejected: which frame carries the
  label is ambiguous, and silently taking frame 0 would train on the wrong data.
- EXIF orientation is honoured: width/height are as displayed.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.fft
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cvops_pipelines.edge.preprocess import load_rgb, resize, to_rgb  # noqa: F401  (one definition)

ACCEPTED_FORMATS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
    "GIF": "gif",
}

# Stable reason codes: the quarantine table and dashboards group by these, so never rename one.
REASONS = {
    "empty_file": "the file is empty (0 bytes)",
    "file_too_large": "the file is larger than the configured limit",
    "not_an_image": "no image decoder recognises this file (wrong extension or not an image)",
    "unsupported_format": "the image format is not accepted",
    "decompression_bomb": "the header claims more pixels than the configured limit",
    "truncated_image": "the image data ends early (incomplete upload or copy)",
    "corrupt_image": "the image data is corrupt and cannot be decoded",
    "animated_image": "animated images are rejected: which frame carries the label is ambiguous",
    "too_small": "the image is smaller than the configured minimum side",
    "too_large": "the image is larger than the configured maximum side",
    "symlink_not_followed": "symbolic links are never followed",
    "unsafe_name": "the name has '..', '.' or empty path segments: never read or copied",
    "unreadable_file": "the file could not be read",
}


ORIENTATION_TAG = 0x0112
HASH_SOURCE_SIDE = 32  # the pHash input side; JPEG DCT scaling stops at the smallest scale >= this


class ImageRejected(Exception):
    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        self.message = REASONS[code] + (f": {detail}" if detail else "")
        super().__init__(f"{code}: {self.message}")


@dataclass(frozen=True)
class ImageInfo:
    image_id: str  # sha256 of the original bytes
    format: str  # file extension used in the store: jpg, png, ...
    mode: str  # Pillow mode of the original (RGB, L, CMYK, I;16, P, ...)
    width: int
    height: int
    channels: int
    bytes: int
    phash: str  # 64-bit perceptual hash as 16 hex chars
    thumb: bytes  # 32x32 8-bit grey (row-major): near-duplicate checks and fast label QA


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 40_000_000
    max_bytes: int = 64 * 1024 * 1024
    # Per file, the same sides the raw_images contract checks: a file outside them is turned
    # away alone (quarantined with its code) instead of failing its whole drop's contract.
    min_side: int = 8
    max_side: int = 20_000


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inspect_image(data: bytes, limits: ImageLimits = ImageLimits()) -> ImageInfo:
    """Verify, fully decode and fingerprint one file; raise `ImageRejected` with a stable code."""
    if not data:
        raise ImageRejected("empty_file")
    if len(data) > limits.max_bytes:
        raise ImageRejected("file_too_large", f"{len(data)} bytes > {limits.max_bytes}")
    image, fmt, mode, (width, height) = _open_checked(data, limits)
    if image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
        width, height = height, width
    if min(width, height) < limits.min_side:
        raise ImageRejected("too_small", f"{width}x{height} < {limits.min_side} px")
    if max(width, height) > limits.max_side:
        raise ImageRejected("too_large", f"{width}x{height} > {limits.max_side} px")
    ImageOps.exif_transpose(image, in_place=True)
    small = thumbnail(to_rgb(image))
    return ImageInfo(
        image_id=sha256_hex(data),
        format=ACCEPTED_FORMATS[fmt],
        mode=mode,
        width=width,
        height=height,
        channels=len(image.getbands()),
        bytes=len(data),
        phash=phash_of_thumbnail(small),
        thumb=small.tobytes(),
    )


def _open_checked(
    data: bytes, limits: ImageLimits
) -> tuple[Image.Image, str, str, tuple[int, int]]:
    """(decoded image, format, original mode, stored size). JPEGs are decoded with DCT scaling:
    libjpeg still entropy-decodes the whole bitstream (so truncation and corrupt data are caught
    as in a full decode) but skips the full-size inverse DCT; the small result is all the
    perceptual hash needs, and the stored size comes from the header."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            probe = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageRejected("not_an_image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected("decompression_bomb", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - decoders raise many types
            code = "truncated_image" if _looks_truncated(exc) else "corrupt_image"
            raise ImageRejected(code, f"{type(exc).__name__}: {exc}") from None
        fmt, size, mode = probe.format, probe.size, probe.mode
        if fmt not in ACCEPTED_FORMATS:
            raise ImageRejected(
                "unsupported_format", f"{fmt}; accepted: {', '.join(ACCEPTED_FORMATS)}"
            )
        if size[0] * size[1] > limits.max_pixels:
            raise ImageRejected(
                "decompression_bomb", f"{size[0]}x{size[1]} > {limits.max_pixels} pixels"
            )
        if getattr(probe, "n_frames", 1) > 1 and fmt != "MPO":
            raise ImageRejected("animated_image", f"{probe.n_frames} frames")
        try:
            if type(probe).verify is not ImageFile.ImageFile.verify:
                # a real structural check (PNG: CRCs, chunk order); it consumes the file
                probe.verify()
                probe = Image.open(io.BytesIO(data))
            if fmt in ("JPEG", "MPO"):
                probe.draft(None, (HASH_SOURCE_SIDE, HASH_SOURCE_SIDE))
            probe.load()  # decode: catches truncation and corruption verify() cannot see
            image = probe
        except Exception as exc:  # noqa: BLE001
            text = f"{type(exc).__name__}: {exc}"
            code = "truncated_image" if _looks_truncated(exc) else "corrupt_image"
            raise ImageRejected(code, text) from None
        return image, fmt, mode, size


def _looks_truncated(exc: Exception) -> bool:
    return isinstance(exc, EOFError) or "truncated" in str(exc).lower()


THUMB_SIDE = 32


def thumbnail(rgb: Image.Image) -> Image.Image:
    """32x32 grey; a reducing gap makes the shrink cheap on large images."""
    return rgb.convert("L").resize(
        (THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0
    )


def phash_of_thumbnail(small: Image.Image) -> str:
    """pHash as imagehash computes it (32x32 grey, 2-D DCT-II, 8x8 low frequencies vs their
    median, 64 bits as 16 hex chars), without its per-bit Python overhead."""
    dct = scipy.fft.dct(scipy.fft.dct(np.asarray(small, dtype=np.float64), axis=0), axis=1)[:8, :8]
    return np.packbits(dct > np.median(dct)).tobytes().hex()


def perceptual_hash(rgb: Image.Image) -> str:
    return phash_of_thumbnail(thumbnail(rgb))


def thumb_array(thumb: bytes) -> np.ndarray:
    """A stored thumbnail as a float array in [0, 1]."""
    return np.frombuffer(thumb, dtype=np.uint8).reshape(THUMB_SIDE, THUMB_SIDE) / 255.0


def phash_distance(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def load_images(
    store,
    keys: list[str],
    image_size: int,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Decode stored originals (EXIF-oriented RGB) and shrink them to the model's input size
    once, so an epoch never decodes and memory is N x size^2 x 3 bytes, not N originals."""
    from concurrent.futures import ThreadPoolExecutor

    def one(key: str) -> np.ndarray:
        return resize(load_rgb(store.read_bytes(key)), image_size)

    out = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for array in pool.map(one, keys):
            out.append(array)
            if progress:
                progress(1)
    return out
