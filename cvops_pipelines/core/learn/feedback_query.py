"""Resolved feedback records queried with DuckDB straight from the feedback partitions' Parquet
files, instead of concatenating every partition in pandas.

The engine deduplicates records and applies the latest corrections out of core (spilling to
disk past its memory limit), reads only the columns a query names and hands pandas only the rows
it asks for: a consumer's memory follows its answer, not the backlog. The records view gives
the one statement of "the latest correction wins" in the pipeline: tests hold it to a pandas
reference on the concatenated partitions (`cvops_pipelines_tests/reference.py`: rows, values and
order).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cvops_pipelines.core.base.tables import PartitionedTable
from cvops_pipelines.core.learn.feedback import RECORD_COLUMNS
from cvops_pipelines.edge.wire import FEEDBACK

log = logging.getLogger(__name__)  # the Dagster instance shows it in the run's event log
MEMORY_LIMIT = "1GB"  # past this DuckDB spills to its temp folder
_TYPES = {  # every other column is text
    "confidence": "DOUBLE",
    "frame_time": "DOUBLE",
    "image_kept": "BOOLEAN",
    "width": "BIGINT",
    "height": "BIGINT",
    "thumb": "BLOB",
    "ingested_at": "TIMESTAMPTZ",
}
_FIX = ["corrected_label", "corrected_at", "corrected_boxes"]


class FeedbackQuery:
    """A DuckDB connection with a `records` view: one row per record, the latest correction
    applied, in capture order (ties: the later batch row last).
    Extra DataFrames given to `frame` are queryable by their names."""

    def __init__(self, connection) -> None:
        self.connection = connection
        self.skipped: list[str] = []  # partitions left out, and why

    def frame(self, sql: str, **frames: pd.DataFrame | pa.Table) -> pd.DataFrame:
        for name, frame in frames.items():
            self.connection.register(name, frame)
        try:
            return self.connection.sql(sql).to_arrow_table().to_pandas()
        finally:
            for name in frames:
                self.connection.unregister(name)

    def records(
        self,
        columns: list[str] | None = None,
        where: str = "TRUE",
        per_image: bool = False,
        **frames: pd.DataFrame | pa.Table,
    ) -> pd.DataFrame:
        """Resolved records (these columns) that meet a SQL condition, in capture order;
        `per_image`: only each image's first record (the one its manifest row comes from)."""
        names = ", ".join(f'"{c}"' for c in (columns or RECORD_COLUMNS))
        if per_image:  # one aggregate row per image (the first by capture order), no window
            order = "{'late': captured_at IS NULL, 'at': coalesce(captured_at, ''), 'pos': _pos}"
            first = f"arg_min(_pos, {order})"
            where = f"_pos IN (SELECT {first} FROM records WHERE {where} GROUP BY image_id)"
        sql = f"SELECT {names} FROM records WHERE {where}"
        return self.frame(f"{sql} ORDER BY captured_at NULLS LAST, _pos", **frames)


REVIEWED = "corrected_label IS NOT NULL"
# A record whose device dropped its image (selective buffering) counts in production metrics
# but gives the pool, the queue, the replay set and the encoder nothing to look at.
HAS_IMAGE = "key IS NOT NULL"
LEAN_COLUMNS = [c for c in RECORD_COLUMNS if c != "thumb"]  # only the pool's manifest shows it


def ids(values) -> pa.Table:
    """Image ids as a one-column table of text (empty included), to pass to a query."""
    return pa.table({"image_id": pa.array(sorted(set(values)), pa.string())})


def labeled_field_images(query: FeedbackQuery, annotated) -> pd.DataFrame:
    """The first record of each field image that has a label: an operator's review of any of
    its records, or an annotation among `annotated` (expert labels from the annotation queue).
    The images the labeled pool can use; the others it leaves out anyway."""
    where = (
        f"{HAS_IMAGE} AND (image_id IN (SELECT image_id FROM records WHERE {REVIEWED}) "
        "OR image_id IN (SELECT image_id FROM annotated))"
    )
    return query.records(where=where, per_image=True, annotated=ids(annotated))


