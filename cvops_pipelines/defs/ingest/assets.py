"""Ingest stage: one partition per drop; images first, then the labels that point at them."""

import pandas as pd
from dagster import (
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MetadataValue,
    Output,
)
from pydantic import Field

from cvops_pipelines.core.base.contracts import validate, validate_table
from cvops_pipelines.core.base.images import ImageLimits
from cvops_pipelines.core.base.ontology import MAX_BOXES_PER_IMAGE
from cvops_pipelines.core.base.tables import TableFile, markdown_table, write_table
from cvops_pipelines.core.ingest.annotations import import_annotations
from cvops_pipelines.core.ingest.drops import require_complete
from cvops_pipelines.core.ingest.intake import IngestConfig, ingest_drop
from cvops_pipelines.defs.contract_checks import (
    check_result,
    contract_check_result,
    contract_spec,
)
from cvops_pipelines.defs.loop import DROPS, loop_asset
from cvops_pipelines.defs.resources import CvopsStorage, DataContracts, DropSource


class RawImagesConfig(Config):
    max_megapixels: float = Field(
        40.0, description="Larger headers are rejected as decompression bombs."
    )
    max_file_mb: float = Field(64.0, description="Larger files are rejected unread.")
    min_side: int = Field(
        ImageLimits.min_side,
        description="Smallest accepted width/height in pixels: a smaller file is quarantined "
        "(too_small); the contract checks the same bound.",
    )
    max_side: int = Field(
        ImageLimits.max_side,
        description="Largest accepted width/height in pixels: a larger file is quarantined "
        "(too_large); the contract checks the same bound.",
    )
    workers: int = Field(0, description="Decoder processes; 0 = one per CPU core.")


def _reason_counts(quarantine: pd.DataFrame) -> str:
    counts = quarantine.groupby("reason_code").size().rename("files").reset_index()
    return markdown_table(counts.sort_values("files", ascending=False), 50)


@loop_asset(
    group_name="ingest",
    partitions_def=DROPS,
    io_manager_key="tables",
    check_specs=[contract_spec("raw_images")],
    kinds={"python", "parquet"},
    description="Image manifest of one drop: every file decoded and vetted, originals stored "
    "content-addressed, rejects quarantined with a reason code.",
)
def raw_images(
    context: AssetExecutionContext,
    config: RawImagesConfig,
    storage: CvopsStorage,
    drop_source: DropSource,
    contracts: DataContracts,
):
    drop = context.partition_key
    store = storage.store()
    store.check()
    require_complete(drop_source.store(), drop)
    limits = ImageLimits(
        int(config.max_megapixels * 1e6),
        int(config.max_file_mb * 2**20),
        config.min_side,
        config.max_side,
    )
    every = 500

    def progress(done: int) -> None:
        if done % every == 0:
            context.log.info(f"drop {drop}: {done} files processed")

    ingest = IngestConfig(limits=limits, workers=config.workers)
    result = ingest_drop(drop_source.drop(drop), store, drop, ingest, progress)
    quarantine_key = f"quarantine/{drop}/raw_images.parquet"
    store.put_file(quarantine_key, result.quarantine_file.path)
    if result.files_seen == 0:
        context.log.warning(f"drop {drop} holds no image files")
    context.log.info(
        f"drop {drop}: {result.files_seen} files, {result.accepted} accepted, "
        f"{result.duplicates} duplicates, {result.quarantined} quarantined"
    )
    # the manifest travels as a file: a drop of any size never sits in memory as one table
    yield Output(
        result.manifest_file, metadata=_raw_images_metadata(result, store.uri(quarantine_key))
    )
    contract = validate_table(
        result.manifest_file,
        contracts.suite("raw_images"),
        {"min_side": config.min_side, "max_side": config.max_side, "max_bytes": limits.max_bytes},
        store if contracts.build_docs else None,
        run_name=f"raw_images-{drop}",
    )
    yield contract_check_result("raw_images", contract)


