"""Real image files (digits from scikit-learn, encoded by Pillow) and the bad-input corpus."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from cvops_pipelines.demo.digit_model import digit, digit_label


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming huge dimensions: the decompression-bomb shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda tag, data: (
        struct.pack(">I", len(data))
        + tag
        + data  # noqa: E731
        + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    )
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def rotated_jpeg() -> bytes:
    """40x20 pixels stored, EXIF orientation 6 (rotate 90°): displayed as 20x40."""
    image = digit(3).convert("RGB").resize((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes())


def sixteen_bit_png() -> bytes:
    arr = np.asarray(digit(4), dtype=np.uint16) * 257  # full 16-bit range
    return encode(Image.fromarray(arr), "PNG")


def palette_transparent_png() -> bytes:
    image = digit(5).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [digit(6).convert("P"), digit(7).convert("P")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


# name -> expected outcome: "accepted", "duplicate" or a quarantine reason code
EXPECTED = {
    "good/digit_0.png": "accepted",
    "good/digit_1.jpg": "accepted",
    "good/the same digit_0 again.png": "duplicate",
    "good/éèà ünïcode 数字.png": "accepted",
    "good/rotated.jpg": "accepted",
    "formats/cmyk.jpg": "accepted",
    "formats/gray16.png": "accepted",
    "formats/palette_alpha.png": "accepted",
    "formats/animated.gif": "animated_image",
    "bad/empty.jpg": "empty_file",
    "bad/truncated.jpg": "truncated_image",
    "bad/truncated.png": "truncated_image",
    "bad/notes.jpg": "not_an_image",
    "bad/bomb.png": "decompression_bomb",
    "bad/escape.png": "symlink_not_followed",
}


def write_corpus(drop: Path, outside: Path) -> dict[str, str]:
    """Write the bad-input corpus into `drop`; `outside` receives the symlink's target."""
    jpg = encode(digit(1).convert("RGB"), "JPEG", quality=90)
    png = encode(digit(0), "PNG")
    files = {
        "good/digit_0.png": png,
        "good/digit_1.jpg": jpg,
        "good/the same digit_0 again.png": png,
        "good/éèà ünïcode 数字.png": encode(digit(2), "PNG"),
        "good/rotated.jpg": rotated_jpeg(),
        "formats/cmyk.jpg": encode(digit(8).convert("RGB").convert("CMYK"), "JPEG"),
        "formats/gray16.png": sixteen_bit_png(),
        "formats/palette_alpha.png": palette_transparent_png(),
        "formats/animated.gif": animated_gif(),
        "bad/empty.jpg": b"",
        "bad/truncated.jpg": jpg[: len(jpg) // 2],
        "bad/truncated.png": encode(digit(9).convert("RGB"), "PNG")[:-40],
        "bad/notes.jpg": b"these are my notes, not a photo\n",
        "bad/bomb.png": png_header_only(100_000, 100_000),
    }
    for name, data in files.items():
        path = drop / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    outside.mkdir(parents=True, exist_ok=True)
    secret = outside / "secret.png"
    secret.write_bytes(png)
    os.symlink(secret, drop / "bad" / "escape.png")
    return dict(EXPECTED)


def pool_row(data: bytes, label: str, name: str, source: str = "demo") -> dict:
    """One labeled-pool row for an image file, the way ingest + labeled_pool build it."""
    import pandas as pd

    from cvops_pipelines.core.base.images import inspect_image

    info = inspect_image(data)
    return {
        "image_id": info.image_id,
        "label": label,
        "n_votes": 1,
        "agreement": 1.0,
        "annotators": [""],
        "votes": [label],
        "origin": "drop",
        "labeled_at": pd.Timestamp("2026-11-01", tz="UTC"),
        "source": source,
        "original_name": name,
        "uri": f"file:///{name}",
        "key": f"images/{info.image_id[:2]}/{info.image_id}.png",
        "phash": info.phash,
        "thumb": info.thumb,
        "width": info.width,
        "height": info.height,
    }


def pool_rows(indices, labels=None, reencode: dict | None = None):
    """A labeled pool built from demo digits the way ingest + labeled_pool build it."""
    import hashlib

    import pandas as pd

    rows = []
    for n, i in enumerate(indices):
        data = encode(digit(i), "PNG")
        label = labels[n] if labels is not None else digit_label(i)
        rows.append(pool_row(data, label, f"{i}.png"))
        assert hashlib.sha256(data).hexdigest() == rows[-1]["image_id"]
    return pd.DataFrame(rows)
