"""Training beyond one process: DistributedDataParallel under torchrun.

    torchrun --nproc_per_node 2 -m cvops_pipelines.train_ddp [--task detection] \
        --dataset-version ds-… --out DIR [hyperparameters]

`trained_model` launches exactly this through Dagster Pipes when its `distributed` config asks
for processes (core/build/torchrun.py builds the command); it can also be run by hand.
Every process reads the dataset snapshot and its images from the cvops store the environment
names (CVOPS_HOME or the S3 bucket) and runs the task's own trainer (a registered task's `fit`),
which trains its shard of each epoch (gradients averaged across processes; gloo on CPU, nccl on
CUDA, one GPU per process); a classifier evaluates the whole validation split on every rank, so
early stopping decides the same everywhere. Rank 0 reports each epoch (to Dagster
through Pipes when launched by the asset, and to the MLflow run given by --mlflow-run-id) and
writes state_dict.pt, preprocess.json and history.json to --out: the files `trained_model`
logs to MLflow and registers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path


def build_parser(task: str = "classification") -> argparse.ArgumentParser:
    """--task, --dataset-version, --out, and one option per hyperparameter of the task's config
    (their one declaration, shared with the trained_model asset's config)."""
    from dataclasses import fields
    from typing import get_type_hints

    from cvops_pipelines.core.tasks import TASKS, task_named

    hyperparameters = task_named(task).hyperparameters
    parser = argparse.ArgumentParser(
        prog="python -m cvops_pipelines.train_ddp",
        description=__doc__.split("\n\n")[0],
        epilog="--task detection --help lists a detector's hyperparameters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--task", default="classification", choices=sorted(TASKS))
    parser.add_argument("--dataset-version", required=True, help="a snapshot under datasets/")
    parser.add_argument("--out", required=True, help="folder for rank 0's model files")
    parser.add_argument(
        "--init-state",
        default="",
        help="start from these tensors (torch.save of a state_dict, read with weights_only)",
    )
    parser.add_argument(
        "--mlflow-run-id", default="", help="log each epoch's metrics to this MLflow run"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps"
    )
    hints = get_type_hints(hyperparameters)
    for f in fields(hyperparameters):
        if f.name == "device":  # every task's, above
            continue
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        if kind is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=f.metadata["help"],
            )
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The task first (it decides which hyperparameters exist), then everything; an unknown
    task gets argparse's own "invalid choice" message."""
    from cvops_pipelines.core.tasks import TASKS

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", default="classification")
    task = first.parse_known_args(argv)[0].task
    return build_parser(task if task in TASKS else "classification").parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from dataclasses import fields

    import torch
    import torch.distributed as dist

    from cvops_pipelines import settings
    from cvops_pipelines.core.build.models import pick_device, state_dict_bytes
    from cvops_pipelines.core.build.run import TrainInputs
    from cvops_pipelines.core.curate.dataset import load_snapshot
    from cvops_pipelines.core.tasks import task_named

    args = parse(argv)
    task = task_named(args.task)
    device = pick_device(args.device)
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if device.startswith("cuda"):  # bound to this rank's GPU: NCCL need not guess it
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        store = settings.cvops_store()
        rows = load_snapshot(store, args.dataset_version)
        names = [f.name for f in fields(task.hyperparameters)]
        config = task.hyperparameters(**{name: getattr(args, name) for name in names})
        initial = None
        if args.init_state:
            initial = torch.load(args.init_state, map_location="cpu", weights_only=True)
        with _reporter(rank, args.mlflow_run_id) as report:
            inputs = TrainInputs(
                store, rows, task.classes(rows), config, device, report, initial, args.mlflow_run_id
            )
            result = task.fit(inputs)
            if rank == 0:
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                (out / "state_dict.pt").write_bytes(state_dict_bytes(result.model))
                (out / "preprocess.json").write_text(result.preprocess.to_json())
                (out / "history.json").write_text(
                    json.dumps(
                        {
                            "world_size": dist.get_world_size(),
                            "best_epoch": result.best_epoch,
                            "stopped_early": result.stopped_early,
                            # rank 0 timed its shard: every rank trains as many images
                            "train_images_per_second": result.train_images_per_second
                            * dist.get_world_size(),
                            "history": result.history,
                        },
                        indent=2,
                    )
                )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


@contextmanager
def _reporter(rank: int, run_id: str):
    """Rank 0's per-epoch report: a line on stdout, a Dagster log line through Pipes when the
    asset launched this, and the metrics in the MLflow run. Other ranks stay quiet."""
    from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes

    if rank != 0:
        yield lambda epoch, metrics: None
        return
    client = None
    if run_id:
        from cvops_pipelines import settings
        from cvops_pipelines.core.base.tracking import Tracking

        client = Tracking(settings.mlflow_tracking_uri()).client()
    launched = DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ  # by trained_model, through Pipes
    pipes = open_dagster_pipes() if launched else nullcontext()
    with pipes as session:

        def report(epoch: int, metrics: dict) -> None:
            line = f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(line, flush=True)
            if session is not None:
                session.log.info(f"rank 0 of {os.environ.get('WORLD_SIZE', 1)}: {line}")
            if client is not None:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                client.log_batch(
                    run_id, [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
                )

        yield report


if __name__ == "__main__":
    sys.exit(main())
