"""The labeled pool: one row per labeled image, with every annotator's latest vote kept.

Labels arrive from drops, corrected feedback and the annotation queue (the `origin` column);
history is kept upstream, and here the latest label per (image, annotator) wins. The pool's
`label` is the majority of those votes (ties go to the most recent vote); `agreement` is the
share of votes that agree with it, which label QA uses to surface disagreements.
"""

from __future__ import annotations

import pandas as pd

# What the pool carries of each image from its manifest row.
IMAGE_COLUMNS = [
    "image_id",
    "source",
    "original_name",
    "uri",
    "key",
    "phash",
    "thumb",
    "width",
    "height",
]
POOL_COLUMNS = [
    "image_id",
    "label",
    "n_votes",
    "agreement",
    "annotators",
    "votes",
    "origin",
    "labeled_at",
    *IMAGE_COLUMNS[1:],  # image_id leads
]


def latest_votes(labels: pd.DataFrame) -> pd.DataFrame:
    """Image-level labels only (boxes are detection data), latest per (image, annotator)."""
    image_level = labels[labels["x_min"].isna()] if "x_min" in labels else labels
    ordered = image_level.sort_values("labeled_at", kind="stable")
    return ordered.drop_duplicates(["image_id", "annotator"], keep="last")


def _consensus(group: pd.DataFrame) -> pd.Series:
    counts = group["label"].value_counts()
    top = counts[counts == counts.max()].index
    winner = group[group["label"].isin(top)].iloc[-1]  # tie: the most recent vote
    return pd.Series(
        {
            "label": winner["label"],
            "n_votes": len(group),
            "agreement": float(counts.max() / len(group)),
            "annotators": list(group["annotator"]),
            "votes": list(group["label"]),
            "origin": winner["origin"],
            "labeled_at": group["labeled_at"].max(),
        }
    )


def build_labeled_pool(manifest: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    if labels.empty or manifest.empty:
        return pd.DataFrame(columns=POOL_COLUMNS)
    votes = latest_votes(labels)
    consensus = (
        votes.groupby("image_id", sort=True)[["label", "annotator", "origin", "labeled_at"]]
        .apply(_consensus)
        .reset_index()
    )
    images = manifest.sort_values("ingested_at", kind="stable").drop_duplicates(
        "image_id", keep="first"
    )
    pool = consensus.merge(
        images[IMAGE_COLUMNS],
        on="image_id",
        how="inner",
    )
    return pool[POOL_COLUMNS].sort_values("image_id").reset_index(drop=True)
