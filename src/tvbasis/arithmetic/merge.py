"""Interference-aware merges of the task vectors a store reconstructs: TIES and DARE.

The merged vectors are the store's reconstructions ``tau_hat_t = S W[:, t]`` (plus the mean)
of the tasks with a non-zero weight ``a_t``, each multiplied by its weight first, so a
negated task enters as ``-tau_hat_t``. Everything streams: a chunk holds the K stored
vectors' rows and the selected reconstructions of one tensor's rows, never more.

- **ties** (Yadav et al., 2023): per task keep the ``density`` share of entries largest in
  magnitude over the *whole* task vector (the threshold is found in streaming passes before
  the merge: the log-spaced histogram of ``methods.cluster``, then finer passes over the
  boundary bin until the threshold is the exact k-th largest magnitude), elect each entry's
  sign as the sign of the sum of the trimmed values, and average the trimmed values that agree
  with it (disjoint mean). A negated task is trimmed like the task and votes with its sign
  flipped: where it loses the election its entries are dropped, so a negation merged with
  other tasks is only applied where it wins; one negated task alone is ``-tau_hat`` trimmed.
- **dare** (Yu et al., 2024): drop each entry of each task with probability ``drop_rate``,
  rescale the survivors by ``1 / (1 - drop_rate)`` and add the tasks. The mask of task t is
  regenerated from (seed, tensor name, task name, block of entries), like the random basis'
  directions, so it does not depend on the chunking.
- **dare-ties**: DARE's drop and rescale, then TIES' sign election and disjoint mean (no trim).

The merged delta is multiplied by ``scale``. The result does not depend on ``chunk_elements``:
reconstructions are summed atom by atom in a fixed order, thresholds are global per task,
and masks are keyed by entry index.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tvbasis.engine.streaming import DEFAULT_CHUNK_ELEMENTS
from tvbasis.errors import TvbasisError
from tvbasis.methods.cluster import _HIST_BINS, bin_floor, magnitude_histogram, threshold_bins, ties_merge
from tvbasis.methods.random import RANDOM_BLOCK
from tvbasis.progress import progress
from tvbasis.store.format import Store
from tvbasis.tasks.taskvectors import Chunk, plan_chunks

MERGES = ("ties", "dare", "dare-ties")

#: A task's boundary values are collected (and sorted) once at most this many remain.
_COLLECT = 1 << 20
#: Linear sub-bins of a boundary interval too full to collect.
_SUBBINS = 4096
#: Refinement passes after the histogram; then the interval's lower edge is the threshold.
_MAX_REFINE = 6


def check_merge_options(density: float, drop_rate: float, seed: int) -> None:
    """Refuse a density outside (0, 1], a drop rate outside [0, 1) or a negative seed."""
    if not 0 < density <= 1:
        raise TvbasisError(f"--density {density}: must be in (0, 1]")
    if not 0 <= drop_rate < 1:
        raise TvbasisError(f"--drop-rate {drop_rate}: must be in [0, 1)")
    if seed < 0:
        raise TvbasisError(f"--seed {seed}: must be 0 or more")


@dataclass(frozen=True, eq=False)
class MergeSpec:
    """What to merge: ``method`` over the tasks with non-zero ``weights`` (one per store task), times ``scale``."""

    method: str
    weights: np.ndarray = field(repr=False)
    scale: float = 1.0
    density: float = 0.2
    drop_rate: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in MERGES:
            raise TvbasisError(f"--merge {self.method!r}: choose none, {', '.join(MERGES)}")
        check_merge_options(self.density, self.drop_rate, self.seed)
        if not math.isfinite(self.scale):
            raise TvbasisError(f"--scale {self.scale}: must be a finite number")
        w = np.asarray(self.weights, dtype=np.float64)
        if w.ndim != 1 or not np.all(np.isfinite(w)):
            raise TvbasisError("merge weights: expected one finite weight per task")
        if not np.any(w):
            raise TvbasisError("nothing to merge: every task weight is 0 (give --add, --add-all or --negate)")
        object.__setattr__(self, "weights", w)


def keep_count(density: float, n_entries: int) -> int:
    """Entries TIES keeps per task: ``ceil(density * n)``, at least 1 (float noise in the product ignored)."""
    return min(n_entries, max(1, math.ceil(density * n_entries * (1 - 1e-12))))


def reconstructed_rows(atom_rows: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``atom_rows @ coefficients`` summed atom by atom in a fixed order.

    ``atom_rows`` is ``(numel, K)``, ``coefficients`` ``(K, n)``; elementwise products and sums
    give every entry bit for bit the same value whatever rows share the chunk (a BLAS product
    need not), which the exact thresholds and chunk-size invariance rely on.
    """
    out = atom_rows[:, :1] * coefficients[0]
    for k in range(1, coefficients.shape[0]):
        out += atom_rows[:, k : k + 1] * coefficients[k]
    return out


