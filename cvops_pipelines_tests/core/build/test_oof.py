"""Out-of-fold fine-tuning: no image is judged by a model that saw it, in training or in model
selection (there is none: the noisy labels pick no epoch), and the folds repeat."""

from dataclasses import replace

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold

from cvops_pipelines.core.build import oof
from cvops_pipelines.core.build.oof import OOF_TRAINING, finetuned_oof_probabilities
from cvops_pipelines.core.build.training import FitResult
from cvops_pipelines.core.curate.label_qa import ScorerDeclined
from cvops_pipelines.demo.objects import objects

CLASSES = [str(c) for c in range(10)]


def test_a_held_out_image_never_reaches_training_or_model_selection(monkeypatch):
    images = [np.full((8, 8, 3), i, np.uint8) for i in range(60)]  # pixel value = index
    labels = np.arange(60) % 3
    seen, judged = [], []

    def fake_fit(train, val, classes, config, device, on_epoch, initial_state):
        assert val is None
        seen.append({int(im[0, 0, 0]) for im in train[0]})
        return FitResult(model=len(seen) - 1, preprocess=None)

    def fake_predict(model, batch, preprocess, device, views):
        assert views == oof.VIEWS
        judged.append({int(im[0, 0, 0]) for im in batch})
        out = np.zeros((len(batch), 3))
        out[:, model % 3] = 1.0  # row says which fold's model scored it
        return out

    monkeypatch.setattr(oof, "fit", fake_fit)
    monkeypatch.setattr(oof, "predict_probs", fake_predict)
    held = []
    probs = finetuned_oof_probabilities(
        images, labels, ["a", "b", "c"], 3, 11, on_fold=lambda f, h: held.append(set(h))
    )
    expected = [
        set(h)
        for _, h in StratifiedKFold(3, shuffle=True, random_state=11).split(np.zeros(60), labels)
    ]
    assert held == expected == judged
    assert all(not (s & h) for s, h in zip(seen, held))
    assert all(len(s) == 60 - len(h) for s, h in zip(seen, held))  # the rest all trained on
    for fold, h in enumerate(held):
        assert (probs[sorted(h)].argmax(1) == fold % 3).all()


def test_real_fine_tuning_gives_one_distribution_per_image_and_repeats():
    images, labels = objects(40, seed=2)
    config = replace(OOF_TRAINING, image_size=32, epochs=1, batch_size=16)
    first = finetuned_oof_probabilities(images, labels, CLASSES, 2, 0, config)
    assert first.shape == (40, 10)
    np.testing.assert_allclose(first.sum(1), 1.0, atol=1e-5)
    again = finetuned_oof_probabilities(images, labels, CLASSES, 2, 0, config)
    np.testing.assert_allclose(first, again, atol=1e-5)


def test_the_folds_train_the_epochs_a_timed_probe_says_fit_the_budget(monkeypatch):
    """A probe (two short epochs) times a training step; the folds then train as many epochs
    as fit the budget (never more than asked), and decline with the figures when fewer than
    MIN_EPOCHS would."""
    images = [np.zeros((8, 8, 3), np.uint8) for _ in range(100)]
    labels = np.arange(100) % 2
    trained = []

    def fake_fit(train, val, classes, config, device, on_epoch, initial_state):
        trained.append(config.epochs)
        history = [{"train_images_per_second": 10.0}] * config.epochs  # 0.1 s an image
        return FitResult(model=None, preprocess=None, history=history)

    monkeypatch.setattr(oof, "fit", fake_fit)
    monkeypatch.setattr(
        oof, "predict_probs", lambda m, batch, p, d, views: np.full((len(batch), 2), 0.5)
    )
    # an epoch of 5 folds: 5 x 0.1 s x 80 images = 40 s
    epoch_s = oof.probe_epoch_seconds(images, labels, ["a", "b"], 5, OOF_TRAINING, None, "cpu")
    assert epoch_s == pytest.approx(40.0)
    logged = []
    config = replace(OOF_TRAINING, epochs=8)
    finetuned_oof_probabilities(
        images, labels, ["a", "b"], 5, 0, config, budget_s=200, log=logged.append
    )
    assert trained == [2, 2, 5, 5, 5, 5, 5]  # two probes, then 5 folds of 200 // 40 epochs
    assert "5 folds x 5 epochs" in logged[-1]
    trained.clear()
    finetuned_oof_probabilities(images, labels, ["a", "b"], 5, 0, config, budget_s=3600)
    assert trained[-5:] == [8] * 5  # the budget never adds epochs
    with pytest.raises(ScorerDeclined, match="over its budget of 1.0 min"):
        finetuned_oof_probabilities(images, labels, ["a", "b"], 5, 0, config, budget_s=60)
    assert oof.epochs_within(float("inf"), 40.0, 8) == 8  # an unbounded budget is no limit
    with pytest.raises(ScorerDeclined):
        oof.epochs_within(float("nan"), 40.0, 8)
    from_encoder = oof.fold_recipe(None, "mobilenet_v3_small", 48)
    assert (from_encoder.architecture, from_encoder.image_size) == ("mobilenet_v3_small", 48)
    assert from_encoder.epochs == oof.ENCODER_EPOCHS < OOF_TRAINING.epochs
    assert oof.fold_recipe(12).epochs == 12 and oof.fold_recipe(None) == OOF_TRAINING
