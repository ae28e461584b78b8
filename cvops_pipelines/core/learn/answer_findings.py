"""What one sub-batch of answers says before the next goes out: do annotators agree with each
other, how often do they overrule the model's pre-filled answer, and which classes trade places.
Read straight from Label Studio's task JSON (a choice or rectangles per answer), so it needs no
ingest and works for either kind of label: a choice is an answer with one unboxed label, and
rectangles are boxed labels matched by IoU."""

from __future__ import annotations

from collections import Counter

import numpy as np

from cvops_pipelines.edge.detect import box_iou

NOTHING = "(nothing)"  # the other side has no object here
MATCH_IOU = 0.5

Box = tuple[float, float, float, float]
Answer = list[tuple[str, Box | None]]


def answer_of(result: list[dict]) -> Answer:
    """A Label Studio result as (label, box in percent or None); [] means nothing to label.
    A part in a shape Label Studio does not write counts as no answer here (the ingest
    quarantines it with the reason)."""
    out: Answer = []
    for item in result if isinstance(result, list) else []:
        value = item.get("value") if isinstance(item, dict) else None
        value = value if isinstance(value, dict) else {}
        boxed, choices = value.get("rectanglelabels"), value.get("choices")
        if isinstance(boxed, list):
            try:
                x, y = float(value.get("x", 0)), float(value.get("y", 0))
                w, h = float(value.get("width", 0)), float(value.get("height", 0))
            except (TypeError, ValueError):
                continue
            out += [(str(label), (x, y, x + w, y + h)) for label in boxed]
        elif isinstance(choices, list):
            out += [(str(label), None) for label in choices]
    return out


def pairs(a: Answer, b: Answer) -> list[tuple[str, str]]:
    """(a's label, b's label) for every object of either: unboxed labels pair in order, boxes
    greedily by IoU (highest first, each box once, at least 0.5); an object the other side lacks
    pairs with NOTHING."""
    labels_a = [label for label, box in a if box is None]
    labels_b = [label for label, box in b if box is None]
    out = list(zip(labels_a, labels_b))
    out += [(x, NOTHING) for x in labels_a[len(out) :]]
    out += [(NOTHING, y) for y in labels_b[len(labels_a) :]]
    boxed_a = [(label, box) for label, box in a if box is not None]
    boxed_b = [(label, box) for label, box in b if box is not None]
    taken_a: set[int] = set()
    taken_b: set[int] = set()
    if boxed_a and boxed_b:
        iou = box_iou(np.array([x[1] for x in boxed_a]), np.array([x[1] for x in boxed_b]))
        for flat in np.argsort(-iou, axis=None, kind="stable"):
            i, j = (int(k) for k in np.unravel_index(flat, iou.shape))
            if iou[i, j] < MATCH_IOU:
                break
            if i not in taken_a and j not in taken_b:
                taken_a.add(i)
                taken_b.add(j)
                out.append((boxed_a[i][0], boxed_b[j][0]))
    out += [(x[0], NOTHING) for k, x in enumerate(boxed_a) if k not in taken_a]
    out += [(NOTHING, x[0]) for k, x in enumerate(boxed_b) if k not in taken_b]
    return out


def same(a: Answer, b: Answer) -> bool:
    return all(x == y for x, y in pairs(a, b))


def findings(tasks: list[dict], model: dict[str, list[dict]]) -> dict:
    """One sub-batch's label QA from its tasks (Label Studio's JSON export) and `model`, the
    result the model pre-filled per image id (the export names predictions only by id):
    answered and skipped tasks, annotator agreement where a task has several answers, how
    often the first answer overrules the model, and the model → annotator confusion behind
    those overrules."""
    answered = skipped = multi = agreeing = compared = overruled = 0
    confusion: Counter = Counter()
    annotators: set[str] = set()
    for task in tasks:
        given = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        skipped += len(given) < len(task.get("annotations") or [])
        if not given:
            continue
        answered += 1
        annotators.update(str(a.get("completed_by")) for a in given)
        answers = [answer_of(a.get("result")) for a in given]
        if len(answers) > 1:
            multi += 1
            agreeing += all(same(answers[0], other) for other in answers[1:])
        predicted = model.get((task.get("data") or {}).get("image_id"))
        if predicted is not None:
            compared += 1
            changed = pairs(answer_of(predicted), answers[0])
            overruled += any(x != y for x, y in changed)
            confusion.update((x, y) for x, y in changed if x != y)
    return {
        "tasks": len(tasks),
        "answered": answered,
        "skipped": skipped,
        "annotators": len(annotators),
        "agreement": round(agreeing / multi, 3) if multi else None,
        "tasks_with_several_answers": multi,
        "overruled_model": round(overruled / compared, 3) if compared else None,
        "confusion": [
            {"model": x, "annotator": y, "count": n} for (x, y), n in confusion.most_common(10)
        ],
    }