def unknown_image_count(query: FeedbackQuery, known) -> int:
    """Field images not among `known` (e.g. the drops' images)."""
    sql = (
        "SELECT count(DISTINCT image_id) FROM records "
        f"WHERE {HAS_IMAGE} AND image_id NOT IN (SELECT * FROM known)"
    )
    return int(query.frame(sql, known=ids(known)).iloc[0, 0])


# What each consumer of feedback reads: exactly the rows it read when it resolved in pandas.


@dataclass(frozen=True)
class PoolFeedback:
    images: pd.DataFrame  # the first record of each field image with a label
    reviewed: pd.DataFrame  # reviewed records (the operators' votes)
    images_in_no_drop: int  # field images no drop holds, labeled or not


def pool_feedback(table: PartitionedTable, annotated, drop_images) -> PoolFeedback:
    """For the labeled pool: `annotated` are the image ids the annotations label, `drop_images`
    the drops' image ids."""
    with feedback_query(table) as query:
        images = labeled_field_images(query, annotated)
        reviewed = query.records(LEAN_COLUMNS, f"{REVIEWED} AND {HAS_IMAGE}")
        unknown = unknown_image_count(query, drop_images)
    return PoolFeedback(images, reviewed, unknown)


def reviewed_or_expert(table: PartitionedTable, experts) -> pd.DataFrame:
    """For the replay set: records an operator reviewed or whose image an expert labeled."""
    with feedback_query(table) as query:
        where = f"{HAS_IMAGE} AND ({REVIEWED} OR image_id IN (SELECT * FROM experts))"
        return query.records(LEAN_COLUMNS, where, experts=ids(experts))


def reviewed_records(table: PartitionedTable) -> pd.DataFrame:
    """For the canary decision, judged on reviewed records only (replayed: with their image)."""
    with feedback_query(table) as query:
        return query.records(LEAN_COLUMNS, f"{REVIEWED} AND {HAS_IMAGE}")


def queue_candidates(table: PartitionedTable, experts) -> pd.DataFrame:
    """For the annotation queue: records of images no expert has labeled."""
    with feedback_query(table) as query:
        where = f"{HAS_IMAGE} AND image_id NOT IN (SELECT * FROM experts)"
        return query.records(LEAN_COLUMNS, where, experts=ids(experts))


def predictions(table: PartitionedTable) -> pd.DataFrame:
    """For the ontology report: what each record predicted and its review."""
    with feedback_query(table) as query:
        return query.records(["predicted", "corrected_label"])


def field_images(table: PartitionedTable) -> pd.DataFrame:
    """For the SSL encoder: each field image once (image_id, key, source)."""
    with feedback_query(table) as query:
        images = query.records(["image_id", "key", "batch_id"], HAS_IMAGE, per_image=True)
    return images.assign(source=FEEDBACK + images["batch_id"])[["image_id", "key", "source"]]


def all_records(table: PartitionedTable) -> pd.DataFrame:
    """Every resolved record without its thumbnail (a detector fleet's production metrics)."""
    with feedback_query(table) as query:
        return query.records(LEAN_COLUMNS)


@contextmanager
def feedback_query(table: PartitionedTable, memory_limit: str = MEMORY_LIMIT):
    """The query over every written partition of `table` (local files in place; from S3, a
    downloaded copy removed afterwards). Partitions never written are skipped, as read_all does."""
    import duckdb

    scratch = Path(tempfile.mkdtemp(prefix="cvops-feedback-query-"))
    try:
        paths, skipped = _usable_partitions(table, scratch)
        connection = duckdb.connect(
            config={
                "memory_limit": memory_limit,
                "temp_directory": str(scratch / "spill"),
            }
        )
        try:
            _records_view(connection, paths)
            query = FeedbackQuery(connection)
            query.skipped = skipped
            yield query
        finally:
            connection.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_NUMBERS = ("confidence", "width", "height")  # text in these does not cast: the query would fail


def _text(t) -> bool:
    return any(f(t) for f in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary))


