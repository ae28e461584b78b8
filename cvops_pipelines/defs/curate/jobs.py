"""Curate runs itself (eager automation, evaluated by `cvops_automation` in definitions.py);
this job rebuilds the stage by hand."""

from dagster import AssetSelection, define_asset_job

curate_job = define_asset_job(
    "curate_job",
    selection=AssetSelection.groups("curate"),
    description="Rebuild the labeled pool, label QA and the dataset "
    "version from every ingested drop.",
)
