"""Does a turn of the detection loop pay? Two turns per seed, the loop's own decisions, an
oracle's audit.

Per seed, in plain core code (the demo runs the same turn through Dagster, once):
1. turn 1: the detection demo's recipe (DetectionDemoConfig) trains on its labelled drop (320
   scenes, split 70/15/15); the operating point is the best validation F1, as in training;
2. the field: 120 frames (noisier, more often empty than the drop) answered at that point; a 30%
   holdout of them by image hash (`in_holdout`), never trained on; operators review 70% of the
   frames (the true boxes); the annotation queue (`detection_queue`, 40 frames: field errors
   first, then uncertainty, then a random share) is answered by the oracle;
3. turn 2: the same recipe on the drop plus every labelled field frame outside the holdout
   (split 70/15/15 like the pool);
4. the gate (`decide`): mAP on the grown test split within its margin, and the paired replay of
   both models on the reviewed holdout frames; then the paired canary: both models replayed on
   the next turn's reviewed frames (120 new frames, 70% reviewed), refused when worse
   (`paired_test`, the canary's non-inferiority rule);
5. the audit: field precision, recall and F1 at IoU 0.5 of the turn-1 model and of the model the
   loop ships (the turn-2 model when the gate passed and the canary did not refuse it, else the
   turn-1 model) on every turn-2 frame, against the oracle's boxes.

Targets (issue 32): mean shipped F1 gain >= +5 points over >= 5 seeds; no seed ships a model whose
F1 is worse than the one it replaced by more than the gate's margin.
"""

import json
from dataclasses import replace

import numpy as np
import pandas as pd

from benchmarks._parallel import side_by_side
from cvops_pipelines.core.base.box_metrics import (
    evaluate_detections,
    field_scores,
    frame_right,
    operating_point,
)
from cvops_pipelines.core.build.detection_run import fit_scenes, predict
from cvops_pipelines.core.build.detection_training import DetectorConfig
from cvops_pipelines.core.curate.replay_set import in_holdout
from cvops_pipelines.core.learn.detection_active import detection_queue
from cvops_pipelines.core.measure.detection_evaluation import DetectionGateConfig, decide
from cvops_pipelines.core.measure.replay import WORSE, NonInferiority, paired_test
from cvops_pipelines.demo.detection import DetectionDemoConfig
from cvops_pipelines.demo.scenes import CLASSES, SceneConfig, scenes

FIELD = SceneConfig(noise=0.09, p_empty=0.15)
QUEUE = 40
REVIEW = 0.7


def _truth(scene) -> dict:
    return {"boxes": scene.boxes, "labels": list(scene.labels)}


def _boxes(truth: dict) -> list[dict]:
    return [
        {"label": c, "box": list(map(float, b))} for b, c in zip(truth["boxes"], truth["labels"])
    ]


def _split(items: list, seed: int) -> dict[str, list]:
    order = np.random.default_rng(seed).permutation(len(items))
    cut = [int(len(items) * 0.7), int(len(items) * 0.85)]
    parts = np.split(order, cut)
    return {name: [items[i] for i in part] for name, part in zip(("train", "val", "test"), parts)}


def _train(split: dict[str, list], config: DetectorConfig):
    """(model, spec at the validation operating point): what train_detector_tracked does."""
    images, truth = [s.image for s in split["train"]], [_truth(s) for s in split["train"]]
    result = fit_scenes(images, truth, CLASSES, config, "cpu", lambda *_: None)
    val = split["val"]
    found = predict(result.model, [s.image for s in val], result.preprocess)
    point = operating_point(found, [_truth(s) for s in val], CLASSES)
    return result.model, replace(result.preprocess, answer_threshold=point.threshold)


def _answers(model, spec, frames) -> list[list[dict]]:
    found = predict(model, [f.image for f in frames], spec)
    return [
        [
            {"label": c, "box": list(map(float, b)), "score": float(s)}
            for b, s, c in zip(f["boxes"], f["scores"], f["labels"])
            if s >= spec.answer_threshold
        ]
        for f in found
    ]


def _queue(frames, ids, answers, reviewed, seed: int, threshold: float) -> set[str]:
    """The image ids the annotation queue asks for (the pipeline's ranking)."""
    records = pd.DataFrame(
        [
            {
                "image_id": image_id,
                "release": "r1",
                "boxes": json.dumps(answer),
                "corrected_boxes": json.dumps(_boxes(_truth(frame)))
                if image_id in reviewed
                else None,
                "predicted": None,
                "record_id": image_id,
                "device_id": "cam",
                "width": frame.image.shape[1],
                "height": frame.image.shape[0],
                "uri": "",
                "key": "",
            }
            for frame, image_id, answer in zip(frames, ids, answers)
        ]
    )
    queue = detection_queue(records, set(), QUEUE, 0.2, seed=seed, thresholds={"r1": threshold})
    return set(queue["image_id"])


