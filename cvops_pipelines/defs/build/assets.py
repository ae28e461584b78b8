"""Build stage: training on a dataset version, tracked and registered in MLflow: a classifier
(transfer learning), or a detector when the dataset version carries boxes."""

from dataclasses import asdict, fields, replace
from typing import get_type_hints

import pandas as pd
from dagster import (
    AssetExecutionContext,
    Config,
    DataVersion,
    Failure,
    MetadataValue,
    Output,
)
from pydantic import Field, create_model

from cvops_pipelines.core.base.handoffs import TrainedModelRecord
from cvops_pipelines.core.base.tables import PartitionedTable, markdown_table
from cvops_pipelines.core.build.detection_training import DetectorConfig
from cvops_pipelines.core.build.models import pick_device
from cvops_pipelines.core.build.run import INIT_FROM, RunPlan
from cvops_pipelines.core.build.ssl import SSLConfig
from cvops_pipelines.core.build.ssl_run import all_images, pretrain_tracked
from cvops_pipelines.core.build.torchrun import Distributed
from cvops_pipelines.core.build.training import TrainConfig
from cvops_pipelines.core.learn.feedback_query import field_images
from cvops_pipelines.core.learn.retraining import EncoderFacts, ModelFacts, write_facts
from cvops_pipelines.core.tasks import TaskRefused
from cvops_pipelines.defs.build.distributed import pipes_trainer
from cvops_pipelines.defs.loop import loop_asset
from cvops_pipelines.defs.resources import (
    CvopsStorage,
    DataContracts,
    MlflowTracking,
    stage_context,
)


def _config_class(name: str, spec):
    """Dagster config generated from a dataclass, the hyperparameters' one declaration (each
    field's help is its metadata's)."""
    hints = get_type_hints(spec)
    return create_model(
        name,
        __base__=Config,
        **{
            f.name: (
                hints[f.name],
                Field(f.default, description=f.metadata.get("help", "")),
            )
            for f in fields(spec)
        },
    )


_Hyperparameters = _config_class("Hyperparameters", TrainConfig)


DetectorHyperparameters = _config_class("DetectorHyperparameters", DetectorConfig)


class DistributedTraining(Config):
    processes: int = Field(
        0,
        description="torchrun processes (gloo on CPU; on CUDA one GPU each, nccl) launched "
        "through Dagster Pipes; 0 = train in the asset's own process.",
    )
    nodes: int = Field(
        1, description="Machines; more than one needs a launcher that starts each node's torchrun."
    )

    def plan(self) -> Distributed:
        if self.nodes > 1:
            raise ValueError(
                "distributed.nodes > 1: this build launches torchrun on the asset's own machine "
                "only (PipesSubprocessClient); run one node with more processes"
            )
        return Distributed(self.processes, self.nodes)


class TrainedModelConfig(_Hyperparameters):
    detector: DetectorHyperparameters = Field(  # type: ignore[valid-type]
        default_factory=DetectorHyperparameters,
        description="Used instead of the classifier's settings when the dataset version "
        "carries boxes (ontology task: detection).",
    )
    init_from: str = Field(
        "auto",
        description=f"Start from a registered model: one of {INIT_FROM} "
        "(auto: fine-tune the champion while its architecture and classes are the dataset "
        "version's, i.e. the ontology is unchanged, else from scratch; none: always from "
        "scratch; ssl_encoder: the self-supervised backbone of the same architecture with a "
        "fresh head, or a detector's backbone from a mobilenet_v3_large encoder; with "
        "freeze_backbone and 'champion': a head-only update).",
    )
    finetune_epochs: int = Field(
        3, ge=1, description="Epochs of an auto fine-tune (fewer epochs asked for win)."
    )
    finetune_epochs_new_recipe: int = Field(
        6,
        ge=1,
        description="Epochs of an auto fine-tune when the champion was trained with another "
        "augmentation preset (e.g. the retraining sensor asks for `strong` after drift).",
    )
    finetune_lr_scale: float = Field(
        0.5,
        gt=0,
        le=1,
        description="An auto fine-tune's learning rate: the configured one times this.",
    )
    finetune_images_per_epoch: int = Field(
        1024,
        ge=0,
        description="An auto fine-tune draws at most this many train images per epoch (a "
        "classifier's), so a turn's retrain stays short as the pool grows; 0 = all.",
    )
    search_trials: int = Field(
        0,
        description="Hyperparameter search: trials over learning rate "
        "(and a classifier's weight decay), each a nested MLflow run judged on the validation "
        "split (loss; a detector's mAP); 0 = off.",
    )
    search_epochs: int = Field(3, description="Epochs per search trial (the search budget).")
    distributed: DistributedTraining = Field(
        default_factory=DistributedTraining,
        description="Train with torchrun (DistributedDataParallel) instead of in this process: "
        "the same run, metrics, model files, registry entry and gate.",
    )

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})

    def detector_config(self) -> DetectorConfig:
        return DetectorConfig(
            **{f.name: getattr(self.detector, f.name) for f in fields(DetectorConfig)}
        )

    def plan(self) -> RunPlan:
        return RunPlan(
            pick_device(self.device),
            self.init_from,
            self.search_trials,
            self.search_epochs,
            self.finetune_epochs,
            self.finetune_lr_scale,
            self.finetune_images_per_epoch,
            self.finetune_epochs_new_recipe,
        )


