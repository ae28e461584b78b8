"""Curate runs itself (eager automation, evaluated by `cvops_automation` in definitions.py);
this job rebuilds the stage by hand."""

from cvops_pipelines.defs.loop import loop_job

curate_job = loop_job(
    "curate_job",
    groups=("curate",),
    description="Rebuild the labeled pool, label QA and the dataset "
    "version from every ingested drop.",
)
