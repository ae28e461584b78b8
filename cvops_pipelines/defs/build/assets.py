"""Build stage: transfer-learning training on a dataset version, tracked and registered in MLflow."""

from dataclasses import asdict

import pandas as pd
from dagster import (AssetExecutionContext, Config, DataVersion,
                     MetadataValue, Output, asset)
from pydantic import Field

from cvops_pipelines.core.models import pick_device, state_dict_bytes
from cvops_pipelines.core.tables import markdown_table
from cvops_pipelines.core.training import (AUGMENTATIONS, TrainConfig, fit, hyperparameter_search,
                                           load_images)
from cvops_pipelines.defs.resources import CvopsStorage, MlflowTracking


class TrainedModelConfig(Config):
    architecture: str = Field("resnet18", description="Any torchvision classification model by "
                                                      "name (resnet18, mobilenet_v3_small, ...).")
    weights: str = Field("none", description="torchvision weights enum name (IMAGENET1K_V1, "
                                             "DEFAULT, ...) read from $TORCH_HOME/hub/checkpoints; "
                                             "'none' trains from scratch.")
    freeze_backbone: bool = Field(False, description="Fine-tune the head only (tiny OTA deltas).")
    image_size: int = Field(64, description="Square input side in pixels.")
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    augmentation: str = Field("light", description=f"albumentations preset: {', '.join(AUGMENTATIONS)}.")
    seed: int = 0
    patience: int = Field(3, description="Early stopping: epochs without a better validation loss.")
    ema_epochs: float = Field(4.0, description="Keep an exponential moving average of the weights "
                                               "over about this many epochs (it is what "
                                               "validation judges and what ships); 0 = off.")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps.")
    workers: int = Field(0, description="DataLoader worker processes (0 = in the training process).")
    init_from: str = Field("none", description="Start from a registered model: 'champion', "
                                               "'challenger' or 'none' (with freeze_backbone "
                                               "and 'champion': a head-only update).")
    search_trials: int = Field(0, description="Hyperparameter search: trials over learning rate "
                                              "and weight decay, each a nested MLflow run; 0 = off.")
    search_epochs: int = Field(3, description="Epochs per search trial (the search budget).")

    def train_config(self) -> TrainConfig:
        fields = TrainConfig.__dataclass_fields__
        return TrainConfig(**{k: v for k, v in self.model_dump().items() if k in fields})


def _initial_state(tracking, config: TrainedModelConfig, classes: list[str], context):
    if config.init_from == "none":
        return None
    if config.init_from not in ("champion", "challenger"):
        raise ValueError(f"init_from must be 'champion', 'challenger' or 'none', "
                         f"got {config.init_from!r}")
    start = tracking.load(alias=config.init_from)
    if start is None:
        context.log.warning(f"no {config.init_from} yet: training from scratch")
        return None
    if (start.preprocess.architecture, list(start.preprocess.classes)) != \
            (config.architecture, classes):
        raise ValueError(f"cannot continue from {config.init_from} v{start.version}: it is a "
                         f"{start.preprocess.architecture} over {list(start.preprocess.classes)}")
    context.log.info(f"starting from {config.init_from} v{start.version}")
    return start.model.state_dict()


def _split(rows: pd.DataFrame, split: str, classes: list[str]) -> pd.DataFrame:
    part = rows[rows["split"] == split]
    return part.assign(target=part["label"].map({c: i for i, c in enumerate(classes)}))


@asset(group_name="build", io_manager_key="tables", kinds={"pytorch", "mlflow"},
       description="A torchvision classifier fine-tuned on the dataset version's train split, "
                   "tracked as an MLflow run and registered with alias `challenger`. Not eager: "
                   "retraining_sensor decides when new labels or field alerts are worth a run.")
