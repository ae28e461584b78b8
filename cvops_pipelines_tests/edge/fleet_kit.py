"""Small real pieces for edge tests: a digit classifier trained in a second (logistic regression on
8x8 renders of the real digits, as an ONNX graph), signing keys, a release store on disk."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cvops_pipelines.core.release import (ReleaseStore, build_release, generate_keypair,
                                          load_private_key)
from cvops_pipelines.core.storage import LocalStore
from cvops_pipelines.edge.remote import DirRemote
from cvops_pipelines_tests import corpus

SIZE = 8
CLASSES = [str(d) for d in range(10)]
PREPROCESS = {"architecture": "logistic_regression", "image_size": SIZE, "mean": [0.5] * 3,
              "std": [0.5] * 3, "classes": CLASSES}


def png(i: int) -> bytes:
    return corpus.encode(corpus.digit(i), "PNG")


def features(images: list[bytes]) -> np.ndarray:
    from cvops_pipelines.edge.preprocess import load_rgb, normalize, resize

    return normalize([resize(load_rgb(b), SIZE) for b in images], PREPROCESS["mean"],
                     PREPROCESS["std"]).reshape(len(images), -1)


def linear_onnx(weights: np.ndarray, bias: np.ndarray) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1)],
        "digits", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(CLASSES)])],
        [numpy_helper.from_array(weights.astype(np.float32), "W"),
         numpy_helper.from_array(bias.astype(np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def trained_model(n: int = 600, quality: str = "good") -> bytes:
    """'good': logistic regression on n real digits; 'bad': the same shape, weights shuffled."""
    from sklearn.linear_model import LogisticRegression

    x = features([png(i) for i in range(n)])
    y = np.array([int(corpus.digit_label(i)) for i in range(n)])
    lr = LogisticRegression(max_iter=300).fit(x, y)
    weights, bias = lr.coef_, lr.intercept_
    if quality == "bad":
        weights = np.random.default_rng(0).permutation(weights)  # classes swapped around
    return linear_onnx(weights, bias)


@dataclass
class Central:
    root: Path
    releases: ReleaseStore
    key_dir: Path

    @property
    def remote(self) -> DirRemote:
        return DirRemote(self.root)

    @property
    def public_key(self) -> bytes:
        return (self.key_dir / "release_signing.pub").read_bytes()

    def release(self, model: bytes, version: str, parent: str | None = None, key=None):
        key = key or load_private_key(self.key_dir / "release_signing.key")
        parent_manifest = self.releases.manifest(parent) if parent else None
        parent_model = self.releases.model(parent) if parent else None
        release = build_release(model, PREPROCESS, {"model_name": "digits", "model_version": version,
                                                    "dataset_version": "ds-test",
                                                    "artifact": "onnx_fp32"},
                                key, parent_manifest, parent_model, min_shared=0.0)  # always a delta
        self.releases.publish(release)
        return release


def field_records(store):
    """Every uploaded record, corrections applied, images stored: what the feedback asset makes
    of the store."""
    import pandas as pd

    from cvops_pipelines.core.feedback import (batch_frame, batch_ids, batch_key, parse_batch,
                                               resolve_records, store_images)

    frames = []
    for batch_id in batch_ids(store):
        batch = parse_batch(store.read_bytes(batch_key(batch_id)), batch_id)
        frames.append(batch_frame(batch))
        store_images(store, batch, frames[-1])
    return resolve_records(pd.concat(frames, ignore_index=True))


def central(tmp: Path) -> Central:
    root = tmp / "central"
    root.mkdir(parents=True, exist_ok=True)
    key_dir = tmp / "keys"
    generate_keypair(key_dir)
    return Central(root, ReleaseStore(LocalStore(root)), key_dir)


def image_of(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))
