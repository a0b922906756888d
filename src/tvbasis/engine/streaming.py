"""Passes over the data, chunk by chunk.

A pass visits every selected tensor in rows of at most ``chunk_elements`` entries and holds
only those rows of the base, the T task vectors and the atoms at a time:

- the Gram pass accumulates ``G = V^T V`` in float64 (``G += X^T X`` per chunk ``X``),
  checks every value is finite, hashes the inputs' bytes and lets the basis method observe
  each chunk (the random basis gathers ``R^T R`` and ``R^T V`` there, TIES its histograms);
- the atom pass computes each chunk's atoms from its task-vector rows, hands them to a
  writer, and accumulates ``S^T S`` and ``S^T V`` of the atoms *as stored* (after the cast
  to the store dtype), so reported errors are the errors of what is on disk.

Because every statistic is a sum over rows, results do not depend on the chunk size
(beyond floating-point summation order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tvbasis.errors import TvbasisError
from tvbasis.progress import progress
from tvbasis.tasks.taskvectors import Chunk, TaskVectorSet, plan_chunks

DEFAULT_CHUNK_ELEMENTS = 1 << 20

#: ``observe(chunk, X)`` sees each chunk's task-vector rows during the Gram pass.
Observer = Callable[[Chunk, torch.Tensor], None]
#: ``atoms(chunk, X) -> (numel, K)`` atom rows computed from the task-vector rows ``X``.
AtomFunction = Callable[[Chunk, torch.Tensor], torch.Tensor]
#: ``sink(chunk, S) -> S_stored`` writes atom rows and returns them as stored (float64).
AtomSink = Callable[[Chunk, torch.Tensor], torch.Tensor]


@dataclass
class GramStats:
    """What one pass over the task vectors learns."""

    gram: np.ndarray  # (T, T) float64
    base_sha256: str
    task_sha256: list[str]


@dataclass
class AtomStats:
    """Inner products of the atoms as stored: ``S^T S`` (K, K) and ``S^T V`` (K, T)."""

    atom_gram: np.ndarray
    atom_cross: np.ndarray


def _check_finite(tvs: TaskVectorSet, chunk: Chunk, col_sq: torch.Tensor) -> None:
    bad = [t for t in range(tvs.n_tasks) if not torch.isfinite(col_sq[t])]
    if bad:
        names = ", ".join(repr(tvs.task_names[t]) for t in bad)
        files = ", ".join(str(tvs.sources[t].path) for t in bad)
        raise TvbasisError(
            f"tensor {chunk.tensor!r} has NaN or Inf values in the task vector of {names} "
            f"({files} minus base {tvs.base.path})"
        )


def gram_pass(
    tvs: TaskVectorSet,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    observe: Observer | None = None,
    hash_inputs: bool = True,
) -> GramStats:
    """Stream all task vectors once; return ``G`` and the inputs' content hashes."""
    chunks = plan_chunks(tvs.tensors, chunk_elements)
    T = tvs.n_tasks
    gram = torch.zeros((T, T), dtype=torch.float64)
    hashers = [hashlib.sha256() for _ in range(T + 1)] if hash_inputs else None
    with progress(tvs.dim * (T + 1), "Gram pass", unit="param") as bar:
        for chunk in chunks:
            X = tvs.read_chunk(chunk, hashers)
            update = X.T @ X
            _check_finite(tvs, chunk, torch.diagonal(update))
            gram += update
            if observe is not None:
                observe(chunk, X)
            bar.update(chunk.numel * (T + 1))
    gram = (gram + gram.T) / 2  # exact symmetry for the eigensolvers
    return GramStats(
        gram=gram.numpy(),
        base_sha256=hashers[0].hexdigest() if hashers else "",
        task_sha256=[h.hexdigest() for h in hashers[1:]] if hashers else [],
    )


def atom_pass(
    tvs: TaskVectorSet, atoms: AtomFunction, sink: AtomSink, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> AtomStats:
    """Stream all task vectors again, computing, storing and measuring the atoms chunk by chunk."""
    chunks = plan_chunks(tvs.tensors, chunk_elements)
    T = tvs.n_tasks
    ss: torch.Tensor | None = None
    sv: torch.Tensor | None = None
    with progress(tvs.dim * (T + 1), "Atom pass", unit="param") as bar:
        for chunk in chunks:
            X = tvs.read_chunk(chunk)
            stored = sink(chunk, atoms(chunk, X))
            ss = stored.T @ stored if ss is None else ss + stored.T @ stored
            sv = stored.T @ X if sv is None else sv + stored.T @ X
            bar.update(chunk.numel * (T + 1))
    assert ss is not None and sv is not None
    return AtomStats(atom_gram=((ss + ss.T) / 2).numpy(), atom_cross=sv.numpy())
