"""Label QA: rank the labels a human should look at again, and say why.

Signals, each with a severity in [0, 1]:
- `label_issue`: cleanlab's confident learning on out-of-fold probabilities. Candidate scorers:
  a distance-weighted k-nearest-neighbour classifier on standardised 16x16 thumbnails (fast,
  and on centred, aligned images such as the demo digits better than the textbook logistic
  regression on raw pixels), and a linear probe on learned embeddings (the self-supervised
  encoder's, or the champion's penultimate layer) where raw pixels do not cluster by class, and,
  when those cannot judge (an escalation), a network fine-tuned out of fold (core/build/oof.py).
  The one that agrees most with the given labels out of fold scores; if even it agrees too
  little, it flags nothing (see benchmarks/label_qa.py).
- `near_duplicate_conflict`: the same picture (confirmed near-duplicate) carries different labels.
- `annotator_disagreement`: several annotators labeled the image differently.
Plus, for the ontology: estimated noise per class and the class pairs most often confused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.images import THUMB_SIDE, thumb_array
from cvops_pipelines.core.base.ontology import class_indices
from cvops_pipelines.core.curate.neardup import NearDupConfig, pairs_differing_in

REVIEW_COLUMNS = [
    "image_id",
    "label",
    "suggested_label",
    "severity",
    "reasons",
    "label_quality",
    "details",
    "source",
    "original_name",
    "uri",
]


@dataclass(frozen=True)
class LabelQAConfig:
    folds: int = 5
    neighbors: int = 10
    seed: int = 0
    feature_side: int = 16
    neardup: NearDupConfig = field(default_factory=NearDupConfig)
    # The scorer judges labels only when its own out-of-fold accuracy against them reaches this:
    # below it, most of its disagreements are its own errors, and confident learning would
    # flood the review with them (measured: half of a 2,000-image pool flagged, F1 0.21).
    min_scorer_accuracy: float = 0.6


@dataclass
class LabelQAResult:
    review: pd.DataFrame  # one row per suspect image, most severe first
    noise_per_class: pd.DataFrame
    confused_pairs: pd.DataFrame
    annotators: pd.DataFrame
    conflicts: pd.DataFrame  # near-duplicate pairs with different labels
    pred_probs: np.ndarray | None
    classes: list[str]
    scored: int  # images that had out-of-fold probabilities
    unscored_reason: str = ""
    scorer_accuracy: float | None = None  # its out-of-fold accuracy against the given labels
    judged: bool = False  # whether its disagreements were flagged (see min_scorer_accuracy)
    scorer: str = ""  # which scorer ran (see _score_labels)
    candidates: dict[str, float] = field(default_factory=dict)  # scorer -> OOF accuracy
    escalated: str = ""  # why the escalation scorers ran ("": they did not)


class ScorerDeclined(Exception):
    """An out-of-fold scorer will not score this pool (e.g. over its compute budget); the
    message says why and what to change. The other candidates go on."""


def thumb_features(thumbs: pd.Series, side: int = 16) -> np.ndarray:
    """Mean-pooled thumbnails as flat vectors (side must divide 32)."""
    k = THUMB_SIDE // side
    stack = np.stack([thumb_array(t) for t in thumbs])
    return stack.reshape(len(stack), side, k, side, k).mean(axis=(2, 4)).reshape(len(stack), -1)


def knn_model(neighbors: int):
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), KNeighborsClassifier(neighbors, weights="distance"))


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, model_factory, folds: int, seed: int
) -> np.ndarray:
    """Each image scored by a model that never saw it (what confident learning needs)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(model_factory(), features, labels, cv=cv, method="predict_proba")


THUMBNAILS = "thumbnails (k-nearest neighbours on 16x16)"


