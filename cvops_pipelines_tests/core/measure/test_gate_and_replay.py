"""Metrics, the champion/challenger gate and replay with the human in the loop, on constructed
predictions whose right answers are known by hand."""

import numpy as np
import pytest

from cvops_pipelines.core.measure.gate import GateConfig, decide
from cvops_pipelines.core.measure.metrics import evaluate_predictions, per_cohort
from cvops_pipelines.core.measure.replay import (
    INCONCLUSIVE,
    INSUFFICIENT,
    NON_INFERIOR,
    WORSE,
    NonInferiority,
    Operator,
    compare_on_replay,
    paired_test,
)

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
    automatic, assisted = compare_on_replay(
        probs, probs, labels, CLASSES, operator=Operator(top_k=2, p_pick_right=0.9)
    ).outcomes
    assert automatic.new_accuracy == 0.5
    assert assisted.new_accuracy == pytest.approx(0.75 * 0.9)  # top-2 covers 3 of 4
    wide = compare_on_replay(
        probs, probs, labels, CLASSES, operator=Operator(top_k=3, p_pick_right=1.0)
    ).outcomes[1]
    assert wide.new_accuracy == 1.0
    with pytest.raises(ValueError, match="top_k"):
        Operator(top_k=0)


def compare(new_right: list[bool], old_right: list[bool], rule=None, **kw):
    """Replay comparison of two 'models' that are right exactly where told (3 classes)."""
    labels = np.zeros(len(new_right), dtype=int)
    new = probs_for([0 if r else 1 for r in new_right])
    old = probs_for([0 if r else 1 for r in old_right])
    return compare_on_replay(new, old, labels, CLASSES, rule=rule or NonInferiority(), **kw)


def test_exact_paired_rule_by_hand():
    # 100 records, 10 discordant: new right on 2, old right on 8 (difference -0.06)
    new = [True] * 88 + [True] * 2 + [False] * 8 + [False] * 2
    old = [True] * 88 + [False] * 2 + [True] * 8 + [False] * 2
    outcome = paired_test(np.array(new), np.array(old), "top-1", NonInferiority(0.02, 0.05, 50))
    assert (outcome.records, outcome.new_only, outcome.old_only) == (100, 2, 8)
    assert outcome.difference == pytest.approx(-0.06)
    # H0 "worse by >= 0.02": pi0 = (1 - 0.02 * 100 / 10) / 2 = 0.4; P(X >= 2 | 10, 0.4)
    assert outcome.p_non_inferior == pytest.approx(1 - 0.6**10 - 10 * 0.4 * 0.6**9)
    # exact McNemar, one-sided: P(X <= 2 | 10, 0.5) = (1 + 10 + 45) / 1024
    assert outcome.p_worse == pytest.approx(56 / 1024)
    assert outcome.verdict == INCONCLUSIVE and outcome.more_records is None  # -0.06 < -margin
    assert "inconclusive" in outcome.sentence(
        NonInferiority()
    ) and "10 discordant" in outcome.sentence(NonInferiority())
    # the same rates on 3x the records: McNemar rejects, the challenger is shown worse
    worse = paired_test(np.array(new * 3), np.array(old * 3), "top-1")
    assert worse.verdict == WORSE and worse.p_worse < 0.05


def test_identical_models_are_non_inferior_with_zero_discordant_pairs():
    same = [True] * 55 + [False] * 5
    outcome = paired_test(np.array(same), np.array(same), "top-1")
    assert outcome.verdict == NON_INFERIOR and outcome.p_non_inferior == 0.0
    assert outcome.new_only == outcome.old_only == 0 and outcome.lower_bound == 0.0


def test_lower_bound_agrees_with_the_exact_test():
    rule = NonInferiority(0.02, 0.05, 10)
    for b, c in [(1, 6), (3, 9), (5, 5), (0, 4), (7, 2), (2, 12)]:
        new = np.array([True] * c + [False] * b + [True] * 80)
        old = np.array([False] * c + [True] * b + [True] * 80)
        outcome = paired_test(new, old, "top-1", rule)
        assert (outcome.lower_bound > -rule.margin) == (outcome.p_non_inferior < rule.alpha), (b, c)


def test_inconclusive_says_how_many_more_records_would_settle_it():
    new = np.array([True] * 6 + [False] * 2 + [True] * 52)  # +4 points on 60 records
    old = np.array([False] * 6 + [True] * 2 + [True] * 52)
    outcome = paired_test(new, old, "top-1", NonInferiority(0.02, 0.05, 50))
    assert outcome.verdict == INCONCLUSIVE and outcome.more_records > 0
    n = outcome.records + outcome.more_records
    scaled = paired_test(np.resize(new, n), np.resize(old, n), "top-1")  # the same rates
    assert scaled.records == n


