"""The one Definitions object of the cvops code location."""

from dagster import AssetSelection, Definitions, define_asset_job

from cvops_pipelines import settings  # noqa: F401  (sets the no-telemetry environment first)
from cvops_pipelines.defs.build.assets import trained_model
from cvops_pipelines.defs.curate.assets import dataset_version, label_issues, labeled_pool
from cvops_pipelines.defs.curate.sensors import automation_sensor, curate_job
from cvops_pipelines.defs.ingest.assets import annotations, raw_images
from cvops_pipelines.defs.ingest.sensors import ingest_job, new_drop_sensor
from cvops_pipelines.defs.measure.assets import model_evaluation
from cvops_pipelines.defs.resources import build_resources
from cvops_pipelines.defs.ship.assets import onnx_model

train_job = define_asset_job(
    "train_job", selection=AssetSelection.groups("build", "measure", "ship"),
    description="Train a challenger on the current dataset version, evaluate it against the "
                "champion, run the gate, and export the ONNX artifacts that pass.")

defs = Definitions(
    assets=[raw_images, annotations, labeled_pool, label_issues, dataset_version, trained_model,
            model_evaluation, onnx_model],
    jobs=[ingest_job, curate_job, train_job],
    sensors=[new_drop_sensor, automation_sensor],
    resources=build_resources(),
)
