"""Real demo images: scikit-learn's bundled handwritten digits rendered as PNG files.

The 1,797 scans (UCI optical digits, 8x8, 17 grey levels) are split, stratified and seeded, into
an initial labelled drop, later drops held back for the next turns of the loop, and an unlabelled
production stream whose ground truth is kept apart (the fleet simulator's oracle).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import numpy as np
from PIL import Image

from cvops_pipelines.core.ingest.intake import MARKER

# Half the scans are the production stream: the field is where the loop's decisions are made,
# and the replay gate and the paired canary need a few hundred reviewed records to decide.
SPLITS = (("initial", 0.40), ("drop_2", 0.05), ("drop_3", 0.05), ("production", 0.50))
IMAGE_SIDE = 32


@dataclass(frozen=True)
class DemoData:
    drops: Path  # the watched drop source: holds the initial (marked) drop
    holdback: Path  # later drops and the production stream, not yet "uploaded"
    counts: dict[str, int]


def render_digit(pixels: np.ndarray, side: int = IMAGE_SIDE) -> Image.Image:
    """Dark ink on white paper, like the original scans; upsampled for CNN input sizes."""
    grey = (255 - np.asarray(pixels, dtype=np.float64) * (255 / 16)).round().astype(np.uint8)
    return Image.fromarray(grey.reshape(8, 8), "L").resize((side, side), Image.Resampling.BICUBIC)


def split_indices(labels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Stratified: every split gets the same share of each class."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {name: [] for name, _ in SPLITS}
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        bounds = np.cumsum([0] + [round(share * len(idx)) for _, share in SPLITS[:-1]])
        for (name, _), lo, hi in zip(SPLITS, bounds, [*bounds[1:], len(idx)]):
            out[name].extend(idx[lo:hi].tolist())
    return {name: np.array(sorted(v)) for name, v in out.items()}


def write_demo_data(
    drops: Path, holdback: Path, seed: int = 0, progress: Callable[[int], None] | None = None
) -> DemoData:
    """Idempotent: files are rewritten with the same bytes; the drop marker is written last."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    splits = split_indices(digits.target, seed)
    counts = {}
    for name, indices in splits.items():
        if name == "production":
            root = holdback / "production"
            truth = []
            for i in indices:
                path = root / "images" / f"frame_{i:05d}.png"
                _save(render_digit(digits.images[i]), path)
                truth.append((path.name, str(digits.target[i])))
                progress and progress(1)
            with open(root / "ground_truth.csv", "w", newline="") as f:
                csv.writer(f).writerows([("filename", "label"), *truth])
        else:
            root = (drops if name == "initial" else holdback) / name
            for i in indices:
                _save(
                    render_digit(digits.images[i]),
                    root / str(digits.target[i]) / f"digit_{i:05d}.png",
                )
                progress and progress(1)
            if name == "initial":
                (root / MARKER).write_text("")  # complete: the sensor may pick it up now
        counts[name] = len(indices)
    return DemoData(drops, holdback, counts)


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "PNG", optimize=False)


def choice(label: str) -> list[dict]:
    """A Label Studio result that picks one class for the whole image."""
    return [
        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}
    ]


def complete_queue(
    queue: Path,
    truth: dict,
    drop: Path,
    annotator: str = "oracle@demo",
    result: Callable[[object], list[dict]] = choice,
) -> int:
    """The demo's stand-in for annotators: answer an annotation-queue folder (tasks.json +
    images/) with the truth, `result(truth[image_id])` as the Label Studio result (an image's
    class by default; rectangles for boxes, an empty list for a frame with nothing in it),
    and write it as a Label Studio JSON export into a new drop (images/ beside export.json,
    then the marker). Tasks without a known truth stay unanswered. Returns the number of
    answered tasks."""
    import json
    import shutil
    from datetime import datetime

    tasks = json.loads((queue / "tasks.json").read_text())
    when = datetime.now(UTC).isoformat()
    answered = 0
    for i, task in enumerate(tasks):
        task["id"] = i + 1
        known = truth.get(task["data"]["image_id"])
        if known is None:
            continue
        task["annotations"] = [
            {
                "id": i + 1,
                "completed_by": annotator,
                "created_at": when,
                "updated_at": when,
                "was_cancelled": False,
                "result": result(known),
            }
        ]
        answered += 1
    (drop / "images").mkdir(parents=True, exist_ok=True)
    if (queue / "images").exists():
        shutil.copytree(queue / "images", drop / "images", dirs_exist_ok=True)
    (drop / "export.json").write_text(json.dumps(tasks, indent=1))
    (drop / MARKER).write_text("")
    return answered
