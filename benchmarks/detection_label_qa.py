"""Label QA for boxes: does it find dropped, shifted and swapped boxes, and how does it compare
with cleanlab's `object_detection`, at its defaults and at its best threshold, on the same
out-of-fold predictions?

The project's scenes (`demo/scenes.py`) with their true boxes; then, of all true boxes, 10%
dropped, 10% shifted (IoU < 0.5 with the truth) and 10% given another class. A detector is
trained per fold on the other folds' noisy labels (as it would be in practice) and predicts the
held-out fold: out-of-fold predictions. Both methods read the same predictions:
- cvops: `core/curate/box_qa.review_boxes` at the reviewer's operating point (its best-F1 score
  threshold against the labels it has, as training sets it), the asset's default;
- cleanlab 2.x: `cleanlab.object_detection` per-box scores for each issue type, flagged with the
  thresholds `find_label_issues` uses by default (its per-class AP scaling and 0.8 factors), and
  the same scores at each type's best threshold (the best F1 against the injected errors: chosen
  with the answers, so an upper bound on any threshold, not a setting a user could pick).
Per issue type: precision (flags that are injected errors of that type) and recall (injected
errors of that type flagged). A dropped box counts as found when a flagged predicted box
overlaps it at IoU >= 0.5; a shifted or swapped box when that given box is flagged.
"""

import time

import numpy as np

from cvops_pipelines.core.base.box_metrics import operating_point
from cvops_pipelines.core.build.detection_run import predict
from cvops_pipelines.core.build.detection_training import (
    DetectorConfig,
    DetectorSpec,
    train_detector,
)
from cvops_pipelines.core.curate.detection_label_qa import (
    BoxQAConfig,
    review_boxes,
    reviewer_agreement,
)
from cvops_pipelines.demo.scenes import CLASSES, scenes
from cvops_pipelines.edge.detect import box_iou

TYPES = ("overlooked", "badly_located", "swapped_class")


def corrupt(items, rng, share: float = 0.1):
    """(given labels per image, dropped truth boxes per image, error type per given box)."""
    flat = [(i, j) for i, s in enumerate(items) for j in range(len(s.labels))]
    order = rng.permutation(len(flat))
    k = int(round(share * len(flat)))
    dropped = {flat[n] for n in order[:k]}
    shifted = {flat[n] for n in order[k : 2 * k]}
    swapped = {flat[n] for n in order[2 * k : 3 * k]}
    given, lost, kinds = [], [], []
    for i, s in enumerate(items):
        boxes, labels, types, gone = [], [], [], []
        side = s.image.shape[1]
        for j, (box, label) in enumerate(zip(s.boxes, s.labels)):
            if (i, j) in dropped:
                gone.append(box)
                continue
            kind = None
            if (i, j) in shifted:
                box, kind = _shift(box, side, rng), "badly_located"
            elif (i, j) in swapped:
                label = str(rng.choice([c for c in CLASSES if c != label]))
                kind = "swapped_class"
            boxes.append(np.asarray(box, np.float64))
            labels.append(label)
            types.append(kind)
        given.append((np.array(boxes).reshape(-1, 4), labels))
        lost.append(np.array(gone).reshape(-1, 4))
        kinds.append(types)
    return given, lost, kinds


def _shift(box, side, rng):
    w, h = box[2] - box[0], box[3] - box[1]
    for scale in (0.6, 0.8, 1.0, 1.3):
        dx, dy = rng.choice([-1, 1], 2) * np.array([w, h]) * scale
        moved = np.array([box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy])
        moved = np.clip(moved, 0, side)
        if moved[2] - moved[0] > 2 and moved[3] - moved[1] > 2 and box_iou(moved, box)[0, 0] < 0.5:
            return moved
    return np.array([0, 0, max(3, w / 2), max(3, h / 2)])


def out_of_fold(items, given, folds: int, config: DetectorConfig) -> list[dict]:
    index = {c: i + 1 for i, c in enumerate(CLASSES)}
    out = [None] * len(items)
    spec = DetectorSpec.of(config, CLASSES)
    for fold in range(folds):
        train = [i for i in range(len(items)) if i % folds != fold]
        model = train_detector(
            [items[i].image for i in train],
            [given[i][0] for i in train],
            [[index[c] for c in given[i][1]] for i in train],
            len(CLASSES),
            config,
        )
        held = [i for i in range(len(items)) if i % folds == fold]
        for i, found in zip(held, predict(model, [items[i].image for i in held], spec)):
            out[i] = found
    return out


def pool_frame(given, items):
    import json

    import pandas as pd

    return pd.DataFrame(
        {
            "image_id": [f"img{i:05d}" for i in range(len(items))],
            "label": "",
            "boxes": [
                json.dumps([{"label": c, "box": [float(v) for v in b]} for b, c in zip(*g)])
                for g in given
            ],
            "n_votes": 1,
            "agreement": 1.0,
        }
    )


