"""The local instance's pooled SQLite storage (infra/dagster/dagster.yaml) keeps Dagster's files:
what it writes, Dagster's own `storage: sqlite` reads, runs and events and asset records alike."""

import shutil

import dagster as dg
import pytest

from cvops_pipelines.defs.storage import OPEN_SHARDS, PooledSqliteStorage


@dg.asset
def numbers(context) -> int:
    context.log.info("counting")
    return 1


@dg.asset
def doubled(numbers: int) -> int:
    return 2 * numbers


@dg.asset_check(asset=doubled)
def doubled_is_even(doubled: int) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=doubled % 2 == 0)


JOB = dg.Definitions(
    assets=[numbers, doubled], asset_checks=[doubled_is_even]
).resolve_implicit_global_asset_job_def()


@pytest.fixture
def pooled_home(tmp_path, repo_root, monkeypatch):
    home = tmp_path / "pooled_home"
    home.mkdir()
    shutil.copy(repo_root / "infra/dagster/dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def stock_instance(home):
    """Dagster's own SQLite storage over the same directory."""
    from dagster._core.instance.ref import InstanceRef

    config = home.parent / "stock_config"
    config.mkdir(exist_ok=True)
    (config / "dagster.yaml").write_text(
        f"telemetry:\n  enabled: false\nstorage:\n  sqlite:\n    base_dir: {home}\n"
    )
    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home), config_dir=str(config)))


def test_the_shipped_instance_config_uses_the_pooled_storage(pooled_home):
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.get_ref().storage, PooledSqliteStorage)
        assert type(instance.event_log_storage).__name__ == "PooledSqliteEventLogStorage"
        assert type(instance.run_storage).__name__ == "PooledSqliteRunStorage"


def test_runs_written_pooled_read_back_with_dagsters_own_storage_and_back(pooled_home):
    with dg.DagsterInstance.get() as instance:
        results = [JOB.execute_in_process(instance=instance) for _ in range(OPEN_SHARDS + 3)]
        assert all(r.success for r in results)
        # more runs than shards kept open: the oldest engines were disposed of, not leaked
        assert len(instance.event_log_storage._engines) == OPEN_SHARDS + 1
    with stock_instance(pooled_home) as stock:
        assert {r.run_id for r in results} == {r.run_id for r in stock.get_runs()}
        first = results[0].run_id
        logs = stock.all_logs(first)
        assert any(e.user_message == "counting" for e in logs)
        assert stock.get_run_by_id(first).status == dg.DagsterRunStatus.SUCCESS
        latest = stock.get_latest_materialization_event(dg.AssetKey("doubled"))
        assert latest.run_id == results[-1].run_id
        check = stock.event_log_storage.get_latest_asset_check_execution_by_key(
            [doubled_is_even.check_key]
        )[doubled_is_even.check_key]
        assert check.run_id == results[-1].run_id
        by_dagster = JOB.execute_in_process(instance=stock).run_id
    with dg.DagsterInstance.get() as instance:  # and the other way round
        assert instance.get_run_by_id(by_dagster).status == dg.DagsterRunStatus.SUCCESS
        assert any(e.user_message == "counting" for e in instance.all_logs(by_dagster))
        # each new run's shard is a copy of one empty shard: at the schema revision Dagster's
        # own initialisation gave the shard of the run it wrote
        storage = instance.event_log_storage

        def revision(run_id: str) -> str:
            with storage.run_connection(run_id) as conn:
                return conn.exec_driver_sql("select version_num from alembic_version").scalar()

        assert {revision(r.run_id) for r in results} == {revision(by_dagster)}


def test_a_wiped_instance_starts_clean_and_writes_again(pooled_home):
    with dg.DagsterInstance.get() as instance:
        old = JOB.execute_in_process(instance=instance).run_id
        instance.wipe()  # deletes the run shards' files: no open connection may write to them
        assert instance.get_runs() == [] and instance.all_logs(old) == []
        new = JOB.execute_in_process(instance=instance)
        assert new.success
        assert [r.run_id for r in instance.get_runs()] == [new.run_id]
        assert instance.get_latest_materialization_event(dg.AssetKey("numbers")).run_id == (
            new.run_id
        )
