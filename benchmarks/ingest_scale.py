"""Ingest memory vs drop size: peak RSS of the whole process tree of `cvops ingest` (the
orchestrating process and its decoder workers, sampled every 50 ms) for drops of tiny images.

Images: 12x12 RGB PNGs, each one of the scikit-learn digits (8x8) in a colour and at an offset
taken from its index, so every file decodes and every file's bytes differ (no drop is shrunk by
deduplication); all at the drop's root, unlabeled, as a site's field images arrive. Tiny files
make the per-image cost (rows, listing, tables) the load, not the pixels. Each drop is its own
fresh CVOPS_HOME and DAGSTER_HOME. The slope is (peak at the largest drop - peak at the smallest)
/ (difference in images) per 1,000 images, and the projection is the peak a 1,000,000-file drop
would reach on that slope.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SIZES = (30_000, 300_000)
QUICK_SIZES = (2_000, 6_000)
CHUNK = 5_000


def _write_chunk(args: tuple[str, int, int]) -> int:
    from PIL import Image
    from sklearn.datasets import load_digits

    out, start, stop = args
    digits = (load_digits().images * (255 / 16)).astype(np.uint8)
    for i in range(start, stop):
        glyph = digits[i % len(digits)]
        page = np.zeros((12, 12, 3), np.uint8)
        colour = np.array([(i * 37) % 256, (i // 256 * 59) % 256, (i // 65536 * 83 + 40) % 256])
        dy, dx = (i // len(digits)) % 5, (i // len(digits) // 5) % 5
        page[dy : dy + 8, dx : dx + 8] = (glyph[..., None] / 255 * colour).astype(np.uint8)
        Image.fromarray(page).save(Path(out, f"{i:07d}.png"))
    return stop - start


def make_drop(root: Path, count: int) -> None:
    root.mkdir(parents=True)
    chunks = [(str(root), s, min(s + CHUNK, count)) for s in range(0, count, CHUNK)]
    with ProcessPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(_write_chunk, chunks))
    (root / "_SUCCESS").write_text("")


def _tree_rss(pid: int) -> tuple[int, int]:
    """(RSS of the whole tree, RSS of the root process alone), in bytes."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = main = 0
    for p in procs:
        try:
            rss = p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        total += rss
        main = rss if p.pid == pid else main
    return total, main


def ingest_peak(count: int, work: Path) -> dict:
    """Peak tree RSS and wall time of `cvops ingest` on a fresh drop of `count` images."""
    home = work / f"home-{count}"
    make_drop(home / "drops" / "scale", count)
    env = {
        **os.environ,
        "CVOPS_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "CVOPS_DROPS": str(home / "drops"),
    }
    (home / "dagster").mkdir()
    shutil.copy(Path(__file__).parents[1] / "infra/dagster/dagster.yaml", home / "dagster")
    cli = Path(sys.executable).with_name("cvops")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(cli), "ingest", "scale"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = main_peak = 0
    samples = []
    reader = threading.Thread(target=lambda: samples.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        tree, main = _tree_rss(proc.pid)
        peak, main_peak = max(peak, tree), max(main_peak, main)
        time.sleep(0.05)
    reader.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"cvops ingest failed on {count} images:\n{samples[0][-3000:]}")
    shutil.rmtree(home)
    return {
        "images": count,
        "peak_rss_mib": round(peak / 2**20, 1),
        "main_process_peak_rss_mib": round(main_peak / 2**20, 1),
        "wall_s": round(wall, 1),
        "images_per_s": round(count / wall, 1),
    }


def run(quick: bool = False) -> dict:
    sizes = QUICK_SIZES if quick else SIZES
    with tempfile.TemporaryDirectory(prefix="cvops-ingest-scale-") as tmp:
        runs = [ingest_peak(n, Path(tmp)) for n in sizes]
        for r in runs:
            print(r, flush=True)
    small, large = runs[0], runs[-1]
    slope = (large["peak_rss_mib"] - small["peak_rss_mib"]) / (
        (large["images"] - small["images"]) / 1000
    )
    projected = large["peak_rss_mib"] + slope * (1_000_000 - large["images"]) / 1000
    return {
        "benchmark": "ingest_scale",
        "runs": runs,
        "slope_mib_per_1000_images": round(slope, 3),
        "projected_peak_mib_at_1m": round(projected, 1),
        "target": "peak RSS < 1024 MiB at 300k and projected < 1024 MiB at 1M",
        "met": large["peak_rss_mib"] < 1024 and projected < 1024,
    }
