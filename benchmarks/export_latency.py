"""Per-artifact latency, size and accuracy vs torch eager fp32, same run.

A resnet18 trained the way the demo trains it (64 px, `light` augmentation) on demo digits, then
exported exactly as the `onnx_model` asset exports it: ONNX fp32 (dynamo) and static QDQ int8
calibrated on 256 training images. Latency is model time at batch 1 and 8 (p50/p95 over
`repeats` calls after warm-up), measured one artifact after the other in this process. The
target profile `edge` (the asset's default) picks the artifact; the target is: that artifact
>= 5x faster than torch eager at batch 1 (p50) with <= 1 point accuracy drop.
"""

from benchmarks.training_throughput import _data
from cvops_pipelines.core.build.training import TrainConfig, fit
from cvops_pipelines.core.ship.artifact_choice import (
    TargetProfile,
    choose,
    measure_artifacts,
    table,
)
from cvops_pipelines.core.ship.export import export_onnx, parity, quantize_int8


def run(quick: bool = False) -> dict:
    n, epochs, repeats = (400, 2, 20) if quick else (1797, 8, 200)
    images, labels = _data(n, 64)
    cut_train, cut_val = int(0.7 * n), int(0.8 * n)
    classes = [str(c) for c in range(10)]
    result = fit(
        (images[:cut_train], labels[:cut_train]),
        (images[cut_train:cut_val], labels[cut_train:cut_val]),
        classes,
        TrainConfig(image_size=64, epochs=epochs),
    )
    test_images, test_labels = images[cut_val:], labels[cut_val:]
    fp32 = export_onnx(result.model, result.preprocess)
    int8 = quantize_int8(fp32, images[:256], result.preprocess)
    measurements, logits = measure_artifacts(
        result.model,
        {"onnx_fp32": fp32, "onnx_int8": int8},
        test_images,
        test_labels,
        result.preprocess,
        repeats,
    )
    frame = table(measurements)
    choice = choose(measurements, TargetProfile("edge"))
    chosen = frame.set_index("artifact").loc[choice.artifact]
    speedup, drop = float(chosen["speedup_b1_vs_torch"]), float(chosen["accuracy_drop_points"])
    return {
        "benchmark": "export_latency",
        "model": "resnet18",
        "image_size": 64,
        "train_images": cut_train,
        "test_images": len(test_images),
        "epochs": epochs,
        "repeats": repeats,
        "artifacts": frame.to_dict(orient="records"),
        "parity": {
            k: parity(logits["torch_eager"], v).as_dict(verdict=k == "onnx_fp32")
            for k, v in logits.items()
            if k != "torch_eager"
        },
        "chosen_for_edge": choice.artifact,
        "verdicts": choice.verdicts,
        "chosen_speedup_b1_vs_torch_eager": speedup,
        "chosen_accuracy_drop_points": drop,
        "target": ">= 5x faster at batch 1, <= 1 point accuracy drop",
        "met": bool(speedup >= 5 and drop <= 1.0),
    }
