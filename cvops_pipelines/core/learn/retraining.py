"""When to retrain: the facts three assets hand over, and the rule that reads them.

dataset_version, trained_model and production_metrics each write a small typed record under
`handoff/` when they materialize; retraining_sensor reads those records, not the wording of
metadata shown in the UI, and asks this module. Train when there is no model yet; when an alert
(SLA or drift) fired after the latest model and some new labels arrived; when a queue asked for a
quick retrain between its sub-batches and a dataset version newer than the request exists; or
when enough new labels arrived anyway. Never on a dataset version its blocking contracts
refused, never twice for one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from cvops_pipelines.core.base.store import Store

PREFIX = "handoff"


@dataclass(frozen=True)
class DatasetFacts:
    version: str
    images: int
    failed_checks: tuple[str, ...] = ()  # blocking contracts this version failed
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ModelFacts:
    model_version: str
    dataset_version: str
    dataset_images: int
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class AlertFacts:
    failed: tuple[str, ...]  # names of the production checks that failed (empty: all passed)
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class SubBatchFacts:
    """A sub-batch of a queue came back and its queue asked for a quick retrain before the
    next one goes out."""

    queue: str
    sub_batch: int
    epochs: int  # the quick retrain's
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class EncoderFacts:
    model_version: str
    images: int  # images it was pretrained on
    at: float = field(default_factory=time.time)


_KEYS = {
    DatasetFacts: "dataset_version",
    ModelFacts: "trained_model",
    AlertFacts: "alerts",
    EncoderFacts: "ssl_encoder",
    SubBatchFacts: "sub_batch",
}


def write_facts(store: Store, facts) -> None:
    store.write_bytes(f"{PREFIX}/{_KEYS[type(facts)]}.json", json.dumps(asdict(facts)).encode())


def read_facts(store: Store, kind: type):
    key = f"{PREFIX}/{_KEYS[kind]}.json"
    if not store.exists(key):
        return None
    raw = json.loads(store.read_bytes(key))
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


@dataclass(frozen=True)
class RetrainingPolicy:
    min_new_labels: int = 200  # new labels that justify a run on their own
    min_labels_after_alert: int = 20  # new labels that justify a run after an alert
    # After output drift, train with this augmentation preset: the field no longer looks like
    # the training data, so the retrain is asked to be robust to more than it was (None: keep the
    # asset's configured preset).
    augmentation_after_drift: str | None = "strong"


@dataclass(frozen=True)
class RetrainingDecision:
    train: bool
    why: str
    dataset_version: str | None = None
    overrides: dict = field(default_factory=dict)  # trained_model config for this run
    quick_epochs: int | None = None  # a quick retrain: the task's epochs, this many


def retraining_decision(
    dataset: DatasetFacts | None,
    model: ModelFacts | None,
    alerts: AlertFacts | None,
    policy: RetrainingPolicy = RetrainingPolicy(),
    sub_batch: SubBatchFacts | None = None,
) -> RetrainingDecision:
    if dataset is None:
        return RetrainingDecision(False, "no dataset version yet")
    if dataset.failed_checks:
        return RetrainingDecision(
            False, f"dataset version {dataset.version} failed {', '.join(dataset.failed_checks)}"
        )
    if model is None:
        return RetrainingDecision(True, "no model yet", dataset.version)
    if model.dataset_version == dataset.version:
        return RetrainingDecision(
            False, f"the latest model was trained on {dataset.version} already"
        )
    new_labels = dataset.images - model.dataset_images
    fired = list(alerts.failed) if alerts is not None and alerts.at > model.at else []
    if sub_batch is not None and sub_batch.at > model.at and dataset.at > sub_batch.at:
        return RetrainingDecision(
            True,
            f"sub-batch {sub_batch.sub_batch} of {sub_batch.queue} answered: a quick retrain "
            f"({sub_batch.epochs} epochs) before the next goes out",
            dataset.version,
            quick_epochs=sub_batch.epochs,
        )
    if fired and new_labels >= policy.min_labels_after_alert:
        why = f"{' and '.join(fired)} failed; {new_labels} new labels since the last model"
    elif new_labels >= policy.min_new_labels:
        why = f"{new_labels} new labels since the last model (threshold {policy.min_new_labels})"
    else:
        wait = policy.min_labels_after_alert if fired else policy.min_new_labels
        return RetrainingDecision(
            False,
            f"{new_labels} new labels since the last model; "
            f"waiting for {wait}" + (f" (alerts: {', '.join(fired)})" if fired else ""),
        )
    # How the run starts (a short fine-tune of the champion while the ontology is unchanged) is
    # trained_model's `init_from: auto`; benchmarks/loop_latency.py measures it against scratch.
    overrides = {}
    if "no_output_drift" in fired and policy.augmentation_after_drift:
        overrides["augmentation"] = policy.augmentation_after_drift
        why += f"; augmentation {policy.augmentation_after_drift} for the drifted field"
    return RetrainingDecision(True, why, dataset.version, overrides)
