"""Curate stage: the labeled pool, label QA, and immutable dataset versions.

All three refresh on their own when a drop lands (eager automation, run by the daemon).
"""

import json
from typing import Literal

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AutomationCondition,
    Config,
    DataVersion,
    MetadataValue,
    Output,
)
from pydantic import Field

from cvops_pipelines.core.base.contracts import validate
from cvops_pipelines.core.base.ontology import MAX_BOXES_PER_IMAGE
from cvops_pipelines.core.base.tables import PartitionedTable, markdown_table
from cvops_pipelines.core.build.oof import ENCODER_EPOCHS, ENCODER_FOLDS, OOF_TRAINING
from cvops_pipelines.core.curate.dataset import (
    DatasetPolicy,
    build_dataset_version,
    save_snapshot,
)
from cvops_pipelines.core.curate.detection_label_qa import (
    BoxQAConfig,
)
from cvops_pipelines.core.curate.detection_pool import box_rows
from cvops_pipelines.core.curate.label_qa import LabelQAConfig
from cvops_pipelines.core.curate.neardup import NearDupConfig
from cvops_pipelines.core.curate.replay_set import (
    HoldoutPolicy,
    build_replay_set,
    expert_labels,
    save_replay_set,
)
from cvops_pipelines.core.curate.splits import SplitConfig
from cvops_pipelines.core.learn.feedback import feedback_labels, feedback_manifest
from cvops_pipelines.core.learn.feedback_query import pool_feedback, reviewed_or_expert
from cvops_pipelines.core.learn.retraining import DatasetFacts, write_facts
from cvops_pipelines.defs.contract_checks import check_name, contract_check_result, contract_spec
from cvops_pipelines.defs.loop import loop_asset
from cvops_pipelines.defs.metadata import metadata, output
from cvops_pipelines.defs.resources import (
    AnnotationBackend,
    CvopsStorage,
    DataContracts,
    MlflowTracking,
    stage_context,
)
from cvops_pipelines.edge.wire import FEEDBACK

EAGER = AutomationCondition.eager()


@loop_asset(
    group_name="curate",
    io_manager_key="tables",
    kinds={"python", "parquet"},
    automation_condition=EAGER,
    description="Every labeled image from every drop (and later feedback and the annotation "
    "queue), with each annotator's latest vote and the consensus label; for a detection "
    "ontology, each image's latest box set (images annotated as empty kept as negatives).",
)
def labeled_pool(
    context: AssetExecutionContext,
    raw_images: pd.DataFrame,
    annotations: pd.DataFrame,
    feedback: PartitionedTable,
    contracts: DataContracts,
):
    images = raw_images["image_id"].nunique()
    field = pool_feedback(feedback, annotations["image_id"], raw_images["image_id"])
    images += field.images_in_no_drop
    if len(field.images):
        raw_images = pd.concat([raw_images, feedback_manifest(field.images)], ignore_index=True)
    if len(field.reviewed):
        annotations = pd.concat([annotations, feedback_labels(field.reviewed)], ignore_index=True)
    result = contracts.task().pool(raw_images, annotations)
    pool = result.value
    return Output(
        pool,
        metadata={
            **metadata(result.metadata),
            "images": len(pool),
            "drops": int(pool.loc[~pool["source"].str.startswith(FEEDBACK), "source"].nunique()),
            "feedback_labeled": int((pool["origin"] == "feedback").sum()),
            "multi_annotated": int((pool["n_votes"] > 1).sum()),
            "unlabeled_images_left_out": int(images - len(pool)),
            "origins": MetadataValue.json(pool["origin"].value_counts().to_dict()),
        },
    )


class ReplaySetConfig(Config):
    holdout_share: float = Field(
        0.3,
        description="Share of field images (by hash of the image "
        "id) reserved as the production holdout: "
        "never trained or validated on; the gate "
        "replays models on it.",
    )
    holdout_salt: str = Field(
        "cvops-holdout-v1",
        description="Changing it reshuffles the "
        "holdout (old holdout images may "
        "then have been trained on).",
    )


@loop_asset(
    group_name="curate",
    io_manager_key="tables",
    kinds={"python", "parquet"},
    automation_condition=EAGER,
    check_specs=[
        contract_spec(
            "replay_set", what="Unique records, labels in the ontology, a label source each."
        )
    ],
    description="Every reviewed field record (an expert's label from the annotation queue "
    "outranks the operator's), as an immutable versioned set, with the "
    "production holdout marked: the records the gate and canary replay models on.",
)
def replay_set(
    context: AssetExecutionContext,
    config: ReplaySetConfig,
    feedback: PartitionedTable,
    labeled_pool: pd.DataFrame,
    storage: CvopsStorage,
    contracts: DataContracts,
):
    experts = expert_labels(labeled_pool)["image_id"] if len(labeled_pool) else []
    records = reviewed_or_expert(feedback, experts)
    replay = build_replay_set(
        records, labeled_pool, HoldoutPolicy(config.holdout_share, config.holdout_salt)
    )
    store = storage.store()
    uri = save_replay_set(store, replay)
    rows = replay.rows.assign(replay_set=replay.version)
    by_source = replay.rows.groupby(["label_source", "holdout"]).size().rename("records")
    yield Output(
        rows,
        data_version=DataVersion(replay.version),
        metadata={
            **replay.summary(),
            "snapshot": MetadataValue.url(uri),
            "by_source_and_holdout": MetadataValue.md(markdown_table(by_source.reset_index(), 10)),
            "by_cohort": MetadataValue.json(replay.rows["cohort"].value_counts().to_dict()),
        },
    )
    docs = store if contracts.build_docs else None
    yield contract_check_result(
        "replay_set",
        validate(
            replay.rows,
            contracts.suite("replay_set"),
            {"classes": contracts.ontology().image_labels},
            docs,
            f"replay_set-{replay.version}",
        ),
    )


