"""Resources: where data lives, where drops arrive, the data contracts, and the table IO manager.
Built from environment variables at definition time (`build_resources`), so the same code runs on
a laptop (local files), in CI and against S3: the environment decides, not the assets.
"""

import json
from pathlib import Path

import pandas as pd
from dagster import (
    ConfigurableIOManager,
    ConfigurableResource,
    EnvVar,
    InputContext,
    OutputContext,
)
from dagster_aws.s3 import S3Resource
from pydantic import Field

from cvops_pipelines import settings
from cvops_pipelines.core.base.handoffs import Handoff
from cvops_pipelines.core.base.ontology import Ontology, load_ontology
from cvops_pipelines.core.base.report import Link
from cvops_pipelines.core.base.store import LocalStore, S3Store, Store, store_from_uri
from cvops_pipelines.core.base.tables import (
    PartitionedTable,
    TableFile,
    read_table,
    record_key,
    table_file,
    table_key,
    write_table,
)
from cvops_pipelines.core.base.tracking import Tracking
from cvops_pipelines.core.learn.labelstudio import push_or_defer
from cvops_pipelines.core.learn.labelstudio_client import LabelStudio
from cvops_pipelines.core.tasks import StageContext, Task, task_for, task_labels
from cvops_pipelines.defs.loop import Loop


class CvopsStorage(ConfigurableResource):
    """Images, tables, quarantine and reports: a local root, or an S3 bucket/prefix if set."""

    local_root: str = ".cvops"
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3: S3Resource

    def store(self) -> Store:
        if self.s3_bucket:
            return S3Store(
                self.s3_bucket, self.s3_prefix, self.s3.region_name, self.s3.endpoint_url
            )
        return LocalStore(Path(self.local_root))


class DropSource(ConfigurableResource):
    """The watched location where new drops arrive (local folder or s3://bucket/prefix)."""

    uri: str
    s3: S3Resource

    def store(self) -> Store:
        return store_from_uri(
            self.uri, region=self.s3.region_name, endpoint_url=self.s3.endpoint_url
        )

    def drop(self, name: str) -> Store:
        return self.store().child(name)


class AnnotationBackend(ConfigurableResource):
    """Where annotation tasks go besides their files: nowhere (no URL, the default) or a Label
    Studio server (its URL, an API token from the environment, its local-files document root)."""

    labelstudio_url: str = Field("", description="Empty: annotation tasks stay files.")
    labelstudio_token: str = Field("", description="From CVOPS_LABELSTUDIO_TOKEN (an EnvVar).")
    labelstudio_files_root: str = Field(
        "", description="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, seen from here."
    )
    project_title: str = Field("cvops", description="Projects are named '<this> · <what>'.")

    def labelstudio(self) -> LabelStudio | None:
        if not self.labelstudio_url:
            return None
        return LabelStudio(
            self.labelstudio_url, self.labelstudio_token, self.labelstudio_files_root
        )

    def push(
        self,
        ctx,
        prefix: str,
        what: str,
        sub_batch: int = 0,
        tasks_file: str = "tasks.json",
        retrain_epochs: int = 0,
    ):
        """The folder's tasks to Label Studio, when one is configured: metadata for the asset
        (the project's link, or why it waits for the answers sensor to push it)."""
        ls = self.labelstudio()
        if ls is None:
            return {}
        title = f"{self.project_title} · {what} · ontology v{ctx.ontology.version}"
        pushed = push_or_defer(ls, ctx.store, prefix, title, sub_batch, tasks_file, retrain_epochs)
        if isinstance(pushed, str):
            ctx.warn(f"{pushed} (the labelstudio_answers sensor pushes it later)")
            return {"labelstudio": f"not pushed yet: {pushed}"}
        return {
            "labelstudio_project": Link(ls.project_url(pushed.project)),
            "labelstudio_tasks_pushed": len(pushed.task_ids),
            "labelstudio_sub_batches": pushed.batches,
        }


