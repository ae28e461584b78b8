"""The `cvops` console script, run as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

CVOPS = str(Path(sys.executable).parent / "cvops")


def test_help_lists_every_command_and_the_environment():
    out = subprocess.run([CVOPS, "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("demo", "demo-data", "ingest", "drops", "CVOPS_HOME", "CVOPS_S3_ENDPOINT_URL"):
        assert word in out


def test_demo_ingests_and_curates_the_bundled_drop_in_a_persistent_instance(tmp_path):
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
