import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cvops_pipelines.core.base.images import inspect_image
from cvops_pipelines.core.curate.label_qa import (
    THUMBNAILS,
    LabelQAConfig,
    ScorerDeclined,
    labelstudio_config,
    labelstudio_tasks,
    out_of_fold_probabilities,
    probe_model,
    review_label_quality,
)
from cvops_pipelines.core.curate.neardup import candidate_pairs
from cvops_pipelines.demo import digit_model
from cvops_pipelines_tests import corpus


@pytest.fixture(scope="module")
def noisy_pool():
    """All 1,797 demo digits, 10% of labels flipped to another class (seeded)."""
    indices = list(range(1797))
    rng = np.random.default_rng(42)
    labels = [digit_model.digit_label(i) for i in indices]
    flipped = set(rng.choice(len(indices), len(indices) // 10, replace=False).tolist())
    for i in flipped:
        labels[i] = str(rng.choice([c for c in range(10) if str(c) != labels[i]]))
    pool = corpus.pool_rows(indices, labels)
    return pool, {pool.at[i, "image_id"] for i in flipped}


def test_flipped_labels_are_found_far_above_chance(noisy_pool):
    pool, flipped = noisy_pool
    result = review_label_quality(pool)
    flagged = set(
        result.review.loc[result.review["reasons"].str.contains("label_issue"), "image_id"]
    )
    precision = len(flagged & flipped) / len(flagged)
    recall = len(flagged & flipped) / len(flipped)
    assert precision > 0.7 and recall > 0.7, (precision, recall)  # chance precision: 0.10
    assert result.judged and result.scorer_accuracy >= LabelQAConfig().min_scorer_accuracy
    assert result.scored == len(pool)
    # the suggestion is usually the true class
    review = result.review.set_index("image_id")
    truth = dict(zip(pool["image_id"], (digit_model.digit_label(i) for i in range(1797))))
    hits = [review.at[i, "suggested_label"] == truth[i] for i in flagged & flipped]
    assert np.mean(hits) > 0.8
    # estimated noise per class near the injected 10%, sorted most severe first
    assert result.noise_per_class["estimated_noise_rate"].between(0.02, 0.25).all()
    assert result.review["severity"].is_monotonic_decreasing
    assert len(result.confused_pairs) > 0


def test_near_duplicate_conflict_is_detected():
    pool = corpus.pool_rows(range(60))
    jpeg = corpus.encode(digit_model.digit(0).convert("RGB"), "JPEG", quality=80)
    info = inspect_image(jpeg)
    copy = pool.iloc[[0]].assign(
        image_id=info.image_id,
        phash=info.phash,
        thumb=info.thumb,
        label="6",
        votes=[["6"]],
        original_name="copy.jpg",
    )
    result = review_label_quality(
        pd.concat([pool, copy], ignore_index=True), LabelQAConfig(folds=3)
    )
    conflicts = result.review[result.review["reasons"].str.contains("near_duplicate_conflict")]
    assert set(conflicts["image_id"]) == {pool.at[0, "image_id"], info.image_id}
    assert (conflicts["severity"] == 1.0).all()
    assert "same picture as" in conflicts.iloc[0]["details"]
    assert len(result.conflicts) == 1


def test_annotator_disagreement_is_detected():
    pool = corpus.pool_rows(range(60))
    pool.at[5, "annotators"], pool.at[5, "votes"] = ["alice", "bob"], ["3", "8"]
    pool.at[5, "label"], pool.at[5, "n_votes"], pool.at[5, "agreement"] = "3", 2, 0.5
    pool.at[6, "annotators"], pool.at[6, "votes"] = ["alice", "bob"], ["6", "6"]
    pool.at[6, "n_votes"] = 2
    result = review_label_quality(pool, LabelQAConfig(folds=3))
    row = result.review.set_index("image_id").loc[pool.at[5, "image_id"]]
    assert "annotator_disagreement" in row["reasons"]
    assert "alice: 3" in row["details"] and "bob: 8" in row["details"]
    agreement = result.annotators.set_index("annotator")["agreement"]
    assert agreement.to_dict() == {"alice": 1.0, "bob": 0.5}


def test_tiny_pool_is_reported_not_crashed():
    result = review_label_quality(corpus.pool_rows(range(3)))
    assert result.pred_probs is None and "too few" in result.unscored_reason


def test_labelstudio_export_prefills_current_and_suggested_label():
    review = pd.DataFrame(
        [
            {
                "image_id": "a" * 64,
                "label": "5",
                "suggested_label": "9",
                "severity": 0.9,
                "reasons": "label_issue",
                "label_quality": 0.1,
                "details": "model: 9",
                "source": "d",
                "original_name": "x.png",
                "uri": "s3://bucket/images/aa/x.png",
            }
        ]
    )
    (task,) = json.loads(json.dumps(labelstudio_tasks(review)))
    assert task["data"]["image"] == "s3://bucket/images/aa/x.png"
    assert (task["data"]["current_label"], task["data"]["suggested_label"]) == ("5", "9")
    assert task["predictions"][0]["result"][0]["value"]["choices"] == ["9"]
    config = labelstudio_config(["5", "9"])
    assert '<Choices name="label" toName="image"' in config and '<Choice value="9"/>' in config


def test_pigeonhole_index_finds_exactly_the_brute_force_pairs():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=40, dtype=np.int64)
    hashes = []
    for value in base:  # clusters of hashes a few bits apart
        for flips in range(3):
            bits = rng.choice(64, size=flips * 2, replace=False)
            hashes.append(f"{int(value) ^ sum(1 << int(b) for b in bits):016x}")
    found = {(i, j) for i, j, _ in candidate_pairs(hashes, 4)}
    values = [int(h, 16) for h in hashes]
    brute = {
        (i, j)
        for i in range(len(values))
        for j in range(i + 1, len(values))
        if (values[i] ^ values[j]).bit_count() <= 4
    }
    assert found == brute and len(brute) > 40


def test_a_scorer_that_cannot_separate_the_classes_flags_nothing_on_its_own():
    """Scenes (digits at random places and scales on noisy, unevenly lit backgrounds), labelled
    by their main class: thumbnails do not cluster by class, so the scorer's out-of-fold
    accuracy is near chance, and its disagreements are not passed off as label errors. A
    near-duplicate conflict is still flagged: that signal needs no scorer."""
    from cvops_pipelines.demo.scenes import scenes

    items = [s for s in scenes(300, seed=4) if s.labels]
    rows = [
        corpus.pool_row(
            item.png(), max(sorted(set(item.labels)), key=item.labels.count), f"{n}.png", "scenes"
        )
        for n, item in enumerate(items)
    ]
    pool = pd.DataFrame(rows)
    twin = pool.iloc[[0]].assign(
        image_id="f" * 64, label="0" if pool.at[0, "label"] != "0" else "1"
    )
    pool = pd.concat([pool, twin], ignore_index=True)
    result = review_label_quality(pool)
    assert result.scorer_accuracy < LabelQAConfig().min_scorer_accuracy
    assert not result.judged and "cannot tell label errors" in result.unscored_reason
    reasons = set(result.review["reasons"].str.split(";").explode())
    assert "label_issue" not in reasons
    assert reasons == {"near_duplicate_conflict"}
    assert set(result.review["image_id"]) == {pool.at[0, "image_id"], "f" * 64}


def _class_embeddings(labels: list[str], spread: float, seed: int) -> np.ndarray:
    """Features that cluster by the true class (one direction per class, plus noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, 32))
    return centres[[int(c) for c in labels]] + rng.normal(0, spread, (len(labels), 32))


def _objects_pool(count: int = 400, flips: int = 40) -> tuple[pd.DataFrame, list[str], set[int]]:
    """Objects images (pixels do not cluster by class), `flips` labels flipped at random."""
    from cvops_pipelines.demo.objects import object_image

    made = [object_image(i, seed=3) for i in range(count)]
    truth = [label for _, label in made]
    rng = np.random.default_rng(0)
    given = list(truth)
    flipped = set(rng.choice(len(made), flips, replace=False).tolist())
    for i in flipped:
        given[i] = str(rng.choice([c for c in range(10) if str(c) != truth[i]]))
    pool = pd.DataFrame(
        [
            corpus.pool_row(corpus.encode(Image.fromarray(image), "PNG"), given[n], f"{n}.png")
            for n, (image, _) in enumerate(made)
        ]
    )
    return pool, truth, flipped


def test_learned_embeddings_that_know_the_classes_are_chosen_and_find_the_flips():
    """On images whose pixels do not cluster by class, the thumbnail scorer is near chance; an
    embedding that does cluster by the true class wins the out-of-fold comparison, judges, and
    what it flags is mostly the flipped labels. The metadata keeps every candidate's accuracy."""
    pool, truth, flipped = _objects_pool()
    embeddings = {"encoder (linear probe)": _class_embeddings(truth, 0.3, 1)}
    result = review_label_quality(pool, LabelQAConfig(), embeddings)
    assert result.scorer == "encoder (linear probe)"
    assert set(result.candidates) == {THUMBNAILS, "encoder (linear probe)"}
    assert result.candidates[THUMBNAILS] < LabelQAConfig().min_scorer_accuracy
    assert result.scorer_accuracy == max(result.candidates.values()) and result.judged
    flagged = set(result.review["image_id"])
    caught = flagged & {pool.at[i, "image_id"] for i in flipped}
    assert len(caught) >= 0.8 * len(flipped) and len(caught) >= 0.8 * len(flagged)

    # rows a candidate may not judge (a champion's own training images) would go to the
    # thumbnails; here they cannot judge either, so those rows are left unscored, and said so
    partial = embeddings["encoder (linear probe)"].copy()
    partial[:100] = np.nan
    mixed = review_label_quality(pool, LabelQAConfig(), {"encoder (linear probe)": partial})
    assert mixed.scorer == "encoder (linear probe) on 300 images" and mixed.scored == 300
    assert "100 images no learned scorer may judge are not scored" in (mixed.unscored_reason)
    assert not set(mixed.review["image_id"]) & set(pool["image_id"][:100])
    flipped_later = {pool.at[i, "image_id"] for i in flipped if i >= 100}
    assert len(set(mixed.review["image_id"]) & flipped_later) > len(flipped_later) / 2


def test_thumbnails_stay_the_scorer_where_they_know_the_classes_better(noisy_pool):
    """Embeddings that know nothing lose to the thumbnail scorer on the centred digits: the rule
    picks by out-of-fold accuracy, not by which features are newer."""
    pool, _ = noisy_pool
    useless = np.random.default_rng(5).normal(size=(len(pool), 16))
    result = review_label_quality(pool, LabelQAConfig(), {"noise (linear probe)": useless})
    assert result.scorer == THUMBNAILS
    assert result.candidates["noise (linear probe)"] < result.candidates[THUMBNAILS]


def test_an_out_of_fold_scorer_competes_under_the_same_rule():
    """A scorer that makes its own out-of-fold probabilities (a fine-tuned network in the asset)
    is called with the scored rows, their labels, the classes, folds and seed; when it knows
    the classes better than a useless probe and the thumbnails, it scores and finds the flips."""
    pool, truth, flipped = _objects_pool()
    features = _class_embeddings(truth, 0.3, 1)
    calls = []

    def fine_tuned(rows, labels, classes, folds, seed):
        calls.append((rows, labels, classes, folds, seed))
        return out_of_fold_probabilities(features[rows], labels, probe_model, folds, seed)

    useless = {"noise (linear probe)": np.random.default_rng(5).normal(size=(len(pool), 16))}
    config = LabelQAConfig(folds=4, seed=7)
    result = review_label_quality(pool, config, useless, {"fine-tuned": fine_tuned})
    [(rows, labels, classes, folds, seed)] = calls
    assert list(rows) == list(range(len(pool))) and (folds, seed) == (4, 7)
    assert [classes[i] for i in labels] == list(pool["label"])
    assert set(result.candidates) == {THUMBNAILS, "noise (linear probe)", "fine-tuned"}
    assert result.scorer == "fine-tuned" and result.judged
    assert result.candidates["fine-tuned"] > result.candidates["noise (linear probe)"]
    caught = set(result.review["image_id"]) & {pool.at[i, "image_id"] for i in flipped}
    assert len(caught) >= 0.8 * len(flipped) and len(caught) >= 0.8 * len(result.review)


def test_the_costly_scorer_runs_only_when_the_cheap_ones_cannot_judge(noisy_pool):
    """An escalation scorer (the fine-tuned network in the asset, by default) is not called
    where the thumbnails judge (the digits); where nothing cheap can (the objects), it is
    called, says why, and judges; where it declines (over its budget), the others' verdict
    stands and the note says what to change."""
    calls = []

    def costly(rows, labels, classes, folds, seed):
        calls.append(len(rows))
        return out_of_fold_probabilities(features[rows], labels, probe_model, folds, seed)

    digits, _ = noisy_pool
    features = np.zeros((len(digits), 2))
    result = review_label_quality(digits, LabelQAConfig(), None, None, {"costly": costly})
    assert calls == [] and result.judged and result.escalated == ""
    assert "costly" not in result.candidates

    pool, truth, flipped = _objects_pool()
    features = _class_embeddings(truth, 0.3, 1)
    result = review_label_quality(pool, LabelQAConfig(), None, None, {"costly": costly})
    assert calls == [len(pool)] and "agrees with only" in result.escalated
    assert result.scorer == "costly" and result.judged
    caught = set(result.review["image_id"]) & {pool.at[i, "image_id"] for i in flipped}
    assert len(caught) >= 0.8 * len(flipped)

    def over_budget(rows, labels, classes, folds, seed):
        raise ScorerDeclined("would take 9.0 min, over its budget of 1.0 min")

    declined = review_label_quality(pool, LabelQAConfig(), None, None, {"costly": over_budget})
    assert declined.escalated and not declined.judged and len(declined.review) == 0
    assert "costly: would take 9.0 min, over its budget" in declined.unscored_reason
