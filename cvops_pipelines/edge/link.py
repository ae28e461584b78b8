"""When and how fast a device may send: a byte-rate cap (a token bucket, so a round never blocks
prediction: what the cap does not allow now waits for the next round) and optional upload
windows in UTC (a metered link that is cheap at night)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def parse_windows(text: str | None) -> tuple[tuple[int, int], ...]:
    """'22:00-06:00,12:00-13:00' -> minutes of the UTC day, [start, end); a window may wrap
    midnight. ValueError naming the form for anything else."""
    if not text:
        return ()
    out = []
    for part in text.split(","):
        match = WINDOW.match(part.strip())
        if not match:
            raise ValueError(f"upload window {part.strip()!r} is not HH:MM-HH:MM (UTC)")
        h0, m0, h1, m1 = (int(g) for g in match.groups())
        if (h0, m0) == (h1, m1):
            raise ValueError(f"upload window {part.strip()!r} is empty")
        out.append((h0 * 60 + m0, h1 * 60 + m1))
    return tuple(out)


@dataclass
class Link:
    rate: float | None = None  # bytes per second at most; None: as fast as the store takes them
    windows: tuple[tuple[int, int], ...] = ()  # when uploads may run; (): always
    burst: float = 0.0  # bytes the bucket holds when full (0: one second's worth of `rate`)
    clock: object = time.monotonic
    _tokens: float = field(default=0.0, init=False)
    _at: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"upload rate must be > 0 bytes/s, got {self.rate}")

    def open(self, at: datetime | None = None) -> bool:
        if not self.windows:
            return True
        at = at or datetime.now(UTC)
        minute = at.hour * 60 + at.minute
        return any(
            start <= minute < end if start < end else minute >= start or minute < end
            for start, end in self.windows
        )

    def take(self, size: int) -> bool:
        """Whether `size` bytes may go now (and charge them). A payload larger than the bucket
        goes once the bucket is full and leaves it in debt, so the average holds."""
        if self.rate is None:
            return True
        now = self.clock()
        capacity = self.burst or self.rate
        if self._at is None:
            self._tokens = capacity
        else:
            self._tokens = min(capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < min(size, capacity):
            return False
        self._tokens -= size
        return True
