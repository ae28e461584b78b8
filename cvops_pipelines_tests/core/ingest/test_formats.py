"""Importers on files written the way the real tools write them."""

import json

from cvops_pipelines.core.base.ontology import NO_OBJECTS
from cvops_pipelines.core.ingest.formats.coco import parse_coco
from cvops_pipelines.core.ingest.formats.common import (
    FRACTION,
    PIXELS,
    LabelProblem,
    LabelRecord,
)
from cvops_pipelines.core.ingest.formats.csv_labels import parse_csv
from cvops_pipelines.core.ingest.formats.labelstudio import image_ref_from_task, parse_labelstudio
from cvops_pipelines.core.ingest.formats.yolo import (
    image_stem_key,
    parse_class_names,
    parse_yolo_labels,
)


def split(items):
    items = list(items)
    return (
        [i for i in items if isinstance(i, LabelRecord)],
        [i for i in items if isinstance(i, LabelProblem)],
    )


def test_csv_with_header_annotator_and_bad_rows():
    data = (
        b"filename,label,annotator\n"
        b"a.png,3,alice\n"
        b"b.png,4\n"
        b"\n"
        b"c.png\n"
        b",5\n"
        b'"d, with comma.png",6,bob\n'
    )
    records, problems = split(parse_csv("labels.csv", data))
    assert [(r.image_ref, r.label, r.annotator, r.position) for r in records] == [
        ("a.png", "3", "alice", "line 2"),
        ("b.png", "4", "", "line 3"),
        ("d, with comma.png", "6", "bob", "line 7"),
    ]
    assert [(p.code, p.position) for p in problems] == [
        ("malformed_record", "line 5"),
        ("malformed_record", "line 6"),
    ]


def test_csv_without_header_and_not_utf8():
    records, _ = split(parse_csv("l.csv", b"x.png,1\n"))
    assert records[0].position == "line 1"
    _, problems = split(parse_csv("l.csv", b"\xff\xfe\x00bad"))
    assert problems[0].code == "malformed_file"


COCO = {
    "info": {"description": "exported by CVAT"},
    "licenses": [],
    "images": [
        {"id": 1, "file_name": "images/a.jpg", "width": 640, "height": 480},
        {"id": 2, "file_name": "images/b.jpg", "width": 640, "height": 480},
        {"id": 5, "file_name": "images/empty.jpg", "width": 640, "height": 480},  # no annotations
    ],
    "categories": [
        {"id": 1, "name": "cat", "supercategory": "animal"},
        {"id": 3, "name": "dog", "supercategory": "animal"},  # non-contiguous ids
        {"id": 7, "name": "car", "supercategory": "vehicle"},
    ],
    "annotations": [
        {
            "id": 10,
            "image_id": 1,
            "category_id": 3,
            "bbox": [10, 20, 100, 50],
            "area": 5000,
            "iscrowd": 0,
            "segmentation": [],
        },
        {
            "id": 11,
            "image_id": 1,
            "category_id": 3,
            "bbox": [200, 20, 50, 50],
            "area": 2500,
            "iscrowd": 0,
            "segmentation": [],
        },
        {
            "id": 12,
            "image_id": 2,
            "category_id": 1,
            "bbox": [0, 0, 10, 10],
            "area": 100,
            "iscrowd": 0,
        },
        {
            "id": 13,
            "image_id": 2,
            "category_id": 7,
            "bbox": [5, 5, 10, 10],
            "area": 100,
            "iscrowd": 0,
        },
        {"id": 14, "image_id": 2, "category_id": 99, "bbox": [5, 5, 10, 10]},
        {"id": 15, "image_id": 42, "category_id": 1, "bbox": [5, 5, 10, 10]},
    ],
}


def test_coco_boxes_image_level_labels_and_problems():
    records, problems = split(parse_coco("coco.json", COCO))
    boxes = [(r.image_ref, r.label, r.box) for r in records if r.box]
    assert boxes == [
        ("images/a.jpg", "dog", (10.0, 20.0, 110.0, 70.0)),
        ("images/a.jpg", "dog", (200.0, 20.0, 250.0, 70.0)),
        ("images/b.jpg", "cat", (0.0, 0.0, 10.0, 10.0)),
        ("images/b.jpg", "car", (5.0, 5.0, 15.0, 15.0)),
    ]
    assert all(r.box_units == PIXELS for r in records)
    # a.jpg has one class -> image-level label; b.jpg is mixed -> none; empty.jpg, listed
    # without annotations -> a negative (kept by detection datasets, unlabeled otherwise)
    image_level = [(r.image_ref, r.label) for r in records if r.box is None]
    assert image_level == [("images/a.jpg", "dog"), ("images/empty.jpg", NO_OBJECTS)]
    assert [(p.code, p.position) for p in problems] == [
        ("unknown_class", "annotations[4] (id=14)"),
        ("missing_image", "annotations[5] (id=15)"),
    ]


