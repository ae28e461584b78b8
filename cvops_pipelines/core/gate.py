"""Champion/challenger gate: a new model must be at least as good as the one in production."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from cvops_pipelines.core.metrics import Evaluation
from cvops_pipelines.core.replay import ReplayResult


@dataclass(frozen=True)
class GateConfig:
    max_macro_f1_drop: float = 0.01  # epsilon
    max_class_recall_drop: float = 0.05  # delta
    max_replay_drop: float = 0.01
    # A drop that amounts to fewer net test images than this is noise, not a regression: on a
    # 100-image test split one image moves accuracy by 0.01 and a 10-image class's recall by 0.1.
    min_net_images: int = 2


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]
    table: pd.DataFrame  # side by side: metric, challenger, champion, delta, limit, ok
    first_model: bool = False
    notes: list[str] = field(default_factory=list)


def decide(challenger: Evaluation, champion: Evaluation | None, config: GateConfig = GateConfig(),
           replay_challenger: ReplayResult | None = None,
           replay_champion: ReplayResult | None = None) -> GateDecision:
    if champion is None:
        table = pd.DataFrame([{"metric": "macro_f1", "challenger": challenger.macro_f1,
                               "champion": None, "delta": None, "limit": None, "ok": True}])
        return GateDecision(True, ["no champion yet: the first model passes by definition"],
                            table, first_model=True)
    support = champion.per_class.set_index("label")["support"]
    net_lost = round((champion.accuracy - challenger.accuracy) * float(support.sum()))
    rows = [_row("macro_f1", challenger.macro_f1, champion.macro_f1, config.max_macro_f1_drop,
                 net_lost, config.min_net_images),
            _row("accuracy (info)", challenger.accuracy, champion.accuracy, None)]
    mine = challenger.per_class.set_index("label")["recall"]
    theirs = champion.per_class.set_index("label")["recall"]
    for label in theirs.index:
        lost = round((float(theirs[label]) - float(mine.get(label, 0.0))) * float(support[label]))
        rows.append(_row(f"recall[{label}]", float(mine.get(label, 0.0)), float(theirs[label]),
                         config.max_class_recall_drop, lost, config.min_net_images))
    if replay_challenger is not None and replay_champion is not None:
        for metric in ("automatic_accuracy", "assisted_accuracy"):
            a, b = getattr(replay_challenger, metric), getattr(replay_champion, metric)
            if a is not None and b is not None:
                rows.append(_row(f"replay {metric}", a, b, config.max_replay_drop))
    table = pd.DataFrame(rows)
    failed = table[~table["ok"]]
    reasons = [f"{r.metric}: {r.challenger:.4f} vs champion {r.champion:.4f} "
               f"(drop {-r.delta:.4f} > allowed {r.limit})" for r in failed.itertuples()]
    return GateDecision(failed.empty, reasons or ["challenger is not worse than champion"], table)


def _row(metric: str, challenger: float, champion: float, limit: float | None,
         net_images_lost: int | None = None, min_net_images: int = 0) -> dict:
    delta = challenger - champion
    ok = True if limit is None else delta >= -limit - 1e-12
    if not ok and net_images_lost is not None and net_images_lost < min_net_images:
        ok = True  # within the noise floor of the test split
    return {"metric": metric, "challenger": round(challenger, 4), "champion": round(champion, 4),
            "delta": round(delta, 4), "limit": limit, "net_images_lost": net_images_lost,
            "ok": ok}
