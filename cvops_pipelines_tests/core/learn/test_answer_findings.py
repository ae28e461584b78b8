"""A sub-batch's findings from Label Studio task JSON: agreement, overrules, confusion, for
choices and for rectangles."""

from cvops_pipelines.core.learn.answer_findings import NOTHING, answer_of, findings, pairs


def _rect(label, x, y, w=20.0, h=20.0) -> dict:
    value = {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": [label]}
    return {"type": "rectanglelabels", "value": value}


def _choice(label) -> dict:
    return {"type": "choices", "value": {"choices": [label]}}


def _task(image_id, *answers, cancelled=0) -> dict:
    annotations = [
        {"completed_by": who, "result": result, "was_cancelled": False} for who, result in answers
    ]
    annotations += [{"completed_by": 9, "result": [], "was_cancelled": True}] * cancelled
    return {"data": {"image_id": image_id}, "annotations": annotations}


def test_boxes_pair_by_overlap_and_what_one_side_lacks_pairs_with_nothing():
    model = answer_of([_rect("car", 10, 10), _rect("bus", 60, 60), _rect("car", 0, 80)])
    person = answer_of([_rect("truck", 11, 11), _rect("bus", 61, 59), _rect("bike", 40, 0)])
    assert sorted(pairs(model, person)) == sorted(
        [("car", "truck"), ("bus", "bus"), ("car", NOTHING), (NOTHING, "bike")]
    )
    assert pairs([], []) == []  # an empty frame both agree on


def test_findings_count_overrules_confusion_agreement_and_skips():
    model = {"a": [_choice("7")], "b": [_choice("7")], "c": [_rect("car", 10, 10)]}
    tasks = [
        _task("a", (1, [_choice("1")]), (2, [_choice("1")])),  # overruled; two agree
        _task("b", (1, [_choice("7")]), (2, [_choice("9")])),  # kept; two disagree
        _task("c", (1, [_rect("car", 10, 10), _rect("bus", 50, 50)])),  # a box the model missed
        _task("d", cancelled=1),  # skipped: not answered
    ]
    found = findings(tasks, model)
    assert (found["tasks"], found["answered"], found["skipped"], found["annotators"]) == (
        4,
        3,
        1,
        2,
    )
    assert found["tasks_with_several_answers"] == 2 and found["agreement"] == 0.5
    assert found["overruled_model"] == round(2 / 3, 3)
    assert {(c["model"], c["annotator"], c["count"]) for c in found["confusion"]} == {
        ("7", "1", 1),
        (NOTHING, "bus", 1),
    }


def test_without_the_models_answer_or_second_opinions_nothing_is_made_up():
    found = findings([_task("x", (1, [_choice("3")]))], {})
    assert found["overruled_model"] is None and found["agreement"] is None


def test_results_in_shapes_label_studio_does_not_write_count_as_no_answer():
    odd_box = {"value": {"x": "left", "y": 0, "width": 1, "height": 1, "rectanglelabels": ["3"]}}
    for odd in (None, "3", [1, "x"], [{"value": "3"}], [{"value": {"choices": "3"}}], [odd_box]):
        assert answer_of(odd) == [], odd
    assert answer_of([1, {"value": {"choices": ["3"]}}]) == [("3", None)]
