"""The K weight directions a composition moves along: a store's task vectors or its atoms.

Both come from a store, so the fine-tunes are never needed: ``over="tasks"`` gives the T task
vectors as the store reconstructs them (exact for a store with M = T, e.g. ``--method pca -M T``),
``over="atoms"`` its M stored vectors. ``to_vectors`` maps coefficients on the directions to
coefficients on the store's vectors, which is how a task-level composition is exported as an
edited model (:func:`tvbasis.composition.export.export_composition`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tvbasis.errors import TvbasisError
from tvbasis.store.format import Store
from tvbasis.tasks.taskvectors import plan_chunks

OVER = ("tasks", "atoms")


@dataclass
class Directions:
    """``tensors[name]`` is ``[K, *shape]`` float32, direction k along axis 0 (names: the base file's)."""

    over: str
    labels: list[str]
    tensors: dict[str, torch.Tensor]
    to_vectors: np.ndarray  # [n_store_vectors, K]
    store_path: Path

    @property
    def k(self) -> int:
        return len(self.labels)


def load_directions(store: Store, over: str = "tasks", only: list[str] | None = None) -> Directions:
    """Read the directions tensor by tensor from ``store`` (all of them held: K models' worth of floats)."""
    if over not in OVER:
        raise TvbasisError(f"--over {over!r}: choose tasks or atoms")
    n_vectors = store.n_atoms + int(store.has_mean)
    if over == "tasks":
        to_vectors = np.asarray(store.decoder, dtype=np.float64)  # [n_vectors, T]
        labels = list(store.task_names)
    else:
        to_vectors = np.eye(n_vectors)
        labels = [f"atom{k}" for k in range(store.n_atoms)] + (["mean"] if store.has_mean else [])
    if only is not None:
        missing = [n for n in only if n not in labels]
        if missing:
            raise TvbasisError(f"{store.path}: no {over[:-1]} {missing[0]!r} (have {', '.join(labels)})")
        idx = [labels.index(n) for n in only]
        to_vectors, labels = to_vectors[:, idx], list(only)
    else:
        idx = list(range(len(labels)))
    mix = torch.from_numpy(to_vectors)
    parts: dict[str, list[torch.Tensor]] = {}
    for chunk in plan_chunks(store.tensors, 1 << 24):
        if over == "tasks" and store.residuals is not None:
            rows = store.task_columns(chunk, idx)  # the tasks' reconstructions, coded residuals included
        else:
            rows = store.vector_rows(chunk) @ mix  # [numel, K] float64
        parts.setdefault(chunk.tensor, []).append(rows.T.to(torch.float32))
    tensors = {
        name: torch.cat(p, dim=1).reshape(len(labels), *store.shape_of(name)).contiguous() for name, p in parts.items()
    }
    return Directions(over, labels, tensors, to_vectors, store.path)


def low_rank_factors(
    tensors: dict[str, torch.Tensor], rank: int, skip: set[str] | None = None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Rank-``rank`` factors ``(U [K, out, r], V [K, r, in])`` of every 2-D direction, and the energy lost.

    The loss is ``sum ||d - U V||^2 / sum ||d||^2`` over the factored tensors. Tensors in ``skip``
    (embedding tables: a gather costs nothing, so they stay exact) are not factored.
    """
    if rank < 1:
        raise TvbasisError(f"--rank {rank}: must be at least 1")
    skip = skip or set()
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    lost = total = 0.0
    for name, d in tensors.items():
        if d.dim() != 3 or name in skip or rank >= min(d.shape[1:]):
            continue
        u, s, vh = torch.linalg.svd(d.to(torch.float64), full_matrices=False)
        factors[name] = (
            (u[:, :, :rank] * s[:, None, :rank]).to(torch.float32).contiguous(),
            vh[:, :rank, :].to(torch.float32).contiguous(),
        )
        total += float((s**2).sum())
        lost += float((s[:, rank:] ** 2).sum())
    return factors, (lost / total if total else 0.0)
