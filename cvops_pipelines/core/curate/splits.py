"""Stable splits: an image's split is a pure function of its id, so it never moves as the pool
grows (no retraining on yesterday's test images). Near-duplicates (the same scene shot again)
share one split: a group takes the first of train, val, test among its members' own splits, so
an image can move only toward train, never out of it (no model is ever tested on what it
trained on), and no near-duplicate straddles two splits."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    salt: str = "cvops-split-v1"  # change it only to reshuffle every split on purpose

    def __post_init__(self) -> None:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-9 or min(self.train, self.val, self.test) < 0:
            raise ValueError(f"split fractions must be >= 0 and sum to 1, got {total:.3f}")


def split_of(image_id: str, config: SplitConfig = SplitConfig()) -> str:
    digest = hashlib.sha256(f"{config.salt}:{image_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < config.train:
        return "train"
    return "val" if u < config.train + config.val else "test"


def grouped(splits: dict[str, str], pairs) -> dict[str, str]:
    """`splits` (image id -> its own split) with every near-duplicate group (`pairs`: image_a,
    image_b) in the first of SPLITS among its members'."""
    parent = {i: i for i in splits}

    def root(i: str) -> str:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        if a in parent and b in parent:
            parent[root(a)] = root(b)
    first: dict[str, str] = {}
    for image, split in splits.items():
        group = root(image)
        if group not in first or SPLITS.index(split) < SPLITS.index(first[group]):
            first[group] = split
    return {image: first[root(image)] for image in splits}
