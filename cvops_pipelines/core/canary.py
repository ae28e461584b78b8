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

import numpy as np
import pandas as pd

from cvops_pipelines.core.production import model_outputs
from cvops_pipelines.core.release import CanaryVerdict, ReleaseStore
from cvops_pipelines.core.replay import (INCONCLUSIVE, INSUFFICIENT, NON_INFERIOR, WORSE,
                                         NonInferiority, Operator, compare_on_replay)


def next_look(releases: ReleaseStore, release: str) -> int:
    """Count one more decision taken on this canary (1 for the first) and return the count."""
    key = f"releases/looks/{release}.json"
    looks = json.loads(releases.store.read_bytes(key))["looks"] + 1 \
        if releases.store.exists(key) else 1
    releases.store.write_bytes(key, json.dumps({"release": release, "looks": looks}).encode())
    return looks


def paired_records(records: pd.DataFrame, canary: str, stable: str | None,
                   since: str | None = None) -> pd.DataFrame:
    """Reviewed records of either release captured since the canary went live (earlier images
    may have been in the canary model's training data)."""
    reviewed = records[records["corrected_label"].notna()
                       & records["release"].isin([r for r in (canary, stable) if r])]
    if since:
        captured = pd.to_datetime(reviewed["captured_at"], utc=True, format="ISO8601")
        reviewed = reviewed[captured >= pd.to_datetime(since, utc=True)]
    return reviewed.reset_index(drop=True)


def balanced(paired: pd.DataFrame, canary: str, stable: str) -> pd.DataFrame:
    """The same number of records from each side (the ones with the smallest hash of their id:
    deterministic, and unrelated to what the images show)."""
    sides = [paired[paired["release"] == r] for r in (canary, stable)]
    size = min(len(side) for side in sides)
    keep = [side.assign(_order=[hashlib.sha256(str(i).encode()).hexdigest()
                                for i in side["record_id"]]).sort_values("_order").head(size)
            for side in sides]
    return pd.concat(keep).drop(columns="_order").sort_values("record_id").reset_index(drop=True)


def _classes(releases: ReleaseStore, release: str) -> list[str]:
    return list(json.loads(releases.store.read_bytes(f"releases/{release}/classes.json")))


def _outputs(releases: ReleaseStore, release: str, images: list[bytes],
             classes: list[str]) -> np.ndarray:
    preprocess = json.loads(releases.store.read_bytes(f"releases/{release}/preprocess.json"))
    probs = model_outputs(releases.model(release), preprocess, images)
    own = list(preprocess["classes"])
    return probs[:, [own.index(c) for c in classes]] if len(probs) else \
        np.zeros((0, len(classes)))


def decide_canary(releases: ReleaseStore, records: pd.DataFrame, canary: str,
                  stable: str | None, since: str | None = None,
                  rule: NonInferiority = NonInferiority(),
                  operator: Operator = Operator()) -> tuple[CanaryVerdict, object]:
    """(verdict, the ReplayComparison or None). `records`: resolved feedback records."""
    paired = paired_records(records, canary, stable, since)
    sides = paired["release"].value_counts().to_dict()
    if stable is None or stable == canary:
        mine = sides.get(canary, 0)
        table = pd.DataFrame([{"side": "canary", "release": canary, "reviewed": mine}])
        if mine < rule.min_records:
            return CanaryVerdict("wait", [f"keep collecting: the canary has {mine} reviewed "
                                          f"records, needs {rule.min_records}"], table), None
        return CanaryVerdict("promote", ["no other stable release to compare with: promoted "
                                         "once the canary had enough reviewed records"],
                             table), None
    classes = _classes(releases, canary)
    known = paired["corrected_label"].isin(classes) & paired["corrected_label"].isin(
        _classes(releases, stable))
    paired = balanced(paired[known], canary, stable)
    images = [releases.store.read_bytes(k) for k in paired["key"]]
    comparison = compare_on_replay(
        _outputs(releases, canary, images, classes), _outputs(releases, stable, images, classes),
        paired["corrected_label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=int),
        classes, paired["cohort"].to_numpy(), operator, rule)
    where = (f"shadow replay of both releases on {len(paired)} reviewed records, half from "
             f"canary devices (of {sides.get(canary, 0)}), half from stable devices (of "
             f"{sides.get(stable, 0)})")
    verdict = comparison.verdict
    lines = comparison.sentences()[:len(comparison.outcomes)]
    if verdict == WORSE:
        action, reasons = "rollback", [where] + [s for s, o in zip(lines, comparison.outcomes)
                                                 if o.verdict == WORSE]
    elif verdict == NON_INFERIOR:
        action, reasons = "promote", [f"canary is not worse than stable: {where}"] + lines
    elif verdict == INSUFFICIENT:
        action, reasons = "wait", [f"keep collecting: {where}; needs {rule.min_records}"]
    else:
        assert verdict == INCONCLUSIVE
        action, reasons = "wait", [f"keep collecting: {where}"] + lines
    return CanaryVerdict(action, reasons, comparison.table()), comparison
