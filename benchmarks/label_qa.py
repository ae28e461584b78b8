"""Label QA: precision, recall and F1 of flagged vs truly flipped labels, on two data sets.

digits: all 1,797 demo digits (rendered exactly as the demo renders them): centred, aligned,
  dark on white; raw pixels cluster by class.
objects: 2,000 images of demo/objects.py (a digit glyph at a random position, scale, rotation and
  colour on a noisy, unevenly lit, tinted background); raw pixels do not cluster by class. The
  SSL encoder is pretrained once on these 2,000 images plus 2,000 unlabeled "field" images of
  the same kind (no label is ever read), then serves every noise seed.
On each, 10% of labels are flipped to another class at random, for several seeds.
(a) textbook baseline: cleanlab `find_label_issues` on 5-fold out-of-fold probabilities of a
    logistic regression over the raw pixels.
(b) cvops: `review_label_quality` as the label_issues asset runs it by default (all signals; on
    objects with the SSL encoder's embeddings as a candidate scorer, as when ssl_encoder is
    registered, and with `finetune_scorer: auto`: when no cheap scorer can judge, a resnet18
    fine-tuned from the encoder once per fold (core/build/oof.py: 4 folds x 16 epochs, 8 views
    of each held-out image) within the default budget of 10 minutes); every image in its
    review table counts as flagged.
    Its escalation's CPU time (process time, every core) is reported apart.
(c) objects only, cvops without an encoder and without the escalation: the cheap scorers alone.
(d) objects only, cvops with a champion and no encoder: a resnet18 trained on the noisy pool as
    trained_model would (80/10/10 split), its penultimate layer as the learned features for the
    images it did not train on (the thumbnails score the rest), as label_issues does.
On the digits the thumbnails judge, so (b) never escalates there.
The encoder is cached under benchmarks/results/cache/ by its configuration (tensors only, read
back with weights_only=True): a re-run measures label QA, not the pretraining again.
"""

import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.images import phash_of_thumbnail, thumbnail
from cvops_pipelines.core.build.ssl import SSLConfig
from cvops_pipelines.core.build.training import TrainConfig
from cvops_pipelines.core.curate.label_qa import review_label_quality
from cvops_pipelines.demo.data import render_digit

OBJECTS_SSL = SSLConfig(image_size=32, epochs=60, batch_size=128)
CHAMPION = TrainConfig(image_size=32, epochs=20, batch_size=64, augmentation="strong")
CACHE = Path(__file__).parent / "results" / "cache"


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


def _pool(thumbs: list, labels: np.ndarray) -> pd.DataFrame:
    ids = [f"{i:064x}" for i in range(len(labels))]
    return pd.DataFrame(
        {
            "image_id": ids,
            "label": labels.astype(str),
            "n_votes": 1,
            "agreement": 1.0,
            "annotators": [[""]] * len(ids),
            "votes": [[str(v)] for v in labels],
            "source": "bench",
            "original_name": ids,
            "uri": ids,
            "phash": [phash_of_thumbnail(t) for t in thumbs],
            "thumb": [t.tobytes() for t in thumbs],
        }
    )


def cvops(
    thumbs: list,
    labels: np.ndarray,
    seed: int,
    embeddings: dict | None = None,
    escalation: dict | None = None,
) -> dict:
    from cvops_pipelines.core.curate.label_qa import LabelQAConfig

    pool = _pool(thumbs, labels)
    result = review_label_quality(pool, LabelQAConfig(seed=seed), embeddings, None, escalation)
    return {
        "flagged": np.isin(pool["image_id"], result.review["image_id"]),
        "scorer": result.scorer,
        "scorer_oof_accuracy": round(result.scorer_accuracy or 0.0, 4),
        "judged": result.judged,
        "escalated": result.escalated,
        "note": result.unscored_reason,
        "candidates_oof_accuracy": {k: round(v, 4) for k, v in result.candidates.items()},
    }