class LabelIssuesConfig(Config):
    folds: int = Field(5, description="k for the out-of-fold probabilities.")
    neighbors: int = Field(10, description="k of the nearest-neighbour label-QA model.")
    seed: int = 0
    max_hamming: int = Field(
        NearDupConfig.max_hamming,
        description="Near-duplicate candidates: pHash bits that may differ.",
    )
    max_mad: float = Field(
        NearDupConfig.max_mad, description="Near-duplicate confirmation: thumbnail difference."
    )
    min_scorer_accuracy: float = Field(
        LabelQAConfig.min_scorer_accuracy,
        description="The chosen scorer flags labels only when its out-of-fold accuracy "
        "against them reaches this (below, its disagreements are mostly its own errors).",
    )
    learned_features: bool = Field(
        True,
        description="Let learned embeddings compete as scorers: the ssl_encoder's (alias "
        "current) and the champion's penultimate layer (on images it did not train on). Each "
        "image is scored by the candidate that agrees most with the labels out of fold.",
    )
    finetune_scorer: Literal["auto", "always", "never"] = Field(
        "auto",
        description="A network fine-tuned once per fold (from the ssl_encoder when there is "
        f"one: {ENCODER_FOLDS} folds at most, fewer epochs) as a candidate scorer: on "
        "images where pixels and linear probes cannot tell the classes apart, the only scorer "
        "that can judge (benchmarks/label_qa.py). auto: only when the cheaper scorers cannot "
        "judge; always: every run; never: not at all.",
    )
    finetune_budget_minutes: float = Field(
        10.0,
        ge=0,
        description="Wall-clock minutes the fine-tuned scorer may take: a short timed probe "
        "says what an epoch costs here, the folds train as many epochs as fit, and it is "
        "skipped with a warning when fewer than 3 would; 0 = no limit.",
    )
    finetune_epochs: int = Field(
        0,
        ge=0,
        description="Epochs of each fold's fine-tuning at most (0: the recipe's, "
        f"{ENCODER_EPOCHS} from the ssl_encoder, {OOF_TRAINING.epochs} from scratch).",
    )
    max_overlays: int = Field(
        200, description="Grad-CAM overlays (champion) for at most this many suspects."
    )
    reviewer: str = Field(
        "champion", description="Detection: the registered detector (alias) that reviews boxes."
    )
    box_match_iou: float = Field(BoxQAConfig.match_iou, description="Same object at this IoU.")
    box_min_overlap: float = Field(
        BoxQAConfig.min_overlap, description="Below this IoU a prediction is another object."
    )
    box_min_score: float | None = Field(
        None,
        description="Detection: the reviewer's score from which a missing box, a move or a "
        "swap is suggested (default: the reviewer's own operating point, its answer_threshold).",
    )
    box_duplicate_iou: float = Field(
        BoxQAConfig.duplicate_iou, description="Two same-class boxes this close: a duplicate."
    )
    min_reviewer_f1: float = Field(
        BoxQAConfig.min_reviewer_f1,
        ge=0.0,
        le=1.0,
        description="Detection: the reviewer flags boxes only when its answer agrees with the "
        "given boxes at this F1 (IoU 0.5) or better; below, its flags are withheld (mostly its "
        "own errors) and only the model-free checks run.",
    )


@loop_asset(
    group_name="curate",
    io_manager_key="tables",
    kinds={"python", "parquet"},
    automation_condition=EAGER,
    description="Suspect labels ranked for human review: cleanlab on out-of-fold "
    "probabilities, near-duplicate conflicts, annotator disagreement. For boxes: overlooked "
    "objects, badly located boxes, swapped classes (against the champion detector on images it "
    "did not train on), duplicates and annotator disagreement, each with a suggested fix.",
)
def label_issues(
    context: AssetExecutionContext,
    config: LabelIssuesConfig,
    labeled_pool: pd.DataFrame,
    storage: CvopsStorage,
    tracking: MlflowTracking,
    contracts: DataContracts,
    annotation: AnnotationBackend,
):
    ctx = stage_context(context, storage, tracking, contracts, "label_issues")
    result = contracts.task().label_issues(ctx, labeled_pool, config)
    if len(result.value):  # the suspects, to review in Label Studio when one is configured
        prefix = f"reports/label_issues/{ctx.run_id}"
        result.metadata |= annotation.push(
            ctx, prefix, "label review", tasks_file="labelstudio_tasks.json"
        )
    return output(result)


