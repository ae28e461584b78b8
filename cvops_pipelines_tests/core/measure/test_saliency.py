"""Grad-CAM: the map follows what the class score depends on, on any torchvision classifier."""

import io

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from cvops_pipelines.core.build.models import Preprocess, build_model
from cvops_pipelines.core.measure.saliency import examples_png, grad_cam, overlay_png, saliency
from cvops_pipelines_tests.helpers import CLASSES, digits


class _LeftHalf(nn.Module):
    """Keeps the left half of a feature map: the class score cannot depend on the right."""

    def forward(self, x):
        mask = torch.zeros_like(x)
        mask[..., : x.shape[-1] // 2] = 1
        return x * mask


def _left_looking_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        _LeftHalf(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def test_the_map_is_where_the_class_score_comes_from():
    model = _left_looking_model()
    with torch.no_grad():  # a positive class-0 weight on every channel: more signal, more class 0
        model[5].weight[0].fill_(1.0)
    batch = torch.rand(3, 3, 16, 16)
    heat = grad_cam(model, batch, [0, 0, 0], 16)
    assert heat.shape == (3, 16, 16)
    assert heat.min() >= 0 and heat.max() <= 1 and np.allclose(heat.max(axis=(1, 2)), 1)
    # the right half had no say in the score: (almost) nothing there, bilinear seam aside
    assert heat[:, :, 10:].max() < 0.05 < heat[:, :, :6].mean()


def test_a_torchvision_classifier_gets_a_map_per_image_and_an_overlay_png():
    images, labels = digits(range(6))
    spec = Preprocess("resnet18", 64, (0.5,) * 3, (0.5,) * 3, tuple(CLASSES))
    model = build_model("resnet18", 10)
    heat = saliency(model, images, labels.tolist(), spec)
    assert heat.shape == (6, 64, 64) and np.isfinite(heat).all()
    png = overlay_png(images[0], heat[0])
    assert Image.open(io.BytesIO(png)).size == (128, 128)
    assert not any(p.grad is not None for p in model.parameters())  # no gradients left behind


def test_examples_show_the_wrong_answers_first_then_the_least_confident():
    images, labels = digits(range(5))
    spec = Preprocess("resnet18", 32, (0.5,) * 3, (0.5,) * 3, tuple(CLASSES))
    probs = np.full((5, 10), 0.01)
    answers = labels.copy()
    answers[[1, 3]] = (labels[[1, 3]] + 1) % 10  # two wrong
    probs[np.arange(5), answers] = [0.9, 0.6, 0.5, 0.95, 0.4]
    png, tiles = examples_png(build_model("resnet18", 10), images, probs, labels, spec, 8, 2)
    assert tiles == 4 and Image.open(io.BytesIO(png)).format == "PNG"
    none, zero = examples_png(build_model("resnet18", 10), [], np.zeros((0, 10)), labels[:0], spec)
    assert none is None and zero == 0
