"""The protocol's lambda choice, averaged over draws of the validation examples.

A lambda chosen on 64 validation examples is itself a random quantity. The negation rule is a
threshold (the control must keep 95% of its zero-shot accuracy, and one example of 64 is 1.6
points), and the target's accuracy is nearly flat near its minimum, so two edits that differ by
very little often choose lambdas a grid step or more apart, and the test figure at the chosen
lambda moves with it. One run of the protocol then says more about which validation examples
were drawn than about the edit.

Given every validation example's correctness at every grid lambda, computed once on the whole
validation pool, the protocol's choice on any draw of examples costs an index and a mean, so
thousands of draws are cheap. Running an edit and the true task vectors on the *same* draws
and comparing their expected test accuracy at the chosen lambda is a paired measurement of what
the edit changes, with the search's randomness averaged out rather than sampled once.

Arrays are ``[lambdas, examples]`` booleans (correct or not), rows in the order of ``grid``,
whose first point must be 0 (the base itself). Ties go to the smaller lambda, as in
:mod:`tvbasis.evaluation.protocol`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise

import numpy as np

from tvbasis.errors import TvbasisError


def validation_draws(pool_sizes: Mapping[str, int], size: int, n_draws: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per task ``[n_draws, size]`` example indices drawn with replacement from its validation pool.

    Each task's draws come from its own generator (seeded by ``seed`` and the task's position),
    so adding a task does not change the others' draws.
    """
    if size < 1 or n_draws < 1:
        raise TvbasisError(f"validation draws: size and count must be positive, got {size} and {n_draws}")
    out = {}
    for i, (task, n) in enumerate(pool_sizes.items()):
        if n < 1:
            raise TvbasisError(f"validation draws: task {task!r} has no validation examples")
        out[task] = np.random.default_rng([seed, i]).integers(0, n, size=(n_draws, size))
    return out


def draw_accuracies(correct: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """``[lambdas, n_draws]``: the accuracy at each lambda on each draw of ``draws`` ``[n_draws, size]``."""
    correct = np.asarray(correct, dtype=bool)
    if correct.ndim != 2:
        raise TvbasisError(f"correctness must be [lambdas, examples], got shape {correct.shape}")
    if draws.size and draws.max() >= correct.shape[1]:
        raise TvbasisError(f"a draw indexes example {int(draws.max())} of a pool of {correct.shape[1]}")
    return correct[:, draws].mean(axis=-1)


def _check_grid(grid: Sequence[float], n_rows: int) -> None:
    if len(grid) != n_rows:
        raise TvbasisError(f"correctness has {n_rows} lambda rows for a grid of {len(grid)}")
    if grid[0] != 0 or any(b <= a for a, b in pairwise(grid)):
        raise TvbasisError("the lambda grid must start at 0 (the base) and increase")


def negation_choices(
    target_acc: np.ndarray, control_acc: np.ndarray, grid: Sequence[float], threshold: float = 0.95
) -> np.ndarray:
    """Per draw, the grid index minimising the target's accuracy with the control at ``threshold`` of its zero-shot.

    ``target_acc`` and ``control_acc`` are ``[lambdas, n_draws]`` (see :func:`draw_accuracies`);
    the control's zero-shot accuracy on a draw is its row at lambda 0, so lambda 0 always
    qualifies and every draw has an answer.
    """
    _check_grid(grid, target_acc.shape[0])
    if control_acc.shape != target_acc.shape:
        raise TvbasisError(f"target {target_acc.shape} and control {control_acc.shape} accuracies differ in shape")
    admissible = control_acc >= threshold * control_acc[0]
    return np.where(admissible, target_acc, np.inf).argmin(axis=0)


def addition_choices(
    val_acc: Mapping[str, np.ndarray], finetuned: Mapping[str, float], grid: Sequence[float]
) -> np.ndarray:
    """Per draw, the grid index maximising mean normalised validation accuracy (accuracy / fine-tuned)."""
    rows = {acc.shape for acc in val_acc.values()}
    if len(rows) != 1:
        raise TvbasisError(f"tasks' accuracies differ in shape: {sorted(rows)}")
    missing = [t for t in val_acc if t not in finetuned]
    if missing:
        raise TvbasisError(f"no fine-tuned accuracy for {missing}")
    score = np.mean([acc / finetuned[t] for t, acc in val_acc.items()], axis=0)
    _check_grid(grid, score.shape[0])
    return score.argmax(axis=0)


def expected_correctness(
    choices: np.ndarray, correct_at: Callable[[int], Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Per task and example, the share of draws whose chosen lambda gets it right.

    ``correct_at(grid index)`` gives each task's per-example correctness at that lambda; each
    distinct chosen index is asked for once. The mean of a task's vector is its expected accuracy
    under the protocol, and being per example it can be resampled (paired) like any accuracy.
    """
    idx, counts = np.unique(np.asarray(choices), return_counts=True)
    out: dict[str, np.ndarray] = {}
    for i, c in zip(idx, counts, strict=True):
        for task, correct in correct_at(int(i)).items():
            out[task] = out.get(task, 0.0) + (c / counts.sum()) * np.asarray(correct, dtype=np.float64)
    return out


def choice_shares(choices: np.ndarray, grid: Sequence[float]) -> dict[float, float]:
    """How often each lambda was chosen, as shares of the draws (lambdas never chosen left out)."""
    idx, counts = np.unique(np.asarray(choices), return_counts=True)
    return {float(grid[int(i)]): float(c / counts.sum()) for i, c in zip(idx, counts, strict=True)}