def one_seed(seed: int, config: DetectorConfig, demo: DetectionDemoConfig) -> dict:
    rng = np.random.default_rng(seed)
    drop = _split(scenes(demo.scenes, seed), seed)
    first, spec1 = _train(drop, config)
    # the field of turn 1: answered, part held out, part reviewed, the queue answered
    frames = scenes(demo.frames, seed + 7919, FIELD)
    ids = [f"s{seed}-f1-{i}" for i in range(len(frames))]
    answers = _answers(first, spec1, frames)
    reviewed = {i for i in ids if rng.random() < REVIEW}
    queued = _queue(frames, ids, answers, reviewed, seed, spec1.answer_threshold)
    labelled = reviewed | queued
    holdout = {i for i in ids if in_holdout(i)}
    grown = _split([f for f, i in zip(frames, ids) if i in labelled - holdout], seed + 1)
    pool = {k: drop[k] + grown[k] for k in drop}
    second, spec2 = _train(pool, replace(config, seed=config.seed + 1))
    # the gate: the grown test split, and the reviewed holdout frames replayed, paired
    test = pool["test"]
    mine, theirs = (
        evaluate_detections(
            predict(m, [s.image for s in test], sp), [_truth(s) for s in test], CLASSES
        )
        for m, sp in ((second, spec2), (first, spec1))
    )
    rule = NonInferiority()
    replay = [f for f, i in zip(frames, ids) if i in holdout and i in reviewed]
    replayed = None
    if replay:
        truth = [_boxes(_truth(f)) for f in replay]
        right = [
            np.array([frame_right(a, t) for a, t in zip(_answers(m, sp, replay), truth)])
            for m, sp in ((second, spec2), (first, spec1))
        ]
        replayed = paired_test(right[0], right[1], "holdout frames answered right", rule)
    gate = decide(mine, theirs, DetectionGateConfig(), replayed)
    # the next turn's frames: the canary's reviewed share, and the audit of every frame
    later = scenes(demo.frames, seed + 2 * 7919, FIELD)
    truth = [_boxes(_truth(f)) for f in later]
    new, old = _answers(second, spec2, later), _answers(first, spec1, later)
    canary = None
    if gate.passed:
        looked = [i for i in range(len(later)) if rng.random() < REVIEW]
        canary = paired_test(
            np.array([frame_right(new[i], truth[i]) for i in looked]),
            np.array([frame_right(old[i], truth[i]) for i in looked]),
            "reviewed frames answered right",
            rule,
        ).verdict
    shipped = gate.passed and canary != WORSE
    before, after = field_scores(old, truth), field_scores(new, truth)
    gain = (after["f1"] - before["f1"]) if shipped else 0.0
    return {
        "seed": seed,
        "turn1": {"test_map": round(theirs.map, 4), **_round(before)},
        "turn2": {"test_map": round(mine.map, 4), **_round(after)},
        "field_frames_labelled": len(labelled),
        "field_frames_trained": len(labelled - holdout),
        "gate_passed": gate.passed,
        "gate_reasons": gate.reasons,
        "replay": replayed.verdict if replayed else None,
        "canary": canary,
        "shipped": "turn 2" if shipped else "turn 1",
        "shipped_f1_gain": round(gain, 4),
        "turn2_f1_gain_unshipped": round(after["f1"] - before["f1"], 4),
    }


def _round(scores: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}


def run(quick: bool = False) -> dict:
    demo = DetectionDemoConfig()
    if quick:
        demo = DetectionDemoConfig(scenes=48, frames=24, epochs=1)
    config = DetectorConfig(epochs=demo.epochs, learning_rate=demo.learning_rate)
    seeds = [0, 1] if quick else [0, 1, 2, 3, 4]
    rows = []
    for row in side_by_side(one_seed, [(s, replace(config, seed=s), demo) for s in seeds]):
        rows.append(row)
        print(row, flush=True)
    rows.sort(key=lambda r: r["seed"])
    gains = [r["shipped_f1_gain"] for r in rows]
    margin = NonInferiority().margin
    return {
        "recipe": {"epochs": config.epochs, "learning_rate": config.learning_rate},
        "seeds": rows,
        "mean_shipped_f1_gain": round(float(np.mean(gains)), 4),
        "worst_shipped_f1_change": round(float(np.min(gains)), 4),
        "gate_margin": margin,
        "target": {"mean_shipped_f1_gain": 0.05, "worst_shipped_f1_change": -margin},
        "target_met": float(np.mean(gains)) >= 0.05 and min(gains) >= -margin,
    }
