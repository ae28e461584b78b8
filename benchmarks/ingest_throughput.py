"""Ingestion wall time vs a bare loop (read + sha256 + Pillow full decode), same files and workers.

Images: 640x480 JPEGs made from scikit-learn's digits (each digit scaled onto a tinted, unevenly
lit page with sensor noise), so file size and decode cost are those of camera-sized photos. Each
side runs `repeats` times alternately and the best time counts (the machine is shared and noisy);
the figure is the ratio, with the ratio of medians beside it. cvops' time includes copying every
original into the store and one filesystem sync at the end; the disk is synced before each timed
run."""

import hashlib
import io
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.ingest.intake import IngestConfig, ingest_drop

WIDTH, HEIGHT = 640, 480


def _make_image(args: tuple[int, str]) -> int:
    i, out = args
    from sklearn.datasets import load_digits

    digits = _make_image.__dict__.setdefault("digits", load_digits())
    rng = np.random.default_rng(i)
    grey = (255 - digits.images[i % len(digits.images)] * (255 / 16)).astype(np.uint8)
    digit = Image.fromarray(grey, "L").resize((HEIGHT, HEIGHT), Image.Resampling.BICUBIC)
    tint = rng.integers(180, 256, size=3)
    page = np.ones((HEIGHT, WIDTH, 3)) * tint
    page *= np.linspace(0.85, 1.0, WIDTH)[None, :, None]  # uneven lighting, like a photo
    page += rng.normal(0, 6, size=page.shape)  # sensor noise: real photos do not compress flat
    canvas = Image.fromarray(np.clip(page, 0, 255).astype(np.uint8), "RGB")
    x = int(rng.integers(0, WIDTH - HEIGHT))
    canvas.paste(Image.merge("RGB", [digit] * 3), (x, 0), Image.fromarray(255 - np.asarray(digit)))
    buffer = io.BytesIO()
    canvas.save(buffer, "JPEG", quality=90)
    Path(out, f"{i:05d}.jpg").write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def _bare(path: str) -> str:
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
    return digest


def bare_loop(paths: list[str], workers: int) -> float:
    os.sync()  # start from a quiet disk: no writeback left over from the previous run
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        digests = list(pool.map(_bare, paths, chunksize=16))
    assert len(digests) == len(paths)
    return time.perf_counter() - started


def cvops_ingest(drop: Path, store_root: Path, workers: int) -> float:
    shutil.rmtree(store_root, ignore_errors=True)
    os.sync()
    started = time.perf_counter()
    result = ingest_drop(
        LocalStore(drop), LocalStore(store_root), "bench", IngestConfig(workers=workers)
    )
    elapsed = time.perf_counter() - started
    assert len(result.manifest) + result.duplicates == result.files_seen, "images were rejected"
    return elapsed


def run(quick: bool = False) -> dict:
    n = 400 if quick else 5000
    repeats = 1 if quick else 3
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="cvops-bench-") as tmp:
        drop, store = Path(tmp, "drop"), Path(tmp, "store")
        drop.mkdir()
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            sizes = list(pool.map(_make_image, [(i, str(drop)) for i in range(n)], chunksize=32))
        paths = sorted(str(p) for p in drop.iterdir())
        bare, ours = [], []
        for _ in range(repeats):
            bare.append(bare_loop(paths, workers))
            ours.append(cvops_ingest(drop, store, workers))
    return {
        "benchmark": "ingest_throughput",
        "images": n,
        "width": WIDTH,
        "height": HEIGHT,
        "format": "JPEG q90",
        "mean_file_kb": round(float(np.mean(sizes)) / 1024, 1),
        "workers": workers,
        "repeats": repeats,
        "bare_loop_s": [round(t, 2) for t in bare],
        "cvops_ingest_s": [round(t, 2) for t in ours],
        "bare_images_per_s": round(n / min(bare), 1),
        "cvops_images_per_s": round(n / min(ours), 1),
        "ratio_cvops_over_bare": round(min(ours) / min(bare), 3),
        "ratio_median": round(float(np.median(ours) / np.median(bare)), 3),
        "target_ratio": 1.25,
    }
