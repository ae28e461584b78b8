"""One tracked self-supervised run: every ingested image (drops and field feedback, labeled or
not) in, an encoder registered as `<model>-encoder` with alias `current` out; and the two ways
the loop uses it (label QA embeddings and fine-tuned scorer, `init_from: ssl_encoder`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.images import load_images
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.base.tracking import Tracking
from cvops_pipelines.core.build.models import (
    Preprocess,
    build_model,
    pick_device,
)
from cvops_pipelines.core.build.oof import (
    ENCODER_FOLDS,
    finetuned_oof_probabilities,
    fold_recipe,
)
from cvops_pipelines.core.build.registry import LoadedModel, load
from cvops_pipelines.core.build.ssl import (
    SSLConfig,
    classifier_state,
    embed,
    penultimate,
    pretrain,
)
from cvops_pipelines.core.build.tracked import Log, tracked_run
from cvops_pipelines.core.curate.label_qa import OutOfFoldScorer

ENCODER_ALIAS = "current"


@dataclass(frozen=True)
class EncoderPolicy:
    min_images: int = 500  # fewer teach a contrastive encoder little
    min_growth: float = 0.25  # retrain once the store holds this share more images than it saw


def stored_images(store: Store) -> int:
    """Images in the content-addressed store (drops and field feedback alike)."""
    return sum(1 for _ in store.list("images/"))


def encoder_due(stored: int, trained_on: int | None, policy: EncoderPolicy) -> tuple[bool, str]:
    """(retrain?, why): the rule ssl_encoder_sensor applies to the image store's count."""
    if stored < policy.min_images:
        return False, f"{stored} images stored, fewer than min_images={policy.min_images}"
    if trained_on is None:
        return True, f"no encoder yet and {stored} images stored"
    if stored >= trained_on * (1 + policy.min_growth):
        return True, f"{stored} images stored, the encoder saw {trained_on}"
    wanted = int(np.ceil(trained_on * (1 + policy.min_growth)))
    return False, f"{stored} images stored; retrains at {wanted} (saw {trained_on})"


def all_images(raw_images: pd.DataFrame, field_images: pd.DataFrame) -> pd.DataFrame:
    """Each ingested image once, wherever it came from (a field image may also be in a drop)."""
    frames = [f[["image_id", "key", "source"]] for f in (raw_images, field_images) if len(f)]
    if not frames:
        return pd.DataFrame(columns=["image_id", "key", "source"])
    return pd.concat(frames, ignore_index=True).drop_duplicates("image_id").reset_index(drop=True)


def pretrain_tracked(
    tracking: Tracking,
    store: Store,
    images: pd.DataFrame,
    config: SSLConfig,
    device: str,
    tags: dict,
    log: Log,
) -> dict:
    """Pretrain on `images` (one row per image) in one MLflow run; register the encoder."""
    encoders = tracking.encoders()
    encoders.check()
    log(f"loading {len(images)} images at {config.image_size}px; pretraining on {device}")
    arrays = load_images(store, list(images["key"]), config.image_size)
    title = f"ssl {config.architecture} on {len(images)} images"
    params = {**asdict(config), "device": device, "images": len(images), "method": "SimCLR"}
    with tracked_run(encoders, title, tags, params, config.epochs, log) as run:
        result = pretrain(arrays, config, device, run.epoch)
        run.finish(result.model, result.spec)
    version = run.register(ENCODER_ALIAS, tags)
    sources = images["source"].astype(str)
    return {
        "model_name": encoders.model_name,
        "model_version": version,
        "run_id": run.run_id,
        "architecture": config.architecture,
        "image_size": config.image_size,
        "images": len(images),
        "field_images": int(sources.str.startswith("feedback/").sum()),
        "image_ids_hash": pd.util.hash_pandas_object(images["image_id"], index=False).sum().item(),
        "final_loss": round(result.history[-1]["ssl_loss"], 4),
        "images_per_second": round(result.images_per_second, 1),
        "run_url": encoders.run_url(run.run_id),
        "model_url": encoders.model_version_url(version),
    }


def current_encoder(tracking: Tracking) -> LoadedModel | None:
    return load(tracking.encoders(), alias=ENCODER_ALIAS)


