"""One tracked run for every trainer (classifier, detector, self-supervised encoder): the same
MLflow run layout whatever is trained, so a new trainer brings its training loop and nothing
else. Parameters and the dataset go in first, each epoch's figures as they come (to MLflow at
their step, to the run's history table, to the log), the weights and the spec last; the run is
registered under an alias once it is closed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import pandas as pd

from cvops_pipelines.core.base.handoffs import TrainedModelRecord
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.base.tracking import Tracking
from cvops_pipelines.core.build.models import state_dict_bytes
from cvops_pipelines.core.build.training import FitResult

Log = Callable[[str], None]


@dataclass
class TrainedModel:
    """What a trainer's tracked run gives the `trained_model` asset."""

    record: TrainedModelRecord  # the asset value: what evaluation and export read
    history: pd.DataFrame  # one row per epoch
    trials: pd.DataFrame  # one row per search trial (empty without a search)
    config: object  # the trainer's config, as trained (after a search)
    run_url: str
    model_url: str


@dataclass
class TrackedRun:
    tracking: Tracking
    run_id: str
    epochs: int
    log: Log
    history: list[dict] = field(default_factory=list)

    def epoch(self, epoch: int, metrics: dict) -> None:
        self.tracking.log_metrics(metrics, step=epoch)
        self.history.append({"epoch": epoch, **{k: round(v, 4) for k, v in metrics.items()}})
        figures = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self.log(f"epoch {epoch}/{self.epochs}: {figures}")

    def finish(self, model, spec, metrics: dict | None = None) -> None:
        """The run's closing figures, then the weights (a state dict, never a pickle) and the
        spec that rebuilds the model (`build.registry`)."""
        if metrics:
            self.tracking.log_metrics(metrics)
        self.tracking.log_model_files(self.run_id, state_dict_bytes(model), spec)

    def register(self, alias: str, tags: dict) -> str:
        """After the run closed: a new version of the registered model, under `alias`."""
        return self.tracking.register(self.run_id, alias, tags)


@contextmanager
def tracked_run(
    tracking: Tracking,
    title: str,
    tags: dict,
    params: dict,
    epochs: int,
    log: Log,
    dataset: pd.DataFrame | None = None,
    store: Store | None = None,
) -> Iterator[TrackedRun]:
    """`dataset`: the dataset version's rows, logged as the run's input (with `store`)."""
    with tracking.start_run(title, tags) as run:
        tracking.log_params(params)
        if dataset is not None:
            version = str(dataset["dataset_version"].iloc[0])
            tracking.log_dataset(dataset, version, store.uri(f"datasets/{version}"))
        yield TrackedRun(tracking, run.info.run_id, epochs, log)


def trained_model(
    task: str,
    run: TrackedRun,
    model_version: str,
    rows: pd.DataFrame,
    config,
    result: FitResult,
    validation: dict[str, float],
    trials: pd.DataFrame,
    answer_threshold: float | None = None,
) -> TrainedModel:
    """What every trainer's tracked run hands the asset, once its version is registered."""
    tracking = run.tracking
    record = TrainedModelRecord(
        task=task,
        model_name=tracking.model_name,
        model_version=model_version,
        run_id=run.run_id,
        dataset_version=str(rows["dataset_version"].iloc[0]),
        dataset_images=len(rows),
        architecture=config.architecture,
        image_size=config.image_size,
        classes=list(result.preprocess.classes),
        best_epoch=result.best_epoch,
        stopped_early=result.stopped_early,
        train_images_per_second=result.train_images_per_second,
        validation=validation,
        answer_threshold=answer_threshold,
        config=asdict(config),
    )
    return TrainedModel(
        record,
        pd.DataFrame(result.history).round(4),
        trials,
        config,
        tracking.run_url(run.run_id),
        tracking.model_version_url(model_version),
    )
