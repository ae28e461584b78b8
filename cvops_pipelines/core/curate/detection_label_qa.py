"""Label QA for boxes: overlooked objects, badly located boxes, swapped classes, duplicates and
annotator disagreement, each with a severity in [0, 1] and a suggested fix.

Model-based signals compare the given boxes with a detector's predictions on the same image
(out-of-fold, or a model that did not train on the image). Each image is judged on its own
boxes and predictions only, with thresholds from `BoxQAConfig`: the same image gets the same
verdict whether it is reviewed alone or in a batch of thousands (cleanlab's scores for object
detection depend on the batch, and its thresholds are fixed in code).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from cvops_pipelines.core.curate.detection_pool import decode
from cvops_pipelines.core.curate.label_qa import REVIEW_COLUMNS
from cvops_pipelines.edge.detect import box_iou

ISSUES = ("overlooked", "badly_located", "swapped_class", "duplicate_box", "annotator_disagreement")
ISSUE_COLUMNS = [
    "image_id",
    "issue",
    "label",
    "suggested_label",
    "box",
    "suggested_box",
    "severity",
    "details",
]


@dataclass(frozen=True)
class BoxQAConfig:
    match_iou: float = 0.5  # a prediction at this IoU or more is the same object
    min_overlap: float = 0.1  # below this a prediction is about another object entirely
    overlooked_score: float = 0.5  # an unmatched prediction this confident: a missing box
    location_score: float = 0.5  # a same-class prediction this confident re-locates a box
    swap_score: float = 0.5  # another class this confident on the same object: a swap
    duplicate_iou: float = 0.9  # two given boxes of one class this close: a double click
    # the reviewer's answer must agree with the given boxes this well (F1 at match_iou) before
    # its disagreements are worth a reviewer's time: below, they are mostly its own errors
    min_reviewer_f1: float = 0.6

    def at(self, score: float) -> BoxQAConfig:
        """The same checks with every score threshold at `score`: a reviewer's operating point
        (its best-F1 threshold on validation), where its scores mean "there is an object".
        A young detector rarely scores 0.5, let alone cleanlab's fixed 0.95."""
        return replace(self, overlooked_score=score, location_score=score, swap_score=score)


def _issue(image_id, issue, label, suggested, box, suggested_box, severity, details) -> dict:
    as_list = lambda b: json.dumps([round(float(v), 1) for v in b]) if b is not None else ""  # noqa: E731
    return {
        "image_id": image_id,
        "issue": issue,
        "label": label,
        "suggested_label": suggested,
        "box": as_list(box),
        "suggested_box": as_list(suggested_box),
        "severity": float(np.clip(severity, 0, 1)),
        "details": details,
    }


def given_box_issues(image_id: str, boxes_json: str, config: BoxQAConfig) -> list[dict]:
    """What needs no model: the same object boxed twice with one class."""
    boxes, labels = decode(boxes_json)
    out = []
    overlap = box_iou(boxes, boxes)
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            if labels[i] == labels[j] and overlap[i, j] >= config.duplicate_iou:
                out.append(
                    _issue(
                        image_id,
                        "duplicate_box",
                        labels[j],
                        "",
                        boxes[j],
                        None,
                        overlap[i, j],
                        f"IoU {overlap[i, j]:.2f} with another {labels[i]!r} box: delete one",
                    )
                )
    return out


