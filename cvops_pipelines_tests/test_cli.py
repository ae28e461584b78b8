"""The `cvops` console script, run as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

CVOPS = str(Path(sys.executable).parent / "cvops")


def test_help_lists_every_command_and_the_environment():
    out = subprocess.run([CVOPS, "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("demo", "demo-data", "ingest", "drops", "keygen", "fleet", "CVOPS_HOME",
                 "CVOPS_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "CVOPS_SIGNING_KEY"):
        assert word in out
    edge = subprocess.run([str(Path(CVOPS).parent / "cvops-edge"), "--help"], capture_output=True,
                          text=True, check=True).stdout
    for word in ("sync", "predict", "upload", "run", "--public-key", "CVOPS_EDGE_STORE"):
        assert word in edge


def test_keygen_refuses_to_overwrite_a_key(tmp_path):
    env = {**os.environ, "CVOPS_HOME": str(tmp_path / "home")}
    first = subprocess.run([CVOPS, "keygen"], env=env, capture_output=True, text=True)
    assert first.returncode == 0 and "never commit" in first.stdout
    again = subprocess.run([CVOPS, "keygen"], env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def test_demo_runs_the_loop_from_drop_to_fleet_in_a_persistent_instance(tmp_path):
    env = {**os.environ, "CVOPS_HOME": str(tmp_path / "home"),
           "DAGSTER_HOME": str(tmp_path / "dagster")}
    proc = subprocess.run([CVOPS, "demo"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "ingest drop initial: OK" in proc.stdout
    assert "raw_images_contract passed" in proc.stdout
    assert "== curate: OK" in proc.stdout and "dataset_version_leakage passed" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    (version,) = [p.name for p in (tmp_path / "home/datasets").iterdir()]
    assert f"dataset: {version}" in proc.stdout
    assert "== train + evaluate + export: OK" in proc.stdout
    assert "challenger_not_worse_than_champion passed" in proc.stdout
    assert "edge -> onnx_" in proc.stdout
    assert "== release: OK" in proc.stdout and "== canary: OK" in proc.stdout
    assert "verdict: promote" in proc.stdout  # the first release, after field feedback
    stable = json.loads((tmp_path / "home/releases/channels/stable.json").read_text())
    assert stable["release"].startswith("rel-1-")
    assert oct((tmp_path / "home/keys/release_signing.key").stat().st_mode & 0o777) == "0o600"
    manifest = pd.read_parquet(tmp_path / "home/tables/raw_images/initial.parquet")
    labels = pd.read_parquet(tmp_path / "home/tables/annotations/initial.parquet")
    assert len(manifest) > 700 and len(labels) == len(manifest)
    assert (tmp_path / "dagster/dagster.yaml").exists()  # runs land in a real instance
    assert "telemetry" in (tmp_path / "dagster/dagster.yaml").read_text()

    drops = subprocess.run([CVOPS, "drops"], env=env, capture_output=True, text=True, check=True)
    assert "initial\tcomplete" in drops.stdout


def test_ingest_of_a_missing_drop_fails_clearly(tmp_path):
    env = {**os.environ, "CVOPS_HOME": str(tmp_path / "home"),
           "DAGSTER_HOME": str(tmp_path / "dagster")}
    proc = subprocess.run([CVOPS, "ingest", "nope"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "drop 'nope'" in proc.stderr and "does not exist" in proc.stderr
    (tmp_path / "home/drops/half").mkdir(parents=True)
    proc = subprocess.run([CVOPS, "ingest", "half"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "no _SUCCESS marker yet" in proc.stderr