def probe_model():
    """A linear probe: what learned features are judged by (they are already the hard part)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, max_iter=2000)


@dataclass(frozen=True)
class Scoring:
    """The chosen scorer's out-of-fold probabilities, and how every candidate did."""

    probs: np.ndarray | None
    classes: list[str]
    mask: np.ndarray  # pool rows that were scored
    reason: str  # why some (or all) rows were not scored
    scorer: str = ""
    candidates: dict[str, float] = field(default_factory=dict)  # scorer -> OOF accuracy
    left_out: int = 0  # rows of usable classes that no candidate could judge

    def cannot_judge(self, config: LabelQAConfig, labels: pd.Series) -> str:
        """Why a better (costlier) scorer is needed here, or "" if none is."""
        if self.probs is None:  # too few images per class: no scorer folds that
            return ""
        y = class_indices(labels[self.mask], self.classes)
        accuracy = float(np.mean(self.probs.argmax(1) == y))
        if accuracy < config.min_scorer_accuracy:
            return (
                f"the best scorer ({self.scorer}) agrees with only {accuracy:.0%} of the labels "
                f"out of fold (< {config.min_scorer_accuracy:.0%})"
            )
        if self.left_out:
            return f"{self.left_out} images no scorer may judge"
        return ""


# A scorer that produces its own out-of-fold probabilities (e.g. a network fine-tuned k times,
# core/build/oof.py): called with the pool rows it scores, their label indices, the classes,
# the number of folds and the seed; it splits as StratifiedKFold(folds, shuffle, seed), or
# into fewer folds where each one costs a training (every row is still judged out of fold).
OutOfFoldScorer = Callable[[np.ndarray, np.ndarray, list[str], int, int], np.ndarray]


def _candidates(mask, y, classes, folds, config, embeddings, scorers):
    """(name, rows it judges, its out-of-fold probabilities or None if it cannot be folded)."""
    for name, all_rows in embeddings.items():
        rows = all_rows[mask]
        judged = ~np.isnan(rows).any(axis=1)
        per_class = np.bincount(y[judged], minlength=len(classes))
        if per_class.min() < folds:
            yield name, judged, None
            continue
        probe = out_of_fold_probabilities(rows[judged], y[judged], probe_model, folds, config.seed)
        yield name, judged, probe
    for name, score in scorers.items():
        try:
            probs = score(np.flatnonzero(mask), y, classes, folds, config.seed)
        except ScorerDeclined as exc:
            yield name, str(exc), None
            continue
        yield name, np.ones(len(y), bool), probs


