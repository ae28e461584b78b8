"""The production state absorbs feedback batch by batch and ends where a recomputation over all
of them (resolve_records) ends: re-delivered records, late corrections, corrections that arrive
before their record and corrections out of time order included."""

import numpy as np
import pandas as pd
import pytest

from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.base.tables import PartitionedTable, write_table
from cvops_pipelines.core.learn.feedback import FEEDBACK_COLUMNS
from cvops_pipelines.core.learn.production import accuracy_table
from cvops_pipelines.core.learn.production_state import ProductionState, catch_up, period_of
from cvops_pipelines_tests.reference import resolve_records

CLASSES = ["0", "1", "2"]


def messy_batches(seed: int, n_batches: int = 12, per_batch: int = 40) -> dict[str, pd.DataFrame]:
    """Feedback batches as the feedback asset writes them, with every awkward case mixed in."""
    rng = np.random.default_rng(seed)
    batches, made = {}, []
    for b in range(n_batches):
        rows = []
        for _ in range(per_batch):
            if made and rng.random() < 0.1:  # a record delivered again (same id, maybe relabeled)
                rid = made[rng.integers(len(made))]
            else:
                rid = f"dev-{rng.integers(3)}-{len(made):08d}"
                made.append(rid)
            day = int(rng.integers(1, 4))
            rows.append(
                {
                    "kind": "record",
                    "record_id": rid,
                    "release": f"rel-{rng.integers(2)}",
                    "cohort": f"c{rng.integers(2)}",
                    "predicted": CLASSES[rng.integers(3)],
                    "corrected_label": CLASSES[rng.integers(3)] if rng.random() < 0.5 else None,
                    "corrected_at": None,
                    "captured_at": f"2026-11-0{day}T{rng.integers(24):02d}:00:00+00:00",
                    "key": f"images/{rid}.png",
                }
            )
        for _ in range(per_batch // 4):  # late corrections, some for records not yet sent
            target = (
                made[rng.integers(len(made))]
                if rng.random() < 0.8
                else f"dev-9-{rng.integers(10**6):08d}"
            )
            rows.append(
                {
                    "kind": "correction",
                    "record_id": target,
                    "corrected_label": CLASSES[rng.integers(3)],
                    "corrected_at": f"2026-11-05T{rng.integers(24):02d}:{rng.integers(60):02d}:00"
                    "+00:00",
                }
            )
        batches[f"batch-{b:03d}"] = pd.DataFrame(rows).reindex(columns=FEEDBACK_COLUMNS)
    # the records a correction above named before they existed arrive last
    early = [r for f in batches.values() for r in f.loc[f["kind"] == "correction", "record_id"]]
    late = [r for r in early if r.startswith("dev-9-")]
    batches["batch-999"] = pd.DataFrame(
        {
            "kind": "record",
            "record_id": late,
            "release": "rel-0",
            "cohort": "c0",
            "predicted": "0",
            "corrected_label": None,
            "corrected_at": None,
            "captured_at": "2026-11-04T00:00:00+00:00",
            "key": [f"images/{r}.png" for r in late],
        }
    ).reindex(columns=FEEDBACK_COLUMNS)
    return batches


def expected_table(batches: dict[str, pd.DataFrame], period: str) -> pd.DataFrame:
    """The oracle: every batch concatenated, resolved, grouped."""
    records = resolve_records(pd.concat(batches.values(), ignore_index=True))
    reviewed = records["corrected_label"].notna()
    records = records.assign(
        period=period_of(records["captured_at"], period),
        reviewed=reviewed,
        hit=reviewed & (records["corrected_label"] == records["predicted"]),
    )
    return (
        records.groupby(["release", "cohort", "period"], sort=True)
        .agg(records=("record_id", "size"), reviewed=("reviewed", "sum"), hits=("hit", "sum"))
        .reset_index()
    ), records


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_absorbing_batch_by_batch_ends_where_recomputing_everything_ends(seed):
    batches = messy_batches(seed)
    state = ProductionState(":memory:", "1D", 5)
    order = list(batches)
    np.random.default_rng(seed).shuffle(order[:-1])  # batches arrive in any order
    for name in order:
        assert state.absorb(name, batches[name])
    want, records = expected_table(batches, "1D")
    got = accuracy_table(state.cells())
    assert list(got["records"]) == list(want["records"])
    assert list(got["reviewed"]) == list(want["reviewed"])
    hits = (got["accuracy"].fillna(0) * got["reviewed"]).round().astype(int)
    assert list(hits) == list(want["hits"])
    assert got["records"].sum() == records["record_id"].nunique()  # none lost, none doubled
    assert state.pending_corrections() == 0  # every early correction found its record
    for release in ("rel-0", "rel-1"):
        window = state.latest(release)
        mine = records[records["release"] == release]
        newest = mine.sort_values("captured_at", kind="stable").tail(5)
        assert sorted(window["captured_at"]) == sorted(newest["captured_at"])
        assert set(window["record_id"]) <= set(mine["record_id"]) and len(window) == 5


def test_a_batch_is_absorbed_once_and_the_state_rebuilds_for_another_period(tmp_path):
    batches = messy_batches(3, n_batches=3)
    path = tmp_path / "state.sqlite"
    state = ProductionState(path, "1D", 48)
    assert not state.rebuilt or state.absorbed() == set()
    for name, frame in batches.items():
        state.absorb(name, frame)
    before = state.cells()
    assert not state.absorb("batch-000", batches["batch-000"])  # again: refused, nothing moves
    pd.testing.assert_frame_equal(state.cells(), before)
    state.close()

    again = ProductionState(path, "1D", 48)  # reopened as it was: nothing to redo
    assert not again.rebuilt and again.absorbed() == set(batches)
    again.close()
    hourly = ProductionState(path, "1h", 48)  # the counts are per day: they cannot serve hours
    assert hourly.rebuilt and hourly.absorbed() == set() and hourly.cells().empty


def test_catch_up_reads_only_unseen_partitions_and_leaves_missing_ones(tmp_path):
    store = LocalStore(tmp_path / "store")
    batches = messy_batches(4, n_batches=4)
    keys = {name: f"tables/feedback/{name}.parquet" for name in batches}
    for name in list(batches)[:3]:
        write_table(store, keys[name], batches[name])
    state = ProductionState(tmp_path / "s.sqlite", "1D", 48)
    missing = []
    first = catch_up(state, PartitionedTable(store, keys), missing.append)
    assert first == {
        "batches_absorbed": 3,
        "rows_absorbed": 150,
        "batches_missing": 2,
        "state_rebuilt": True,  # a new file: built from every batch
    }
    assert sorted(missing) == ["batch-003", "batch-999"]
    write_table(store, keys["batch-003"], batches["batch-003"])
    second = catch_up(state, PartitionedTable(store, keys))
    assert second["batches_absorbed"] == 1 and second["batches_missing"] == 1


def test_the_state_travels_with_an_s3_store_and_a_failed_run_leaves_it_as_it_was(s3_env, s3_bucket):
    """Through a real S3 endpoint (moto's server): a run pod with no disk of its own finds what
    the previous run absorbed."""
    from cvops_pipelines.core.base.store import S3Store
    from cvops_pipelines.core.learn.production_state import STATE_KEY, stored_state

    store = S3Store(s3_bucket, "cvops", "us-east-1", s3_env)
    batches = messy_batches(5, n_batches=3)
    first, second, third = list(batches)[:3]
    with stored_state(store, "1D", 48) as state:
        assert state.absorb(first, batches[first])
    assert store.exists(STATE_KEY)
    with pytest.raises(RuntimeError), stored_state(store, "1D", 48) as state:
        assert state.absorbed() == {first}
        state.absorb(second, batches[second])
        raise RuntimeError("the report failed")
    with stored_state(store, "1D", 48) as state:
        assert state.absorbed() == {first}  # the failed run's work was not written back
        assert state.absorb(third, batches[third])
    with stored_state(store, "1D", 48) as state:
        assert state.absorbed() == {first, third}
        assert accuracy_table(state.cells())["records"].sum() > 0
