"""Measure every artifact on this machine and choose one per target profile from the numbers.

Nothing is assumed: on some CPUs int8 is slower than fp32 for small models, so the choice reads
the latency table. Latency is model time only (inputs prepared beforehand), after warm-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

REFERENCE = "torch_eager"


@dataclass(frozen=True)
class Measurement:
    artifact: str  # torch_eager | onnx_fp32 | onnx_int8
    size_bytes: int
    accuracy: float
    macro_f1: float
    latency_ms: dict[str, float]  # p50_b1, p95_b1, p50_b8, p95_b8
    deployable: bool  # runs on the edge runtime (onnxruntime)

    def row(self) -> dict:
        return {
            "artifact": self.artifact,
            "size_mb": round(self.size_bytes / 2**20, 2),
            "accuracy": round(self.accuracy, 4),
            "macro_f1": round(self.macro_f1, 4),
            **{k: round(v, 3) for k, v in self.latency_ms.items()},
            "deployable": self.deployable,
        }


@dataclass(frozen=True)
class TargetProfile:
    name: str
    max_p95_ms_batch1: float = 50.0
    max_accuracy_drop_points: float = 1.0  # vs torch eager fp32, in percentage points
    max_size_mb: float = 100.0
    prefer: str = "latency"  # among qualifying artifacts: "latency" or "size"

    def __post_init__(self) -> None:
        if self.prefer not in ("latency", "size"):
            raise ValueError(f"prefer must be 'latency' or 'size', got {self.prefer!r}")


@dataclass
class Choice:
    profile: TargetProfile
    artifact: str | None
    verdicts: dict[str, str] = field(default_factory=dict)  # artifact -> "ok" or why not

    def as_dict(self) -> dict:
        return {
            "profile": asdict(self.profile),
            "artifact": self.artifact,
            "verdicts": self.verdicts,
        }


def latency_ms(run: Callable[[], object], warmup: int = 5, repeats: int = 50) -> dict[str, float]:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1000)
    return {"p50": float(np.percentile(samples, 50)), "p95": float(np.percentile(samples, 95))}


def measure_artifacts(
    model,
    artifacts: dict[str, bytes],
    images: list[np.ndarray],
    labels: np.ndarray,
    preprocess,
    repeats: int = 50,
    reference: np.ndarray | None = None,
) -> tuple[list[Measurement], dict[str, np.ndarray]]:
    """Accuracy on `images` and latency at batch 1 and 8 of torch eager (the reference; its
    logits are computed unless given) and each ONNX artifact, one after the other in this
    process; also returns every logit matrix."""
    import torch

    from cvops_pipelines.core.build.models import state_dict_bytes
    from cvops_pipelines.core.measure.metrics import evaluate_predictions
    from cvops_pipelines.core.ship.export import edge_inputs, ort_logits, session, torch_logits

    sessions = {name: session(data) for name, data in artifacts.items()}
    logits = {
        REFERENCE: torch_logits(model, images, preprocess) if reference is None else reference,
        **{name: ort_logits(s, images, preprocess) for name, s in sessions.items()},
    }
    inputs = {
        b: edge_inputs([images[i % len(images)] for i in range(b)], preprocess) for b in (1, 8)
    }
    runners = {
        REFERENCE: lambda x: model(torch.from_numpy(x)),
        **{n: (lambda x, s=s: s.run(None, {"input": x})) for n, s in sessions.items()},
    }
    sizes = {REFERENCE: len(state_dict_bytes(model)), **{n: len(d) for n, d in artifacts.items()}}
    measurements = []
    model.eval()
    with torch.no_grad():
        for name, run in runners.items():
            timings = {}
            for b, x in inputs.items():
                t = latency_ms(lambda run=run, x=x: run(x), repeats=repeats)
                timings.update({f"p50_b{b}": t["p50"], f"p95_b{b}": t["p95"]})
            evaluation = evaluate_predictions(logits[name], labels, list(preprocess.classes))
            measurements.append(
                Measurement(
                    name,
                    sizes[name],
                    evaluation.accuracy,
                    evaluation.macro_f1,
                    timings,
                    name in artifacts,
                )
            )
    return measurements, logits


def choose(measurements: list[Measurement], profile: TargetProfile) -> Choice:
    by_name = {m.artifact: m for m in measurements}
    if REFERENCE not in by_name:
        raise ValueError(f"the {REFERENCE} reference measurement is missing")
    reference = by_name[REFERENCE]
    choice, qualifying = Choice(profile, None), []
    for m in measurements:
        drop = 100 * (reference.accuracy - m.accuracy)
        why = []
        if not m.deployable:
            why.append("not an edge runtime artifact")
        if m.latency_ms["p95_b1"] > profile.max_p95_ms_batch1:
            why.append(
                f"p95 latency {m.latency_ms['p95_b1']:.2f} ms > {profile.max_p95_ms_batch1} ms"
            )
        if drop > profile.max_accuracy_drop_points + 1e-9:
            why.append(f"accuracy drop {drop:.2f} points > {profile.max_accuracy_drop_points}")
        if m.size_bytes / 2**20 > profile.max_size_mb:
            why.append(f"size {m.size_bytes / 2**20:.1f} MB > {profile.max_size_mb} MB")
        choice.verdicts[m.artifact] = "; ".join(why) or "ok"
        if not why:
            qualifying.append(m)
    if qualifying:
        key = (
            (lambda m: (m.latency_ms["p50_b1"], m.size_bytes))
            if profile.prefer == "latency"
            else (lambda m: (m.size_bytes, m.latency_ms["p50_b1"]))
        )
        choice.artifact = min(qualifying, key=key).artifact
    return choice


def table(measurements: list[Measurement]) -> pd.DataFrame:
    reference = next((m for m in measurements if m.artifact == REFERENCE), None)
    frame = pd.DataFrame([m.row() for m in measurements])
    if reference is not None:
        frame["speedup_b1_vs_torch"] = (
            reference.latency_ms["p50_b1"] / frame["p50_b1"].clip(lower=1e-9)
        ).round(2)
        frame["accuracy_drop_points"] = (100 * (reference.accuracy - frame["accuracy"])).round(
            2
        ) + 0.0
    return frame
