"""import_annotations on whole drops: every label tied to an image or quarantined with a reason."""

import json

import pytest

from cvops_pipelines.core.base.ontology import load_ontology
from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.ingest.annotations import import_annotations
from cvops_pipelines.core.ingest.intake import IngestConfig, ingest_drop
from cvops_pipelines.demo import digit_model
from cvops_pipelines_tests import corpus


@pytest.fixture
def ontology(repo_root):
    return load_ontology(repo_root / "data_contracts" / "ontology.yaml")


def run(drop, tmp_path, ontology):
    source, store = LocalStore(drop), LocalStore(tmp_path / "store")
    manifest = ingest_drop(source, store, drop.name, IngestConfig(workers=1)).manifest_file
    return import_annotations(source, store, drop.name, manifest, ontology)


def write(drop, name, data):
    (drop / name).parent.mkdir(parents=True, exist_ok=True)
    (drop / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def test_imagefolder_with_unknown_class_folder(tmp_path, ontology):
    drop = tmp_path / "d1"
    for i in range(4):
        write(
            drop,
            f"{digit_model.digit_label(i)}/digit_{i}.png",
            corpus.encode(digit_model.digit(i), "PNG"),
        )
    write(drop, "dgo/digit_9.png", corpus.encode(digit_model.digit(9), "PNG"))
    write(drop, "top_level.png", corpus.encode(digit_model.digit(10), "PNG"))
    result = run(drop, tmp_path, ontology)
    assert sorted(result.labels["label"]) == sorted(digit_model.digit_label(i) for i in range(4))
    assert result.formats == {"imagefolder": 4}
    assert result.unlabeled_images == 2  # top_level.png and the rejected-class image
    problem = result.quarantine.iloc[0]
    assert problem.reason_code == "unknown_class"
    assert "'dgo' is not in" in problem.reason and "known classes: 0, 1" in problem.reason


def test_csv_drop_missing_file_quarantined_image_and_duplicates(tmp_path, ontology):
    drop = tmp_path / "d2"
    png = corpus.encode(digit_model.digit(0), "PNG")
    write(drop, "a.png", png)
    write(drop, "a_copy.png", png)  # same bytes, second name: a duplicate
    write(drop, "broken.png", png[:-40])
    write(
        drop,
        "labels.csv",
        "filename,label,annotator\na.png,0,ann1\na_copy.png,0,ann2\n"
        "nowhere.png,1,ann1\nbroken.png,2,ann1\na.png,dgo,ann3\n",
    )
    result = run(drop, tmp_path, ontology)
    assert list(result.labels["annotator"]) == ["ann1", "ann2"]
    assert result.labels["image_id"].nunique() == 1  # both names resolve to one image
    got = {(r.position, r.reason_code) for r in result.quarantine.itertuples()}
    assert got == {
        ("line 4", "missing_image"),
        ("line 5", "image_quarantined"),
        ("line 6", "unknown_class"),
    }
    assert all(r.original_name == "labels.csv" for r in result.quarantine.itertuples())
    assert result.quarantine["quarantine_uri"].str.endswith("quarantine/d2/files/labels.csv").all()


def test_malformed_json_and_unrecognised_files_are_quarantined_whole(tmp_path, ontology):
    drop = tmp_path / "d3"
    write(drop, "a.png", corpus.encode(digit_model.digit(0), "PNG"))
    write(drop, "export.json", '{"images": [1, 2,\n  oops]')
    write(drop, "notes.txt", "call Bob about the labels")
    result = run(drop, tmp_path, ontology)
    assert result.labels.empty
    rows = {r.original_name: r for r in result.quarantine.itertuples()}
    assert rows["export.json"].reason_code == "malformed_file"
    assert rows["export.json"].position == "line 2 column 3"
    assert rows["notes.txt"].reason_code == "unrecognized_file"
    assert result.unlabeled_images == 1  # annotation files present: no ImageFolder fallback


def test_coco_drop_boxes_resolved_and_checked_against_image_size(tmp_path, ontology):
    drop = tmp_path / "d4"
    write(drop, "images/x.png", corpus.encode(digit_model.digit(3), "PNG"))  # 32x32
    coco = {
        "images": [{"id": 1, "file_name": "x.png", "width": 32, "height": 32}],
        "categories": [{"id": 4, "name": "3"}, {"id": 9, "name": "8"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [2, 2, 20, 28]},
            {"id": 2, "image_id": 1, "category_id": 4, "bbox": [20, 2, 20, 5]},
        ],
    }
    write(drop, "annotations/instances.json", json.dumps(coco))
    result = run(drop, tmp_path, ontology)
    boxes = result.labels.dropna(subset=["x_min"])
    assert boxes[["x_min", "y_min", "x_max", "y_max"]].values.tolist() == [[2, 2, 22, 30]]
    assert list(result.quarantine["reason_code"]) == ["invalid_box"]
    assert "outside the 32x32 image" in result.quarantine.iloc[0].reason
    assert result.formats["coco"] == 2  # one box + the image-level label


def test_yolo_drop(tmp_path, ontology):
    drop = tmp_path / "d5"
    write(drop, "images/train/a.png", corpus.encode(digit_model.digit(1), "PNG"))
    write(drop, "classes.txt", "\n".join(ontology.names))
    write(drop, "labels/train/a.txt", "1 0.5 0.5 0.5 0.25\n")
    result = run(drop, tmp_path, ontology)
    box = result.labels.dropna(subset=["x_min"]).iloc[0]
    assert (box.label, box.x_min, box.y_min, box.x_max, box.y_max) == ("1", 8, 12, 24, 20)


@pytest.fixture
def scenes_ontology(repo_root):
    return load_ontology(repo_root / "data_contracts" / "scenes.yaml")


def _coco_drop(tmp_path, name, coco, images=("x.png", "y.png")):
    drop = tmp_path / name
    for i, image in enumerate(images):
        write(drop, f"images/{image}", corpus.encode(digit_model.digit(3 + i), "PNG"))  # 32x32
    write(drop, "annotations/instances.json", json.dumps(coco))
    return drop


def test_coco_ids_are_unique_and_odd_values_are_quarantined_with_a_code(tmp_path, scenes_ontology):
    """Item 10 of the third trust round: each case gets a code and a quarantine row, and the
    good annotations beside them import."""
    coco = {
        "images": [
            {"id": 1, "file_name": "x.png"},
            {"id": 2, "file_name": "y.png"},
            {"id": 2, "file_name": "x.png"},  # a repeated image id
            {"id": 3, "file_name": "x.png"},
        ],
        "categories": [
            {"id": 4, "name": "3"},
            {"id": 9, "name": "8"},
            {"id": 9, "name": "1"},  # a repeated category id, another name
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [2, 2, 10, 10]},
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [12, 2, 10, 10]},  # id again
            {"id": 2, "image_id": 1, "category_id": 4, "bbox": [0, 0, True, True]},
            {"id": 3, "image_id": 2, "category_id": 4, "bbox": [1, 1, 5, 5]},  # ambiguous image
            {"id": 4, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]},  # which name?
            {"id": 5, "image_id": 3, "category_id": 4, "bbox": None},  # an object with no box
            {"id": 6, "image_id": 1, "category_id": 4, "bbox": [0, 0, 10**400, 5]},
        ],
    }
    result = run(_coco_drop(tmp_path, "c1", coco), tmp_path, scenes_ontology)
    boxes = result.labels.dropna(subset=["x_min"])
    assert boxes[["x_min", "y_min", "x_max", "y_max"]].values.tolist() == [[2, 2, 12, 12]]
    codes = {(r.position, r.reason_code) for r in result.quarantine.itertuples()}
    assert codes == {
        ("categories[2]", "duplicate_id"),
        ("images[2]", "duplicate_id"),
        ("annotations[1] (id=1)", "duplicate_id"),
        ("annotations[2] (id=2)", "malformed_record"),
        ("annotations[3] (id=3)", "ambiguous_image"),
        ("annotations[4] (id=4)", "unknown_class"),
        ("annotations[5] (id=5)", "missing_box"),
        ("annotations[6] (id=6)", "malformed_record"),
    }
    assert result.nothing_usable() is None


