"""Bytes shipped per edge update: bsdiff delta vs the full bundle, and the agent's overhead.

A resnet18 (64 px) is trained on demo digits and released; then two updates on more data:
(a) head-only: continue from it with `freeze_backbone` (the frozen batch-norm statistics stay
    put, so the backbone's bytes do not change), and (b) a full fine-tune from the same start.
Each update is exported as the ship stage exports (ONNX fp32 and int8) and released with the
parent; the figure is delta bytes / full bundle bytes. Target: <= 10% for head-only.
Agent overhead: `EdgeAgent.predict` (PNG decode, resize, normalise, ORT, softmax, buffering the
record and image in SQLite) vs bare `session.run` at batch 1 on the same int8 model.
"""

import io
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.training_throughput import _data
from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.build.training import TrainConfig, fit
from cvops_pipelines.core.ship.artifact_choice import latency_ms
from cvops_pipelines.core.ship.export import edge_inputs, export_onnx, quantize_int8, session
from cvops_pipelines.core.ship.release import (
    ReleaseStore,
    build_release,
    generate_keypair,
    load_private_key,
    shared_byte_share,
)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def run(quick: bool = False) -> dict:
    from cvops_pipelines.edge.agent import EdgeAgent
    from cvops_pipelines.edge.remote import DirRemote

    n, epochs = (400, 1) if quick else (1797, 4)
    images, labels = _data(n, 64)
    classes = [str(c) for c in range(10)]
    first, val = slice(0, n // 3), slice(int(0.85 * n), n)
    more = slice(0, int(0.8 * n))
    base_config = TrainConfig(image_size=64, epochs=epochs)
    base = fit((images[first], labels[first]), (images[val], labels[val]), classes, base_config)
    start = {k: v.clone() for k, v in base.model.state_dict().items()}
    updates = {
        "head_only": fit(
            (images[more], labels[more]),
            (images[val], labels[val]),
            classes,
            replace(base_config, freeze_backbone=True),
            initial_state=start,
        ),
        "full_fine_tune": fit(
            (images[more], labels[more]),
            (images[val], labels[val]),
            classes,
            base_config,
            initial_state=start,
        ),
    }
    calibration = images[:256]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        private, public = generate_keypair(root / "keys")
        key = load_private_key(private)
        releases = ReleaseStore(LocalStore(root / "central"), key)
        meta = {"model_name": "bench", "dataset_version": "ds-bench"}
        rows, parents = [], {}
        for precision in ("fp32", "int8"):

            def artifact(result, precision=precision):
                fp32 = export_onnx(result.model, result.preprocess)
                return (
                    fp32
                    if precision == "fp32"
                    else quantize_int8(fp32, calibration, result.preprocess)
                )

            preprocess = base.preprocess.__dict__ | {"classes": list(classes)}
            parent_model = artifact(base)
            parent = build_release(
                parent_model, preprocess, {**meta, "model_version": "1", "artifact": precision}, key
            )
            releases.publish(parent)
            parents[precision] = (parent, parent_model)
            for name, result in updates.items():
                model = artifact(result)
                started = time.perf_counter()
                update = build_release(
                    model,
                    preprocess,
                    {**meta, "model_version": "2", "artifact": precision},
                    key,
                    parent.manifest,
                    parent_model,
                    min_shared=0.0,
                )
                bundle = sum(len(v) for k, v in update.files.items() if not k.endswith(".bsdiff"))
                delta = update.manifest["delta"]["size"]
                rows.append(
                    {
                        "update": name,
                        "precision": precision,
                        "bundle_bytes": bundle,
                        "delta_bytes": delta,
                        "delta_share": round(delta / bundle, 4),
                        "unchanged_byte_share": round(shared_byte_share(parent_model, model), 4),
                        "bsdiff_seconds": round(time.perf_counter() - started, 1),
                        "val_accuracy": round(
                            result.history[result.best_epoch - 1]["val_accuracy"], 4
                        ),
                    }
                )
        parent, parent_model = parents["int8"]
        releases.point("stable", parent.id, "bench", "bench")
        device = EdgeAgent(
            root / "device", DirRemote(root / "central"), public.read_bytes(), "bench-device"
        )
        device.sync()
        pngs = [_png(images[i]) for i in range(val.start, val.start + 50)]
        position = iter(range(10**9))
        agent = latency_ms(lambda: device.predict(pngs[next(position) % len(pngs)]), repeats=200)
        bare_session = session(parent_model, threads=1)
        x = edge_inputs(images[:1], base.preprocess)
        bare = latency_ms(lambda: bare_session.run(None, {"input": x}), repeats=200)
        device.close()
    head = next(r for r in rows if r["update"] == "head_only" and r["precision"] == "int8")
    return {
        "benchmark": "release_delta",
        "model": "resnet18",
        "image_size": 64,
        "epochs": epochs,
        "updates": rows,
        "head_only_int8_delta_share": head["delta_share"],
        "target": "<= 0.10 for head-only",
        "met": all(r["delta_share"] <= 0.10 for r in rows if r["update"] == "head_only"),
        "agent_predict_ms": {k: round(v, 3) for k, v in agent.items()},
        "bare_ort_run_ms_one_thread": {k: round(v, 3) for k, v in bare.items()},
        "agent_overhead_ms_p50": round(agent["p50"] - bare["p50"], 3),
    }
