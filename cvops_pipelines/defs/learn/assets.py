"""Learn stage (first part): what the fleet sent back."""

from dagster import AssetExecutionContext, MetadataValue, Output, asset

from cvops_pipelines.core.feedback import batch_keys, feedback_records
from cvops_pipelines.core.tables import markdown_table
from cvops_pipelines.defs.resources import CvopsStorage


@asset(group_name="learn", io_manager_key="tables", kinds={"python", "parquet"},
       description="Every prediction edge devices uploaded (feedback/batches/), one row per "
                   "record with its correction when a human gave one.")
def fleet_feedback(context: AssetExecutionContext, storage: CvopsStorage):
    store = storage.store()
    keys = batch_keys(store)
    records = feedback_records(store, keys)
    reviewed = records["corrected_label"].notna()
    per_release = (records.assign(reviewed=reviewed)
                   .groupby(["release", "cohort"]).agg(records=("record_id", "size"),
                                                        reviewed=("reviewed", "sum"))
                   .reset_index())
    return Output(records, metadata={
        "batches": len(keys), "records": len(records), "reviewed": int(reviewed.sum()),
        "devices": int(records["device_id"].nunique()),
        "per_release_and_cohort": MetadataValue.md(markdown_table(per_release, 50))})
