"""Dataset versions: immutable (image_id, label, split) snapshots named by a hash of their content.

The snapshot records which images were left out and why (the flagged-label policy), and carries
the frames the blocking contracts check: per-split class counts and cross-split near-duplicates.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import pandas as pd

from cvops_pipelines.core.base.ontology import has_boxes
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.base.tables import read_table, write_table
from cvops_pipelines.core.curate.detection_pool import box_rows
from cvops_pipelines.core.curate.neardup import NearDupConfig, differing, near_duplicate_pairs
from cvops_pipelines.core.curate.splits import SPLITS, SplitConfig, grouped, split_of

DATASET_COLUMNS = ["image_id", "label", "split", "uri", "key", "source", "phash"]
DETECTION_COLUMNS = [*DATASET_COLUMNS, "boxes", "n_boxes", "width", "height"]


@dataclass(frozen=True)
class DatasetPolicy:
    flagged: str = "exclude"  # "exclude" or "keep" images label QA flagged
    min_severity: float = 0.5  # only suspects at least this severe are excluded

    def __post_init__(self) -> None:
        if self.flagged not in ("exclude", "keep"):
            raise ValueError(f"flagged policy must be 'exclude' or 'keep', got {self.flagged!r}")


@dataclass
class DatasetVersion:
    version: str
    rows: pd.DataFrame  # DATASET_COLUMNS
    excluded: pd.DataFrame  # image_id, label, reason
    leakage: pd.DataFrame  # near-duplicate pairs whose members sit in different splits
    config: dict = field(default_factory=dict)

    @property
    def boxes(self) -> bool:
        return has_boxes(self.rows)

    def labeled_units(self) -> pd.DataFrame:
        """What a class is counted in: images (a class per image) or boxes."""
        return box_rows(self.rows) if self.boxes else self.rows

    def class_counts(self) -> pd.DataFrame:
        """Every (split, class) combination, zeros included, with its share of the split and
        how far that share is from the class's overall share, in binomial standard errors
        (`share_z`): hash splits of a small pool are noisy, and only a large z is a real skew.
        For detection, `images` counts boxes: a class needs objects to learn from in every split."""
        units = self.labeled_units()
        classes = sorted(units["label"].unique())
        grid = pd.MultiIndex.from_product([SPLITS, classes], names=["split", "label"])
        counts = units.groupby(["split", "label"]).size().reindex(grid, fill_value=0)
        frame = counts.rename("images").reset_index()
        split_sizes = frame.groupby("split")["images"].transform("sum").clip(lower=1)
        frame["share"] = frame["images"] / split_sizes
        overall = frame["label"].map(units["label"].value_counts(normalize=True))
        frame["share_deviation"] = (frame["share"] - overall).abs()
        standard_error = (overall * (1 - overall) / split_sizes).pow(0.5).clip(lower=1e-9)
        frame["share_z"] = (frame["share"] - overall) / standard_error
        return frame

    def summary(self) -> dict:
        summary = {
            "version": self.version,
            "images": len(self.rows),
            "excluded": len(self.excluded),
            "leakage_pairs": len(self.leakage),
            **{f"{s}_images": int((self.rows["split"] == s).sum()) for s in SPLITS},
        }
        if self.boxes:
            summary["boxes"] = int(self.rows["n_boxes"].sum())
            summary["images_without_objects"] = int((self.rows["n_boxes"] == 0).sum())
        return summary


def content_version(rows: pd.DataFrame) -> str:
    """Same (image_id, label, split) content (and boxes, for detection) -> same id, whatever
    the row order."""
    columns = ["image_id", "label", "split", *(["boxes"] if has_boxes(rows) else [])]
    canonical = rows[columns].sort_values("image_id")
    digest = hashlib.sha256(canonical.to_csv(index=False, lineterminator="\n").encode())
    return f"ds-{digest.hexdigest()[:16]}"


def build_dataset_version(
    pool: pd.DataFrame,
    review: pd.DataFrame,
    splits: SplitConfig = SplitConfig(),
    policy: DatasetPolicy = DatasetPolicy(),
    neardup: NearDupConfig = NearDupConfig(),
    holdout: set[str] = frozenset(),
) -> DatasetVersion:
    """`holdout`: image ids of the production holdout (core.replay_set), never in any split."""
    data = pool.copy()
    data["split"] = [split_of(i, splits) for i in data["image_id"]]
    reserved = data["image_id"].isin(holdout)
    excluded = pd.DataFrame(
        {
            "image_id": data.loc[reserved, "image_id"],
            "label": data.loc[reserved, "label"],
            "reason": "production holdout: replayed, never trained on",
        }
    )
    data = data[~reserved].copy()
    pairs = near_duplicate_pairs(data[["image_id", "phash", "thumb"]], neardup)
    together = grouped(
        dict(zip(data["image_id"], data["split"])), zip(pairs["image_a"], pairs["image_b"])
    )
    data["split"] = data["image_id"].map(together)
    if policy.flagged == "exclude" and len(review):
        severe = review[review["severity"] >= policy.min_severity]
        flagged = pd.DataFrame(
            {
                "image_id": severe["image_id"],
                "label": severe["label"],
                "reason": "label QA: "
                + severe["reasons"]
                + " (severity "
                + severe["severity"].round(2).astype(str)
                + ")",
            }
        )
        flagged = flagged[flagged["image_id"].isin(data["image_id"])]
        excluded = pd.concat([excluded, flagged], ignore_index=True)
        data = data[~data["image_id"].isin(flagged["image_id"])]
    leakage = differing(pairs, data, "split")  # none by construction; the blocking check guards
    columns = DETECTION_COLUMNS if has_boxes(data) else DATASET_COLUMNS
    rows = data[columns].sort_values("image_id").reset_index(drop=True)
    version = content_version(rows)
    rows["dataset_version"] = version  # travels with the rows to every downstream asset
    config = {"splits": asdict(splits), "policy": asdict(policy), "neardup": asdict(neardup)}
    return DatasetVersion(version, rows, excluded.reset_index(drop=True), leakage, config)


def save_snapshot(store: Store, dataset: DatasetVersion) -> str:
    """Write datasets/<version>/ once; an existing snapshot is never overwritten."""
    prefix = f"datasets/{dataset.version}"
    if not store.exists(f"{prefix}/manifest.json"):
        write_table(store, f"{prefix}/dataset.parquet", dataset.rows)
        write_table(store, f"{prefix}/excluded.parquet", dataset.excluded)
        store.write_bytes(
            f"{prefix}/manifest.json",
            json.dumps({**dataset.summary(), "config": dataset.config}, indent=2).encode(),
        )
    return store.uri(prefix)


def load_snapshot(store: Store, version: str) -> pd.DataFrame:
    return read_table(store, f"datasets/{version}/dataset.parquet")


def images_trained_on(tracking, store: Store, loaded) -> set[str]:
    """The image ids of the train split a registered model was trained on (its run's
    `dataset_version` tag): a model agrees with its own training labels, flipped ones included,
    so it must not judge those."""
    version = tracking.client().get_run(loaded.run_id).data.tags.get("dataset_version", "")
    trained = load_snapshot(store, version) if version else pd.DataFrame(columns=["image_id"])
    return set(trained.loc[trained["split"] == "train", "image_id"]) if len(trained) else set()