def _raw_images_metadata(result, quarantine_uri: str) -> dict:
    examples = result.quarantine_examples
    preview = result.preview[["image_id", "original_name", "format", "width", "height"]]
    reasons = pd.DataFrame(
        sorted(result.quarantine_reasons.items(), key=lambda kv: -kv[1]),
        columns=["reason_code", "files"],
    )
    return {
        "files_seen": result.files_seen,
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        "quarantined": result.quarantined,
        "new_objects_stored": result.new_objects,
        "quarantine_by_reason": MetadataValue.md(markdown_table(reasons, 50)),
        "quarantine_examples": MetadataValue.md(
            markdown_table(examples[["original_name", "reason_code", "reason"]], 10)
        ),
        "quarantine_table": MetadataValue.url(quarantine_uri),
        "preview": MetadataValue.md(markdown_table(preview, 5)),
    }


def _annotations_metadata(result, quarantine_uri: str, ontology) -> dict:
    per_class = result.labels.groupby("label").size().rename("labels").reset_index()
    return {
        "labels": len(result.labels),
        "labeled_images": int(result.labels["image_id"].nunique()),
        "unlabeled_images": result.unlabeled_images,
        "boxes": int(result.labels["x_min"].notna().sum()),
        "formats": MetadataValue.json(dict(result.formats)),
        "quarantined": len(result.quarantine),
        "quarantine_by_reason": MetadataValue.md(_reason_counts(result.quarantine)),
        "quarantine_examples": MetadataValue.md(
            markdown_table(result.quarantine[["original_name", "position", "reason"]], 10)
        ),
        "quarantine_table": MetadataValue.url(quarantine_uri),
        "labels_per_class": MetadataValue.md(markdown_table(per_class, 100)),
        "ontology_version": ontology.version,
    }


class AnnotationsConfig(Config):
    max_boxes_per_image: int = Field(
        MAX_BOXES_PER_IMAGE,
        description="Boxes one image may hold in a drop; an image with more has none imported "
        "(quarantined with too_many_boxes).",
    )


@loop_asset(
    group_name="ingest",
    partitions_def=DROPS,
    io_manager_key="tables",
    check_specs=[
        contract_spec("annotations"),
        AssetCheckSpec(
            "labels_imported",
            asset="annotations",
            blocking=True,
            description="Fails when the drop's annotation files held label records and none "
            "could be imported (every one quarantined): never an OK that imported nothing.",
        ),
    ],
    kinds={"python", "parquet"},
    description="Labels of one drop (ImageFolder, CSV, COCO, YOLO or Label Studio), each tied to "
    "an ingested image and checked against the ontology.",
)
def annotations(
    context: AssetExecutionContext,
    config: AnnotationsConfig,
    raw_images: TableFile,  # unloaded: only an index of names is read, and only if labels exist
    storage: CvopsStorage,
    drop_source: DropSource,
    contracts: DataContracts,
):
    drop = context.partition_key
    store = storage.store()
    ontology = contracts.ontology()
    result = import_annotations(
        drop_source.drop(drop), store, drop, raw_images, ontology, config.max_boxes_per_image
    )
    quarantine_uri = write_table(store, f"quarantine/{drop}/annotations.parquet", result.quarantine)
    yield Output(result.labels, metadata=_annotations_metadata(result, quarantine_uri, ontology))
    contract = validate(
        result.labels,
        contracts.suite("annotations"),
        {"ontology_classes": ontology.image_labels},  # detection: negatives too
        store if contracts.build_docs else None,
        run_name=f"annotations-{drop}",
    )
    yield contract_check_result("annotations", contract)
    nothing = result.nothing_usable()
    if nothing:
        context.log.error(f"drop {drop}: {nothing}")
    yield check_result(
        "labels_imported",
        nothing,
        AssetCheckSeverity.ERROR,
        label_records=result.records_read,
        labels=len(result.labels),
    )
