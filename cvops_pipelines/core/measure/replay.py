"""Replay: score models on labeled production records, alone and with the human in the loop, and
decide on *paired* outcomes whether a new model is not worse than the one it would replace.

The operator model: the UI shows the model's top-k classes; when the true class is among them the
operator picks it with probability `p_pick_right`; otherwise the record is handled wrong. Scores
are expected values (no sampling), so a gate built on them is deterministic.

The statistical rule (`NonInferiority`): both models see the same records, so only the discordant
pairs carry information. With n records, b where only the old model is right and c where only the
new one is, the difference in accuracy is (c - b) / n. Conditional on the m = b + c discordant
pairs, c ~ Binomial(m, pi), and "new is worse by more than the margin" is pi <= pi0 with
pi0 = (1 - margin * n / m) / 2. The new model is non-inferior when the exact one-sided binomial
test rejects that at level alpha (equivalently: the Clopper-Pearson lower bound of the difference
is above -margin). It is worse when the exact one-sided McNemar test (pi = 1/2) says so at alpha.
Neither: inconclusive, with about how many more records would settle it at the observed rates.
Fewer than `min_records`: not enough field data to judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

NON_INFERIOR, WORSE, INCONCLUSIVE, INSUFFICIENT = (
    "non_inferior",
    "worse",
    "inconclusive",
    "insufficient",
)


@dataclass(frozen=True)
class Operator:
    top_k: int = 2
    p_pick_right: float = 0.95

    def __post_init__(self) -> None:
        if self.top_k < 1 or not 0 < self.p_pick_right <= 1:
            raise ValueError("top_k must be >= 1 and p_pick_right within (0, 1]")


def top_k_hits(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)


@dataclass(frozen=True)
class NonInferiority:
    margin: float = 0.02  # the new model may be this much worse (absolute accuracy)
    alpha: float = 0.05  # one-sided error rate of each test
    min_records: int = 50  # fewer paired records: not enough field data to judge

    def __post_init__(self) -> None:
        if not 0 <= self.margin < 1 or not 0 < self.alpha < 0.5 or self.min_records < 1:
            raise ValueError("margin in [0, 1), alpha in (0, 0.5), min_records >= 1")


@dataclass(frozen=True)
class PairedOutcome:
    metric: str
    records: int
    new_accuracy: float
    old_accuracy: float
    new_only: int  # c: records only the new model gets right
    old_only: int  # b: records only the old model gets right
    lower_bound: float  # one-sided (1 - alpha) lower confidence bound of new - old
    p_non_inferior: float  # exact test of H0: new - old <= -margin
    p_worse: float  # exact McNemar, one-sided, H0: new >= old
    verdict: str
    more_records: int | None = None  # inconclusive: about this many more would settle it
    scale: float = 1.0  # the metric is this factor times the tested hit rate (assisted: p)

    @property
    def difference(self) -> float:
        return self.new_accuracy - self.old_accuracy

    def sentence(self, rule: NonInferiority) -> str:
        counts = (
            f"{self.records} paired records, {self.new_only + self.old_only} discordant "
            f"({self.new_only} only new right, {self.old_only} only old right)"
        )
        figures = (
            f"{self.new_accuracy:.4f} vs {self.old_accuracy:.4f}, difference "
            f"{self.difference:+.4f}, {(1 - rule.alpha) * 100:g}% lower bound "
            f"{self.lower_bound:+.4f}"
        )
        if self.verdict == INSUFFICIENT:
            return (
                f"{self.metric}: not enough field data to judge: {counts}; needs {rule.min_records}"
            )
        if self.verdict == NON_INFERIOR:
            return (
                f"{self.metric}: non-inferior: {figures} > -{rule.margin} "
                f"(p {self.p_non_inferior:.3g} < {rule.alpha}); {counts}"
            )
        if self.verdict == WORSE:
            return (
                f"{self.metric}: worse: {figures} (McNemar p {self.p_worse:.3g} < "
                f"{rule.alpha}); {counts}"
            )
        more = (
            f"about {self.more_records} more records would settle it"
            if self.more_records
            else "at the observed rates more records would not show non-inferiority"
        )
        return (
            f"{self.metric}: inconclusive: {figures} is not above -{rule.margin} "
            f"(p {self.p_non_inferior:.3g}); {counts}; {more}"
        )

    def as_row(self) -> dict:
        return {
            "metric": self.metric,
            "records": self.records,
            "new": round(self.new_accuracy, 4),
            "old": round(self.old_accuracy, 4),
            "difference": round(self.difference, 4),
            "only_new_right": self.new_only,
            "only_old_right": self.old_only,
            "lower_bound": round(self.lower_bound, 4),
            "p_non_inferior": round(self.p_non_inferior, 4),
            "p_worse": round(self.p_worse, 4),
            "verdict": self.verdict,
            "more_records": self.more_records,
        }


def _p_non_inferior(old_only: int, new_only: int, n: int, margin: float) -> float:
    from scipy.stats import binom

    m = old_only + new_only
    if m == 0:
        return 0.0
    pi0 = (1 - margin * n / m) / 2
    if pi0 <= 0:  # even if every discordant pair went against the new model: within the margin
        return 0.0
    return float(binom.sf(new_only - 1, m, pi0))


def _lower_bound(old_only: int, new_only: int, n: int, alpha: float) -> float:
    from scipy.stats import beta

    m = old_only + new_only
    if m == 0:
        return 0.0
    pi_low = 0.0 if new_only == 0 else float(beta.ppf(alpha, new_only, m - new_only + 1))
    return m / n * (2 * pi_low - 1)


def _more_records(old_only: int, new_only: int, n: int, margin: float, alpha: float) -> int | None:
    if (new_only - old_only) / n <= -margin:
        return None
    for factor in (1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        b, c, size = round(old_only * factor), round(new_only * factor), round(n * factor)
        if _p_non_inferior(b, c, size, margin) < alpha:
            return size - n
    return None


def paired_test(
    new_hits: np.ndarray,
    old_hits: np.ndarray,
    metric: str,
    rule: NonInferiority = NonInferiority(),
    scale: float = 1.0,
) -> PairedOutcome:
    """Non-inferiority of `new` against `old` from per-record hits (bool) on the same records.
    `scale` multiplies the reported accuracies and the margin's reference (assisted accuracy is
    p_pick_right x top-k coverage: the test runs on coverage with margin / p)."""
    from scipy.stats import binom

    new_hits, old_hits = np.asarray(new_hits, bool), np.asarray(old_hits, bool)
    if new_hits.shape != old_hits.shape:
        raise ValueError("paired outcomes need the same records on both sides")
    n = len(new_hits)
    new_only, old_only = int((new_hits & ~old_hits).sum()), int((old_hits & ~new_hits).sum())
    margin = rule.margin / scale
    accuracy = lambda hits: float(hits.mean()) * scale if n else float("nan")
    if n == 0:
        return PairedOutcome(
            metric,
            0,
            float("nan"),
            float("nan"),
            0,
            0,
            float("nan"),
            1.0,
            1.0,
            INSUFFICIENT,
            scale=scale,
        )
    p_ni = _p_non_inferior(old_only, new_only, n, margin)
    p_worse = float(binom.cdf(new_only, new_only + old_only, 0.5)) if new_only + old_only else 1.0
    bound = _lower_bound(old_only, new_only, n, rule.alpha) * scale
    if n < rule.min_records:
        verdict = INSUFFICIENT
    elif p_ni < rule.alpha:
        verdict = NON_INFERIOR
    elif p_worse < rule.alpha:
        verdict = WORSE
    else:
        verdict = INCONCLUSIVE
    more = (
        _more_records(old_only, new_only, n, margin, rule.alpha)
        if verdict == INCONCLUSIVE
        else None
    )
    return PairedOutcome(
        metric,
        n,
        accuracy(new_hits),
        accuracy(old_hits),
        new_only,
        old_only,
        bound,
        p_ni,
        p_worse,
        verdict,
        more,
        scale,
    )


@dataclass
class ReplayComparison:
    """A new and an old model replayed on the same reviewed production records."""

    outcomes: list[PairedOutcome]  # automatic (top-1) and assisted (operator over top-k)
    per_class: pd.DataFrame  # label, records, new / old automatic accuracy
    per_cohort: pd.DataFrame  # cohort, records, new / old automatic accuracy
    business: pd.DataFrame  # per event-class metric: new, old (empty: no event classes)
    rule: NonInferiority
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """The worst of the outcomes: worse > inconclusive > insufficient > non-inferior."""
        order = (WORSE, INCONCLUSIVE, INSUFFICIENT, NON_INFERIOR)
        return min((o.verdict for o in self.outcomes), key=order.index)

    @property
    def records(self) -> int:
        return self.outcomes[0].records if self.outcomes else 0

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([o.as_row() for o in self.outcomes])

    def sentences(self) -> list[str]:
        return [o.sentence(self.rule) for o in self.outcomes] + self.notes


def compare_on_replay(
    new_probs: np.ndarray,
    old_probs: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    cohorts: np.ndarray | None = None,
    operator: Operator = Operator(),
    rule: NonInferiority = NonInferiority(),
    event_classes: list[str] | None = None,
    assisted_on: np.ndarray | None = None,
    unbiased: np.ndarray | None = None,
) -> ReplayComparison:
    """`labels` index into `classes`, which both models' probability columns follow.
    `assisted_on`: the records whose labels may judge top-k suggestions (default all). An
    operator's label is by construction among the top k of the model that suggested it, so a
    model replayed on its own operator-labeled records would cover them all.
    `unbiased`: the records whose labels lean toward neither model (default all). Operators
    choose among the old model's suggestions, so where it is wrong and the truth is not among
    them the label agrees with its mistake: such labels favour the old model. They may still
    show the new one non-inferior (the lean works against it), but "worse" must also hold on
    the unbiased records, or the verdict is inconclusive."""
    labels = np.asarray(labels)
    new_top1, old_top1 = new_probs.argmax(1) == labels, old_probs.argmax(1) == labels
    automatic = paired_test(new_top1, old_top1, "automatic accuracy (top-1)", rule)
    notes = []
    fair = None if unbiased is None else np.asarray(unbiased, bool)
    if automatic.verdict == WORSE and fair is not None and not fair.all():
        check = paired_test(new_top1[fair], old_top1[fair], "automatic accuracy (top-1)", rule)
        if check.verdict != WORSE:
            automatic = replace(automatic, verdict=INCONCLUSIVE, more_records=None)
            notes.append(
                "automatic accuracy looks worse only with operator labels, which favour the "
                f"model whose suggestions they chose among; on the {check.records} unbiased "
                f"(expert-labelled) records it is {check.verdict}"
            )
    outcomes = [automatic]
    on = np.ones(len(labels), bool) if assisted_on is None else np.asarray(assisted_on, bool)
    outcomes.append(
        paired_test(
            top_k_hits(new_probs[on], labels[on], operator.top_k),
            top_k_hits(old_probs[on], labels[on], operator.top_k),
            f"assisted accuracy (top-{operator.top_k}, operator right {operator.p_pick_right:.0%})",
            rule,
            operator.p_pick_right,
        )
    )
    frame = pd.DataFrame(
        {
            "label": np.asarray(classes)[labels],
            "new": new_top1,
            "old": old_top1,
            "cohort": cohorts if cohorts is not None else "all",
        }
    )
    per_class = _by(frame, "label")
    per_cohort = _by(frame, "cohort")
    business = _business(new_probs.argmax(1), old_probs.argmax(1), labels, classes, event_classes)
    if not event_classes:
        notes.append("business metrics: no event classes configured")
    return ReplayComparison(outcomes, per_class, per_cohort, business, rule, notes)


def _by(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    grouped = frame.groupby(column, sort=True)
    return pd.DataFrame(
        {
            "records": grouped.size(),
            "new_accuracy": grouped["new"].mean().round(4),
            "old_accuracy": grouped["old"].mean().round(4),
        }
    ).reset_index()


def _business(new_pred, old_pred, labels, classes, event_classes) -> pd.DataFrame:
    """Missed events (an event record not predicted as its class) and false alarms (a non-event
    record predicted as an event class), each as a share."""
    if not event_classes:
        return pd.DataFrame(columns=["metric", "new", "old", "records"])
    events = np.isin(np.asarray(classes)[labels], event_classes)
    is_event = np.isin(
        np.arange(len(classes)), [classes.index(c) for c in event_classes if c in classes]
    )
    rows = []
    if events.any():
        rows.append(
            {
                "metric": "missed_event_share",
                "records": int(events.sum()),
                "new": round(float((new_pred[events] != labels[events]).mean()), 4),
                "old": round(float((old_pred[events] != labels[events]).mean()), 4),
            }
        )
    if (~events).any():
        rows.append(
            {
                "metric": "false_alarm_share",
                "records": int((~events).sum()),
                "new": round(float(is_event[new_pred[~events]].mean()), 4),
                "old": round(float(is_event[old_pred[~events]].mean()), 4),
            }
        )
    return pd.DataFrame(rows, columns=["metric", "new", "old", "records"])
