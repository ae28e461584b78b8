import pandas as pd
import pytest

from cvops_pipelines.core.base.images import inspect_image
from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.curate.dataset import (
    DatasetPolicy,
    build_dataset_version,
    load_snapshot,
    save_snapshot,
)
from cvops_pipelines.core.curate.pool import build_labeled_pool
from cvops_pipelines.core.curate.splits import SplitConfig, grouped, split_of
from cvops_pipelines.demo import digit_model
from cvops_pipelines_tests import corpus

NO_REVIEW = pd.DataFrame(columns=["image_id", "label", "severity", "reasons"])


def test_adding_a_drop_changes_no_existing_split():
    first = build_dataset_version(corpus.pool_rows(range(200)), NO_REVIEW)
    grown = build_dataset_version(corpus.pool_rows(range(400)), NO_REVIEW)
    before = first.rows.set_index("image_id")["split"]
    after = grown.rows.set_index("image_id")["split"]
    assert (after.loc[before.index] == before).all()
    assert first.version != grown.version
    assert set(before) == {"train", "val", "test"}


def test_version_is_a_hash_of_content_not_order():
    pool = corpus.pool_rows(range(100))
    a = build_dataset_version(pool, NO_REVIEW)
    b = build_dataset_version(pool.sample(frac=1, random_state=1), NO_REVIEW)
    assert a.version == b.version and a.version.startswith("ds-")
    relabeled = pool.copy()
    relabeled.at[3, "label"] = "7" if relabeled.at[3, "label"] != "7" else "1"
    assert build_dataset_version(relabeled, NO_REVIEW).version != a.version


def test_split_fractions_are_respected_and_validated():
    ids = [f"{i:064x}" for i in range(20000)]
    shares = pd.Series([split_of(i) for i in ids]).value_counts(normalize=True)
    assert abs(shares["train"] - 0.8) < 0.01 and abs(shares["test"] - 0.1) < 0.01
    with pytest.raises(ValueError, match="sum to 1"):
        SplitConfig(0.8, 0.3, 0.1)


def test_flagged_policy_exclude_records_why_and_keep_keeps():
    pool = corpus.pool_rows(range(50))
    review = pd.DataFrame(
        {
            "image_id": pool["image_id"][:3],
            "label": pool["label"][:3],
            "severity": [0.9, 0.6, 0.2],
            "reasons": ["label_issue"] * 3,
        }
    )
    excluded = build_dataset_version(pool, review, policy=DatasetPolicy("exclude", 0.5))
    assert list(excluded.excluded["image_id"]) == list(pool["image_id"][:2])
    assert excluded.excluded["reason"].str.contains("label_issue").all()
    assert len(excluded.rows) == 48
    kept = build_dataset_version(pool, review, policy=DatasetPolicy("keep"))
    assert len(kept.rows) == 50 and kept.excluded.empty


def reencoded_across_splits():
    """A digit and its JPEG re-encode that hash into different splits."""
    for i in range(200):
        info = inspect_image(corpus.encode(digit_model.digit(i).convert("RGB"), "JPEG", quality=90))
        original = inspect_image(corpus.encode(digit_model.digit(i), "PNG"))
        if {split_of(info.image_id), split_of(original.image_id)} == {"train", "test"}:
            return i, info
    raise AssertionError("no re-encoded pair across train/test in 200 digits")


def test_near_duplicates_share_a_split_and_never_leave_train():
    """A re-shot scene (here a JPEG re-encode) whose own hash falls in test joins its twin in
    train: no leakage, and the move only ever goes toward train."""
    i, info = reencoded_across_splits()
    pool = corpus.pool_rows(range(100))
    alone = build_dataset_version(pool, NO_REVIEW)
    copy = pool.iloc[[i]].assign(image_id=info.image_id, phash=info.phash, thumb=info.thumb)
    dataset = build_dataset_version(pd.concat([pool, copy], ignore_index=True), NO_REVIEW)
    assert dataset.leakage.empty
    split = dataset.rows.set_index("image_id")["split"]
    assert split[info.image_id] == split[pool.iloc[i]["image_id"]] == "train"
    before = alone.rows.set_index("image_id")["split"]
    assert (split[before.index] == before).all()  # nothing else moved


