"""The ingest stage materialized in-process with the real resources built from the environment."""

import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from cvops_pipelines.defs.ingest.assets import annotations, raw_images
from cvops_pipelines.defs.ingest.sensors import new_drop_sensor
from cvops_pipelines.defs.resources import build_resources
from cvops_pipelines.demo import digit_model
from cvops_pipelines_tests import corpus


def make_drop(root, name, n=6, marker=True):
    drop = root / name
    for i in range(n):
        path = drop / digit_model.digit_label(i) / f"digit_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(corpus.encode(digit_model.digit(i), "PNG"))
    if marker:
        (drop / "_SUCCESS").write_text("")
    return drop


def run(drop, instance, run_config=None):
    if drop not in instance.get_dynamic_partitions("drops"):
        instance.add_dynamic_partitions("drops", [drop])
    return materialize(
        [raw_images, annotations],
        partition_key=drop,
        instance=instance,
        resources=build_resources(),
        run_config=run_config,
        raise_on_error=False,
    )


def evaluate(instance, resources, cursor=None):
    from dagster import build_sensor_context

    with build_sensor_context(instance=instance, resources=resources, cursor=cursor) as context:
        return new_drop_sensor(context)


def metadata(result, node):
    (mat,) = result.asset_materializations_for_node(node)
    return {k: v.value for k, v in mat.metadata.items()}


def test_corpus_drop_is_fully_accounted_and_checks_pass(isolated_homes, tmp_path):
    drop = isolated_homes / "drops" / "corpus"
    expected = corpus.write_corpus(drop, tmp_path / "outside")
    (drop / "labels.csv").write_text(
        "filename,label\ngood/digit_0.png,0\ngood/digit_1.jpg,1\n"
        "bad/notes.jpg,3\nmissing.png,4\ngood/rotated.jpg,cat\n"
    )
    (drop / "_SUCCESS").write_text("")
    result = run("corpus", DagsterInstance.ephemeral())
    assert result.success
    images = metadata(result, "raw_images")
    assert images["files_seen"] == len(expected)
    assert images["accepted"] + images["duplicates"] + images["quarantined"] == len(expected)
    labels = metadata(result, "annotations")
    assert (labels["labels"], labels["quarantined"]) == (2, 3)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["raw_images_contract"].passed and checks["annotations_contract"].passed
    docs = checks["annotations_contract"].metadata["data_docs"].value
    assert docs.startswith("file://") and (isolated_homes / "reports/gx/index.html").exists()
    quarantine = pd.read_parquet(isolated_homes / "quarantine/corpus/raw_images.parquet")
    assert set(quarantine["reason_code"]) == {
        v for v in expected.values() if v not in ("accepted", "duplicate")
    }
    manifest = pd.read_parquet(isolated_homes / "tables/raw_images/corpus.parquet")
    assert len(manifest) == images["accepted"]


def test_rerunning_a_drop_adds_nothing(isolated_homes):
    make_drop(isolated_homes / "drops", "d1")
    instance = DagsterInstance.ephemeral()
    first = metadata(run("d1", instance), "raw_images")
    images = sorted((isolated_homes / "images").rglob("*.png"))
    second = metadata(run("d1", instance), "raw_images")
    assert first["new_objects_stored"] == 6 and second["new_objects_stored"] == 0
    assert sorted((isolated_homes / "images").rglob("*.png")) == images
    assert second["accepted"] == first["accepted"]


def test_failing_contract_blocks_downstream(isolated_homes, tmp_path, monkeypatch, repo_root):
    """A team's stricter contract (here: widths of at most 16 px; the demo images are 32 px)
    fails on the manifest the per-file policy accepted, and annotations never run."""
    import json
    import shutil

    contracts = tmp_path / "contracts"
    shutil.copytree(repo_root / "data_contracts", contracts)
    suite = json.loads((contracts / "gx/raw_images.json").read_text())
    for expectation in suite["expectations"]:
        if expectation["kwargs"].get("column") in ("width", "height"):
            expectation["kwargs"]["max_value"] = 16
    (contracts / "gx/raw_images.json").write_text(json.dumps(suite))
    monkeypatch.setenv("CVOPS_CONTRACTS_DIR", str(contracts))
    make_drop(isolated_homes / "drops", "d1")
    result = run("d1", DagsterInstance.ephemeral())
    assert not result.success
    check = next(
        e for e in result.get_asset_check_evaluations() if e.check_name == "raw_images_contract"
    )
    assert not check.passed
    assert "expect_column_values_to_be_between" in check.metadata["first_failure"].value
    assert check.metadata["unexpected_rows"].value == 12  # width and height of 6 images
    assert not result.asset_materializations_for_node("annotations")