def _one_seed(
    pixels, thumbs, labels, seed: int, embeddings: dict | None, images=None, escalation=None
) -> dict:
    noisy, truth = _flip(labels, 0.10, seed)
    started = time.perf_counter()
    a = _scores(baseline(pixels, noisy, seed), truth)
    a["seconds"] = round(time.perf_counter() - started, 1)
    started, cpu = time.perf_counter(), time.process_time()
    found = cvops(thumbs, noisy, seed, embeddings, escalation)
    b = _scores(found.pop("flagged"), truth) | found
    b["flagged_share"] = round(b["flagged"] / len(labels), 4)
    b["seconds"] = round(time.perf_counter() - started, 1)
    b["cpu_minutes"] = round((time.process_time() - cpu) / 60, 2)
    if ESCALATION_SPENT:  # it ran: the cheap scorers could not judge
        b["escalation"] = ESCALATION_SPENT.pop()
    row = {"seed": seed, "baseline_logreg_raw_pixels": a, "cvops": b}
    if embeddings:
        c = cvops(thumbs, noisy, seed)
        row["cvops_without_encoder"] = _scores(c.pop("flagged"), truth) | c
    if images is not None:
        started = time.perf_counter()
        champion = {
            "champion penultimate layer (linear probe)": champion_embeddings(
                images, noisy, seed, len(images) < 1000
            )
        }
        d = cvops(thumbs, noisy, seed, champion)
        row["cvops_champion_only"] = _scores(d.pop("flagged"), truth) | d
        row["cvops_champion_only"]["seconds_with_training"] = round(
            time.perf_counter() - started, 1
        )
    print(row, flush=True)
    return row


def _summary(per_seed: list[dict]) -> dict:
    out = {}
    for key in (
        "baseline_logreg_raw_pixels",
        "cvops",
        "cvops_without_encoder",
        "cvops_champion_only",
    ):
        if key in per_seed[0]:
            out[key] = {
                m: round(float(np.mean([s[key][m] for s in per_seed])), 4)
                for m in ("precision", "recall", "f1", "flagged")
            }
    out["cvops"]["flagged_share"] = round(
        float(np.mean([s["cvops"]["flagged_share"] for s in per_seed])), 4
    )
    out["cvops"]["cpu_minutes"] = round(
        float(np.mean([s["cvops"]["cpu_minutes"] for s in per_seed])), 2
    )
    spent = [s["cvops"]["escalation"] for s in per_seed if "escalation" in s["cvops"]]
    if spent:
        out["cvops"]["escalation_cpu_minutes"] = round(
            float(np.mean([e["cpu_minutes"] for e in spent])), 2
        )
        out["cvops"]["escalation_wall_minutes"] = round(
            float(np.mean([e["wall_minutes"] for e in spent])), 2
        )
    return out


def digits_set(quick: bool) -> dict:
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
    per_seed = [_one_seed(pixels, thumbs, labels, seed, None) for seed in seeds]
    return {
        "images": n,
        "seeds": seeds,
        **_summary(per_seed),
        "per_seed": per_seed,
        "target": "cvops f1 >= 0.919 (no loss against the thumbnail scorer's figure)",
    }


def champion_embeddings(images: list, noisy: np.ndarray, seed: int, quick: bool) -> np.ndarray:
    """What label_issues embeds with when the pool has a champion and no encoder: a classifier
    trained, as trained_model trains it, on a dataset version of this noisy pool (80% train,
    10% val; the other 10% is its test split), its penultimate layer for every image."""
    from cvops_pipelines.core.build.ssl import embed, penultimate
    from cvops_pipelines.core.build.training import fit

    order = np.random.default_rng(seed).permutation(len(images))
    train, val = (
        order[: int(0.8 * len(order))],
        order[int(0.8 * len(order)) : int(0.9 * len(order))],
    )
    config = replace(CHAMPION, epochs=3 if quick else CHAMPION.epochs, seed=seed)
    result = fit(
        ([images[i] for i in train], noisy[train]),
        ([images[i] for i in val], noisy[val]),
        [str(c) for c in range(10)],
        config,
    )
    features = embed(penultimate(result.model), images, result.preprocess)
    features[train] = np.nan  # as label_issues does: not its to judge (see learned_embeddings)
    return features


BUDGET_S = 600.0  # label_issues' default finetune_budget_minutes
ESCALATION_SPENT: list[dict] = []  # what each escalation cost, popped by _one_seed


def _finetune_config(quick: bool, spec) -> TrainConfig:
    from cvops_pipelines.core.build.oof import fold_recipe

    return fold_recipe(2 if quick else None, spec.architecture, spec.image_size)