def predicted_box_issues(
    image_id: str,
    boxes_json: str,
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    pred_labels: list[str],
    config: BoxQAConfig,
) -> list[dict]:
    boxes, labels = decode(boxes_json)
    pred_boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
    pred_scores = np.asarray(pred_scores, np.float64)
    pred_labels = np.asarray(pred_labels, dtype=object)
    overlap = box_iou(boxes, pred_boxes)  # given x predicted
    out, explained = [], set()  # predictions a suggested swap or move already accounts for
    for i, label in enumerate(labels):
        same = pred_labels == label
        matched = same & (overlap[i] >= config.match_iou)
        best_same = float(pred_scores[matched].max()) if matched.any() else 0.0
        other = (~same) & (overlap[i] >= config.match_iou) & (pred_scores >= config.swap_score)
        if other.any():
            j = int(np.argmax(np.where(other, pred_scores, -1)))
            if pred_scores[j] > best_same:
                explained.add(j)
                out.append(
                    _issue(
                        image_id,
                        "swapped_class",
                        label,
                        pred_labels[j],
                        boxes[i],
                        None,
                        pred_scores[j] - best_same,
                        f"the model says {pred_labels[j]!r} ({pred_scores[j]:.2f}) where the "
                        f"label says {label!r} ({best_same:.2f}) at IoU {overlap[i, j]:.2f}",
                    )
                )
                continue
        if matched.any():
            continue
        near = same & (overlap[i] >= config.min_overlap) & (pred_scores >= config.location_score)
        if near.any():
            j = int(np.argmax(np.where(near, pred_scores, -1)))
            explained.add(j)
            out.append(
                _issue(
                    image_id,
                    "badly_located",
                    label,
                    label,
                    boxes[i],
                    pred_boxes[j],
                    pred_scores[j] * (1 - overlap[i, j]),
                    f"the model's {label!r} box ({pred_scores[j]:.2f}) overlaps it only "
                    f"IoU {overlap[i, j]:.2f}: move it",
                )
            )
    covered = (
        (overlap >= config.match_iou).any(axis=0)
        if len(labels)
        else np.zeros(len(pred_scores), bool)
    )
    for j in np.nonzero(~covered & (pred_scores >= config.overlooked_score))[0]:
        if j in explained:
            continue
        out.append(
            _issue(
                image_id,
                "overlooked",
                "",
                pred_labels[j],
                None,
                pred_boxes[j],
                pred_scores[j],
                f"the model finds a {pred_labels[j]!r} ({pred_scores[j]:.2f}) no box covers: "
                "add it",
            )
        )
    return out


@dataclass(frozen=True)
class ReviewerAgreement:
    """How the reviewer's answer (its boxes from the QA's score) agrees with the given boxes
    on the images it scored, at IoU 0.5."""

    precision: float
    recall: float
    f1: float
    images: int
    min_f1: float

    @property
    def can_judge(self) -> bool:
        return self.f1 >= self.min_f1

    def why_not(self) -> str:
        return (
            f"the reviewer's boxes agree with the given ones at F1 {self.f1:.3f} (precision "
            f"{self.precision:.3f}, recall {self.recall:.3f}) on {self.images} images, below "
            f"{self.min_f1}: too weak to judge, so its flags (overlooked, badly located, swapped) "
            "are withheld and only the model-free checks ran"
        )


def reviewer_agreement(
    pool: pd.DataFrame, predictions: dict[str, dict], config: BoxQAConfig = BoxQAConfig()
) -> ReviewerAgreement:
    """The classification guard's rule for boxes: a reviewer that disagrees with most labels
    cannot tell a wrong label from its own mistake, and would flood the review."""
    from cvops_pipelines.core.base.box_metrics import field_scores

    answers, truths = [], []
    for row in pool[pool["image_id"].isin(list(predictions))].itertuples(index=False):
        p = predictions[row.image_id]
        answers.append(
            [
                {"label": label, "box": list(map(float, box)), "score": float(score)}
                for box, score, label in zip(p["boxes"], p["scores"], p["labels"])
                if score >= config.overlooked_score
            ]
        )
        boxes, labels = decode(row.boxes)
        truths.append([{"label": c, "box": list(b)} for b, c in zip(boxes, labels)])
    scores = field_scores(answers, truths)
    return ReviewerAgreement(
        scores["precision"], scores["recall"], scores["f1"], len(answers), config.min_reviewer_f1
    )


def review_boxes(
    pool: pd.DataFrame,
    predictions: dict[str, dict] | None,
    config: BoxQAConfig = BoxQAConfig(),
) -> pd.DataFrame:
    """Every issue found, most severe first. `predictions` maps image_id to
    {"boxes", "scores", "labels"} in the image's pixels; images without one (or no predictions
    at all) get the model-free checks only."""
    rows = []
    for row in pool.itertuples(index=False):
        rows += given_box_issues(row.image_id, row.boxes, config)
        if row.agreement < 1:
            rows.append(
                _issue(
                    row.image_id,
                    "annotator_disagreement",
                    row.label,
                    "",
                    None,
                    None,
                    1 - row.agreement,
                    f"{row.n_votes} annotators; {row.agreement:.0%} drew the same boxes",
                )
            )
        if predictions and row.image_id in predictions:
            p = predictions[row.image_id]
            rows += predicted_box_issues(
                row.image_id, row.boxes, p["boxes"], p["scores"], list(p["labels"]), config
            )
    issues = pd.DataFrame(rows, columns=ISSUE_COLUMNS)
    return issues.sort_values(["severity", "image_id"], ascending=[False, True], kind="stable")


