"""Cluster basis: group the tasks into M clusters and merge each group into one atom.

Tasks are clustered on the cosine similarity that ``G`` gives (agglomerative, average
linkage on ``1 - cos``, or spectral on ``max(cos, 0)``). An atom merges its group: the mean
by default, or TIES-style (keep each task's largest-magnitude ``density`` share of entries,
elect a sign per entry, average the entries that agree). The decoder is least squares on
the atoms as stored.

TIES trims by a per-task magnitude threshold over the whole task vector. It is found from
a log-spaced histogram of ``|tau_t|`` gathered in the Gram pass (exact integer counts, so
the threshold does not depend on the chunking).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tvbasis.errors import TvbasisError
from tvbasis.methods.base import BasisMethod, least_squares_decoder
from tvbasis.tasks.taskvectors import Chunk

# Histogram of log2|x| in steps of 1/16 octave over [2^-80, 2^48).
_HIST_RES = 16
_HIST_LO, _HIST_HI = -80, 48
_HIST_BINS = (_HIST_HI - _HIST_LO) * _HIST_RES


def cosine_matrix(gram: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.clip(np.diag(gram), 1e-300, None))
    return np.clip(gram / np.outer(norms, norms), -1.0, 1.0)


def agglomerative_labels(cos: np.ndarray, n_clusters: int) -> np.ndarray:
    dist = 1.0 - cos
    np.fill_diagonal(dist, 0.0)
    from scipy.cluster.hierarchy import cut_tree, linkage  # imported here: 0.2 s every build would pay
    from scipy.spatial.distance import squareform

    Z = linkage(squareform(np.clip((dist + dist.T) / 2, 0.0, None), checks=False), method="average")
    return cut_tree(Z, n_clusters=n_clusters).ravel()


def spectral_labels(cos: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    T = cos.shape[0]
    affinity = np.clip(cos, 0.0, None)
    deg = affinity.sum(1)
    d = 1.0 / np.sqrt(np.clip(deg, 1e-12, None))
    lap = np.eye(T) - d[:, None] * affinity * d[None, :]
    _, vecs = np.linalg.eigh(lap)
    emb = vecs[:, :n_clusters]
    emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    from scipy.cluster.vq import kmeans2

    _, labels = kmeans2(emb, n_clusters, minit="++", seed=seed)
    # k-means may leave a cluster empty: give it the task farthest from its own centroid.
    for k in range(n_clusters):
        if not np.any(labels == k):
            sizes = np.bincount(labels, minlength=n_clusters)
            movable = [t for t in range(T) if sizes[labels[t]] > 1]
            cents = np.stack([emb[labels == j].mean(0) if sizes[j] else emb[0] for j in range(n_clusters)])
            far = max(movable, key=lambda t: np.linalg.norm(emb[t] - cents[labels[t]]))
            labels[far] = k
    return labels


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters in order of their first task, so labels do not depend on the solver."""
    order = {old: new for new, old in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[x] for x in labels.tolist()], dtype=np.int64)


def magnitude_histogram(X: torch.Tensor) -> torch.Tensor:
    """Exact counts of ``|X|`` per column in the log-spaced bins, ``(n, _HIST_BINS + 1)`` int64.

    Bin 0 holds exact zeros and anything below the range; bin ``b >= 1`` starts at ``bin_floor(b)``.
    """
    T = X.shape[1]
    hist = torch.zeros((T, _HIST_BINS + 1), dtype=torch.int64)
    mag = X.abs()
    idx = torch.floor((torch.log2(mag.clamp(min=2.0**_HIST_LO)) - _HIST_LO) * _HIST_RES).long() + 1
    idx = torch.where(mag > 0, idx.clamp(1, _HIST_BINS), torch.zeros_like(idx))
    for t in range(T):
        hist[t] += torch.bincount(idx[:, t], minlength=_HIST_BINS + 1)
    return hist


def bin_floor(bins: np.ndarray) -> np.ndarray:
    """Lower edges of histogram bins ``b >= 1`` (Python's ``pow``, one bin at a time)."""
    return np.asarray([2.0 ** (_HIST_LO + (int(b) - 1) / _HIST_RES) for b in np.ravel(bins)], dtype=np.float64)