def finetuned(images: list, encoder, quick: bool) -> dict:
    """label_issues' escalation (core/build/ssl_run.finetuned_scorer) on in-memory images: a
    resnet18 started from the SSL encoder, trained once per fold within the default budget."""
    from cvops_pipelines.core.build.models import build_model
    from cvops_pipelines.core.build.oof import ENCODER_FOLDS, finetuned_oof_probabilities
    from cvops_pipelines.core.build.ssl import classifier_state

    config = _finetune_config(quick, encoder.spec)

    def score(rows, labels, classes, folds, seed):
        started, cpu = time.perf_counter(), time.process_time()
        start = classifier_state(encoder.model, build_model(config.architecture, len(classes)))
        picked, folds = [images[i] for i in rows], min(folds, ENCODER_FOLDS)
        try:
            return finetuned_oof_probabilities(
                picked, labels, classes, folds, seed, config, start, "cpu", None, BUDGET_S, print
            )
        finally:
            ESCALATION_SPENT.append(
                {
                    "cpu_minutes": round((time.process_time() - cpu) / 60, 2),
                    "wall_minutes": round((time.perf_counter() - started) / 60, 2),
                }
            )

    return {"resnet18 fine-tuned out of fold from ssl_encoder": score}


def cached_encoder(images: list, ssl: SSLConfig, quick: bool):
    """The objects encoder, pretrained once per configuration and kept as tensors."""
    import hashlib
    import io
    import json

    import torch

    from cvops_pipelines.core.build.ssl import EncoderSpec, Pretrained, load_encoder, pretrain

    key = hashlib.sha256(json.dumps([asdict(ssl), len(images), quick]).encode()).hexdigest()
    path = CACHE / f"objects_encoder-{key[:16]}.pt"
    spec = EncoderSpec(ssl.architecture, ssl.image_size)
    if path.exists():
        meta = json.loads(path.with_suffix(".json").read_text())
        return Pretrained(load_encoder(path.read_bytes(), spec), spec, []), meta["pretrain_s"]
    started = time.perf_counter()
    encoder = pretrain(
        images, ssl, on_epoch=lambda e, m: print(f"ssl epoch {e}: {m['ssl_loss']:.4f}", flush=True)
    )
    pretrain_s = round(time.perf_counter() - started, 1)
    CACHE.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(encoder.model.state_dict(), buffer)
    path.write_bytes(buffer.getvalue())
    path.with_suffix(".json").write_text(json.dumps({"pretrain_s": pretrain_s}))
    return encoder, pretrain_s


def objects_set(quick: bool, ssl: SSLConfig = OBJECTS_SSL) -> dict:
    from PIL import Image

    from cvops_pipelines.core.build.ssl import embed
    from cvops_pipelines.demo.objects import objects

    n, field = (600, 600) if quick else (2000, 2000)
    seeds = [0] if quick else [0, 1, 2]
    images, labels = objects(n, seed=100)
    unlabeled, _ = objects(field, seed=200)
    ssl = replace(ssl, epochs=max(2, ssl.epochs // 10)) if quick else ssl
    encoder, pretrain_s = cached_encoder(images + unlabeled, ssl, quick)
    embeddings = {"ssl_encoder (linear probe)": embed(encoder.model, images, encoder.spec)}
    pil = [Image.fromarray(im) for im in images]
    thumbs = [thumbnail(im) for im in pil]
    pixels = np.stack(  # grey 32x32, as for the digits: the baseline's cost stays bounded
        [np.asarray(im.convert("L").resize((32, 32)), np.float64).ravel() / 255 for im in pil]
    )
    escalation = finetuned(images, encoder, quick)
    per_seed = [
        _one_seed(pixels, thumbs, labels, seed, embeddings, images, escalation) for seed in seeds
    ]
    return {
        "images": n,
        "unlabeled_field_images": field,
        "seeds": seeds,
        "ssl": {**asdict(ssl), "pretrain_s": pretrain_s},
        **_summary(per_seed),
        "per_seed": per_seed,
        "escalation": asdict(_finetune_config(quick, encoder.spec)) | {"budget_s": BUDGET_S},
        "target": "cvops f1 >= 0.80 with at most 15% of the pool flagged, by default, at most "
        "5 CPU-minutes of escalation per 2,000 images",
    }


def run(quick: bool = False) -> dict:
    return {
        "benchmark": "label_qa",
        "noise": 0.10,
        "digits": digits_set(quick),
        "objects": objects_set(quick),
    }
