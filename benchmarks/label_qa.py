"""Label QA: precision, recall and F1 of flagged vs truly flipped labels.

Data: all 1,797 demo digits (rendered exactly as the demo renders them), 10% of labels flipped to
another class at random, for several seeds.
(a) textbook baseline: cleanlab `find_label_issues` on 5-fold out-of-fold probabilities of a
    logistic regression over the raw 32x32 pixels.
(b) cvops: `review_label_quality` as the label_issues asset runs it (all signals); every image in
    its review table counts as flagged.
"""

import time

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.images import phash_of_thumbnail, thumbnail
from cvops_pipelines.core.curate.label_qa import review_label_quality
from cvops_pipelines.demo.data import render_digit


def _scores(flagged: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((flagged & truth).sum())
    precision = tp / max(int(flagged.sum()), 1)
    recall = tp / max(int(truth.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "flagged": int(flagged.sum()),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
    }


def _flip(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    flipped = rng.choice(len(labels), int(round(share * len(labels))), replace=False)
    for i in flipped:
        noisy[i] = rng.choice([c for c in range(10) if c != labels[i]])
    truth = np.zeros(len(labels), bool)
    truth[flipped] = True
    return noisy, truth


def baseline(pixels: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    probs = cross_val_predict(
        LogisticRegression(max_iter=1000), pixels, labels, cv=cv, method="predict_proba"
    )
    return find_label_issues(labels, probs, n_jobs=1)


def cvops(thumbs: list, labels: np.ndarray, seed: int) -> np.ndarray:
    ids = [f"{i:064x}" for i in range(len(labels))]
    pool = pd.DataFrame(
        {
            "image_id": ids,
            "label": labels.astype(str),
            "n_votes": 1,
            "agreement": 1.0,
            "annotators": [[""]] * len(ids),
            "votes": [[str(v)] for v in labels],
            "source": "demo",
            "original_name": ids,
            "uri": ids,
            "phash": [phash_of_thumbnail(t) for t in thumbs],
            "thumb": [t.tobytes() for t in thumbs],
        }
    )
    from cvops_pipelines.core.curate.label_qa import LabelQAConfig

    review = review_label_quality(pool, LabelQAConfig(seed=seed)).review
    return np.isin(ids, review["image_id"])


def run(quick: bool = False) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = 600 if quick else len(digits.target)
    seeds = [0] if quick else [0, 1, 2]
    images = [render_digit(im).convert("RGB") for im in digits.images[:n]]
    thumbs = [thumbnail(im) for im in images]
    pixels = np.stack(
        [np.asarray(im.convert("L"), dtype=np.float64).ravel() / 255 for im in images]
    )
    labels = digits.target[:n]
    per_seed = []
    for seed in seeds:
        noisy, truth = _flip(labels, 0.10, seed)
        started = time.perf_counter()
        a = _scores(baseline(pixels, noisy, seed), truth)
        a["seconds"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        b = _scores(cvops(thumbs, noisy, seed), truth)
        b["seconds"] = round(time.perf_counter() - started, 1)
        per_seed.append({"seed": seed, "baseline_logreg_raw_pixels": a, "cvops": b})
        print(per_seed[-1], flush=True)
    mean = lambda key, metric: round(float(np.mean([s[key][metric] for s in per_seed])), 4)  # noqa: E731
    return {
        "benchmark": "label_qa",
        "images": n,
        "noise": 0.10,
        "seeds": seeds,
        "baseline_logreg_raw_pixels": {
            m: mean("baseline_logreg_raw_pixels", m)
            for m in ("precision", "recall", "f1", "seconds")
        },
        "cvops": {m: mean("cvops", m) for m in ("precision", "recall", "f1", "seconds")},
        "per_seed": per_seed,
        "target": "cvops f1 >= baseline f1",
    }
