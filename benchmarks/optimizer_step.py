"""What PyTorch's fused AdamW kernel buys a training step on this CPU (`core/build/models.adamw`).

resnet18 from scratch, 10 classes, one torch thread, the same batch of demo digits each step:
at 32 px and batch 32 (label QA's fine-tuned folds, the SSL encoder's input) and at 64 px and
batch 64 (trained_model's default). Rounds alternate the for-loop AdamW and the fused one, so
drift in the machine's speed hits both; the figure is the ratio of median images per CPU-second.
"""

import time

import numpy as np

from benchmarks.training_throughput import _data


def _rate(size: int, batch: int, fused: bool, steps: int, seed: int) -> float:
    import torch
    import torch.nn.functional as F
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), 2e-3, fused=fused or None)
    images, labels = _data(batch, size)
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor(labels)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up
        step()
    started = time.process_time()
    for _ in range(steps):
        step()
    return steps * batch / (time.process_time() - started)


def run(quick: bool = False) -> dict:
    import torch

    torch.set_num_threads(1)
    rounds, steps = (2, 3) if quick else (5, 15)
    out = {}
    for size, batch in ((32, 32), (64, 64)):
        rates = {"for_loop": [], "fused": []}
        for r in range(rounds):
            for name in ("for_loop", "fused"):
                rates[name].append(_rate(size, batch, name == "fused", steps, r))
        medians = {k: float(np.median(v)) for k, v in rates.items()}
        out[f"{size}px_batch{batch}"] = {
            "images_per_cpu_second": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "fused_over_for_loop": round(medians["fused"] / medians["for_loop"], 3),
        }
    return {"threads": 1, "rounds": rounds, "steps_per_round": steps, **out}
