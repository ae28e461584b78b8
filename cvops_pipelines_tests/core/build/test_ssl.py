"""Self-supervised pretraining: deterministic, label-free, and its tensors start a classifier."""

import io

import numpy as np
import pytest
import torch

from cvops_pipelines.core.build.models import Preprocess, build_model, state_dict_bytes
from cvops_pipelines.core.build.ssl import (
    EncoderSpec,
    SSLConfig,
    classifier_state,
    embed,
    load_encoder,
    nt_xent,
    penultimate,
    pretrain,
)
from cvops_pipelines.core.build.training import TrainConfig, fit
from cvops_pipelines.demo.objects import objects
from cvops_pipelines_tests.helpers import CLASSES

SMALL = SSLConfig(image_size=32, epochs=3, batch_size=64, seed=3)


@pytest.fixture(scope="module")
def images():
    return objects(192, seed=1)[0]


def test_the_loss_knows_which_rows_are_two_views_of_one_image():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    paired = torch.repeat_interleave(z[::2], 2, dim=0)  # rows 2k and 2k+1 identical
    assert nt_xent(paired, 0.2) < nt_xent(z, 0.2)
    assert nt_xent(paired, 0.2) < nt_xent(paired[torch.randperm(8)], 0.2)


def test_same_seed_same_encoder(images):
    first, second = pretrain(images, SMALL), pretrain(images, SMALL)
    losses = [row["ssl_loss"] for row in first.history]
    assert len(losses) == SMALL.epochs and np.isfinite(losses).all()
    assert losses == [row["ssl_loss"] for row in second.history]
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_the_encoder_round_trips_as_tensors_and_json_and_embeds(images):
    trained = pretrain(images[:64], SSLConfig(image_size=32, epochs=1, batch_size=32))
    spec = EncoderSpec.from_json(trained.spec.to_json())
    assert spec == trained.spec
    with pytest.raises(ValueError, match="ssl_encoder"):
        Preprocess.from_json(trained.spec.to_json())  # never read as a classifier's spec
    model = load_encoder(state_dict_bytes(trained.model), spec)
    features = embed(model, images[:10], spec)
    assert features.shape == (10, 512)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(features, embed(trained.model, images[:10], spec), atol=1e-5)


def test_a_classifier_starts_from_the_encoder_with_a_fresh_head(images):
    trained = pretrain(images[:64], SSLConfig(image_size=32, epochs=1, batch_size=32))
    classifier = build_model("resnet18", 10)
    state = classifier_state(trained.model, classifier)
    torch.testing.assert_close(state["conv1.weight"], trained.model.state_dict()["conv1.weight"])
    torch.testing.assert_close(state["fc.weight"], classifier.state_dict()["fc.weight"])
    labels = np.arange(len(images[:64])) % 10
    config = TrainConfig(image_size=32, epochs=1, batch_size=32, ema_epochs=0)
    started = fit(
        (images[:64], labels), (images[:20], labels[:20]), CLASSES, config, "cpu", None, state
    )
    scratch = fit((images[:64], labels), (images[:20], labels[:20]), CLASSES, config)
    assert started.history[0]["train_loss"] != scratch.history[0]["train_loss"]
    with pytest.raises(ValueError, match="does not fit"):
        classifier_state(trained.model, build_model("mobilenet_v3_small", 10))


def test_a_trained_classifier_gives_its_penultimate_layer_and_stays_a_classifier():
    model = build_model("resnet18", 10)
    features = penultimate(model)
    batch = torch.zeros(2, 3, 32, 32)
    assert features(batch).shape == (2, 512) and model(batch).shape == (2, 10)
    assert (
        torch.load(io.BytesIO(state_dict_bytes(model)), weights_only=True)["fc.weight"].shape[0]
        == 10
    )
