"""Metrics, the champion/challenger gate and replay with the human in the loop, on constructed
predictions whose right answers are known by hand."""

import numpy as np
import pytest

from cvops_pipelines.core.gate import GateConfig, decide
from cvops_pipelines.core.metrics import evaluate_predictions, per_cohort
from cvops_pipelines.core.replay import Operator, replay

CLASSES = ["a", "b", "c"]


def probs_for(predicted: list[int], confidence: float = 0.8) -> np.ndarray:
    out = np.full((len(predicted), 3), (1 - confidence) / 2)
    out[np.arange(len(predicted)), predicted] = confidence
    return out


LABELS = np.array([0] * 10 + [1] * 10 + [2] * 10)


def evaluation(wrong: dict[int, int]):
    """Perfect predictions except `wrong[c]` images of class c predicted as the next class."""
    predicted = LABELS.copy()
    for cls, n in wrong.items():
        idx = np.flatnonzero(LABELS == cls)[:n]
        predicted[idx] = (cls + 1) % 3
    return evaluate_predictions(probs_for(list(predicted)), LABELS, CLASSES)


def test_metrics_by_hand():
    ev = evaluation({0: 2})
    assert ev.accuracy == pytest.approx(28 / 30)
    per = ev.per_class.set_index("label")
    assert per.loc["a", "recall"] == pytest.approx(0.8)
    assert per.loc["b", "precision"] == pytest.approx(10 / 12)
    assert ev.confusion[0, 1] == 2 and ev.confusion.trace() == 28
    # every prediction at confidence 0.8 while accuracy is 28/30: ECE = |0.8 - 0.9333|
    assert ev.ece == pytest.approx(abs(0.8 - 28 / 30))
    cohorts = per_cohort(probs_for(list(LABELS)), LABELS, np.array(["x"] * 15 + ["y"] * 15))
    assert set(cohorts["cohort"]) == {"x", "y"} and (cohorts["accuracy"] == 1).all()


def test_first_model_passes_by_definition():
    decision = decide(evaluation({0: 9, 1: 9}), None)
    assert decision.passed and decision.first_model
    assert "first model" in decision.reasons[0]


def test_worse_challenger_is_blocked():
    decision = decide(evaluation({0: 3, 1: 3}), evaluation({}))
    assert not decision.passed
    assert any(r.startswith("macro_f1") for r in decision.reasons)


@pytest.mark.parametrize("challenger", [{}, {0: 1}])
def test_equal_or_better_challenger_passes(challenger):
    assert decide(evaluation(challenger), evaluation({0: 1})).passed


def test_a_per_class_regression_alone_blocks():
    champion, challenger = evaluation({}), evaluation({2: 2})  # class c recall 1.0 -> 0.8
    config = GateConfig(max_macro_f1_drop=0.07, max_class_recall_drop=0.05)
    decision = decide(challenger, champion, config)
    assert champion.macro_f1 - challenger.macro_f1 < 0.07  # overall within epsilon
    assert not decision.passed
    assert [r.split(":")[0] for r in decision.reasons] == ["recall[c]"]
    table = decision.table.set_index("metric")
    assert not table.loc["recall[c]", "ok"] and table.loc["macro_f1", "ok"]


def test_one_image_is_within_the_noise_floor():
    champion, challenger = evaluation({}), evaluation({2: 1})  # one image: recall[c] 1.0 -> 0.9
    decision = decide(challenger, champion)
    assert decision.passed
    assert decision.table.set_index("metric").loc["recall[c]", "net_images_lost"] == 1
    assert not decide(challenger, champion, GateConfig(min_net_images=0)).passed  # strict


def test_top2_operator_replay():
    # 4 records, true class 0. Model ranks: right first; right second; right third; right first.
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    labels = np.zeros(4, dtype=int)
    alone = replay(probs, labels)
    assert alone.automatic_accuracy == 0.5 and alone.assisted_accuracy is None
    assisted = replay(probs, labels, Operator(top_k=2, p_pick_right=0.9))
    assert assisted.top_k_coverage == 0.75
    assert assisted.assisted_accuracy == pytest.approx(0.75 * 0.9)
    assert replay(probs, labels, Operator(top_k=3, p_pick_right=1.0)).assisted_accuracy == 1.0
    with pytest.raises(ValueError, match="no records"):
        replay(probs[:0], labels[:0])


def test_replay_regression_blocks_even_when_the_test_split_agrees():
    same = evaluation({})
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]])
    worse = np.array([[0.2, 0.7, 0.1], [0.1, 0.3, 0.6]])
    labels = np.zeros(2, dtype=int)
    operator = Operator(top_k=2)
    decision = decide(same, same, GateConfig(), replay(worse, labels, operator),
                      replay(probs, labels, operator))
    assert not decision.passed
    assert {r.split(":")[0] for r in decision.reasons} == {"replay automatic_accuracy",
                                                          "replay assisted_accuracy"}