class DatasetVersionConfig(Config):
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    split_salt: str = Field("cvops-split-v1", description="Changing it reshuffles every split.")
    flagged: str = Field("exclude", description="'exclude' or 'keep' images label QA flagged.")
    min_severity: float = Field(0.5, description="Only suspects this severe are excluded.")
    min_per_class: int = Field(2, description="Contract: images per class in every split.")
    min_class_share: float = Field(
        0.0, description="Contract: smallest share of a class in a split."
    )
    min_box_side: float = Field(1.0, description="Contract: a box's smallest width and height.")
    max_boxes_per_image: int = Field(
        MAX_BOXES_PER_IMAGE, description="Contract: boxes in one image, at most."
    )
    max_class_share: float = Field(
        1.0, description="Contract: largest share of a class in a split."
    )
    max_share_z: float = Field(
        4.0,
        description="Contract: a class's share in a split may differ "
        "from its overall share by this many binomial "
        "standard errors.",
    )
    max_hamming: int = NearDupConfig.max_hamming
    max_mad: float = NearDupConfig.max_mad


@loop_asset(
    group_name="curate",
    io_manager_key="tables",
    kinds={"python", "parquet"},
    automation_condition=EAGER,
    check_specs=[
        contract_spec("dataset_version"),
        contract_spec(
            "dataset_version",
            "dataset_version_balance",
            "Every class in every split, in proportion.",
        ),
        contract_spec(
            "dataset_version", "dataset_version_leakage", "No near-duplicate image across splits."
        ),
        contract_spec(
            "dataset_version",
            "dataset_version_boxes",
            "Detection: every box inside its image, of positive size, of a class in the "
            "ontology, a bounded number per image (no rows to check for classification).",
        ),
    ],
    description="Immutable (image_id, label, split) snapshot named by its content hash; "
    "splits by hashing image_id, so they never move as the pool grows; the "
    "replay set's production holdout is left out.",
)
def dataset_version(
    context: AssetExecutionContext,
    config: DatasetVersionConfig,
    labeled_pool: pd.DataFrame,
    label_issues: pd.DataFrame,
    replay_set: pd.DataFrame,
    storage: CvopsStorage,
    contracts: DataContracts,
):
    holdout = (
        replay_set.loc[replay_set["holdout"].astype(bool), "image_id"] if len(replay_set) else []
    )
    dataset = build_dataset_version(
        labeled_pool,
        label_issues,
        SplitConfig(config.train, config.val, config.test, config.split_salt),
        DatasetPolicy(config.flagged, config.min_severity),
        NearDupConfig(config.max_hamming, config.max_mad),
        holdout=set(holdout),
    )
    store = storage.store()
    snapshot = save_snapshot(store, dataset)
    counts = dataset.class_counts()
    metadata = _dataset_metadata(dataset, counts, snapshot)
    yield Output(dataset.rows, data_version=DataVersion(dataset.version), metadata=metadata)
    results = _dataset_contracts(dataset, counts, config, contracts, store)
    refused = tuple(check_name("dataset_version", r.suite) for r in results if not r.success)
    write_facts(store, DatasetFacts(dataset.version, len(dataset.rows), refused))  # for retraining
    for result in results:
        yield contract_check_result("dataset_version", result)


def _dataset_metadata(dataset, counts: pd.DataFrame, snapshot: str) -> dict:
    table = counts.pivot(index="label", columns="split", values="images").reset_index()
    return {
        **dataset.summary(),
        "snapshot": MetadataValue.url(snapshot),
        "class_counts": MetadataValue.md(markdown_table(table, 100)),
        "excluded_examples": MetadataValue.md(markdown_table(dataset.excluded, 10)),
        "leakage_examples": MetadataValue.md(markdown_table(dataset.leakage, 10)),
        "config": MetadataValue.json(json.loads(json.dumps(dataset.config))),
    }


def _dataset_contracts(
    dataset, counts: pd.DataFrame, config: DatasetVersionConfig, contracts: DataContracts, store
) -> list:
    docs, run = (store if contracts.build_docs else None), f"dataset_version-{dataset.version}"
    balance = {
        "min_per_class": config.min_per_class,
        "min_class_share": config.min_class_share,
        "max_class_share": config.max_class_share,
        "min_share_z": -config.max_share_z,
        "max_share_z": config.max_share_z,
    }
    classes = contracts.ontology().names
    boxes = {
        "ontology_classes": classes,
        "min_box_side": config.min_box_side,
        "max_boxes_per_image": config.max_boxes_per_image,
    }
    image_classes = contracts.ontology().image_labels
    return [
        validate(
            dataset.rows,
            contracts.suite("dataset_version"),
            {"ontology_classes": image_classes},
            docs,
            run,
        ),
        validate(counts, contracts.suite("dataset_version_balance"), balance, docs, run),
        validate(dataset.leakage, contracts.suite("dataset_version_leakage"), {}, docs, run),
        validate(
            box_rows(dataset.rows),
            contracts.suite("dataset_version_boxes"),
            boxes,
            docs,
            run,
        ),
    ]
