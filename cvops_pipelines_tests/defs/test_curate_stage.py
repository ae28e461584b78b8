"""Ingest + curate materialized in-process with the real resources."""

import pandas as pd
from dagster import AssetKey, DagsterInstance, asset

from cvops_pipelines.core.base.images import inspect_image
from cvops_pipelines.core.curate.splits import split_of
from cvops_pipelines.defs.curate.assets import (
    dataset_version,
)
from cvops_pipelines.demo import digit_model
from cvops_pipelines_tests import corpus
from cvops_pipelines_tests.stages import curate, ingest, metadata, write_drop


@asset(deps=[dataset_version])
def downstream_of_dataset() -> None:
    """Stands in for training: must not run when a dataset contract fails."""


def test_two_drops_curated_into_a_checked_dataset_version(isolated_homes):
    instance = DagsterInstance.ephemeral()
    write_drop(isolated_homes / "drops", "d1", range(0, 600))
    ingest(instance, "d1")
    first = curate(instance, [downstream_of_dataset])
    assert first.success
    assert all(e.passed for e in first.get_asset_check_evaluations())
    pool = metadata(first, "labeled_pool")
    assert pool["images"] == 600 and pool["drops"] == 1
    issues = metadata(first, "label_issues")
    assert issues["scored_images"] == 600
    assert issues["plot"].startswith("![") and "data:image/png;base64," in issues["plot"]
    assert issues["review_csv"].endswith("review.csv")
    version = metadata(first, "dataset_version")["version"]
    assert (isolated_homes / "datasets" / version / "manifest.json").exists()
    first_splits = pd.read_parquet(isolated_homes / "tables/dataset_version/all.parquet")

    write_drop(isolated_homes / "drops", "d2", range(600, 900))
    ingest(instance, "d2")
    second = curate(instance)
    assert second.success
    assert metadata(second, "labeled_pool")["images"] == 900
    rows = pd.read_parquet(isolated_homes / "tables/dataset_version/all.parquet")
    merged = first_splits.merge(rows, on="image_id", suffixes=("_before", "_after"))
    excluded_later = set(first_splits["image_id"]) - set(rows["image_id"])
    assert len(merged) + len(excluded_later) == len(first_splits)
    assert (merged["split_before"] == merged["split_after"]).all()  # no image moved split
    assert rows["dataset_version"].nunique() == 1 and rows["dataset_version"].iloc[0] != version


def test_a_re_shot_scene_joins_its_twin_in_train_and_the_leakage_check_holds(isolated_homes):
    # a digit and its JPEG re-encode whose content hashes fall in train and test
    for i in range(600):
        jpeg = corpus.encode(digit_model.digit(i).convert("RGB"), "JPEG", quality=90)
        png_id = inspect_image(corpus.encode(digit_model.digit(i), "PNG")).image_id
        if {split_of(inspect_image(jpeg).image_id), split_of(png_id)} == {"train", "test"}:
            break
    instance = DagsterInstance.ephemeral()
    write_drop(
        isolated_homes / "drops",
        "d1",
        range(0, 600),
        extra={f"{digit_model.digit_label(i)}/reencoded_{i}.jpg": jpeg},
    )
    ingest(instance, "d1")
    result = curate(instance, [downstream_of_dataset])
    assert result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["dataset_version_leakage"].passed
    assert metadata(result, "dataset_version")["leakage_pairs"] == 0
    rows = pd.read_parquet(isolated_homes / "tables/dataset_version/all.parquet")
    split = rows.set_index("image_id")["split"]
    assert split[inspect_image(jpeg).image_id] == split[png_id] == "train"
    assert result.asset_materializations_for_node("downstream_of_dataset")


def test_balance_contract_reports_a_missing_class(isolated_homes):
    instance = DagsterInstance.ephemeral()
    write_drop(isolated_homes / "drops", "d1", range(0, 300))
    ingest(instance, "d1")
    result = curate(
        instance, run_config={"ops": {"dataset_version": {"config": {"min_per_class": 50}}}}
    )  # the test split holds ~7 per class
    check = next(
        e for e in result.get_asset_check_evaluations() if e.check_name == "dataset_version_balance"
    )
    assert not check.passed and check.metadata["unexpected_rows"].value > 0
    assert instance.get_latest_materialization_event(AssetKey("dataset_version")) is not None
