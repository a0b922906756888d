"""The protocol over validation draws agrees with the protocol run once, and pairs edits draw by draw."""

from __future__ import annotations

import numpy as np
import pytest

from tvbasis.errors import TvbasisError
from tvbasis.evaluation.protocol import LAMBDA_GRID, search_addition, search_negation
from tvbasis.evaluation.resampling import (
    addition_choices,
    choice_shares,
    draw_accuracies,
    expected_correctness,
    negation_choices,
    validation_draws,
)

GRID = LAMBDA_GRID


def random_correct(rng: np.random.Generator, n: int, p_start: float, p_end: float) -> np.ndarray:
    """``[lambdas, n]`` correctness whose accuracy drifts from ``p_start`` to ``p_end`` along the grid."""
    p = np.linspace(p_start, p_end, len(GRID))[:, None]
    return rng.random((len(GRID), n)) < p


def whole_pool(n: int) -> np.ndarray:
    """One draw that is the whole pool, in order: the protocol run once on every example."""
    return np.arange(n)[None, :]


@pytest.mark.parametrize("seed", range(8))
def test_negation_on_the_whole_pool_is_the_protocols_full_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    target = random_correct(rng, 40, 0.8, 0.2)
    control = random_correct(rng, 30, 0.7, 0.55)
    t_acc = draw_accuracies(target, whole_pool(40))
    c_acc = draw_accuracies(control, whole_pool(30))
    [choice] = negation_choices(t_acc, c_acc, GRID, 0.95)
    res = search_negation(
        lambda lam: float(target[GRID.index(lam)].mean()),
        lambda lam: float(control[GRID.index(lam)].mean()),
        float(control[0].mean()),
        0.95,
        search="full",
    )
    assert GRID[choice] == res.lam


@pytest.mark.parametrize("seed", range(8))
def test_addition_on_the_whole_pool_is_the_protocols_full_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pools = {"a": 30, "b": 50, "c": 20}
    correct = {
        t: np.concatenate([random_correct(rng, n, 0.5, 0.9)[:11], random_correct(rng, n, 0.9, 0.4)[11:]])
        for t, n in pools.items()
    }
    ft = {"a": 0.9, "b": 0.8, "c": 1.0}
    acc = {t: draw_accuracies(c, whole_pool(pools[t])) for t, c in correct.items()}
    [choice] = addition_choices(acc, ft, GRID)
    res = search_addition(
        lambda lam: {t: float(c[GRID.index(lam)].mean()) for t, c in correct.items()}, ft, search="full"
    )
    assert GRID[choice] == res.lam


def test_control_threshold_is_measured_on_the_same_draw() -> None:
    # The control loses one example of 20 at every lambda > 0: 95% of zero-shot on a draw where
    # it scores 20/20, below it on a draw where it scores 10/20 (9/20 < 9.5/20).
    control = np.ones((len(GRID), 40), dtype=bool)
    control[:, 20:30] = False  # examples 20-29 always wrong
    control[1:, 0] = False  # example 0 wrong once negated
    target = np.ones((len(GRID), 40), dtype=bool)
    target[5:, :] = False  # the target drops from lambda 0.25 on
    draws = np.stack([np.arange(20), np.r_[np.arange(10), np.arange(20, 30)]])
    t_acc = draw_accuracies(target, draws)
    c_acc = draw_accuracies(control, draws)
    choices = negation_choices(t_acc, c_acc, GRID, 0.95)
    assert GRID[choices[0]] == 0.25  # 19/20 >= 0.95 * 20/20: admissible, and the target is lowest from 0.25
    assert GRID[choices[1]] == 0.0  # 9/20 < 0.95 * 10/20: only the base qualifies


def test_identical_edits_choose_identically_on_every_draw() -> None:
    rng = np.random.default_rng(3)
    target, control = random_correct(rng, 64, 0.8, 0.3), random_correct(rng, 64, 0.6, 0.5)
    draws = validation_draws({"t": 64, "c": 64}, 64, 500, seed=1)
    a = negation_choices(draw_accuracies(target, draws["t"]), draw_accuracies(control, draws["c"]), GRID)
    b = negation_choices(draw_accuracies(target.copy(), draws["t"]), draw_accuracies(control.copy(), draws["c"]), GRID)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) > 1  # the draws do move the choice: the noise this averages out


def test_draws_are_reproducible_in_range_and_independent_of_other_tasks() -> None:
    a = validation_draws({"x": 10, "y": 300}, 64, 100, seed=5)
    b = validation_draws({"x": 10, "y": 300}, 64, 100, seed=5)
    c = validation_draws({"x": 10, "y": 300}, 64, 100, seed=6)
    np.testing.assert_array_equal(a["y"], b["y"])
    assert not np.array_equal(a["y"], c["y"])
    assert a["x"].shape == (100, 64) and a["x"].max() <= 9 and a["x"].min() >= 0
    assert len(np.unique(a["x"])) == 10  # with replacement from a pool smaller than a draw
    alone = validation_draws({"x": 10}, 64, 100, seed=5)
    np.testing.assert_array_equal(alone["x"], a["x"])


def test_expected_correctness_weights_each_choice_by_its_share_and_evaluates_it_once() -> None:
    calls: list[int] = []
    correct = {2: np.array([True, False, True]), 5: np.array([False, False, True])}

    def at(i: int) -> dict[str, np.ndarray]:
        calls.append(i)
        return {"t": correct[i]}

    choices = np.array([2, 2, 2, 5])
    expected = expected_correctness(choices, at)["t"]
    np.testing.assert_allclose(expected, [0.75, 0.0, 1.0])
    assert expected.mean() == pytest.approx((3 * correct[2].mean() + correct[5].mean()) / 4)
    assert sorted(calls) == [2, 5]
    assert choice_shares(choices, GRID) == {0.1: 0.75, 0.25: 0.25}


def test_bad_shapes_and_grids_are_refused() -> None:
    acc = np.zeros((len(GRID), 3))
    with pytest.raises(TvbasisError, match="lambda rows"):
        negation_choices(acc[:5], acc[:5], GRID)
    with pytest.raises(TvbasisError, match="start at 0"):
        negation_choices(acc, acc, tuple(g + 0.1 for g in GRID))
    with pytest.raises(TvbasisError, match="differ in shape"):
        negation_choices(acc, acc[:, :2], GRID)
    with pytest.raises(TvbasisError, match="pool of 4"):
        draw_accuracies(np.zeros((len(GRID), 4), bool), np.array([[0, 4]]))
    with pytest.raises(TvbasisError, match="no fine-tuned accuracy"):
        addition_choices({"a": acc}, {}, GRID)
    with pytest.raises(TvbasisError, match="no validation examples"):
        validation_draws({"empty": 0}, 8, 2)
