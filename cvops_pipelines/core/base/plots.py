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


def confusion_png(confusion, classes: list[str], title: str = "confusion matrix") -> bytes:
    """Row-normalised (recall per true class) with raw counts written in each cell."""
    import numpy as np

    plt, (fig, ax) = _figure(4.6, 4.0)
    totals = confusion.sum(1, keepdims=True).clip(min=1)
    ax.imshow(confusion / totals, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), count in np.ndenumerate(confusion):
        if count:
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count / totals[i, 0] > 0.5 else "black",
            )
    return _png(plt, fig)


def reliability_png(tables: dict[str, pd.DataFrame], eces: dict[str, float]) -> bytes:
    """Reliability diagram: accuracy vs confidence per bin, one line per model."""
    plt, (fig, ax) = _figure(4.2, 3.6)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for name, table in tables.items():
        filled = table[table["count"] > 0]
        ax.plot(
            filled["confidence"],
            filled["accuracy"],
            marker="o",
            label=f"{name} (ECE {eces[name]:.3f})",
        )
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("reliability")
    return _png(plt, fig)


def production_png(table: pd.DataFrame, outputs: dict, min_accuracy: float) -> bytes:
    """Left: field accuracy per release x cohort (reviewed records, coverage in the label) with
    the SLA line. Right: top-probability distributions, training reference vs field window."""
    import numpy as np

    plt, (fig, _) = _figure(9.5, 3.4)
    fig.clf()
    left, right = fig.subplots(1, 2)
    grouped = (
        table.groupby(["release", "cohort"], sort=True)
        .agg(records=("records", "sum"), reviewed=("reviewed", "sum"))
        .reset_index()
        if len(table)
        else table
    )
    if len(grouped):
        hits = (
            table.assign(hits=table["accuracy"].fillna(0) * table["reviewed"])
            .groupby(["release", "cohort"], sort=True)["hits"]
            .sum()
            .to_numpy()
        )
        accuracy = np.divide(
            hits,
            grouped["reviewed"].to_numpy(),
            out=np.zeros(len(grouped)),
            where=grouped["reviewed"].to_numpy() > 0,
        )
        names = [f"{r[-10:]}\n{c}" for r, c in zip(grouped["release"], grouped["cohort"])]
        bars = left.bar(names, accuracy, color="#1f77b4")
        for bar, n, total in zip(bars, grouped["reviewed"], grouped["records"]):
            left.text(
                bar.get_x() + bar.get_width() / 2,
                0.02,
                f"{n}/{total}",
                ha="center",
                color="white",
                fontsize=7,
                rotation=90,
            )
        left.tick_params(axis="x", labelsize=6)
    left.axhline(min_accuracy, ls="--", color="#d62728", lw=1, label=f"SLA {min_accuracy}")
    left.set_ylim(0, 1.02)
    left.set_title("field accuracy (reviewed / records)")
    left.legend(fontsize=7, loc="lower right")
    bins = np.linspace(0, 1, 21)
    for release, (ref, prod) in outputs.items():
        right.hist(
            ref.max(1), bins=bins, density=True, alpha=0.4, label=f"{release[-10:]} reference"
        )
        right.hist(
            prod.max(1),
            bins=bins,
            density=True,
            histtype="step",
            lw=2,
            label=f"{release[-10:]} field",
        )
    right.set_title("top-probability: reference vs latest field window")
    right.set_xlabel("confidence")
    if outputs:
        right.legend(fontsize=6, loc="upper left")
    return _png(plt, fig)


def ontology_png(per_class: pd.DataFrame) -> bytes:
    """Predicted share vs the share among reviewed records, per class."""
    import numpy as np

    plt, (fig, ax) = _figure(6.0, 3.0)
    x = np.arange(len(per_class))
    ax.bar(x - 0.2, per_class["predicted_share"], 0.4, label="predicted (all records)")
    ax.bar(x + 0.2, per_class["true_share_reviewed"], 0.4, label="true (reviewed records)")
    ax.set_xticks(x, per_class["label"].astype(str))
    ax.set_ylabel("share")
    ax.set_title("class mix in the field")
    ax.legend(fontsize=7)
    return _png(plt, fig)


def precision_recall_png(curves: dict[str, list[float]], title: str) -> bytes:
    """Precision against recall at IoU 0.5, one line per class (COCO's 101 recall points)."""
    import numpy as np

    plt, (fig, ax) = _figure(5.5, 3.6)
    recall = np.linspace(0, 1, 101)
    for name, precision in sorted(curves.items()):
        ax.plot(recall, precision, label=name, linewidth=1.2)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=7, ncol=2, loc="lower left")
    return _png(plt, fig)


def boxes_png(examples: list[tuple], columns: int = 3) -> bytes:
    """Example images with the true boxes (green) and the predicted ones (red, with class and
    score). `examples`: (RGB array, truth {"boxes", "labels"}, prediction {"boxes", "scores",
    "labels"}, title)."""
    rows = max(1, -(-len(examples) // columns))
    plt, (fig, _) = _figure(3.0 * columns, 3.0 * rows)
    fig.clf()
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (image, truth, prediction, title) in zip(axes, examples):
        ax.imshow(image)
        for x0, y0, x1, y1 in truth["boxes"]:
            ax.add_patch(
                plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="#2ca02c", lw=1.5)
            )
        for (x0, y0, x1, y1), label, score in zip(
            prediction["boxes"], prediction["labels"], prediction["scores"]
        ):
            ax.add_patch(
                plt.Rectangle(
                    (x0, y0), x1 - x0, y1 - y0, fill=False, color="#d62728", lw=1, ls="--"
                )
            )
            ax.text(x0, y0, f"{label} {score:.2f}", color="#d62728", fontsize=6, va="bottom")
        ax.set_title(title, fontsize=8)
    return _png(plt, fig)
