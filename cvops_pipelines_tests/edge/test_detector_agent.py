"""A detector release on a device: verified, health-checked, served as boxes, corrected box by
box, uploaded, and read back centrally as box labels."""

import json

import numpy as np
import pandas as pd
import pytest

from cvops_pipelines.core.build.detection_training import (
    DetectorConfig,
    DetectorSpec,
    build_detector,
)
from cvops_pipelines.core.curate.detection_pool import build_box_pool, decode
from cvops_pipelines.core.learn.feedback import (
    feedback_labels,
    feedback_manifest,
    parse_batch,
)
from cvops_pipelines.core.ship.detection_export import edge_detections, export_detector
from cvops_pipelines.core.ship.export import session
from cvops_pipelines.demo.scenes import CLASSES, scenes
from cvops_pipelines.edge.agent import EdgeAgent
from cvops_pipelines_tests.edge.fleet_kit import central, field_records
from cvops_pipelines_tests.helpers import rezip

CONFIG = DetectorConfig(image_size=160, score_threshold=0.2, detections_per_image=10)


@pytest.fixture(scope="module")
def detector():
    import torch

    torch.manual_seed(0)
    spec = DetectorSpec.of(CONFIG, CLASSES)
    return export_detector(build_detector(len(CLASSES), CONFIG), spec), spec


@pytest.fixture
def device(tmp_path, detector):
    onnx, spec = detector
    c = central(tmp_path)
    release = c.release(onnx, "1", preprocess=json.loads(spec.to_json()))
    c.releases.point("stable", release.id, "first detector", "test")
    agent = EdgeAgent(tmp_path / "cam-1", c.remote, c.public_key, "cam-1", "site-a")
    assert agent.sync().status == "updated"
    return c, agent


def test_the_device_answers_the_boxes_the_exported_path_finds(device, detector):
    c, agent = device
    onnx, spec = detector
    items = scenes(4, seed=5)
    reference = edge_detections(session(onnx), [s.image for s in items], spec)
    for item, expected in zip(items, reference):
        answer = agent.predict(item.png())
        assert [b["label"] for b in answer.boxes] == [d.label for d in expected]
        for got, want in zip(answer.boxes, expected):
            assert np.allclose(got["box"], want.box, atol=0.01)
            assert got["score"] == pytest.approx(want.score, abs=1e-5)
        assert answer.label == (answer.boxes[0]["label"] if answer.boxes else "")


def test_a_box_review_travels_to_the_pool_as_the_image_s_labels(device):
    c, agent = device
    items = scenes(3, seed=6)
    answers = [agent.predict(item.png()) for item in items]
    truth = [
        {"label": label, "box": [float(v) for v in box]}
        for label, box in zip(items[0].labels, items[0].boxes)
    ]
    agent.correct_boxes(answers[0].record_id, truth)  # add, move, relabel: the final set
    agent.correct_boxes(answers[1].record_id, [])  # nothing there
    assert agent.upload().records == 3
    records = field_records(c.releases.store)
    assert json.loads(records["boxes"].iloc[0]) == answers[0].boxes
    labels = feedback_labels(records)
    pool = build_box_pool(feedback_manifest(records), labels)
    by_image = pool.set_index("image_id")
    boxes, names = decode(by_image.loc[records["image_id"].iloc[0], "boxes"])
    assert sorted(names) == sorted(items[0].labels)
    assert np.allclose(np.sort(boxes, axis=0), np.sort(items[0].boxes, axis=0), atol=0.01)
    assert by_image.loc[records["image_id"].iloc[1], "n_boxes"] == 0  # a reviewed negative
    assert records["image_id"].iloc[2] not in by_image.index  # unreviewed: no label


def test_a_record_with_a_box_outside_its_image_is_turned_away_with_its_code(device):
    c, agent = device
    answer = agent.predict(scenes(1, seed=7)[0].png())
    agent.correct_boxes(answer.record_id, [{"label": "3", "box": [100, 100, 400, 120]}])
    agent.buffer.seal()
    (batch,) = agent.buffer.sealed()
    parsed = parse_batch(agent.buffer.payload(batch), batch)
    ((record, code, reason),) = parsed.refused
    assert record == answer.record_id and code == "invalid_box" and "160x160" in reason
    assert parsed.records == [] and parsed.infos == {}  # its image is not stored either

    def inverted(files):
        row = json.loads(files["records.jsonl"])
        row["corrected_boxes"] = [{"label": "3", "box": [50, 50, 40, 60]}]
        files["records.jsonl"] = json.dumps(row).encode()

    parsed = parse_batch(rezip(agent.buffer.payload(batch), inverted), batch)
    assert "empty or inverted" in parsed.refused[0][2]