def ties_merge_rows(X: torch.Tensor, thresholds: torch.Tensor | np.ndarray) -> torch.Tensor:
    """TIES on a chunk ``X`` (numel, n): trim ``|x| < thresholds[t]``, elect sign, disjoint mean; ``(numel,)``."""
    thr = thresholds if isinstance(thresholds, torch.Tensor) else torch.from_numpy(np.asarray(thresholds))
    return ties_merge(X, thr.to(X.dtype))


def dare_keep(seed: int, tensor: str, task: str, start: int, stop: int, drop_rate: float) -> torch.Tensor:
    """DARE's keep mask for entries ``start:stop`` of one task's flattened tensor (bool, ``stop - start``)."""
    keys = [seed, zlib.crc32(tensor.encode("utf-8")), zlib.crc32(task.encode("utf-8"))]
    parts = []
    for block in range(start // RANDOM_BLOCK, (stop - 1) // RANDOM_BLOCK + 1):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*keys, block])))
        lo, hi = block * RANDOM_BLOCK, (block + 1) * RANDOM_BLOCK
        keep = rng.random(RANDOM_BLOCK) >= drop_rate
        parts.append(keep[max(start, lo) - lo : min(stop, hi) - lo])
    return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])


def dare_rows(X: torch.Tensor, drop_rate: float, seed: int, chunk: Chunk, tasks: Sequence[str]) -> torch.Tensor:
    """DARE on a chunk ``X`` (numel, n) of ``chunk``'s rows: drop with ``drop_rate``, rescale the rest (numel, n)."""
    if drop_rate == 0 or X.shape[0] == 0:
        return X
    start = chunk.start * chunk.row_numel
    masks = [dare_keep(seed, chunk.tensor, task, start, start + X.shape[0], drop_rate) for task in tasks]
    return torch.where(torch.stack(masks, dim=1), X / (1.0 - drop_rate), torch.zeros((), dtype=X.dtype))


def _boundary_pass(
    store: Store,
    coefficients: torch.Tensor,
    chunks: Sequence[Chunk],
    lo: np.ndarray,
    hi: np.ndarray,
    active: list[int],
    collect: dict[int, bool],
) -> tuple[np.ndarray, dict[int, torch.Tensor], dict[int, tuple[torch.Tensor, np.ndarray]]]:
    """One streaming pass: per active task, entries ``>= hi``, and those in ``[lo, hi)`` collected or binned."""
    above = np.zeros(len(lo), dtype=np.int64)
    parts: dict[int, list[torch.Tensor]] = {t: [] for t in active if collect[t]}
    binned: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
    for t in active:
        if not collect[t]:
            edges = np.linspace(lo[t], hi[t], _SUBBINS + 1)
            edges[0], edges[-1] = lo[t], hi[t]
            binned[t] = (torch.zeros(_SUBBINS, dtype=torch.int64), np.maximum.accumulate(edges))
    with progress(sum(c.numel for c in chunks), "TIES thresholds", unit="param") as bar:
        for chunk in chunks:
            mag = reconstructed_rows(store.vector_rows(chunk), coefficients).abs()
            for t in active:
                m = mag[:, t]
                above[t] += int((m >= hi[t]).sum())
                inside = m[(m >= lo[t]) & (m < hi[t])]
                if collect[t]:
                    parts[t].append(inside.clone())
                else:
                    counts, edges = binned[t]
                    sub = torch.bucketize(inside, torch.from_numpy(edges), right=True) - 1
                    counts += torch.bincount(sub.clamp(0, _SUBBINS - 1), minlength=_SUBBINS)
            bar.update(chunk.numel)
    values = {t: torch.cat(p) if p else torch.zeros(0, dtype=torch.float64) for t, p in parts.items()}
    return above, values, binned


