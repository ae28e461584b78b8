"""What production metrics remember between runs, so a run costs the new feedback batches only.

A fleet sends millions of records; recomputing accuracy, coverage and drift windows from all of
them on every run costs the backlog. Instead each batch is absorbed once into a SQLite file:

- `records`: one row per record id with what its contribution depends on (release, cohort,
  period, prediction, its own label and the latest late correction), so a re-delivered record or
  a correction for an old record replaces that record's contribution instead of adding one;
- `cells`: record counts per release x cohort x period x (reviewed, label, hit), kept by
  subtracting a changed record's old contribution and adding its new one; every figure of the
  report is a sum over these;
- `window`: the latest `drift_window` records per release (what the drift test reads);
- `batches`: which feedback batches were absorbed.

Each batch is absorbed in one transaction, so a crash leaves it absorbed or not, never half.
The file is a cache of the feedback tables, kept in the store beside them
(`state/production_metrics.sqlite`): used in place in a local store; downloaded, updated and
uploaded whole from S3 (a compact file: 78 bytes a record measured at 1M records, so a
Kubernetes run pod needs no volume). Two runs racing on S3 each upload a consistent file and
the later one wins: the batches only the other absorbed are absorbed again next time, never
counted twice. Delete the file (or change the period or the window) and the next run rebuilds
it from every batch.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

STATE_KEY = "state/production_metrics.sqlite"
SCHEMA_VERSION = "2"  # 2: records name their device and whether their image came
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, rows INTEGER, absorbed_at TEXT);
CREATE TABLE IF NOT EXISTS records (
    record_id TEXT PRIMARY KEY, release TEXT, cohort TEXT, period TEXT, predicted TEXT,
    own_label TEXT, fix_label TEXT, fix_at TEXT, device_id TEXT, kept INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending_fixes (
    record_id TEXT PRIMARY KEY, label TEXT, fixed_at TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cells (
    release TEXT, cohort TEXT, period TEXT, reviewed INTEGER, label TEXT, hit INTEGER,
    n INTEGER, PRIMARY KEY (release, cohort, period, reviewed, label, hit)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS predicted (label TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS window (
    record_id TEXT PRIMARY KEY, release TEXT, captured_at TEXT, seq INTEGER, key TEXT
);
CREATE INDEX IF NOT EXISTS window_release ON window (release, captured_at, seq);
"""
ABSORBED = [  # the feedback columns a batch contributes
    "kind",
    "record_id",
    "release",
    "cohort",
    "predicted",
    "corrected_label",
    "corrected_at",
    "captured_at",
    "key",
    "device_id",
]
CELL_COLUMNS = ["release", "cohort", "period", "reviewed", "label", "hit", "n"]
_CHUNK = 500  # ids per IN (...) lookup: under SQLite's variable limit


def period_of(captured_at: pd.Series, period: str) -> pd.Series:
    captured = pd.to_datetime(captured_at, utc=True, format="ISO8601")
    return captured.dt.floor(period).dt.strftime("%Y-%m-%d %H:%M")


