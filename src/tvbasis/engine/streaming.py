"""Passes over the data, chunk by chunk.

A pass visits every selected tensor in rows of at most ``chunk_elements`` entries and holds
only those rows of the base, the T task vectors and the atoms at a time:

- the Gram pass accumulates ``G = V^T V`` in float64 (``G += X^T X`` per chunk ``X``),
  checks every value is finite, hashes the inputs' bytes and lets the basis method observe
  each chunk (the random basis gathers ``R^T R`` and ``R^T V`` there, TIES its histograms);
  on request (``tensor_stats``) it also keeps each tensor's own ``G_n = X_n^T X_n`` from the
  same per-chunk products (``sum_n G_n = G``), the statistics the planner reads;
- the atom pass computes each chunk's atoms from its task-vector rows and hands them to a
  writer. Where the atoms' inner products are not known exactly from ``G`` (atoms stored in
  fp16/bf16, or not linear in ``V``), it also accumulates ``S^T S`` and ``S^T V`` of the
  atoms *as stored* (after the cast to the store dtype), so reported errors are the errors
  of what is on disk.

Because every statistic is a sum over rows, results do not depend on the chunk size
(beyond floating-point summation order).

LoRA tasks (``tvbasis.io.lora``) come as factors ``delta = left @ right`` per tensor. The Gram
pass takes the inner products between two of them from the factors, once per tensor
(:func:`low_rank_gram`: ``O(r1 r2 (rows + cols))`` instead of ``O(rows cols)``, and exactly
independent of the chunk size); between a LoRA task and a full fine-tune it materialises the
LoRA task's rows chunk by chunk, and only then (see ``gram_sum``). The atom pass and the
observers always see materialised rows.

Memory and speed: a pass reuses the same buffers for every chunk (fresh large allocations
cost page faults on every chunk), caps a chunk at about ``WORKING_SET_ENTRIES / T`` entries
per task so the memory it holds does not grow with T, and overlaps its stages on threads
(reading, hashing and converting beside the Gram products; reading, computing and storing
or measuring in the atom pass). Products run
in torch on one thread each: per-chunk products and copies are small, and waking a thread
pool for each costs more than it saves (far more when other processes hold the cores).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
import torch

from tvbasis.codes.core import row_view_shape
from tvbasis.errors import TvbasisError
from tvbasis.io.hashing import ContentHash
from tvbasis.io.lora import LowRank
from tvbasis.io.writer import tensor_bytes
from tvbasis.progress import progress
from tvbasis.tasks.taskvectors import (
    PARTITION_ELEMENTS,
    Chunk,
    LoraRows,
    TaskRows,
    TaskVectorSet,
    plan_chunks,
    plan_partitions,
)
from tvbasis.threads import single_torch_thread

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

_L = TypeVar("_L")


@dataclass
class GramStats:
    """What one pass over the task vectors learns."""

    gram: np.ndarray  # (T, T) float64
    base_hash: str  # content hashes (``tvbasis.io.hashing``) of the base's and each task's tensors
    task_hashes: list[str]
    #: With ``tensor_stats``: ``G_n = X_n^T X_n`` (T, T) float64 of every tensor, in layout order.
    tensor_grams: dict[str, np.ndarray] | None = None
    #: With ``tensor_stats``: per tensor, each task's count of rows that are not all zero (T,)
    #: int64 (rows as the codes see them: a 1-D tensor is one row). None where the pass did not
    #: see the tasks' rows (only LoRA tasks: their Gram comes from the factors).
    nonzero_rows: dict[str, np.ndarray] | None = None
    #: With ``tensor_stats`` where the rows were read (as ``nonzero_rows``): per tensor, the
    #: tasks' mean squared norm of each row (rows,) float64, which shapes the planner's
    #: per-tensor output sensitivity (``planning.sensitivity``).
    row_energy: dict[str, np.ndarray] | None = None


@dataclass
class AtomStats:
    """Inner products of the atoms as stored: ``S^T S`` (K, K) and ``S^T V`` (K, T); optionally
    also of the atoms before rounding to the store dtype (``unrounded``: the same pair)."""

    atom_gram: np.ndarray
    atom_cross: np.ndarray
    unrounded: tuple[np.ndarray, np.ndarray] | None = None


def pass_chunk_elements(chunk_elements: int, n_tasks: int) -> int:
    """Entries per task in one chunk of a pass: at most ``chunk_elements`` and at most about
    ``WORKING_SET_ENTRIES / T`` (a power of two, at least ``MIN_CHUNK_ELEMENTS``)."""
    cap = 1 << max(0, (WORKING_SET_ENTRIES // max(n_tasks, 1)).bit_length() - 1)
    return min(chunk_elements, max(cap, MIN_CHUNK_ELEMENTS))


class _Buffers:
    """Memory a pass reuses for every chunk: raw bytes per checkpoint, task-vector rows."""

    def __init__(
        self, tvs: TaskVectorSet, chunks: Sequence[Chunk], x_sets: int = 1, x_dtype: torch.dtype = torch.float64
    ) -> None:
        numel = max((c.numel for c in chunks), default=0)
        sizes = [
            0 if ckpt is None else max(ckpt.info(i.name).dtype.itemsize for i in tvs.tensors)
            for ckpt in [tvs.base, *tvs.checkpoints]
        ]  # LoRA tasks (no checkpoint) are read as whole factors, not into buffers
        self.raw = [[torch.empty(numel * size, dtype=torch.uint8) for size in sizes]]
        self.x = [torch.empty(tvs.n_tasks * numel, dtype=x_dtype) for _ in range(x_sets)]


def _worker(name: str) -> ThreadPoolExecutor:
    """One worker thread for a pass stage; torch runs single-threaded there too (OpenMP's
    thread count is a per-thread setting, so a new thread would otherwise start a team of its own)."""
    return ThreadPoolExecutor(
        max_workers=1, thread_name_prefix=f"tvbasis-{name}", initializer=torch.set_num_threads, initargs=(1,)
    )


def _check_finite(tvs: TaskVectorSet, chunk: Chunk, col_sq: np.ndarray) -> None:
    bad = [t for t in range(tvs.n_tasks) if not np.isfinite(col_sq[t])]
    if bad:
        names = ", ".join(repr(tvs.task_names[t]) for t in bad)
        files = ", ".join(str(tvs.sources[t].path) for t in bad)
        raise TvbasisError(
            f"tensor {chunk.tensor!r} has NaN or Inf values in the task vector of {names} "
            f"({files} minus base {tvs.base.path})"
        )


class _Prefetch(Generic[_L]):
    """Runs ``load(i)`` for the chunks, in order, on one worker thread, up to ``slots - 1`` ahead.

    ``load(i)`` fills buffer slot ``i % slots``. If the consumer handed over a future for the
    slot's previous chunk (``release_when``), loading waits for it first, so a slot is reused
    only once its last user is done.
    """

    def __init__(self, n: int, load: Callable[[int], _L], slots: int, pool: ThreadPoolExecutor) -> None:
        self._n, self._load, self._slots, self._pool = n, load, slots, pool
        self._pending: deque[Future[_L]] = deque()
        self._released: list[Future[None] | None] = [None] * slots
        self._next = 0
        for _ in range(slots - 1):
            self._submit()

    def _submit(self) -> None:
        if self._next < self._n:
            i, self._next = self._next, self._next + 1
            release = self._released[i % self._slots]
            self._pending.append(self._pool.submit(self._run, i, release))

    def _run(self, i: int, release: Future[None] | None) -> _L:
        if release is not None:
            release.result()
        return self._load(i)

    def get(self) -> _L:
        """The next chunk's load result; starts loading the one ``slots - 1`` further on."""
        result = self._pending.popleft().result()
        self._submit()
        return result

    def release_when(self, i: int, done: Future[None]) -> None:
        """Chunk ``i``'s slot is free once ``done`` completes."""
        self._released[i % self._slots] = done

    def wait_released(self) -> None:
        """Wait until every slot's last user is done (and raise its error, if any)."""
        for done in self._released:
            if done is not None:
                done.result()

    def cancel(self) -> None:
        for job in self._pending:
            job.cancel()