def _score_labels(
    pool: pd.DataFrame,
    config: LabelQAConfig,
    embeddings: dict[str, np.ndarray],
    scorers: dict[str, OutOfFoldScorer] | None = None,
) -> Scoring:
    """Every candidate scorer (kNN on thumbnails, a linear probe on each set of embeddings,
    each out-of-fold scorer given) scores the pool out of fold; each image is scored by the
    candidate that agrees most with the given labels among those allowed to judge it.

    At one noise rate, agreement with the given labels rises with agreement with the truth, so
    this picks the scorer that knows the classes best, measured on the pool itself. An
    embedding's NaN rows are images it may not judge (a champion's own training images: it
    agrees with their labels, flipped ones included). A learned scorer must beat the thumbnails
    on the images it judges; ties go to the thumbnails (nothing to load). What no learned scorer
    may judge goes to the thumbnails if they can judge it (min_scorer_accuracy), else is left
    unscored. Classes too small for k-fold are left out."""
    counts = pool["label"].value_counts()
    folds = min(config.folds, int(counts.max()) if len(counts) else 0)
    usable = counts[counts >= max(folds, 2)].index
    if folds < 2 or len(usable) < 2:
        reason = "too few labeled images per class for k-fold"
        return Scoring(None, [], np.zeros(len(pool), bool), reason)
    mask = pool["label"].isin(usable).to_numpy()
    classes = sorted(usable)
    y = class_indices(pool.loc[mask, "label"], classes)
    neighbors = max(1, min(config.neighbors, int(len(y) * (folds - 1) / folds) - 1))
    features = thumb_features(pool.loc[mask, "thumb"], config.feature_side)
    probs = out_of_fold_probabilities(features, y, lambda: knn_model(neighbors), folds, config.seed)
    hits = probs.argmax(1) == y
    accuracy = {THUMBNAILS: float(hits.mean())}
    notes, better = [], []  # better: (gain over the thumbnails, name, rows it judges, probs)
    for name, judged, theirs in _candidates(
        mask, y, classes, folds, config, embeddings, scorers or {}
    ):
        if theirs is None:
            notes.append(
                f"{name}: {judged}"
                if isinstance(judged, str)
                else f"{name}: fewer than {folds} images of some class it may judge"
            )
            continue
        accuracy[name] = float(np.mean(theirs.argmax(1) == y[judged]))
        gain = accuracy[name] - float(hits[judged].mean())  # against thumbnails, same images
        if gain > 0:
            better.append((gain, name, judged, theirs))
    owner = np.full(len(y), THUMBNAILS, dtype=object)
    probs = probs.copy()
    for _, name, judged, theirs in sorted(better, key=lambda c: c[0]):  # the best writes last
        probs[judged], owner[judged] = theirs, name
    rest = owner == THUMBNAILS
    unscored = bool(better) and rest.any() and hits[rest].mean() < config.min_scorer_accuracy
    if unscored:  # the thumbnails cannot judge what the others may not: leave it unscored
        notes.append(
            f"{int(rest.sum())} images no learned scorer may judge are not scored: the "
            f"thumbnails agree with only {hits[rest].mean():.0%} of their labels"
        )
        mask = mask.copy()
        mask[np.flatnonzero(mask)[rest]] = False
        probs, owner = probs[~rest], owner[~rest]
    left_out = int(rest.sum()) if unscored else 0
    shares = pd.Series(owner).value_counts()
    scorer = (
        str(shares.index[0])
        if len(shares) == 1 and not unscored
        else "; ".join(f"{name} on {n} images" for name, n in shares.items())
    )
    skipped = sorted(set(counts.index) - set(usable))
    if skipped:
        notes.append(f"classes with fewer than {folds} images not scored: {', '.join(skipped)}")
    return Scoring(probs, classes, mask, "; ".join(notes), scorer, accuracy, left_out)


def _noise_and_confusion(labels: np.ndarray, probs: np.ndarray, classes: list[str]):
    from cleanlab.count import estimate_joint

    joint = estimate_joint(labels, probs)  # rows: given label, columns: estimated true label
    n = len(labels)
    noise = pd.DataFrame(
        {
            "label": classes,
            "images": np.bincount(labels, minlength=len(classes)),
            "estimated_noise_rate": [
                float(1 - joint[i, i] / joint[i].sum()) if joint[i].sum() else 0.0
                for i in range(len(classes))
            ],
        }
    )
    pairs = [
        (classes[i], classes[j], float((joint[i, j] + joint[j, i]) * n))
        for i in range(len(classes))
        for j in range(i + 1, len(classes))
    ]
    confused = pd.DataFrame(pairs, columns=["class_a", "class_b", "estimated_confusions"])
    confused = confused[confused["estimated_confusions"] >= 0.5]
    return noise, confused.sort_values("estimated_confusions", ascending=False).reset_index(
        drop=True
    )


