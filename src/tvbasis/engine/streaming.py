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

Memory and speed: a pass reuses the same buffers for every chunk (fresh large allocations
cost page faults on every chunk), caps a chunk at about ``WORKING_SET_ENTRIES / T`` entries
per task so the memory it holds does not grow with T, and hashes in a background thread
(``hashlib`` releases the GIL) while the main thread converts and multiplies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from tvbasis.errors import TvbasisError
from tvbasis.progress import progress
from tvbasis.tasks.taskvectors import Chunk, TaskVectorSet, plan_chunks, raw_bytes

DEFAULT_CHUNK_ELEMENTS = 1 << 20
#: A pass holds the rows of all T tasks for about this many entries at a time (8 MiB in float64).
WORKING_SET_ENTRIES = 1 << 20
#: ...but never fewer than this many entries per task per chunk.
MIN_CHUNK_ELEMENTS = 1 << 14

#: ``observe(chunk, X)`` sees each chunk's task-vector rows during the Gram pass (``X`` is
#: only valid during the call: its memory is reused for the next chunk).
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


def pass_chunk_elements(chunk_elements: int, n_tasks: int) -> int:
    """Entries per task in one chunk of a pass: at most ``chunk_elements`` and at most about
    ``WORKING_SET_ENTRIES / T`` (a power of two, at least ``MIN_CHUNK_ELEMENTS``)."""
    cap = 1 << max(0, (WORKING_SET_ENTRIES // max(n_tasks, 1)).bit_length() - 1)
    return min(chunk_elements, max(cap, MIN_CHUNK_ELEMENTS))


class _Buffers:
    """Memory a pass reuses for every chunk: raw bytes per checkpoint, float64 task-vector rows."""

    def __init__(self, tvs: TaskVectorSet, chunks: Sequence[Chunk], raw_sets: int) -> None:
        numel = max((c.numel for c in chunks), default=0)
        sizes = [max(ckpt.info(i.name).dtype.itemsize for i in tvs.tensors) for ckpt in [tvs.base, *tvs.checkpoints]]
        self.raw = [[torch.empty(numel * size, dtype=torch.uint8) for size in sizes] for _ in range(raw_sets)]
        self.x = torch.empty(tvs.n_tasks * numel, dtype=torch.float64)


def _check_finite(tvs: TaskVectorSet, chunk: Chunk, col_sq: np.ndarray) -> None:
    bad = [t for t in range(tvs.n_tasks) if not np.isfinite(col_sq[t])]
    if bad:
        names = ", ".join(repr(tvs.task_names[t]) for t in bad)
        files = ", ".join(str(tvs.sources[t].path) for t in bad)
        raise TvbasisError(
            f"tensor {chunk.tensor!r} has NaN or Inf values in the task vector of {names} "
            f"({files} minus base {tvs.base.path})"
        )


def _update_hashes(hashers: Sequence[hashlib._Hash], rows: Sequence[torch.Tensor]) -> None:
    for hasher, r in zip(hashers, rows, strict=True):
        hasher.update(raw_bytes(r))


def gram_pass(
    tvs: TaskVectorSet,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    observe: Observer | None = None,
    hash_inputs: bool = True,
) -> GramStats:
    """Stream all task vectors once; return ``G`` and the inputs' content hashes."""
    T = tvs.n_tasks
    chunks = plan_chunks(tvs.tensors, pass_chunk_elements(chunk_elements, T))
    gram = np.zeros((T, T), dtype=np.float64)
    hashers = [hashlib.sha256() for _ in range(T + 1)] if hash_inputs else None
    # With hashing, two sets of raw buffers: one is hashed while the next chunk is read.
    buffers = _Buffers(tvs, chunks, raw_sets=2 if hashers else 1)
    hashing: list[Future[None] | None] = [None] * len(buffers.raw)
    with (
        progress(tvs.dim * (T + 1), "Gram pass", unit="param") as bar,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="tvbasis-hash") as pool,
    ):
        for i, chunk in enumerate(chunks):
            k = i % len(buffers.raw)
            if (job := hashing[k]) is not None:
                job.result()  # the hashes of the chunk read into this buffer are done
            rows = tvs.read_rows(chunk, buffers.raw[k])
            if hashers is not None:
                hashing[k] = pool.submit(_update_hashes, hashers, rows)
            X = tvs.task_rows(rows, buffers.x)
            Xt = X.T.numpy()  # (T, numel), contiguous: X^T X is one symmetric rank-k update
            update = Xt @ Xt.T
            _check_finite(tvs, chunk, np.diagonal(update))
            gram += update
            if observe is not None:
                observe(chunk, X)
            bar.update(chunk.numel * (T + 1))
        for job in hashing:
            if job is not None:
                job.result()
    gram = (gram + gram.T) / 2  # exact symmetry for the eigensolvers
    return GramStats(
        gram=gram,
        base_sha256=hashers[0].hexdigest() if hashers else "",
        task_sha256=[h.hexdigest() for h in hashers[1:]] if hashers else [],
    )


def atom_pass(
    tvs: TaskVectorSet, atoms: AtomFunction, sink: AtomSink, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> AtomStats:
    """Stream all task vectors again, computing, storing and measuring the atoms chunk by chunk."""
    T = tvs.n_tasks
    chunks = plan_chunks(tvs.tensors, pass_chunk_elements(chunk_elements, T))
    buffers = _Buffers(tvs, chunks, raw_sets=1)
    ss: np.ndarray | None = None
    sv: np.ndarray | None = None
    with progress(tvs.dim * (T + 1), "Atom pass", unit="param") as bar:
        for chunk in chunks:
            X = tvs.task_rows(tvs.read_rows(chunk, buffers.raw[0]), buffers.x)
            stored = sink(chunk, atoms(chunk, X)).to(torch.float64).numpy()
            s_s, s_v = stored.T @ stored, stored.T @ X.numpy()
            ss = s_s if ss is None else ss + s_s
            sv = s_v if sv is None else sv + s_v
            bar.update(chunk.numel * (T + 1))
    assert ss is not None and sv is not None
    return AtomStats(atom_gram=(ss + ss.T) / 2, atom_cross=sv)