def image_review(issues: pd.DataFrame, pool: pd.DataFrame) -> pd.DataFrame:
    """One row per image with issues, in the label-QA review's shape (the dataset version's
    exclusion policy and the review table read it): the image's worst severity, its issue
    types as `reasons`, and every suggested fix in `details`."""
    if issues.empty:
        return pd.DataFrame(columns=REVIEW_COLUMNS)
    grouped = issues.groupby("image_id", sort=False)
    review = pd.DataFrame(
        {
            "severity": grouped["severity"].max(),
            "reasons": grouped["issue"].agg(lambda s: ";".join(sorted(set(s)))),
            "details": grouped["details"].agg(lambda s: " | ".join(s)),
            "suggested_label": grouped["suggested_label"].agg(
                lambda s: next((v for v in s if v), "")
            ),
        }
    ).reset_index()
    review = review.merge(
        pool[["image_id", "label", "source", "original_name", "uri"]], on="image_id"
    )
    review["label_quality"] = 1 - review["severity"]
    return (
        review[REVIEW_COLUMNS]
        .sort_values(["severity", "image_id"], ascending=[False, True], kind="stable")
        .reset_index(drop=True)
    )


def labelstudio_rect(image_id: str, size: tuple[int, int], box, label: str, n) -> dict:
    """A Label Studio rectangle: percent of the image, with its original size."""
    (width, height), (x0, y0, x1, y1) = size, box
    return {
        "id": f"{image_id[:8]}-{n}",
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "value": {
            "x": 100 * x0 / width,
            "y": 100 * y0 / height,
            "width": 100 * (x1 - x0) / width,
            "height": 100 * (y1 - y0) / height,
            "rectanglelabels": [label],
        },
    }


def labelstudio_box_tasks(issues: pd.DataFrame, pool: pd.DataFrame) -> list[dict]:
    """One Label Studio task per image with issues: the given boxes pre-filled as the
    annotation to edit, each suggested fix as a prediction (RectangleLabels, percent units)."""
    tasks = []
    rows = pool.set_index("image_id")
    for image_id, group in issues.groupby("image_id", sort=False):
        row = rows.loc[image_id]

        boxes, labels = decode(row["boxes"])
        size = (int(row["width"]), int(row["height"]))
        given = [
            labelstudio_rect(image_id, size, b, c, i) for i, (b, c) in enumerate(zip(boxes, labels))
        ]
        fixes = []
        for k, issue in enumerate(group.itertuples(index=False)):
            box = json.loads(issue.suggested_box or issue.box or "null")
            label = issue.suggested_label or issue.label
            if box and label:
                fixes.append(labelstudio_rect(image_id, size, box, label, f"fix{k}"))
        tasks.append(
            {
                "data": {"image": row["uri"], "image_id": image_id},
                "annotations": [{"result": given}],
                "predictions": [
                    {
                        "model_version": "cvops-box-qa",
                        "score": float(group["severity"].max()),
                        "result": fixes,
                    }
                ],
                "meta": {"issues": "; ".join(group["details"])},
            }
        )
    return tasks


def labelstudio_box_config(classes: list[str]) -> str:
    choices = "\n".join(f'    <Label value="{c}"/>' for c in classes)
    return (
        '<View>\n  <Image name="image" value="$image"/>\n'
        f'  <RectangleLabels name="label" toName="image">\n{choices}\n'
        "  </RectangleLabels>\n</View>\n"
    )


def write_box_review(
    store, prefix: str, issues: pd.DataFrame, pool: pd.DataFrame, classes: list[str]
) -> dict[str, str]:
    """The box review for people: issues as CSV, a Label Studio import with the boxes
    pre-filled and the fixes suggested, and its labeling config; returns file name -> URI."""
    files = {
        "box_issues.csv": issues.to_csv(index=False).encode(),
        "labelstudio_tasks.json": json.dumps(
            labelstudio_box_tasks(issues, pool), indent=1
        ).encode(),
        "labelstudio_config.xml": labelstudio_box_config(classes).encode(),
    }
    for name, data in files.items():
        store.write_bytes(f"{prefix}/{name}", data)
    return {name: store.uri(f"{prefix}/{name}") for name in files}
