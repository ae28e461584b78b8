"""The typed hand-offs between build, measure and ship: JSON both ways, and a stored record that
is not what its reader expects fails by name."""

import json

import pytest

from cvops_pipelines.core.base.handoffs import (
    EvaluationRecord,
    HandoffError,
    ReleaseRecord,
    TrainedModelRecord,
)

TRAINED = TrainedModelRecord(
    task="detection",
    model_name="cvops-detector",
    model_version="3",
    run_id="r",
    dataset_version="ds-1",
    dataset_images=120,
    architecture="ssdlite320_mobilenet_v3_large",
    image_size=320,
    classes=["0", "1"],
    best_epoch=10,
    stopped_early=False,
    train_images_per_second=12.5,
    validation={"map": 0.2, "map_50": 0.5},
    answer_threshold=0.15,
)


def test_a_record_survives_json_as_the_io_manager_stores_it():
    stored = json.loads(json.dumps(TRAINED.to_json()))
    assert TrainedModelRecord.from_json(stored) == TRAINED
    assert stored["task"] == "detection" and stored["validation"]["map_50"] == 0.5


def test_a_stored_record_without_a_field_is_refused_by_name():
    stored = TRAINED.to_json()
    del stored["task"], stored["run_id"]
    with pytest.raises(HandoffError, match=r"trained_model: the stored record lacks task, run_id"):
        TrainedModelRecord.from_json(stored)
    with pytest.raises(HandoffError, match="edge_release: expected a JSON object"):
        ReleaseRecord.from_json(["r"])


def test_optional_fields_default_and_unknown_ones_are_left_out():
    evaluation = EvaluationRecord.from_json(
        {
            "task": "classification",
            "model_name": "m",
            "challenger_version": "2",
            "champion_version": None,
            "run_id": "r",
            "dataset_version": "ds",
            "test_images": 10,
            "challenger": {"accuracy": 0.9},
            "champion": None,
            "gate_passed": True,
            "gate_reasons": [],
            "written_by_a_later_version": 1,
        }
    )
    assert evaluation.gate_notes == [] and evaluation.replay is None
