"""The build job: train, evaluate against the champion, export what passes."""

from cvops_pipelines.defs.loop import loop_job

train_job = loop_job(
    "train_job",
    assets=("trained_model", "model_evaluation", "onnx_model"),
    tags={"cvops/stage": "build"},  # the production run queue runs one training at a time
    description="Train a challenger on the current dataset version, evaluate it against the "
    "champion, run the gate, and export the ONNX artifacts that pass.",
)