def test_too_few_records_is_not_enough_field_data():
    outcome = paired_test(np.ones(10, bool), np.zeros(10, bool), "top-1")
    assert outcome.verdict == INSUFFICIENT
    assert "not enough field data to judge" in outcome.sentence(NonInferiority())


def test_replay_regression_blocks_even_when_the_test_split_agrees():
    same = evaluation({})
    worse = compare([True] * 70 + [False] * 20 + [True] * 10, [True] * 100)
    assert worse.verdict == WORSE
    decision = decide(same, same, GateConfig(), worse)
    assert not decision.passed and decision.table["ok"].all()  # the test split alone passes
    assert any(r.startswith("replay automatic accuracy") and "worse" in r for r in decision.reasons)


def test_gate_without_enough_field_data_says_so():
    same = evaluation({})
    few = compare([True] * 20, [True] * 20)
    lenient = decide(same, same, GateConfig(), few)
    assert lenient.passed and any("not enough field data to judge" in n for n in lenient.notes)
    strict = decide(same, same, GateConfig(require_field_evidence=True), few)
    assert not strict.passed and "not enough field data to judge" in strict.reasons[0]


def test_strict_gate_needs_shown_non_inferiority():
    same = evaluation({})
    unclear = compare(
        [True] * 52 + [True] * 3 + [False] * 5, [True] * 52 + [False] * 3 + [True] * 5
    )
    assert unclear.verdict == INCONCLUSIVE
    assert decide(same, same, GateConfig(), unclear).passed
    assert not decide(same, same, GateConfig(require_field_evidence=True), unclear).passed


def test_replay_tables_per_class_cohort_and_business():
    new_right = [True] * 40 + [False] * 20
    labels = np.array([0] * 30 + [1] * 30)
    new = probs_for([y if r else (y + 1) % 3 for y, r in zip(labels, new_right)])
    old = probs_for(list(labels))
    cohorts = np.array(["x"] * 20 + ["y"] * 40)
    result = compare_on_replay(new, old, labels, CLASSES, cohorts, event_classes=["b"])
    per_class = result.per_class.set_index("label")
    assert per_class.loc["a", "new_accuracy"] == 1.0
    assert per_class.loc["b", "new_accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    assert list(result.per_cohort["cohort"]) == ["x", "y"]
    business = result.business.set_index("metric")
    assert business.loc["missed_event_share", "new"] == pytest.approx(2 / 3, abs=1e-4)
    assert business.loc["missed_event_share", "old"] == 0.0
    assert business.loc["false_alarm_share", "new"] == 0.0  # class-a records stayed a


def test_assisted_accuracy_only_on_the_records_it_may_judge():
    new = probs_for([1] * 60)  # top-2 holds the truth (class 0) on every record: 0.8 / 0.1 / 0.1
    labels = np.zeros(60, dtype=int)
    result = compare_on_replay(new, new, labels, CLASSES, assisted_on=np.arange(60) < 20)
    automatic, assisted = result.outcomes
    assert automatic.records == 60 and assisted.records == 20


def test_worse_on_operator_labels_alone_is_not_worse():
    """Operators label among the old model's suggestions, so their labels favour it: a "worse"
    must also hold on the unbiased (expert) records."""
    new_right = [True] * 40 + [False] * 20 + [True] * 40
    old_right = [True] * 100
    expert = np.array([False] * 60 + [True] * 40)  # the regression sits in operator labels only
    leaning = compare(new_right, old_right, unbiased=expert)
    assert compare(new_right, old_right).verdict == WORSE
    assert leaning.outcomes[0].verdict == INCONCLUSIVE and leaning.verdict != WORSE
    assert any("only with operator labels" in note for note in leaning.notes)
    both = np.array([False] * 30 + [True] * 70)  # experts saw the regression too
    assert compare(new_right, old_right, unbiased=both).outcomes[0].verdict == WORSE


def test_a_test_split_drop_within_noise_passes_and_a_real_collapse_does_not():
    from cvops_pipelines.core.measure.gate import PairedHits

    names = np.array(CLASSES)[LABELS]
    champion = evaluation({})
    two_lost = evaluation({0: 2})  # recall[a] 1.0 -> 0.8: beyond delta, 2 net images
    old = np.ones(len(LABELS), bool)
    new = np.ones(len(LABELS), bool)
    new[np.flatnonzero(LABELS == 0)[:2]] = False
    assert not decide(two_lost, champion).passed  # without the paired outcomes: refused
    paired = decide(two_lost, champion, GateConfig(), paired=PairedHits(names, new, old))
    assert paired.passed and any("within noise" in n and "recall[a]" in n for n in paired.notes)
    collapse = evaluation({0: 8})  # 8 of 10 images of class a lost: McNemar p = 1/256
    new[np.flatnonzero(LABELS == 0)[:8]] = False
    refused = decide(collapse, champion, GateConfig(), paired=PairedHits(names, new, old))
    assert not refused.passed and any(r.startswith("recall[a]") for r in refused.reasons)
