"""Training on real digit images: determinism, weights from the local cache (or fetched once,
hash-checked), frozen backbones."""

import io
import pickle

import numpy as np
import pytest
import torch

from cvops_pipelines.core.build import models
from cvops_pipelines.core.build.models import (
    Preprocess,
    WeightsNotAvailable,
    build_model,
    load_model,
    state_dict_bytes,
)
from cvops_pipelines.core.build.training import (
    TrainConfig,
    fit,
    hyperparameter_search,
    predict_probs,
)
from cvops_pipelines.core.measure.metrics import evaluate_predictions
from cvops_pipelines_tests.helpers import CLASSES, digits

SMALL = TrainConfig(image_size=32, epochs=3, batch_size=32, learning_rate=3e-3, seed=7)


@pytest.fixture(scope="module")
def data():
    return digits(range(0, 400)), digits(range(400, 500)), digits(range(500, 700))


def _metrics(history: list[dict]) -> list[dict]:
    """Everything an epoch logs except wall-clock throughput."""
    return [{k: v for k, v in row.items() if k != "train_images_per_second"} for row in history]


def test_same_seed_same_metrics_and_the_reported_accuracy_is_the_predictions(data):
    """Invariants only: how far above chance 3 epochs get depends on the CPU and its load
    (0.585 to 0.9 seen here), so the learning claim lives in benchmarks/, over seeds."""
    train, val, test = data
    first = fit(train, val, CLASSES, SMALL)
    second = fit(train, val, CLASSES, SMALL)
    assert _metrics(first.history) == _metrics(second.history)
    p1 = predict_probs(first.model, test[0], first.preprocess)
    p2 = predict_probs(second.model, test[0], second.preprocess)
    np.testing.assert_array_equal(p1, p2)
    assert np.allclose(p1.sum(axis=1), 1.0, atol=1e-5)
    truth = np.array([CLASSES.index(str(label)) for label in test[1]])
    accuracy = evaluate_predictions(p1, test[1], CLASSES).accuracy
    assert accuracy == pytest.approx(float((p1.argmax(axis=1) == truth).mean()))
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]


def test_images_per_epoch_draws_that_many_each_epoch_and_a_fresh_draw_each_time(data):
    train, val, _ = data
    config = TrainConfig(**{**SMALL.__dict__, "epochs": 2, "images_per_epoch": 96})
    result = fit(train, val, CLASSES, config)
    assert [row["train_images"] for row in result.history] == [96, 96]
    assert result.history[0]["train_loss"] != result.history[1]["train_loss"]
    everything = fit(train, val, CLASSES, TrainConfig(**{**SMALL.__dict__, "epochs": 1}))
    assert everything.history[0]["train_images"] == len(train[1])
    with pytest.raises(ValueError, match="images_per_epoch must be >= 0"):
        TrainConfig(images_per_epoch=-5)


def test_without_validation_every_epoch_trains_and_the_last_weights_are_kept(data):
    """Label QA's folds have only suspect labels to validate on: no split picks their epoch."""
    train, val, test = data
    config = TrainConfig(**{**SMALL.__dict__, "epochs": 2, "patience": 1})
    result = fit(train, None, CLASSES, config)
    assert [row["epoch"] for row in result.history] == [1, 2] and result.best_epoch == 2
    assert not any("val_loss" in row for row in result.history)
    validated = fit(train, val, CLASSES, config)  # the same training, judged on val each epoch
    assert _metrics(result.history) == [
        {k: v for k, v in row.items() if not k.startswith("val_")}
        for row in _metrics(validated.history)
    ]
    if validated.best_epoch == 2:  # then both kept the same weights
        np.testing.assert_allclose(
            predict_probs(result.model, test[0], result.preprocess),
            predict_probs(validated.model, test[0], validated.preprocess),
            atol=1e-6,
        )