def _injected(kind: str, lost, kinds) -> int:
    if kind == "overlooked":
        return sum(len(x) for x in lost)
    return sum(k.count(kind) for k in kinds)


def _hit(kind: str, image: int, ref, lost, kinds):
    """The injected error a flag finds, or None. `ref`: for overlooked the suggested box (an
    array), else the index of the given box flagged."""
    if kind != "overlooked":
        return (image, ref) if kinds[image][ref] == kind else None
    if not len(lost[image]):
        return None
    overlap = box_iou(ref, lost[image])[0]
    j = int(np.argmax(overlap))
    return (image, j) if overlap[j] >= 0.5 else None


def _figures(injected: int, flagged: int, hits: int, found: int) -> dict:
    return {
        "injected": injected,
        "flagged": flagged,
        "precision": round(hits / flagged, 4) if flagged else None,
        "recall": round(found / injected, 4) if injected else None,
    }


def score(flags: dict[str, list[tuple]], lost, kinds) -> dict:
    """flags[type]: (image, ref) pairs, `ref` as `_hit` reads it."""
    out = {}
    for kind in TYPES:
        keys = [_hit(kind, image, ref, lost, kinds) for image, ref in flags[kind]]
        found = {k for k in keys if k is not None}
        hits = sum(k is not None for k in keys)
        out[kind] = _figures(_injected(kind, lost, kinds), len(keys), hits, len(found))
    return out


def best_cut(candidates: list[tuple], kind: str, lost, kinds) -> dict:
    """A per-box score at its best threshold: flag every box scored at or below t, with t the
    one of best F1 against the injected errors. It takes the answers to choose t, so it bounds
    what any threshold could do; no user could pick it."""
    injected = _injected(kind, lost, kinds)
    ranked = sorted((c for c in candidates if np.isfinite(c[0])), key=lambda c: c[0])
    hits, found, best, best_f1 = 0, set(), _figures(injected, 0, 0, 0), 0.0
    for n, (value, image, ref) in enumerate(ranked, 1):
        key = _hit(kind, image, ref, lost, kinds)
        if key is not None:
            hits += 1
            found.add(key)
        if n < len(ranked) and ranked[n][0] == value:
            continue  # a tie is flagged together
        precision, recall = hits / n, len(found) / injected if injected else 0.0
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        if f1 > best_f1:
            best_f1 = f1
            best = {"threshold": float(value), **_figures(injected, n, hits, len(found))}
    return {**best, "f1": round(best_f1, 4)}


def cvops_flags(given, items, predictions, score: float) -> dict:
    import json

    pool = pool_frame(given, items)
    preds = {f"img{i:05d}": p for i, p in enumerate(predictions)}
    issues = review_boxes(pool, preds, BoxQAConfig().at(score))
    flags = {t: [] for t in TYPES}
    for row in issues.itertuples(index=False):
        if row.issue not in flags:
            continue
        image = int(row.image_id[3:])
        if row.issue == "overlooked":
            flags["overlooked"].append((image, np.array(json.loads(row.suggested_box))))
        else:
            box = np.array(json.loads(row.box))
            boxes = given[image][0]
            j = int(np.argmin(np.abs(boxes - box).sum(axis=1)))  # the given box it names
            flags[row.issue].append((image, j))
    return flags


def cleanlab_scores(given, predictions) -> dict[str, tuple]:
    """cleanlab's per-box scores for each issue type (low: likely an issue), with the per-class
    thresholds and factor its `find_label_issues` flags them by, and the box each score is for:
    type -> (scores per image, thresholds, factor, refs per image)."""
    from cleanlab.internal.constants import (
        ALPHA,
        BADLOC_THRESHOLD_FACTOR,
        HIGH_PROBABILITY_THRESHOLD,
        LOW_PROBABILITY_THRESHOLD,
        OVERLOOKED_THRESHOLD_FACTOR,
        SWAP_THRESHOLD_FACTOR,
    )
    from cleanlab.object_detection import filter as cl_filter
    from cleanlab.object_detection.rank import (
        _get_valid_inputs_for_compute_scores,
        _separate_label,
        _separate_prediction,
        compute_badloc_box_scores,
        compute_overlooked_box_scores,
        compute_swap_box_scores,
    )

    labels = [
        {"bboxes": b.astype(np.float32), "labels": np.array([CLASSES.index(c) for c in c_])}
        for b, c_ in given
    ]
    preds = []
    for p in predictions:
        per_class = []
        for name in CLASSES:
            mine = np.array([lab == name for lab in p["labels"]], bool)
            rows = np.hstack([p["boxes"][mine], p["scores"][mine][:, None]]).astype(np.float32)
            per_class.append(rows.reshape(-1, 5))
        array = np.empty(len(CLASSES), dtype=object)
        for k in range(len(CLASSES)):
            array[k] = per_class[k]
        preds.append(array)
    aux = _get_valid_inputs_for_compute_scores(ALPHA, labels, preds)
    per_class_ap = cl_filter._get_per_class_ap(labels, preds)
    pred_thresholds = cl_filter._process_class_list(
        [_separate_prediction(p)[1] for p in preds], per_class_ap
    )
    label_thresholds = cl_filter._process_class_list(
        [_separate_label(label)[1] for label in labels], per_class_ap
    )
    # cleanlab's prediction boxes are in its per-class order; a given box is its index
    predicted = [np.vstack([np.asarray(p[k])[:, :4] for k in range(len(CLASSES))]) for p in preds]
    indices = [list(range(len(b))) for b, _ in given]
    return {
        "overlooked": (
            compute_overlooked_box_scores(
                alpha=ALPHA,
                high_probability_threshold=HIGH_PROBABILITY_THRESHOLD,
                auxiliary_inputs=aux,
            ),
            pred_thresholds,
            OVERLOOKED_THRESHOLD_FACTOR,
            [list(b) for b in predicted],
        ),
        "badly_located": (
            compute_badloc_box_scores(
                alpha=ALPHA,
                low_probability_threshold=LOW_PROBABILITY_THRESHOLD,
                auxiliary_inputs=aux,
            ),
            label_thresholds,
            BADLOC_THRESHOLD_FACTOR,
            indices,
        ),
        "swapped_class": (
            compute_swap_box_scores(
                alpha=ALPHA,
                high_probability_threshold=HIGH_PROBABILITY_THRESHOLD,
                overlapping_label_check=True,
                auxiliary_inputs=aux,
            ),
            label_thresholds,
            SWAP_THRESHOLD_FACTOR,
            indices,
        ),
    }


