"""Production metrics, drift and the annotation queue for a detector fleet."""

import json

import numpy as np
import pandas as pd
import pytest

from cvops_pipelines.core.base.box_metrics import matches
from cvops_pipelines.core.learn.detection_active import detection_queue
from cvops_pipelines.core.learn.detection_production import DetectionPolicy
from cvops_pipelines.core.learn.detection_production_state import (
    DetectionState,
    detection_production,
)
from cvops_pipelines.core.learn.production_state import catch_up
from cvops_pipelines_tests.reference import detection_production_reference, resolve_records

A = {"label": "3", "box": [10, 10, 40, 40]}
B = {"label": "7", "box": [60, 10, 90, 40]}


def scored(box, score):
    return {**box, "score": score}


def record(i, boxes, corrected=None, release="r1", cohort="site-a"):
    return {
        "record_id": f"cam-{i:08d}",
        "image_id": f"{i:064x}",
        "release": release,
        "cohort": cohort,
        "device_id": "cam",
        "predicted": boxes[0]["label"] if boxes else "",
        "boxes": json.dumps(boxes),
        "corrected_boxes": None if corrected is None else json.dumps(corrected),
        "captured_at": f"2026-11-01T00:{i // 60:02d}:{i % 60:02d}",
        "width": 100,
        "height": 80,
        "uri": "",
        "key": "",
    }


def test_a_box_counts_once_for_its_own_class_and_only_when_confident():
    assert matches([scored(A, 0.9), scored(A, 0.8)], [A], 0.5) == (1, 2)  # double box
    assert matches([scored({**A, "label": "8"}, 0.9)], [A], 0.5) == (0, 1)  # wrong class
    assert matches([scored(A, 0.4)], [A], 0.5) == (0, 0)  # below the answer threshold


def test_precision_and_recall_per_release_and_an_sla_that_agrees_with_them():
    rows = [record(i, [scored(A, 0.9)], [A, B]) for i in range(30)]  # finds 1 of 2
    rows += [record(100 + i, [scored(A, 0.9)], None) for i in range(10)]  # unreviewed
    report = detection_production(pd.DataFrame(rows), DetectionPolicy(min_reviewed=30))
    (row,) = report.per_release.to_dict(orient="records")
    assert (row["frames"], row["reviewed"]) == (40, 30)
    assert row["precision_50"] == 1.0 and row["recall_50"] == 0.5
    failure = report.sla_failure(DetectionPolicy(min_recall=0.6, min_reviewed=30))
    assert "recall 0.500" in failure
    assert report.sla_failure(DetectionPolicy(min_recall=0.5, min_reviewed=30)) is None
    assert report.sla_failure(DetectionPolicy(min_recall=0.6, min_reviewed=31)) is None


def test_coverage_per_device_counts_frames_kept_images_and_reviews():
    rows = [record(i, [scored(A, 0.9)], [A] if i < 3 else None) for i in range(5)]
    rows += [  # a camera that sent 4 image-less records and 1 image, reviewed
        {**record(10 + i, [scored(A, 0.6)], [A] if i == 0 else None), "device_id": "gate-2"}
        | ({"key": None} if i else {})
        for i in range(5)
    ]
    devices = detection_production(pd.DataFrame(rows), DetectionPolicy()).devices
    assert devices.set_index("device_id").to_dict("index") == {
        "cam": {"frames": 5, "images_kept": 5, "reviewed": 3},
        "gate-2": {"frames": 5, "images_kept": 1, "reviewed": 1},
    }
    summary = detection_production(pd.DataFrame(rows), DetectionPolicy()).summary(DetectionPolicy())
    assert {d["device_id"] for d in summary["devices"]} == {"cam", "gate-2"}