def test_the_device_drops_detections_no_batch_would_carry(device, monkeypatch):
    """Item 12: a NaN or zero-area box from the model never reaches the buffer (it would get the
    whole batch refused); the good ones are kept."""
    from cvops_pipelines.edge import runtime
    from cvops_pipelines.edge.detect import Detection

    c, agent = device
    answers = [
        Detection("3", 0.9, (10.0, 10.0, 40.0, 40.0)),
        Detection("4", float("nan"), (1.0, 1.0, 9.0, 9.0)),
        Detection("5", 0.8, (20.0, 20.0, 20.0, 30.0)),  # zero width
    ]
    monkeypatch.setattr(runtime, "detections", lambda *a, **k: answers)  # the model's boxes
    answer = agent.predict(scenes(1, seed=9)[0].png())
    assert [b["label"] for b in answer.boxes] == ["3"]
    assert "2 detection(s) dropped" in agent.events[-1]
    agent.buffer.seal()
    (batch,) = agent.buffer.sealed()
    assert parse_batch(agent.buffer.payload(batch), batch).refused == []


def test_a_detector_bundle_that_answers_the_wrong_shape_is_never_served(tmp_path, detector):
    onnx, spec = detector
    c = central(tmp_path)
    wrong = {**json.loads(spec.to_json()), "classes": CLASSES[:5]}  # 10 classes in the model
    release = c.release(onnx, "1", preprocess=wrong)
    c.releases.point("stable", release.id, "mislabelled detector", "test")
    agent = EdgeAgent(tmp_path / "cam-2", c.remote, c.public_key, "cam-2", "site-a")
    result = agent.sync()
    assert result.status == "rejected" and "detector answers" in result.detail
    assert agent.release is None


def test_an_operator_fixes_boxes_from_the_command_line(device, tmp_path, capsys):
    from cvops_pipelines.edge.cli import main

    c, agent = device
    agent.close()
    frame = tmp_path / "frame.png"
    frame.write_bytes(scenes(1, seed=8)[0].png())
    (tmp_path / "release.pub").write_bytes(c.public_key)
    common = ["--state", str(tmp_path / "cam-1"), "--store", str(c.root)]
    common += ["--public-key", str(tmp_path / "release.pub"), "--device-id", "cam-1"]
    assert main([*common, "predict", str(frame)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert "boxes" in answer and answer["release"]
    fixed = [{"label": "4", "box": [10, 12, 40, 50]}]
    assert main([*common, "correct", answer["record_id"], "--boxes", json.dumps(fixed)]) == 0
    for bad, why in [
        ('[{"label": "4"}]', "is not \\[x_min"),
        ('[{"label": "4", "box": [NaN, 0, 5, 5]}]', "not finite"),
        ('[{"label": "4", "box": [9, 9, 1, 1]}]', "empty or inverted"),
        ('[{"label": "4", "box": ["a", 0, 5, 5]}]', "not a number"),
        ('[{"label": "", "box": [0, 0, 5, 5]}]', "not a class name"),
        ('{"label": "4"}', "expected a list"),
    ]:
        with pytest.raises(SystemExit, match=f"correct --boxes: .*{why}"):
            main([*common, "correct", answer["record_id"], "--boxes", bad])
    assert main([*common, "upload"]) == 0
    records = field_records(c.releases.store)
    mine = records[records["record_id"] == answer["record_id"]]
    assert json.loads(mine["corrected_boxes"].iloc[0]) == fixed
    assert mine["corrected_label"].iloc[0] == "4"


def test_a_detector_canary_is_replayed_against_stable_on_the_same_frames(device, detector):
    from cvops_pipelines.core.measure.replay import NonInferiority
    from cvops_pipelines.core.ship.canary import decide_canary
    from cvops_pipelines.core.ship.detection_canary import replay_detectors

    c, agent = device
    onnx, spec = detector
    stable = agent.release
    canary = c.release(onnx, "2", preprocess=json.loads(spec.to_json())).id
    items = scenes(12, seed=9)
    for item in items:
        answer = agent.predict(item.png())
        truth = [
            {"label": lab, "box": [float(v) for v in b]} for lab, b in zip(item.labels, item.boxes)
        ]
        agent.correct_boxes(answer.record_id, truth)
    agent.upload()
    records = field_records(c.releases.store)
    # the same frames as if canary devices had shot them too (ids of their own)
    twins = records.assign(release=canary, record_id=records["record_id"] + "-canary")
    both = pd.concat([records, twins], ignore_index=True)
    verdict, comparison = decide_canary(
        c.releases,
        both,
        canary,
        stable,
        rule=NonInferiority(min_records=8),
        replay=replay_detectors,
    )
    (outcome,) = comparison.outcomes
    assert outcome.records == 24  # balanced: the 12 frames of each side, each replayed on both
    assert outcome.new_only == outcome.old_only == 0  # one model on both sides
    assert outcome.new_accuracy == outcome.old_accuracy
    assert verdict.action == "promote"
