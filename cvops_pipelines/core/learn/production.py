"""Production metrics from field feedback: accuracy where humans looked, and what it means.

Accuracy is measured on reviewed records only (an operator confirmed or corrected the prediction)
and always reported with its coverage (reviewed / all records), so a figure from 3 reviews out of
300 records never reads like one from 250. Records are grouped by release x cohort x period.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.plots import production_png
from cvops_pipelines.core.curate.dataset import load_snapshot
from cvops_pipelines.core.learn.drift import output_drift
from cvops_pipelines.core.learn.production_state import ProductionState
from cvops_pipelines.edge.runtime import Runtime

REFERENCE_CACHE = "cache/production_metrics/reference"


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_table(
    cells: pd.DataFrame, by: tuple[str, ...] = ("release", "cohort", "period")
) -> pd.DataFrame:
    """records, reviewed, coverage, accuracy (+ 95% Wilson interval) per group, from the
    state's record counts (core/learn/production_state.py)."""
    columns = [*by, "records", "reviewed", "coverage", "accuracy", "ci95_low", "ci95_high"]
    if cells.empty:
        return pd.DataFrame(columns=columns)
    counts = cells.assign(
        reviewed=cells["n"] * cells["reviewed"], hits=cells["n"] * cells["reviewed"] * cells["hit"]
    )
    rows = []
    for key, group in counts.groupby(list(by), sort=True):
        records, n = int(group["n"].sum()), int(group["reviewed"].sum())
        hits = int(group["hits"].sum())
        low, high = wilson_interval(hits, n)
        rows.append(
            {
                **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                "records": records,
                "reviewed": n,
                "coverage": round(n / records, 4),
                "accuracy": round(hits / n, 4) if n else None,
                "ci95_low": round(low, 4) if n else None,
                "ci95_high": round(high, 4) if n else None,
            }
        )
    return pd.DataFrame(rows, columns=columns)


def business_metrics(cells: pd.DataFrame, event_classes: list[str]) -> dict:
    """The field figures a business reads (on reviewed records):

    - missed_event_share: of the events humans confirmed (true class in `event_classes`), the
      share the model did not report as that event;
    - caught_by_model_not_humans_share would need a blind human judgement per record (made
      without seeing the model); operators here choose among the model's suggestions, so it is
      reported as not measurable rather than guessed.
    """
    reviewed = cells[cells["reviewed"] == 1] if len(cells) else cells
    events = reviewed[reviewed["label"].isin(event_classes)] if len(reviewed) else reviewed
    n = int(events["n"].sum()) if len(events) else 0
    missed = int(events.loc[events["hit"] == 0, "n"].sum()) if n else 0
    return {
        "event_classes": list(event_classes),
        "events_reviewed": n,
        "missed_event_share": round(missed / n, 4) if n else None,
        "caught_by_model_not_humans_share": None,
        "caught_by_model_not_humans_note": (
            "not measurable: reviews are model-assisted (no blind human judgement)"
        ),
    }


@dataclass(frozen=True)
class ProductionPolicy:
    period: str = "1D"  # reporting period (pandas frequency)
    min_accuracy: float = 0.97  # SLA on reviewed field records
    min_reviewed: int = 30  # reviewed records a live release needs before the SLA judges it
    drift_window: int = 48  # latest records per live release tested for drift
    drift_alpha: float = 0.05  # family-wise false-alarm rate per window
    reference_images: int = 300  # held-out images of the release's dataset version
    event_classes: tuple[str, ...] = ()  # empty: every class


class FieldReport:
    """What every task's production report answers, whatever it measures: the SLA's and the
    drift test's first failure (None: it holds), the alerts they raise, and the asset value."""

    def sla_failure(self, policy) -> str | None:
        raise NotImplementedError

    def drift_failure(self) -> str | None:
        raise NotImplementedError

    def summary(self, policy) -> dict:
        raise NotImplementedError

    def alerts(self, policy) -> tuple[str, ...]:
        """Names of the production checks that fail (what may ask for a retraining run)."""
        failures = (
            ("accuracy_sla", self.sla_failure(policy)),
            ("no_output_drift", self.drift_failure()),
        )
        return tuple(name for name, failure in failures if failure)


