"""Drops: folders (or S3 prefixes) of new files under a watched source.

Convention: a drop is complete once its uploader writes the marker file `_SUCCESS` at the drop's
root, after every other file. Until then it is never ingested, so a half-uploaded drop cannot be
read. The drop's folder name becomes its Dagster partition key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.ingest.intake import MARKER

VALID_DROP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


@dataclass(frozen=True)
class DropScan:
    complete: list[str]
    incomplete: list[str]  # no marker yet: still uploading (or abandoned)
    invalid: list[str]  # complete but the name cannot be a partition key


def scan_drops(source: Store) -> DropScan:
    complete, incomplete, invalid = [], [], []
    for name in source.list_dirs():
        if not source.exists(f"{name}/{MARKER}"):
            incomplete.append(name)
        elif VALID_DROP_NAME.match(name):
            complete.append(name)
        else:
            invalid.append(name)
    return DropScan(complete, incomplete, invalid)


class DropNotReady(RuntimeError):
    """The drop is missing, or its upload has not finished (no marker yet)."""


def require_complete(source: Store, drop: str) -> None:
    """The same rules for every entry point (sensor, `cvops ingest`, a run from the UI): a valid
    name, a real folder of the source (symbolic links are never followed), and its marker."""
    if not VALID_DROP_NAME.match(drop):
        raise DropNotReady(
            f"drop name {drop!r} is not valid: it becomes a partition key, so it is letters, "
            "digits, '.', '_' and '-', starting with a letter or digit, and no path"
        )
    if drop not in source.list_dirs():
        raise DropNotReady(
            f"drop {drop!r} under {source.uri()} does not exist as a folder (symbolic links "
            "are not followed)"
        )
    if not source.exists(f"{drop}/{MARKER}"):
        raise DropNotReady(
            f"drop {drop!r} under {source.uri()} has no _SUCCESS marker yet: it is still "
            f"uploading, or the uploader must write {drop}/{MARKER} after the last file"
        )