def learned_embeddings(
    encoder: LoadedModel | None,
    champion: LoadedModel | None,
    store: Store,
    pool: pd.DataFrame,
    log: Log,
    champion_trained_on: set[str] = frozenset(),
) -> dict[str, np.ndarray]:
    """The pool's learned features for label QA, by scorer name: the SSL encoder's (it never
    saw a label) and the champion classifier's penultimate layer. The champion trained on part
    of this pool and agrees with those labels, flipped ones included, so its rows for
    `champion_trained_on` are NaN: not its to judge."""
    found = {}
    if encoder is not None:
        found[f"ssl_encoder v{encoder.version} (linear probe)"] = (
            encoder.model,
            encoder.preprocess,
            set(),
        )
    if champion is not None and isinstance(champion.preprocess, Preprocess):
        found[f"champion v{champion.version} penultimate layer (linear probe)"] = (
            penultimate(champion.model),
            champion.preprocess,
            champion_trained_on,
        )
    out, decoded = {}, {}  # decoded: input size -> pool row -> image, each decoded once
    for name, (model, spec, excluded) in found.items():
        rows = np.flatnonzero(~pool["image_id"].isin(excluded).to_numpy())  # only what it judges
        log(f"embedding {len(rows)} of {len(pool)} images with {name}")
        cache = decoded.setdefault(spec.image_size, {})
        missing = [i for i in rows if i not in cache]
        keys = list(pool["key"].iloc[missing])
        cache.update(zip(missing, load_images(store, keys, spec.image_size)))
        features = embed(model, [cache[i] for i in rows], spec) if len(rows) else np.empty((0, 1))
        out[name] = np.full((len(pool), features.shape[1]), np.nan, dtype=np.float32)
        out[name][rows] = features
    return out


def init_from_encoder(
    tracking: Tracking,
    model,
    architecture: str,
    log: Log,
    transplant: Callable = classifier_state,
    what: str = "",
) -> dict | None:
    """`model`'s starting state with the current encoder's tensors in it (`transplant(encoder,
    model)`), or None (with a log line) while there is no encoder. `architecture`: the encoder
    it needs; `what`: the model it starts, for the refusal (default: the architecture)."""
    encoder = current_encoder(tracking)
    if encoder is None:
        log("no ssl_encoder yet: training from scratch (materialize ssl_encoder first)")
        return None
    if encoder.preprocess.architecture != architecture:
        raise ValueError(
            f"cannot start a {what or architecture} from ssl_encoder v{encoder.version}: it is "
            f"a {encoder.preprocess.architecture} (pretrain ssl_encoder with architecture "
            f"{architecture})"
        )
    log(f"starting from ssl_encoder v{encoder.version}")
    return transplant(encoder.model, model)


def finetuned_scorer(
    encoder: LoadedModel | None,
    store: Store,
    pool: pd.DataFrame,
    log: Log,
    epochs: int | None = None,
    budget_s: float | None = None,
) -> dict[str, OutOfFoldScorer]:
    """Label QA's fine-tuned candidate (core/build/oof.py), by scorer name: from the encoder
    when there is one (its architecture and input size, fewer folds and epochs), else from
    scratch; within `budget_s` seconds (None: no limit)."""
    config = (
        fold_recipe(epochs, encoder.preprocess.architecture, encoder.preprocess.image_size)
        if encoder is not None
        else fold_recipe(epochs)
    )
    name = f"{config.architecture} fine-tuned out of fold"
    if encoder is not None:
        name += f" from ssl_encoder v{encoder.version}"
    device = pick_device(config.device)

    def score(rows, labels, classes, folds, seed):
        images = load_images(store, list(pool["key"].iloc[rows]), config.image_size)
        start = None
        if encoder is not None:
            start = classifier_state(encoder.model, build_model(config.architecture, len(classes)))
            folds = min(folds, ENCODER_FOLDS)

        def progress(fold: int, held_out: np.ndarray) -> None:
            log(f"{name}: fold {fold + 1}/{folds} ({len(held_out)} held-out images, {device})")

        return finetuned_oof_probabilities(
            images, labels, classes, folds, seed, config, start, device, progress, budget_s, log
        )

    return {name: score}
