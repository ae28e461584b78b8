"""Near-duplicate images: pHash candidates, confirmed on the stored 32x32 thumbnails.

A 64-bit pHash alone is too coarse for small images (distinct handwritten digits can differ by
2-4 bits), so candidates within `max_hamming` bits are confirmed by the mean absolute difference
of their thumbnails. Re-encodes and resizes of one image stay far below `max_mad`; distinct
images that merely look alike stay above it.

Candidates come from a pigeonhole index: split the 64 bits into max_hamming + 1 chunks; two
hashes within max_hamming bits agree exactly on at least one chunk, so only pairs sharing a chunk
value are compared (no n² scan).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.images import thumb_array


@dataclass(frozen=True)
class NearDupConfig:
    max_hamming: int = 4
    max_mad: float = 0.018  # mean |difference| of thumbnails, 0..1


def _chunks(value: int, n: int) -> list[tuple[int, int]]:
    bounds = [64 * k // n for k in range(n + 1)]
    return [
        (k, (value >> lo) & ((1 << (hi - lo)) - 1))
        for k, (lo, hi) in enumerate(zip(bounds, bounds[1:]))
    ]


def candidate_pairs(phashes: list[str], max_hamming: int) -> list[tuple[int, int, int]]:
    """(i, j, hamming) for i < j within max_hamming bits."""
    values = [int(h, 16) for h in phashes]
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, value in enumerate(values):
        for chunk in _chunks(value, max_hamming + 1):
            buckets[chunk].append(i)
    pairs: dict[tuple[int, int], int] = {}
    for members in buckets.values():
        for i, j in combinations(members, 2):
            if (i, j) not in pairs:
                distance = (values[i] ^ values[j]).bit_count()
                if distance <= max_hamming:
                    pairs[(i, j)] = distance
    return [(i, j, d) for (i, j), d in sorted(pairs.items())]


def near_duplicate_pairs(
    images: pd.DataFrame, config: NearDupConfig = NearDupConfig()
) -> pd.DataFrame:
    """Confirmed pairs among rows with image_id, phash and thumb (one row per image)."""
    images = images.drop_duplicates("image_id").reset_index(drop=True)
    rows = []
    for i, j, hamming in candidate_pairs(list(images["phash"]), config.max_hamming):
        mad = float(
            np.abs(thumb_array(images.at[i, "thumb"]) - thumb_array(images.at[j, "thumb"])).mean()
        )
        if mad <= config.max_mad:
            rows.append(
                (images.at[i, "image_id"], images.at[j, "image_id"], hamming, round(mad, 4))
            )
    return pd.DataFrame(rows, columns=["image_a", "image_b", "hamming", "mad"])


def pairs_differing_in(
    frame: pd.DataFrame, column: str, config: NearDupConfig = NearDupConfig()
) -> pd.DataFrame:
    """Near-duplicate pairs whose members differ in `column` (label: a conflict; split: leakage),
    with `<column>_a` / `<column>_b`."""
    return differing(
        near_duplicate_pairs(frame[["image_id", "phash", "thumb"]], config), frame, column
    )


def differing(pairs: pd.DataFrame, frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """The pairs (of near_duplicate_pairs) whose members are both rows of `frame` and differ in
    `column`, with `<column>_a` / `<column>_b`."""
    values = frame.set_index("image_id")[column]
    pairs = pairs[pairs["image_a"].isin(values.index) & pairs["image_b"].isin(values.index)].copy()
    pairs[f"{column}_a"] = pairs["image_a"].map(values)
    pairs[f"{column}_b"] = pairs["image_b"].map(values)
    return pairs[pairs[f"{column}_a"] != pairs[f"{column}_b"]].reset_index(drop=True)
