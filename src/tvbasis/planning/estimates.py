"""Per-tensor error and byte estimates from a store's matrices alone (no checkpoint is read).

With ``X_n`` the ``(numel_n, T)`` task-vector rows of tensor ``n`` and ``G_n = X_n^T X_n``
(gathered by ``build --tensor-stats``):

- energy share: ``trace(G_n) / trace(G)``;
- the store's own global basis, restricted to tensor ``n``: linear atoms are ``S = V B``, so
  the tasks' residual there is ``X_n (I - B W)`` and its energy ``tr(E^T G_n E)`` with
  ``E = I - B W`` (exact, for the atoms before rounding to the store dtype);
- a per-tensor PCA basis with ``M`` atoms: the best rank-M approximation of ``X_n``, whose
  residual energy is the sum of the eigenvalues of ``G_n`` beyond the top ``M``.

Relative errors are residual energy over ``trace(G_n)`` (squared Frobenius norms over all
tasks). Bytes are payload bytes (atom values and int8 scales, coefficients), priced with
``tvbasis.codes.nbytes``; file headers are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tvbasis.codes import nbytes, parse_code
from tvbasis.codes.core import row_view_shape
from tvbasis.errors import TvbasisError
from tvbasis.store.format import Store
from tvbasis.store.quantize import is_quantized

#: Bytes of one coefficient: the store keeps its decoder in float64.
COEFFICIENT_BYTES = 8


# -- plain functions over arrays --------------------------------------------------------------
def energy_shares(tensor_grams: Sequence[np.ndarray], gram: np.ndarray) -> np.ndarray:
    """``trace(G_n) / trace(G)`` for every tensor (0 where ``G`` is all zero)."""
    total = float(np.trace(gram))
    traces = np.array([float(np.trace(g)) for g in tensor_grams])
    return traces / total if total > 0 else np.zeros_like(traces)


def basis_residual_energy(tensor_gram: np.ndarray, encoder: np.ndarray, decoder: np.ndarray) -> float:
    """``||X_n - X_n B W||_F^2 = tr(E^T G_n E)``, ``E = I - B W``: the residual energy of the
    linear basis ``S = V B`` with coefficients ``W`` on one tensor (``encoder`` (T, K) over
    all the store's tasks, ``decoder`` (K, T))."""
    E = np.eye(tensor_gram.shape[0]) - encoder @ decoder
    # E^T G_n E directly rather than expanded: no cancellation when the residual is small
    return max(float(np.sum(E * (tensor_gram @ E))), 0.0)


def pca_tail_energy(tensor_gram: np.ndarray, n_atoms: int) -> float:
    """The sum of the eigenvalues of ``G_n`` beyond the top ``n_atoms``: the residual energy of
    the best ``n_atoms``-atom basis of this tensor alone (its truncated SVD)."""
    lam = np.clip(np.linalg.eigvalsh((tensor_gram + tensor_gram.T) / 2)[::-1], 0.0, None)
    return float(lam[n_atoms:].sum())


def atom_bytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes one atom takes on a tensor of ``shape`` in a store of ``dtype`` (int8 stores keep
    1-D and 0-D tensors in float32, as ``store/quantize.py`` does)."""
    shape = tuple(int(s) for s in shape)
    if dtype == "int8" and not is_quantized(dtype, shape):
        dtype = "fp32"
    return nbytes(parse_code(dtype), shape)


def coefficient_bytes(n_atoms: int, n_tasks: int) -> int:
    """``n_atoms x n_tasks`` coefficients, float64 as in the store's decoder."""
    return n_atoms * n_tasks * COEFFICIENT_BYTES


def _relative(energy: float, trace: float) -> float:
    return energy / trace if trace > 0 else 0.0


# -- a store --------------------------------------------------------------------------------
@dataclass
class TensorEstimate:
    """One tensor's share of the energy, and the error and bytes of each candidate basis."""

    name: str
    shape: tuple[int, ...]
    energy_share: float
    basis_rel_error: float  # the store's global basis, restricted to this tensor
    basis_bytes: int  # the store's K vectors on this tensor (coefficients are shared: see totals)
    pca_rel_error: dict[int, float] = field(default_factory=dict)  # M -> per-tensor PCA error
    pca_bytes: dict[int, int] = field(default_factory=dict)  # M -> M atoms + M x T coefficients
    #: Mean over tasks of the share of rows the task changes (None: the store has no row counts).
    rows_changed: float | None = None


@dataclass
class StoreEstimates:
    """``tvbasis plan``'s figures for one store."""

    store: str
    method: str
    dtype: str
    n_tasks: int
    n_vectors: int
    atoms: list[int]
    tensors: list[TensorEstimate]
    total_basis_rel_error: float
    total_basis_bytes: int  # atoms on every tensor + the K x T coefficients
    total_pca_rel_error: dict[int, float]
    total_pca_bytes: dict[int, int]
    original_fp32: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "method": self.method,
            "atom_dtype": self.dtype,
            "T": self.n_tasks,
            "K": self.n_vectors,
            "atoms": self.atoms,
            "original_fp32": self.original_fp32,
            "note": "global-basis errors are of the atoms before rounding to the store dtype"
            if self.dtype != "fp32"
            else "",
            "tensors": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "energy_share": t.energy_share,
                    "rows_changed": t.rows_changed,
                    "store_basis": {"rel_error": t.basis_rel_error, "bytes": t.basis_bytes},
                    "per_tensor_pca": {
                        str(m): {"rel_error": t.pca_rel_error[m], "bytes": t.pca_bytes[m]} for m in self.atoms
                    },
                }
                for t in self.tensors
            ],
            "total": {
                "store_basis": {"rel_error": self.total_basis_rel_error, "bytes": self.total_basis_bytes},
                "per_tensor_pca": {
                    str(m): {"rel_error": self.total_pca_rel_error[m], "bytes": self.total_pca_bytes[m]}
                    for m in self.atoms
                },
            },
        }


