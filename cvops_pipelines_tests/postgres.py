"""Start and stop a throwaway PostgreSQL cluster for tests: Debian's server binaries, a free
loopback port, password authentication over TCP (as a deployment would use it)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cvops_pipelines_tests.helpers import free_port, wait_for_port

USER, PASSWORD = "cvops", "cvops-test-password"


def server_bindir() -> Path:
    """Where initdb and postgres live (CVOPS_PG_BINDIR, PATH, or Debian's versioned folders)."""
    if os.environ.get("CVOPS_PG_BINDIR"):
        return Path(os.environ["CVOPS_PG_BINDIR"])
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
    )
    found = shutil.which("initdb") or (candidates[-1] if candidates else None)
    if not found:
        raise RuntimeError(
            "PostgreSQL server binaries not found: `apt-get install postgresql` "
            "(./dev test does this when run as root) or set CVOPS_PG_BINDIR"
        )
    return Path(os.path.realpath(found)).parent


@dataclass
class PostgresServer:
    port: int
    data_dir: Path

    def url(self, database: str, scheme: str = "postgresql") -> str:
        return f"{scheme}://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg2

        # autocommit: CREATE DATABASE refuses to run in a transaction
        connection = psycopg2.connect(self.url("postgres"))
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return name

    def query(self, database: str, sql: str, *args) -> list[tuple]:
        import psycopg2

        connection = psycopg2.connect(self.url(database))
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, args)
                return cursor.fetchall()
        finally:
            connection.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Listening precedes accepting logins (recovery, startup) by a moment."""
        import psycopg2

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg2.connect(self.url("postgres")).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    @classmethod
    @contextmanager
    def start(cls):
        bindir = server_bindir()
        root = Path(tempfile.mkdtemp(prefix="cvops-pg-"))  # not under pytest's root-only tmp
        as_root = os.geteuid() == 0
        prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        (root / "pwfile").write_text(PASSWORD + "\n")
        if as_root:
            shutil.chown(root, "postgres")
            shutil.chown(root / "pwfile", "postgres")
        data = root / "data"
        subprocess.run(
            [
                *prefix,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                USER,
                "--pwfile",
                str(root / "pwfile"),
                "--auth-host=scram-sha-256",
                "--auth-local=peer",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        port = free_port()
        log = open(root / "server.log", "wb")
        proc = subprocess.Popen(
            [
                *prefix,
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={root}",
                "-c",
                "fsync=off",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, timeout=30)
            server = cls(port, data)
            server.wait_ready()
            yield server
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
            shutil.rmtree(root, ignore_errors=True)
