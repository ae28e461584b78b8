"""Replay: score a model on labeled historical records, optionally with the human in the loop.

The operator model: the UI shows the model's top-k classes; when the true class is among them the
operator picks it with probability `p_pick_right`; otherwise the record is handled wrong. Scores
are expected values (no sampling), so a gate built on them is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Operator:
    top_k: int = 2
    p_pick_right: float = 0.95

    def __post_init__(self) -> None:
        if self.top_k < 1 or not 0 <= self.p_pick_right <= 1:
            raise ValueError("top_k must be >= 1 and p_pick_right within [0, 1]")


@dataclass(frozen=True)
class ReplayResult:
    records: int
    automatic_accuracy: float  # top-1, no human
    top_k_coverage: float | None  # share of records whose true class is in the top k
    assisted_accuracy: float | None  # expected accuracy with the operator choosing among top k

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def replay(probs: np.ndarray, labels: np.ndarray, operator: Operator | None = None) -> ReplayResult:
    if len(labels) == 0:
        raise ValueError("no records to replay")
    automatic = float((probs.argmax(1) == labels).mean())
    if operator is None:
        return ReplayResult(len(labels), automatic, None, None)
    top_k = np.argsort(-probs, axis=1)[:, :operator.top_k]
    covered = (top_k == labels[:, None]).any(axis=1)
    coverage = float(covered.mean())
    return ReplayResult(len(labels), automatic, coverage, coverage * operator.p_pick_right)
