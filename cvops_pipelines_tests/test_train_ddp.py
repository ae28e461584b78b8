"""Training under torchrun: two CPU processes (gloo) train one model with DistributedDataParallel
and give a result of the same shape as one process: same weights layout, preprocessing and
epochs, and an epoch's metrics counted over every image, not one shard."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
from PIL import Image

from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.base.tables import write_table
from cvops_pipelines.demo import digit_model
from cvops_pipelines.demo.scenes import scenes
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


SCENES = scenes(24, seed=5)


def scene_snapshot(home: Path, count: int = 24) -> str:
    """A detection snapshot of the project's scenes (some empty), as curation writes one."""
    from cvops_pipelines.core.curate.detection_pool import encode

    store, rows = LocalStore(home), []
    for i, item in enumerate(SCENES[:count]):
        key = f"images/ddp-scenes/{i}.png"
        store.write_bytes(key, corpus.encode(Image.fromarray(item.image), "PNG"))
        boxes = [{"label": lab, "box": list(b)} for lab, b in zip(item.labels, item.boxes)]
        rows.append(
            {
                "image_id": f"{i:064x}",
                "label": "objects" if boxes else "no_objects",
                "split": "val" if i % 6 == 0 else "train",
                "key": key,
                "boxes": encode(boxes),
                "n_boxes": len(boxes),
                "width": item.image.shape[1],
                "height": item.image.shape[0],
                "dataset_version": "ds-scenes",
            }
        )
    write_table(store, "datasets/ds-scenes/dataset.parquet", pd.DataFrame(rows))
    return "ds-scenes"


def test_two_gloo_processes_train_a_detector(isolated_homes, tmp_path):
    """The detector's own trainer under torchrun: every rank trains its shard, rank 0 writes a
    detector whose spec and tensors the registry rebuilds, with the loss over both shards."""
    import os

    from cvops_pipelines.core.build.torchrun import read_outputs

    scene_snapshot(isolated_homes)
    out = tmp_path / "detector"
    proc = subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "cvops_pipelines.train_ddp",
            "--task",
            "detection",
            "--dataset-version",
            "ds-scenes",
            "--out",
            str(out),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    history = json.loads((out / "history.json").read_text())
    assert history["world_size"] == 2 and history["best_epoch"] == 2
    assert [e["epoch"] for e in history["history"]] == [1, 2]
    assert all(e["train_loss"] > 0 for e in history["history"])
    assert proc.stdout.count("epoch 1: train_loss") == 1  # rank 0 reports, once
    result = read_outputs(out)  # through the registry's builder, tensors weights_only
    assert result.preprocess.task == "detection"
    assert list(result.preprocess.classes) == sorted({lab for s in SCENES for lab in s.labels})


def test_a_detectors_hyperparameters_are_its_torchrun_options():
    from dataclasses import fields

    from cvops_pipelines.core.build.detection_training import DetectorConfig
    from cvops_pipelines.train_ddp import parse

    args = parse(["--task", "detection", "--dataset-version", "x", "--out", "y", "--epochs", "3"])
    config = DetectorConfig(**{f.name: getattr(args, f.name) for f in fields(DetectorConfig)})
    assert config == DetectorConfig(epochs=3)


def test_an_unknown_task_or_a_detector_option_for_a_classifier_is_a_usage_error(capsys):
    import pytest

    from cvops_pipelines.train_ddp import parse

    with pytest.raises(SystemExit):
        parse(["--task", "segmentation", "--dataset-version", "x", "--out", "y"])
    assert "invalid choice: 'segmentation'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a detector's option is not a classifier's
        parse(["--dataset-version", "x", "--out", "y", "--nms-iou", "0.5"])
    assert "unrecognized arguments: --nms-iou" in capsys.readouterr().err
