"""Does the ontology fit the field? Classes the model never or rarely predicts, the pairs it
confuses, and what to do about them (suggestions for a human; the ontology only changes by an
explicit, versioned edit of data_contracts/ontology.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class OntologyPolicy:
    rare_share: float = 0.2  # predicted share below this fraction of the class's true share
    merge_rate: float = 0.15  # both directions of a pair confused at least this often
    split_spread: int = 3  # a class whose errors go to this many classes or more ...
    split_error_rate: float = 0.25  # ... and is wrong this often


def ontology_report(
    records: pd.DataFrame, classes: list[str], policy: OntologyPolicy = OntologyPolicy()
):
    """(per-class table, confused pairs, suggestions) from field records (reviewed ones give
    the true class)."""
    reviewed = records[records["corrected_label"].notna()]
    predicted_share = records["predicted"].value_counts(normalize=True)
    true_share = reviewed["corrected_label"].value_counts(normalize=True)
    per_class = pd.DataFrame({"label": classes})
    per_class["predicted"] = (
        per_class["label"].map(records["predicted"].value_counts()).fillna(0).astype(int)
    )
    per_class["predicted_share"] = per_class["label"].map(predicted_share).fillna(0.0).round(4)
    per_class["true_share_reviewed"] = per_class["label"].map(true_share).fillna(0.0).round(4)
    errors = reviewed[reviewed["corrected_label"] != reviewed["predicted"]]
    truth_counts = reviewed["corrected_label"].value_counts()
    per_class["recall"] = per_class["label"].map(
        lambda c: (
            round(1 - (errors["corrected_label"] == c).sum() / truth_counts[c], 4)
            if truth_counts.get(c, 0)
            else None
        )
    )
    pairs = (
        errors.groupby(["corrected_label", "predicted"])
        .size()
        .rename("count")
        .reset_index()
        .rename(columns={"corrected_label": "true"})
    )
    pairs["rate"] = (pairs["count"] / pairs["true"].map(truth_counts)).round(4)
    pairs = pairs.sort_values(["count", "rate"], ascending=False).reset_index(drop=True)

    suggestions = []
    for row in per_class.itertuples():
        if row.predicted == 0 and row.true_share_reviewed > 0:
            suggestions.append(
                (
                    "never_predicted",
                    row.label,
                    f"class {row.label} appears in "
                    f"{row.true_share_reviewed:.1%} of reviewed records but is never "
                    "predicted: collect and label more of it, or check its definition",
                )
            )
        elif row.predicted == 0:
            suggestions.append(
                (
                    "never_seen",
                    row.label,
                    f"class {row.label} was neither predicted "
                    "nor confirmed in the field: keep it only if it matters",
                )
            )
        elif row.predicted_share < policy.rare_share * row.true_share_reviewed:
            suggestions.append(
                (
                    "rarely_predicted",
                    row.label,
                    f"class {row.label} is predicted "
                    f"{row.predicted_share:.1%} of the time but is "
                    f"{row.true_share_reviewed:.1%} of reviewed records",
                )
            )
    rate = {(t, p): r for t, p, r in zip(pairs["true"], pairs["predicted"], pairs["rate"])}
    for (a, b), r in rate.items():
        if a < b and r >= policy.merge_rate and rate.get((b, a), 0) >= policy.merge_rate:
            suggestions.append(
                (
                    "merge",
                    f"{a}+{b}",
                    f"{a} and {b} are confused both ways "
                    f"({r:.0%} / {rate[(b, a)]:.0%}): merge them, or define and "
                    "label the difference",
                )
            )
    for c in classes:
        mine = pairs[pairs["true"] == c]
        wrong = mine["count"].sum() / truth_counts[c] if truth_counts.get(c, 0) else 0
        if len(mine) >= policy.split_spread and wrong >= policy.split_error_rate:
            suggestions.append(
                (
                    "split",
                    c,
                    f"class {c} is wrong {wrong:.0%} of the time, spread "
                    f"over {len(mine)} classes: it may hold several visual modes; "
                    "consider splitting it",
                )
            )
    return per_class, pairs, pd.DataFrame(suggestions, columns=["kind", "classes", "suggestion"])
