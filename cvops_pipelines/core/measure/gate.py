"""Champion/challenger gate: a new model must be at least as good as the one in production, on
the dataset version's test split and, paired, on replayed production records (core.replay)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cvops_pipelines.core.measure.metrics import Evaluation
from cvops_pipelines.core.measure.replay import (
    INCONCLUSIVE,
    INSUFFICIENT,
    NON_INFERIOR,
    NonInferiority,
    ReplayComparison,
    paired_test,
)


@dataclass(frozen=True)
class GateConfig:
    max_macro_f1_drop: float = 0.01  # epsilon
    max_class_recall_drop: float = 0.05  # delta
    # Replay: a challenger shown worse on production records is always refused. Strict: pass
    # only one shown non-inferior. Not strict (default): an inconclusive replay or too few
    # records passes with a note, and the paired canary must show non-inferiority before the
    # release is promoted (the gate's holdout is usually far smaller than a canary's sample).
    require_field_evidence: bool = False
    # A drop that amounts to fewer net test images than this is noise, not a regression: on a
    # 100-image test split one image moves accuracy by 0.01 and a 10-image class's recall by 0.1.
    min_net_images: int = 2
    # With the per-image outcomes of both models on the test split (paired), a drop beyond its
    # limit refuses only when the exact one-sided McNemar test on the records it concerns (all,
    # or the class's) shows the challenger worse at this level: an 83-image test split cannot
    # tell a 2-image drop from noise.
    alpha: float = 0.05


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]
    table: pd.DataFrame  # side by side: metric, challenger, champion, delta, limit, ok
    first_model: bool = False
    notes: list[str] = field(default_factory=list)
    replay: ReplayComparison | None = None


@dataclass(frozen=True)
class PairedHits:
    """Each test image once: its label, and whether each model got it right (top-1)."""

    labels: np.ndarray  # class names
    new: np.ndarray  # bool
    old: np.ndarray  # bool


def decide(
    challenger: Evaluation,
    champion: Evaluation | None,
    config: GateConfig = GateConfig(),
    replay: ReplayComparison | None = None,
    paired: PairedHits | None = None,
) -> GateDecision:
    """Test-split rules (macro-F1 and per-class recall within their limits beyond a noise floor)
    and, when a replay comparison is given, its paired non-inferiority verdicts."""
    if champion is None:
        table = pd.DataFrame(
            [
                {
                    "metric": "macro_f1",
                    "challenger": challenger.macro_f1,
                    "champion": None,
                    "delta": None,
                    "limit": None,
                    "ok": True,
                }
            ]
        )
        return GateDecision(
            True, ["no champion yet: the first model passes by definition"], table, first_model=True
        )
    support = champion.per_class.set_index("label")["support"]
    net_lost = round((champion.accuracy - challenger.accuracy) * float(support.sum()))
    rows = [
        gate_row(
            "macro_f1",
            challenger.macro_f1,
            champion.macro_f1,
            config.max_macro_f1_drop,
            net_lost,
            config.min_net_images,
        ),
        gate_row("accuracy (info)", challenger.accuracy, champion.accuracy, None),
    ]
    mine = challenger.per_class.set_index("label")["recall"]
    theirs = champion.per_class.set_index("label")["recall"]
    for label in theirs.index:
        lost = round((float(theirs[label]) - float(mine.get(label, 0.0))) * float(support[label]))
        rows.append(
            gate_row(
                f"recall[{label}]",
                float(mine.get(label, 0.0)),
                float(theirs[label]),
                config.max_class_recall_drop,
                lost,
                config.min_net_images,
            )
        )
    table = pd.DataFrame(rows)
    notes = []
    if paired is not None:
        _within_noise(table, paired, config, notes)
    failed = table[~table["ok"]]
    reasons = [
        f"{r.metric}: {r.challenger:.4f} vs champion {r.champion:.4f} "
        f"(drop {-r.delta:.4f} > allowed {r.limit})"
        for r in failed.itertuples()
    ]
    if replay is not None:
        accepted = (NON_INFERIOR,) + (
            () if config.require_field_evidence else (INCONCLUSIVE, INSUFFICIENT)
        )
        for outcome in replay.outcomes:
            line = "replay " + outcome.sentence(replay.rule)
            (notes if outcome.verdict in accepted else reasons).append(line)
        if replay.verdict in (INCONCLUSIVE, INSUFFICIENT) and not config.require_field_evidence:
            notes.append(
                "replay did not show non-inferiority (nor a regression): the paired "
                "canary must show it before promotion"
            )
    return GateDecision(
        not reasons,
        reasons or ["challenger is not worse than champion"],
        table,
        notes=notes,
        replay=replay,
    )


def _within_noise(table: pd.DataFrame, paired: PairedHits, config: GateConfig, notes: list) -> None:
    """Clear the failed rows whose drop the paired test cannot tell from noise (and say so)."""
    rule = NonInferiority(alpha=config.alpha, min_records=1)
    for index, row in table[~table["ok"]].iterrows():
        label = row["metric"][len("recall[") : -1] if row["metric"].startswith("recall[") else None
        on = paired.labels == label if label is not None else np.ones(len(paired.labels), bool)
        test = paired_test(paired.new[on], paired.old[on], row["metric"], rule)
        if test.p_worse >= config.alpha:
            table.loc[index, "ok"] = True
            notes.append(
                f"test split {row['metric']}: drop {-row['delta']:.4f} is within noise: exact "
                f"McNemar p {test.p_worse:.3g} >= {config.alpha} on {test.records} images "
                f"({test.old_only} only champion right, {test.new_only} only challenger right)"
            )


def gate_row(
    metric: str,
    challenger: float,
    champion: float,
    limit: float | None,
    net_images_lost: int | None = None,
    min_net_images: int = 0,
) -> dict:
    delta = challenger - champion
    ok = True if limit is None else delta >= -limit - 1e-12
    if not ok and net_images_lost is not None and net_images_lost < min_net_images:
        ok = True  # within the noise floor of the test split
    return {
        "metric": metric,
        "challenger": round(challenger, 4),
        "champion": round(champion, 4),
        "delta": round(delta, 4),
        "limit": limit,
        "net_images_lost": net_images_lost,
        "ok": ok,
    }
