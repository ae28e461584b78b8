"""Torchvision detectors for the detection task: built offline, trained with box-aware
augmentation, exported up to their raw head outputs.

torchvision's detection builders download ImageNet backbone weights unless told not to, so every
builder here passes `weights=None, weights_backbone=None`; a local checkpoint (a state dict, read
with `weights_only=True`) is the only way pretrained tensors come in. The ONNX graph stops before
the data-dependent part (score thresholds, top-k, NMS): it returns every anchor's decoded box and
class probabilities, and the device finishes in numpy (`edge/detect.py`), so the export has no
data-dependent shapes and the same graph serves any batch size.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cvops_pipelines.core.build.training import _hp, distributed

# detector -> the torchvision classifier its backbone is (what an ssl_encoder must be to start it)
ARCHITECTURES = {"ssdlite320_mobilenet_v3_large": "mobilenet_v3_large"}


@dataclass(frozen=True)
class DetectorConfig:
    architecture: str = _hp(
        "ssdlite320_mobilenet_v3_large",
        "torchvision detector (weights=None, weights_backbone=None: nothing is downloaded).",
    )
    image_size: int = _hp(320, "The detector's square input side.")
    checkpoint: str = _hp("", "A local state dict to start from, read with weights_only=True.")
    epochs: int = _hp(20, "Passes over the train split.")
    batch_size: int = _hp(8, "Images per step (per process under torchrun).")
    learning_rate: float = _hp(0.002, "AdamW peak learning rate (one-cycle schedule).")
    seed: int = _hp(0, "Seeds torch, numpy and the augmentations.")
    score_threshold: float = _hp(
        0.05, "Boxes below this score are not reported (device and evaluation)."
    )
    nms_iou: float = _hp(0.55, "Class-wise non-maximum suppression IoU.")
    candidates_per_class: int = _hp(100, "Top-k boxes per class before NMS.")
    detections_per_image: int = _hp(50, "At most this many boxes per image.")
    augment: bool = _hp(True, "Box-aware augmentation (crop keeping every box, light, noise).")

    def __post_init__(self) -> None:
        """Refused here, by name, not minutes later as a scheduler's or batch norm's error."""
        wrong = [
            f"{name} {value!r} (wants {rule})"
            for name, value, ok, rule in (
                ("epochs", self.epochs, self.epochs >= 1, ">= 1"),
                ("batch_size", self.batch_size, self.batch_size >= 2, ">= 2: batch norm"),
                ("learning_rate", self.learning_rate, 0 < self.learning_rate < 1, "in (0, 1)"),
                ("score_threshold", self.score_threshold, 0 <= self.score_threshold < 1, "[0, 1)"),
                ("nms_iou", self.nms_iou, 0 < self.nms_iou <= 1, "in (0, 1]"),
                (
                    "candidates_per_class",
                    self.candidates_per_class,
                    self.candidates_per_class >= 1,
                    ">= 1",
                ),
                (
                    "detections_per_image",
                    self.detections_per_image,
                    self.detections_per_image >= 1,
                    ">= 1",
                ),
            )
            if not ok
        ]
        if wrong:
            raise ValueError("detector settings: " + "; ".join(wrong))


MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ssdlite's own normalisation


@dataclass(frozen=True)
class DetectorSpec:
    """What a device needs to run the detector; travels as `preprocess.json` and inside the
    ONNX file, like a classifier's Preprocess."""

    architecture: str
    image_size: int
    classes: tuple[str, ...]
    score_threshold: float
    nms_iou: float
    candidates_per_class: int
    detections_per_image: int
    answer_threshold: float = 0.5  # the operating point: boxes counted as the answer (set from
    # validation at training time; every box above score_threshold is still reported)
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    task: str = "detection"

    @classmethod
    def of(cls, config: DetectorConfig, classes: list[str]) -> DetectorSpec:
        return cls(
            config.architecture,
            config.image_size,
            tuple(classes),
            config.score_threshold,
            config.nms_iou,
            config.candidates_per_class,
            config.detections_per_image,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> DetectorSpec:
        doc = json.loads(text)
        if doc.get("task") != "detection":
            raise ValueError(f"this is a {doc.get('task', 'classification')} model's spec")
        doc["classes"], doc["mean"], doc["std"] = (
            tuple(doc["classes"]),
            tuple(doc["mean"]),
            tuple(doc["std"]),
        )
        return cls(**doc)

    def config(self) -> DetectorConfig:
        """What rebuilds the network this spec describes (the weights come separately)."""
        return DetectorConfig(
            architecture=self.architecture,
            image_size=self.image_size,
            score_threshold=self.score_threshold,
            nms_iou=self.nms_iou,
            candidates_per_class=self.candidates_per_class,
            detections_per_image=self.detections_per_image,
        )


def build_detector(num_classes: int, config: DetectorConfig = DetectorConfig()):
    """`num_classes` object classes (+1 background, index 0). Nothing is downloaded."""
    import torch
    from torchvision.models import detection

    if config.architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown detector {config.architecture!r}; available: {', '.join(ARCHITECTURES)}"
        )
    builder = getattr(detection, config.architecture)
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    model.score_thresh = config.score_threshold
    model.nms_thresh = config.nms_iou
    model.topk_candidates = config.candidates_per_class
    model.detections_per_img = config.detections_per_image
    if config.checkpoint:
        path = Path(config.checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"detector checkpoint {path} does not exist")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def load_detector(state: bytes, spec: DetectorSpec):
    """A registered detector from its state dict (read with `weights_only=True`) and spec."""
    import torch

    model = build_detector(len(spec.classes), spec.config())
    model.load_state_dict(torch.load(io.BytesIO(state), map_location="cpu", weights_only=True))
    return model.eval()


