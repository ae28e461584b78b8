"""Which frames' images a device keeps for the pipeline, and how much each is worth.

Every prediction is recorded; its image is kept only when it can teach the next model something:
the model was unsure (a classifier's top-two margin is small, a detector's box scored near its
operating point), it flickered (its answer differs from the recent frames of the same scene), an
operator corrected it, or it falls in a seeded exploration share (the unbiased sample that keeps
the field's accuracy measurable). A frame that looks like the last kept frame of its source is
kept once. The value orders eviction under the disk budget and the upload queue: a correction
first, then flicker, then uncertainty, then exploration.

The policy travels in the release's spec (`buffer`), so the pipeline changes it with a release.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, fields

import numpy as np

CORRECTED = 10.0  # an operator's correction outranks anything the device judged itself
_BASE = {"flicker": 3.0, "uncertain": 2.0, "explore": 1.0}


@dataclass(frozen=True)
class KeepPolicy:
    margin: float = 0.25  # uncertain: top-1 minus top-2 below this (a detector: a box this near
    # its answer threshold)
    flicker_frames: int = 3  # flicker: the answer differs from the majority of the last N answers
    # on the same scene (a frame within `scene_distance` of the one before it)
    scene_distance: float = 12.0
    explore_share: float = 0.02  # a seeded random share kept whatever the model said
    duplicate_distance: float = 3.0  # a frame this near (mean |grey difference|, 0-255, at 16x16)
    # to the last kept frame of its source is not kept again
    budget_bytes: int = 256 << 20  # kept images on disk at most; the least valuable go first
    hold_frames: int = 16  # the agent holds this many recent frames it did not keep in memory
    # (decoded: 0.9 MB each at 640x480, 6 MB at 1080p): an operator who corrects one of them
    # keeps its image
    seed: int = 0

    def __post_init__(self) -> None:
        """The policy comes in a release's spec: every value is checked here, so a spec that
        holds a wrong type, NaN or a negative size falls back to the defaults (`from_spec`)."""
        import math

        for name in ("flicker_frames", "budget_bytes", "hold_frames", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"buffer policy: {name} must be an integer >= 0, got {value!r}")
        for name in ("margin", "scene_distance", "duplicate_distance", "explore_share"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"buffer policy: {name} must be a number >= 0, got {value!r}")
        if self.explore_share > 1:
            raise ValueError(f"buffer policy: explore_share must be <= 1, got {self.explore_share}")

    @classmethod
    def from_spec(cls, spec: dict | None, note=lambda message: None) -> KeepPolicy:
        """The release spec's `buffer` section; keys it does not name keep their defaults. A key
        this agent does not know (a newer pipeline's) is left out and said to `note`; a value
        out of range falls back to the defaults, said too: a device keeps serving either way."""
        given = dict((spec or {}).get("buffer") or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            note(f"buffer policy: keys this agent does not know, left out: {unknown}")
        try:
            return cls(**{k: v for k, v in given.items() if k in known})
        except (TypeError, ValueError) as exc:
            note(f"{exc}: the default buffer policy applies")
            return cls()


@dataclass(frozen=True)
class Verdict:
    keep: bool
    reason: str  # corrected, flicker, uncertain, explore; "": recorded without its image
    value: float  # higher: evicted later, uploaded sooner


def thumb(image: np.ndarray) -> np.ndarray:
    """16x16 grey, for the near-duplicate test: 256 pixels picked on a grid, then averaged over
    the channels (a few microseconds at 640x480; no resampling filter)."""
    h, w = image.shape[:2]
    ys = (np.arange(16) * h // 16).clip(0, h - 1)
    xs = (np.arange(16) * w // 16).clip(0, w - 1)
    picked = image[np.ix_(ys, xs)].astype(np.float32)
    return picked.mean(axis=2) if picked.ndim == 3 else picked


def margin_of(top: list[tuple[str, float]], boxes: list[dict] | None, threshold: float) -> float:
    """How far the answer was from going the other way: a classifier's top-1 minus top-2, a
    detector's nearest box score to its operating point (1.0: nothing near it)."""
    if boxes is not None:
        return min((abs(b["score"] - threshold) for b in boxes), default=1.0)
    scores = sorted((p for _, p in top), reverse=True) + [0.0, 0.0]
    return scores[0] - scores[1]


class Selector:
    """Judges each frame of a stream in order (per source: its recent answers, its last kept
    frame)."""

    def __init__(self, policy: KeepPolicy):
        self.policy = policy
        self._answers: dict[str, deque] = {}
        self._last: dict[str, np.ndarray] = {}  # the source's previous frame (its thumbnail)
        self._last_kept: dict[str, np.ndarray] = {}

    def judge(self, source: str, key: str, label: str, margin: float, image: np.ndarray | None):
        p = self.policy
        recent = self._answers.setdefault(source, deque(maxlen=max(1, p.flicker_frames)))
        small = thumb(image) if image is not None else None
        previous = self._last.get(source)
        if small is not None:
            self._last[source] = small
            if previous is None or float(np.abs(small - previous).mean()) >= p.scene_distance:
                recent.clear()  # another scene: its answers are not a flicker of this one's
        flicker = (
            bool(p.flicker_frames) and len(recent) == recent.maxlen and label != _majority(recent)
        )
        recent.append(label)
        roll = int(hashlib.sha256(f"{p.seed}:{source}:{key}".encode()).hexdigest()[:8], 16)
        explore = roll / 0xFFFFFFFF < p.explore_share
        if flicker:
            verdict = Verdict(True, "flicker", _BASE["flicker"])
        elif margin < p.margin:
            closeness = 1 - margin / p.margin if p.margin else 0.0
            verdict = Verdict(True, "uncertain", _BASE["uncertain"] + closeness)
        elif explore:
            verdict = Verdict(True, "explore", _BASE["explore"])
        else:
            return Verdict(False, "", 0.0)
        if small is not None:
            last = self._last_kept.get(source)
            if last is not None and float(np.abs(small - last).mean()) < p.duplicate_distance:
                return Verdict(False, "", 0.0)
            self._last_kept[source] = small
        return verdict


def _majority(answers) -> str:
    values, counts = np.unique(list(answers), return_counts=True)
    return str(values[counts.argmax()])
