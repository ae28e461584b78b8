import pandas as pd
import pytest

from cvops_pipelines.core.base.contracts import ContractError, validate
from cvops_pipelines.core.base.ontology import OntologyError, load_ontology
from cvops_pipelines.core.base.store import LocalStore


def labels_frame(**overrides):
    row = {
        "image_id": "a" * 64,
        "label": "3",
        "x_min": None,
        "y_min": None,
        "x_max": None,
        "y_max": None,
        "annotator": "",
        "labeled_at": pd.Timestamp("2026-01-01", tz="UTC"),
        "origin": "drop",
        "source": "d",
        "original_name": "a.png",
        "annotation_file": "l.csv",
        "position": "line 2",
        "image_width": 32,
        "image_height": 32,
    }
    rows = [row, {**row, **overrides}]
    return pd.DataFrame(rows).astype({c: "float64" for c in ("x_min", "y_min", "x_max", "y_max")})


def test_annotations_suite_passes_clean_labels(repo_root, tmp_path):
    result = validate(
        labels_frame(),
        repo_root / "data_contracts/gx/annotations.json",
        {"ontology_classes": [str(i) for i in range(10)]},
    )
    assert result.success, result.markdown()


@pytest.mark.parametrize(
    "overrides, failing",
    [
        ({"label": "dgo"}, "expect_column_values_to_be_in_set"),
        (
            {"x_min": 10.0, "x_max": 5.0, "y_min": 1.0, "y_max": 2.0},
            "expect_column_pair_values_a_to_be_greater_than_b",
        ),
        (
            {"x_min": 1.0, "x_max": 40.0, "y_min": 1.0, "y_max": 2.0},
            "expect_column_pair_values_a_to_be_greater_than_b",
        ),
        ({"image_id": "not-a-sha"}, "expect_column_values_to_match_regex"),
    ],
)
def test_annotations_suite_reports_what_failed(repo_root, tmp_path, overrides, failing):
    store = LocalStore(tmp_path / "store")
    result = validate(
        labels_frame(**overrides),
        repo_root / "data_contracts/gx/annotations.json",
        {"ontology_classes": [str(i) for i in range(10)]},
        store,
        run_name="t",
    )
    assert not result.success
    assert failing in {o.expectation for o in result.failures}
    assert all(o.unexpected_count == 1 for o in result.failures)
    assert result.failures[0].examples  # examples shown, not just counts
    assert result.docs_uri.startswith("file://") and "validations/annotations" in result.docs_uri
    assert store.exists("reports/gx/index.html")


def test_missing_suite_is_a_clear_error(tmp_path):
    with pytest.raises(ContractError, match="not found"):
        validate(pd.DataFrame(), tmp_path / "nope.json")


def test_ontology_rejects_duplicates_and_bad_files(tmp_path):
    path = tmp_path / "ontology.yaml"
    path.write_text("version: 2\nclasses:\n  - {id: 0, name: cat}\n  - {id: 1, name: cat}\n")
    with pytest.raises(OntologyError, match="duplicate class names: cat"):
        load_ontology(path)
    path.write_text("classes: [")
    with pytest.raises(OntologyError, match="not valid YAML"):
        load_ontology(path)
    with pytest.raises(OntologyError, match="not found"):
        load_ontology(tmp_path / "missing.yaml")


def test_an_edited_ontology_is_read_again_and_a_broken_edit_still_refused(tmp_path):
    """Parsed once per text (every run reads it): an edit is seen at once, a bad one refused."""
    path = tmp_path / "ontology.yaml"
    path.write_text("version: 1\nclasses:\n  - {id: 0, name: cat}\n")
    first = load_ontology(path)
    assert load_ontology(path) is first  # the same text: parsed once
    path.write_text("version: 2\nclasses:\n  - {id: 0, name: cat}\n  - {id: 1, name: dog}\n")
    assert (load_ontology(path).version, load_ontology(path).names) == (2, ["cat", "dog"])
    path.write_text("version: 3\nclasses:\n  - {id: 0, name: cat}\n  - {id: 0, name: dog}\n")
    for _ in range(2):  # a refusal is not remembered as a result
        with pytest.raises(OntologyError, match="duplicate class ids"):
            load_ontology(path)


def test_ontology_marks_event_classes(repo_root, tmp_path):
    path = tmp_path / "ontology.yaml"
    path.write_text(
        "name: line\nversion: 1\nclasses:\n  - {id: 0, name: ok}\n"
        "  - {id: 1, name: crack, event: true}\n  - {id: 2, name: dent, event: true}\n"
    )
    assert load_ontology(path).event_classes == ["crack", "dent"]
    assert load_ontology(repo_root / "data_contracts/ontology.yaml").event_classes == []


