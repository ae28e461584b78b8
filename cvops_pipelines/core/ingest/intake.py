"""Ingest one drop of image files into the content-addressed image store.

Streaming: the drop is listed lazily, at most `window` batches are in flight, and the manifest
and quarantine tables are written to local Parquet files a row group at a time, so memory does
not grow with the drop beyond a 16-byte key per distinct image (to find duplicates) and the
names of the duplicates themselves (benchmarks/ingest_scale.py). Decoding runs in a process pool
(one worker per core by default); workers read from the source and write originals to the store
themselves, so image bytes never cross a process boundary.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

import pandas as pd
import pyarrow as pa

from cvops_pipelines.core.base.images import (
    REASONS,
    ImageInfo,
    ImageLimits,
    ImageRejected,
    inspect_image,
)
from cvops_pipelines.core.base.store import Entry, Store
from cvops_pipelines.core.base.tables import TableFile, TableWriter, TemporaryFolder

MARKER = "_SUCCESS"
# Files with these suffixes are annotation candidates, not images (see core/ingest/annotations.py).
ANNOTATION_SUFFIXES = (".json", ".csv", ".txt", ".yaml", ".yml")

MANIFEST_COLUMNS = [
    "image_id",
    "uri",
    "key",
    "source",
    "original_name",
    "aliases",
    "format",
    "mode",
    "width",
    "height",
    "channels",
    "bytes",
    "phash",
    "thumb",
    "ingested_at",
]
QUARANTINE_COLUMNS = [
    "source",
    "stage",
    "original_name",
    "position",
    "reason_code",
    "reason",
    "bytes",
    "quarantine_uri",
    "detected_at",
]
_TIME = pa.timestamp("us", tz="UTC")
_TYPES = {
    "aliases": pa.list_(pa.string()),
    "width": pa.int64(),
    "height": pa.int64(),
    "channels": pa.int64(),
    "bytes": pa.int64(),
    "thumb": pa.binary(),
    "ingested_at": _TIME,
    "detected_at": _TIME,
}
MANIFEST_SCHEMA = pa.schema([(c, _TYPES.get(c, pa.string())) for c in MANIFEST_COLUMNS])
QUARANTINE_SCHEMA = pa.schema([(c, _TYPES.get(c, pa.string())) for c in QUARANTINE_COLUMNS])
PREVIEW_ROWS = 10  # manifest and quarantine rows kept in memory for the asset's metadata


@dataclass(frozen=True)
class IngestConfig:
    limits: ImageLimits = field(default_factory=ImageLimits)
    workers: int = 0  # 0 = one per core
    batch_size: int = 16
    window: int = 4  # batches in flight per worker
    copy_rejected: bool = True  # keep a copy of each rejected file under quarantine/
    # rows per Parquet row group: all of the tables the parent holds. Measured on 300k tiny
    # images (benchmarks/ingest_scale.py): 10,000 peaks lower than 1,000 (812 vs 881 MiB)
    table_rows: int = 10_000

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass
class IngestResult:
    """Counts and the first rows in memory; the tables themselves are files (see TableFile)."""

    manifest_file: TableFile
    quarantine_file: TableFile
    files_seen: int
    new_objects: int  # originals written to the store by this run (0 when re-run)
    duplicates: int  # later names of bytes already accepted in this drop (the rows' aliases)
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    preview: pd.DataFrame = field(default_factory=pd.DataFrame)  # first manifest rows
    quarantine_examples: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def accepted(self) -> int:
        return self.manifest_file.rows

    @property
    def quarantined(self) -> int:
        return self.quarantine_file.rows

    @property
    def manifest(self) -> pd.DataFrame:
        """The whole manifest in memory: for small drops and tests."""
        return self.manifest_file.read()

    @property
    def quarantine(self) -> pd.DataFrame:
        return self.quarantine_file.read()


def image_key(image_id: str, fmt: str) -> str:
    return f"images/{image_id[:2]}/{image_id}.{fmt}"


def store_original(store: Store, info: ImageInfo, data: bytes) -> tuple[str, bool]:
    """Write a vetted image under its content address; (key, whether it was written).

    Same key means same bytes, so only the size needs checking. A size mismatch is a leftover of
    a crash before the caller's `store.sync()`, and is rewritten."""
    key = image_key(info.image_id, info.format)
    if store.size(key) == len(data):
        return key, False
    store.write_bytes(key, data, durable=False)
    return key, True


def is_image_candidate(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return name != MARKER and not name.lower().endswith(ANNOTATION_SUFFIXES)


def now_utc() -> datetime:
    return datetime.now(UTC)


# --- worker side --------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(
    source: Store, store: Store, drop: str, config: IngestConfig, parent: int | None = None
) -> None:
    if parent is not None:
        _die_with(parent)
    _WORKER.update(source=source, store=store, drop=drop, config=config)