def partition_ends(tvs: TaskVectorSet, partition_elements: int = PARTITION_ELEMENTS) -> set[str]:
    """The tensors that end a partition (``plan_partitions``): where partial sums are added up."""
    return {part[-1] for part in plan_partitions(tvs.tensors, partition_elements)}


def gram_sum(
    tvs: TaskVectorSet,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    observe: Observer | None = None,
    hashers: Sequence[ContentHash] | None = None,
    partition_elements: int = PARTITION_ELEMENTS,
    tensor_grams: dict[str, np.ndarray] | None = None,
    nonzero_rows: dict[str, np.ndarray] | None = None,
    row_energy: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """``V^T V`` over ``tvs``' tensors, unsymmetrised: per-partition sums added in order.

    ``hashers`` (base first, then each task) are fed every input's bytes. A worker of the
    distributed engine calls this on one partition; :func:`gram_pass` on all of them.
    A worker thread reads, hashes and converts the chunks, in order, while this one
    accumulates the products. ``tensor_grams``, if given, receives each tensor's own
    ``X_n^T X_n`` (unsymmetrised) from the same per-chunk products: no extra read, and a
    tensor never spans two partitions, so every engine gets the same bits. ``nonzero_rows``, if
    given, receives each tensor's count of nonzero rows per task, and ``row_energy`` the tasks'
    mean squared norm of each of its rows (when the rows are read).
    """
    T = tvs.n_tasks
    chunks = plan_chunks(tvs.tensors, pass_chunk_elements(chunk_elements, T))
    ends = partition_ends(tvs, partition_elements)
    gram = np.zeros((T, T), dtype=np.float64)
    partial = np.zeros((T, T), dtype=np.float64)
    per_tensor = np.zeros((T, T), dtype=np.float64) if tensor_grams is not None else None
    buffers = _Buffers(tvs, chunks, x_sets=2)
    dense, lora = tvs.dense_tasks, tvs.lora_tasks
    # A LoRA task's rows are materialised only where a full fine-tune needs them (their inner
    # products) or an observer does. For <s B A, D> the factored form s * sum(B * (D A^T))
    # costs O(rows cols r) for every full fine-tune D, while materialising s B A costs
    # O(rows cols r) once and then O(rows cols) per full fine-tune in the product below: it is
    # never more expensive. Between two LoRA tasks the factors are used (low_rank_gram).
    need_rows = not lora or bool(dense) or observe is not None

    def load(i: int) -> tuple[torch.Tensor | None, list[LowRank | None] | None]:
        chunk = chunks[i]
        rows = tvs.read_rows(chunk, buffers.raw[0])
        _hash_rows(hashers, chunk, rows)
        X = tvs.task_rows(rows, buffers.x[i % 2]) if need_rows else None
        factors = None
        if lora and chunk.start == 0:  # once per tensor, from its whole factors
            factors = [r.factors if isinstance(r, LoraRows) else None for r in (rows[1 + t] for t in lora)]
        return X, factors

    with (
        progress(tvs.dim * (T + 1), "Gram pass", unit="param") as bar,
        single_torch_thread(),
        _worker("read") as pool,
    ):
        # Two row slots: chunk i + 1 is read into one while G takes chunk i from the other;
        # chunk i - 1, the slot's previous user, is done by then.
        reader = _Prefetch(len(chunks), load, slots=2, pool=pool)
        try:
            for chunk in chunks:
                X, factors = reader.get()
                if not lora:
                    assert X is not None
                    Xt = X.T  # (T, numel), contiguous
                    update = (Xt @ Xt.T).numpy()
                else:
                    update = _mixed_update(T, dense, lora, X, factors)
                _check_finite(tvs, chunk, np.diagonal(update))
                partial += update
                if X is not None and (nonzero_rows is not None or row_energy is not None):
                    _row_stats(tvs, chunk, X, nonzero_rows, row_energy)
                if per_tensor is not None:
                    per_tensor += update
                    if chunk.last:
                        tensor_grams[chunk.tensor] = per_tensor.copy()  # type: ignore[index]
                        per_tensor[:] = 0.0
                if chunk.last and chunk.tensor in ends:
                    gram += partial
                    partial[:] = 0.0
                if observe is not None:
                    assert X is not None
                    observe(chunk, X)
                bar.update(chunk.numel * (T + 1))
        finally:
            reader.cancel()
    return gram


def _row_stats(
    tvs: TaskVectorSet,
    chunk: Chunk,
    X: torch.Tensor,
    counts: dict[str, np.ndarray] | None,
    energy: dict[str, np.ndarray] | None,
) -> None:
    """Add the chunk's nonzero rows per task to ``counts[chunk.tensor]`` (a 1-D tensor: 0 or 1)
    and its rows' squared norms, averaged over tasks, to ``energy[chunk.tensor]``."""
    T = X.shape[1]
    n_rows = chunk.stop - chunk.start
    shape = tvs.base.info(chunk.tensor).shape
    matrix = len(shape) >= 2
    rows = X.T.reshape(T, n_rows, chunk.row_numel)  # X.T is the contiguous one: a view, no copy
    if counts is not None:
        nonzero = rows.ne(0).any(dim=2)  # (T, rows)
        total = counts.setdefault(chunk.tensor, np.zeros(T, dtype=np.int64))
        if matrix:
            total += nonzero.sum(dim=1).numpy()
        else:
            np.maximum(total, nonzero.any(dim=1).numpy().astype(np.int64), out=total)
    if energy is not None:
        sq = torch.linalg.vector_norm(rows, dim=2).square_().sum(dim=0).numpy() / T  # (rows,)
        if matrix:
            per_row = energy.setdefault(chunk.tensor, np.zeros(shape[0]))
            per_row[chunk.start : chunk.stop] += sq
        else:  # a 1-D (or 0-D) tensor is one row, whatever the chunks
            per_row = energy.setdefault(chunk.tensor, np.zeros(1))
            per_row += sq.sum()


def _mixed_update(
    T: int, dense: list[int], lora: list[int], X: torch.Tensor | None, factors: list[LowRank | None] | None
) -> np.ndarray:
    """One chunk's ``X^T X`` when some tasks are LoRA: full fine-tunes' rows against all rows,
    LoRA against LoRA from the factors (``factors``: on a tensor's first chunk only)."""
    update = np.zeros((T, T), dtype=np.float64)
    if dense:
        assert X is not None
        Xt = X.T  # (T, numel)
        P = (Xt[dense] @ Xt.T).numpy()  # (T_dense, T)
        update[dense, :] = P
        update[np.ix_(lora, dense)] = P[:, lora].T
    if factors is not None:
        update[np.ix_(lora, lora)] += low_rank_gram(factors)
    return update


#: Total rank of the factors stacked for one block of ``low_rank_gram`` (its products are
#: at most this squared, 8 MiB in float64).
LOW_RANK_BLOCK = 1024


def low_rank_gram(factors: Sequence[LowRank | None]) -> np.ndarray:
    """``<d_i, d_j>_F`` for deltas ``d = left @ right`` given as factors (None: a zero delta).

    ``<L1 R1, L2 R2>_F = trace(R1^T L1^T L2 R2) = sum((L1^T L2) * (R1 R2^T))``: costs
    ``O(r1 r2 (rows + cols))`` per pair instead of ``O(rows cols)``, and no delta is formed.
    The factors of many tasks are stacked in blocks of total rank about ``LOW_RANK_BLOCK``, so
    a block pair is two matrix products and one elementwise product.
    """
    n = len(factors)
    out = np.zeros((n, n), dtype=np.float64)
    blocks: list[list[int]] = []
    size = LOW_RANK_BLOCK
    for i, f in enumerate(factors):
        if f is None:
            continue
        if size + f.rank > LOW_RANK_BLOCK and size > 0:
            blocks.append([])
            size = 0
        blocks[-1].append(i)
        size += f.rank

    def stacked(block: list[int]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        left = torch.cat([factors[i].left for i in block], dim=1)  # type: ignore[union-attr]
        right = torch.cat([factors[i].right for i in block], dim=0)  # type: ignore[union-attr]
        starts = np.cumsum([0] + [factors[i].rank for i in block[:-1]])  # type: ignore[union-attr]
        return left, right, starts

    for a, block_a in enumerate(blocks):
        left_a, right_a, starts_a = stacked(block_a)
        for block_b in blocks[a:]:
            left_b, right_b, starts_b = (left_a, right_a, starts_a) if block_b is block_a else stacked(block_b)
            prod = ((left_a.T @ left_b) * (right_a @ right_b.T)).numpy()
            sums = np.add.reduceat(np.add.reduceat(prod, starts_a, axis=0), starts_b, axis=1)
            out[np.ix_(block_a, block_b)] = sums
            out[np.ix_(block_b, block_a)] = sums.T
    return out


def gram_pass(
    tvs: TaskVectorSet,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    observe: Observer | None = None,
    hash_inputs: bool = True,
    partition_elements: int = PARTITION_ELEMENTS,
    tensor_stats: bool = False,
) -> GramStats:
    """Stream all task vectors once; return ``G`` and the inputs' content hashes (and, with
    ``tensor_stats``, every tensor's own Gram matrix ``G_n``, gathered in the same pass)."""
    hashers = [ContentHash() for _ in range(tvs.n_tasks + 1)] if hash_inputs else None
    per_tensor: dict[str, np.ndarray] | None = {} if tensor_stats else None
    counts: dict[str, np.ndarray] | None = {} if tensor_stats else None
    energy: dict[str, np.ndarray] | None = {} if tensor_stats else None
    gram = gram_sum(tvs, chunk_elements, observe, hashers, partition_elements, per_tensor, counts, energy)
    return GramStats(
        gram=symmetrised(gram),
        base_hash=hashers[0].hexdigest() if hashers else "",
        task_hashes=[h.hexdigest() for h in hashers[1:]] if hashers else [],
        tensor_grams=symmetrised_tensor_grams(tvs, per_tensor),
        nonzero_rows=layout_row_counts(tvs, counts),
        row_energy=layout_row_energy(tvs, energy),
    )


def symmetrised_tensor_grams(tvs: TaskVectorSet, raw: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    """The per-tensor sums in layout order, symmetrised like ``G``."""
    if raw is None:
        return None
    zero = np.zeros((tvs.n_tasks, tvs.n_tasks), dtype=np.float64)  # a tensor with no entries has no chunk
    return {i.name: symmetrised(raw.get(i.name, zero)) for i in tvs.tensors}


def layout_row_counts(tvs: TaskVectorSet, counts: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    """Every tensor's nonzero-row counts in layout order, or None if the pass did not count rows
    (it reads them unless every task is a LoRA adapter)."""
    if counts is None or (not tvs.dense_tasks and tvs.lora_tasks):
        return None
    zero = np.zeros(tvs.n_tasks, dtype=np.int64)  # a tensor with no entries has no chunk
    return {i.name: counts.get(i.name, zero) for i in tvs.tensors}


def layout_row_energy(tvs: TaskVectorSet, energy: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    """Every tensor's per-row energy in layout order, or None where the pass did not read the rows."""
    if energy is None or (not tvs.dense_tasks and tvs.lora_tasks):
        return None
    return {i.name: energy.get(i.name, np.zeros(row_view_shape(tuple(i.shape))[0])) for i in tvs.tensors}


def symmetrised(gram: np.ndarray) -> np.ndarray:
    """``(G + G^T) / 2``: exact symmetry for the eigensolvers."""
    return (gram + gram.T) / 2


def _hash_rows(hashers: Sequence[ContentHash] | None, chunk: Chunk, rows: Sequence[TaskRows]) -> None:
    """Feed each input's bytes; a LoRA task's factors (and the scale and orientation they are
    combined with) once per tensor, nothing for a tensor it leaves alone."""
    for hasher, r in zip(hashers or (), rows, strict=False):
        if isinstance(r, torch.Tensor):
            hasher.update(tensor_bytes(r))
        elif isinstance(r, LoraRows) and chunk.last:
            for part in r.factors.digest_parts:
                hasher.update(tensor_bytes(part) if isinstance(part, torch.Tensor) else part)
        if chunk.last:
            hasher.end_tensor()


class _AtomStats:
    """Running ``S^T S`` and ``S^T V``: per-partition sums added in chunk order."""

    def __init__(self, ends: set[str]) -> None:
        self.ends = ends
        self.ss: np.ndarray | None = None
        self.sv: np.ndarray | None = None
        self._ss: np.ndarray | None = None
        self._sv: np.ndarray | None = None

    def add(self, chunk: Chunk, S: torch.Tensor, X: torch.Tensor) -> None:
        S = S.to(torch.float64)
        s_s, s_v = (S.T @ S).numpy(), (S.T @ X).numpy()
        self._ss = s_s if self._ss is None else self._ss + s_s
        self._sv = s_v if self._sv is None else self._sv + s_v
        if chunk.last and chunk.tensor in self.ends:
            self.ss = self._ss if self.ss is None else self.ss + self._ss
            self.sv = self._sv if self.sv is None else self.sv + self._sv
            self._ss = self._sv = None

    def result(self) -> Sums:
        """The raw sums (``S^T S`` not yet symmetrised)."""
        assert self.ss is not None and self.sv is not None
        return self.ss, self.sv


#: Task-vector row buffers in the atom pass: one being read, one in use here, one in the finishing stage.
_ATOM_SLOTS = 3


#: Raw sums of the atom pass: ``S^T S`` (not yet symmetrised) and ``S^T V``.
Sums = tuple[np.ndarray, np.ndarray]


def atom_pass(
    tvs: TaskVectorSet,
    atoms: AtomFunction,
    sink: AtomSink,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    measure: bool = True,
    measure_unrounded: bool = False,
    hashers: Sequence[ContentHash] | None = None,
    partition_elements: int = PARTITION_ELEMENTS,
) -> AtomStats | None:
    """Stream all task vectors again, computing and storing the atoms chunk by chunk
    (see :func:`atom_sums`); the statistics of the atoms as stored, or None without ``measure``."""
    sums, unrounded = atom_sums(
        tvs, atoms, sink, chunk_elements, measure, measure_unrounded, hashers, partition_elements
    )
    return None if sums is None else atom_stats_from_sums(sums, unrounded)


def atom_sums(
    tvs: TaskVectorSet,
    atoms: AtomFunction,
    sink: AtomSink,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    measure: bool = True,
    measure_unrounded: bool = False,
    hashers: Sequence[ContentHash] | None = None,
    partition_elements: int = PARTITION_ELEMENTS,
) -> tuple[Sums | None, Sums | None]:
    """Stream all task vectors, computing and storing the atoms chunk by chunk; return the raw
    sums of the atoms as stored and unrounded (None where not measured).

    Three stages overlap, each taking the chunks in order: a worker thread reads and
    converts the rows; this thread computes the atoms (``atoms``); another worker either
    stores them (``sink``) or, with ``measure``, accumulates ``S^T S`` and ``S^T V`` of the
    atoms as stored (``sink`` then runs here). Without ``measure`` the rows are float32 (the
    atoms' own precision, and half the memory traffic) and the pass returns None: the
    caller knows those statistics exactly already (linear atoms ``S = V B`` stored in
    float32 have ``S^T S = B^T G B`` and ``S^T V = B^T G``). ``measure_unrounded`` also
    accumulates them for the atoms as computed, before ``sink`` rounds them. ``hashers``
    (base first, then each task) are fed the inputs' bytes, as in the Gram pass.
    """
    T = tvs.n_tasks
    chunks = plan_chunks(tvs.tensors, pass_chunk_elements(chunk_elements, T))
    row_dtype = torch.float64 if measure else torch.float32
    buffers = _Buffers(tvs, chunks, x_sets=_ATOM_SLOTS, x_dtype=row_dtype)
    ends = partition_ends(tvs, partition_elements)
    stats, unrounded = _AtomStats(ends), _AtomStats(ends)

    def measure_chunk(chunk: Chunk, stored: torch.Tensor, S: torch.Tensor, X: torch.Tensor) -> None:
        stats.add(chunk, stored, X)
        if measure_unrounded:
            unrounded.add(chunk, S, X)

    def load(i: int) -> torch.Tensor:
        rows = tvs.read_rows(chunks[i], buffers.raw[0])
        _hash_rows(hashers, chunks[i], rows)
        return tvs.task_rows(rows, buffers.x[i % _ATOM_SLOTS])

    with (
        progress(tvs.dim * (T + 1), "Atom pass", unit="param") as bar,
        single_torch_thread(),
        _worker("read") as pool,
        _worker("store" if not measure else "stats") as finisher,
    ):
        reader = _Prefetch(len(chunks), load, slots=_ATOM_SLOTS, pool=pool)
        try:
            for i, chunk in enumerate(chunks):
                X = reader.get()
                S = atoms(chunk, X)
                if measure:
                    job = finisher.submit(measure_chunk, chunk, sink(chunk, S), S, X)
                else:
                    job = finisher.submit(sink, chunk, S)
                # The rows' slot is refilled only after the job (which may read X or a view of
                # it) is done; this also keeps the finisher at most a few chunks behind.
                reader.release_when(i, job)
                bar.update(chunk.numel * (T + 1))
            reader.wait_released()
        finally:
            reader.cancel()
    if not measure:
        return None, None
    return stats.result(), unrounded.result() if measure_unrounded else None


def atom_stats_from_sums(sums: Sums, unrounded: Sums | None) -> AtomStats:
    """``AtomStats`` from the raw sums of the atom pass (``S^T S`` symmetrised here)."""
    raw = unrounded
    return AtomStats(symmetrised(sums[0]), sums[1], None if raw is None else (symmetrised(raw[0]), raw[1]))


class Engine(Protocol):
    """What runs the two passes: :class:`LocalEngine` or the distributed ``DaskEngine``."""

    def gram_pass(
        self,
        tvs: TaskVectorSet,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        observe: Observer | None = None,
        hash_inputs: bool = True,
        tensor_stats: bool = False,
    ) -> GramStats: ...

    def atom_pass(
        self,
        tvs: TaskVectorSet,
        atoms: AtomFunction,
        sink: AtomSink,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        measure: bool = True,
        measure_unrounded: bool = False,
        hashers: Sequence[ContentHash] | None = None,
    ) -> AtomStats | None: ...

    def close(self) -> None: ...


class LocalEngine:
    """The single-process engine (the default): the passes above, on this machine's threads."""

    def __init__(self, partition_elements: int = PARTITION_ELEMENTS) -> None:
        self.partition_elements = partition_elements

    def gram_pass(
        self,
        tvs: TaskVectorSet,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        observe: Observer | None = None,
        hash_inputs: bool = True,
        tensor_stats: bool = False,
    ) -> GramStats:
        return gram_pass(tvs, chunk_elements, observe, hash_inputs, self.partition_elements, tensor_stats)

    def atom_pass(
        self,
        tvs: TaskVectorSet,
        atoms: AtomFunction,
        sink: AtomSink,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        measure: bool = True,
        measure_unrounded: bool = False,
        hashers: Sequence[ContentHash] | None = None,
    ) -> AtomStats | None:
        return atom_pass(tvs, atoms, sink, chunk_elements, measure, measure_unrounded, hashers, self.partition_elements)

    def close(self) -> None:
        pass
