"""Output drift (BBSD) on a real digit classifier: a shifted stream is flagged within two feedback
batches, an unshifted one is not, and the false-alarm rate over seeds stays near alpha."""

import numpy as np
import pytest

from cvops_pipelines.core.learn.drift import output_drift
from cvops_pipelines.demo.digit_model import CLASSES, PREPROCESS, png, trained_model
from cvops_pipelines.edge.runtime import Runtime
from cvops_pipelines.edge.simulator import Shift, shifted

BATCH = 24  # records per feedback batch (a device uploading every few steps)
SHIFT = Shift(brightness=0.3, blur=5, rotate=20)


@pytest.fixture(scope="module")
def outputs():
    model = trained_model(n=600)  # digits 0..599
    # The scans are ordered by writer: reference and field are drawn from one shuffled
    # population (as the demo's stratified splits are), so "unshifted" means same distribution.
    rest = np.random.default_rng(42).permutation(np.arange(600, 1797))
    runtime = Runtime(model, PREPROCESS)
    reference = runtime.probabilities([png(i) for i in rest[:300]])
    field = list(rest[300:])
    clean = runtime.probabilities([png(i) for i in field])
    transform = SHIFT.transform(seed=0)
    moved = runtime.probabilities([shifted(png(i), transform) for i in field])
    return reference, clean, moved


def windows(n_total: int, seeds: int, size: int):
    for seed in range(seeds):
        yield np.random.default_rng(seed).choice(n_total, size, replace=False)


def test_shifted_stream_is_flagged_within_two_batches(outputs):
    reference, clean, moved = outputs
    flagged_at = next(
        (b for b in (1, 2) if output_drift(reference, moved[: b * BATCH], CLASSES).flagged), None
    )
    assert flagged_at is not None
    result = output_drift(reference, moved[: 2 * BATCH], CLASSES)
    assert result.families["outputs"]  # BBSD itself fires, not only one summary statistic


def test_unshifted_stream_is_not_flagged(outputs):
    reference, clean, _ = outputs
    for batches in (1, 2, 4):
        result = output_drift(reference, clean[: batches * BATCH], CLASSES)
        assert result.assessed and not result.flagged, result.tests


def test_false_alarm_rate_and_power_over_seeds(outputs):
    reference, clean, moved = outputs
    alarms = [
        output_drift(reference, clean[idx], CLASSES).flagged
        for idx in windows(len(clean), 100, 2 * BATCH)
    ]
    detections = [
        output_drift(reference, moved[idx], CLASSES).flagged
        for idx in windows(len(moved), 100, 2 * BATCH)
    ]
    # Bonferroni over the tests bounds the family-wise rate by alpha = 0.05 (allow sampling noise)
    assert np.mean(alarms) <= 0.08
    assert np.mean(detections) >= 0.9


def test_too_few_records_are_not_judged():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), 50)
    result = output_drift(probs, probs[:5], CLASSES, min_samples=20)
    assert not result.assessed and not result.flagged and "needs 20" in result.reason