def ties_thresholds(
    store: Store,
    coefficients: torch.Tensor,
    density: float,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    exact: bool = True,
) -> np.ndarray:
    """Per selected task, the magnitude TIES trims below: the ``keep_count``-th largest ``|tau_hat_t|``.

    ``coefficients`` is ``(K, n)`` (decoder columns times weights). One pass gathers the
    histogram of ``methods.cluster``; with ``exact`` further passes narrow the boundary bin
    (linear sub-bins, then the values themselves) to the exact order statistic. Ties at the
    threshold are all kept. Without ``exact``, the boundary bin's lower edge (as the cluster
    method does). Counts are exact integers and entries bit-stable, so no chunking changes it.
    """
    chunks = plan_chunks(store.tensors, chunk_elements)
    k = keep_count(density, sum(i.numel for i in store.tensors))
    n = coefficients.shape[1]
    hist = torch.zeros((n, _HIST_BINS + 1), dtype=torch.int64)
    with progress(sum(c.numel for c in chunks), "TIES thresholds", unit="param") as bar:
        for chunk in chunks:
            hist += magnitude_histogram(reconstructed_rows(store.vector_rows(chunk), coefficients))
            bar.update(chunk.numel)
    counts = hist.numpy()
    bins = threshold_bins(counts, np.full(n, k))
    thr = bin_floor(bins)
    thr[counts[:, 1:].sum(axis=1) < k] = 0.0  # fewer non-zero entries than kept: keep them all
    if not exact:
        return thr
    # The log binning may misplace a value by rounding at an edge, so take a bin either side.
    lo = np.where(bins >= 2, bin_floor(np.maximum(bins - 1, 1)), 0.0)
    hi = np.where(bins + 2 <= _HIST_BINS, bin_floor(np.minimum(bins + 2, _HIST_BINS)), np.inf)
    expected = np.array([counts[t, max(bins[t] - 1, 0) : bins[t] + 2].sum() for t in range(n)])
    top = (thr > 0) & ~np.isfinite(hi)  # magnitudes past 2^47: the bin's edge will do
    thr[top] = lo[top]
    active = [t for t in range(n) if thr[t] > 0 and not top[t]]
    for _ in range(_MAX_REFINE):
        if not active:
            break
        collect = {t: bool(expected[t] <= _COLLECT) for t in active}
        above, values, binned = _boundary_pass(store, coefficients, chunks, lo, hi, active, collect)
        still = []
        for t in active:
            need = k - int(above[t])
            if collect[t]:
                inside = torch.sort(values[t], descending=True).values
                thr[t] = float(inside[need - 1]) if 0 < need <= len(inside) else lo[t]
                continue
            sub, edges = binned[t]
            from_top = np.cumsum(sub.numpy()[::-1])[::-1]  # in-interval entries in sub-bins >= j
            ok = np.nonzero(from_top >= need)[0]
            if need <= 0 or not ok.size:  # cannot happen with consistent counts; keep the safe side
                thr[t] = lo[t]
                continue
            j = int(ok[-1])
            new_lo, new_hi = float(edges[j]), float(edges[j + 1])
            if new_lo >= new_hi or (new_lo, new_hi) == (lo[t], hi[t]):
                thr[t] = new_lo  # a run of equal magnitudes: keep them all
                continue
            lo[t], hi[t], expected[t] = new_lo, new_hi, int(sub[j])
            thr[t] = new_lo
            still.append(t)
        active = still
    return thr


class TaskMerger:
    """A merge prepared on a store: the selected tasks, their weighted decoder columns, TIES thresholds."""

    def __init__(self, store: Store, spec: MergeSpec, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        if spec.weights.shape != (store.n_tasks,):
            raise TvbasisError(f"expected {store.n_tasks} task weights, got shape {spec.weights.shape}")
        if store.residuals is not None:
            raise TvbasisError(
                f"{store.path}: --merge {spec.method} works on a basis-only store; this one codes residuals "
                f"per task (plain addition, negation and reconstruction work on it)"
            )
        self.store = store
        self.spec = spec
        self.tasks = [int(t) for t in np.nonzero(spec.weights)[0]]
        self.task_names = [store.task_names[t] for t in self.tasks]
        self.coefficients = torch.from_numpy(
            np.ascontiguousarray(store.decoder[:, self.tasks] * spec.weights[self.tasks])
        )
        self.thresholds: np.ndarray | None = None
        if spec.method == "ties":
            self.thresholds = ties_thresholds(store, self.coefficients, spec.density, chunk_elements)

    def task_rows(self, chunk: Chunk) -> torch.Tensor:
        """The weighted reconstructions ``a_t tau_hat_t`` of the selected tasks on ``chunk``: ``(numel, n)``."""
        return reconstructed_rows(self.store.vector_rows(chunk), self.coefficients)

    def rows(self, chunk: Chunk) -> torch.Tensor:
        """``scale * merged delta`` on ``chunk``'s rows, flat float64."""
        X = self.task_rows(chunk)
        spec = self.spec
        if spec.method == "ties":
            assert self.thresholds is not None
            merged = ties_merge_rows(X, self.thresholds)
        else:
            X = dare_rows(X, spec.drop_rate, spec.seed, chunk, self.task_names)
            merged = X.sum(dim=1) if spec.method == "dare" else ties_merge_rows(X, np.zeros(X.shape[1]))
        return spec.scale * merged


def iter_merged(
    store: Store, spec: MergeSpec, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(tensor name, rows)`` of ``scale * merge(a_t tau_hat_t)`` (float64, shaped like the tensor's rows)."""
    merger = TaskMerger(store, spec, chunk_elements)
    for chunk in plan_chunks(store.tensors, chunk_elements):
        shape = store.shape_of(chunk.tensor)
        yield chunk.tensor, merger.rows(chunk).reshape((chunk.stop - chunk.start, *shape[1:]) if shape else ())


def merged_state(
    store: Store,
    spec: MergeSpec,
    dtype: torch.dtype = torch.float32,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """The merged delta as an in-memory state dict (one model's worth of tensors), like ``combination_state``."""
    parts: dict[str, list[torch.Tensor]] = {}
    for name, rows in iter_merged(store, spec, chunk_elements):
        parts.setdefault(name, []).append(rows.to(dtype))
    return {n: torch.cat(p) if p[0].dim() else p[0] for n, p in parts.items()}