def state_from_encoder(encoder, detector) -> tuple[dict, int, int]:
    """(the detector's state with the encoder's tensors in its backbone, tensors started, of).

    torchvision's SSDlite regroups the classifier's `features` blocks around the C4 tap but
    keeps their order, so the two sequences pair one to one. Without downloaded backbone
    weights it builds MobileNetV3 with a halved last stage (its "reduced tail"): those tensors
    do not fit and stay fresh; every other one starts from the encoder."""
    mine = [(k, v) for k, v in encoder.state_dict().items() if k.startswith("features.")]
    state = detector.state_dict()
    theirs = [k for k in state if k.startswith("backbone.features.")]
    fits = len(mine) == len(theirs) and all(
        a.rsplit(".", 1)[-1] == b.rsplit(".", 1)[-1] for (a, _), b in zip(mine, theirs)
    )
    if not fits or mine[0][1].shape != state[theirs[0]].shape:
        raise ValueError("the encoder's layers do not pair with this detector's backbone")
    started = 0
    for (_, tensor), key in zip(mine, theirs):
        if tensor.shape == state[key].shape:
            state[key], started = tensor.clone(), started + 1
    return state, started, len(theirs)


def augmentation(config: DetectorConfig):
    """Box-aware: every geometric change moves the boxes with the pixels; a box pushed mostly
    out of the frame is dropped, not kept as a sliver."""
    import albumentations as A

    steps = [A.Resize(config.image_size, config.image_size)]
    if config.augment:
        steps = [
            A.RandomSizedBBoxSafeCrop(
                config.image_size, config.image_size, erosion_rate=0.0, p=0.5
            ),
            A.Resize(config.image_size, config.image_size),
            A.RandomBrightnessContrast(0.25, 0.25, p=0.7),
            A.GaussNoise(std_range=(0.02, 0.08), p=0.3),
        ]
    return A.Compose(
        steps,
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=0.3),
        seed=config.seed,
    )


def chunks(count: int, size: int) -> list[slice]:
    """Batches of `size`, the last one merged into its neighbour when it would hold one image:
    batch norm cannot train on a batch of one."""
    starts = list(range(0, count, size))
    if len(starts) > 1 and count - starts[-1] == 1:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, [*starts[1:], count])]


def _batch(samples, transform, rng):
    import torch

    images, targets = [], []
    for image, boxes, labels in samples:
        out = transform(image=image, bboxes=np.asarray(boxes).reshape(-1, 4), labels=list(labels))
        tensor = torch.from_numpy(out["image"]).permute(2, 0, 1).float() / 255.0
        images.append(tensor)
        targets.append(
            {
                "boxes": torch.as_tensor(
                    np.asarray(out["bboxes"]).reshape(-1, 4), dtype=torch.float32
                ),
                "labels": torch.as_tensor(out["labels"], dtype=torch.int64),
            }
        )
    return images, targets


