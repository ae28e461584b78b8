"""Production metrics from field feedback: accuracy where humans looked, and what it means.

Accuracy is measured on reviewed records only (an operator confirmed or corrected the prediction)
and always reported with its coverage (reviewed / all records), so a figure from 3 reviews out of
300 records never reads like one from 250. Records are grouped by release x cohort x period.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def model_outputs(model: bytes, preprocess: dict, images: list[bytes],
                  batch_size: int = 64) -> np.ndarray:
    """Softmax outputs of a released ONNX model, preprocessed exactly as on the device."""
    import onnxruntime as ort

    from cvops_pipelines.edge.preprocess import load_rgb, normalize, resize

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name, size = session.get_inputs()[0].name, int(preprocess["image_size"])
    out = []
    for start in range(0, len(images), batch_size):
        batch = normalize([resize(load_rgb(b), size) for b in images[start:start + batch_size]],
                          preprocess["mean"], preprocess["std"])
        logits = session.run(None, {name: batch})[0]
        logits = logits - logits.max(1, keepdims=True)
        probs = np.exp(logits)
        out.append(probs / probs.sum(1, keepdims=True))
    return np.concatenate(out) if out else np.zeros((0, len(preprocess["classes"])))


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def with_period(records: pd.DataFrame, period: str) -> pd.DataFrame:
    captured = pd.to_datetime(records["captured_at"], utc=True, format="ISO8601")
    return records.assign(period=captured.dt.floor(period).dt.strftime("%Y-%m-%d %H:%M"))


def accuracy_table(records: pd.DataFrame, period: str = "1D",
                   by: tuple[str, ...] = ("release", "cohort", "period")) -> pd.DataFrame:
    """records, reviewed, coverage, accuracy (+ 95% Wilson interval) per group."""
    frame = with_period(records, period)
    frame = frame.assign(reviewed=frame["corrected_label"].notna(),
                         hit=frame["corrected_label"].notna()
                         & (frame["corrected_label"] == frame["predicted"]))
    rows = []
    for key, group in frame.groupby(list(by), sort=True):
        n, hits = int(group["reviewed"].sum()), int(group["hit"].sum())
        low, high = wilson_interval(hits, n)
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))),
                     "records": len(group), "reviewed": n,
                     "coverage": round(n / len(group), 4),
                     "accuracy": round(hits / n, 4) if n else None,
                     "ci95_low": round(low, 4) if n else None,
                     "ci95_high": round(high, 4) if n else None})
    return pd.DataFrame(rows, columns=[*by, "records", "reviewed", "coverage", "accuracy",
                                       "ci95_low", "ci95_high"])


def business_metrics(records: pd.DataFrame, event_classes: list[str]) -> dict:
    """The two field figures a business reads (on reviewed records):

    - missed_event_share: of the events humans confirmed (true class in `event_classes`), the
      share the model did not report as that event;
    - caught_by_model_not_humans_share: of those events, the share a human working alone missed.
      That needs a blind human judgement per record (column `human_label`, made without seeing
      the model); operators here choose among the model's suggestions, so where that column is
      absent the figure is reported as not measurable rather than guessed.
    """
    reviewed = records[records["corrected_label"].notna()]
    events = reviewed[reviewed["corrected_label"].isin(event_classes)]
    out = {"event_classes": list(event_classes), "events_reviewed": len(events),
           "missed_event_share": round(float((events["predicted"] != events["corrected_label"])
                                             .mean()), 4) if len(events) else None}
    if "human_label" in records and records["human_label"].notna().any():
        blind = events[events["human_label"].notna()]
        caught = (blind["predicted"] == blind["corrected_label"]) & \
                 (blind["human_label"] != blind["corrected_label"])
        out["caught_by_model_not_humans_share"] = round(float(caught.mean()), 4) if len(blind) else None
    else:
        out["caught_by_model_not_humans_share"] = None
        out["caught_by_model_not_humans_note"] = ("not measurable: reviews are model-assisted "
                                                  "(no blind human_label column)")
    return out


def latest_window(records: pd.DataFrame, release: str, size: int) -> pd.DataFrame:
    mine = records[records["release"] == release]
    return mine.sort_values("captured_at", kind="stable").tail(size)