def cleanlab_flags(scores: dict[str, tuple]) -> dict:
    """What `find_label_issues` flags by default, type by type."""
    from cleanlab.object_detection import filter as cl_filter

    flags = {}
    for kind, (per_box, thresholds, factor, refs) in scores.items():
        flagged = cl_filter._find_label_issues_per_box(per_box, thresholds, factor)
        flags[kind] = [
            (image, refs[image][j])
            for image, marks in enumerate(flagged)
            for j in np.nonzero(np.asarray(marks, bool))[0]
        ]
    return flags


def cleanlab_best(scores: dict[str, tuple], lost, kinds) -> dict:
    return {
        kind: best_cut(
            [
                (float(v), image, refs[image][j])
                for image, values in enumerate(per_box)
                for j, v in enumerate(np.asarray(values, float))
            ],
            kind,
            lost,
            kinds,
        )
        for kind, (per_box, _, _, refs) in scores.items()
    }


def run(quick: bool = False) -> dict:
    n, epochs, folds = (40, 1, 2) if quick else (300, 15, 2)
    items = scenes(n, seed=11)
    rng = np.random.default_rng(0)
    given, lost, kinds = corrupt(items, rng)
    config = DetectorConfig(epochs=epochs, batch_size=8)
    started = time.time()
    predictions = out_of_fold(items, given, folds, config)
    train_s = time.time() - started
    for p in predictions:
        p["boxes"] = np.asarray(p["boxes"], np.float64).reshape(-1, 4)
        p["scores"] = np.asarray(p["scores"], np.float64)
    # the reviewer's operating point, as training sets it: best F1 against the labels it has
    # (here the noisy ones: the benchmark's reviewer never sees the truth)
    truths = [{"boxes": b, "labels": c} for b, c in given]
    point = operating_point(predictions, truths, CLASSES)
    agreement = reviewer_agreement(
        pool_frame(given, items),
        {f"img{i:05d}": p for i, p in enumerate(predictions)},
        BoxQAConfig().at(point.threshold),
    )
    started = time.time()
    ours = score(cvops_flags(given, items, predictions, point.threshold), lost, kinds)
    ours_s = time.time() - started
    started = time.time()
    cleanlab = cleanlab_scores(given, predictions)
    theirs = score(cleanlab_flags(cleanlab), lost, kinds)
    theirs_s = time.time() - started
    theirs_best = cleanlab_best(cleanlab, lost, kinds)
    return {
        "images": n,
        "true_boxes": int(sum(len(s.labels) for s in items)),
        "folds": folds,
        "epochs_per_fold": epochs,
        "out_of_fold_training_s": round(train_s, 1),
        "reviewer_operating_point": round(point.threshold, 4),
        # the asset's guard: below min_reviewer_f1 it withholds the flags scored below
        "reviewer_agreement": {
            "f1": round(agreement.f1, 4),
            "precision": round(agreement.precision, 4),
            "recall": round(agreement.recall, 4),
            "min_f1": agreement.min_f1,
            "flags_withheld": not agreement.can_judge,
        },
        "cvops": ours,
        "cvops_s": round(ours_s, 2),
        "cleanlab_defaults": theirs,
        # its scores at the threshold of best F1, chosen with the answers (a bound, not a setting)
        "cleanlab_best_threshold": theirs_best,
        "cleanlab_s": round(theirs_s, 2),
    }