def shard(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of an epoch's order, padded (like DistributedSampler) so that every
    rank takes as many steps: DistributedDataParallel waits for all of them at each one."""
    if world == 1:
        return order
    padded = np.concatenate([order, order[: (-len(order)) % world]])
    return padded[rank::world]


def train_detector(
    images: list[np.ndarray],
    boxes: list[np.ndarray],
    labels: list[list[int]],
    num_classes: int,
    config: DetectorConfig = DetectorConfig(),
    on_epoch=None,
    device: str = "cpu",
    initial_state: dict | None = None,
    build=build_detector,
):
    """Train on RGB uint8 images with pixel boxes and 1-based class indices (0 is background);
    `on_epoch(epoch, mean loss)` reports progress; `build(num_classes, config)` makes the
    network (any torchvision detector: benchmarks/detection_recipe.py compares several).
    Under torchrun every process trains its shard of each epoch (DistributedDataParallel
    averages the gradients) and reports the loss over all of them. Returns the model on the
    CPU, in eval mode."""
    import torch

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)  # the same epoch order on every rank
    rank, world = distributed()
    model = build(num_classes, config)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    model = model.to(device)
    trained = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(
            model, device_ids=[device] if device.startswith("cuda") else None
        )
    transform = augmentation(replace(config, seed=config.seed + rank))
    # the for-loop AdamW, not models.adamw's fused kernel: with it, the detection demo's young
    # turn-2 detector (mAP 0) exported with 3 of 2,714 boxes unmatched in the ONNX parity proof
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    per_rank = len(shard(np.arange(len(images)), rank, world))
    steps = len(chunks(per_rank, config.batch_size)) * config.epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.learning_rate, total_steps=steps
    )
    samples = list(zip(images, boxes, labels))
    trained.train()
    for epoch in range(config.epochs):
        order, total, seen = shard(rng.permutation(len(samples)), rank, world), 0.0, 0
        for part in chunks(len(order), config.batch_size):
            chunk = [samples[i] for i in order[part]]
            batch_images, targets = _batch(chunk, transform, rng)
            batch_images = [image.to(device) for image in batch_images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            loss = sum(trained(batch_images, targets).values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"detector loss is {loss.item()} at epoch {epoch + 1}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total, seen = total + float(loss.detach()), seen + 1
        if world > 1:  # the epoch's mean over every rank's steps
            import torch.distributed as dist

            sums = torch.tensor([total, seen], dtype=torch.float64)
            dist.all_reduce(sums)
            total, seen = sums[0].item(), int(sums[1])
        if on_epoch is not None:
            on_epoch(epoch + 1, total / max(seen, 1))
    recalibrate_batchnorm(model, images, config, device)
    return model.cpu().eval()


def recalibrate_batchnorm(
    model, images: list[np.ndarray], config: DetectorConfig, device: str = "cpu"
) -> None:
    """Recompute every batch-norm layer's running statistics over the training images as the
    device will see them (no augmentation). ssdlite's layers update them with momentum 0.03, so
    after a short run they still describe the random init, and the model in eval mode answers
    almost the same for every image."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the passes below
    plain = augmentation(DetectorConfig(image_size=config.image_size, augment=False))
    model.train()
    with torch.no_grad():
        for part in chunks(len(images), config.batch_size):
            chunk = [(image, [], []) for image in images[part]]
            batch, _ = _batch(chunk, plain, None)
            model.backbone(model.transform([b.to(device) for b in batch])[0].tensors)
    for norm in norms:
        norm.momentum = 0.03
    model.eval()


class RawHeads:
    """Wraps a trained detector as `images -> (boxes, scores)` for export: boxes decoded
    against the fixed anchors and scaled to [0, 1] of the input, scores softmaxed over
    classes (column 0 is background). Everything after this is the device's numpy."""

    def __new__(cls, model, image_size: int):
        import torch
        from torchvision.models.detection.image_list import ImageList

        class _Raw(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model, self.size = model.eval(), image_size
                probe = torch.zeros(1, 3, image_size, image_size)
                with torch.no_grad():
                    features = list(model.backbone(probe).values())
                    anchors = model.anchor_generator(
                        ImageList(probe, [(image_size, image_size)]), features
                    )[0]
                self.register_buffer("anchors", anchors)

            def forward(self, x):
                head = self.model.head(list(self.model.backbone(x).values()))
                rel, a = head["bbox_regression"], self.anchors
                coder = self.model.box_coder
                wx, wy, ww, wh = coder.weights
                width, height = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
                cx, cy = a[:, 0] + 0.5 * width, a[:, 1] + 0.5 * height
                dw = torch.clamp(rel[..., 2] / ww, max=coder.bbox_xform_clip)
                dh = torch.clamp(rel[..., 3] / wh, max=coder.bbox_xform_clip)
                px, py = rel[..., 0] / wx * width + cx, rel[..., 1] / wy * height + cy
                pw, ph = torch.exp(dw) * width, torch.exp(dh) * height
                boxes = torch.stack(
                    [px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], -1
                )
                boxes = boxes.clamp(0, self.size) / self.size
                return boxes, torch.softmax(head["cls_logits"], -1)

        return _Raw().eval()


def predict_torch(model, images: list[np.ndarray], image_size: int) -> list[dict]:
    """torchvision's own inference (its postprocess, its NMS) on images already resized to the
    input side by `edge.preprocess.resize`, boxes scaled back to each image's pixels: the
    reference the device path must match."""
    import torch

    from cvops_pipelines.edge.preprocess import resize

    out = []
    with torch.no_grad():
        for image in images:
            height, width = image.shape[:2]
            from PIL import Image

            pixels = np.array(resize(Image.fromarray(image), image_size))
            tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
            result = model.eval()([tensor])[0]
            scale = torch.tensor([width, height, width, height]) / image_size
            out.append(
                {
                    "boxes": (result["boxes"] * scale).numpy(),
                    "scores": result["scores"].numpy(),
                    "labels": result["labels"].numpy(),
                }
            )
    return out