class DataContracts(ConfigurableResource):
    """The ontology (which names the task: classification or detection) and the GX suites in
    data_contracts/."""

    contracts_dir: str
    ontology_file: str = Field("", description="Default: <contracts_dir>/ontology.yaml.")
    build_docs: bool = True

    def ontology(self) -> Ontology:
        path = self.ontology_file or Path(self.contracts_dir) / "ontology.yaml"
        return load_ontology(path, task_labels())

    def task(self) -> Task:
        """The task the ontology names, from the registry: each asset asks it for its piece."""
        return task_for(self.ontology())

    def suite(self, name: str) -> Path:
        return Path(self.contracts_dir) / "gx" / f"{name}.json"


class TablesIOManager(ConfigurableIOManager):
    """DataFrames as Parquet at tables/<asset>/<partition>.parquet, and small records (a typed
    hand-off such as `TrainedModelRecord`, or a dict) as JSON at
    artifacts/<asset>/<partition>.json, in the cvops store. No pickles. Downstream assets
    receive these as inputs (visible lineage); a multi-partition input is the concatenation of
    its partitions, and a run over several partitions (single-run backfill) returns one table
    per partition key.

    Tables too large for memory travel as files: an asset may return a `TableFile` (moved into
    the store as is), and an input annotated `TableFile` receives the stored file unloaded. An
    input annotated `PartitionedTable` receives the partitions' keys, for a consumer that reads
    only the partitions it has not seen.
    """

    storage: CvopsStorage

    def _key(self, context, partition: str | None) -> str:
        return table_key("__".join(context.asset_key.path), partition)

    def _json_key(self, context, partition: str | None) -> str:
        return record_key("__".join(context.asset_key.path), partition)

    def handle_output(self, context: OutputContext, obj: pd.DataFrame | dict | Handoff) -> None:
        store = self.storage.store()
        if context.has_asset_partitions and len(context.asset_partition_keys) > 1:
            # a single run over many partitions returns {partition key: table}
            if not isinstance(obj, dict) or set(obj) != set(context.asset_partition_keys):
                raise TypeError(
                    "an asset run over several partitions must return a dict "
                    "with one DataFrame per partition key"
                )
            for partition, frame in obj.items():
                write_table(store, self._key(context, partition), frame)
            context.add_output_metadata(
                {"partitions_written": len(obj), "rows": sum(len(f) for f in obj.values())}
            )
            return
        partition = context.asset_partition_key if context.has_asset_partitions else None
        if context.has_asset_partitions and isinstance(obj, dict) and set(obj) == {partition}:
            obj = obj[partition]
        if isinstance(obj, TableFile):
            key = self._key(context, partition)
            store.put_file(key, obj.path)
            context.add_output_metadata({"table_uri": store.uri(key), "rows": obj.rows})
            return
        if isinstance(obj, Handoff):
            obj = obj.to_json()
        if isinstance(obj, dict):
            key = self._json_key(context, partition)
            store.write_bytes(key, json.dumps(obj, indent=2, default=str).encode())
            context.add_output_metadata({"record_uri": store.uri(key)})
            return
        uri = write_table(store, self._key(context, partition), obj)
        context.add_output_metadata({"table_uri": uri, "rows": len(obj)})

    def load_input(
        self, context: InputContext
    ) -> pd.DataFrame | dict | Handoff | TableFile | PartitionedTable:
        store = self.storage.store()
        wanted = context.dagster_type.typing_type
        if isinstance(wanted, type) and issubclass(wanted, Handoff):
            if context.has_asset_partitions:
                raise TypeError(f"{wanted.__name__} is one record: its asset has no partitions")
            return wanted.from_json(json.loads(store.read_bytes(self._json_key(context, None))))
        if context.dagster_type.typing_type is PartitionedTable:
            keys = sorted(context.asset_partition_keys) if context.has_asset_partitions else []
            return PartitionedTable(store, {key: self._key(context, key) for key in keys})
        if context.dagster_type.typing_type is TableFile:
            if context.has_asset_partitions and len(context.asset_partition_keys) > 1:
                raise TypeError("a TableFile input is one table: one partition, or none")
            partition = context.asset_partition_key if context.has_asset_partitions else None
            return table_file(store, self._key(context, partition))
        if not context.has_asset_partitions:
            if store.exists(self._json_key(context, None)):
                return json.loads(store.read_bytes(self._json_key(context, None)))
            return read_table(store, self._key(context, None))
        frames, missing = [], []
        for key in sorted(context.asset_partition_keys):
            table = self._key(context, key)
            if store.exists(table):
                frames.append(read_table(store, table))
            else:
                missing.append(key)
        if missing:  # e.g. a drop whose ingest was stopped by a failed contract
            context.log.warning(
                f"{context.asset_key.to_user_string()}: partitions not "
                f"materialized, left out: {', '.join(missing)}"
            )
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


