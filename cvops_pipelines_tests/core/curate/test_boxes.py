"""Boxes in the pool and in dataset versions, and label QA for boxes."""

import json

import numpy as np
import pandas as pd
import pytest

from cvops_pipelines.core.base.ontology import NO_OBJECTS
from cvops_pipelines.core.curate.dataset import build_dataset_version
from cvops_pipelines.core.curate.detection_label_qa import (
    BoxQAConfig,
    image_review,
    labelstudio_box_tasks,
    review_boxes,
)
from cvops_pipelines.core.curate.detection_pool import box_rows, build_box_pool, decode, sets_agree
from cvops_pipelines.core.curate.splits import SplitConfig

T0 = pd.Timestamp("2026-11-01", tz="UTC")


def label(image, name, box=None, annotator="a", minutes=0, file="f.json"):
    x0, y0, x1, y1 = box if box else (None,) * 4
    return {
        "image_id": image,
        "label": name,
        "x_min": x0,
        "y_min": y0,
        "x_max": x1,
        "y_max": y1,
        "annotator": annotator,
        "labeled_at": T0 + pd.Timedelta(minutes=minutes),
        "origin": "drop",
        "source": "d1",
        "annotation_file": file,
    }


def manifest(ids):
    return pd.DataFrame(
        {
            "image_id": ids,
            "source": "d1",
            "original_name": [f"{i}.png" for i in ids],
            "uri": [f"file:///{i}.png" for i in ids],
            "key": [f"images/{i}.png" for i in ids],
            "phash": [f"{n * 0x0F0F0F0F0F0F0F:016x}"[-16:] for n in range(len(ids))],
            "thumb": [np.random.default_rng(n).bytes(32 * 32) for n in range(len(ids))],
            "width": 100,
            "height": 80,
            "ingested_at": T0,
        }
    )


def test_pool_keeps_negatives_and_the_latest_box_set_wins():
    labels = pd.DataFrame(
        [
            label("img1", "3", (10, 10, 30, 30)),
            label("img1", "7", (50, 10, 70, 40)),
            label("img2", NO_OBJECTS),  # annotated as empty: a negative
            label("img3", "3", (0, 0, 20, 20), minutes=0),
            label("img3", "8", (0, 0, 20, 20), minutes=5, file="g.json"),  # a later correction
            label("img4", "5"),  # an image-level class: classification data, not a box
        ]
    )
    pool = build_box_pool(manifest(["img1", "img2", "img3", "img4"]), labels)
    by_id = pool.set_index("image_id")
    assert list(pool["image_id"]) == ["img1", "img2", "img3"]
    assert by_id.loc["img2", "n_boxes"] == 0 and by_id.loc["img2", "label"] == NO_OBJECTS
    boxes, names = decode(by_id.loc["img3", "boxes"])
    assert names == ["8"] and boxes.tolist() == [[0, 0, 20, 20]]
    assert by_id.loc["img1", "n_boxes"] == 2


def test_annotators_who_drew_other_boxes_lower_the_agreement():
    labels = pd.DataFrame(
        [
            label("img1", "3", (10, 10, 30, 30), annotator="a"),
            label("img1", "3", (11, 10, 31, 30), annotator="b", minutes=1),  # same object
            label("img1", "3", (60, 40, 90, 70), annotator="c", minutes=2),  # elsewhere
        ]
    )
    pool = build_box_pool(manifest(["img1"]), labels)
    assert pool["n_votes"].iloc[0] == 3
    assert pool["agreement"].iloc[0] == pytest.approx(1 / 3)  # only c agrees with c
    a = json.dumps([{"label": "3", "box": [10, 10, 30, 30]}])
    b = json.dumps([{"label": "3", "box": [11, 10, 31, 30]}])
    assert sets_agree(a, b) and not sets_agree(
        a, json.dumps([{"label": "8", "box": [10, 10, 30, 30]}])
    )


