"""Shared fixtures: an isolated CVOPS_HOME/DAGSTER_HOME, and a real S3 server on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cvops_pipelines_tests.helpers import free_port, mlflow_server_process, wait_for_port

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one torch/OpenMP thread each, or their thread pools fight
    # (set before anything imports torch; the demos' processes inherit it)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


def pytest_collection_modifyitems(items):
    """The demo-based tests (minutes, one module) first, so the other worker's many short tests
    run beside them instead of after them."""
    demos = ("demo_run", "detection_demo")
    items.sort(key=lambda item: not any(d in getattr(item, "fixturenames", ()) for d in demos))


@pytest.fixture(autouse=True)
def isolated_homes(tmp_path, monkeypatch):
    """Nothing a test does lands in the developer's ./.cvops or ./.dagster_home."""
    home = tmp_path / "cvops_home"
    monkeypatch.setenv("CVOPS_HOME", str(home))
    monkeypatch.delenv("CVOPS_DROPS", raising=False)
    monkeypatch.delenv("CVOPS_ONTOLOGY", raising=False)
    monkeypatch.delenv("CVOPS_LOOP", raising=False)
    monkeypatch.delenv("CVOPS_MODEL_NAME", raising=False)
    monkeypatch.delenv("CVOPS_S3_BUCKET", raising=False)
    monkeypatch.delenv("CVOPS_S3_ENDPOINT_URL", raising=False)
    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI into os.environ; setenv first so
    # teardown removes whatever a test's MLflow calls left there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    return home


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint: moto in server mode, as its own process on loopback."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_env, request):
    import boto3

    name = (
        f"cvops-{request.node.name.lower().replace('_', '-')[:40]}-{int(time.time() * 1e6) % 10**6}"
    )
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` over HTTP on loopback (SQLite backend, proxied artifacts)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    with mlflow_server_process(
        root, f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts")
    ) as url:
        yield url


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (Debian's postgresql) on a loopback port, started for the session.

    initdb refuses to run as root, so as root the cluster belongs to the `postgres` user."""
    from cvops_pipelines_tests.postgres import PostgresServer

    with PostgresServer.start() as server:
        yield server


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`cvops-demo --turns 5` run once per session (the README's two turns and three more), in
    homes of its own: the CLI test
    checks its output, the browser test opens the Dagster UI on the instance it leaves behind."""
    root = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "CVOPS_HOME": str(root / "home"), "DAGSTER_HOME": str(root / "dagster")}
    # the README's command with three more turns, as a user runs it; under xdist with the
    # worker's one OpenMP thread
    # (both demos start first, side by side: two torch thread pools each would fight for 2 cores)
    timings, report = root / "timings.json", root / "report.json"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "cvops-demo"),
            "--turns",
            "5",
            "--timings",
            str(timings),
            "--report",
            str(report),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,  # five turns on one thread; minutes more beside a busy machine
    )
    return {"root": root, "env": env, "proc": proc, "timings": timings, "report": report}