class MlflowTracking(ConfigurableResource):
    """MLflow tracking + model registry: a thin resource around mlflow (not dagster-mlflow).

    Default: `sqlite:///$CVOPS_HOME/mlflow.db`, artifacts beside the cvops data; a server from
    MLFLOW_TRACKING_URI otherwise (checked up front: an unreachable server is a clear error).
    """

    tracking_uri: str = Field(
        description="sqlite:///... or http(s)://host:port of `mlflow server`."
    )
    artifact_root: str = Field("", description="Artifact location for a newly created experiment.")
    experiment: str = "cvops"
    model_name: str = Field("cvops-classifier", description="Registered model name.")
    ui_url: str = Field("", description="MLflow UI base URL for links in asset metadata.")

    def open(self) -> Tracking:
        return Tracking(
            self.tracking_uri, self.artifact_root, self.experiment, self.model_name, self.ui_url
        )


def build_resources(project: settings.Project | None = None) -> dict:
    """The resources of one loop: the project's places (default: the environment's)."""
    project = project or settings.Project.from_env()
    s3 = settings.s3_settings()
    s3_resource = S3Resource(region_name=s3["region"], endpoint_url=s3["endpoint_url"])
    storage = CvopsStorage(
        local_root=str(project.home),
        s3_bucket=project.s3_bucket,
        s3_prefix=project.s3_prefix,
        s3=s3_resource,
    )
    return {
        "storage": storage,
        "drop_source": DropSource(uri=project.drops, s3=s3_resource),
        "contracts": DataContracts(
            contracts_dir=str(project.contracts_dir), ontology_file=str(project.ontology)
        ),
        "tracking": MlflowTracking(
            tracking_uri=project.tracking_uri,
            artifact_root=project.artifact_root,
            experiment=project.experiment,
            ui_url=settings.mlflow_ui_url(),
            model_name=project.model_name,
        ),
        "tables": TablesIOManager(storage=storage),
        "annotation": annotation_backend(project.name),
        "loop": Loop(name=project.name),
    }


def annotation_backend(loop: str) -> AnnotationBackend:
    """From the environment; the token stays an EnvVar, so the UI shows its name, not it."""
    ls = settings.labelstudio_settings()
    return AnnotationBackend(
        labelstudio_url=ls["url"],
        labelstudio_token=EnvVar("CVOPS_LABELSTUDIO_TOKEN") if ls["url"] else "",
        labelstudio_files_root=ls["files_root"],
        project_title=f"cvops {loop}" if loop else "cvops",
    )


def stage_context(context, storage: CvopsStorage, tracking, contracts: DataContracts, key: str):
    """What a task's piece needs from an asset's resources (tracking: an MlflowTracking, or None
    for a piece that runs without one)."""
    return StageContext(
        storage.store(),
        tracking.open() if tracking is not None else None,
        contracts.ontology(),
        context.log.info,
        context.log.warning,
        context.run.run_id,
        {"dagster_run_id": context.run.run_id, "dagster_asset_key": key},
    )
