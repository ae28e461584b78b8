"""A real digit classifier in a second: logistic regression on 8x8 renders of scikit-learn's
digits, as an ONNX graph. For fleet simulations, tests and benchmarks that need a released model
on real images without training a network."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from cvops_pipelines.demo.data import render_digit


@lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    return load_digits()


def digit(i: int, side: int = 32) -> Image.Image:
    """The i-th of scikit-learn's 1797 digits, rendered as the demo renders them."""
    return render_digit(_digits().images[i], side)


def digit_label(i: int) -> str:
    return str(_digits().target[i])


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


SIZE = 8
CLASSES = [str(d) for d in range(10)]
PREPROCESS = {
    "architecture": "logistic_regression",
    "image_size": SIZE,
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "classes": CLASSES,
}


def png(i: int) -> bytes:
    return _encode_png(digit(i))


def features(images: list[bytes]) -> np.ndarray:
    from cvops_pipelines.edge.preprocess import load_rgb, normalize, resize

    return normalize(
        [resize(load_rgb(b), SIZE) for b in images], PREPROCESS["mean"], PREPROCESS["std"]
    ).reshape(len(images), -1)


def linear_onnx(weights: np.ndarray, bias: np.ndarray) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1),
        ],
        "digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(CLASSES)])],
        [
            numpy_helper.from_array(weights.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def trained_model(n: int = 600, quality: str = "good") -> bytes:
    """'good': logistic regression on n real digits; 'bad': the same shape, weights shuffled."""
    from sklearn.linear_model import LogisticRegression

    x = features([png(i) for i in range(n)])
    y = np.array([int(digit_label(i)) for i in range(n)])
    lr = LogisticRegression(max_iter=300).fit(x, y)
    weights, bias = lr.coef_, lr.intercept_
    if quality == "bad":
        weights = np.random.default_rng(0).permutation(weights)  # classes swapped around
    return linear_onnx(weights, bias)


def publish_live_release(store, signing_key, dataset_version: str = "ds-test") -> str:
    """The good digit model released into `store` and live on `stable`, with the dataset
    snapshot it names: 300 held-out digits, the reference its field outputs are tested against
    for drift. For fleet tests and benchmarks that need a live release on real images."""
    import pandas as pd

    from cvops_pipelines.core.base.tables import write_table
    from cvops_pipelines.core.ship.release import ReleaseStore, build_release

    rows = []
    for i in range(600, 900):
        store.write_bytes(f"images/ref/{i}.png", png(i))
        rows.append(
            {
                "image_id": f"{i:064x}",
                "label": digit_label(i),
                "split": "test",
                "key": f"images/ref/{i}.png",
            }
        )
    write_table(store, f"datasets/{dataset_version}/dataset.parquet", pd.DataFrame(rows))
    release = build_release(
        trained_model(n=600),
        PREPROCESS,
        {
            "model_name": "digits",
            "model_version": "1",
            "dataset_version": dataset_version,
            "artifact": "onnx_fp32",
        },
        signing_key,
    )
    releases = ReleaseStore(store, signing_key)
    releases.publish(release)
    releases.point("stable", release.id, "cvops", "a live release for a fleet")
    return release.id
