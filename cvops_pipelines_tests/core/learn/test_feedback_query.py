"""The DuckDB query over the feedback partitions gives what resolve_records gives on their
concatenation (rows, values, order), whatever the batches hold; its per-image and filtered
answers match the same selections made in pandas; it reads S3 partitions through a real
endpoint."""

import pandas as pd
import pytest

from cvops_pipelines.core.base.store import LocalStore, S3Store
from cvops_pipelines.core.base.tables import PartitionedTable, table_key, write_table
from cvops_pipelines.core.learn.feedback_query import (
    REVIEWED,
    feedback_query,
    labeled_field_images,
    unknown_image_count,
)
from cvops_pipelines_tests.core.learn.test_production_state import messy_batches
from cvops_pipelines_tests.reference import resolve_records


def written(store, batches: dict[str, pd.DataFrame], unwritten: tuple[str, ...] = ()):
    """The batches as the feedback asset leaves them, plus partitions whose run failed."""
    for batch, frame in batches.items():
        shared = frame["record_id"].str[-2:].where(frame["kind"] == "record")  # shared images
        frame = frame.assign(image_id=shared)
        write_table(store, table_key("feedback", batch), frame)
    keys = sorted([*batches, *unwritten])
    return PartitionedTable(store, {k: table_key("feedback", k) for k in keys})


def same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Equal values (a null is a null whatever its dtype: pandas types an all-null column by
    what it saw, the query by the feedback schema)."""
    got, want = got.reset_index(drop=True), want.reset_index(drop=True)
    pd.testing.assert_frame_equal(
        got.astype(object).where(got.notna(), None), want.astype(object).where(want.notna(), None)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_query_resolves_records_as_pandas_does(tmp_path, seed):
    table = written(LocalStore(tmp_path), messy_batches(seed), unwritten=("batch-500",))
    want = resolve_records(table.read_all())
    with feedback_query(table) as query:
        got = query.records()
        reviewed = query.records(["record_id", "corrected_label"], REVIEWED)
        firsts = query.records(["image_id", "record_id"], per_image=True)
        some = sorted(want["image_id"].unique())[:3]
        labeled = labeled_field_images(query, some)
        unknown = unknown_image_count(query, some)
    assert len(want) > 400 and want["corrected_label"].notna().any()
    same(got, want)
    same(reviewed, want.loc[want["corrected_label"].notna(), ["record_id", "corrected_label"]])
    same(firsts, want.drop_duplicates("image_id")[["image_id", "record_id"]])
    with_label = set(want.loc[want["corrected_label"].notna(), "image_id"]) | set(some)
    same(labeled, want[want["image_id"].isin(with_label)].drop_duplicates("image_id"))
    assert unknown == want["image_id"].nunique() - len(some)


def test_a_column_older_batches_lack_reads_as_null(tmp_path):
    batches = {b: f.drop(columns=["thumb"]) for b, f in messy_batches(3, n_batches=3).items()}
    batches["batch-000"] = batches["batch-000"].drop(columns=["corrected_boxes", "phash"])
    table = written(LocalStore(tmp_path), batches)
    with feedback_query(table) as query:
        got = query.records()
    same(got, resolve_records(table.read_all()))


def test_no_partition_written_is_no_record(tmp_path):
    table = PartitionedTable(LocalStore(tmp_path), {"batch-000": table_key("feedback", "b")})
    with feedback_query(table) as query:
        assert query.records().empty
        assert labeled_field_images(query, ["x"]).empty
        assert unknown_image_count(query, []) == 0


def test_the_query_reads_partitions_from_s3(s3_env, s3_bucket):
    store = S3Store(s3_bucket, "cvops", "us-east-1", s3_env)
    table = written(store, messy_batches(4, n_batches=4), unwritten=("batch-900",))
    with feedback_query(table) as query:
        got = query.records()
    same(got, resolve_records(table.read_all()))


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda path: path.write_bytes(b""), "not a readable Parquet file"),
        (lambda path: path.write_bytes(path.read_bytes()[:-40]), "not a readable Parquet file"),
        (lambda path: path.write_bytes(b"PAR1" + b"\x00" * 500 + b"PAR1"), "not a readable"),
        ("text confidence", "column 'confidence' is large_string, not a number"),
        ("no kind", "has no 'kind' column"),
    ],
)
def test_a_broken_partition_is_named_and_skipped_and_the_rest_are_read(tmp_path, damage, why):
    """Items 14 and 15 of the third trust round: the partition and its reason are named, every
    other partition is read, none vanishes silently."""
    store = LocalStore(tmp_path)
    batches = messy_batches(0)
    table = written(store, batches)
    broken = sorted(batches)[1]
    path = store.local_path(table_key("feedback", broken))
    if damage == "text confidence":
        frame = batches[broken].assign(confidence=batches[broken]["confidence"].astype(str))
        write_table(store, table_key("feedback", broken), frame)
    elif damage == "no kind":
        write_table(store, table_key("feedback", broken), batches[broken].drop(columns="kind"))
    else:
        damage(path)
    rest = PartitionedTable(store, {k: v for k, v in table.keys.items() if k != broken})
    with feedback_query(table) as query:
        got = query.records()
        (skipped,) = query.skipped
    assert broken in skipped and why in skipped
    same(got, resolve_records(rest.read_all()))


def test_a_store_root_with_glob_characters_is_read_literally(tmp_path):
    """Item 15: `cvops[ab]` is a folder name, not a pattern."""
    store = LocalStore(tmp_path / "cvops[ab]")
    table = written(store, messy_batches(1))
    with feedback_query(table) as query:
        got = query.records()
    assert len(got) > 0
    same(got, resolve_records(table.read_all()))


def test_a_skipped_partition_shows_in_the_run_s_event_log(tmp_path, repo_root):
    """Through a real Dagster instance configured as we ship it (infra/dagster/dagster.yaml):
    the reason reaches the run's log, where an operator looks."""
    import shutil

    from dagster import DagsterInstance, asset, materialize

    store = LocalStore(tmp_path / "store")
    table = written(store, messy_batches(2))
    broken = sorted(table.keys)[0]
    store.local_path(table_key("feedback", broken)).write_bytes(b"")

    @asset
    def reviewed() -> int:
        with feedback_query(table) as query:
            return len(query.records())

    home = tmp_path / "dagster"
    home.mkdir()
    shutil.copy(repo_root / "infra/dagster/dagster.yaml", home / "dagster.yaml")
    with DagsterInstance.from_config(str(home)) as instance:
        result = materialize([reviewed], instance=instance)
        logs = [e.message for e in instance.all_logs(result.run_id)]
    assert result.success
    assert any(f"feedback partition {broken}" in m and "not a readable" in m for m in logs)
