"""Reconstruction quality from inner products alone, without another pass over the data.

With ``tau_hat_t = S w_t``: ``||tau_t - tau_hat_t||^2 = G_tt - 2 w_t^T (S^T V)_t + w_t^T (S^T S) w_t``
and ``<tau_t, tau_hat_t> = w_t^T (S^T V)_t``.
"""

from __future__ import annotations

import numpy as np


def reconstruction_metrics(
    gram: np.ndarray, atom_gram: np.ndarray, atom_cross: np.ndarray, decoder: np.ndarray
) -> dict[str, np.ndarray]:
    """Per task: squared norm, relative error ``||tau - tau_hat|| / ||tau||`` and cosine."""
    sq = np.diag(gram).copy()
    inner = np.einsum("kt,kt->t", decoder, atom_cross)
    hat_sq = np.einsum("kt,kl,lt->t", decoder, atom_gram, decoder)
    err_sq = np.clip(sq - 2 * inner + hat_sq, 0.0, None)
    safe = np.where(sq > 0, sq, 1.0)
    rel = np.where(sq > 0, np.sqrt(err_sq / safe), np.sqrt(err_sq))
    denom = np.sqrt(sq * np.clip(hat_sq, 0.0, None))
    cos = np.where(denom > 0, inner / np.where(denom > 0, denom, 1.0), 0.0)
    return {"sq_norm": sq, "rel_error": rel, "cosine": np.clip(cos, -1.0, 1.0)}