@pytest.mark.parametrize(
    "classes, message",
    [
        (
            "  - {id: 0, name: on}\n  - {id: 1, name: off}",
            r":4: classes\[0\]: name 'on' loads as True",
        ),
        ("  - {id: 0, name: null}", r"name 'null' loads as None, not text: quote it"),
        ("  - {id: 0, name: yes}", r"loads as True"),
        ('  - {id: 0, name: ""}', r"must be non-empty text"),
        ('  - {id: 0, name: "cat"}\n  - {id: 1, name: "Cat "}', r"leading or\s+trailing spaces"),
        ('  - {id: 0, name: "cat"}\n  - {id: 1, name: "Cat"}', r"differ only in case"),
        ('  - {id: 0, name: "a/b"}', r"slashes"),
        ('  - {id: 0, name: "a", parent: "zebra"}', r"parent 'zebra', which is not a class"),
        ('  - {id: "x", name: "a"}', r"id 'x' must be a whole number"),
        ('  - {id: 0, name: "a", event: "yes"}', r"event must be true or false"),
    ],
)
def test_ontology_traps_are_refused_with_file_and_line(tmp_path, classes, message):
    path = tmp_path / "ontology.yaml"
    path.write_text(f"name: t\nversion: 1\nclasses:\n{classes}\n")
    with pytest.raises(OntologyError, match=message) as err:
        load_ontology(path)
    assert str(path) in str(err.value)


def test_a_version_that_is_not_a_number_names_the_file_and_line(tmp_path):
    path = tmp_path / "ontology.yaml"
    path.write_text('name: t\nversion: two\nclasses:\n  - {id: 0, name: "a"}\n')
    with pytest.raises(OntologyError, match=rf"{path}:2: version must be a whole number"):
        load_ontology(path)


def test_the_ontology_names_its_task(repo_root, tmp_path):
    assert load_ontology(repo_root / "data_contracts/ontology.yaml").task == "classification"
    assert load_ontology(repo_root / "data_contracts/scenes.yaml").boxes
    path = tmp_path / "ontology.yaml"
    path.write_text("version: 1\ntask: segmentation\nclasses:\n  - {id: 0, name: ok}\n")
    with pytest.raises(OntologyError, match=r"ontology.yaml:2: task must be one of"):
        load_ontology(path)


def test_a_table_validated_in_chunks_counts_what_a_whole_table_would(repo_root, tmp_path):
    """raw_images validates its manifest a chunk at a time: a failure in any chunk fails the
    table with the summed count, and a duplicate split across chunks is still a duplicate."""
    from cvops_pipelines.core.base.contracts import validate_table
    from cvops_pipelines.core.base.tables import TableWriter
    from cvops_pipelines.core.ingest.intake import MANIFEST_SCHEMA

    def manifest(rows: list[dict]):
        writer = TableWriter(
            tmp_path / f"m{len(list(tmp_path.iterdir()))}.parquet", MANIFEST_SCHEMA, 4
        )
        for row in rows:
            writer.add(row)
        return writer.close()

    def row(n: int, **change) -> dict:
        return {
            "image_id": f"{n:064x}",
            "uri": f"file:///s/{n}.png",
            "key": f"images/{n}.png",
            "source": "d1",
            "original_name": f"{n}.png",
            "aliases": [],
            "format": "png",
            "mode": "RGB",
            "width": 32,
            "height": 32,
            "channels": 3,
            "bytes": 100,
            "phash": "0" * 16,
            "thumb": b"\0" * 16,
            "ingested_at": pd.Timestamp("2026-12-01", tz="UTC"),
        } | change

    suite = repo_root / "data_contracts" / "gx" / "raw_images.json"
    limits = {"min_side": 8, "max_side": 4096, "max_bytes": 2**20}
    clean = [row(n) for n in range(10)]
    ok = validate_table(manifest(clean), suite, limits, chunk_rows=3)
    assert ok.success and ok.rows == 10

    twice = clean + [row(2, original_name="again.png")]  # rows 2 and 10: different chunks
    bad = [row(n, width=4) if n in (1, 8) else row(n) for n in range(10)]
    for rows, expectation, count in (
        (twice, "expect_column_values_to_be_unique", 2),
        (bad, "expect_column_values_to_be_between", 2),
    ):
        chunked = validate_table(manifest(rows), suite, limits, chunk_rows=3)
        whole = validate(pd.DataFrame(rows), suite, limits)
        assert not chunked.success and not whole.success
        failed = {(o.expectation, o.unexpected_count) for o in chunked.failures}
        assert failed == {(o.expectation, o.unexpected_count) for o in whole.failures}
        assert (expectation, count) in failed

    empty = validate_table(manifest([]), suite, limits)
    assert empty.success and empty.rows == 0