def threshold_bins(hist: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per row, the highest non-zero bin ``b`` with at least ``keep`` entries in bins ``>= b`` (1 if none)."""
    out = []
    for counts, k in zip(hist, np.broadcast_to(keep, (len(hist),)), strict=True):
        above = np.cumsum(counts[::-1])[::-1]  # above[b] = entries in bins >= b
        ok = np.nonzero(above[1:] >= k)[0]  # non-zero bins only
        out.append((ok[-1] + 1) if ok.size else 1)
    return np.asarray(out, dtype=np.int64)


def ties_merge(X: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """TIES merge of the columns of ``X`` (numel, n): trim below ``thresholds``, elect sign, disjoint mean."""
    trimmed = torch.where(X.abs() >= thresholds, X, torch.zeros((), dtype=X.dtype))
    sign = torch.sign(trimmed.sum(dim=1, keepdim=True))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(dim=1).clamp(min=1)
    return (trimmed * agree).sum(dim=1) / count


class Cluster(BasisMethod):
    name = "cluster"
    decoder_from_atoms = True

    def __init__(
        self, n_atoms: int, algorithm: str = "agglomerative", merge: str = "mean", density: float = 0.2, seed: int = 0
    ) -> None:
        super().__init__(n_atoms, seed)
        if algorithm not in ("agglomerative", "spectral"):
            raise TvbasisError(f"--cluster-algorithm {algorithm!r}: choose agglomerative or spectral")
        if merge not in ("mean", "ties"):
            raise TvbasisError(f"--cluster-merge {merge!r}: choose mean or ties")
        if not 0 < density <= 1:
            raise TvbasisError(f"--density {density}: must be in (0, 1]")
        self.algorithm = algorithm
        self.merge = merge
        self.density = float(density)
        self._hist: torch.Tensor | None = None

    @property
    def observes(self) -> bool:  # type: ignore[override]
        return self.merge == "ties"

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "algorithm": self.algorithm, "merge": self.merge, "density": self.density}

    def observe(self, chunk: Chunk, X: torch.Tensor) -> None:
        hist = magnitude_histogram(X)
        self._hist = hist if self._hist is None else self._hist + hist

    def _thresholds(self) -> np.ndarray:
        assert self._hist is not None
        hist = self._hist.numpy()
        return bin_floor(threshold_bins(hist, self.density * hist.sum(axis=1)))

    def fit(self, gram: np.ndarray) -> Cluster:
        T = gram.shape[0]
        self.check_n_tasks(T)
        cos = cosine_matrix(gram)
        if self.n_atoms == T:
            labels = np.arange(T)
        elif self.n_atoms == 1:
            labels = np.zeros(T, dtype=np.int64)
        elif self.algorithm == "agglomerative":
            labels = agglomerative_labels(cos, self.n_atoms)
        else:
            labels = spectral_labels(cos, self.n_atoms, self.seed)
        self.labels_ = canonical_labels(np.asarray(labels))
        B = np.zeros((T, self.n_atoms))
        for t, k in enumerate(self.labels_):
            B[t, k] = 1.0
        B /= B.sum(0, keepdims=True)
        if self.merge == "mean":
            self.encoder_ = B
            self.decoder_ = least_squares_decoder(B.T @ gram @ B, B.T @ gram)
        else:
            self.encoder_ = None
            self.thresholds_ = self._thresholds()
            self._hist = None
        return self

    def atom_rows(self, chunk: Chunk, X: torch.Tensor | None) -> torch.Tensor:
        if self.merge == "mean":
            return super().atom_rows(chunk, X)
        assert X is not None
        thr = torch.from_numpy(self.thresholds_)
        cols = []
        for k in range(self.n_atoms):
            members = np.nonzero(self.labels_ == k)[0]
            cols.append(ties_merge(X[:, members], thr[members]))
        return torch.stack(cols, dim=1)

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = super().state_arrays()
        if self.merge == "ties":
            out["thresholds"] = self.thresholds_
        return out

    def state_scalars(self) -> dict[str, Any]:
        return {**super().state_scalars(), "labels": [int(x) for x in self.labels_]}

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any], decoder: np.ndarray) -> None:
        super().load_state(arrays, scalars, decoder)
        self.labels_ = np.asarray(scalars.get("labels", []), dtype=np.int64)
        if "thresholds" in arrays:
            self.thresholds_ = arrays["thresholds"]
