"""Small PNG plots for asset metadata (matplotlib, headless)."""

from __future__ import annotations

import base64
import io

import pandas as pd


def _figure(width: float = 6.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(width, height), dpi=110)


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def confused_pairs_png(confused: pd.DataFrame, noise: pd.DataFrame, top: int = 10) -> bytes:
    """Left: the class pairs label QA estimates are most often swapped. Right: noise per class."""
    plt, (fig, _) = _figure(9.0, 3.4)
    fig.clf()
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    head = confused.head(top)
    names = [f"{a} ↔ {b}" for a, b in zip(head["class_a"], head["class_b"])][::-1]
    left.barh(names or ["(none)"], list(head["estimated_confusions"])[::-1] or [0], color="#d62728")
    left.set_title("most confused class pairs")
    left.set_xlabel("estimated mislabeled images")
    right.bar(noise["label"].astype(str), noise["estimated_noise_rate"] * 100, color="#1f77b4")
    right.set_title("estimated label noise per class")
    right.set_ylabel("%")
    return _png(plt, fig)


def md_image(png: bytes, alt: str) -> str:
    """Markdown with the PNG inline: Dagster renders it in the asset's metadata."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