def store_encoder(store: Store) -> np.ndarray:
    """The store's encoder ``B`` as a (T, K) matrix over its current tasks (rows of tasks the
    atoms were not fitted on are zero); refuses methods whose atoms are not ``V B``."""
    method = store.method
    encoder = getattr(method, "encoder_", None)
    if encoder is None:
        raise TvbasisError(
            f"{store.path}: the {method.name} basis is not linear in the task vectors "
            f"(no encoder S = V B), so its per-tensor error cannot be computed from Gram matrices"
        )
    fitted = store.manifest.get("fitted_tasks", store.task_names)
    names = store.task_names
    gone = [n for n in fitted if n not in names]
    if gone:
        raise TvbasisError(
            f"{store.path}: the atoms were fitted on task {gone[0]!r}, which the store no longer has, "
            f"so their error cannot be computed from its Gram matrices; refit first"
        )
    full = np.zeros((store.n_tasks, encoder.shape[1]))
    for i, name in enumerate(fitted):
        full[names.index(name)] = encoder[i]
    return full


def estimate_store(store: Store, atoms: Sequence[int] = ()) -> StoreEstimates:
    """Per-tensor figures of ``store`` for per-tensor PCA bases of each M in ``atoms``
    (default: the store's own M), from its stored matrices only."""
    grams = store.tensor_grams
    if grams is None:
        raise TvbasisError(f"{store.path}: the store has no per-tensor Gram matrices; build it with --tensor-stats")
    encoder = store_encoder(store)
    T = store.n_tasks
    ms = sorted(set(atoms)) or [store.n_atoms]
    for m in ms:
        if not 1 <= m <= T:
            raise TvbasisError(f"--atoms {m}: must be between 1 and the number of tasks T = {T}")
    if not all(np.isfinite(g).all() for g in grams.values()):
        raise TvbasisError(
            f"{store.path}: its per-tensor Gram matrices are incomplete (tasks were added without the "
            f"other tasks' inputs); refit the store first"
        )
    dtype = store.manifest["atoms"]["dtype"]
    K = store.decoder.shape[0]
    total_trace = float(np.trace(store.gram))
    shares = energy_shares(list(grams.values()), store.gram)
    tensors: list[TensorEstimate] = []
    basis_energy = 0.0
    pca_energy = dict.fromkeys(ms, 0.0)
    counts = store.tensor_nonzero_rows
    for (name, g), share in zip(grams.items(), shares, strict=True):
        shape = store.shape_of(name)
        trace = float(np.trace(g))
        resid = basis_residual_energy(g, encoder, store.decoder)
        basis_energy += resid
        est = TensorEstimate(name, shape, float(share), _relative(resid, trace), K * atom_bytes(shape, dtype))
        if counts is not None:
            est.rows_changed = float(np.mean(counts[name])) / row_view_shape(tuple(shape))[0]
        for m in ms:
            tail = pca_tail_energy(g, m)
            pca_energy[m] += tail
            est.pca_rel_error[m] = _relative(tail, trace)
            est.pca_bytes[m] = m * atom_bytes(shape, dtype) + coefficient_bytes(m, T)
        tensors.append(est)
    return StoreEstimates(
        store=str(store.path),
        method=store.manifest["method"]["name"],
        dtype=dtype,
        n_tasks=T,
        n_vectors=K,
        atoms=ms,
        tensors=tensors,
        total_basis_rel_error=_relative(basis_energy, total_trace),
        total_basis_bytes=sum(t.basis_bytes for t in tensors) + coefficient_bytes(K, T),
        total_pca_rel_error={m: _relative(pca_energy[m], total_trace) for m in ms},
        total_pca_bytes={m: sum(t.pca_bytes[m] for t in tensors) for m in ms},
        original_fp32=int(store.manifest["dim"]) * T * 4,
    )
