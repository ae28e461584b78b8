"""Training beyond one process: DistributedDataParallel under torchrun.

    torchrun --nproc_per_node 2 -m cvops_pipelines.train_ddp --dataset-version ds-… --out DIR

`trained_model` launches exactly this through Dagster Pipes when its `distributed` config asks
for processes (core/build/torchrun.py builds the command); it can also be run by hand.
Every process reads the dataset snapshot and its images from the cvops store the environment
names (CVOPS_HOME or the S3 bucket), trains its shard of each epoch (gradients averaged across
processes; gloo on CPU, nccl on CUDA, one GPU per process), and evaluates the whole validation
split, so early stopping decides the same everywhere. Rank 0 reports each epoch (to Dagster
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


def build_parser() -> argparse.ArgumentParser:
    """--dataset-version, --out, and one option per hyperparameter of TrainConfig (their one
    declaration, shared with the trained_model asset's config)."""
    from dataclasses import fields
    from typing import get_type_hints

    from cvops_pipelines.core.build.training import TrainConfig

    parser = argparse.ArgumentParser(
        prog="python -m cvops_pipelines.train_ddp",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
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


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.distributed as dist

    from cvops_pipelines import settings
    from cvops_pipelines.core.build.models import pick_device, state_dict_bytes
    from cvops_pipelines.core.build.run import split_arrays
    from cvops_pipelines.core.build.training import TrainConfig, fit
    from cvops_pipelines.core.curate.dataset import load_snapshot

    args = build_parser().parse_args(argv)
    from dataclasses import fields

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
        classes = sorted(rows["label"].unique())
        config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        data = split_arrays(store, rows, classes, config.image_size)

        initial = None
        if args.init_state:
            initial = torch.load(args.init_state, map_location="cpu", weights_only=True)
        with _reporter(rank, args.mlflow_run_id) as report:
            result = fit(data["train"], data["val"], classes, config, device, report, initial)
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
