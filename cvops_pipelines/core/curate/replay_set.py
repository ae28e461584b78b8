"""The production replay set: every reviewed field record, versioned and immutable, and the
production holdout: a share of field images, reserved by a hash of the image id, that never
enters training or validation, so any model can be replayed on it without having seen it.

A record's label comes from an expert (an annotation-queue answer; any annotator that is not a
device operator) when there is one, else from the device's operator. Operators choose among the
deployed model's top suggestions, so their labels lean toward that model; expert labels do not.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import pandas as pd

from cvops_pipelines.core.base.ontology import has_boxes
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.base.tables import read_table, write_table
from cvops_pipelines.edge.wire import OPERATOR_PREFIX

LABEL_SOURCES = ("expert", "operator")
REPLAY_COLUMNS = [
    "record_id",
    "device_id",
    "cohort",
    "release",
    "image_id",
    "key",
    "label",
    "label_source",
    "labeled_by",
    "predicted",
    "captured_at",
    "holdout",
    "boxes",  # detection: the reviewed box set (JSON), an expert's when there is one
]


@dataclass(frozen=True)
class HoldoutPolicy:
    share: float = 0.3  # of field images, by hash: never trained or validated on
    salt: str = "cvops-holdout-v1"  # changing it reshuffles the holdout (and leaks the old one)

    def __post_init__(self) -> None:
        if not 0 <= self.share < 1:
            raise ValueError(f"holdout share must be within [0, 1), got {self.share}")


def in_holdout(image_id: str, policy: HoldoutPolicy = HoldoutPolicy()) -> bool:
    digest = hashlib.sha256(f"{policy.salt}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < policy.share


def expert_labels(pool: pd.DataFrame) -> pd.DataFrame:
    """(image_id, label, labeled_by[, boxes]): each image's latest vote by an annotator who is
    not a device operator (the pool keeps votes in time order). A box pool's label is its
    latest set, an expert's when the latest annotator is one."""
    if has_boxes(pool):
        latest = pool["annotators"].map(lambda names: str(names[-1]) if len(names) else "")
        expert = ~latest.str.startswith(OPERATOR_PREFIX) & (latest != "")
        return pd.DataFrame(
            {
                "image_id": pool.loc[expert, "image_id"],
                "label": pool.loc[expert, "label"].astype(str),
                "labeled_by": latest[expert],
                "boxes_expert": pool.loc[expert, "boxes"],
            }
        )
    rows = []
    for image_id, annotators, votes in zip(
        pool.get("image_id", []), pool.get("annotators", []), pool.get("votes", [])
    ):
        experts = [
            (a, v) for a, v in zip(annotators, votes) if not str(a).startswith(OPERATOR_PREFIX)
        ]
        if experts:
            rows.append(
                {
                    "image_id": image_id,
                    "label": str(experts[-1][1]),
                    "labeled_by": str(experts[-1][0]),
                }
            )
    return pd.DataFrame(rows, columns=["image_id", "label", "labeled_by"])


@dataclass
class ReplaySet:
    version: str
    rows: pd.DataFrame  # REPLAY_COLUMNS, one row per labeled field record
    policy: HoldoutPolicy

    @property
    def holdout(self) -> pd.DataFrame:
        return self.rows[self.rows["holdout"]]

    def summary(self) -> dict:
        sources = self.rows["label_source"].value_counts()
        return {
            "version": self.version,
            "records": len(self.rows),
            "holdout_records": int(self.rows["holdout"].sum()),
            "holdout_images": int(self.holdout["image_id"].nunique()),
            **{f"{s}_labels": int(sources.get(s, 0)) for s in LABEL_SOURCES},
            "holdout_share": self.policy.share,
        }


def build_replay_set(
    records: pd.DataFrame, pool: pd.DataFrame, policy: HoldoutPolicy = HoldoutPolicy()
) -> ReplaySet:
    """`records`: resolved feedback records (feedback_query: one row each); `pool`: the labeled
    pool, for expert labels of field images."""
    experts = expert_labels(pool) if len(pool) else expert_labels(pd.DataFrame())
    frame = records.merge(experts, on="image_id", how="left", suffixes=("", "_expert"))
    operator = frame["corrected_label"].notna()
    expert = frame["label"].notna()
    frame = frame[expert | operator].copy()
    is_expert = frame["label"].notna()
    frame["label_source"] = is_expert.map({True: "expert", False: "operator"})
    frame["labeled_by"] = frame["labeled_by"].where(is_expert, OPERATOR_PREFIX + frame["device_id"])
    frame["label"] = frame["label"].where(is_expert, frame["corrected_label"]).astype(str)
    if "boxes_expert" in frame:  # detection: the reviewed set travels with the record
        frame["boxes"] = frame["boxes_expert"].where(is_expert, frame["corrected_boxes"])
    else:
        frame["boxes"] = None
    frame["holdout"] = [in_holdout(i, policy) for i in frame["image_id"]]
    rows = frame.reindex(columns=REPLAY_COLUMNS).sort_values("record_id").reset_index(drop=True)
    rows["holdout"] = rows["holdout"].astype(bool)
    canonical = rows[["record_id", "image_id", "label", "label_source", "holdout"]]
    digest = hashlib.sha256(canonical.to_csv(index=False, lineterminator="\n").encode())
    digest.update(json.dumps(asdict(policy), sort_keys=True).encode())
    return ReplaySet(f"rs-{digest.hexdigest()[:16]}", rows, policy)


def save_replay_set(store: Store, replay_set: ReplaySet) -> str:
    """Write replay_sets/<version>/ once; an existing version is never overwritten."""
    prefix = f"replay_sets/{replay_set.version}"
    if not store.exists(f"{prefix}/manifest.json"):
        write_table(store, f"{prefix}/records.parquet", replay_set.rows)
        store.write_bytes(
            f"{prefix}/manifest.json",
            json.dumps(
                {**replay_set.summary(), "policy": asdict(replay_set.policy)}, indent=2
            ).encode(),
        )
    return store.uri(prefix)


def load_replay_set(store: Store, version: str) -> pd.DataFrame:
    return read_table(store, f"replay_sets/{version}/records.parquet")
