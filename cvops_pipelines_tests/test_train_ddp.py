"""Training under torchrun: two CPU processes (gloo) train one model with DistributedDataParallel
and give a result of the same shape as one process: same weights layout, preprocessing and
epochs, and an epoch's metrics counted over every image, not one shard."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.base.tables import write_table
from cvops_pipelines.demo import digit_model
from cvops_pipelines_tests import corpus

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def snapshot(home: Path) -> str:
    store = LocalStore(home)
    rows = []
    for i in range(240):
        key = f"images/ddp/{i}.png"
        store.write_bytes(key, corpus.encode(digit_model.digit(i), "PNG"))
        rows.append(
            {
                "image_id": f"{i:064x}",
                "label": digit_model.digit_label(i),
                "split": "val" if i % 6 == 0 else "train",
                "key": key,
            }
        )
    write_table(store, "datasets/ds-ddp/dataset.parquet", pd.DataFrame(rows))
    return "ds-ddp"


def train(processes: int, out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "cvops_pipelines.train_ddp",
            "--dataset-version",
            "ds-ddp",
            "--out",
            str(out),
            "--image-size",
            "32",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_two_gloo_processes_train_what_one_process_trains(isolated_homes, tmp_path):
    import os

    import torch

    snapshot(isolated_homes)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"world{processes}"
        proc = train(processes, out, env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        runs[processes] = {
            "state": torch.load(out / "state_dict.pt", weights_only=True),
            "preprocess": json.loads((out / "preprocess.json").read_text()),
            "history": json.loads((out / "history.json").read_text()),
        }
    one, two = runs[1], runs[2]
    assert two["history"]["world_size"] == 2 and one["history"]["world_size"] == 1
    assert {k: v.shape for k, v in one["state"].items()} == {
        k: v.shape for k, v in two["state"].items()
    }
    assert one["preprocess"] == two["preprocess"]
    assert len(one["history"]["history"]) == len(two["history"]["history"]) == 2
    for run in (one, two):  # validation over the whole split on every rank: 40 images
        for epoch in run["history"]["history"]:
            assert 0.0 <= epoch["val_accuracy"] <= 1.0 and epoch["train_loss"] > 0
            assert abs(epoch["val_accuracy"] * 40 - round(epoch["val_accuracy"] * 40)) < 1e-9
    # each rank trains on its shard of 100, and the epoch's metrics are reduced over both
    assert [e["train_images"] for e in two["history"]["history"]] == [200, 200]
    assert [e["train_images"] for e in one["history"]["history"]] == [200, 200]


def test_hyperparameters_are_declared_once_for_the_asset_and_torchrun():
    from dataclasses import fields

    from cvops_pipelines.core.build.training import TrainConfig
    from cvops_pipelines.defs.build.assets import TrainedModelConfig
    from cvops_pipelines.train_ddp import build_parser

    declared = {f.name: f.default for f in fields(TrainConfig)}
    options = {a.dest: a.default for a in build_parser()._actions if a.dest in declared}
    asset = {n: f.default for n, f in TrainedModelConfig.model_fields.items() if n in declared}
    assert options == declared and asset == declared
    config = TrainedModelConfig(epochs=3, augmentation="strong").train_config()
    assert config == TrainConfig(epochs=3, augmentation="strong")
