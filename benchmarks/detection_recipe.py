"""Which detector to train by default: torchvision detectors that need no download, at equal
CPU minutes, on the demo's scenes.

Each candidate trains from scratch (or from the SSL encoder) on the detection demo's labelled drop
(`demo/scenes.py`, 320 scenes, seed 0, its 70% train split: 224 scenes) with the project's own
trainer (`train_detector`: box-aware augmentation, AdamW, one-cycle schedule, batch-norm
recalibration), for as many epochs as fit its budget of training minutes on this machine's CPU
threads (the epoch time is probed first, on a model thrown away). Quality is COCO mAP@[.5:.95] and
mAP@.5 (torchmetrics, faster-coco-eval) on 200 held-out scenes of another seed, through
torchvision's own inference. The SSL encoder (SimCLR, `core/build/ssl.py`) pretrains on every
frame the loop would have (the drop and 240 field frames) once, shared by the turns of a loop;
its minutes are reported apart.

Target (issue 32): test mAP@.5 >= 0.85 and mAP >= 0.5 within 5 CPU-minutes of training on 2
cores.
"""

import time

import numpy as np

from cvops_pipelines.core.base.box_metrics import evaluate_detections
from cvops_pipelines.core.build.detection_run import predict
from cvops_pipelines.core.build.detection_training import (
    DetectorConfig,
    DetectorSpec,
    build_detector,
    chunks,
    state_from_encoder,
    train_detector,
)
from cvops_pipelines.demo.scenes import CLASSES, SceneConfig, scenes

TARGET = {"map_50": 0.85, "map": 0.5}


def _resnet18_fpn(head):
    """A torchvision one-stage detector on a ResNet-18 FPN (P3-P7), batch norm (not the frozen
    kind torchvision uses under pretrained weights: nothing here is pretrained)."""

    def build(num_classes: int, config: DetectorConfig):
        import torch
        from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7

        backbone = resnet_fpn_backbone(
            backbone_name="resnet18",
            weights=None,
            norm_layer=torch.nn.BatchNorm2d,
            trainable_layers=5,
            returned_layers=[2, 3, 4],
            extra_blocks=LastLevelP6P7(256, 256),
        )
        size = config.image_size
        return head(
            backbone,
            num_classes + 1,
            min_size=size,
            max_size=size,
            score_thresh=config.score_threshold,
            detections_per_img=config.detections_per_image,
        )

    return build


def _fasterrcnn(num_classes: int, config: DetectorConfig):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    size = config.image_size
    return fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=num_classes + 1,
        min_size=size,
        max_size=size,
    )


def _candidates() -> dict:
    from torchvision.models.detection import FCOS, RetinaNet

    return {
        "ssdlite320_mobilenet_v3_large": (build_detector, 320),
        "ssdlite320_mobilenet_v3_large + ssl_encoder": (build_detector, 320),
        "fasterrcnn_mobilenet_v3_large_320_fpn": (_fasterrcnn, 320),
        "fcos_resnet18_fpn": (_resnet18_fpn(FCOS), 160),
        "retinanet_resnet18_fpn": (_resnet18_fpn(RetinaNet), 160),
    }


def _epoch_seconds(build, data, config: DetectorConfig) -> float:
    """One epoch's time, from three steps of a model thrown away."""
    images, boxes, labels = data
    count = 3 * config.batch_size
    probe = DetectorConfig(**{**config.__dict__, "epochs": 1})
    started = time.perf_counter()
    train_detector(images[:count], boxes[:count], labels[:count], len(CLASSES), probe, build=build)
    per_step = (time.perf_counter() - started) / 3
    return per_step * len(chunks(len(images), config.batch_size))


def _encoder(images: list[np.ndarray], quick: bool) -> tuple[object, float]:
    from cvops_pipelines.core.build.ssl import SSLConfig, pretrain

    started = time.perf_counter()
    config = SSLConfig(
        architecture="mobilenet_v3_large",
        image_size=64,
        epochs=2 if quick else 40,
        batch_size=128,
        rotation=10.0,  # digits: up matters
    )
    return pretrain(images, config).model, time.perf_counter() - started


def run(quick: bool = False) -> dict:
    budgets = [0.05] if quick else [2.5, 5.0]  # training minutes
    drop = scenes(48 if quick else 320, seed=0)
    train = drop[: int(len(drop) * 0.7)]
    test = scenes(16 if quick else 200, seed=1)
    field = scenes(16 if quick else 240, seed=7919, config=SceneConfig(noise=0.09, p_empty=0.15))
    data = (
        [s.image for s in train],
        [s.boxes for s in train],
        [[CLASSES.index(label) + 1 for label in s.labels] for s in train],
    )
    truths = [{"boxes": s.boxes, "labels": s.labels} for s in test]
    candidates = _candidates()
    if quick:
        candidates = {k: v for k, v in candidates.items() if k.startswith("ssdlite")}
    encoder, ssl_s = _encoder([s.image for s in drop + field], quick)
    rows = []
    for name, (build, size) in candidates.items():
        base = DetectorConfig(image_size=size, learning_rate=0.004, batch_size=8)
        epoch_s = _epoch_seconds(build, data, base)
        for minutes in budgets:
            epochs = max(1, int(minutes * 60 / epoch_s))
            config = DetectorConfig(**{**base.__dict__, "epochs": epochs})
            start = None
            if "ssl_encoder" in name:
                start = state_from_encoder(encoder, build(len(CLASSES), config))[0]
            started = time.perf_counter()
            model = train_detector(*data, len(CLASSES), config, initial_state=start, build=build)
            train_s = time.perf_counter() - started
            report = evaluate_detections(
                predict(model, [s.image for s in test], DetectorSpec.of(config, CLASSES)),
                truths,
                CLASSES,
            )
            row = {
                "detector": name,
                "budget_min": minutes,
                "image_size": size,
                "epochs": epochs,
                "train_min": round(train_s / 60, 2),
                "map": round(report.map, 4),
                "map_50": round(report.map_50, 4),
            }
            rows.append(row)
            print(row, flush=True)
    best = max((r for r in rows if r["budget_min"] == budgets[-1]), key=lambda r: r["map_50"])
    return {
        "train_scenes": len(train),
        "test_scenes": len(test),
        "ssl_pretrain_min": round(ssl_s / 60, 2),
        "rows": rows,
        "best_at_largest_budget": best,
        "target": TARGET,
        "target_met": best["map_50"] >= TARGET["map_50"] and best["map"] >= TARGET["map"],
    }
