"""A detector challenger against the champion on the dataset version's test split: COCO mAP,
mAP@.5, AP and recall@.5 per class, a precision-recall plot, example boxes, and the gate.

The gate is non-inferiority on the numbers it prints: the challenger's mAP may drop at most
`max_map_drop` below the champion's, and no class's AP more than `max_class_ap_drop`, where a
class counts only with `min_objects` test objects (fewer is noise, said in the notes); and,
replayed paired with the champion on the reviewed production holdout (frames neither trained
on), it must not be shown worse by the exact paired rule the classifier gate uses. The first
detector passes by definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.box_metrics import (
    DetectionReport,
    evaluate_detections,
    frame_right,
    parse_boxes,
)
from cvops_pipelines.core.base.handoffs import EvaluationRecord, TrainedModelRecord
from cvops_pipelines.core.base.plots import boxes_png, precision_recall_png
from cvops_pipelines.core.build.detection_run import load_scenes, predict
from cvops_pipelines.core.measure.gate import GateDecision, gate_row
from cvops_pipelines.edge.preprocess import load_rgb


@dataclass(frozen=True)
class DetectionGateConfig:
    max_map_drop: float = 0.02
    max_class_ap_drop: float = 0.05
    min_objects: int = 5  # test objects a class needs before its AP can block


@dataclass
class DetectionEvaluation:
    challenger_version: str
    champion_version: str | None
    mine: DetectionReport
    theirs: DetectionReport | None
    test_images: int
    per_class: pd.DataFrame
    gate: GateDecision
    pr_png: bytes
    examples_png: bytes
    replayed: object = None  # PairedOutcome on the production holdout, when there was one

    def record(self, task: str, model_name: str, trained: TrainedModelRecord) -> EvaluationRecord:
        def headline(report: DetectionReport) -> dict[str, float]:
            return {"map": round(report.map, 4), "map_50": round(report.map_50, 4)}

        return EvaluationRecord(
            task=task,
            model_name=model_name,
            challenger_version=self.challenger_version,
            champion_version=self.champion_version,
            run_id=trained.run_id,
            dataset_version=trained.dataset_version,
            test_images=self.test_images,
            challenger=headline(self.mine),
            champion=headline(self.theirs) if self.theirs else None,
            gate_passed=self.gate.passed,
            gate_reasons=list(self.gate.reasons),
            replay=None if self.replayed is None else [self.replayed.as_row()],
        )


def per_class_table(mine: DetectionReport, theirs: DetectionReport | None) -> pd.DataFrame:
    rows = []
    for name in sorted(mine.objects):
        row = {
            "class": name,
            "test_objects": mine.objects[name],
            "ap": mine.ap_per_class.get(name, math.nan),
            "recall_50": mine.recall_50.get(name, math.nan),
        }
        if theirs is not None:
            row["champion_ap"] = theirs.ap_per_class.get(name, math.nan)
            row["ap_change"] = row["ap"] - row["champion_ap"]
        rows.append(row)
    return pd.DataFrame(rows).round(4)


def decide(
    mine: DetectionReport,
    theirs: DetectionReport | None,
    config: DetectionGateConfig,
    replayed=None,
) -> GateDecision:
    """The classifier gate's decision, on box figures: mAP and each class's AP within their
    limits (a class with too few test objects does not block), and the paired replay on the
    production holdout refusing a challenger shown worse. `replayed`: None, nothing to
    replay."""
    from cvops_pipelines.core.measure.replay import INSUFFICIENT, WORSE

    notes = []
    if theirs is None:
        table = pd.DataFrame(
            [{"metric": "map", "challenger": round(mine.map, 4), "champion": None, "ok": True}]
        )
        return GateDecision(
            True, ["first detector: passes by definition"], table, first_model=True, notes=notes
        )
    rows = [
        gate_row("map", mine.map, theirs.map, config.max_map_drop),
        gate_row("map_50 (info)", mine.map_50, theirs.map_50, None),
    ]
    reasons, passed = [], True
    if replayed is None:
        notes.append("no reviewed production frames in the holdout to replay")
    elif replayed.verdict == WORSE:
        passed = False
        reasons.append(
            f"replayed on {replayed.records} reviewed holdout frames it never trained on, the "
            f"challenger answers {replayed.new_accuracy:.3f} of them right, the champion "
            f"{replayed.old_accuracy:.3f} (exact McNemar p={replayed.p_worse:.3g}): worse"
        )
    elif replayed.verdict == INSUFFICIENT:
        notes.append(f"{replayed.records} reviewed holdout frames: not enough field data to judge")
    else:
        notes.append(
            f"replayed on {replayed.records} holdout frames: {replayed.new_accuracy:.3f} vs "
            f"{replayed.old_accuracy:.3f} right ({replayed.verdict})"
        )
    drop = theirs.map - mine.map
    if drop > config.max_map_drop:
        passed = False
        reasons.append(
            f"mAP {mine.map:.4f} is {drop:.4f} below the champion's {theirs.map:.4f} "
            f"(limit {config.max_map_drop})"
        )
    else:
        reasons.append(
            f"mAP {mine.map:.4f} vs champion {theirs.map:.4f}: within {config.max_map_drop}"
        )
    for name, objects in sorted(mine.objects.items()):
        ours, old = mine.ap_per_class.get(name, math.nan), theirs.ap_per_class.get(name, math.nan)
        if math.isnan(ours) or math.isnan(old):
            continue
        row = gate_row(f"ap[{name}]", ours, old, config.max_class_ap_drop)
        rows.append(row)
        if old - ours > config.max_class_ap_drop:
            if objects < config.min_objects:
                row["ok"] = True  # too few test objects to block
                notes.append(
                    f"class {name!r} AP {ours:.3f} vs {old:.3f}, but only {objects} test "
                    f"objects (< {config.min_objects}): not blocking"
                )
                continue
            passed = False
            reasons.append(
                f"class {name!r} AP {ours:.4f} is {old - ours:.4f} below the champion's "
                f"{old:.4f} (limit {config.max_class_ap_drop})"
            )
    if passed:
        reasons.append(f"no class's AP dropped more than {config.max_class_ap_drop}")
    return GateDecision(passed, reasons, pd.DataFrame(rows), notes=notes, replay=None)


def replay_holdout(challenger, champion, store, replay: pd.DataFrame, rule):
    """Both detectors on the reviewed holdout frames (never trained on), each answering at its
    own operating point; a frame is right when the answer is the reviewed box set. None when
    there is nothing to replay."""
    from cvops_pipelines.core.measure.replay import paired_test

    if replay is None or not len(replay) or "boxes" not in replay:
        return None
    frames = replay[replay["holdout"].astype(bool) & replay["boxes"].notna()]
    frames = frames.drop_duplicates("image_id")
    if frames.empty:
        return None
    images = [np.asarray(load_rgb(store.read_bytes(k))) for k in frames["key"]]
    truth = [parse_boxes(t) for t in frames["boxes"]]

    def hits(loaded):
        threshold = loaded.preprocess.answer_threshold
        found = predict(loaded.model, images, loaded.preprocess)
        answers = [
            [
                {"label": c, "score": float(s), "box": list(map(float, b))}
                for b, s, c in zip(f["boxes"], f["scores"], f["labels"])
                if s >= threshold
            ]
            for f in found
        ]
        return np.array([frame_right(a, t) for a, t in zip(answers, truth)], bool)

    return paired_test(hits(challenger), hits(champion), "holdout frames answered right", rule)


def evaluate_detector(
    challenger,
    champion,
    store,
    rows: pd.DataFrame,
    config: DetectionGateConfig,
    examples: int = 6,
    replay: pd.DataFrame | None = None,
    rule=None,
) -> DetectionEvaluation:
    """`challenger`, `champion`: LoadedModel (champion None, or not a detector: no comparison);
    `replay`: the replay set (its reviewed holdout frames are replayed, paired, under `rule`)."""
    test = rows[rows["split"] == "test"]
    if test.empty:
        raise ValueError(f"dataset version {rows['dataset_version'].iloc[0]} has no test images")
    images, truths = load_scenes(store, test)
    classes = list(challenger.preprocess.classes)
    found = predict(challenger.model, images, challenger.preprocess)
    mine = evaluate_detections(found, truths, classes)
    theirs = None
    if champion is not None and getattr(champion.preprocess, "task", "") == "detection":
        old = predict(champion.model, images, champion.preprocess)
        known = [c for c in classes if c in champion.preprocess.classes]
        keep = lambda d: {  # noqa: E731 - score the champion on the classes it knows
            "boxes": np.asarray(d["boxes"]).reshape(-1, 4)[np.isin(d["labels"], known)],
            "scores": np.asarray(d["scores"])[np.isin(d["labels"], known)],
            "labels": [c for c in d["labels"] if c in known],
        }
        theirs = evaluate_detections([keep(d) for d in old], truths, classes)
    replayed = (
        replay_holdout(challenger, champion, store, replay, rule)
        if theirs is not None and rule is not None
        else None
    )
    order = np.argsort([-len(t["labels"]) for t in truths], kind="stable")[:examples]
    shown = [
        (
            images[i],
            truths[i],
            _confident(found[i], 0.3),
            f"{test['image_id'].iloc[i][:10]}… {len(truths[i]['labels'])} true",
        )
        for i in order
    ]
    return DetectionEvaluation(
        challenger.version,
        champion.version if theirs is not None else None,
        mine,
        theirs,
        len(test),
        per_class_table(mine, theirs),
        decide(mine, theirs, config, replayed),
        precision_recall_png(mine.pr_50, f"v{challenger.version}: precision-recall at IoU 0.5"),
        boxes_png(shown),
        replayed,
    )


def _confident(prediction: dict, floor: float) -> dict:
    """What an example image shows: boxes scored at least `floor` (the list goes to 0.05)."""
    keep = np.asarray(prediction["scores"]) >= floor
    return {
        "boxes": np.asarray(prediction["boxes"]).reshape(-1, 4)[keep],
        "scores": np.asarray(prediction["scores"])[keep],
        "labels": [c for c, k in zip(prediction["labels"], keep) if k],
    }


def log_detection_evaluation(tracking, run_id: str, evaluation: DetectionEvaluation) -> None:
    tracking.log_metric(run_id, "test_map", evaluation.mine.map)
    tracking.log_metric(run_id, "test_map_50", evaluation.mine.map_50)
    tracking.log_files(
        run_id,
        "evaluation",
        {
            "precision_recall.png": evaluation.pr_png,
            "examples.png": evaluation.examples_png,
            "per_class.csv": evaluation.per_class.to_csv(index=False).encode(),
        },
    )