def dataset(box_of_img1=(10, 10, 30, 30)):
    ids = [f"img{i}" for i in range(40)]
    labels = pd.DataFrame(
        [label(i, "3", box_of_img1 if i == "img1" else (5, 5, 25, 25)) for i in ids[:-5]]
        + [label(i, NO_OBJECTS) for i in ids[-5:]]
    )
    pool = build_box_pool(manifest(ids), labels)
    return build_dataset_version(pool, pd.DataFrame(), SplitConfig())


def test_dataset_version_carries_boxes_keeps_negatives_and_hashes_them():
    one = dataset()
    assert one.boxes and (one.rows["n_boxes"] == 0).sum() == 5
    assert one.summary()["images_without_objects"] == 5
    moved = dataset(box_of_img1=(12, 10, 32, 30))
    assert moved.version != one.version  # a moved box is a new dataset version
    assert dataset().version == one.version
    counts = one.class_counts()  # objects per class and split
    assert counts["images"].sum() == one.rows["n_boxes"].sum()


def test_box_rows_carry_what_the_contract_checks():
    rows = dataset().rows
    frame = box_rows(rows)
    assert len(frame) == rows["n_boxes"].sum()
    assert (frame["right_margin"] == 100 - frame["x_max"]).all()
    assert (frame["box_width"] > 0).all() and (frame["boxes_in_image"] == 1).all()
    assert box_rows(pd.DataFrame({"image_id": []})).empty  # classification: nothing to check


TRUTH = [("3", [10, 10, 40, 40]), ("7", [60, 10, 90, 40]), ("5", [10, 50, 40, 78])]


def pool_of(images: dict[str, list]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": list(images),
            "label": "3",
            "boxes": [json.dumps([{"label": c, "box": b} for c, b in v]) for v in images.values()],
            "n_votes": 1,
            "agreement": 1.0,
            "source": "d1",
            "original_name": "x.png",
            "uri": "file:///x.png",
            "width": 100,
            "height": 80,
        }
    )


def model_sees_truth(image_ids):
    boxes = np.array([b for _, b in TRUTH], float)
    return {
        i: {"boxes": boxes, "scores": np.array([0.9, 0.8, 0.85]), "labels": [c for c, _ in TRUTH]}
        for i in image_ids
    }


def test_dropped_shifted_and_swapped_boxes_are_found_with_their_fix():
    clean = TRUTH
    dropped = TRUTH[:2]
    shifted = [TRUTH[0], ("7", [70, 25, 100, 55]), TRUTH[2]]  # IoU with the truth < 0.5
    swapped = [TRUTH[0], ("1", TRUTH[1][1]), TRUTH[2]]
    duplicate = [*TRUTH, ("3", [10, 10, 40, 41])]
    pool = pool_of(
        {
            "clean": clean,
            "dropped": dropped,
            "shifted": shifted,
            "swapped": swapped,
            "dup": duplicate,
        }
    )
    issues = review_boxes(pool, model_sees_truth(pool["image_id"]))
    found = {(i, t) for i, t in zip(issues["image_id"], issues["issue"])}
    assert found == {
        ("dropped", "overlooked"),
        ("shifted", "badly_located"),
        ("swapped", "swapped_class"),
        ("dup", "duplicate_box"),
    }
    by_image = issues.set_index("image_id")
    assert by_image.loc["dropped", "suggested_label"] == "5"
    assert json.loads(by_image.loc["shifted", "suggested_box"]) == [60, 10, 90, 40]
    assert by_image.loc["swapped", "suggested_label"] == "7"
    review = image_review(issues, pool)
    assert set(review["image_id"]) == {"dropped", "shifted", "swapped", "dup"}
    assert (review["severity"] > 0).all()


def test_an_image_gets_the_same_verdict_alone_or_in_a_batch_and_thresholds_are_config():
    pool = pool_of({f"img{i}": TRUTH[: 1 + i % 3] for i in range(9)})
    predictions = model_sees_truth(pool["image_id"])
    batch = review_boxes(pool, predictions)
    alone = pd.concat([review_boxes(pool.iloc[[k]], predictions) for k in range(len(pool))])
    key = ["image_id", "issue", "severity"]
    pd.testing.assert_frame_equal(
        batch[key].sort_values(key).reset_index(drop=True),
        alone[key].sort_values(key).reset_index(drop=True),
        check_dtype=False,
    )
    strict = review_boxes(pool, predictions, BoxQAConfig(overlooked_score=0.95))
    assert len(batch[batch["issue"] == "overlooked"]) > 0
    assert len(strict[strict["issue"] == "overlooked"]) == 0


