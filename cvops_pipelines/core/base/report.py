"""What a stage shows in the UI, said without Dagster: tables, plots, links and JSON that the
wiring (defs/metadata.py) turns into asset metadata, and check outcomes it turns into asset
check results. A task's pieces return these, so their numbers are tested without an instance."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame
    max_rows: int = 100


@dataclass(frozen=True)
class Plot:
    png: bytes
    alt: str


@dataclass(frozen=True)
class Link:
    url: str


@dataclass(frozen=True)
class Json:
    value: object


@dataclass(frozen=True)
class Check:
    """An asset check's outcome: `blocking` ones stop what follows when they fail."""

    name: str
    passed: bool
    metadata: dict = field(default_factory=dict)
    blocking: bool = True


@dataclass
class StageResult:
    """A piece's answer to its asset: the value it materializes, what the UI shows, its checks,
    and (optionally) the value's data version."""

    value: object
    metadata: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    data_version: str | None = None
