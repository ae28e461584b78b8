"""Active learning vs random selection: labels needed to reach random's final accuracy.

Data: all 1,797 demo digits rendered as the demo renders them (32x32 PNG), a stratified 30% held
out for testing. Model: logistic regression on the 16x16 grey image (cheap enough to retrain at
every round; the point is the selection policy, not the model). Both strategies start from the
same 20 random labels and buy 20 more per round up to the budget; cvops selects with the
annotation queue's policy (`core.active.choose`: smallest top-2 margin, discounted per
already-chosen class pair, near-duplicates skipped; a fifth of each batch a seeded random sample,
`explore_share`). Labels needed = the first budget at which
active learning reaches the accuracy random selection has at the full budget.
"""

import io

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.images import inspect_image
from cvops_pipelines.core.learn.active import QueuePolicy, choose
from cvops_pipelines.demo.data import render_digit


def _data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, phashes = [], []
    for pixels in digits.images:
        buffer = io.BytesIO()
        render_digit(pixels).save(buffer, "PNG")
        png = buffer.getvalue()
        phashes.append(inspect_image(png).phash)
        grey = render_digit(pixels, 16)
        images.append(np.asarray(grey, np.float32).ravel() / 255.0)
    return np.stack(images), digits.target, np.array(phashes)


def _fit(x, y):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=500, C=1.0).fit(x, y)


def _accuracy(model, x, y) -> float:
    return float((model.predict(x) == y).mean())


def _select(model, x, phash, labeled, size, policy_seed) -> np.ndarray:
    pool = np.flatnonzero(~labeled)
    probs = np.zeros((len(pool), 10))
    probs[:, model.classes_] = model.predict_proba(x[pool])
    order = np.argsort(-probs, 1)
    top, second = order[:, 0], order[:, 1]
    margin = probs[np.arange(len(pool)), top] - probs[np.arange(len(pool)), second]
    frame = pd.DataFrame(
        {"i": pool, "score": 1 - margin, "predicted": top, "second": second, "phash": phash[pool]}
    ).sort_values("score", ascending=False)
    picked = choose(frame, QueuePolicy(size=size, seed=policy_seed * 1000 + int(labeled.sum())))
    return picked["i"].to_numpy()


def run(quick: bool = False) -> dict:
    from sklearn.model_selection import train_test_split

    x, y, phash = _data()
    seeds = [0, 1] if quick else [0, 1, 2, 3, 4]
    start, step, budget = 20, 20, (200 if quick else 400)
    rows, curves = [], {}
    for seed in seeds:
        train, test = train_test_split(
            np.arange(len(y)), test_size=0.3, stratify=y, random_state=seed
        )
        xs, ys, hs = x[train], y[train], phash[train]
        rng = np.random.default_rng(seed)
        initial = rng.choice(len(train), start, replace=False)
        curve = {"random": [], "active": []}
        for strategy in ("random", "active"):
            labeled = np.zeros(len(train), bool)
            labeled[initial] = True
            order = rng.permutation(len(train)) if strategy == "random" else None
            while True:
                model = _fit(xs[labeled], ys[labeled])
                curve[strategy].append((int(labeled.sum()), _accuracy(model, x[test], y[test])))
                if labeled.sum() >= budget:
                    break
                if strategy == "random":
                    new = [i for i in order if not labeled[i]][:step]
                else:
                    new = _select(model, xs, hs, labeled, step, seed)
                labeled[new] = True
        target = curve["random"][-1][1]
        needed = next((n for n, acc in curve["active"] if acc >= target), None)
        rows.append(
            {
                "seed": seed,
                "random_final_accuracy": round(target, 4),
                "active_final_accuracy": round(curve["active"][-1][1], 4),
                "labels_random": budget,
                "labels_active_to_match": needed,
                "ratio": round(needed / budget, 3) if needed else None,
            }
        )
        curves[seed] = {k: [(n, round(a, 4)) for n, a in v] for k, v in curve.items()}
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    return {
        "schedule": {"start": start, "step": step, "budget": budget},
        "per_seed": rows,
        "ratio_mean": round(float(np.mean(ratios)), 3) if ratios else None,
        "ratio_worst": max(ratios) if len(ratios) == len(rows) else None,
        "target_ratio": 0.5,
        "curves": curves,
    }
