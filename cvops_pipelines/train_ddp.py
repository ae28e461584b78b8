"""Training beyond one process: DistributedDataParallel under torchrun.

    torchrun --nproc_per_node 2 -m cvops_pipelines.train_ddp --dataset-version ds-… --out DIR

Every process reads the dataset snapshot and its images from the cvops store the environment
names (CVOPS_HOME or the S3 bucket), trains its shard of each epoch (gradients averaged across
processes; gloo on CPU, nccl on CUDA, one GPU per process), and evaluates the whole validation
split, so early stopping decides the same everywhere. Rank 0 writes state_dict.pt,
preprocess.json and history.json to --out — the files `trained_model` logs to MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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

        def report(epoch: int, metrics: dict) -> None:
            if rank == 0:
                print(
                    f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                    flush=True,
                )

        result = fit(data["train"], data["val"], classes, config, device, report)
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
                        "history": result.history,
                    },
                    indent=2,
                )
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
