"""The `cvops` console script, run as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

CVOPS = str(Path(sys.executable).parent / "cvops")


def test_help_lists_every_command_and_the_environment():
    out = subprocess.run([CVOPS, "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("demo", "demo-data", "ingest", "drops", "status", "keygen", "fleet", "CVOPS_HOME",
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


@pytest.mark.xdist_group("demo")  # shares the session's demo run with the browser test
def test_demo_runs_two_turns_of_the_loop_in_a_persistent_instance(demo_run):
    tmp_path, env, proc, timings = (demo_run[k] for k in ("root", "env", "proc", "timings"))
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "ingest drop initial: OK" in out and "raw_images_contract passed" in out
    assert "== curate: OK" in out and "dataset_version_leakage passed" in out
    assert "Traceback" not in out + proc.stderr
    versions = {p.name for p in (tmp_path / "home/datasets").iterdir()}
    assert len(versions) == 2 and all(f"dataset: {v}" in out for v in versions)
    # turn 1: first model, released, fleet feedback, SLA and drift fire, queue answered
    assert out.count("== train + evaluate + export: OK") == 2
    assert "retraining_sensor -> train_job (first model)" in out
    assert "feedback_sensor -> feedback_job" in out and "0 batches quarantined" in out
    assert "check  : accuracy_sla FAILED" in out and "check  : no_output_drift FAILED" in out
    assert "new_drop_sensor -> ingest_job" in out
    # turn 2: the alerts + the new labels retrain; the canary is promoted and beats turn 1
    assert "retraining_sensor -> train_job (accuracy_sla and no_output_drift failed" in out
    assert "verdict: promote: canary is not worse than stable" in out
    assert "turn-2 champion beats turn 1 on the production stream" in out
    stable = json.loads((tmp_path / "home/releases/channels/stable.json").read_text())
    assert stable["release"].startswith("rel-2-")
    assert oct((tmp_path / "home/keys/release_signing.key").stat().st_mode & 0o777) == "0o600"
    (annotated,) = [p for p in (tmp_path / "home/tables/annotations").iterdir()
                    if p.name.startswith("annotated-")]
    labels = pd.read_parquet(annotated)
    assert len(labels) > 50 and set(labels["origin"]) == {"annotation_queue"}
    pool = pd.read_parquet(tmp_path / "home/tables/labeled_pool/all.parquet")
    assert {"drop", "feedback", "annotation_queue"} <= set(pool["origin"])
    assert (tmp_path / "dagster/dagster.yaml").exists()  # runs land in a real instance
    assert "telemetry" in (tmp_path / "dagster/dagster.yaml").read_text()
    report = json.loads(timings.read_text())
    assert report["dagster_runs"] >= 12 and 0 < report["orchestration_share"] < 1

    status = subprocess.run([CVOPS, "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"stable    : {stable['release']}" in status.stdout and "canary    : none" in status.stdout
    assert "champion  : cvops-classifier v2" in status.stdout
    assert "SLA " in status.stdout and "queued images still to annotate" in status.stdout

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
