"""The paired canary: the canary release and the stable one judged on the same field images.

Every reviewed record since the canary went live, from canary and stable devices alike, is
replayed centrally through both releases' ONNX models (a shadow replay, preprocessed as on the
device), and the paired outcomes against the reviewed labels decide with core.replay's rule:
promote when the canary is shown non-inferior, roll back when it is shown worse, keep collecting
otherwise, saying how many more reviewed records would settle it. Comparing two accuracies from
two different, small sets of devices would mostly measure which devices saw harder images.

Operators pick among the suggestions of the release their device runs, so a record's label leans
toward the release that produced it. Both sides contribute the same number of records (chosen by
a hash of the record id), so that lean cancels instead of favouring the side with more devices.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.ontology import class_indices
from cvops_pipelines.core.base.tracking import Tracking
from cvops_pipelines.core.measure.replay import (
    INCONCLUSIVE,
    INSUFFICIENT,
    NON_INFERIOR,
    WORSE,
    NonInferiority,
    Operator,
    ReplayComparison,
    compare_on_replay,
)
from cvops_pipelines.core.ship.release import CanaryVerdict, ReleaseStore, apply_verdict
from cvops_pipelines.edge.runtime import Runtime
from cvops_pipelines.edge.wire import RELEASES

# (releases, paired reviewed records of both sides, canary, stable, rule, operator) ->
# (comparison, the records it replayed): how a task's releases answer the same field records
PairedReplay = Callable[
    [ReleaseStore, pd.DataFrame, str, str, NonInferiority, Operator],
    tuple[ReplayComparison, pd.DataFrame],
]


def next_look(releases: ReleaseStore, release: str) -> int:
    """Count one more decision taken on this canary (1 for the first) and return the count."""
    key = f"{RELEASES}/looks/{release}.json"  # server side: devices never read it
    looks = (
        json.loads(releases.store.read_bytes(key))["looks"] + 1 if releases.store.exists(key) else 1
    )
    releases.store.write_bytes(key, json.dumps({"release": release, "looks": looks}).encode())
    return looks


def paired_records(
    records: pd.DataFrame, canary: str, stable: str | None, since: str | None = None
) -> pd.DataFrame:
    """Reviewed records of either release captured since the canary went live (earlier images
    may have been in the canary model's training data)."""
    reviewed = records[
        records["corrected_label"].notna()
        & records["release"].isin([r for r in (canary, stable) if r])
    ]
    if since:
        captured = pd.to_datetime(reviewed["captured_at"], utc=True, format="ISO8601")
        reviewed = reviewed[captured >= pd.to_datetime(since, utc=True)]
    return reviewed.reset_index(drop=True)


def balanced(paired: pd.DataFrame, canary: str, stable: str) -> pd.DataFrame:
    """The same number of records from each side (the ones with the smallest hash of their id:
    deterministic, and unrelated to what the images show)."""
    sides = [paired[paired["release"] == r] for r in (canary, stable)]
    size = min(len(side) for side in sides)
    keep = [
        side.assign(_order=[hashlib.sha256(str(i).encode()).hexdigest() for i in side["record_id"]])
        .sort_values("_order")
        .head(size)
        for side in sides
    ]
    return pd.concat(keep).drop(columns="_order").sort_values("record_id").reset_index(drop=True)


def _classes(releases: ReleaseStore, release: str) -> list[str]:
    return list(releases.spec(release)["classes"])


def _outputs(
    releases: ReleaseStore, release: str, images: list[bytes], classes: list[str]
) -> np.ndarray:
    preprocess = releases.spec(release)
    probs = Runtime(releases.model(release), preprocess).probabilities(images)
    own = list(preprocess["classes"])
    return probs[:, [own.index(c) for c in classes]] if len(probs) else np.zeros((0, len(classes)))


def replay_classifiers(
    releases: ReleaseStore,
    paired: pd.DataFrame,
    canary: str,
    stable: str,
    rule: NonInferiority,
    operator: Operator,
) -> tuple[ReplayComparison, pd.DataFrame]:
    """A classifier task's paired replay: both releases answer the same reviewed images whose
    corrected label both know (half from each side); (comparison, the records replayed)."""
    classes = _classes(releases, canary)
    known = paired["corrected_label"].isin(classes) & paired["corrected_label"].isin(
        _classes(releases, stable)
    )
    paired = balanced(paired[known], canary, stable)
    images = [releases.store.read_bytes(k) for k in paired["key"]]
    comparison = compare_on_replay(
        _outputs(releases, canary, images, classes),
        _outputs(releases, stable, images, classes),
        class_indices(paired["corrected_label"], classes),
        classes,
        paired["cohort"].to_numpy(),
        operator,
        rule,
    )
    return comparison, paired


def decide_canary(
    releases: ReleaseStore,
    records: pd.DataFrame,
    canary: str,
    stable: str | None,
    since: str | None = None,
    rule: NonInferiority = NonInferiority(),
    operator: Operator = Operator(),
    *,
    replay: PairedReplay,
) -> tuple[CanaryVerdict, object]:
    """(verdict, the ReplayComparison or None). `records`: resolved feedback records;
    `replay`: the task's paired replay of the two releases (its `canary_replay` piece)."""
    paired = paired_records(records, canary, stable, since)
    sides = paired["release"].value_counts().to_dict()
    if stable is None or stable == canary:
        mine = sides.get(canary, 0)
        table = pd.DataFrame([{"side": "canary", "release": canary, "reviewed": mine}])
        if mine < rule.min_records:
            return CanaryVerdict(
                "wait",
                [
                    f"keep collecting: the canary has {mine} reviewed "
                    f"records, needs {rule.min_records}"
                ],
                table,
            ), None
        return CanaryVerdict(
            "promote",
            [
                "no other stable release to compare with: promoted "
                "once the canary had enough reviewed records"
            ],
            table,
        ), None
    comparison, paired = replay(releases, paired, canary, stable, rule, operator)
    where = (
        f"shadow replay of both releases on {len(paired)} reviewed records, half from "
        f"canary devices (of {sides.get(canary, 0)}), half from stable devices (of "
        f"{sides.get(stable, 0)})"
    )
    verdict = comparison.verdict
    lines = comparison.sentences()[: len(comparison.outcomes)]
    if verdict == WORSE:
        action, reasons = (
            "rollback",
            [where] + [s for s, o in zip(lines, comparison.outcomes) if o.verdict == WORSE],
        )
    elif verdict == NON_INFERIOR:
        action, reasons = "promote", [f"canary is not worse than stable: {where}"] + lines
    elif verdict == INSUFFICIENT:
        action, reasons = "wait", [f"keep collecting: {where}; needs {rule.min_records}"]
    else:
        assert verdict == INCONCLUSIVE
        action, reasons = "wait", [f"keep collecting: {where}"] + lines
    return CanaryVerdict(action, reasons, comparison.table()), comparison


@dataclass
class CanaryLook:
    """One look at the canary: what was decided, on what, and the pointers it moved."""

    release: str
    stable: str | None
    action: str  # promote | rollback | wait | none (no longer on canary) | undecided (budget)
    reasons: list[str]
    look: int | None = None
    table: pd.DataFrame = field(default_factory=pd.DataFrame)
    comparison: ReplayComparison | None = None

    def record(self) -> dict:
        return {
            "release": self.release,
            "stable": self.stable,
            "action": self.action,
            "reasons": self.reasons,
            "table": self.table.to_dict(orient="records"),
        }


def look_at_canary(
    releases: ReleaseStore,
    records: pd.DataFrame,
    release: str,
    rule: NonInferiority,
    max_looks: int,
    operator: Operator,
    actor: str,
    on_promote=None,
    *,
    replay: PairedReplay,
) -> CanaryLook:
    """Decide on the canary and move the pointers. Each look tests at alpha / max_looks
    (Bonferroni over the looks); past max_looks the error budget is spent and people decide."""
    canary = releases.channel("canary") or {}
    stable = (releases.channel("stable") or {}).get("release")
    if canary.get("release") != release:
        return CanaryLook(
            release, stable, "none", [f"{release} is no longer on canary (decided earlier)"]
        )
    look = next_look(releases, release)
    if look > max_looks:
        return CanaryLook(
            release,
            stable,
            "undecided",
            [
                f"{release} was looked at {max_looks} times without a decision (the budget of "
                f"alpha {rule.alpha}); promote or roll it back by hand"
            ],
            look,
        )
    verdict, comparison = decide_canary(
        releases,
        records,
        release,
        stable,
        canary.get("updated_at"),
        replace(rule, alpha=rule.alpha / max_looks),
        operator,
        replay=replay,
    )
    apply_verdict(releases, release, verdict, actor, on_promote)
    return CanaryLook(
        release, stable, verdict.action, verdict.reasons, look, verdict.table, comparison
    )


def log_canary(tracking: Tracking, model_version: str, result: CanaryLook) -> str | None:
    """Into the canary model's training run, under canary/<release>/look-<n>/; returns that
    run's id (None when no paired comparison was made). A decision also tags the version."""
    if result.action in ("promote", "rollback"):
        tracking.tag_version(model_version, "canary", result.action)
    if result.comparison is None:
        return None
    comparison = result.comparison
    run_id = tracking.version_run_id(model_version)
    tracking.log_files(
        run_id,
        f"canary/{result.release}/look-{result.look}",
        {
            "paired.csv": comparison.table().to_csv(index=False).encode(),
            "per_class.csv": comparison.per_class.to_csv(index=False).encode(),
            "per_cohort.csv": comparison.per_cohort.to_csv(index=False).encode(),
            "decision.json": json.dumps(
                {"action": result.action, "reasons": result.reasons}
            ).encode(),
        },
    )
    return run_id
