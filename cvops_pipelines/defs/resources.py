"""Resources: where data lives, where drops arrive, the data contracts, and the table IO manager.
Built from environment variables at definition time (`build_resources`), so the same code runs on
a laptop (local files), in CI and against S3: the environment decides, not the assets.
"""


from pathlib import Path

import pandas as pd
from dagster import ConfigurableIOManager, ConfigurableResource, InputContext, OutputContext
from dagster_aws.s3 import S3Resource

from cvops_pipelines import settings
from cvops_pipelines.core.ontology import Ontology, load_ontology
from cvops_pipelines.core.storage import LocalStore, S3Store, Store, store_from_uri
from cvops_pipelines.core.tables import read_table, table_key, write_table


class CvopsStorage(ConfigurableResource):
    """Images, tables, quarantine and reports: a local root, or an S3 bucket/prefix if set."""

    local_root: str = ".cvops"
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3: S3Resource

    def store(self) -> Store:
        if self.s3_bucket:
            return S3Store(self.s3_bucket, self.s3_prefix, self.s3.region_name,
                           self.s3.endpoint_url)
        return LocalStore(Path(self.local_root))


class DropSource(ConfigurableResource):
    """The watched location where new drops arrive (local folder or s3://bucket/prefix)."""

    uri: str
    s3: S3Resource

    def store(self) -> Store:
        return store_from_uri(self.uri, region=self.s3.region_name,
                              endpoint_url=self.s3.endpoint_url)

    def drop(self, name: str) -> Store:
        return self.store().child(name)


class DataContracts(ConfigurableResource):
    """The ontology and the GX suites in data_contracts/."""

    contracts_dir: str
    build_docs: bool = True

    def ontology(self) -> Ontology:
        return load_ontology(Path(self.contracts_dir) / "ontology.yaml")

    def suite(self, name: str) -> Path:
        return Path(self.contracts_dir) / "gx" / f"{name}.json"


class TablesIOManager(ConfigurableIOManager):
    """DataFrames as Parquet at tables/<asset>/<partition>.parquet in the cvops store.

    Downstream assets receive tables as inputs (visible lineage); a multi-partition input is the
    concatenation of its partitions.
    """

    storage: CvopsStorage

    def _key(self, context, partition: str | None) -> str:
        return table_key("__".join(context.asset_key.path), partition)

    def handle_output(self, context: OutputContext, obj: pd.DataFrame) -> None:
        partition = context.asset_partition_key if context.has_asset_partitions else None
        uri = write_table(self.storage.store(), self._key(context, partition), obj)
        context.add_output_metadata({"table_uri": uri, "rows": len(obj)})

    def load_input(self, context: InputContext) -> pd.DataFrame:
        store = self.storage.store()
        if not context.has_asset_partitions:
            return read_table(store, self._key(context, None))
        frames, missing = [], []
        for key in sorted(context.asset_partition_keys):
            table = self._key(context, key)
            if store.exists(table):
                frames.append(read_table(store, table))
            else:
                missing.append(key)
        if missing:  # e.g. a drop whose ingest was stopped by a failed contract
            context.log.warning(f"{context.asset_key.to_user_string()}: partitions not "
                                f"materialized, left out: {', '.join(missing)}")
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def build_resources() -> dict:
    s3 = settings.s3_settings()
    s3_resource = S3Resource(region_name=s3["region"], endpoint_url=s3["endpoint_url"])
    storage = CvopsStorage(local_root=str(settings.cvops_home()), s3_bucket=s3["bucket"],
                           s3_prefix=s3["prefix"], s3=s3_resource)
    return {
        "storage": storage,
        "drop_source": DropSource(uri=settings.drops_uri(), s3=s3_resource),
        "contracts": DataContracts(contracts_dir=str(settings.contracts_dir())),
        "tables": TablesIOManager(storage=storage),
    }


__all__ = ["CvopsStorage", "DataContracts", "DropSource", "LocalStore", "TablesIOManager",
           "build_resources"]
