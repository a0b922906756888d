"""PCA basis: truncated eigendecomposition of the Gram matrix.

``G = Q diag(lambda) Q^T``; atoms ``s_m = V q_m`` (= ``u_m sigma_m``), decoder ``Q_M^T``:
the best rank-M reconstruction. With ``center=True`` (the paper's variant) the mean task
vector ``mu = V 1/T`` is removed first and stored as an extra full-size vector, which every
byte count includes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tvbasis.errors import TvbasisError
from tvbasis.methods.base import BasisMethod, spectral_floor


def fix_signs(Q: np.ndarray) -> np.ndarray:
    """Flip columns so each one's entries sum to >= 0 (largest entry positive when the sum is ~0).

    Column ``m`` holds component m's coefficients over the tasks, so after this the "sum of
    atoms" is no longer sign-arbitrary.
    """
    Q = Q.copy()
    for m in range(Q.shape[1]):
        col = Q[:, m]
        total = col.sum()
        if abs(total) <= 1e-9 * max(np.abs(col).sum(), 1e-300):
            total = col[np.argmax(np.abs(col))]
        if total < 0:
            Q[:, m] = -col
    return Q


class PCA(BasisMethod):
    name = "pca"
    min_atoms = 0  # M = 0: no basis, every task is its coded residual (build with residual codes)

    def __init__(self, n_atoms: int, center: bool = False, seed: int = 0) -> None:
        super().__init__(n_atoms, seed)
        self.center = bool(center)

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "center": self.center}

    def check_n_tasks(self, n_tasks: int) -> None:
        super().check_n_tasks(n_tasks)
        if self.center and self.n_atoms > n_tasks - 1:
            raise TvbasisError(f"-M {self.n_atoms}: centred PCA has at most T - 1 = {n_tasks - 1} components")

    def fit(self, gram: np.ndarray) -> PCA:
        T = gram.shape[0]
        self.check_n_tasks(T)
        C = np.eye(T) - 1.0 / T if self.center else np.eye(T)
        G = C @ gram @ C
        lam, Q = np.linalg.eigh((G + G.T) / 2)
        order = np.argsort(lam)[::-1]
        lam = np.clip(lam[order], 0.0, None)
        Q_M = fix_signs(Q[:, order[: self.n_atoms]])
        self.eigenvalues_ = lam
        self.singular_values_ = np.sqrt(lam)
        total = lam.sum()
        self.explained_variance_ratio_ = lam / total if total > 0 else np.zeros_like(lam)
        self.components_ = Q_M.T  # (M, T), the decoder rows
        encoder = C @ Q_M
        decoder = Q_M.T
        self.has_mean_ = self.center
        if self.center:
            encoder = np.hstack([encoder, np.full((T, 1), 1.0 / T)])
            decoder = np.vstack([decoder, np.ones((1, T))])
        self.encoder_, self.decoder_ = encoder, decoder
        self.spectral_floor_ = spectral_floor(G, self.n_atoms)
        return self

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {**super().state_arrays(), "eigenvalues": self.eigenvalues_}

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any], decoder: np.ndarray) -> None:
        super().load_state(arrays, scalars, decoder)
        self.eigenvalues_ = arrays.get("eigenvalues")

    def report(self) -> dict[str, Any]:
        kept = float(self.explained_variance_ratio_[: self.n_atoms].sum())
        return {"explained_energy": kept, "spectral_floor": self.spectral_floor_}