def test_grouped_splits_take_the_first_of_train_val_test():
    own = {"a": "test", "b": "val", "c": "test", "d": "train", "e": "test"}
    together = grouped(own, [("a", "b"), ("c", "d"), ("d", "e"), ("x", "a")])
    assert together == {"a": "val", "b": "val", "c": "train", "d": "train", "e": "train"}
    assert grouped(own, []) == own


def test_class_counts_cover_every_split_and_class():
    counts = build_dataset_version(corpus.pool_rows(range(100)), NO_REVIEW).class_counts()
    assert len(counts) == 3 * 10 and counts["images"].sum() == 100
    assert counts.groupby("split")["share"].sum().round(6).eq(1.0).all()


def test_snapshot_is_written_once(tmp_path):
    store = LocalStore(tmp_path)
    dataset = build_dataset_version(corpus.pool_rows(range(30)), NO_REVIEW)
    uri = save_snapshot(store, dataset)
    manifest = (tmp_path / "datasets" / dataset.version / "manifest.json").read_bytes()
    save_snapshot(store, dataset)
    assert (tmp_path / "datasets" / dataset.version / "manifest.json").read_bytes() == manifest
    assert uri.endswith(dataset.version)
    assert list(load_snapshot(store, dataset.version)["image_id"]) == list(dataset.rows["image_id"])


def test_pool_keeps_latest_vote_per_annotator_and_majority_wins():
    manifest = corpus.pool_rows(range(3))[
        ["image_id", "uri", "key", "phash", "thumb", "width", "height", "original_name", "source"]
    ]
    manifest["ingested_at"] = pd.Timestamp("2026-11-01", tz="UTC")
    ids = list(manifest["image_id"])
    t = lambda day: pd.Timestamp(f"2026-11-{day:02d}", tz="UTC")  # noqa: E731
    labels = pd.DataFrame(
        [
            (ids[0], "1", "alice", t(1), "drop"),
            (ids[0], "7", "alice", t(5), "feedback"),  # fix
            (ids[1], "2", "alice", t(1), "drop"),
            (ids[1], "2", "bob", t(2), "drop"),
            (ids[1], "3", "carol", t(3), "drop"),
            (ids[2], "4", "alice", t(1), "drop"),
            (ids[2], "9", "bob", t(2), "annotation_queue"),
        ],
        columns=["image_id", "label", "annotator", "labeled_at", "origin"],
    )
    labels["x_min"] = float("nan")
    box = labels.iloc[[0]].assign(x_min=1.0, label="8")  # boxes are detection data, not votes
    pool = build_labeled_pool(manifest, pd.concat([labels, box])).set_index("image_id")
    assert (pool.at[ids[0], "label"], pool.at[ids[0], "origin"]) == ("7", "feedback")
    assert pool.at[ids[0], "n_votes"] == 1
    assert (pool.at[ids[1], "label"], round(pool.at[ids[1], "agreement"], 2)) == ("2", 0.67)
    assert pool.at[ids[2], "label"] == "9"  # tie: the most recent vote wins
    assert list(pool.at[ids[2], "annotators"]) == ["alice", "bob"]


def test_share_z_separates_real_skew_from_sampling_noise():
    dataset = build_dataset_version(corpus.pool_rows(range(600)), NO_REVIEW)
    assert dataset.class_counts()["share_z"].abs().max() < 4  # hash splits: noise only
    skewed = dataset.rows.copy()
    skewed.loc[(skewed["label"] == "0") & (skewed["split"] == "test"), "split"] = "train"
    dataset.rows = skewed
    counts = dataset.class_counts().set_index(["split", "label"])
    assert counts.at[("test", "0"), "images"] == 0
    assert counts.at[("test", "0"), "share_z"] < -2.5
