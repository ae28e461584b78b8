"""Output-drift check: false-alarm rate on an unshifted stream and detection power on a shifted
one, over many seeded windows of one and two feedback batches (24 records each).

Model: the test suite's logistic-regression digit classifier (ONNX) trained on digits 0..599;
reference = its outputs on 300 held-out digits; field = the other 897, as scanned (unshifted) or
through the shift the drift test uses (brightness 0.3, blur 5, rotation 20°). Windows are drawn
at random (seeded) from the field; `core.drift.output_drift` at alpha 0.05.
"""

import numpy as np

from cvops_pipelines.core.learn.drift import output_drift
from cvops_pipelines.demo.digit_model import CLASSES, PREPROCESS, png, trained_model
from cvops_pipelines.edge.runtime import Runtime
from cvops_pipelines.edge.simulator import Shift, shifted

BATCH = 24  # records per feedback batch (a device uploading every few steps), as in test_drift
SHIFT = Shift(brightness=0.3, blur=5, rotate=20)  # the shift test_drift detects


def run(quick: bool = False) -> dict:
    model = trained_model(n=600)
    rest = np.random.default_rng(42).permutation(np.arange(600, 1797))
    runtime = Runtime(model, PREPROCESS)
    reference = runtime.probabilities([png(i) for i in rest[:300]])
    clean = runtime.probabilities([png(i) for i in rest[300:]])
    transform = SHIFT.transform(seed=0)
    moved = runtime.probabilities([shifted(png(i), transform) for i in rest[300:]])
    seeds = 100 if quick else 500
    out = {"alpha": 0.05, "windows_per_setting": seeds, "shift": SHIFT.__dict__}
    for batches in (1, 2):
        size = batches * BATCH
        draws = [
            np.random.default_rng(s).choice(len(clean), size, replace=False) for s in range(seeds)
        ]
        out[f"{batches}_batch"] = {
            "records": size,
            "false_alarm_rate": float(
                np.mean([output_drift(reference, clean[d], CLASSES).flagged for d in draws])
            ),
            "detection_rate": float(
                np.mean([output_drift(reference, moved[d], CLASSES).flagged for d in draws])
            ),
        }
    return out
