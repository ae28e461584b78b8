"""The production replay set: reviewed field records, expert labels over operator labels, a
hash-reserved holdout that no dataset version trains or validates on, immutable versions."""

import hashlib

import pandas as pd
import pytest

from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.curate.dataset import build_dataset_version
from cvops_pipelines.core.curate.replay_set import (
    HoldoutPolicy,
    build_replay_set,
    expert_labels,
    in_holdout,
    load_replay_set,
    save_replay_set,
)
from cvops_pipelines.core.learn.feedback import RECORD_COLUMNS
from cvops_pipelines_tests import corpus

NO_REVIEW = pd.DataFrame(columns=["image_id", "label", "severity", "reasons"])


def image_id(i: int) -> str:
    return hashlib.sha256(f"field-{i}".encode()).hexdigest()


def records(n: int = 40, reviewed_every: int = 2) -> pd.DataFrame:
    rows = [
        {
            "record_id": f"dev-{i % 3}-{i:04d}",
            "device_id": f"dev-{i % 3}",
            "cohort": "site-a" if i % 2 else "site-b",
            "release": "rel-1-abc",
            "image_id": image_id(i),
            "key": f"images/{image_id(i)[:2]}/{image_id(i)}.png",
            "predicted": str(i % 10),
            "confidence": 0.9,
            "top_k": "[]",
            "corrected_label": str(i % 10) if i % reviewed_every == 0 else None,
            "captured_at": f"2026-12-01T10:{i // 60:02d}:{i % 60:02d}+00:00",
        }
        for i in range(n)
    ]
    return pd.DataFrame(rows).reindex(columns=RECORD_COLUMNS)


def pool_with_experts(expert_for: dict[int, str]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "image_id": image_id(i),
                "annotators": ["operator@dev-1", "ann@lab"],
                "votes": ["1", label],
            }
            for i, label in expert_for.items()
        ]
    )


def test_holdout_is_a_stable_share_by_hash():
    ids = [image_id(i) for i in range(4000)]
    policy = HoldoutPolicy(share=0.3)
    share = sum(in_holdout(i, policy) for i in ids) / len(ids)
    assert abs(share - 0.3) < 0.03
    assert [in_holdout(i, policy) for i in ids] == [in_holdout(i, policy) for i in ids]
    assert not any(in_holdout(i, HoldoutPolicy(share=0.0)) for i in ids)
    with pytest.raises(ValueError, match="holdout share"):
        HoldoutPolicy(share=1.0)


def test_reviewed_records_become_the_set_and_experts_outrank_operators():
    frame = records(40)
    replay = build_replay_set(frame, pool_with_experts({0: "7", 1: "3"}))
    rows = replay.rows.set_index("record_id")
    # 20 operator-reviewed records, plus record 1 which only an expert labelled
    assert len(rows) == 21 and "dev-1-0001" in rows.index
    assert rows.loc["dev-0-0000", ["label", "label_source", "labeled_by"]].tolist() == [
        "7",
        "expert",
        "ann@lab",
    ]
    assert rows.loc["dev-2-0002", ["label", "label_source", "labeled_by"]].tolist() == [
        "2",
        "operator",
        "operator@dev-2",
    ]
    assert replay.summary()["expert_labels"] == 2 and replay.summary()["operator_labels"] == 19
    assert rows["holdout"].tolist() == [in_holdout(i) for i in rows["image_id"]]


def test_expert_labels_take_the_latest_non_operator_vote():
    pool = pd.DataFrame(
        [
            {
                "image_id": "a",
                "annotators": ["ann@x", "operator@d", "ann@y"],
                "votes": ["1", "2", "3"],
            },
            {"image_id": "b", "annotators": ["operator@d"], "votes": ["4"]},
        ]
    )
    assert expert_labels(pool).to_dict(orient="records") == [
        {"image_id": "a", "label": "3", "labeled_by": "ann@y"}
    ]


def test_version_names_content_and_snapshot_is_immutable(tmp_path):
    store = LocalStore(tmp_path)
    first = build_replay_set(records(40), pool_with_experts({}))
    again = build_replay_set(records(40).sample(frac=1, random_state=3), pool_with_experts({}))
    assert first.version == again.version and first.version.startswith("rs-")
    grown = build_replay_set(records(60), pool_with_experts({}))
    assert grown.version != first.version
    other_holdout = build_replay_set(records(40), pool_with_experts({}), HoldoutPolicy(0.5))
    assert other_holdout.version != first.version
    save_replay_set(store, first)
    written = (tmp_path / f"replay_sets/{first.version}/records.parquet").stat().st_mtime_ns
    save_replay_set(store, first)
    assert (tmp_path / f"replay_sets/{first.version}/records.parquet").stat().st_mtime_ns == written
    assert (
        load_replay_set(store, first.version)["record_id"].tolist()
        == first.rows["record_id"].tolist()
    )


def test_no_feedback_is_an_empty_set():
    empty = build_replay_set(pd.DataFrame(columns=RECORD_COLUMNS), pd.DataFrame())
    assert empty.rows.empty and empty.summary()["records"] == 0


def test_dataset_versions_never_train_or_validate_on_the_holdout():
    pool = corpus.pool_rows(range(300))
    holdout = set(pool["image_id"][pool["image_id"].map(in_holdout)])
    assert 40 < len(holdout) < 150
    dataset = build_dataset_version(pool, NO_REVIEW, holdout=holdout)
    assert not set(dataset.rows["image_id"]) & holdout
    reserved = dataset.excluded[dataset.excluded["reason"].str.startswith("production holdout")]
    assert set(reserved["image_id"]) == holdout
    assert len(dataset.rows) + len(dataset.excluded) == len(pool)  # accounted for, not dropped
