"""A two-sample chi-square test for the distribution tests (no SciPy in the engine's venv)."""

from __future__ import annotations

from collections import Counter

import torch


def two_sample_chi_square(a: list, b: list, min_expected: float = 5.0) -> tuple[float, int,
                                                                               float]:
    """Are samples `a` and `b` (hashable outcomes) from one distribution? Outcomes expected
    fewer than `min_expected` times in either sample are pooled into one category.
    Returns (statistic, degrees of freedom, p-value)."""
    count_a, count_b = Counter(a), Counter(b)
    n_a, n_b = len(a), len(b)
    share_a = n_a / (n_a + n_b)
    rows: list[tuple[int, int]] = []
    pooled = [0, 0]
    for outcome in count_a.keys() | count_b.keys():
        ca, cb = count_a[outcome], count_b[outcome]
        if (ca + cb) * min(share_a, 1 - share_a) < min_expected:
            pooled[0] += ca
            pooled[1] += cb
        else:
            rows.append((ca, cb))
    if sum(pooled):
        rows.append((pooled[0], pooled[1]))
    if len(rows) < 2:
        return 0.0, 0, 1.0
    statistic = 0.0
    for ca, cb in rows:
        total = ca + cb
        for observed, expected in ((ca, total * share_a), (cb, total * (1 - share_a))):
            statistic += (observed - expected) ** 2 / expected
    dof = len(rows) - 1
    # chi2 survival function: the regularised upper incomplete gamma Q(dof/2, x/2).
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(statistic / 2, dtype=torch.float64)))
    return statistic, dof, p_value