def test_views_average_augmented_predictions_and_repeat(data):
    train, val, test = data
    result = fit(train, val, CLASSES, SMALL)
    plain = predict_probs(result.model, test[0], result.preprocess)
    viewed = predict_probs(result.model, test[0], result.preprocess, views=3)
    np.testing.assert_allclose(viewed.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(plain - viewed).max() > 1e-3  # the augmented views count
    again = predict_probs(result.model, test[0], result.preprocess, views=3, batch_size=50)
    np.testing.assert_allclose(viewed, again, atol=1e-6)  # seeded, whatever the batching


def test_another_seed_trains_a_different_model(data):
    train, val, _ = data
    a = fit(train, val, CLASSES, SMALL)
    b = fit(train, val, CLASSES, TrainConfig(**{**SMALL.__dict__, "seed": 8}))
    assert a.history[0]["train_loss"] != b.history[0]["train_loss"]


def test_precision_auto_follows_the_cpu_and_bf16_trains_fp32_weights(data, monkeypatch):
    """auto picks bf16 only where the CPU computes it natively (emulated bf16 is slower than
    fp32); bf16 is autocast: the arithmetic changes, the weights and the outputs stay fp32."""
    for flag in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, flag, lambda: False, raising=False)
    assert models.pick_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert models.pick_precision("auto", "cpu") == "bf16"
    assert models.pick_precision("auto", "mps") == "fp32"
    assert models.pick_precision("fp32", "cpu") == "fp32"  # what was asked for is kept
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        models.pick_precision("half", "cpu")
    train, val, test = data
    one = {**SMALL.__dict__, "epochs": 1}
    bf16 = fit(train, val, CLASSES, TrainConfig(**{**one, "precision": "bf16"}))
    fp32 = fit(train, val, CLASSES, TrainConfig(**{**one, "precision": "fp32"}))
    assert bf16.history[0]["train_loss"] != fp32.history[0]["train_loss"]  # bf16 was applied
    assert np.isfinite(bf16.history[0]["train_loss"])
    floats = [t for t in bf16.model.state_dict().values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)
    probs = predict_probs(bf16.model, test[0], bf16.preprocess)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_offline_missing_weights_are_refused_with_the_file_and_the_folder(tmp_path, monkeypatch):
    def no_network(url, path):
        raise AssertionError(f"CVOPS_OFFLINE is set, yet {url} was fetched")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("CVOPS_OFFLINE", "1")
    monkeypatch.setattr(models, "fetch_weights", no_network)
    with pytest.raises(WeightsNotAvailable) as err:
        build_model("resnet18", 10, "IMAGENET1K_V1")
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "CVOPS_OFFLINE" in message
    with pytest.raises(ValueError, match="no weights 'IMAGENET9K'"):
        build_model("resnet18", 10, "IMAGENET9K")
    with pytest.raises(ValueError, match="unknown torchvision classification model"):
        build_model("resnet9000", 10)


def _cache(tmp_path, monkeypatch, payload: bytes) -> None:
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "resnet18-f37072fd.pth").write_bytes(payload)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))


def test_pretrained_weights_come_from_the_local_cache(tmp_path, monkeypatch):
    import torchvision

    torch.manual_seed(1)
    imagenet_like = torchvision.models.resnet18()  # stands in for the published checkpoint
    buffer = io.BytesIO()
    torch.save(imagenet_like.state_dict(), buffer)
    _cache(tmp_path, monkeypatch, buffer.getvalue())
    model = build_model("resnet18", 10, "IMAGENET1K_V1", freeze_backbone=True)
    assert torch.equal(model.conv1.weight, imagenet_like.conv1.weight)
    assert model.fc.out_features == 10
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}


@pytest.fixture
def weights_server(tmp_path):
    """A loopback HTTP server standing in for download.pytorch.org (tests cannot reach it)."""
    import functools
    import http.server
    import threading

    root = tmp_path / "published"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _published(root, payload: bytes, tamper: bool = False) -> str:
    """A checkpoint named as torchvision names them: the sha256 prefix of its bytes."""
    import hashlib

    name = f"resnet18-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    (root / name).write_bytes(payload + (b"x" if tamper else b""))
    return name


