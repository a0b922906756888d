"""Coefficients over the stored vectors for every kind of task arithmetic.

All arithmetic is one combination of the K stored vectors: ``sum_k c_k s_k``.

- task-weighted addition with weights ``a`` over tasks: ``c = W a`` (the mean's row of the
  decoder is all ones, so the mean enters with weight ``sum(a)``); negation and analogies are
  signed ``a``; reconstruction of task t is ``a = e_t``. A store with coded residuals adds
  ``sum_t a_t R_hat_t`` (``task_combination`` gives both parts);
- the paper's addition, the unit sum of the atoms ``S 1`` (the mean, if any, is not an atom).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from tvbasis.errors import TvbasisError


def task_weights(
    task_names: Sequence[str], add: Mapping[str, float] | None = None, negate: Sequence[str] = ()
) -> np.ndarray:
    """The weight vector ``a`` over tasks: ``add`` gives NAME -> coefficient, ``negate`` adds -1 each."""
    a = np.zeros(len(task_names))
    index = {n: i for i, n in enumerate(task_names)}
    for name, coef in (add or {}).items():
        if name not in index:
            raise TvbasisError(f"--add {name}: no such task in the store (tasks: {', '.join(task_names)})")
        if not np.isfinite(coef):
            raise TvbasisError(f"--add {name}={coef}: the coefficient must be a finite number")
        a[index[name]] += coef
    for name in negate:
        if name not in index:
            raise TvbasisError(f"--negate {name}: no such task in the store (tasks: {', '.join(task_names)})")
        a[index[name]] -= 1.0
    return a


def task_coefficients(decoder: np.ndarray, weights: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``c = scale * W a``: one combination of the stored vectors, never T reconstructions."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (decoder.shape[1],):
        raise TvbasisError(f"expected {decoder.shape[1]} task weights, got shape {weights.shape}")
    return scale * (decoder @ weights)


def task_combination(decoder: np.ndarray, weights: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(c, r) = (scale * W a, scale * a)``: the stored vectors' coefficients and the weights of a
    store's coded residuals (``Store.combination_rows(chunk, c, r)``; a store without residuals ignores ``r``)."""
    c = task_coefficients(decoder, weights, scale)
    return c, scale * np.asarray(weights, dtype=np.float64)


def atoms_sum_coefficients(n_atoms: int, has_mean: bool, scale: float = 1.0) -> np.ndarray:
    """``c = scale * 1`` over the M atoms (the paper's addition), 0 for a stored mean."""
    c = np.full(n_atoms + int(has_mean), scale, dtype=np.float64)
    if has_mean:
        c[-1] = 0.0
    return c