def test_one_image_listed_per_annotation_gives_one_vote_per_entry(tmp_path, scenes_ontology):
    """Item 13: Label Studio's COCO export with two annotators lists the image twice and names
    no annotator; the two people's boxes stay two sets, so their disagreement shows."""
    from cvops_pipelines.core.curate.detection_pool import build_box_pool

    coco = {
        "images": [{"id": 0, "file_name": "x.png"}, {"id": 1, "file_name": "x.png"}],
        "categories": [{"id": 0, "name": "3"}],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 0, "bbox": [2, 2, 10, 10]},
            {"id": 1, "image_id": 1, "category_id": 0, "bbox": [2, 2, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 0, "bbox": [18, 18, 10, 10]},
        ],
    }
    drop = _coco_drop(tmp_path, "c2", coco, images=("x.png",))
    source, store = LocalStore(drop), LocalStore(tmp_path / "store")
    manifest = ingest_drop(source, store, drop.name, IngestConfig(workers=1)).manifest_file
    result = import_annotations(source, store, drop.name, manifest, scenes_ontology)
    boxes = result.labels.dropna(subset=["x_min"])
    assert boxes["annotator"].nunique() == 2
    pool = build_box_pool(manifest.read(), result.labels)
    (row,) = pool.itertuples()
    assert row.n_votes == 2 and row.agreement < 1.0


