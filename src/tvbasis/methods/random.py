"""Random basis: M Gaussian directions, orthonormalised, regenerated from the seed.

The atoms are never stored. Each tensor's rows come from generators seeded by
(seed, tensor name, block), in fixed blocks of the flattened tensor so that any chunking
regenerates the same numbers. ``Q = R (R^T R)^{-1/2}`` has orthonormal columns; the
decoder is ``W = Q^T V``. Both ``R^T R`` and ``R^T V`` are gathered in the Gram pass, so the
whole build is one pass. The store holds only the seed, the M x M orthonormaliser and W.
A lower baseline, not a product default.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from tvbasis.errors import TvbasisError
from tvbasis.methods.base import BasisMethod
from tvbasis.tasks.taskvectors import Chunk

#: Random numbers are drawn in blocks of this many entries of a flattened tensor.
RANDOM_BLOCK = 1 << 16


def gaussian_rows(seed: int, tensor: str, start: int, stop: int, n_atoms: int) -> torch.Tensor:
    """Entries ``start:stop`` of a tensor's flattened random directions, ``(stop - start, M)``."""
    key = zlib.crc32(tensor.encode("utf-8"))
    parts = []
    first, last = start // RANDOM_BLOCK, (stop - 1) // RANDOM_BLOCK
    for block in range(first, last + 1):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, key, block])))
        lo, hi = block * RANDOM_BLOCK, (block + 1) * RANDOM_BLOCK
        values = rng.standard_normal((RANDOM_BLOCK, n_atoms))
        parts.append(values[max(start, lo) - lo : min(stop, hi) - lo])
    return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])


class RandomBasis(BasisMethod):
    name = "random"
    stores_atoms = False
    observes = True

    def __init__(self, n_atoms: int, seed: int = 0) -> None:
        super().__init__(n_atoms, seed)
        self._pgram: torch.Tensor | None = None
        self._pcross: torch.Tensor | None = None

    def directions(self, chunk: Chunk) -> torch.Tensor:
        """The raw Gaussian rows ``R`` for one chunk."""
        start = chunk.start * chunk.row_numel
        stop = max(chunk.stop * chunk.row_numel, start + 1) if chunk.row_numel else start + 1
        return gaussian_rows(self.seed, chunk.tensor, start, stop, self.n_atoms)

    def observe(self, chunk: Chunk, X: torch.Tensor) -> None:
        R = self.directions(chunk)
        pg, pc = R.T @ R, R.T @ X
        self._pgram = pg if self._pgram is None else self._pgram + pg
        self._pcross = pc if self._pcross is None else self._pcross + pc

    def fit(self, gram: np.ndarray) -> RandomBasis:
        self.check_n_tasks(gram.shape[0])
        if self._pgram is None or self._pcross is None:
            raise RuntimeError("random: fit needs the Gram pass to call observe on every chunk")
        evals, U = np.linalg.eigh(self._pgram.numpy())
        if evals.min() <= 1e-12 * max(evals.max(), 1e-300):
            raise TvbasisError(f"-M {self.n_atoms}: more random directions than the task vectors have entries")
        self.orthonormalizer_ = (U / np.sqrt(evals)) @ U.T  # (R^T R)^{-1/2}
        self.decoder_ = self.orthonormalizer_ @ self._pcross.numpy()  # Q^T V, K symmetric
        self._pgram = self._pcross = None
        return self

    def atom_rows(self, chunk: Chunk, X: torch.Tensor | None = None) -> torch.Tensor:
        return self.directions(chunk) @ torch.from_numpy(self.orthonormalizer_)

    def atom_stats(self, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``S^T S`` and ``S^T V`` of the regenerated atoms: the identity and the decoder."""
        return np.eye(self.n_atoms), self.decoder_

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"orthonormalizer": self.orthonormalizer_}

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any], decoder: np.ndarray) -> None:
        super().load_state(arrays, scalars, decoder)
        self.orthonormalizer_ = arrays["orthonormalizer"]