class AbsorbedState:
    """A SQLite file that absorbs feedback batches once each, whatever it keeps of them: what
    every task's production state shares. A subclass names its `schema`, its `tables`, the
    settings it was built for (`_wanted`: another value starts it over) and how one batch
    folds in (`_fold`)."""

    schema = ""
    tables: tuple[str, ...] = ()

    def __init__(self, path: Path | str):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, timeout=600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(self.schema)
        self.rebuilt = False  # whether this opening started it over (see reset)
        if dict(self.db.execute("SELECT key, value FROM meta")) != self._wanted():
            self.reset()  # new, or built for other settings or another schema

    def _wanted(self) -> dict:
        raise NotImplementedError

    def _fold(self, frame: pd.DataFrame) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for table in ("meta", "batches", *self.tables):
                self.db.execute(f"DELETE FROM {table}")
            self.db.executemany("INSERT INTO meta VALUES (?, ?)", self._wanted().items())
        self.rebuilt = True

    def close(self) -> None:
        self.db.close()

    def absorbed(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT batch_id FROM batches")}

    def absorb(self, batch_id: str, frame: pd.DataFrame) -> bool:
        """Fold one batch's feedback rows (kinds `record` and `correction`) in, in one
        transaction; False when the batch was absorbed already (by this run or a concurrent
        one)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if self.db.execute("SELECT 1 FROM batches WHERE batch_id = ?", (batch_id,)).fetchone():
                self.db.execute("ROLLBACK")
                return False
            self._fold(frame)
            self.db.execute(
                "INSERT INTO batches VALUES (?, ?, datetime('now'))", (batch_id, len(frame))
            )
        return True

    def _select(self, ids: list[str], columns: str, table: str) -> list[tuple]:
        out = []
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            out += self.db.execute(
                f"SELECT {columns} FROM {table} WHERE record_id IN ({marks})", chunk
            ).fetchall()
        return out


class ProductionState(AbsorbedState):
    """The absorbed feedback of one store, for one reporting period and drift window."""

    schema = SCHEMA
    tables = ("records", "pending_fixes", "cells", "predicted", "window")

    def __init__(self, path: Path | str, period: str, window: int):
        self.period, self.window = period, int(window)
        super().__init__(path)

    def _wanted(self) -> dict:
        return {"schema": SCHEMA_VERSION, "period": self.period, "window": str(self.window)}

    def _fold(self, frame: pd.DataFrame) -> None:
        frame = frame.reindex(columns=ABSORBED)  # an older table lacks a column: missing
        records = frame[frame["kind"] == "record"].drop_duplicates("record_id", keep="last")
        fixes = frame[frame["kind"] == "correction"].sort_values("corrected_at", kind="stable")
        fixes = fixes.drop_duplicates("record_id", keep="last")
        touched = list(dict.fromkeys([*records["record_id"], *fixes["record_id"]]))
        self._count(touched, -1)
        self._put_records(records)
        self._put_fixes(fixes)
        self._count(touched, +1)
        self._put_window(records)
        self.db.executemany(
            "INSERT OR IGNORE INTO predicted VALUES (?)",
            ((p,) for p in records["predicted"].dropna().unique()),
        )

    def _rows(self, ids: list[str], columns: str, table: str = "records") -> list[tuple]:
        return self._select(ids, columns, table)

    def _count(self, ids: list[str], sign: int) -> None:
        """Add (or take away) these records' contributions to the cells."""
        deltas: dict[tuple, int] = {}
        for release, cohort, period, predicted, own, fix, fix_at in self._rows(
            ids, "release, cohort, period, predicted, own_label, fix_label, fix_at"
        ):
            label = fix if fix_at is not None else own
            reviewed = label is not None
            cell = (release, cohort, period, int(reviewed), label or "", int(label == predicted))
            deltas[cell] = deltas.get(cell, 0) + sign
        self.db.executemany(
            "INSERT INTO cells VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT "
            "(release, cohort, period, reviewed, label, hit) DO UPDATE SET n = n + excluded.n",
            ((*cell, n) for cell, n in deltas.items() if n),
        )
        if sign < 0:
            self.db.execute("DELETE FROM cells WHERE n = 0")

    def _put_records(self, records: pd.DataFrame) -> None:
        """A re-delivered record replaces its own fields and keeps a correction it already has;
        a correction that arrived before its record applies now."""
        if records.empty:
            return
        periods = period_of(records["captured_at"], self.period)
        self.db.executemany(
            "INSERT INTO records (record_id, release, cohort, period, predicted, own_label, "
            "device_id, kept) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (record_id) DO UPDATE "
            "SET release = excluded.release, cohort = excluded.cohort, period = excluded.period, "
            "predicted = excluded.predicted, own_label = excluded.own_label, "
            "device_id = excluded.device_id, kept = excluded.kept",
            zip(
                records["record_id"],
                records["release"],
                records["cohort"],
                periods,
                records["predicted"],
                _nullable(records["corrected_label"]),
                _nullable(records["device_id"]),
                [int(not pd.isna(k)) for k in records["key"]],
            ),
        )
        early = self._rows(
            list(records["record_id"]), "record_id, label, fixed_at", "pending_fixes"
        )
        self._fix(early)
        self.db.executemany(
            "DELETE FROM pending_fixes WHERE record_id = ?", ((r[0],) for r in early)
        )

    def _put_fixes(self, fixes: pd.DataFrame) -> None:
        """The latest correction by time wins (a tie: the later batch), as the feedback query's;
        one for a record not seen yet waits in pending_fixes."""
        rows = list(
            zip(fixes["record_id"], _nullable(fixes["corrected_label"]), fixes["corrected_at"])
        )
        known = {r[0] for r in self._rows([r[0] for r in rows], "record_id")}
        self._fix([r for r in rows if r[0] in known])
        self.db.executemany(
            "INSERT INTO pending_fixes VALUES (?, ?, ?) ON CONFLICT (record_id) DO UPDATE SET "
            "label = excluded.label, fixed_at = excluded.fixed_at "
            "WHERE excluded.fixed_at >= pending_fixes.fixed_at",
            (r for r in rows if r[0] not in known),
        )

    def _fix(self, rows: Iterable[tuple]) -> None:
        self.db.executemany(
            "UPDATE records SET fix_label = ?2, fix_at = ?3 "
            "WHERE record_id = ?1 AND (fix_at IS NULL OR ?3 >= fix_at)",
            rows,
        )

    def _put_window(self, records: pd.DataFrame) -> None:
        """The newest `window` records per release by capture time (ties: arrival order), of
        those whose image came (the drift test runs the model on it)."""
        records = records[records["key"].notna()]
        if records.empty:
            return
        (seq,) = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM window").fetchone()
        self.db.executemany(
            "INSERT OR REPLACE INTO window VALUES (?, ?, ?, ?, ?)",
            zip(
                records["record_id"],
                records["release"],
                records["captured_at"],
                range(seq + 1, seq + 1 + len(records)),
                records["key"],
            ),
        )
        self.db.execute(
            "DELETE FROM window WHERE record_id IN (SELECT record_id FROM (SELECT record_id, "
            "ROW_NUMBER() OVER (PARTITION BY release ORDER BY captured_at DESC, seq DESC) AS "
            "newest FROM window) WHERE newest > ?)",
            (self.window,),
        )

    def cells(self) -> pd.DataFrame:
        return pd.read_sql_query(f"SELECT {', '.join(CELL_COLUMNS)} FROM cells", self.db)

    def latest(self, release: str) -> pd.DataFrame:
        """The drift window of a release: record_id, captured_at, key, oldest first."""
        return pd.read_sql_query(
            "SELECT record_id, captured_at, key FROM window WHERE release = ? "
            "ORDER BY captured_at, seq",
            self.db,
            params=(release,),
        )

    def coverage(self) -> pd.DataFrame:
        """Per device: frames predicted (records), images kept (sent with them), reviewed."""
        return pd.read_sql_query(
            "SELECT COALESCE(device_id, '') AS device_id, COUNT(*) AS frames, "
            "COALESCE(SUM(kept), 0) AS images_kept, "
            "SUM(CASE WHEN fix_at IS NOT NULL OR own_label IS NOT NULL THEN 1 ELSE 0 END) "
            "AS reviewed FROM records GROUP BY 1 ORDER BY 1",
            self.db,
        )

    def predicted_classes(self) -> list[str]:
        return sorted(row[0] for row in self.db.execute("SELECT label FROM predicted"))

    def pending_corrections(self) -> int:
        """Corrections whose record has not arrived (yet): counted nowhere until it does."""
        return self.db.execute("SELECT COUNT(*) FROM pending_fixes").fetchone()[0]


def _nullable(values: pd.Series) -> list:
    return [None if pd.isna(v) else str(v) for v in values]


def catch_up(state: ProductionState, feedback, on_missing=None) -> dict:
    """Absorb the feedback partitions (a core.base.tables.PartitionedTable) the state has not
    seen, oldest key first. A partition that was never written (its run failed) is reported to
    `on_missing(partition)` and left for a later run."""
    seen = state.absorbed()
    new, rows, missing = 0, 0, []
    for partition in feedback.partitions:
        if partition in seen:
            continue
        try:
            frame = feedback.read(partition)
        except FileNotFoundError:
            missing.append(partition)
            if on_missing:
                on_missing(partition)
            continue
        if state.absorb(partition, frame):
            new, rows = new + 1, rows + len(frame)
    return {
        "batches_absorbed": new,
        "rows_absorbed": rows,
        "batches_missing": len(missing),
        "state_rebuilt": state.rebuilt,
    }


def stored_state(store, period: str, window: int):
    """The store's production state, open; written back to the store when the block ends
    without an error (a failed run leaves the stored state as it was)."""
    return stored_file(store, STATE_KEY, lambda path: ProductionState(path, period, window))


@contextmanager
def stored_file(store, key: str, open_state) -> Iterator:
    """A state file of the store, open (`open_state(path)`, something with `close`): in place
    in a local store; from S3, downloaded, then uploaded when the block ends without error."""
    local = getattr(store, "local_path", None)
    if local is not None:
        state = open_state(local(key))
        try:
            yield state
        finally:
            state.close()
        return
    folder = tempfile.TemporaryDirectory(prefix="cvops-state-")
    with folder:
        path = Path(folder.name) / "state.sqlite"
        try:
            store.get_file(key, path)
        except FileNotFoundError:
            pass  # the first run, or a deleted cache: built from every batch
        state = open_state(path)
        try:
            yield state
        finally:
            state.close()  # the last connection checkpoints the WAL into the file
        store.put_file(key, path)