def test_boxes_per_image_are_bounded_at_ingest(tmp_path, scenes_ontology):
    """Item 11: 100,000 boxes on one image are refused there, with one quarantine row; the
    other image's boxes import, and nothing later compares 10^10 pairs."""
    many = [
        {"id": i, "image_id": 1, "category_id": 4, "bbox": [i % 20, 1, 5, 5]}
        for i in range(100_000)
    ]
    coco = {
        "images": [{"id": 1, "file_name": "x.png"}, {"id": 2, "file_name": "y.png"}],
        "categories": [{"id": 4, "name": "3"}],
        "annotations": [
            *many,
            {"id": "last", "image_id": 2, "category_id": 4, "bbox": [1, 1, 5, 5]},
        ],
    }
    result = run(_coco_drop(tmp_path, "c3", coco), tmp_path, scenes_ontology)
    boxes = result.labels.dropna(subset=["x_min"])
    assert list(boxes["original_name"]) == ["images/y.png"]
    (row,) = result.quarantine.itertuples()
    assert row.reason_code == "too_many_boxes" and "100000 boxes" in row.reason


def test_a_drop_whose_every_label_was_refused_says_so(tmp_path, ontology):
    """Item 13: imported 0 of N is not OK."""
    drop = tmp_path / "c4"
    write(drop, "a.png", corpus.encode(digit_model.digit(0), "PNG"))
    write(drop, "labels.csv", "filename,label\nnowhere.png,1\na.png,dgo\n")
    result = run(drop, tmp_path, ontology)
    assert result.labels.empty
    assert "imported 0 of 2 label records" in result.nothing_usable()
    unlabeled = tmp_path / "c5"
    write(unlabeled, "a.png", corpus.encode(digit_model.digit(0), "PNG"))
    assert run(unlabeled, tmp_path, ontology).nothing_usable() is None  # no labels to import


def test_huge_numbers_in_an_annotation_file_are_a_malformed_file(tmp_path, ontology):
    drop = tmp_path / "c6"
    write(drop, "a.png", corpus.encode(digit_model.digit(0), "PNG"))
    write(drop, "export.json", '{"images": [{"id": ' + "9" * 5000 + "}], ")
    write(drop, "other.json", '[{"data": {"image": "a.png"}, "x": NaN}]')
    result = run(drop, tmp_path, ontology)
    codes = {r.original_name: r.reason_code for r in result.quarantine.itertuples()}
    assert codes == {"export.json": "malformed_file", "other.json": "malformed_file"}
