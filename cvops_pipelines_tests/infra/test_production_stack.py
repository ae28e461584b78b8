"""The production stack of infra/ minus Docker: Dagster on the production dagster.yaml (Postgres
storage, queued run coordinator, S3 compute logs), an MLflow server with a Postgres backend and S3
artifacts, cvops data in S3 — real PostgreSQL and a real S3 endpoint on loopback."""

import itertools
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
from dagster import AssetKey, DagsterInstance, DagsterRunStatus
from mlflow import MlflowClient

from cvops_pipelines_tests.helpers import mlflow_server_process
from cvops_pipelines_tests.stages import curate, gate, ingest, metadata, train, write_drop

# the tags Dagster puts on a run a sensor or schedule asked for
SENSOR_TAG, SCHEDULE_TAG = "dagster/sensor_name", "dagster/schedule_name"
TINY = {"image_size": 32, "epochs": 2, "batch_size": 32, "learning_rate": 3e-3, "seed": 3}


def dagster_cli(repo_root: Path, *args: str) -> str:
    """A `dagster` command against the default loop's code location of workspace.yaml."""
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            *args,
            "-w",
            "workspace.yaml",
            "-l",
            "cvops",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def upload_drop(s3, bucket: str, local: Path, name: str) -> None:
    for path in sorted((local / name).rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"drops/{name}/{path.relative_to(local / name)}")


def with_daemon(repo_root: Path, log: Path, done, timeout: float) -> None:
    """Run the real dagster-daemon (it launches queued runs) until `done()` or the timeout."""
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
        cwd=repo_root,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done():
            time.sleep(2)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


def production_env(monkeypatch, home: Path, pg, database: str, bucket: str, endpoint: str):
    """The environment dagster.production.yaml and cvops read: Postgres for Dagster, S3 for
    the cvops store, the drops and the compute logs."""
    for name, value in {
        "DAGSTER_HOME": str(home),
        "DAGSTER_POSTGRES_HOST": "127.0.0.1",
        "DAGSTER_POSTGRES_PORT": str(pg.port),
        "DAGSTER_POSTGRES_USER": "cvops",
        "DAGSTER_POSTGRES_PASSWORD": "cvops-test-password",
        "DAGSTER_POSTGRES_DB": database,
        "CVOPS_S3_BUCKET": bucket,
        "CVOPS_S3_ENDPOINT_URL": endpoint,
        "CVOPS_DROPS": f"s3://{bucket}/drops",
    }.items():
        monkeypatch.setenv(name, value)


def test_dagster_and_mlflow_on_postgres_with_artifacts_in_s3(
    postgres_server, s3_bucket, s3_env, tmp_path, monkeypatch, repo_root
):
    pg = postgres_server
    dagster_db, mlflow_db = pg.create_database("dagster"), pg.create_database("mlflow")
    s3 = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    home = tmp_path / "dagster_home_production"
    home.mkdir()
    shutil.copy(repo_root / "infra/dagster/dagster.production.yaml", home / "dagster.yaml")
    production_env(monkeypatch, home, pg, dagster_db, s3_bucket, s3_env)
    write_drop(tmp_path / "local", "d1", range(0, 600))
    upload_drop(s3, s3_bucket, tmp_path / "local", "d1")

    with mlflow_server_process(
        tmp_path,
        pg.url(mlflow_db, "postgresql+psycopg2"),
        f"s3://{s3_bucket}/mlartifacts",
        {"MLFLOW_S3_ENDPOINT_URL": s3_env},
    ) as mlflow_url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
        instance = DagsterInstance.get()
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        ingest(instance, "d1")
        assert curate(instance).success
        result = train(instance, TINY)
        assert result.success and gate(result).passed
        model = metadata(result, "trained_model")

        # Dagster's history is in Postgres: a second instance (another process would do the
        # same) reads it back; the rows are there when asked with plain SQL
        reopened = DagsterInstance.get()
        latest = reopened.get_latest_materialization_event(AssetKey("trained_model"))
        assert latest.run_id == result.run_id
        assert pg.query(dagster_db, "SELECT count(*) FROM runs WHERE status = 'SUCCESS'")[0][0] == 3
        assert (
            pg.query(
                dagster_db,
                "SELECT count(*) FROM event_logs WHERE asset_key = %s AND "
                "dagster_event_type = 'ASSET_MATERIALIZATION'",
                AssetKey("trained_model").to_string(),
            )[0][0]
            == 1
        )

        # MLflow's runs and registry are in Postgres, its artifacts in S3 (proxied by the server)
        client = MlflowClient(mlflow_url)
        assert client.get_model_version_by_alias("cvops-classifier", "challenger").version == "1"
        assert pg.query(mlflow_db, "SELECT run_uuid FROM runs") == [(model["mlflow_run_id"],)]
        assert pg.query(mlflow_db, "SELECT name, alias, version FROM registered_model_aliases") == [
            ("cvops-classifier", "challenger", 1)
        ]
        artifacts = {
            o["Key"]
            for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="mlartifacts/")["Contents"]
        }
        assert any(
            k.endswith(f"{model['mlflow_run_id']}/artifacts/model/preprocess.json")
            for k in artifacts
        ), sorted(artifacts)[:20]
        assert s3.head_object(Bucket=s3_bucket, Key="tables/dataset_version/all.parquet")

        # Runs from the UI and sensors are queued; the daemon launches them. With the automation
        # sensor stopped (as an operator would), it launches nothing; the only run no schedule or
        # sensor asked for is the one launched here (the hourly learn_schedule may tick meanwhile).
        dagster_cli(repo_root, "sensor", "stop", "cvops_automation")
        dagster_cli(repo_root, "job", "launch", "-j", "curate_job")
        (queued,) = reopened.get_runs(limit=1)
        assert queued.job_name == "curate_job" and queued.status == DagsterRunStatus.QUEUED
        with_daemon(
            repo_root,
            tmp_path / "daemon.log",
            lambda: reopened.get_run_by_id(queued.run_id).is_finished,
            240,
        )
        run = reopened.get_run_by_id(queued.run_id)
        assert run.status == DagsterRunStatus.SUCCESS, (tmp_path / "daemon.log").read_text()[-3000:]
        since_train = list(
            itertools.takewhile(lambda r: r.run_id != result.run_id, reopened.get_runs())
        )
        assert not [r for r in since_train if r.tags.get(SENSOR_TAG) == "cvops_automation"]
        unasked = [r.run_id for r in since_train if not {SENSOR_TAG, SCHEDULE_TAG} & r.tags.keys()]
        assert unasked == [queued.run_id], [(r.job_name, r.tags) for r in since_train]
        logs = s3.list_objects_v2(Bucket=s3_bucket, Prefix="dagster-compute-logs/")
        assert logs.get("KeyCount", 0) > 0  # the run's stdout/stderr, readable by any webserver