def _die_with(parent: int) -> None:
    """Decoders never outlive an interrupted ingest: on Linux the kernel kills this worker when
    its parent dies, kill -9 included (PR_SET_PDEATHSIG). Elsewhere the pool's own shutdown is
    all there is."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _process_batch(entries: list[Entry]) -> list[dict]:
    return [_process_one(e, **_WORKER) for e in entries]


def _process_one(
    entry: Entry, source: Store, store: Store, drop: str, config: IngestConfig
) -> dict:
    result = {"name": entry.key, "bytes": entry.size}
    if entry.is_symlink:
        return result | _rejected("symlink_not_followed", f"-> {entry.symlink_target}")
    if entry.key.startswith("/") or any(p in ("", ".", "..") for p in entry.key.split("/")):
        return result | _rejected("unsafe_name", entry.key)  # an S3 key may say anything
    if entry.size > config.limits.max_bytes:
        return result | _rejected(
            "file_too_large", f"{entry.size} bytes > {config.limits.max_bytes}"
        )
    try:
        data = source.read_bytes(entry.key)
    except OSError as exc:
        return result | _rejected("unreadable_file", str(exc))
    result["bytes"] = len(data)
    try:
        info = inspect_image(data, config.limits)
    except ImageRejected as rejected:
        out = result | {"status": "rejected", "code": rejected.code, "message": rejected.message}
        if config.copy_rejected and data:
            qkey = f"quarantine/{drop}/files/{entry.key}"
            store.write_bytes(qkey, data)
            out["quarantine_uri"] = store.uri(qkey)
        return out
    key, written = store_original(store, info, data)
    return result | {
        "status": "accepted",
        "info": info,
        "key": key,
        "uri": store.uri(key),
        "written": written,
    }


def _rejected(code: str, detail: str) -> dict:
    return {"status": "rejected", "code": code, "message": f"{REASONS[code]}: {detail}"}


# --- parent side --------------------------------------------------------------------------


def _batched(items: Iterable[Entry], size: int) -> Iterator[list[Entry]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _results(
    entries: Iterable[Entry], source: Store, store: Store, drop: str, config: IngestConfig
) -> Iterator[dict]:
    """Results in listing order, with at most `window * workers` batches in flight."""
    workers = config.worker_count()
    if workers == 1:
        _init_worker(source, store, drop, config)
        for batch in _batched(entries, config.batch_size):
            yield from _process_batch(batch)
        return
    # spawn, not fork: Dagster and boto3 run threads that a fork would copy mid-flight.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(source, store, drop, config, os.getpid()),
    ) as pool:
        pending: deque = deque()
        for batch in _batched(entries, config.batch_size):
            pending.append(pool.submit(_process_batch, batch))
            if len(pending) >= config.window * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def ingest_drop(
    source: Store,
    store: Store,
    drop: str,
    config: IngestConfig = IngestConfig(),
    progress: Callable[[int], None] | None = None,
    workdir: Path | None = None,
) -> IngestResult:
    """Ingest every image candidate under `source` (the drop's root).

    Within the drop the first name (in sorted order) of identical bytes is the accepted row and
    later names become its `aliases`; so accepted + duplicates + quarantined = files seen.
    The tables are written under `workdir` (default: a temporary folder removed with the
    result)."""
    keep = None
    if workdir is None:
        keep = TemporaryFolder("cvops-ingest-")
        workdir = keep.path
    workdir = Path(workdir)
    detected_at = now_utc()
    group = config.table_rows
    accepted = TableWriter(workdir / "manifest.partial.parquet", MANIFEST_SCHEMA, group, keep)
    quarantine = TableWriter(workdir / "quarantine.parquet", QUARANTINE_SCHEMA, group, keep)
    firsts: set[bytes] = set()  # 16 bytes of each accepted image_id: enough to tell them apart
    aliases: dict[str, list[str]] = {}  # only for images seen more than once
    reasons: Counter = Counter()
    preview, examples = [], []
    seen = new_objects = duplicates = 0
    entries = (e for e in source.list() if is_image_candidate(e.key))
    for result in _results(entries, source, store, drop, config):
        seen += 1
        if progress is not None:
            progress(seen)
        if result["status"] == "rejected":
            row = {
                "source": drop,
                "stage": "raw_images",
                "original_name": result["name"],
                "position": "",
                "reason_code": result["code"],
                "reason": result["message"],
                "bytes": result["bytes"],
                "quarantine_uri": result.get("quarantine_uri", ""),
                "detected_at": detected_at,
            }
            quarantine.add(row)
            reasons[row["reason_code"]] += 1
            if len(examples) < PREVIEW_ROWS:
                examples.append(row)
            continue
        info = result["info"]
        new_objects += result["written"]
        short = bytes.fromhex(info.image_id)[:16]
        if short in firsts:
            aliases.setdefault(info.image_id, []).append(result["name"])
            duplicates += 1
            continue
        firsts.add(short)
        row = {
            "image_id": info.image_id,
            "uri": result["uri"],
            "key": result["key"],
            "source": drop,
            "original_name": result["name"],
            "aliases": [],
            "format": info.format,
            "mode": info.mode,
            "width": info.width,
            "height": info.height,
            "channels": info.channels,
            "bytes": info.bytes,
            "phash": info.phash,
            "thumb": info.thumb,
            "ingested_at": detected_at,
        }
        accepted.add(row)
        if len(preview) < PREVIEW_ROWS:
            preview.append(row)
    store.sync()  # one flush for the whole drop, before anything records these objects
    manifest = _with_aliases(accepted.close(), workdir / "manifest.parquet", aliases, group)
    return IngestResult(
        manifest,
        quarantine.close(),
        seen,
        new_objects,
        duplicates,
        dict(reasons),
        pd.DataFrame(preview, columns=MANIFEST_COLUMNS),
        pd.DataFrame(examples, columns=QUARANTINE_COLUMNS),
    )


def _with_aliases(
    partial: TableFile, path: Path, aliases: dict[str, list[str]], rows: int
) -> TableFile:
    """The manifest with each row's later names filled in: a second streaming pass, only when
    the drop had duplicates (their names are all that was kept)."""
    if not aliases:
        partial.path.replace(path)
        return TableFile(path, partial.rows, partial.keep)
    out = TableWriter(path, MANIFEST_SCHEMA, rows, partial.keep)
    for chunk in partial.chunks(rows):
        chunk["aliases"] = [aliases.get(i, []) for i in chunk["image_id"]]
        out.add_batch(pa.Table.from_pandas(chunk, schema=MANIFEST_SCHEMA, preserve_index=False))
    partial.path.unlink()
    return out.close()