def annotator_agreement(pool: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-annotator agreement with the consensus, images whose annotators disagree)."""
    multi = pool[pool["n_votes"] > 1]
    rows = [
        (a, v == label)
        for label, annotators, votes in zip(multi["label"], multi["annotators"], multi["votes"])
        for a, v in zip(annotators, votes)
    ]
    votes = pd.DataFrame(rows, columns=["annotator", "agrees"])
    per_annotator = (
        (
            votes.groupby("annotator")["agrees"]
            .agg(["size", "mean"])
            .rename(columns={"size": "multi_labeled_images", "mean": "agreement"})
            .reset_index()
        )
        if len(votes)
        else pd.DataFrame(columns=["annotator", "multi_labeled_images", "agreement"])
    )
    return per_annotator, multi[multi["agreement"] < 1.0]


def near_duplicate_conflicts(pool: pd.DataFrame, config: NearDupConfig) -> pd.DataFrame:
    return pairs_differing_in(pool, "label", config)


def review_label_quality(
    pool: pd.DataFrame,
    config: LabelQAConfig = LabelQAConfig(),
    embeddings: dict[str, np.ndarray] | None = None,
    scorers: dict[str, OutOfFoldScorer] | None = None,
    escalation: dict[str, OutOfFoldScorer] | None = None,
) -> LabelQAResult:
    """`embeddings`: learned features per scorer name (e.g. the SSL encoder's), one row per
    pool row; `scorers`: out-of-fold scorers by name (e.g. a fine-tuned network). Each
    competes with the thumbnail scorer (see _score_labels). `escalation`: scorers too costly
    to run unless needed: they join the others only when those cannot judge (the best agrees
    with too few labels, or some images have no scorer)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    pool = pool.reset_index(drop=True)
    suspects: dict[str, dict] = {}

    def flag(row, reason: str, severity: float, suggested: str, detail: str) -> None:
        entry = suspects.setdefault(
            row["image_id"],
            {
                "image_id": row["image_id"],
                "label": row["label"],
                "suggested_label": suggested,
                "severity": 0.0,
                "reasons": [],
                "label_quality": np.nan,
                "details": [],
                "source": row["source"],
                "original_name": row["original_name"],
                "uri": row["uri"],
            },
        )
        entry["reasons"].append(reason)
        entry["details"].append(detail)
        if severity > entry["severity"]:
            entry["severity"], entry["suggested_label"] = severity, suggested

    scoring = _score_labels(pool, config, embeddings or {}, scorers)
    escalated = scoring.cannot_judge(config, pool["label"]) if escalation else ""
    if escalated:
        scoring = _score_labels(pool, config, embeddings or {}, {**(scorers or {}), **escalation})
    probs, classes, mask, unscored = scoring.probs, scoring.classes, scoring.mask, scoring.reason
    noise = pd.DataFrame(columns=["label", "images", "estimated_noise_rate"])
    confused = pd.DataFrame(columns=["class_a", "class_b", "estimated_confusions"])
    quality = pd.Series(np.nan, index=pool.index)
    accuracy, judged = None, False
    if probs is not None:
        y = class_indices(pool.loc[mask, "label"], classes)
        accuracy = float(np.mean(probs.argmax(1) == y))
        judged = accuracy >= config.min_scorer_accuracy
        if not judged:
            unscored = "; ".join(
                r
                for r in (
                    unscored,
                    f"the best scorer ({scoring.scorer}) agrees with only {accuracy:.0%} of the "
                    "labels out of "
                    f"fold (< {config.min_scorer_accuracy:.0%}): it cannot tell label errors "
                    "from its own, so only near-duplicate conflicts and annotator disagreement "
                    "are flagged",
                )
                if r
            )
    if probs is not None and judged:
        # n_jobs=1: a forked pool would inherit the orchestrator's signal handlers; one core is fast
        issues = find_label_issues(y, probs, filter_by="prune_by_noise_rate", n_jobs=1)
        scores = get_label_quality_scores(y, probs)
        quality[mask] = scores
        noise, confused = _noise_and_confusion(y, probs, classes)
        for k, (_, row) in enumerate(pool[mask].iterrows()):
            if issues[k]:
                suggested = classes[int(probs[k].argmax())]
                flag(
                    row,
                    "label_issue",
                    float(1 - scores[k]),
                    suggested,
                    f"model: {suggested} ({probs[k].max():.2f}), given {row['label']} "
                    f"({probs[k][y[k]]:.2f})",
                )
    pool_quality = dict(zip(pool["image_id"], quality))
    rows = pool.set_index("image_id")

    conflicts = near_duplicate_conflicts(pool, config.neardup)
    for pair in conflicts.itertuples():
        for me, other in ((pair.image_a, pair.image_b), (pair.image_b, pair.image_a)):
            row = rows.loc[me]
            # suggest the label of whichever copy the model trusts more
            better = (
                other
                if np.nan_to_num(pool_quality[other]) > np.nan_to_num(pool_quality[me])
                else me
            )
            flag(
                row.to_dict() | {"image_id": me},
                "near_duplicate_conflict",
                1.0,
                rows.loc[better, "label"],
                f"same picture as {other[:12]}… labeled {rows.loc[other, 'label']} "
                f"(pHash distance {pair.hamming}, pixel difference {pair.mad:.3f})",
            )

    per_annotator, disagreements = annotator_agreement(pool)
    for _, row in disagreements.iterrows():
        votes = ", ".join(f"{a or '?'}: {v}" for a, v in zip(row["annotators"], row["votes"]))
        minority = next((v for v in row["votes"] if v != row["label"]), row["label"])
        flag(
            row,
            "annotator_disagreement",
            float(1 - row["agreement"]),
            minority,
            f"annotators disagree ({votes})",
        )

    review = pd.DataFrame(list(suspects.values()), columns=REVIEW_COLUMNS)
    if len(review):
        review["label_quality"] = review["image_id"].map(pool_quality)
        review["reasons"] = review["reasons"].map(";".join)
        review["details"] = review["details"].map(" | ".join)
        review = review.sort_values(["severity", "image_id"], ascending=[False, True])
    return LabelQAResult(
        review.reset_index(drop=True),
        noise,
        confused,
        per_annotator,
        conflicts,
        probs,
        classes,
        int(mask.sum()),
        unscored,
        accuracy,
        judged,
        scoring.scorer,
        scoring.candidates,
        escalated,
    )


def labelstudio_tasks(review: pd.DataFrame, model_version: str = "cvops-label-qa") -> list[dict]:
    """Label Studio import: each task shows the image with its current label (and, where the
    review has one, the Grad-CAM overlay), pre-filled with the suggested label as a prediction
    the reviewer accepts or corrects."""
    saliency = review["saliency"] if "saliency" in review else pd.Series("", index=review.index)
    return [
        {
            "data": {
                "image": r.uri,
                "image_id": r.image_id,
                "current_label": r.label,
                "suggested_label": r.suggested_label,
                "reasons": r.reasons,
                "severity": round(float(r.severity), 4),
                "details": r.details,
                "saliency": overlay if isinstance(overlay, str) else "",
            },
            "predictions": [
                {
                    "model_version": model_version,
                    "score": round(float(r.severity), 4),
                    "result": [
                        {
                            "from_name": "label",
                            "to_name": "image",
                            "type": "choices",
                            "value": {"choices": [r.suggested_label]},
                        }
                    ],
                }
            ],
        }
        for r, overlay in zip(review.itertuples(), saliency)
    ]


def labelstudio_config(classes: list[str]) -> str:
    """The labeling interface the tasks above expect (paste into the project's settings)."""
    choices = "\n".join(f'    <Choice value="{c}"/>' for c in classes)
    return (
        '<View>\n  <Image name="image" value="$image"/>\n'
        '  <Image name="saliency" value="$saliency"/>\n'
        '  <Header value="Current: $current_label · suggested: $suggested_label · $reasons '
        '(right: where the champion looked)"/>\n'
        f'  <Choices name="label" toName="image" choice="single" showInline="true">\n'
        f"{choices}\n  </Choices>\n</View>\n"
    )


def export_json(tasks: list[dict]) -> bytes:
    return json.dumps(tasks, indent=1, ensure_ascii=False).encode()


def write_review(
    store, prefix: str, result: LabelQAResult, classes: list[str]
) -> tuple[bytes, dict[str, str]]:
    """The review for people: a CSV, a Label Studio import + labeling config, and the confused
    pairs plot, under `prefix`; returns (the plot's PNG, file name -> URI)."""
    from cvops_pipelines.core.base.plots import confused_pairs_png

    review = result.review
    png = confused_pairs_png(result.confused_pairs, result.noise_per_class)
    files = {
        "review.csv": review.to_csv(index=False).encode(),
        "labelstudio_tasks.json": export_json(labelstudio_tasks(review)),
        "labelstudio_config.xml": labelstudio_config(classes).encode(),
        "confused_pairs.png": png,
    }
    for name, data in files.items():
        store.write_bytes(f"{prefix}/{name}", data)
    return png, {name: store.uri(f"{prefix}/{name}") for name in files}
