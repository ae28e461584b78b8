"""Classification metrics a production team trusts: not accuracy alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class Evaluation:
    accuracy: float
    macro_f1: float
    ece: float
    per_class: pd.DataFrame  # label, precision, recall, f1, support
    confusion: np.ndarray  # rows: true, columns: predicted
    reliability: pd.DataFrame  # bin, confidence, accuracy, count
    classes: list[str]

    def headline(self) -> dict:
        return {
            "accuracy": round(self.accuracy, 4),
            "macro_f1": round(self.macro_f1, 4),
            "ece": round(self.ece, 4),
        }


def reliability_table(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> pd.DataFrame:
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = index == b
        rows.append(
            {
                "bin": b,
                "lower": edges[b],
                "upper": edges[b + 1],
                "count": int(mask.sum()),
                "confidence": float(confidence[mask].mean()) if mask.any() else np.nan,
                "accuracy": float(correct[mask].mean()) if mask.any() else np.nan,
            }
        )
    return pd.DataFrame(rows)


def expected_calibration_error(table: pd.DataFrame) -> float:
    filled = table[table["count"] > 0]
    weights = filled["count"] / filled["count"].sum()
    return float((weights * (filled["confidence"] - filled["accuracy"]).abs()).sum())


def evaluate_predictions(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> Evaluation:
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    predicted = probs.argmax(1)
    ids = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=ids, zero_division=0
    )
    per_class = pd.DataFrame(
        {"label": classes, "precision": precision, "recall": recall, "f1": f1, "support": support}
    )
    reliability = reliability_table(probs, labels)
    return Evaluation(
        accuracy=float((predicted == labels).mean()),
        macro_f1=float(f1_score(labels, predicted, labels=ids, average="macro", zero_division=0)),
        ece=expected_calibration_error(reliability),
        per_class=per_class,
        confusion=confusion_matrix(labels, predicted, labels=ids),
        reliability=reliability,
        classes=list(classes),
    )


def per_cohort(probs: np.ndarray, labels: np.ndarray, cohorts) -> pd.DataFrame:
    """Accuracy per cohort (source drop today, device cohort later)."""
    frame = pd.DataFrame({"cohort": np.asarray(cohorts), "correct": probs.argmax(1) == labels})
    out = frame.groupby("cohort")["correct"].agg(["size", "mean"]).reset_index()
    return out.rename(columns={"size": "images", "mean": "accuracy"})
