"""Distribution shift in production, from the model's outputs: black-box shift detection.

Rabanser et al. ("Failing Loudly", NeurIPS 2019) found two-sample tests on a trained classifier's
softmax outputs (BBSD: one Kolmogorov-Smirnov test per class, Bonferroni-corrected) the most
sample-efficient of the detectors they compared. Three families are tested here, all against the
same model's outputs on the training reference (held-out images of its dataset version):
prediction confidence (KS on the top probability), class mix (chi-square on predicted classes)
and the full output distribution (BBSD). Every p-value is compared with alpha / number of tests,
so an unshifted stream raises an alarm with probability at most alpha per window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class DriftResult:
    assessed: bool
    flagged: bool
    tests: pd.DataFrame  # family, test, statistic, p_value, threshold, flagged
    n_reference: int
    n_production: int
    reason: str = ""

    @property
    def families(self) -> dict[str, bool]:
        return self.tests.groupby("family")["flagged"].any().to_dict() if len(self.tests) else {}

    @property
    def min_p(self) -> float:
        return float(self.tests["p_value"].min()) if len(self.tests) else 1.0


def output_drift(
    reference: np.ndarray,
    production: np.ndarray,
    classes: list[str],
    alpha: float = 0.05,
    min_samples: int = 20,
) -> DriftResult:
    """reference, production: softmax outputs (n, classes) of the same model."""
    from scipy.stats import chi2_contingency, ks_2samp

    n_ref, n_prod = len(reference), len(production)
    empty = pd.DataFrame(columns=["family", "test", "statistic", "p_value", "threshold", "flagged"])
    if n_prod < min_samples or n_ref < min_samples:
        return DriftResult(
            False,
            False,
            empty,
            n_ref,
            n_prod,
            f"needs {min_samples} outputs on each side (reference {n_ref}, production {n_prod})",
        )
    rows = []
    stat = ks_2samp(reference.max(1), production.max(1))
    rows.append(("confidence", "KS on top probability", stat.statistic, stat.pvalue))
    counts = np.stack(
        [
            np.bincount(reference.argmax(1), minlength=len(classes)),
            np.bincount(production.argmax(1), minlength=len(classes)),
        ]
    )
    counts = counts[:, counts.sum(0) > 0]
    if counts.shape[1] > 1:
        chi = chi2_contingency(counts)
        rows.append(("class_mix", "chi-square on predicted classes", chi.statistic, chi.pvalue))
    for k, name in enumerate(classes):
        stat = ks_2samp(reference[:, k], production[:, k])
        rows.append(("outputs", f"KS on p({name})", stat.statistic, stat.pvalue))
    tests = pd.DataFrame(rows, columns=["family", "test", "statistic", "p_value"])
    tests["threshold"] = alpha / len(tests)
    tests["flagged"] = tests["p_value"] < tests["threshold"]
    return DriftResult(True, bool(tests["flagged"].any()), tests, n_ref, n_prod)
