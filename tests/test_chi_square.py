"""The distribution tests' statistic: it passes one distribution and catches a shifted one."""

from __future__ import annotations

import torch

from tests.chi_square import two_sample_chi_square


def _draw(probs: list[float], n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.tensor(probs), n, replacement=True, generator=g).tolist()


def test_same_distribution_passes_and_a_shift_is_caught():
    p = [0.4, 0.3, 0.2, 0.05, 0.03, 0.02]
    shifted = [0.45, 0.25, 0.2, 0.05, 0.03, 0.02]
    same = [two_sample_chi_square(_draw(p, 1000, s), _draw(p, 1000, 100 + s))[2]
            for s in range(20)]
    assert min(same) > 1e-3  # 20 tries: a false alarm at 1e-3 would be a 2% event
    assert two_sample_chi_square(_draw(p, 4000, 1), _draw(shifted, 4000, 2))[2] < 1e-3


def test_p_value_matches_known_chi_square_quantiles():
    # 3 outcomes, counts (60, 40) / (40, 60) / (50, 50): statistic 8.0 with 2 dof
    a = [0] * 60 + [1] * 40 + [2] * 50
    b = [0] * 40 + [1] * 60 + [2] * 50
    statistic, dof, p = two_sample_chi_square(a, b)
    assert dof == 2 and abs(statistic - 8.0) < 1e-9
    assert abs(p - 0.01831563888873418) < 1e-9  # exp(-4): chi2 sf with 2 dof
