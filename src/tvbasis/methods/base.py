"""The one small interface every basis method implements.

A method is an estimator in the scikit-learn sense: settings go to ``__init__``, ``fit``
learns attributes whose names end in ``_``. It sees the data only through the Gram matrix
``G`` (and, if it asks, through ``observe`` during the Gram pass), so fitting costs
``O(T^3)`` however large the models are.

After fitting, a method describes ``K`` stored vectors (its ``M`` atoms, plus the mean for
centred PCA) and a decoder ``decoder_`` of shape ``(K, T)``: task ``t`` is reconstructed as
``sum_k atom_k * decoder_[k, t]``. ``atom_rows`` computes the atoms' rows for one chunk
from the task-vector rows ``X`` (``V B`` for the linear methods).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from tvbasis.errors import TvbasisError
from tvbasis.tasks.taskvectors import Chunk


def least_squares_decoder(atom_gram: np.ndarray, atom_cross: np.ndarray) -> np.ndarray:
    """``W = (S^T S)^+ S^T V``: the best coefficients for fixed atoms, from inner products alone."""
    return np.linalg.pinv(atom_gram, hermitian=True) @ atom_cross


class BasisMethod(ABC):
    """A basis method: settings in ``__init__``, ``fit(G)`` learns the encoder and decoder."""

    name: ClassVar[str]
    #: Whether the atoms are written to the store (False: regenerated from the seed).
    stores_atoms: ClassVar[bool] = True
    #: Whether ``observe`` must see every chunk of the Gram pass.
    observes: ClassVar[bool] = False
    #: Whether the decoder is refitted by least squares on the atoms as stored.
    decoder_from_atoms: ClassVar[bool] = False
    #: The fewest atoms the method accepts (pca: 0, a store of coded residuals alone).
    min_atoms: ClassVar[int] = 1

    def __init__(self, n_atoms: int, seed: int = 0) -> None:
        self.n_atoms = int(n_atoms)
        self.seed = int(seed)
        self.encoder_: np.ndarray | None = None  # (T, K): atoms = V @ encoder_
        self.decoder_: np.ndarray | None = None  # (K, T)
        self.has_mean_ = False  # the last stored vector is the mean task vector

    # -- settings ---------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Every setting, as given to ``__init__`` (JSON-serialisable)."""
        return {"n_atoms": self.n_atoms, "seed": self.seed}

    def check_n_tasks(self, n_tasks: int) -> None:
        if not self.min_atoms <= self.n_atoms <= n_tasks:
            raise TvbasisError(
                f"-M {self.n_atoms}: must be between {self.min_atoms} and the number of tasks T = {n_tasks}"
            )

    # -- fitting ----------------------------------------------------------------------
    def observe(self, chunk: Chunk, X: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """See one chunk of the Gram pass (only called when ``observes`` is True)."""

    @abstractmethod
    def fit(self, gram: np.ndarray) -> BasisMethod:
        """Learn ``encoder_`` and ``decoder_`` from the ``(T, T)`` Gram matrix."""

    def fit_decoder(self, atom_gram: np.ndarray, atom_cross: np.ndarray) -> None:
        """Refit ``decoder_`` from the stored atoms' statistics (``decoder_from_atoms`` methods)."""
        self.decoder_ = least_squares_decoder(atom_gram, atom_cross)

    # -- atoms ------------------------------------------------------------------------
    @property
    def n_vectors(self) -> int:
        """K: the stored vectors, i.e. the atoms plus the mean if there is one."""
        return self.n_atoms + int(self.has_mean_)

    def atom_rows(self, chunk: Chunk, X: torch.Tensor | None) -> torch.Tensor:
        """Rows of all K vectors for ``chunk`` (``X``: the chunk's ``(numel, T)`` task-vector rows)."""
        if self.encoder_ is None or X is None:
            raise RuntimeError(f"{self.name}: atoms need the fitted encoder and the task vectors")
        # (B^T X^T)^T: contiguous atom columns, and 2-4x faster than X @ B for a tall, column-major X
        encoder_t = torch.from_numpy(np.ascontiguousarray(self.encoder_.T)).to(X.dtype)
        return (encoder_t @ X.T).T

    def atom_stats(self, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``S^T S`` and ``S^T V`` of the atoms in exact arithmetic, from ``G`` alone, or None
        when only the atoms themselves can tell (atoms that are not linear in ``V``).

        Linear atoms ``S = V B`` have ``S^T S = B^T G B`` and ``S^T V = B^T G``.
        """
        if self.encoder_ is None:
            return None
        B = self.encoder_
        atom_gram = B.T @ gram @ B
        return (atom_gram + atom_gram.T) / 2, B.T @ gram

    # -- persistence ------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Fitted arrays to save beside the decoder (the encoder, A, eigenvalues, ...)."""
        return {} if self.encoder_ is None else {"encoder": self.encoder_}

    def state_scalars(self) -> dict[str, Any]:
        """Fitted scalars and lists to save in the manifest."""
        return {"has_mean": self.has_mean_}

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any], decoder: np.ndarray) -> None:
        """Restore what ``state_arrays``/``state_scalars`` saved."""
        self.encoder_ = arrays.get("encoder")
        self.decoder_ = decoder
        self.has_mean_ = bool(scalars.get("has_mean", False))

    def report(self) -> dict[str, Any]:
        """Fit diagnostics to show the user (loss, spectral floor, ...)."""
        return {}


def spectral_floor(gram: np.ndarray, n_atoms: int) -> float:
    """``sum_{i>M} lambda_i(G) / T^2``: the lowest loss any rank-M linear map can reach."""
    lam = np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)
    T = gram.shape[0]
    return float(lam[n_atoms:].sum() / T**2)
