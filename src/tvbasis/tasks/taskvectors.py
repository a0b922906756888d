"""A base checkpoint and T fine-tunes, seen as T task vectors ``tau_t = theta_t - theta_0``.

Only floating-point tensors shared by base and fine-tunes are task-vector entries; integer
buffers are ignored. A name or shape that differs between base and a fine-tune is an error
naming the tensor, unless the user excluded it (e.g. a per-task classification head).
Nothing is loaded here: ``read_rows`` and ``task_rows`` give one chunk of all T task vectors at once.

A task may also be a PEFT LoRA adapter directory (``tvbasis.io.lora``; recognised by its
``adapter_config.json``): its task vector is ``scale * B @ A`` on the tensors it targets and
zero elsewhere. ``read_rows`` gives such a task's rows in factored form (``LoraRows``), so the
Gram pass can take inner products between adapters from the factors; ``task_rows``
materialises them, chunk by chunk, where dense rows are needed.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tvbasis.errors import CheckpointError, TvbasisError
from tvbasis.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from tvbasis.io.lora import LoraAdapter, LowRank, is_adapter
from tvbasis.io.paths import as_input_path

TASK_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class TaskSource:
    """A named fine-tune: where its checkpoint (or PEFT LoRA adapter directory) lives."""

    name: str
    path: Path  # or a UPath for a URL (``tvbasis.io.paths``)


def parse_task_arg(arg: str) -> TaskSource:
    """Parse ``NAME=PATH`` as given to ``--task``."""
    name, sep, path = arg.partition("=")
    if not sep or not name or not path:
        raise TvbasisError(f"--task {arg!r}: expected NAME=PATH")
    check_task_name(name)
    return TaskSource(name, as_input_path(path))


def check_task_name(name: str) -> None:
    if not TASK_NAME.match(name):
        raise TvbasisError(f"task name {name!r}: use letters, digits, '_', '-' or '.' only")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_tensors(
    infos: Sequence[TensorInfo], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[TensorInfo]:
    """Floating-point tensors whose name matches an include glob (all if none) and no exclude glob."""
    return [
        i
        for i in infos
        if i.dtype.is_floating_point and (not include or _matches(i.name, include)) and not _matches(i.name, exclude)
    ]


@dataclass(frozen=True)
class Chunk:
    """Rows ``start:stop`` of one tensor's first dimension; ``offset`` is its place in the flat vector."""

    tensor: str
    start: int
    stop: int
    row_numel: int
    offset: int
    last: bool = True  # the tensor's last chunk

    @property
    def numel(self) -> int:
        return (self.stop - self.start) * self.row_numel


