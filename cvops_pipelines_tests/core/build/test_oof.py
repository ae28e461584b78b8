"""Out-of-fold fine-tuning: no image is judged by a model that saw it, in training or in model
selection, and the folds are the ones the other label QA candidates use."""

from dataclasses import replace

import numpy as np
from sklearn.model_selection import StratifiedKFold

from cvops_pipelines.core.build import oof
from cvops_pipelines.core.build.oof import OOF_TRAINING, finetuned_oof_probabilities
from cvops_pipelines.core.build.training import FitResult
from cvops_pipelines.demo.objects import objects

CLASSES = [str(c) for c in range(10)]


def test_a_held_out_image_never_reaches_training_or_model_selection(monkeypatch):
    images = [np.full((8, 8, 3), i, np.uint8) for i in range(60)]  # pixel value = index
    labels = np.arange(60) % 3
    seen, judged = [], []

    def fake_fit(train, val, classes, config, device, on_epoch, initial_state):
        seen.append({int(im[0, 0, 0]) for im in train[0] + val[0]})
        return FitResult(model=len(seen) - 1, preprocess=None)

    def fake_predict(model, batch, preprocess, device):
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