def test_online_missing_weights_are_downloaded_once_hash_checked_then_cached(
    tmp_path, monkeypatch, weights_server
):
    """Through a real HTTP download (torch.hub's) into the cache; then the cache is read."""
    import torchvision

    root, base = weights_server
    torch.manual_seed(2)
    published = torchvision.models.resnet18()
    buffer = io.BytesIO()
    torch.save(published.state_dict(), buffer)
    name = _published(root, buffer.getvalue())
    fetched, real_fetch = [], models.fetch_weights

    def from_loopback(url, path):  # the enum's URL, served from loopback under its own name
        fetched.append(url)
        real_fetch(f"{base}/{name}", path)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("CVOPS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "fetch_weights", from_loopback)
    model = build_model("resnet18", 10, "DEFAULT")
    assert fetched == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    assert torch.equal(model.conv1.weight, published.conv1.weight)
    assert (tmp_path / "torch/hub/checkpoints/resnet18-f37072fd.pth").exists()
    build_model("resnet18", 10, "IMAGENET1K_V1")  # the same file, now from the cache
    assert len(fetched) == 1


def test_a_tampered_or_unreachable_download_is_refused_and_nothing_is_cached(
    tmp_path, weights_server
):
    import socket

    root, base = weights_server
    name = _published(root, b"checkpoint bytes", tamper=True)
    target = tmp_path / "cache" / name
    with pytest.raises(WeightsNotAvailable, match="hash check"):
        models.fetch_weights(f"{base}/{name}", target)
    assert not target.exists() and not list(target.parent.iterdir())
    with socket.socket() as closed:  # a port nobody listens on: the machine is offline
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(WeightsNotAvailable, match="could not download"):
        models.fetch_weights(f"http://127.0.0.1:{port}/{name}", target)
    assert not target.exists()


def test_a_pickle_in_the_weights_cache_is_refused(tmp_path, monkeypatch):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run on load",))

    _cache(tmp_path, monkeypatch, pickle.dumps({"conv1.weight": Payload()}))
    with pytest.raises(pickle.UnpicklingError), pytest.warns(UserWarning):
        build_model("resnet18", 10, "IMAGENET1K_V1")


def test_frozen_backbone_stays_bit_identical_and_the_model_round_trips(data):
    train, val, test = data
    config = TrainConfig(**{**SMALL.__dict__, "epochs": 1, "freeze_backbone": True})
    torch.manual_seed(config.seed)
    before = build_model("resnet18", 10, freeze_backbone=True).state_dict()
    result = fit(train, val, CLASSES, config)
    after = result.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # batch-norm running stats included
    preprocess = Preprocess.from_json(result.preprocess.to_json())
    loaded = load_model(state_dict_bytes(result.model), preprocess)
    np.testing.assert_allclose(
        predict_probs(loaded, test[0][:20], preprocess),
        predict_probs(result.model, test[0][:20], result.preprocess),
        atol=1e-6,
    )


def test_freeze_before_keeps_the_early_backbone_and_trains_the_rest(data):
    """`freeze_before: layer3`: conv1 to layer2 (batch-norm statistics included) stay as they
    started, layer3 onwards learn; a name no parameter has is refused with the choices."""
    train, val, _ = data
    config = TrainConfig(**{**SMALL.__dict__, "epochs": 1, "freeze_before": "layer3"})
    start = build_model("resnet18", 10).state_dict()
    result = fit(train, val, CLASSES, config, initial_state=start)
    after = result.model.state_dict()
    changed = {k.split(".")[0] for k in start if not torch.equal(start[k], after[k])}
    assert changed == {"layer3", "layer4", "fc"}
    with pytest.raises(ValueError, match="names no parameter of resnet18.*layer1"):
        build_model("resnet18", 10, freeze_before="blocks")


def test_search_returns_the_trial_with_the_lowest_validation_loss(data):
    train, val, _ = data
    best, rows = hyperparameter_search(train, val, CLASSES, SMALL, trials=3, epochs_per_trial=1)
    assert len(rows) == 3 and rows[0]["learning_rate"] == SMALL.learning_rate
    winner = min(rows, key=lambda r: r["val_loss"])
    assert best == {
        "learning_rate": winner["learning_rate"],
        "weight_decay": winner["weight_decay"],
    }