def partition_problem(path: Path) -> str:
    """Why a feedback partition's file cannot be read as one ("" if it can): not Parquet
    (empty, truncated, corrupt), or a schema that drifted (no `kind` or `record_id`, a column
    of the wrong type)."""
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        return f"not a readable Parquet file ({type(exc).__name__}: {exc})"
    for column in ("kind", "record_id"):
        if column not in schema.names:
            return f"has no {column!r} column: not a feedback partition (schema drift)"
    for field in schema:
        if field.name in _NUMBERS and _text(field.type):
            return f"column {field.name!r} is {field.type}, not a number (schema drift)"
    return ""


def _usable_partitions(table: PartitionedTable, scratch: Path) -> tuple[list[str], list[str]]:
    """The partitions' files the query reads, each linked under a plain name (a store root
    named `cvops[ab]` is never read as a glob pattern), and why each other one is skipped."""
    paths, skipped = [], []
    for i, (partition, path) in enumerate(table.local_files(scratch)):
        problem = partition_problem(path)
        if problem:
            skipped.append(f"feedback partition {partition} ({table.keys[partition]}): {problem}")
            log.warning("skipped %s", skipped[-1])
            continue
        link = scratch / f"part-{i:08d}.parquet"
        if path != link:
            link.symlink_to(Path(path).absolute())
        paths.append(str(link))
    return paths, skipped


def _records_view(connection, paths: list[str]) -> None:
    """The `records` view over these files, in partition order (the order read_all concatenates
    them in). A column no file has reads as NULL, a column typed null in one file as its type.
    Views all the way down: DuckDB reads only the columns a query names."""
    if not paths:
        columns = ", ".join(
            f'CAST(NULL AS {_TYPES.get(c, "VARCHAR")}) AS "{c}"' for c in RECORD_COLUMNS
        )
        connection.execute(
            f"CREATE VIEW records AS SELECT {columns}, 0::BIGINT AS _pos WHERE FALSE"
        )
        return
    connection.register("files", pd.DataFrame({"filename": paths, "part": range(len(paths))}))
    listed = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
    scan = (
        f"read_parquet([{listed}], union_by_name = true, filename = true, file_row_number = true)"
    )
    present = {name for path in paths for name in pq.read_schema(path).names}  # DuckDB's
    # DESCRIBE would read the same footers and keep ~100 MB per 1,000 files (measured)

    def typed(column: str) -> str:
        value = f'"{column}"' if column in present else "NULL"
        return f'CAST({value} AS {_TYPES.get(column, "VARCHAR")}) AS "{column}"'

    fixes = ", ".join(_FIX)
    kept = ", ".join(
        f'CASE WHEN f.fixed IS NULL THEN r."{c}" ELSE f."{c}" END AS "{c}"'
        if c in _FIX
        else f'r."{c}"'
        for c in RECORD_COLUMNS
    )
    connection.execute(
        f"""
        CREATE VIEW raw AS
        SELECT {", ".join(typed(c) for c in ["kind", *RECORD_COLUMNS])},
               (files.part::BIGINT << 32) + file_row_number AS _pos
        FROM {scan} JOIN files USING (filename)
        """
    )
    # Which row wins is settled once per query object, on the keys alone, into two small
    # tables; each query then reads the winners' other columns in one pass. A re-delivered
    # record: its last delivery. A correction: the latest by time (a tie: the later row; nulls
    # sort last, as in pandas' stable sorts).
    connection.execute(
        """
        CREATE TEMP TABLE winners AS
        SELECT max(_pos) AS _pos FROM raw WHERE kind = 'record' GROUP BY record_id
        """
    )
    connection.execute(
        f"""
        CREATE TEMP TABLE fixes AS
        SELECT record_id AS fixed, {fixes} FROM raw WHERE kind = 'correction'
        QUALIFY row_number() OVER (
            PARTITION BY record_id ORDER BY corrected_at DESC NULLS FIRST, _pos DESC
        ) = 1
        """
    )
    connection.execute(
        f"""
        CREATE VIEW records AS
        SELECT {kept}, r._pos FROM raw r LEFT JOIN fixes f ON r.record_id = f.fixed
        WHERE r.kind = 'record' AND r._pos IN (SELECT _pos FROM winners)
        """
    )
