"""ONNX export proven on real digit images; int8 calibration; the measured choice per target."""

from dataclasses import replace

import numpy as np
import pytest

from cvops_pipelines.core.build.training import TrainConfig, fit
from cvops_pipelines.core.ship.artifact_choice import Measurement, TargetProfile, choose, table
from cvops_pipelines.core.ship.export import (
    describe,
    edge_inputs,
    export_onnx,
    ort_logits,
    parity,
    preprocess_of,
    quantize_int8,
    session,
    torch_logits,
)
from cvops_pipelines_tests.helpers import CLASSES, digits


@pytest.fixture(scope="module")
def trained():
    train, val, test = digits(range(0, 500)), digits(range(500, 600)), digits(range(600, 800))
    result = fit(
        train,
        val,
        CLASSES,
        TrainConfig(image_size=32, epochs=3, batch_size=32, learning_rate=3e-3, seed=5),
    )
    fp32 = export_onnx(result.model, result.preprocess)
    return result, fp32, train, test


def test_fp32_onnx_matches_torch_on_real_images(trained):
    result, fp32, _, (images, _) = trained
    assert preprocess_of(fp32) == result.preprocess
    reference = torch_logits(result.model, images, result.preprocess)
    check = parity(reference, ort_logits(session(fp32), images, result.preprocess))
    assert check.ok and check.top1_agreement == 1.0 and check.max_abs_logit_diff < 1e-4
    sess = session(fp32)  # the batch axis is dynamic
    for n in (1, 7):
        out = sess.run(None, {"input": edge_inputs(images[:n], result.preprocess)})[0]
        assert out.shape == (n, 10)


@pytest.mark.parametrize("broken", ["exif_orientation_ignored", "no_normalisation"])
def test_wrong_preprocessing_on_the_onnx_path_fails_parity(trained, broken):
    result, fp32, _, (images, _) = trained
    reference = torch_logits(result.model, images, result.preprocess)
    if broken == "exif_orientation_ignored":  # (digits are grey: a BGR swap would not show)
        wrong_images, pre = [np.ascontiguousarray(np.rot90(im)) for im in images], result.preprocess
    else:
        wrong_images, pre = images, replace(result.preprocess, mean=(0, 0, 0), std=(1, 1, 1))
    check = parity(reference, ort_logits(session(fp32), wrong_images, pre))
    assert not check.ok and check.max_abs_logit_diff > 1e-2


def test_int8_is_calibrated_on_real_images_and_keeps_accuracy(trained):
    result, fp32, (train_images, _), (images, labels) = trained
    int8 = quantize_int8(fp32, train_images[:128], result.preprocess)
    assert "QuantizeLinear" in describe(int8)["operators"]
    assert len(int8) < len(fp32) / 3
    assert preprocess_of(int8) == result.preprocess
    fp32_accuracy = (
        ort_logits(session(fp32), images, result.preprocess).argmax(1) == labels
    ).mean()
    int8_accuracy = (
        ort_logits(session(int8), images, result.preprocess).argmax(1) == labels
    ).mean()
    assert fp32_accuracy > 0.6
    assert 100 * (fp32_accuracy - int8_accuracy) <= 2.0


def m(name, accuracy, p95, size_mb, p50=None, deployable=True):
    p50 = p95 * 0.9 if p50 is None else p50
    return Measurement(
        name,
        int(size_mb * 2**20),
        accuracy,
        accuracy,
        {"p50_b1": p50, "p95_b1": p95, "p50_b8": 4 * p50, "p95_b8": 4 * p95},
        deployable,
    )


MEASURED = [
    m("torch_eager", 0.95, 12.0, 43, deployable=False),
    m("onnx_fp32", 0.95, 5.0, 43),
    m("onnx_int8", 0.945, 1.5, 11),
]


def test_choice_follows_the_measurements_per_profile():
    fastest = choose(MEASURED, TargetProfile("edge"))
    assert fastest.artifact == "onnx_int8"
    assert fastest.verdicts["torch_eager"] == "not an edge runtime artifact"
    # int8 slower than fp32 on this (hypothetical) CPU: the numbers decide, not the precision
    slow_int8 = [*MEASURED[:2], m("onnx_int8", 0.945, 7.0, 11)]
    assert choose(slow_int8, TargetProfile("edge")).artifact == "onnx_fp32"
    assert choose(slow_int8, TargetProfile("small", max_size_mb=16)).artifact == "onnx_int8"


def test_int8_beyond_the_accuracy_budget_is_not_chosen_and_says_why():
    lossy = [*MEASURED[:2], m("onnx_int8", 0.92, 1.5, 11)]
    choice = choose(lossy, TargetProfile("edge", max_accuracy_drop_points=1.0))
    assert choice.artifact == "onnx_fp32"
    assert choice.verdicts["onnx_int8"] == "accuracy drop 3.00 points > 1.0"


def test_nothing_qualifies_is_reported_per_artifact():
    choice = choose(MEASURED, TargetProfile("tiny", max_p95_ms_batch1=1.0, max_size_mb=5))
    assert choice.artifact is None
    assert "p95 latency 1.50 ms > 1.0 ms" in choice.verdicts["onnx_int8"]
    assert "size 11.0 MB > 5 MB" in choice.verdicts["onnx_int8"]
    frame = table(MEASURED).set_index("artifact")
    assert frame.loc["onnx_int8", "speedup_b1_vs_torch"] == 8.0
    assert frame.loc["onnx_int8", "accuracy_drop_points"] == 0.5
