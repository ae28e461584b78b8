"""Stable splits: an image's split is a pure function of its id, so it never moves as the pool
grows (no retraining on yesterday's test images)."""

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
