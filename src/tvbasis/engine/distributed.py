"""The distributed engine: the Gram pass and the atom pass as map/reduce over partitions on Dask.

A partition is a run of consecutive tensors (``plan_partitions``; it depends on the tensor
layout only). Each worker opens the checkpoints itself, by path, and streams its partition
chunk by chunk with the local engine's code, so no tensor crosses the network: only the
small results do (a T x T partial Gram matrix, with ``tensor_stats`` also the T x T Gram
matrix of each of its tensors, per-tensor content digests, K x K and K x T partial atom
statistics). The atom files are created by the client and each worker writes
its rows at their places in them, so the workers need the output directory on a file
system they share with the client (one machine, or a network file system).

Partial sums come back in partition order and are added in that order, exactly as the
local engine adds its per-partition sums: both engines produce the same store, bit for bit.
LoRA adapter tasks need nothing special: a worker opens the adapter directory by its path,
and the chunk code it shares with the local engine reads each tensor's factors there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tvbasis.engine.streaming import (
    DEFAULT_CHUNK_ELEMENTS,
    AtomFunction,
    AtomSink,
    AtomStats,
    GramStats,
    Observer,
    Sums,
    atom_stats_from_sums,
    atom_sums,
    gram_sum,
    layout_row_counts,
    layout_row_energy,
    symmetrised,
    symmetrised_tensor_grams,
)
from tvbasis.errors import TvbasisError
from tvbasis.io.hashing import ContentHash, combine_digests
from tvbasis.progress import progress, set_quiet
from tvbasis.tasks.taskvectors import PARTITION_ELEMENTS, TaskSource, TaskVectorSet, plan_partitions

#: Per-tensor statistics of a partition (None where not gathered).
_PerTensor = dict[str, np.ndarray] | None


@dataclass(frozen=True)
class TaskVectorSpec:
    """What a worker needs to open the same task vectors: paths and the tensor selection."""

    base: Path  # or a UPath: workers open URLs themselves
    sources: tuple[TaskSource, ...]
    include: tuple[str, ...]
    exclude: tuple[str, ...]

    @classmethod
    def of(cls, tvs: TaskVectorSet) -> TaskVectorSpec:
        return cls(tvs.base.path, tuple(tvs.sources), tuple(tvs.include), tuple(tvs.exclude))

    def open(self, tensors: Sequence[str]) -> TaskVectorSet:
        return TaskVectorSet(self.base, self.sources, self.include, self.exclude, only=tensors)


def _gram_partition(
    spec: TaskVectorSpec, tensors: list[str], chunk_elements: int, partition_elements: int, tensor_stats: bool = False
) -> tuple[np.ndarray, list[list[bytes]], _PerTensor, _PerTensor, _PerTensor]:
    set_quiet(True)
    tvs = spec.open(tensors)
    hashers = [ContentHash() for _ in range(tvs.n_tasks + 1)]
    per_tensor: _PerTensor = {} if tensor_stats else None
    counts: _PerTensor = {} if tensor_stats else None
    energy: _PerTensor = {} if tensor_stats else None
    gram = gram_sum(tvs, chunk_elements, None, hashers, partition_elements, per_tensor, counts, energy)
    return gram, [h.digests for h in hashers], per_tensor, counts, energy


def _atom_partition(
    spec: TaskVectorSpec,
    tensors: list[str],
    atoms: AtomFunction,
    sink: AtomSink,
    chunk_elements: int,
    measure: bool,
    measure_unrounded: bool,
    hash_inputs: bool,
    partition_elements: int,
) -> tuple[Sums | None, Sums | None, list[list[bytes]]]:
    set_quiet(True)
    tvs = spec.open(tensors)
    hashers = [ContentHash() for _ in range(tvs.n_tasks + 1)] if hash_inputs else None
    try:
        sums, unrounded = atom_sums(
            tvs, atoms, sink, chunk_elements, measure, measure_unrounded, hashers, partition_elements
        )
    finally:
        close = getattr(sink, "close", None)
        if close is not None:
            close()
    return sums, unrounded, [h.digests for h in hashers] if hashers else []


def _add(total: Sums | None, part: Sums | None) -> Sums | None:
    if part is None:
        return total
    return part if total is None else (total[0] + part[0], total[1] + part[1])


class DaskEngine:
    """Runs the passes on a Dask cluster: ``scheduler`` is its address, or None for a local
    cluster of ``n_workers`` single-threaded worker processes (default: one per core).

    Dask moves pickled Python objects: this process unpickles what the workers send back, and
    the workers run the functions sent to them. A cluster this engine starts is its own; an
    external ``scheduler`` is used only with ``trust_scheduler=True`` (``--trust-scheduler``),
    the same explicit opt-in tvbasis asks before loading any pickle that can run code.
    """

    def __init__(
        self,
        scheduler: str | None = None,
        n_workers: int | None = None,
        partition_elements: int = PARTITION_ELEMENTS,
        trust_scheduler: bool = False,
    ) -> None:
        if scheduler is not None and not trust_scheduler:
            raise TvbasisError(
                f"--scheduler {scheduler}: a Dask cluster exchanges pickles with this process (results are "
                f"unpickled here, code runs on its workers), so it is not used unless you trust it: "
                f"pass --trust-scheduler"
            )
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise TvbasisError(
                "--engine dask needs the 'distributed' package: pip install 'tvbasis[distributed]'"
            ) from None
        self.partition_elements = partition_elements
        self._cluster: Any = None
        try:
            if scheduler is None:
                self._cluster = LocalCluster(
                    n_workers=n_workers or os.cpu_count() or 1,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",  # a free port: never clash with a running dashboard
                )
                self.client = Client(self._cluster)
            else:
                self.client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            self.close()
            raise TvbasisError(f"--scheduler {scheduler}: cannot connect to the Dask scheduler ({exc})") from None

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info()["workers"])

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def __enter__(self) -> DaskEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, label: str, tvs: TaskVectorSet, fn: Any, *args: Any) -> list[Any]:
        """``fn(spec, tensors, *args)`` for every partition; the results in partition order."""
        from distributed import as_completed

        spec = TaskVectorSpec.of(tvs)
        parts = plan_partitions(tvs.tensors, self.partition_elements)
        sizes = {i.name: i.numel for i in tvs.tensors}
        futures = [self.client.submit(fn, spec, part, *args, pure=False) for part in parts]
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(parts)
        try:
            with progress(tvs.dim * (tvs.n_tasks + 1), label, unit="param") as bar:
                for future in as_completed(futures):
                    i = index[future.key]
                    results[i] = future.result()  # re-raises a worker's error here
                    bar.update(sum(sizes[n] for n in parts[i]) * (tvs.n_tasks + 1))
        finally:
            for f in futures:
                f.cancel()
        return results

    def gram_pass(
        self,
        tvs: TaskVectorSet,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        observe: Observer | None = None,
        hash_inputs: bool = True,
        tensor_stats: bool = False,
    ) -> GramStats:
        if observe is not None:
            raise TvbasisError(
                "this method learns from the data during the Gram pass, which the dask engine does not "
                "distribute yet; use the local engine"
            )
        results = self._run(
            "Gram pass (dask)", tvs, _gram_partition, chunk_elements, self.partition_elements, tensor_stats
        )
        gram = np.zeros((tvs.n_tasks, tvs.n_tasks), dtype=np.float64)
        digests: list[list[bytes]] = [[] for _ in range(tvs.n_tasks + 1)]
        # Each tensor lies in one partition, so its G_n comes whole from one worker.
        per_tensor: _PerTensor = {} if tensor_stats else None
        counts: _PerTensor = {} if tensor_stats else None
        energy: _PerTensor = {} if tensor_stats else None
        for part_gram, part_digests, part_tensors, part_counts, part_energy in results:
            gram += part_gram
            for mine, theirs in zip(digests, part_digests, strict=True):
                mine.extend(theirs)
            for whole, part in ((per_tensor, part_tensors), (counts, part_counts), (energy, part_energy)):
                if whole is not None and part is not None:
                    whole.update(part)
        hashes = [combine_digests(d) for d in digests] if hash_inputs else [""] * (tvs.n_tasks + 1)
        return GramStats(
            symmetrised(gram),
            hashes[0],
            hashes[1:],
            symmetrised_tensor_grams(tvs, per_tensor),
            layout_row_counts(tvs, counts),
            layout_row_energy(tvs, energy),
        )

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
        results = self._run(
            "Atom pass (dask)",
            tvs,
            _atom_partition,
            atoms,
            sink,
            chunk_elements,
            measure,
            measure_unrounded,
            hashers is not None,
            self.partition_elements,
        )
        total: Sums | None = None
        unrounded: Sums | None = None
        for sums, raw, part_digests in results:
            total, unrounded = _add(total, sums), _add(unrounded, raw)
            for hasher, theirs in zip(hashers or (), part_digests, strict=False):
                hasher.digests.extend(theirs)
        return None if total is None else atom_stats_from_sums(total, unrounded)