def test_sensor_picks_marked_drops_only_and_keeps_a_cursor(isolated_homes):
    from dagster import SkipReason

    make_drop(isolated_homes / "drops", "d1")
    make_drop(isolated_homes / "drops", "d2", marker=False)
    instance = DagsterInstance.ephemeral()
    resources = {k: v for k, v in build_resources().items() if k in ("drop_source", "loop")}
    result = evaluate(instance, resources)
    assert [r.partition_key for r in result.run_requests] == ["d1"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["d1"]
    instance.add_dynamic_partitions("drops", ["d1"])
    again = evaluate(instance, resources, result.cursor)
    assert isinstance(again, SkipReason) and "1 drop(s) without marker" in again.skip_message
    (isolated_homes / "drops" / "d2" / "_SUCCESS").write_text("")
    third = evaluate(instance, resources, result.cursor)
    assert [r.partition_key for r in third.run_requests] == ["d2"]


@pytest.mark.s3
def test_s3_drop_source_and_store_end_to_end(s3_env, s3_bucket, monkeypatch):
    """Sensor + ingest with drops and artifacts both in S3, over real HTTP (moto server)."""
    import boto3

    monkeypatch.setenv("CVOPS_S3_BUCKET", s3_bucket)
    monkeypatch.setenv("CVOPS_S3_PREFIX", "cvops")
    monkeypatch.setenv("CVOPS_S3_ENDPOINT_URL", s3_env)
    monkeypatch.setenv("CVOPS_DROPS", f"s3://{s3_bucket}/incoming")
    s3 = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    for drop, marked in (("ready", True), ("uploading", False)):
        for i in range(4):
            s3.put_object(
                Bucket=s3_bucket,
                Key=f"incoming/{drop}/{digit_model.digit_label(i)}/{i}.png",
                Body=corpus.encode(digit_model.digit(i), "PNG"),
            )
        if marked:
            s3.put_object(Bucket=s3_bucket, Key=f"incoming/{drop}/_SUCCESS", Body=b"")
    s3.put_object(Bucket=s3_bucket, Key="incoming/ready/bad.png", Body=b"not a png")

    instance = DagsterInstance.ephemeral()
    sensed = evaluate(instance, build_resources())
    assert [r.partition_key for r in sensed.run_requests] == ["ready"]

    result = run("ready", instance)
    assert result.success
    images = metadata(result, "raw_images")
    assert (images["accepted"], images["quarantined"]) == (4, 1)
    assert metadata(result, "annotations")["labels"] == 4
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="cvops/")["Contents"]}
    assert "cvops/tables/raw_images/ready.parquet" in keys
    assert "cvops/quarantine/ready/files/bad.png" in keys
    assert sum(k.startswith("cvops/images/") for k in keys) == 4
    assert any(k.startswith("cvops/reports/gx/validations/") for k in keys)


@pytest.mark.s3
def test_s3_missing_bucket_fails_the_run_with_a_clear_message(s3_env, monkeypatch, isolated_homes):
    make_drop(isolated_homes / "drops", "d1")
    monkeypatch.setenv("CVOPS_S3_BUCKET", "bucket-that-does-not-exist")
    monkeypatch.setenv("CVOPS_S3_ENDPOINT_URL", s3_env)
    result = run("d1", DagsterInstance.ephemeral())
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error.cause or failure.event_specific_data.error)
    assert "bucket-that-does-not-exist" in message and s3_env in message


def test_unmarked_drop_is_refused_by_the_asset(isolated_homes):
    make_drop(isolated_homes / "drops", "half", marker=False)
    result = run("half", DagsterInstance.ephemeral())
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "no _SUCCESS marker yet" in str(failure.event_specific_data.error)
    assert not (isolated_homes / "images").exists()  # nothing half-ingested


def test_a_tiny_image_is_turned_away_alone_and_the_drop_goes_on(isolated_homes):
    from PIL import Image

    drop = make_drop(isolated_homes / "drops", "tiny", n=6)
    (drop / "3" / "dot.png").write_bytes(corpus.encode(Image.new("RGB", (1, 1), "white"), "PNG"))
    result = run("tiny", DagsterInstance.ephemeral())
    assert result.success
    assert all(c.passed for c in result.get_asset_check_evaluations())  # the contract holds
    images, labels = metadata(result, "raw_images"), metadata(result, "annotations")
    assert images["files_seen"] == 7 and images["accepted"] == 6 and images["quarantined"] == 1
    assert "too_small" in images["quarantine_by_reason"]
    assert labels["labels"] == 6  # the drop's labels were imported


def test_a_drop_whose_every_label_is_refused_fails_labels_imported(isolated_homes):
    """Item 13 of the third trust round: imported 0 of N label records is not OK."""
    drop = make_drop(isolated_homes / "drops", "refused", n=2)
    (drop / "labels.csv").write_text("filename,label\nnowhere.png,1\n0/digit_0.png,dgo\n")
    result = run("refused", DagsterInstance.ephemeral())
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["labels_imported"].passed
    why = checks["labels_imported"].metadata["first_failure"].value
    assert "imported 0 of 2 label records" in why and "missing_image" in why
    make_drop(isolated_homes / "drops", "fine", n=2)
    checks = {
        e.check_name: e
        for e in run("fine", DagsterInstance.ephemeral()).get_asset_check_evaluations()
    }
    assert checks["labels_imported"].passed  # folder labels imported
