"""The learning curve's extrapolation: a log-linear trend and where it meets a goal."""

from __future__ import annotations

import math

import pytest

from benchmarks.learning_curve import extrapolate, log_linear


def test_log_linear_finds_where_the_trend_meets_the_goal():
    points = [(1000.0, 1.1), (1000.0 * math.e, 1.2), (1000.0 * math.e ** 2, 1.3)]
    fit = log_linear(points, goal=1.5)
    assert fit["slope_per_e_fold"] == pytest.approx(0.1)
    assert fit["tokens_at_goal"] == pytest.approx(1000.0 * math.e ** 4)
    assert log_linear([(1.0, 1.2), (10.0, 1.1)], goal=1.5)["tokens_at_goal"] is None
    assert log_linear([(1.0, 1.2)], goal=1.5) is None


def _row(mode: str, tokens: int, tau: float | None) -> dict:
    return {"run": f"{mode}-{tokens}-b4", "mode": mode, "train_tokens": tokens, "vllm_tau": tau}


def test_extrapolate_pairs_the_modes_at_equal_data():
    rows = [_row("amphista", 100, 1.2), _row("medusa", 100, 1.1),
            _row("amphista", 400, 1.3), _row("medusa", 400, 1.15),
            _row("amphista", 800, None), _row("medusa", 900, 1.2)]
    trend = extrapolate(rows, tau_goal=1.8, ratio_goal=1.25)
    assert set(trend["vllm_tau"]) == {"amphista-b4", "medusa-b4"}
    assert trend["ratios"] == [(100, pytest.approx(1.2 / 1.1)), (400, pytest.approx(1.3 / 1.15))]
    assert trend["amphista_over_medusa"]["slope_per_e_fold"] > 0
