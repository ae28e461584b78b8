"""The learn stage's production report for a detector fleet: precision and recall on reviewed
frames, and output drift on box scores and counts (the paired module of production.py; the
incremental state is detection_production_state.py).

- Precision and recall at IoU 0.5 per release x cohort, counting the device's boxes at or above
  the release's operating point (its `answer_threshold`, chosen on validation at training time)
  against the operator's corrected set, with coverage (reviewed / frames): the SLA judges a
  release once it has `min_reviewed` reviewed frames.
- Drift: for each live release, its latest `window` frames against its first `window`
  (two-sample Kolmogorov-Smirnov on each frame's top box score, and on the boxes per frame at the
  operating point), Bonferroni over the two tests: a detector's answers moving while the field
  is unreviewed is the early warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.learn.production import FieldReport


@dataclass(frozen=True)
class DetectionPolicy:
    min_score: float = 0.5  # device boxes counted as an answer (when its release names none)
    match_iou: float = 0.5
    min_precision: float = 0.5
    min_recall: float = 0.5
    min_reviewed: int = 30
    window: int = 48
    alpha: float = 0.05


@dataclass
class DetectionProduction(FieldReport):
    table: pd.DataFrame  # release x cohort: frames, reviewed, coverage, precision, recall
    per_release: pd.DataFrame
    drift: pd.DataFrame  # release, frames, p_scores, p_counts, flagged / why not tested
    devices: pd.DataFrame = field(default_factory=pd.DataFrame)  # per device: frames answered,
    # images kept, reviewed (what selective buffering sends back of what a device saw)

    def sla_failure(self, policy: DetectionPolicy) -> str | None:
        judged = self.per_release[self.per_release["reviewed"] >= policy.min_reviewed]
        for row in judged.itertuples(index=False):
            if row.precision_50 < policy.min_precision or row.recall_50 < policy.min_recall:
                return (
                    f"{row.release}: precision {row.precision_50:.3f} / recall "
                    f"{row.recall_50:.3f} at IoU {policy.match_iou} on {row.reviewed} reviewed "
                    f"frames (SLA {policy.min_precision} / {policy.min_recall})"
                )
        return None

    def drift_failure(self) -> str | None:
        flagged = self.drift[self.drift["flagged"] == True]  # noqa: E712 - object column
        if flagged.empty:
            return None
        row = flagged.iloc[0]
        return (
            f"{row['release']}: box outputs moved (score p={row['p_scores']:.2g}, count "
            f"p={row['p_counts']:.2g})"
        )

    def summary(self, policy: DetectionPolicy) -> dict:
        return {
            "task": "detection",
            "sla_ok": self.sla_failure(policy) is None,
            "drift_flagged": self.drift_failure() is not None,
            "records": int(self.per_release["frames"].sum()) if len(self.per_release) else 0,
            "reviewed": int(self.per_release["reviewed"].sum()) if len(self.per_release) else 0,
            "per_release": self.per_release.to_dict(orient="records"),
            "drift": self.drift.to_dict(orient="records"),
            "devices": self.devices.to_dict(orient="records"),
            "release_lines": [  # what `cvops status` prints per release
                f"{r['release']}: precision {r['precision_50']} / recall {r['recall_50']} at IoU "
                f"0.5 on {r['reviewed']} reviewed of {r['frames']} frames "
                f"(coverage {r['coverage']:.0%})"
                for r in self.per_release.to_dict(orient="records")
            ],
        }


DRIFT_COLUMNS = ["release", "frames", "p_scores", "p_counts", "flagged", "note"]


def per_release_columns() -> list[str]:
    return [
        "release",
        "answer_threshold",
        "frames",
        "reviewed",
        "coverage",
        "precision_50",
        "recall_50",
        "answers_per_frame",
    ]


def drift_rows(groups: dict, policy: DetectionPolicy) -> pd.DataFrame:
    """Per release, its first and latest `window` frames by capture time, one value each per
    frame (frames are the independent samples; the boxes of one frame are not): its top box
    score (`top`) and how many boxes reach the release's operating point (`answered_any`).
    `groups`: release -> (frames, first, last)."""
    from scipy.stats import ks_2samp

    rows = []
    for release, (frames, first, last) in sorted(groups.items()):
        if frames < 2 * policy.window:
            rows.append(
                {
                    "release": release,
                    "frames": frames,
                    "p_scores": float("nan"),
                    "p_counts": float("nan"),
                    "flagged": False,
                    "note": f"needs {2 * policy.window} frames",
                }
            )
            continue
        p_scores = float(ks_2samp(list(first["top"]), list(last["top"])).pvalue)
        p_counts = float(ks_2samp(list(first["answered_any"]), list(last["answered_any"])).pvalue)
        rows.append(
            {
                "release": release,
                "frames": frames,
                "p_scores": p_scores,
                "p_counts": p_counts,
                "flagged": min(p_scores, p_counts) < policy.alpha / 2,
                "note": f"latest {policy.window} vs first {policy.window} frames",
            }
        )
    return pd.DataFrame(rows, columns=DRIFT_COLUMNS)


def release_threshold(store: Store):
    """A release's operating point, from the spec it shipped with (None: it names none)."""
    from cvops_pipelines.edge.wire import SPEC_FILE, release_key

    def threshold(release: str) -> float | None:
        try:
            spec = json.loads(store.read_bytes(release_key(release, SPEC_FILE)))
        except FileNotFoundError:
            return None
        return float(spec["answer_threshold"]) if "answer_threshold" in spec else None

    return threshold


def answer_thresholds(store: Store, releases) -> dict[str, float]:
    """Each release's operating point, where its spec names one."""
    threshold = release_threshold(store)
    found = {release: threshold(release) for release in sorted(set(releases))}
    return {release: point for release, point in found.items() if point is not None}