def plan_chunks(tensors: Sequence[TensorInfo], chunk_elements: int) -> list[Chunk]:
    """Cut every tensor into row ranges of at most ``chunk_elements`` (at least one row)."""
    if chunk_elements < 1:
        raise TvbasisError(f"--chunk-elements {chunk_elements}: must be at least 1")
    chunks: list[Chunk] = []
    offset = 0
    for info in tensors:
        rows = info.shape[0] if info.shape else 1
        row_numel = info.numel // rows if rows else 0
        step = max(1, chunk_elements // max(row_numel, 1))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            chunks.append(Chunk(info.name, start, stop, row_numel, offset + start * row_numel, stop == rows))
        offset += info.numel
    return chunks


#: Entries per task in one partition (see ``plan_partitions``).
PARTITION_ELEMENTS = 1 << 24


def plan_partitions(tensors: Sequence[TensorInfo], partition_elements: int = PARTITION_ELEMENTS) -> list[list[str]]:
    """Group consecutive tensors into partitions of about ``partition_elements`` entries or more.

    A partition is the unit of work of the distributed engine, and sums over the data are
    taken per partition and then added in partition order by every engine, so engines agree
    to the last bit. The plan depends on the tensor layout only, never on the workers.
    """
    if partition_elements < 1:
        raise TvbasisError(f"partition_elements {partition_elements}: must be at least 1")
    parts: list[list[str]] = []
    size = partition_elements
    for info in tensors:
        if size >= partition_elements:
            parts.append([])
            size = 0
        parts[-1].append(info.name)
        size += info.numel
    return parts


@dataclass(frozen=True)
class LoraRows:
    """Rows ``start:stop`` of a LoRA task's delta on one tensor, as the tensor's factors."""

    factors: LowRank
    start: int
    stop: int

    def dense(self) -> torch.Tensor:
        """The rows, flattened (float64)."""
        return self.factors.rows(self.start, self.stop)


#: One task's rows of a chunk: dense rows as stored, a LoRA task's factors, or None where a
#: LoRA task leaves the tensor alone (its rows are zero).
TaskRows = torch.Tensor | LoraRows | None


class TaskVectorSet:
    """The base checkpoint and T fine-tunes (or LoRA adapters), validated against each other.

    ``tensors`` is the fixed order of the flattened task vector (``D`` entries in all).
    ``checkpoints[t]`` is task t's checkpoint and ``adapters[t]`` None, or the other way
    round for a LoRA task.
    """

    def __init__(
        self,
        base: str | Path | Checkpoint,
        tasks: Sequence[TaskSource],
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        only: Sequence[str] | None = None,
    ) -> None:
        """``only``: restrict the selection to these tensor names, in this order (one partition)."""
        if not tasks:
            raise TvbasisError("no tasks given (use --task NAME=PATH or a recipe)")
        seen: set[str] = set()
        for t in tasks:
            check_task_name(t.name)
            if t.name in seen:
                raise TvbasisError(f"task {t.name!r} is given twice; task names must be unique")
            seen.add(t.name)
        self.base = base if isinstance(base, Checkpoint) else open_checkpoint(base)
        self.sources = list(tasks)
        self.include = list(include)
        self.exclude = list(exclude)
        self.tensors = select_tensors(self.base.infos(), include, exclude)
        if only is not None:
            selected = {i.name: i for i in self.tensors}
            unknown = [n for n in only if n not in selected]
            if unknown:
                raise TvbasisError(f"{self.base.path}: tensor {unknown[0]!r} is not among the selected tensors")
            self.tensors = [selected[n] for n in only]
        if not self.tensors:
            raise TvbasisError(
                f"{self.base.path}: no floating-point tensors selected (include={self.include}, exclude={self.exclude})"
            )
        self.checkpoints: list[Checkpoint | None] = []
        self.adapters: list[LoraAdapter | None] = []
        for src in self.sources:
            if is_adapter(src.path):
                adapter = LoraAdapter(src.path)
                adapter.bind(self.base, self.tensors, self.include, self.exclude)
                if not adapter.tensors and only is None:
                    raise CheckpointError(
                        f"{src.path}: adapter of task {src.name!r} changes none of the selected tensors "
                        f"(include={self.include}, exclude={self.exclude})"
                    )
                self.checkpoints.append(None)
                self.adapters.append(adapter)
            else:
                ckpt = open_checkpoint(src.path)
                self._validate(src, ckpt)
                self.checkpoints.append(ckpt)
                self.adapters.append(None)
        #: Tasks given as full checkpoints, and as LoRA adapters (indices, in task order).
        self.dense_tasks = [t for t, a in enumerate(self.adapters) if a is None]
        self.lora_tasks = [t for t, a in enumerate(self.adapters) if a is not None]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.sources]

    @property
    def n_tasks(self) -> int:
        return len(self.sources)

    @property
    def dim(self) -> int:
        return sum(i.numel for i in self.tensors)

    def _validate(self, src: TaskSource, ckpt: Checkpoint) -> None:
        for info in self.tensors:
            if info.name not in ckpt:
                raise CheckpointError(
                    f"{src.path}: task {src.name!r} lacks tensor {info.name!r} of the base "
                    f"(exclude it with --exclude if it is task-specific)"
                )
            other = ckpt.info(info.name)
            if other.shape != info.shape:
                raise CheckpointError(
                    f"{src.path}: tensor {info.name!r} has shape {list(other.shape)} in task "
                    f"{src.name!r} but {list(info.shape)} in the base"
                )
            if not other.dtype.is_floating_point:
                raise CheckpointError(
                    f"{src.path}: tensor {info.name!r} is {other.dtype} in task "
                    f"{src.name!r} but floating point in the base"
                )
        selected = {i.name for i in self.tensors}
        for other in select_tensors(ckpt.infos(), self.include, self.exclude):
            if other.name not in selected and other.name not in self.base:
                raise CheckpointError(
                    f"{src.path}: tensor {other.name!r} of task {src.name!r} is not in the base "
                    f"(exclude it with --exclude if it is task-specific)"
                )

    def is_lora(self, t: int) -> bool:
        return self.adapters[t] is not None

    def read_rows(self, chunk: Chunk, buffers: Sequence[torch.Tensor] | None = None) -> list[TaskRows]:
        """The chunk's rows as stored, flattened: the base's first, then each task's
        (a LoRA task's as ``LoraRows``, or None where it leaves the tensor alone).

        ``buffers`` (one 1-D uint8 tensor per checkpoint, base first, each large enough) is
        memory to read into; the rows are then views of it, valid until it is reused.
        """
        rows: list[TaskRows] = []
        for i, ckpt in enumerate([self.base, *self.checkpoints]):
            if ckpt is None:
                adapter = self.adapters[i - 1]
                assert adapter is not None
                factors = adapter.low_rank(chunk.tensor)
                rows.append(None if factors is None else LoraRows(factors, chunk.start, chunk.stop))
                continue
            out = buffers[i] if buffers is not None else None
            if not ckpt.info(chunk.tensor).shape:
                r = ckpt.read(chunk.tensor, out=out)
            else:
                r = ckpt.read(chunk.tensor, chunk.start, chunk.stop, out=out)
            rows.append(r.reshape(-1))
        return rows

    def task_rows(self, rows: Sequence[TaskRows], out: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(numel, T)`` task-vector rows (each task minus the base) of ``read_rows``' output.

        ``out`` (a 1-D float64 or float32 tensor of at least ``T * numel`` entries) is memory
        to fill, and its dtype is the result's; the result is then a view of it. Without
        ``out`` the rows are float64. Differences are taken in the result's dtype (exact in
        float64); a LoRA task's rows are ``left @ right`` computed in float64 (zero where it
        leaves the tensor alone). The ``(numel, T)`` matrix is the transpose of a contiguous
        ``(T, numel)`` one.
        """
        base = rows[0]
        assert isinstance(base, torch.Tensor)
        n = base.numel()
        if out is None:
            X = torch.empty((self.n_tasks, n), dtype=torch.float64)
        else:
            X = out[: self.n_tasks * n].view(self.n_tasks, n)
        if self.lora_tasks:
            for t, r in enumerate(rows[1:]):
                if isinstance(r, torch.Tensor):
                    _subtract(r, base, X[t])
                elif r is None:
                    X[t].zero_()
                else:
                    X[t].copy_(r.dense())
            return X.T
        tasks: list[torch.Tensor] = rows[1:]  # type: ignore[assignment]
        if all(r.dtype in _NUMPY_FLOATS for r in tasks) and base.dtype in _NUMPY_FLOATS:
            # numpy's loops run on the calling thread only (the passes call this on a worker).
            Xn = X.numpy()
            b = base.detach().numpy()
            if base.dtype == X.dtype and all(r.dtype == X.dtype for r in tasks):
                for t, r in enumerate(tasks):
                    np.subtract(r.detach().numpy(), b, out=Xn[t])
            else:
                # Cast, then subtract in place: several times faster than one mixed-dtype subtract.
                for t, r in enumerate(tasks):
                    Xn[t] = r.detach().numpy()
                np.subtract(Xn, b.astype(Xn.dtype, copy=False), out=Xn)
        else:  # bfloat16 has no numpy dtype
            b = base.to(X.dtype)
            for t, r in enumerate(tasks):
                torch.sub(r.to(X.dtype), b, out=X[t])
        return X.T


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _subtract(row: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> None:
    """``out = row - base`` in ``out``'s dtype (one task's rows; the calling thread only)."""
    if row.dtype in _NUMPY_FLOATS and base.dtype in _NUMPY_FLOATS:
        o = out.numpy()
        if row.dtype == base.dtype == out.dtype:
            np.subtract(row.detach().numpy(), base.detach().numpy(), out=o)
        else:
            o[:] = row.detach().numpy()
            np.subtract(o, base.detach().numpy().astype(o.dtype, copy=False), out=o)
    else:  # bfloat16 has no numpy dtype
        torch.sub(row.to(out.dtype), base.to(out.dtype), out=out)
