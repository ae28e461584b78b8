"""The build job: train, evaluate against the champion, export what passes."""

from dagster import AssetSelection, define_asset_job

train_job = define_asset_job(
    "train_job",
    selection=AssetSelection.assets("trained_model", "model_evaluation", "onnx_model"),
    tags={"cvops/stage": "build"},  # the production run queue runs one training at a time
    description="Train a challenger on the current dataset version, evaluate it against the "
    "champion, run the gate, and export the ONNX artifacts that pass.",
)