def trained_model(context: AssetExecutionContext, config: TrainedModelConfig,
                  dataset_version: pd.DataFrame, storage: CvopsStorage, mlflow: MlflowTracking):
    import mlflow as mlflow_api

    train_config = config.train_config()
    tracking = mlflow.tracking()
    tracking.check()  # fail before minutes of image loading, not after
    version = str(dataset_version["dataset_version"].iloc[0])
    classes = sorted(dataset_version["label"].unique())
    store, device = storage.store(), pick_device(config.device)
    splits = {s: _split(dataset_version, s, classes) for s in ("train", "val")}
    context.log.info(f"loading {sum(map(len, splits.values()))} images of {version} "
                     f"at {config.image_size}px; training on {device}")
    data = {s: (load_images(store, list(p["key"]), config.image_size), p["target"].to_numpy())
            for s, p in splits.items()}
    tags = {"dagster_run_id": context.run.run_id, "dagster_asset_key": "trained_model",
            "dataset_version": version}
    with tracking.start_run(f"train {config.architecture} on {version}", tags) as run:
        mlflow_api.log_params({**asdict(train_config), "device": device, "classes": len(classes),
                               "init_from": config.init_from,
                               "train_images": len(splits["train"]),
                               "val_images": len(splits["val"])})
        tracking.log_dataset(dataset_version, version, storage.store().uri(f"datasets/{version}"))
        trials = pd.DataFrame()
        if config.search_trials > 0:
            def on_trial(index, overrides, result):
                with tracking.start_run(f"trial {index}", tags, nested=True):
                    mlflow_api.log_params(overrides)
                    for row in result.history:
                        mlflow_api.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                                               step=row["epoch"])
                context.log.info(f"search trial {index}: {overrides} -> best val_loss "
                                 f"{min(r['val_loss'] for r in result.history):.4f}")

            best, rows = hyperparameter_search(data["train"], data["val"], classes, train_config,
                                               config.search_trials, config.search_epochs,
                                               device, on_trial)
            trials = pd.DataFrame(rows)
            train_config = TrainConfig(**{**asdict(train_config), **best})
            mlflow_api.log_params({f"searched_{k}": v for k, v in best.items()})

        def on_epoch(epoch: int, metrics: dict) -> None:
            mlflow_api.log_metrics(metrics, step=epoch)
            context.log.info(f"epoch {epoch}/{train_config.epochs}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in metrics.items()))

        result = fit(data["train"], data["val"], classes, train_config, device, on_epoch,
                     _initial_state(tracking, config, classes, context))
        best = result.history[result.best_epoch - 1]
        mlflow_api.log_metrics({"best_epoch": result.best_epoch,
                                "best_val_accuracy": best["val_accuracy"],
                                "best_val_loss": best["val_loss"]})
        tracking.log_model_files(run.info.run_id, state_dict_bytes(result.model), result.preprocess)
    model_version = tracking.register(run.info.run_id, "challenger", tags)
    record = {"model_name": tracking.model_name, "model_version": model_version,
              "run_id": run.info.run_id, "dataset_version": version,
              "architecture": config.architecture, "image_size": config.image_size,
              "classes": classes, "best_epoch": result.best_epoch,
              "val_accuracy": best["val_accuracy"], "stopped_early": result.stopped_early,
              "train_images_per_second": result.train_images_per_second,
              "config": asdict(train_config)}
    history = pd.DataFrame(result.history).round(4)
    metadata = {
        "model": f"{tracking.model_name} v{model_version} (alias challenger)",
        "model_version": model_version,
        "mlflow_run_id": run.info.run_id,
        "mlflow_run": MetadataValue.url(tracking.run_url(run.info.run_id)),
        "mlflow_model": MetadataValue.url(tracking.model_version_url(model_version)),
        "dataset_version": version,
        "dataset_images": len(dataset_version),
        "val_accuracy": round(best["val_accuracy"], 4),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_images_per_second": round(result.train_images_per_second, 1),
        "history": MetadataValue.md(markdown_table(history, 100)),
        "config": MetadataValue.json(asdict(train_config)),
    }
    if len(trials):
        metadata["search_trials"] = MetadataValue.md(markdown_table(trials.round(5), 50))
    return Output(record, data_version=DataVersion(f"{tracking.model_name}/v{model_version}"),
                  metadata=metadata)