def test_two_drops_ingest_in_two_concurrent_runs_on_the_production_instance(
    postgres_server, s3_bucket, s3_env, tmp_path, monkeypatch, repo_root
):
    """The drop sensor requests one run per drop; the queued coordinator (tag cvops/stage=ingest,
    limit 3) lets the daemon run them side by side, each in its own process; the 100 images the
    two drops share are written to the content-addressed store by both without a conflict."""
    pg = postgres_server
    home = tmp_path / "dagster_home_parallel"
    home.mkdir()
    shutil.copy(repo_root / "infra/dagster/dagster.production.yaml", home / "dagster.yaml")
    production_env(monkeypatch, home, pg, pg.create_database("dagster_parallel"), s3_bucket, s3_env)
    s3 = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    write_drop(tmp_path / "local", "d1", range(0, 300))
    write_drop(tmp_path / "local", "d2", range(200, 500))  # 200..299 in both
    upload_drop(s3, s3_bucket, tmp_path / "local", "d1")
    upload_drop(s3, s3_bucket, tmp_path / "local", "d2")
    dagster_cli(repo_root, "sensor", "stop", "cvops_automation")  # ingest only, no curate

    instance = DagsterInstance.get()

    def ingested() -> bool:
        runs = [r for r in instance.get_runs() if r.job_name == "ingest_job"]
        return len(runs) == 2 and all(r.is_finished for r in runs)

    with_daemon(repo_root, tmp_path / "daemon.log", ingested, 420)
    runs = [r for r in instance.get_runs() if r.job_name == "ingest_job"]
    log = (tmp_path / "daemon.log").read_text()[-3000:]
    assert sorted(r.tags["dagster/partition"] for r in runs) == ["d1", "d2"], log
    assert all(r.status == DagsterRunStatus.SUCCESS for r in runs), log
    assert all(r.tags["cvops/stage"] == "ingest" for r in runs)
    first, second = (instance.get_run_stats(r.run_id) for r in runs)
    assert first.start_time < second.end_time and second.start_time < first.end_time  # overlap

    images = s3.list_objects_v2(Bucket=s3_bucket, Prefix="images/", MaxKeys=1000)
    assert images["KeyCount"] == 500  # each distinct image once, the shared ones included
    for drop in ("d1", "d2"):
        (mat,) = [
            e
            for e in instance.fetch_materializations(AssetKey("raw_images"), limit=10).records
            if e.partition_key == drop
        ]
        assert mat.asset_materialization.metadata["accepted"].value == 300
        assert s3.head_object(Bucket=s3_bucket, Key=f"tables/raw_images/{drop}.parquet")