LABEL_STUDIO_EXPORT = [
    {
        "id": 101,
        "data": {"image": "/data/upload/3/5f1e2c3a-digit_00007.png"},
        "annotations": [
            {
                "id": 1,
                "completed_by": 1,
                "was_cancelled": False,
                "ground_truth": False,
                "created_at": "2026-11-01T10:00:00.000000Z",
                "updated_at": "2026-11-01T10:00:05.000000Z",
                "lead_time": 3.2,
                "result": [
                    {
                        "id": "x1",
                        "type": "choices",
                        "from_name": "choice",
                        "to_name": "image",
                        "origin": "manual",
                        "value": {"choices": ["7"]},
                    }
                ],
            },
            {
                "id": 2,
                "completed_by": {"id": 2, "email": "bob@example.com"},
                "was_cancelled": False,
                "result": [
                    {
                        "id": "x2",
                        "type": "choices",
                        "from_name": "choice",
                        "to_name": "image",
                        "value": {"choices": ["1"]},
                    }
                ],
            },
            {"id": 3, "completed_by": 3, "was_cancelled": True, "result": []},
        ],
        "predictions": [],
    },
    {
        "id": 102,
        "data": {"image": "/data/local-files/?d=drop/sub%20dir/cat.jpg"},
        "annotations": [
            {
                "id": 4,
                "completed_by": 1,
                "result": [
                    {
                        "id": "r1",
                        "type": "rectanglelabels",
                        "from_name": "label",
                        "to_name": "image",
                        "original_width": 640,
                        "original_height": 480,
                        "image_rotation": 0,
                        "value": {
                            "x": 10,
                            "y": 25,
                            "width": 50,
                            "height": 50,
                            "rotation": 0,
                            "rectanglelabels": ["cat"],
                        },
                    }
                ],
            }
        ],
    },
    {"id": 103, "data": {}, "annotations": []},
]


def test_labelstudio_export():
    records, problems = split(parse_labelstudio("export.json", LABEL_STUDIO_EXPORT))
    assert [(r.image_ref, r.label, r.annotator) for r in records] == [
        ("digit_00007.png", "7", "1"),
        ("digit_00007.png", "1", "bob@example.com"),
        ("drop/sub dir/cat.jpg", "cat", "1"),
    ]
    assert records[0].labeled_at == "2026-11-01T10:00:05.000000Z"
    assert records[2].box == (0.1, 0.25, 0.6, 0.75) and records[2].box_units == FRACTION
    assert [p.code for p in problems] == ["malformed_record"]
    assert image_ref_from_task("s3://bucket/path/x.png") == "x.png"


def test_yolo_normalised_boxes_and_bad_lines():
    classes = parse_class_names("classes.txt", b"cat\ndog\n")
    assert classes == ["cat", "dog"]
    assert parse_class_names("data.yaml", b"names: {0: cat, 1: dog}\n") == ["cat", "dog"]
    data = b"1 0.5 0.5 0.2 0.4\n\n0 0.1 0.1\n7 0.5 0.5 0.1 0.1\n"
    records, problems = split(parse_yolo_labels("labels/train/img_1.txt", data, classes))
    assert records[0].image_ref == "train/img_1"
    assert records[0].label == "dog" and records[0].box_units == FRACTION
    assert tuple(round(v, 6) for v in records[0].box) == (0.4, 0.3, 0.6, 0.7)
    assert [(p.code, p.position) for p in problems] == [
        ("malformed_record", "line 3"),
        ("unknown_class", "line 4"),
    ]
    assert image_stem_key("labels/a.txt") == "a"


def test_coco_json_roundtrip_is_plain_json():
    assert json.loads(json.dumps(COCO))["categories"][1]["id"] == 3


def _rectangle(value: dict, **extra) -> list:
    return [
        {
            "id": 1,
            "data": {"image": "/data/upload/1/0a1b2c3d-x.png"},
            "annotations": [
                {
                    "id": 1,
                    "completed_by": 1,
                    "result": [
                        {
                            "type": "rectanglelabels",
                            "value": {**value, "rectanglelabels": ["3"]},
                            **extra,
                        }
                    ],
                },
                {"id": 2, "completed_by": 2, "result": []},  # submitted: nothing there
            ],
        }
    ]


def test_labelstudio_empty_answers_are_negatives_and_rotated_boxes_are_enclosed():
    """Item 13 of the third trust round, on Label Studio's JSON export."""
    square = {"x": 25, "y": 25, "width": 25, "height": 25}
    turned = _rectangle({**square, "rotation": 90}, original_width=200, original_height=100)
    records, problems = split(parse_labelstudio("e.json", turned))
    assert problems == []
    box, negative = records
    # 50x25 px from (50, 25), turned 90 degrees clockwise about that corner: x 25..50, y 25..75
    assert box.box_units == PIXELS
    assert [round(v, 6) for v in box.box] == [25.0, 25.0, 50.0, 75.0]
    assert (negative.label, negative.annotator) == (NO_OBJECTS, "2")
    records, _ = split(parse_labelstudio("e.json", _rectangle({**square, "rotation": 0})))
    assert records[0].box == (0.25, 0.25, 0.5, 0.5) and records[0].box_units == FRACTION
    _, problems = split(parse_labelstudio("e.json", _rectangle({**square, "rotation": 30})))
    assert "original_width" in problems[0].detail  # no image size: cannot rotate
    for bad in (True, 10**400, "12", float("nan")):
        _, problems = split(parse_labelstudio("e.json", _rectangle({**square, "x": bad})))
        assert problems[0].code == "malformed_record", bad