def test_labelstudio_tasks_prefill_the_given_boxes_and_suggest_the_fix():
    pool = pool_of({"dropped": TRUTH[:2]})
    issues = review_boxes(pool, model_sees_truth(["dropped"]))
    (task,) = labelstudio_box_tasks(issues, pool)
    given = task["annotations"][0]["result"]
    assert [r["value"]["rectanglelabels"] for r in given] == [["3"], ["7"]]
    assert given[0]["value"]["x"] == pytest.approx(10.0) and given[0]["original_width"] == 100
    (fix,) = task["predictions"][0]["result"]
    assert fix["value"]["rectanglelabels"] == ["5"]
    assert fix["value"]["y"] == pytest.approx(100 * 50 / 80)


def test_the_replay_set_carries_each_frame_s_reviewed_boxes_an_expert_s_first():
    from cvops_pipelines.core.curate.replay_set import build_replay_set

    operator_fix = json.dumps([{"label": "3", "box": [1, 1, 9, 9]}])
    expert_fix = json.dumps([{"label": "8", "box": [2, 2, 9, 9]}])
    records = pd.DataFrame(
        {
            "record_id": ["cam-00000001", "cam-00000002"],
            "device_id": "cam",
            "cohort": "a",
            "release": "rel-1",
            "image_id": ["a" * 64, "b" * 64],
            "key": ["k1", "k2"],
            "predicted": "3",
            "corrected_label": ["3", "3"],
            "corrected_boxes": [operator_fix, operator_fix],
            "captured_at": "2026-11-01T00:00:00",
            "boxes": "[]",
        }
    )
    pool = pd.DataFrame(
        {
            "image_id": ["b" * 64],
            "label": ["8"],
            "annotators": [["operator@cam", "expert-1"]],
            "votes": [[1, 1]],
            "boxes": [expert_fix],
        }
    )
    rows = build_replay_set(records, pool).rows.set_index("record_id")
    assert rows.loc["cam-00000001", "boxes"] == operator_fix
    assert rows.loc["cam-00000002", "boxes"] == expert_fix
    assert rows.loc["cam-00000002", "label_source"] == "expert"


def test_a_reviewer_that_disagrees_with_most_given_boxes_is_too_weak_to_judge():
    from cvops_pipelines.core.curate.detection_label_qa import reviewer_agreement

    pool = pool_of({f"img{k}": TRUTH for k in range(10)} | {"dropped": TRUTH[:2]})
    sees = model_sees_truth(pool["image_id"])
    strong = reviewer_agreement(pool, sees)
    assert strong.can_judge and strong.images == 11
    assert strong.precision == pytest.approx(32 / 33) and strong.recall == 1.0
    # a reviewer that puts every box a class off agrees with nothing it reviews
    wrong = {
        i: {**p, "labels": [str((int(c) + 1) % 10) for c in p["labels"]]} for i, p in sees.items()
    }
    weak = reviewer_agreement(pool, wrong)
    assert weak.f1 == 0.0 and not weak.can_judge
    assert "too weak to judge" in weak.why_not() and "F1 0.000" in weak.why_not()
    # its boxes below the QA's score are not its answer: a confident reviewer judged on them
    shy = reviewer_agreement(pool, sees, BoxQAConfig().at(0.95))
    assert shy.recall == 0.0 and not shy.can_judge
    assert reviewer_agreement(pool, sees, BoxQAConfig(min_reviewer_f1=1.0)).can_judge is False


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_the_reviewer_guard_s_setting_is_refused_outside_0_to_1(bad):
    from pydantic import ValidationError

    from cvops_pipelines.defs.curate.assets import LabelIssuesConfig

    assert LabelIssuesConfig().min_reviewer_f1 == BoxQAConfig().min_reviewer_f1
    with pytest.raises(ValidationError, match="min_reviewer_f1"):
        LabelIssuesConfig(min_reviewer_f1=bad)
