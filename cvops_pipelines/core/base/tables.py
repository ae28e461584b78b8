"""Parquet tables in a Store, written atomically (temp + rename locally, one PUT on S3); and
tables too large for memory, written row group by row group to a local file first."""

from __future__ import annotations

import io
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cvops_pipelines.core.base.store import Store


def table_key(asset: str, partition: str | None = None) -> str:
    """Where an asset's table lives (one file per partition; `all` when unpartitioned)."""
    return f"tables/{asset}/{partition or 'all'}.parquet"


def record_key(asset: str, partition: str | None = None) -> str:
    """Where an asset's small record (a dict: a model's run, a summary) lives, as JSON."""
    return f"artifacts/{asset}/{partition or 'all'}.json"


def write_table(store: Store, key: str, df: pd.DataFrame) -> str:
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    store.write_bytes(key, buffer.getvalue())
    return store.uri(key)


def read_table(store: Store, key: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.read_bytes(key)))


@dataclass(frozen=True)
class TableFile:
    """A finished Parquet file on local disk: what an asset returns instead of a DataFrame when
    the table may not fit in memory (the tables IO manager moves the file into the store)."""

    path: Path
    rows: int
    # whatever must live as long as the file is read (e.g. the temporary folder holding it)
    keep: object = field(default=None, compare=False, repr=False)

    def read(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The whole table (or some columns): for small tables and tests."""
        return pd.read_parquet(self.path, columns=columns)

    def chunks(
        self, rows: int = 10_000, columns: list[str] | None = None
    ) -> Iterator[pd.DataFrame]:
        """The table about `rows` rows at a time (whole row groups, or slices of one larger
        than that), read a row group at a time: pyarrow's iter_batches keeps what it read
        (111 MiB held for a 100 MiB file, measured)."""
        parquet, pending, held = pq.ParquetFile(self.path), [], 0
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=columns, use_threads=False)
            pending.append(table)
            held += table.num_rows
            if held >= rows:
                whole = pa.concat_tables(pending)
                for start in range(0, whole.num_rows, rows):
                    yield whole.slice(start, rows).to_pandas()
                pending, held = [], 0
        if pending:
            yield pa.concat_tables(pending).to_pandas()


def table_file(store: Store, key: str) -> TableFile:
    """A stored table as a local file, not loaded: the file itself in a local store, a
    downloaded copy (removed with the handle) from S3."""
    local = getattr(store, "local_path", None)
    if local is not None:
        path = local(key)
        if not path.is_file():
            raise FileNotFoundError(f"{store.uri(key)} does not exist")
        return TableFile(path, pq.ParquetFile(path).metadata.num_rows)
    folder = TemporaryFolder("cvops-table-")
    path = folder.path / "table.parquet"
    store.get_file(key, path)
    return TableFile(path, pq.ParquetFile(path).metadata.num_rows, folder)


@dataclass(frozen=True)
class PartitionedTable:
    """The partitions of a partitioned table asset, unloaded: what an input annotated with this
    type receives, so a consumer that keeps its own state reads only the partitions it has not
    seen instead of the concatenation of all of them."""

    store: Store
    keys: dict[str, str]  # partition key -> table key in the store

    @property
    def partitions(self) -> list[str]:
        return list(self.keys)

    def read(self, partition: str) -> pd.DataFrame:
        """One partition's table; FileNotFoundError when it was never written."""
        return read_table(self.store, self.keys[partition])

    def read_all(self) -> pd.DataFrame:
        """Every written partition, concatenated in memory: for small tables, and the reference
        the feedback query is tested and benchmarked against."""
        frames = [
            read_table(self.store, key) for key in self.keys.values() if self.store.exists(key)
        ]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def local_files(self, folder: Path) -> list[tuple[str, Path]]:
        """Every written partition (its key, a local Parquet file), in partition order: a local
        store's own files, or S3 objects downloaded into `folder` (one request each, never in
        memory)."""
        local = getattr(self.store, "local_path", None)
        files = []
        for i, (partition, key) in enumerate(self.keys.items()):
            if local is not None:
                if local(key).is_file():
                    files.append((partition, local(key)))
            elif self.store.exists(key):
                files.append((partition, folder / f"{i:08d}.parquet"))
                self.store.get_file(key, files[-1][1])
        return files


class TemporaryFolder:
    """A folder removed once nothing refers to it (TableFile.keep holds it)."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        weakref.finalize(self, shutil.rmtree, self.path, True)


class TableWriter:
    """Rows (dicts) to a Parquet file in row groups: memory holds one group, whatever the row
    count. An empty table still gets its schema."""

    def __init__(
        self, path: Path, schema: pa.Schema, group_rows: int = 10_000, keep: object = None
    ) -> None:
        self.path, self.schema, self.group_rows, self.keep = Path(path), schema, group_rows, keep
        self.rows = 0
        self._buffer: list[dict] = []
        self._writer = pq.ParquetWriter(self.path, schema)

    def add(self, row: dict) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.group_rows:
            self._flush()

    def add_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        self._flush()
        self._writer.write_table(
            pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        )
        self.rows += batch.num_rows

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self.rows += len(self._buffer)
            self._buffer = []

    def close(self) -> TableFile:
        self._flush()
        self._writer.close()
        return TableFile(self.path, self.rows, self.keep)


def markdown_table(df: pd.DataFrame, max_rows: int = 10) -> str:
    """A small Markdown table for Dagster metadata (no tabulate dependency)."""
    if df.empty:
        return "_none_"
    shown = df.head(max_rows).astype(object).where(df.head(max_rows).notna(), "")
    escape = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [
        "| " + " | ".join(map(escape, shown.columns)) + " |",
        "|" + "---|" * len(shown.columns),
    ]
    lines += [
        "| " + " | ".join(escape(v) for v in row) + " |" for row in shown.itertuples(index=False)
    ]
    if len(df) > max_rows:
        lines.append(f"\n… {len(df) - max_rows} more rows")
    return "\n".join(lines)
