"""The operator's own record of the highest version it signed or accepted, kept outside the store.

Everything signed in the store (channel pointers, key delegations, device enrolments) is
numbered, and a reader refuses a number lower than the last it accepted: that is what stops a
store writer from replaying an older signed document. Devices keep their record in their state
folder; the pipeline keeps its own here, in the Dagster instance's key-value storage (SQLite
locally, Postgres in production), which a store writer cannot touch. New numbers follow this
record (and any higher document the key verifiably signed) and start from the clock, never from
an unverified copy in the store.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

from cvops_pipelines.edge.wire import MAX_VERSION


class VersionLedger(Protocol):
    def highest(self, name: str) -> int: ...
    def raise_to(self, name: str, version: int) -> None: ...


class MemoryLedger:
    """A ledger that lives as long as the process: tools and tests without an instance."""

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}

    def highest(self, name: str) -> int:
        return self.versions.get(name, 0)

    def raise_to(self, name: str, version: int) -> None:
        self.versions[name] = max(version, self.highest(name))


class KeyValueLedger:
    """A ledger over a string key-value store (`get(keys) -> {key: value}`, `set({key: value})`),
    namespaced per store so two loops in one instance keep separate records."""

    def __init__(
        self,
        get: Callable[[set[str]], Mapping[str, str]],
        put: Callable[[Mapping[str, str]], None],
        namespace: str,
    ) -> None:
        self._get, self._put, self.namespace = get, put, namespace

    def _key(self, name: str) -> str:
        return f"cvops.ledger:{self.namespace}:{name}"

    def highest(self, name: str) -> int:
        value = self._get({self._key(name)}).get(self._key(name))
        try:
            return int(value) if value is not None else 0
        except ValueError:
            return 0

    def raise_to(self, name: str, version: int) -> None:
        if version > self.highest(name):
            self._put({self._key(name): str(version)})


def instance_ledger(instance, store) -> KeyValueLedger:
    """The ledger of a Dagster instance (its run storage's key-value table), for `store`."""
    storage = instance.run_storage
    return KeyValueLedger(storage.get_cursor_values, storage.set_cursor_values, store.uri(""))


def clock_version() -> int:
    """Microseconds since the epoch: a floor that outnumbers every version signed before, even by
    an operator whose record was lost (a new instance), as long as clocks move forward."""
    return time.time_ns() // 1000


def next_version(ledger: VersionLedger, name: str, *signed: int) -> int:
    """The number for a new document `name`: above the ledger's record, above every version in
    `signed` (documents this operator's key verifiably signed) and at least the clock's;
    recorded before it is used."""
    version = max(ledger.highest(name) + 1, *(v + 1 for v in signed), clock_version())
    if version > MAX_VERSION:
        raise ValueError(f"{name}: version {version} would overflow; the record is corrupt")
    ledger.raise_to(name, version)
    return version


FUTURE_SLACK_US = 86_400 * 1_000_000  # a day of clock skew between two operator machines


def valid_version(value) -> bool:
    """A version the pipeline accepts: an int (never a bool) in [0, MAX_VERSION], and not from
    the future: every number this operator signs starts from its clock, so one far above it was
    signed by someone else with the key (a leak), and following it could exhaust the numbers."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and 0 <= value <= min(MAX_VERSION, clock_version() + FUTURE_SLACK_US)
    )
