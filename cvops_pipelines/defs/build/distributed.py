"""`trained_model` beyond its own process: torchrun launched through Dagster Pipes, so each
epoch's log line reaches the run's event log as it happens and a failure fails the step."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dagster import AssetExecutionContext, PipesSubprocessClient

from cvops_pipelines.core.build.run import Trainer, TrainInputs
from cvops_pipelines.core.build.torchrun import Distributed, read_outputs, torchrun_command


def pipes_trainer(
    context: AssetExecutionContext, distributed: Distributed, task: str, tracking_uri: str
) -> Trainer:
    def train(inputs: TrainInputs):
        import torch

        version = str(inputs.rows["dataset_version"].iloc[0])
        with tempfile.TemporaryDirectory(prefix="cvops-torchrun-") as work:
            init = None
            if inputs.initial_state is not None:  # our own tensors, read back weights_only
                init = Path(work, "init_state.pt")
                torch.save(inputs.initial_state, init)
            out = Path(work, "out")
            command = torchrun_command(
                distributed, task, version, out, inputs.config, inputs.device, init, inputs.run_id
            )
            context.log.info(
                f"launching {distributed.processes} process(es) x {distributed.nodes} node(s) "
                f"with torchrun: {' '.join(command)}"
            )
            env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
            PipesSubprocessClient(env=env).run(
                command=command,
                context=context,
                extras={"dataset_version": version, "world_size": distributed.world_size},
            )
            return read_outputs(out)

    return train
