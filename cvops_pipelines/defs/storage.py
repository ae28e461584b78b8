"""The local Dagster instance's SQLite storage, with its database engines kept open.

Dagster's SQLite storage builds a SQLAlchemy engine, opens a connection and disposes of both for
every event it writes (a run writes 30-60), and initialises each run's event database through
alembic: about 0.4 s a run beyond its steps, a Dagster share of 3.8 % in a three-turn demo. Here
each database file keeps one engine with a small connection pool, and a new run's database is a
copy of an empty one: 0.35x the cost a run (`./dev bench run_overhead`), 2.0 % of the same demo
(`loop_latency`). The files, their schema and their layout under `base_dir` are Dagster's own:
an instance written by one storage reads with the other. Production uses Postgres, which pools
already (infra/dagster/dagster.production.yaml).

Configured in infra/dagster/dagster.yaml:

    storage:
      custom:
        module: cvops_pipelines.defs.storage
        class: PooledSqliteStorage
        config: {base_dir: {env: DAGSTER_HOME}}
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

from dagster._config.config_schema import UserConfigSchema
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SqliteEventLogStorage,
)
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sql import create_engine
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from dagster._serdes import ConfigurableClassData
from sqlalchemy.pool import NullPool

BUSY_TIMEOUT_S = 15  # what Dagster's SQLite storages wait for another writer's lock
OPEN_SHARDS = 8  # run databases kept open besides the index: a run writes to its own and the index


class PooledSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's run-sharded SQLite event log, with an engine per shard kept open (the index and
    the most recently used run shards; older ones are disposed of). A new run's shard is a copy
    of an empty one Dagster initialised once in this process: initialising each anew loaded
    alembic's ~180 migration scripts to stamp it (0.1 s a run)."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self._engines: OrderedDict = OrderedDict()
        self._empty_shard: bytes | None = None
        super().__init__(base_dir, inst_data)

    def _engine(self, shard: str):
        engine = self._engines.pop(shard, None)
        if engine is None:
            if shard != INDEX_SHARD_NAME and shard not in self._initialized_dbs:
                self._place_empty_shard(shard)
            engine = create_engine(
                self.conn_string_for_shard(shard), connect_args={"timeout": BUSY_TIMEOUT_S}
            )
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
        self._engines[shard] = engine  # the most recently used last
        while len(self._engines) > OPEN_SHARDS + 1:
            self._engines.popitem(last=False)[1].dispose()
        return engine

    def _place_empty_shard(self, shard: str) -> None:
        """A copy of an initialised empty shard, unless the file exists (another process made
        it, or it is an old run's): that one goes through Dagster's own check."""
        path = self.path_for_shard(shard)
        if os.path.exists(path):
            return
        if self._empty_shard is None:
            with tempfile.TemporaryDirectory() as tmp:
                empty = os.path.join(tmp, "empty.db")
                engine = create_engine(f"sqlite:///{empty}", poolclass=NullPool)
                self._initdb(engine)
                with engine.connect() as conn:  # everything into the main file, none in the WAL
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                engine.dispose()
                self._empty_shard = Path(empty).read_bytes()
        partial = f"{path}.{uuid.uuid4().hex}.partial"
        Path(partial).write_bytes(self._empty_shard)
        try:
            os.link(partial, path)  # atomic, and never over a file another process just made
        except FileExistsError:
            return
        finally:
            os.unlink(partial)
        self._initialized_dbs.add(shard)

    @contextmanager
    def _connect(self, shard: str):
        with self._db_lock:
            with self._engine(shard).connect() as conn, conn.begin():
                yield conn

    def _dispose_engines(self) -> None:
        with self._db_lock:
            while self._engines:
                self._engines.popitem()[1].dispose()

    def wipe(self) -> None:
        self._dispose_engines()  # the run shards' files are deleted: no connection may outlive them
        super().wipe()

    def dispose(self) -> None:
        self._dispose_engines()
        super().dispose()


class PooledSqliteRunStorage(SqliteRunStorage):
    """Dagster's SQLite run storage with its one engine kept open. Its pool hands each open
    transaction its own connection, as Dagster's engine per call did (its migrations nest them)."""

    def __init__(self, conn_string: str, inst_data: ConfigurableClassData | None = None):
        self._engine = create_engine(conn_string, connect_args={"timeout": BUSY_TIMEOUT_S})
        super().__init__(conn_string, inst_data)

    @contextmanager
    def connect(self):
        with self._engine.connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        self._engine.dispose()
        super().dispose()


class PooledSqliteStorage(DagsterSqliteStorage):
    """`storage: sqlite` with pooled engines: the same files under `base_dir`."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self.base_dir = base_dir
        self._inst_data = inst_data
        # from_local creates and migrates the runs database as Dagster's own storage does
        self._run_storage = PooledSqliteRunStorage.from_local(_runs_directory(base_dir))
        self._event_log_storage = PooledSqliteEventLogStorage(_event_logs_directory(base_dir))
        self._schedule_storage = SqliteScheduleStorage.from_local(_schedule_directory(base_dir))
        super(DagsterSqliteStorage, self).__init__()  # Dagster's own __init__ opens its storages

    @classmethod
    def config_type(cls) -> UserConfigSchema:
        return DagsterSqliteStorage.config_type()

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> PooledSqliteStorage:
        return cls(inst_data=inst_data, **config_value)
