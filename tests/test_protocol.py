"""The evaluation protocol's lambda searches and retained-share figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tvbasis.evaluation import (
    LAMBDA_GRID,
    effect_retained,
    gain_retained,
    search_addition,
    search_negation,
)


def test_grid_is_the_papers() -> None:
    assert len(LAMBDA_GRID) == 21 and LAMBDA_GRID[0] == 0.0 and LAMBDA_GRID[-1] == 1.0


@pytest.mark.parametrize("peak", [0.0, 0.15, 0.35, 0.5, 0.85, 1.0])
def test_coarse_to_fine_finds_the_full_grid_optimum_of_a_unimodal_curve(peak: float) -> None:
    calls: list[float] = []

    def val(lam: float) -> dict[str, float]:
        calls.append(lam)
        return {"a": 0.9 - (lam - peak) ** 2, "b": 0.8 - 0.5 * (lam - peak) ** 2}

    ft = {"a": 1.0, "b": 0.9}
    fast = search_addition(val, ft)
    assert len(calls) <= 10 and len(set(calls)) == len(calls)
    full = search_addition(val, ft, search="full")
    assert fast.lam == full.lam == pytest.approx(peak)
    assert len(full.curve) == 21


def test_negation_respects_the_control_constraint() -> None:
    # target falls with lambda; control falls below 95% of 0.8 = 0.76 beyond lambda 0.6
    res = search_negation(
        lambda lam: 0.9 - 0.8 * lam, lambda lam: 0.8 - 0.1 * lam, control_zero_shot=0.8, search="full"
    )
    assert res.lam == pytest.approx(0.4)
    assert res.control_val >= 0.76 and res.target_val == pytest.approx(0.9 - 0.32)


def test_negation_says_when_no_lambda_qualifies() -> None:
    res = search_negation(lambda lam: 0.5, lambda lam: 0.1, control_zero_shot=0.8)
    assert res.lam is None and "no lambda" in res.reason and res.curve


@pytest.mark.parametrize("seed", range(20))
def test_lazy_negation_search_equals_the_brute_force_constrained_minimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # coarse accuracies (multiples of 1/16) so ties happen, as with small validation sets
    target = dict(zip(LAMBDA_GRID, np.round(rng.random(21) * 16) / 16, strict=True))
    control = dict(zip(LAMBDA_GRID, rng.random(21), strict=True))
    control_calls: list[float] = []

    def control_acc(lam: float) -> float:
        control_calls.append(lam)
        return control[lam]

    res = search_negation(target.__getitem__, control_acc, control_zero_shot=0.6, search="full")
    admissible = [lam for lam in LAMBDA_GRID if control[lam] >= 0.95 * 0.6]
    if not admissible:
        assert res.lam is None and len(control_calls) == 21
        return
    expected = min(admissible, key=lambda lam: (target[lam], lam))
    assert res.lam == expected and res.target_val == target[expected] and res.control_val == control[expected]
    assert len(set(control_calls)) == len(control_calls)  # each control at most once
    assert all(target[lam] <= target[expected] for lam in control_calls)  # only candidates that could win


def test_gain_and_effect_retained() -> None:
    g = gain_retained({"a": 0.7, "b": 0.5}, {"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.5})
    assert g["a"] == pytest.approx(0.5) and math.isnan(g["b"])
    assert effect_retained(0.6, 0.8, 0.4) == pytest.approx(0.5)
    assert effect_retained(0.8, 0.8, 0.4) == 0.0
