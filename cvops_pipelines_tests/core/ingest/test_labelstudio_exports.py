"""Every export Label Studio 1.23 offers for cvops' two labeling configs, imported as a drop.

The files under labelstudio_exports/ are what a real Label Studio 1.23.2 exported (its export
API) for two projects made with cvops' configs (a `Choices` and a `RectangleLabels` control, both
named "label"): three images uploaded as `digit 0N ünï.png`, which Label Studio renamed
`<hash>-digit_0N_ünï.png`, each labelled with its digit (boxes: x 10 %, y 12.5 %, 50 % x 60 %
of the 64 px image). JSON_MIN, CSV and TSV (served with a .csv name) flatten the JSON export;
COCO and YOLO name the uploads URL-quoted; YOLO carries a notes.json of its classes."""

import shutil
from pathlib import Path

import pytest

from cvops_pipelines.core.base.ontology import load_ontology
from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.ingest.annotations import import_annotations
from cvops_pipelines.core.ingest.intake import IngestConfig, ingest_drop
from cvops_pipelines.demo import digit_model
from cvops_pipelines_tests import corpus

EXPORTS = Path(__file__).parent / "labelstudio_exports"
DIGITS = (0, 1, 4)  # scikit-learn's digits 0, 1 and 4 are a 0, a 1 and a 4
EXPECTED = {f"digit 0{i} ünï.png": str(i) for i in DIGITS}
BOX = (6.4, 8.0, 38.4, 46.4)  # x 10 %, y 12.5 %, w 50 %, h 60 % of 64 px


def _import(tmp_path, exports: list[str], ontology: str, repo_root):
    drop = tmp_path / "ls-drop"
    for i in DIGITS:
        (drop / f"digit 0{i} ünï.png").parent.mkdir(parents=True, exist_ok=True)
        (drop / f"digit 0{i} ünï.png").write_bytes(
            corpus.encode(digit_model.digit(i, side=64), "PNG")
        )
    for name in exports:
        source = EXPORTS / name
        if source.is_dir():
            shutil.copytree(source, drop, dirs_exist_ok=True)
        else:
            shutil.copy(source, drop / name)
    source, store = LocalStore(drop), LocalStore(tmp_path / "store")
    manifest = ingest_drop(source, store, drop.name, IngestConfig(workers=1)).manifest_file
    contract = load_ontology(repo_root / "data_contracts" / ontology)
    return import_annotations(source, store, drop.name, manifest, contract)


@pytest.mark.parametrize(
    "export", ["choices.json", "choices_min.json", "choices.csv", "choices_tsv.csv"]
)
def test_every_choices_export_gives_each_upload_its_digit(tmp_path, repo_root, export):
    result = _import(tmp_path, [export], "ontology.yaml", repo_root)
    assert result.quarantine.empty, result.quarantine[["reason_code", "reason"]].to_dict("records")
    assert dict(zip(result.labels["original_name"], result.labels["label"])) == EXPECTED
    assert result.unlabeled_images == 0 and len(result.labels) == 3
    assert sum(result.formats.values()) == 3  # counted by file type: json or csv


@pytest.mark.parametrize(
    "export",
    ["boxes.json", "boxes_min.json", "boxes.csv", "boxes_tsv.csv", "boxes_coco", "boxes_yolo"],
)
def test_every_boxes_export_gives_each_upload_its_box(tmp_path, repo_root, export):
    result = _import(tmp_path, [export], "scenes.yaml", repo_root)
    assert result.quarantine.empty, result.quarantine[["reason_code", "reason"]].to_dict("records")
    boxes = result.labels.dropna(subset=["x_min"])
    assert dict(zip(boxes["original_name"], boxes["label"])) == EXPECTED
    assert len(boxes) == 3 and result.unlabeled_images == 0
    for row in boxes.itertuples():
        assert (row.x_min, row.y_min, row.x_max, row.y_max) == pytest.approx(BOX, abs=1e-3)


def test_a_flat_export_of_another_config_is_refused_whole_with_the_export_to_use():
    """Without the control cvops names "label", a row's other fields cannot be told from the
    task's data: nothing is guessed, the file is refused and says to export JSON."""
    from cvops_pipelines.core.ingest.formats.labelstudio import parse_labelstudio_min

    rows = [{"image": "/data/upload/1/d51afc38-a.png", "id": 1, "annotator": 1,
             "annotation_id": 1, "sentiment": "4"}]  # fmt: skip
    (problem,) = parse_labelstudio_min("export.json", rows)
    assert problem.code == "unrecognized_file"
    assert "'label'" in problem.detail and "export as JSON" in problem.detail


def test_a_flat_csv_row_whose_boxes_are_not_json_is_quarantined_by_line():
    from cvops_pipelines.core.ingest.formats.csv_labels import parse_csv

    lines = (EXPORTS / "boxes.csv").read_text().splitlines()
    lines[1] = lines[1].replace('"[{""x"":10', '"[{""x"":10,', 1)  # a trailing comma
    lines[2] = lines[2].replace('"[{""x""', '"' + "[" * 100_000 + '{""x""', 1)  # nested deep
    items = list(parse_csv("boxes.csv", "\n".join(lines).encode()))
    problems = [i for i in items if not hasattr(i, "label")]
    assert [(p.code, p.position) for p in problems] == [
        ("malformed_record", "line 2"),
        ("malformed_record", "line 3"),
    ]
    assert all("'label' is not JSON" in p.detail for p in problems)
    assert sum(hasattr(i, "label") for i in items) == 1  # the other row still imports


def test_each_odd_answer_in_a_flat_export_is_turned_away_alone():
    from cvops_pipelines.core.ingest.formats.common import LabelProblem
    from cvops_pipelines.core.ingest.formats.labelstudio import parse_labelstudio_min

    def box(**value):
        return [{"x": 1, "y": 0, "width": 1, "height": 1, "rectanglelabels": ["1"], **value}]

    polygon = [{"points": [[1, 2]], "polygonlabels": ["1"]}]
    odd = [5, True, [1, 2], {"foo": 1}, {"choices": ["a", "b"]}, box(x=float("inf")),
           box(x="NaN"), box(rectanglelabels=["1", "2"]), polygon]  # fmt: skip
    base = {"image": "/data/upload/1/d51afc38-a.png", "annotator": 1, "annotation_id": 1}
    rows = [{**base, "id": i, "label": v} for i, v in enumerate(odd)]
    items = list(parse_labelstudio_min("x.json", [*rows, {**base, "id": 99, "label": "3"}]))
    assert [type(i) for i in items] == [LabelProblem] * len(odd) + [type(items[-1])]
    assert [p.position.split(" ")[0] for p in items[:-1]] == [f"rows[{i}]" for i in range(len(odd))]
    assert "polygonlabels" in items[len(odd) - 1].detail and "not finite" in items[5].detail
    assert (items[-1].image_ref, items[-1].label) == ("a.png", "3")  # the good row still imports