@loop_asset(
    group_name="build",
    io_manager_key="tables",
    kinds={"pytorch", "mlflow"},
    description="A torchvision classifier (or, for a detection dataset, a detector) trained on "
    "the dataset version's train split: a short fine-tune of the champion while the ontology "
    "is unchanged, from scratch otherwise; tracked as an MLflow run and registered "
    "with alias `challenger`. Not eager: "
    "retraining_sensor decides when new labels or field alerts are worth a run.",
)
def trained_model(
    context: AssetExecutionContext,
    config: TrainedModelConfig,
    dataset_version: pd.DataFrame,
    storage: CvopsStorage,
    tracking: MlflowTracking,
    contracts: DataContracts,
) -> Output[TrainedModelRecord]:
    ctx = stage_context(context, storage, tracking, contracts, "trained_model")
    task, distributed, trainer = contracts.task(), config.distributed.plan(), None
    if distributed.processes > 0:  # torchrun processes through Dagster Pipes
        trainer = (
            pipes_trainer(context, distributed, task.name, ctx.tracking.tracking_uri),
            {"distributed_processes": distributed.processes, "distributed_nodes": 1},
        )
    try:
        trained = task.train(ctx, dataset_version, config, trainer)
    except TaskRefused as exc:
        raise Failure(str(exc)) from None
    record = replace(trained.record, task=task.name)
    facts = ModelFacts(record.model_version, record.dataset_version, record.dataset_images)
    write_facts(ctx.store, facts)  # what retraining_sensor reads
    version = DataVersion(f"{record.model_name}/v{record.model_version}")
    return Output(record, metadata=_trained_metadata(trained, record), data_version=version)


def _trained_metadata(trained, record: TrainedModelRecord) -> dict:
    operating_point = {} if record.answer_threshold is None else {"answer_threshold": 4}
    metadata = {
        "model": f"{record.model_name} v{record.model_version} (alias challenger)",
        "task": record.task,
        "model_version": record.model_version,
        "mlflow_run_id": record.run_id,
        "mlflow_run": MetadataValue.url(trained.run_url),
        "mlflow_model": MetadataValue.url(trained.model_url),
        "dataset_version": record.dataset_version,
        "dataset_images": record.dataset_images,
        **{f"val_{k}": round(v, 4) for k, v in record.validation.items()},
        **{k: round(record.answer_threshold, n) for k, n in operating_point.items()},
        "best_epoch": record.best_epoch,
        "stopped_early": record.stopped_early,
        "train_images_per_second": round(record.train_images_per_second, 1),
        "history": MetadataValue.md(markdown_table(trained.history, 100)),
        "config": MetadataValue.json(asdict(trained.config)),
    }
    if len(trained.trials):
        metadata["search_trials"] = MetadataValue.md(markdown_table(trained.trials.round(5), 50))
    return metadata


SSLHyperparameters = _config_class("SSLHyperparameters", SSLConfig)


class SSLEncoderConfig(SSLHyperparameters):
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, mps.")

    def ssl_config(self) -> SSLConfig:
        return SSLConfig(**{f.name: getattr(self, f.name) for f in fields(SSLConfig)})


@loop_asset(
    group_name="build",
    io_manager_key="tables",
    kinds={"pytorch", "mlflow"},
    description="A self-supervised (SimCLR) encoder pretrained on every ingested image, labeled "
    "or not, field images included: registered as `<model>-encoder` with alias `current`. "
    "Label QA scores labels on its embeddings; trained_model can start from it "
    "(init_from: ssl_encoder). Not eager: ssl_encoder_sensor retrains it when enough new "
    "images arrived.",
)
def ssl_encoder(
    context: AssetExecutionContext,
    config: SSLEncoderConfig,
    raw_images: pd.DataFrame,
    feedback: PartitionedTable,
    storage: CvopsStorage,
    tracking: MlflowTracking,
):
    store = storage.store()
    images = all_images(raw_images, field_images(feedback))
    tags = {"dagster_run_id": context.run.run_id, "dagster_asset_key": "ssl_encoder"}
    record = pretrain_tracked(
        tracking.open(),
        store,
        images,
        config.ssl_config(),
        pick_device(config.device),
        tags,
        context.log.info,
    )
    write_facts(store, EncoderFacts(record["model_version"], record["images"]))
    return Output(
        record,
        data_version=DataVersion(f"{record['model_name']}/v{record['model_version']}"),
        metadata={
            "encoder": f"{record['model_name']} v{record['model_version']} (alias current)",
            "images": record["images"],
            "field_images": record["field_images"],
            "final_ssl_loss": record["final_loss"],
            "images_per_second": record["images_per_second"],
            "mlflow_run": MetadataValue.url(record["run_url"]),
            "mlflow_model": MetadataValue.url(record["model_url"]),
        },
    )