def test_box_outputs_that_move_are_flagged_and_steady_ones_are_not():
    rng = np.random.default_rng(0)
    steady = [record(i, [scored(A, float(rng.uniform(0.6, 0.9)))]) for i in range(100)]
    report = detection_production(pd.DataFrame(steady), DetectionPolicy(window=48))
    assert not report.drift["flagged"].any() and report.drift_failure() is None
    moved = steady[:50] + [record(100 + i, [scored(A, 0.2), scored(B, 0.25)]) for i in range(50)]
    report = detection_production(pd.DataFrame(moved), DetectionPolicy(window=48))
    assert report.drift["flagged"].all() and "box outputs moved" in report.drift_failure()
    short = detection_production(pd.DataFrame(steady[:20]), DetectionPolicy(window=48))
    assert short.drift["note"].iloc[0] == "needs 96 frames"


def test_the_queue_puts_field_errors_first_then_the_least_certain():
    rows = [
        record(1, [scored(A, 0.95)], [A]),  # reviewed, right: not queued
        record(2, [scored(A, 0.95)], [A, B]),  # reviewed, one box missed
        record(3, [scored(A, 0.52)]),  # a coin flip
        record(4, [scored(A, 0.97)]),  # sure
        record(5, [scored(A, 0.8), scored({**A, "label": "8"}, 0.7)]),  # two classes, one object
    ]
    queue = detection_queue(pd.DataFrame(rows), experts=set(), size=4, explore_share=0.0)
    assert list(queue["reason"]) == ["field_error", "uncertain", "uncertain", "uncertain"]
    assert queue["record_id"].tolist()[:3] == ["cam-00000002", "cam-00000003", "cam-00000005"]
    assert "two" not in queue["why"].iloc[0] and "'3' and '8'" in queue["why"].iloc[2]
    experts = {rows[1]["image_id"]}
    assert rows[1]["record_id"] not in set(
        detection_queue(pd.DataFrame(rows), experts, 4, 0.0)["record_id"]
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_the_exploration_share_is_a_seeded_sample_of_the_rest(seed):
    rows = [record(i, [scored(A, 0.5 + i / 200)]) for i in range(40)]
    queue = detection_queue(pd.DataFrame(rows), set(), 10, 0.3, seed=seed)
    assert (queue["reason"] == "explore").sum() == 3
    again = detection_queue(pd.DataFrame(rows), set(), 10, 0.3, seed=seed)
    assert queue["record_id"].tolist() == again["record_id"].tolist()


def test_each_release_is_judged_at_its_own_operating_point():
    rows = [record(i, [scored(A, 0.3)], [A], release="young") for i in range(5)]
    rows += [record(10 + i, [scored(A, 0.3)], [A], release="default") for i in range(5)]
    report = detection_production(pd.DataFrame(rows), DetectionPolicy(), {"young": 0.2})
    by_release = report.per_release.set_index("release")
    assert by_release.loc["young", "recall_50"] == 1.0
    assert by_release.loc["default", "recall_50"] == 0.0  # 0.3 < the policy's 0.5
    assert by_release.loc["young", "answer_threshold"] == 0.2


def messy_box_batches(seed: int, n_batches: int = 10, per_batch: int = 30) -> dict:
    """Detector feedback batches with every awkward case: re-delivered records, reviews in the
    record, late corrections (some tied in time, some for records not sent yet, some that
    clear a review), two releases at their own operating points."""
    rng = np.random.default_rng(seed)
    pick = [A, B, {"label": "3", "box": [12, 12, 38, 42]}, {"label": "7", "box": [0, 0, 20, 20]}]

    def box_set(scored_boxes: bool) -> list:
        chosen = [pick[i] for i in rng.choice(len(pick), rng.integers(0, 3), replace=False)]
        return [scored(b, round(float(rng.random()), 2)) if scored_boxes else b for b in chosen]

    batches, made = {}, []
    for b in range(n_batches):
        rows = []
        for _ in range(per_batch):
            if made and rng.random() < 0.1:
                rid = made[rng.integers(len(made))]
            else:
                rid = f"cam-{len(made):08d}"
                made.append(rid)
            rows.append(
                {
                    "kind": "record",
                    "record_id": rid,
                    "release": f"rel-{rng.integers(2)}",
                    "cohort": f"c{rng.integers(2)}",
                    "boxes": json.dumps(box_set(True)),
                    "corrected_label": None,
                    "corrected_boxes": json.dumps(box_set(False)) if rng.random() < 0.4 else None,
                    "corrected_at": None,
                    "captured_at": f"2026-11-0{rng.integers(1, 4)}T{rng.integers(24):02d}:00:00",
                    "key": f"images/{rid}.png",
                }
            )
        for _ in range(per_batch // 3):
            target = made[rng.integers(len(made))] if rng.random() < 0.8 else f"cam-9{b:07d}"
            rows.append(
                {
                    "kind": "correction",
                    "record_id": target,
                    "corrected_label": None,
                    "corrected_boxes": json.dumps(box_set(False)) if rng.random() < 0.9 else None,
                    "corrected_at": f"2026-11-05T{rng.integers(3):02d}:00:00",
                }
            )
        batches[f"b{b:03d}"] = pd.DataFrame(rows)
    return batches


class Partitions:
    def __init__(self, batches: dict):
        self.batches = batches
        self.partitions = sorted(batches)

    def read(self, partition: str) -> pd.DataFrame:
        return self.batches[partition]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_incremental_state_reports_what_every_record_in_memory_gives(tmp_path, seed):
    batches = messy_box_batches(seed)
    policy = DetectionPolicy(window=12)
    points = {"rel-0": 0.3}  # rel-1 names no operating point: the policy's min_score
    state = DetectionState(tmp_path / "state.sqlite", policy, points.get)
    keys = sorted(batches)
    catch_up(state, Partitions({k: batches[k] for k in keys[:4]}))
    state.close()  # a later run opens the stored state and absorbs the new batches only
    state = DetectionState(tmp_path / "state.sqlite", policy, points.get)
    absorbed = catch_up(state, Partitions(batches))
    assert absorbed["batches_absorbed"] == len(keys) - 4 and not absorbed["state_rebuilt"]
    mine = state.report()
    state.close()
    records = resolve_records(pd.concat(batches.values(), ignore_index=True))
    records = records[records["boxes"].notna()]
    reference = detection_production_reference(records, policy, points)
    assert mine.per_release.equals(reference.per_release)
    assert mine.table.equals(reference.table)
    assert mine.drift.fillna(-1).equals(reference.drift.fillna(-1))
    assert mine.per_release["reviewed"].sum() > 0 and len(mine.drift) == 2


def test_a_changed_policy_starts_the_state_over(tmp_path):
    batches = messy_box_batches(3, n_batches=2)
    state = DetectionState(tmp_path / "s.sqlite", DetectionPolicy(), {}.get)
    catch_up(state, Partitions(batches))
    state.close()
    again = DetectionState(tmp_path / "s.sqlite", DetectionPolicy(match_iou=0.7), {}.get)
    assert again.rebuilt and again.frames() == 0 and not again.absorbed()
    assert again.report().per_release.empty  # the kept sums went with the records
    again.close()


def test_answers_to_the_published_queue_come_back_as_the_queue_s_labels(tmp_path):
    """The import marks its tasks as the queue's, so the answers that come back through a
    Label Studio export are read as annotation-queue labels, not as an ordinary drop's."""
    from cvops_pipelines.core.base.store import LocalStore
    from cvops_pipelines.core.ingest.formats.labelstudio import parse_labelstudio
    from cvops_pipelines.core.learn.detection_active import publish_detection_queue

    store = LocalStore(tmp_path)
    rows = [record(2, [scored(A, 0.95)], [A, B])]
    rows[0]["key"] = "fleet/frame.png"
    store.write_bytes(rows[0]["key"], b"png bytes")
    queue = detection_queue(pd.DataFrame(rows), experts=set(), size=1, explore_share=0.0)
    _, prefix = publish_detection_queue(store, queue, ["3", "7"])
    tasks = json.loads(store.read_bytes(f"{prefix}/tasks.json"))
    tasks[0]["annotations"] = [
        {"completed_by": "me", "result": tasks[0]["predictions"][0]["result"]}
    ]
    (label,) = parse_labelstudio("export.json", tasks)
    assert label.origin == "annotation_queue" and label.label == "3"
    assert label.image_ref == "images/frame.png"  # beside the export, as the queue wrote it
