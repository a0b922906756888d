"""Export a task-level composition (one ``[K, P]`` coefficient table) as an edited model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tvbasis.arithmetic.export import edit_model
from tvbasis.errors import TvbasisError
from tvbasis.store.format import Store


def vector_coefficients(to_vectors: np.ndarray, block_of: Mapping[str, int], z: np.ndarray) -> dict[str, np.ndarray]:
    """Per tensor, the store-vector coefficients ``to_vectors @ z[:, block]`` of a ``[K, P]`` composition."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] != to_vectors.shape[1]:
        raise TvbasisError(f"coefficients must be [{to_vectors.shape[1]}, P], got {list(z.shape)}")
    by_block = [to_vectors @ z[:, p] for p in range(z.shape[1])]
    return {name: by_block[p] for name, p in block_of.items()}


def export_composition(
    base: str | Path,
    store: Store,
    to_vectors: np.ndarray,
    block_of: Mapping[str, int],
    z: np.ndarray,
    out: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``theta_0 + sum_{k,p} z[k, p] d_k[block p]`` with the base's layout, streamed from the store."""
    missing = [i.name for i in store.tensors if i.name not in block_of]
    if missing:
        raise TvbasisError(f"{store.path}: tensors {missing[:3]} have no block in the composition")
    per_tensor = vector_coefficients(to_vectors, block_of, z)
    zero = np.zeros(to_vectors.shape[0])
    return edit_model(base, store, zero, out, overwrite=overwrite, tensor_coefficients=per_tensor)
