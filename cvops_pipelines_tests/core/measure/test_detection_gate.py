"""The detection gate decides on the numbers it prints."""

import math

from cvops_pipelines.core.base.box_metrics import DetectionReport
from cvops_pipelines.core.measure.detection_evaluation import (
    DetectionGateConfig,
    decide,
    per_class_table,
)


def report(map_, ap: dict[str, float], objects: dict[str, int]) -> DetectionReport:
    return DetectionReport(map_, map_ + 0.2, ap, dict.fromkeys(ap, 0.5), objects)


OBJECTS = {"3": 20, "7": 20, "9": 3}
CHAMPION = report(0.40, {"3": 0.40, "7": 0.40, "9": 0.40}, OBJECTS)


def test_the_first_detector_passes_by_definition():
    gate = decide(report(0.01, {"3": 0.0}, {"3": 5}), None, DetectionGateConfig())
    assert gate.passed and gate.first_model


def test_a_map_drop_beyond_the_limit_blocks_and_says_by_how_much():
    worse = report(0.35, {"3": 0.40, "7": 0.40, "9": 0.40}, OBJECTS)
    gate = decide(worse, CHAMPION, DetectionGateConfig(max_map_drop=0.02))
    assert not gate.passed
    assert "0.0500 below the champion's 0.4000" in gate.reasons[0]
    assert decide(worse, CHAMPION, DetectionGateConfig(max_map_drop=0.06)).passed


def test_a_class_drop_blocks_only_with_enough_test_objects():
    one_class_worse = report(0.40, {"3": 0.30, "7": 0.40, "9": 0.40}, OBJECTS)
    gate = decide(one_class_worse, CHAMPION, DetectionGateConfig())
    assert not gate.passed and any("class '3'" in r for r in gate.reasons)
    rare_class_worse = report(0.40, {"3": 0.40, "7": 0.40, "9": 0.10}, OBJECTS)
    gate = decide(rare_class_worse, CHAMPION, DetectionGateConfig(min_objects=5))
    assert gate.passed and any("only 3 test objects" in n for n in gate.notes)


def test_the_side_by_side_table_is_the_numbers_the_gate_read():
    mine = report(0.40, {"3": 0.30, "7": 0.45, "9": math.nan}, OBJECTS)
    table = per_class_table(mine, CHAMPION).set_index("class")
    assert table.loc["3", "ap_change"] == -0.1 and table.loc["7", "ap_change"] == 0.05
    assert table.loc["9", "test_objects"] == 3


def test_a_challenger_shown_worse_on_the_production_holdout_is_refused():
    import numpy as np

    from cvops_pipelines.core.measure.replay import NonInferiority, paired_test

    same = report(0.40, {"3": 0.40, "7": 0.40, "9": 0.40}, OBJECTS)
    rule = NonInferiority(margin=0.02, alpha=0.05, min_records=30)
    old = np.ones(60, bool)
    new = old.copy()
    new[:15] = False  # 15 frames the champion answers right and the challenger does not
    worse = paired_test(new, old, "holdout frames answered right", rule)
    gate = decide(same, CHAMPION, DetectionGateConfig(), worse)
    assert not gate.passed and "worse" in gate.reasons[0] and "60 reviewed" in gate.reasons[0]
    few = paired_test(new[:10], old[:10], "holdout frames answered right", rule)
    gate = decide(same, CHAMPION, DetectionGateConfig(), few)
    assert gate.passed and any("not enough field data" in n for n in gate.notes)