@dataclass
class ProductionReport(FieldReport):
    records: int
    reviewed: int
    pending_corrections: int  # late corrections whose record has not arrived
    live: dict[str, str]  # release -> channel
    table: pd.DataFrame  # accuracy by release x cohort x period
    per_release: pd.DataFrame
    business: dict
    sla: pd.DataFrame  # one row per live release: reviewed, accuracy, judged, ok
    drift: pd.DataFrame  # one row per live release with a window: flagged, min_p, families
    plot: bytes  # PNG: field accuracy over time and output drift
    devices: pd.DataFrame = field(default_factory=pd.DataFrame)  # per device: frames predicted,
    # images kept, reviewed (what selective buffering sends back of what a device saw)

    @property
    def sla_ok(self) -> bool:
        return bool(self.sla["ok"].all()) if len(self.sla) else True

    @property
    def drift_flagged(self) -> bool:
        return bool(self.drift["flagged"].any()) if len(self.drift) else False

    def sla_failure(self, policy: ProductionPolicy) -> str | None:
        failing = self.sla[~self.sla["ok"]] if len(self.sla) else self.sla
        if failing.empty:
            return None
        row = failing.iloc[0]
        return (
            f"{row['release']} ({row['channel']}): accuracy {row['accuracy']} on "
            f"{row['reviewed']} reviewed < {policy.min_accuracy}"
        )

    def drift_failure(self) -> str | None:
        flagged = self.drift[self.drift["flagged"]] if len(self.drift) else self.drift
        if flagged.empty:
            return None
        row = flagged.iloc[0]
        return (
            f"{row['release']}: outputs shifted (min p {max(row['min_p'], 1e-6):.2g} on "
            f"{row['window']} records)"
        )

    def save(self, store, prefix: str = "reports/production_metrics") -> str:
        """The plot and the accuracy table for people; returns the table's URI."""
        store.write_bytes(f"{prefix}/latest.png", self.plot)
        store.write_bytes(f"{prefix}/accuracy.csv", self.table.to_csv(index=False).encode())
        return store.uri(f"{prefix}/accuracy.csv")

    def summary(self, policy: ProductionPolicy | None = None) -> dict:
        """The asset value (what the demo and the retraining hand-off read)."""
        return {
            "records": self.records,
            "reviewed": self.reviewed,
            "pending_corrections": self.pending_corrections,
            "live": self.live,
            "sla": self.sla.to_dict(orient="records"),
            "sla_ok": self.sla_ok,
            "drift": self.drift.to_dict(orient="records"),
            "drift_flagged": self.drift_flagged,
            "business": self.business,
            "per_release": self.per_release.to_dict(orient="records"),
            "release_lines": [_release_line(r) for r in self.per_release.to_dict("records")],
            "devices": self.devices.to_dict(orient="records"),
        }


def _release_line(row: dict) -> str:
    """What `cvops status` prints for a release."""
    known = row["accuracy"] is not None and row["accuracy"] == row["accuracy"]  # not None/NaN
    accuracy = f"{row['accuracy']:.4f}" if known else "n/a"
    return (
        f"{row['release']}: accuracy {accuracy} on {row['reviewed']} reviewed of "
        f"{row['records']} (coverage {row['coverage']:.0%})"
    )


def production_report(
    store, state: ProductionState, policy: ProductionPolicy, releases
) -> ProductionReport:
    """SLA per live release on reviewed records, and drift of each live release's latest outputs
    against the same model's outputs on held-out images of its dataset version; from the state's
    counts and windows, so its cost does not grow with the backlog. `releases`: the release
    store (ship's ReleaseStore: live(), manifest(), model(), spec())."""
    live = releases.live()
    cells = state.cells()
    table = accuracy_table(cells)
    per_release = accuracy_table(cells, by=("release",))
    business = business_metrics(cells, list(policy.event_classes) or state.predicted_classes())
    sla, drift_rows, plots_input = [], [], {}
    for release, channel in live.items():
        mine = per_release[per_release["release"] == release]
        reviewed = int(mine["reviewed"].sum()) if len(mine) else 0
        accuracy = mine["accuracy"].iloc[0] if reviewed else None
        judged = reviewed >= policy.min_reviewed
        sla.append(
            {
                "release": release,
                "channel": channel,
                "reviewed": reviewed,
                "accuracy": accuracy,
                "judged": judged,
                "ok": (not judged) or accuracy >= policy.min_accuracy,
            }
        )
        window = state.latest(release)
        if len(window):
            result, ref, prod = _drift(store, releases, release, window, policy)
            plots_input[release] = (ref, prod)
            drift_rows.append(
                {
                    "release": release,
                    "channel": channel,
                    "window": len(window),
                    "assessed": result.assessed,
                    "flagged": result.flagged,
                    "min_p": round(result.min_p, 6),
                    **{f"{k}_flagged": v for k, v in result.families.items()},
                    "note": result.reason,
                }
            )
    return ProductionReport(
        int(table["records"].sum()) if len(table) else 0,
        int(table["reviewed"].sum()) if len(table) else 0,
        state.pending_corrections(),
        live,
        table,
        per_release,
        business,
        pd.DataFrame(sla),
        pd.DataFrame(drift_rows),
        production_png(table, plots_input, policy.min_accuracy),
        state.coverage(),
    )


def reference_outputs(store, releases, release: str, model: bytes, preprocess: dict, n: int):
    """The release's outputs on up to n held-out images of its dataset version. A release and
    its dataset version never change, so they are computed once and kept in the store (.npy,
    no pickle)."""
    key = f"{REFERENCE_CACHE}/{release}-{n}.npy"
    if store.exists(key):
        return np.load(io.BytesIO(store.read_bytes(key)), allow_pickle=False)
    manifest = releases.manifest(release)
    reference = load_snapshot(store, manifest["dataset_version"])
    reference = reference[reference["split"] != "train"].sort_values("image_id").head(n)
    ref = Runtime(model, preprocess).probabilities([store.read_bytes(k) for k in reference["key"]])
    buffer = io.BytesIO()
    np.save(buffer, ref, allow_pickle=False)
    store.write_bytes(key, buffer.getvalue())
    return ref


def _drift(store, releases, release: str, window: pd.DataFrame, policy: ProductionPolicy):
    preprocess = releases.spec(release)
    model = releases.model(release)
    ref = reference_outputs(store, releases, release, model, preprocess, policy.reference_images)
    prod = Runtime(model, preprocess).probabilities([store.read_bytes(k) for k in window["key"]])
    return output_drift(ref, prod, list(preprocess["classes"]), policy.drift_alpha), ref, prod
