"""The torchrun side of `trained_model` with `distributed` processes: the command that launches
cvops_pipelines.train_ddp, and rank 0's files read back as the same FitResult an in-process
run returns (so logging, registration and the gate do not know the difference)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from cvops_pipelines.core.base.tracking import ModelFiles
from cvops_pipelines.core.build.registry import build
from cvops_pipelines.core.build.training import FitResult


@dataclass(frozen=True)
class Distributed:
    processes: int = 0  # per node; 0 = train in the asset's own process
    nodes: int = 1
    # nodes > 1: where the nodes meet (host:port of node 0), as torchrun's --rdzv-endpoint
    rendezvous: str = ""

    def __post_init__(self) -> None:
        if self.processes < 0 or self.nodes < 1:
            raise ValueError("distributed: processes >= 0 and nodes >= 1")
        if self.nodes > 1 and not self.rendezvous:
            raise ValueError("distributed: more than one node needs a rendezvous host:port")

    @property
    def world_size(self) -> int:
        return self.processes * self.nodes


def torchrun_command(
    distributed: Distributed,
    task: str,
    dataset_version: str,
    out: Path,
    config,
    device: str = "auto",
    init_state: Path | None = None,
    mlflow_run_id: str = "",
) -> list[str]:
    """`python -m torch.distributed.run ... -m cvops_pipelines.train_ddp --task ...` with every
    hyperparameter spelled out (train_ddp's options are the task's config fields)."""
    command = [sys.executable, "-m", "torch.distributed.run"]
    command += [f"--nproc-per-node={distributed.processes}", f"--nnodes={distributed.nodes}"]
    if distributed.nodes == 1:
        command.append("--standalone")
    else:
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={distributed.rendezvous}"]
    command += ["-m", "cvops_pipelines.train_ddp", "--task", task]
    command += ["--dataset-version", dataset_version]
    command += ["--out", str(out)]
    if init_state is not None:
        command += ["--init-state", str(init_state)]
    if mlflow_run_id:
        command += ["--mlflow-run-id", mlflow_run_id]
    command += ["--device", device]
    for f in fields(config):
        if f.name == "device":
            continue
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            command.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            command += [flag, str(value)]
    return command


def read_outputs(out: Path) -> FitResult:
    """Rank 0's files as a FitResult; the tensors are read with weights_only=True."""
    out = Path(out)
    missing = [
        n for n in ("state_dict.pt", "preprocess.json", "history.json") if not (out / n).is_file()
    ]
    if missing:
        raise RuntimeError(f"torchrun finished without rank 0's {', '.join(missing)} in {out}")
    state, spec = (out / "state_dict.pt").read_bytes(), (out / "preprocess.json").read_text()
    loaded = build(ModelFiles(state, spec, version="torchrun", run_id=""))  # any task's spec
    doc = json.loads((out / "history.json").read_text())
    return FitResult(
        loaded.model,
        loaded.preprocess,
        doc["history"],
        doc["best_epoch"],
        doc["stopped_early"],
        doc["train_images_per_second"],
    )
