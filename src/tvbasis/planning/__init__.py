"""What a byte-budget planner reads: per-tensor statistics of a store, and the error and
bytes of candidate codes estimated from them (``tvbasis plan``). See docs/codes.md."""

from tvbasis.planning.estimates import (
    StoreEstimates,
    TensorEstimate,
    atom_bytes,
    basis_residual_energy,
    coefficient_bytes,
    energy_shares,
    estimate_store,
    pca_tail_energy,
)

__all__ = [
    "StoreEstimates",
    "TensorEstimate",
    "atom_bytes",
    "basis_residual_energy",
    "coefficient_bytes",
    "energy_shares",
    "estimate_store",
    "pca_tail_energy",
]
