"""One tracked training run: parameters, the dataset as the run's input, per-epoch metrics,
search trials as nested runs, the model files, and the registered `challenger` version."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.images import load_images
from cvops_pipelines.core.base.ontology import class_indices
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.base.tracking import Tracking
from cvops_pipelines.core.build.models import pick_precision
from cvops_pipelines.core.build.registry import load
from cvops_pipelines.core.build.tracked import Log, TrainedModel, tracked_run, trained_model
from cvops_pipelines.core.build.training import FitResult, TrainConfig, fit, hyperparameter_search

INIT_FROM = ("auto", "none", "champion", "challenger", "ssl_encoder")


@dataclass(frozen=True)
class RunPlan:
    """What the asset (or a caller) asks for beyond the hyperparameters."""

    device: str
    # start from a registered model: champion / challenger / ssl_encoder (the self-supervised
    # backbone, with a fresh head) / none; auto: a fine-tune of the champion while its
    # architecture and classes are this dataset version's (the ontology is unchanged), else none
    init_from: str = "auto"
    search_trials: int = 0  # learning rate x weight decay trials, each a nested run; 0 = off
    search_epochs: int = 3
    finetune_epochs: int = 3  # an auto fine-tune's epochs at most (a quick retrain's fewer win)
    finetune_lr_scale: float = 0.5  # an auto fine-tune's learning rate, times the configured
    # an auto fine-tune's images per epoch at most, where the task's trainer can draw them
    # (a classifier's): its time stays flat as the pool grows turn after turn; 0 = all
    finetune_images_per_epoch: int = 1024
    # an auto fine-tune's epochs when the champion was trained with another recipe (augmentation
    # preset): a few epochs do not learn a new recipe (the demo's drift turn: docs/benchmarks.md)
    finetune_epochs_new_recipe: int = 6

    def __post_init__(self) -> None:
        if self.init_from not in INIT_FROM:
            raise ValueError(f"init_from must be one of {INIT_FROM}, got {self.init_from!r}")
        if self.search_trials < 0 or self.search_epochs < 1:
            raise ValueError(
                f"search_trials must be >= 0 and search_epochs >= 1, got {self.search_trials} "
                f"and {self.search_epochs}"
            )
        if self.finetune_images_per_epoch < 0:
            raise ValueError("finetune_images_per_epoch must be >= 0 (0: every image)")
        if min(self.finetune_epochs, self.finetune_epochs_new_recipe) < 1 or not (
            0 < self.finetune_lr_scale <= 1
        ):
            raise ValueError(
                f"finetune_epochs must be >= 1 and finetune_lr_scale in (0, 1], got "
                f"{self.finetune_epochs} and {self.finetune_lr_scale}"
            )


@dataclass(frozen=True)
class Start:
    """Where a run starts: `source` names it (logged as the run's `started_from`)."""

    source: str  # none, champion, challenger, ssl_encoder
    state: dict | None = None
    fine_tune: bool = False  # auto chose the champion: fewer epochs, a lower learning rate
    new_recipe: bool = False  # ... which was trained with another recipe: more of those epochs

    def config(self, config, plan: RunPlan):
        """The hyperparameters this start trains with (a classifier's or a detector's)."""
        if not self.fine_tune:
            return config
        epochs = plan.finetune_epochs_new_recipe if self.new_recipe else plan.finetune_epochs
        tuned = replace(
            config,
            epochs=min(config.epochs, epochs),
            learning_rate=config.learning_rate * plan.finetune_lr_scale,
        )
        drawn = getattr(config, "images_per_epoch", None)  # None: this trainer cannot draw
        if drawn is None or not plan.finetune_images_per_epoch:
            return tuned
        cap = plan.finetune_images_per_epoch
        return replace(tuned, images_per_epoch=min(drawn, cap) if drawn else cap)


def auto_start(
    tracking: Tracking,
    architecture: str,
    classes: list[str],
    log: Log,
    recipe: dict | None = None,
) -> Start:
    """Fine-tune the champion when the ontology did not change since it was trained; train from
    scratch when it did (another class list), or when there is no champion yet. `recipe`: the
    hyperparameters (e.g. the augmentation preset) whose change makes the fine-tune a longer one,
    compared with what the champion's run logged."""
    champion = load(tracking, alias="champion")
    if champion is None:
        log("no champion yet: training from scratch")
        return Start("none")
    spec = champion.preprocess
    if (spec.architecture, list(spec.classes)) != (architecture, classes):
        log(
            f"champion v{champion.version} is a {spec.architecture} over {list(spec.classes)}: "
            "the ontology or the architecture changed, training from scratch"
        )
        return Start("none")
    trained = tracking.run_params(champion.run_id) if recipe else {}
    changed = {
        k: (trained.get(k), v) for k, v in (recipe or {}).items() if trained.get(k) != str(v)
    }
    if changed:
        log(
            f"fine-tuning champion v{champion.version} on a new recipe ("
            + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            + "): the longer fine-tune"
        )
    else:
        log(f"fine-tuning champion v{champion.version} (same architecture and classes)")
    return Start("champion", champion.model.state_dict(), fine_tune=True, new_recipe=bool(changed))


@dataclass(frozen=True)
class TrainInputs:
    """What a trainer needs, whatever the task: the dataset version's rows (each trainer loads
    the images where it trains), the hyperparameters, and where per-epoch metrics go."""

    store: Store
    rows: pd.DataFrame
    classes: list[str]
    config: object  # the task's hyperparameters (TrainConfig, DetectorConfig)
    device: str
    on_epoch: Callable[[int, dict], None]
    initial_state: dict | None
    run_id: str  # the MLflow run the metrics belong to


Trainer = Callable[[TrainInputs], FitResult]


def train_in_process(inputs: TrainInputs) -> FitResult:
    """The default trainer: this process, one device."""
    data = split_arrays(inputs.store, inputs.rows, inputs.classes, inputs.config.image_size)
    return fit(
        data["train"],
        data["val"],
        inputs.classes,
        inputs.config,
        inputs.device,
        inputs.on_epoch,
        inputs.initial_state,
    )


def split_arrays(
    store: Store, rows: pd.DataFrame, classes: list[str], image_size: int, splits=("train", "val")
) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """Each split's images decoded once at the input size, with class indices."""
    out = {}
    for split in splits:
        part = rows[rows["split"] == split]
        out[split] = (
            load_images(store, list(part["key"]), image_size),
            class_indices(part["label"], classes),
        )
    return out


def dataset_classes(rows: pd.DataFrame) -> list[str]:
    """A classifier's classes: every label of the dataset version, sorted."""
    return sorted(rows["label"].unique())


def registered_state(
    tracking: Tracking, alias: str, architecture: str, classes: list[str], log: Log
) -> dict | None:
    """The `alias` version's tensors to continue from (None, with a log line, while the alias
    is unset); refused when it is another architecture or other classes."""
    start = load(tracking, alias=alias)
    if start is None:
        log(f"no {alias} yet: training from scratch")
        return None
    spec = start.preprocess
    if (spec.architecture, list(spec.classes)) != (architecture, classes):
        raise ValueError(
            f"cannot continue from {alias} v{start.version}: it is a "
            f"{spec.architecture} over {list(spec.classes)}"
        )
    log(f"starting from {alias} v{start.version}")
    return start.model.state_dict()


def initial_state(
    tracking: Tracking, plan: RunPlan, config: TrainConfig, classes: list[str], log: Log
) -> Start:
    if plan.init_from == "none":
        return Start("none")
    if plan.init_from == "auto":
        recipe = {"augmentation": config.augmentation}
        return auto_start(tracking, config.architecture, classes, log, recipe)
    if plan.init_from == "ssl_encoder":
        from cvops_pipelines.core.build.models import build_model
        from cvops_pipelines.core.build.ssl_run import init_from_encoder

        fresh = build_model(config.architecture, len(classes))
        state = init_from_encoder(tracking, fresh, config.architecture, log)
        return Start("ssl_encoder" if state is not None else "none", state)
    state = registered_state(tracking, plan.init_from, config.architecture, classes, log)
    return Start(plan.init_from if state is not None else "none", state)


def train_tracked(
    tracking: Tracking,
    store: Store,
    rows: pd.DataFrame,
    config: TrainConfig,
    plan: RunPlan,
    tags: dict,
    log: Log,
    trainer: Trainer = train_in_process,
    trainer_params: dict | None = None,
) -> TrainedModel:
    """Train on the dataset version's train split (validation judges), log everything to one
    MLflow run, and register the result with alias `challenger`. `trainer` runs the training
    itself (in this process, or torchrun processes launched by the asset: the same run,
    metrics, files and registry entry either way); `trainer_params` are logged with it."""
    tracking.check()  # fail before minutes of image loading, not after
    version = str(rows["dataset_version"].iloc[0])
    classes = dataset_classes(rows)
    counts = rows["split"].value_counts()
    config = replace(config, precision=pick_precision(config.precision, plan.device))
    log(
        f"training on {int(counts.get('train', 0) + counts.get('val', 0))} images of "
        f"{version} at {config.image_size}px on {plan.device} ({config.precision})"
    )
    if plan.search_trials > 0 and trainer is not train_in_process:
        raise ValueError("a hyperparameter search runs in the asset's process: search_trials 0")
    tags = {**tags, "dataset_version": version}
    start = initial_state(tracking, plan, config, classes, log)
    config = start.config(config, plan)
    params = {
        **asdict(config),
        "device": plan.device,
        "classes": len(classes),
        "init_from": plan.init_from,
        "started_from": start.source,
        "train_images": int(counts.get("train", 0)),
        "val_images": int(counts.get("val", 0)),
        **(trainer_params or {}),
    }
    title = f"train {config.architecture} on {version}"
    with tracked_run(tracking, title, tags, params, config.epochs, log, rows, store) as run:
        trials = pd.DataFrame()
        if plan.search_trials > 0:
            data = split_arrays(store, rows, classes, config.image_size)
            config, trials = _search(tracking, data, classes, config, plan, tags, log)
            run.epochs = config.epochs
        result = trainer(
            TrainInputs(
                store, rows, classes, config, plan.device, run.epoch, start.state, run.run_id
            )
        )
        best = result.history[result.best_epoch - 1]
        closing = {
            "best_epoch": result.best_epoch,
            "best_val_accuracy": best["val_accuracy"],
            "best_val_loss": best["val_loss"],
        }
        run.finish(result.model, result.preprocess, closing)
    model_version = run.register("challenger", tags)
    validation = {"accuracy": best["val_accuracy"]}
    return trained_model(
        "classification", run, model_version, rows, config, result, validation, trials
    )


def _search(
    tracking: Tracking, data, classes, config: TrainConfig, plan: RunPlan, tags: dict, log: Log
) -> tuple[TrainConfig, pd.DataFrame]:
    def on_trial(index, overrides, result):
        with tracking.start_run(f"trial {index}", tags, nested=True):
            tracking.log_params(overrides)
            for row in result.history:
                tracking.log_metrics(
                    {k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"]
                )
        log(
            f"search trial {index}: {overrides} -> best val_loss "
            f"{min(r['val_loss'] for r in result.history):.4f}"
        )

    best, rows = hyperparameter_search(
        data["train"],
        data["val"],
        classes,
        config,
        plan.search_trials,
        plan.search_epochs,
        plan.device,
        on_trial,
    )
    tracking.log_params({f"searched_{k}": v for k, v in best.items()})
    return replace(config, **best), pd.DataFrame(rows)
