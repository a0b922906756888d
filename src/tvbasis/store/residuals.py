"""Per-tensor codes in a store: which tensors the basis covers, and each task's coded residual.

A store may code, tensor by tensor, what its basis leaves out of every task:
``R_t = tau_t - S W[:, t]`` on tensors the basis covers, ``R_t = tau_t`` on the others (the
atoms are zero there and take no bytes). Each tensor has one code (``tvbasis.codes``) for the
residuals of all tasks, e.g. ``keep:0.0625:int4:seed=0`` or ``int4`` or ``none``. Task-weighted
addition is then ``S (W a) + sum_t a_t R_hat_t``, decoded chunk by chunk.

Layout: ``residuals/task-000.safetensors`` ... one file per task (in task order) holding every
coded tensor's payload parts as ``TENSOR/PART`` (``codes``, ``scale``, ``seed`` ...). Parts with
one entry per row of the tensor keep the tensor's rows as their first dimension, so a chunk of
rows decodes from the same rows of the payload. The manifest's ``residuals`` section records
every tensor's code and whether the basis covers it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.codes import CodeSpec, TensorKey, code, decode, encode, nbytes, parse_code
from tvbasis.codes.core import Encoded
from tvbasis.errors import TvbasisError
from tvbasis.io.checkpoint import Checkpoint, _safetensors_infos
from tvbasis.io.writer import RowWriter, TensorSpec
from tvbasis.tasks.taskvectors import Chunk

RESIDUALS_DIR = "residuals"
NO_CODE = CodeSpec("none")


@dataclass(frozen=True)
class TensorCode:
    """How one tensor is stored: whether the global basis covers it, and its residuals' code."""

    basis: bool = True
    residual: CodeSpec = NO_CODE

    def to_json(self) -> dict[str, Any]:
        return {"basis": self.basis, "residual": str(self.residual)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorCode:
        return cls(bool(data["basis"]), parse_code(str(data["residual"])))

    def __str__(self) -> str:
        return ("basis + " if self.basis else "") + str(self.residual)


@dataclass(frozen=True)
class CodePlan:
    """Every task-vector tensor's ``TensorCode`` (tensors not named get ``default``)."""

    tensors: Mapping[str, TensorCode] = field(default_factory=dict)
    default: TensorCode = TensorCode()

    def of(self, name: str) -> TensorCode:
        return self.tensors.get(name, self.default)

    def for_names(self, names: Iterable[str]) -> dict[str, TensorCode]:
        names = list(names)
        unknown = sorted(set(self.tensors) - set(names))
        if unknown:
            raise TvbasisError(f"code plan names tensor {unknown[0]!r}, which is not a task-vector tensor")
        return {n: self.of(n) for n in names}

    @property
    def trivial(self) -> bool:
        """Nothing to code: the basis covers every tensor and no residual is stored."""
        return all(tc.basis and tc.residual.name == "none" for tc in (*self.tensors.values(), self.default))


def uniform_plan(residual: str | CodeSpec, basis: bool = True) -> CodePlan:
    """The same code on every tensor (``residual`` a spec string such as ``int4``)."""
    spec = parse_code(residual) if isinstance(residual, str) else residual
    return CodePlan(default=TensorCode(basis, spec))


def whole_tensor(spec: CodeSpec, shape: Sequence[int]) -> bool:
    """Whether the code needs the whole tensor at once (tensor-wide codes, and 1-D tensors: one row)."""
    return not code(spec.name).row_local or len(shape) < 2


@dataclass(frozen=True)
class PayloadPart:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    per_row: bool  # one entry per row of the tensor: written and read by rows


def payload_parts(spec: CodeSpec, shape: tuple[int, ...]) -> list[PayloadPart]:
    """The payload tensors of one task's residual on a tensor of ``shape``, found by coding zeros.

    A row-local code on a 2+-D tensor is probed on two rows: parts with two rows scale with the
    tensor's rows, the others (a seed) are whole. Other codes are probed on the whole shape.
    """
    if spec.name == "none":
        return []
    if whole_tensor(spec, shape):
        enc = encode(spec, torch.zeros(shape, dtype=torch.float32))
        return [PayloadPart(k, tuple(v.shape), v.dtype, False) for k, v in enc.payload.items()]
    probe = encode(spec, torch.zeros((2, *shape[1:]), dtype=torch.float32))
    parts = []
    for k, v in probe.payload.items():
        per_row = v.dim() >= 1 and v.shape[0] == 2
        parts.append(PayloadPart(k, (shape[0], *v.shape[1:]) if per_row else tuple(v.shape), v.dtype, per_row))
    return parts


def part_key(tensor: str, part: str) -> str:
    return f"{tensor}/{part}"


def task_file(t: int) -> str:
    return f"{RESIDUALS_DIR}/task-{t:03d}.safetensors"


def residual_nbytes(codes: Mapping[str, TensorCode], shapes: Mapping[str, tuple[int, ...]], n_tasks: int) -> int:
    """Payload bytes of all tasks' residuals (safetensors headers not counted)."""
    return n_tasks * sum(nbytes(codes[n].residual, shapes[n]) for n in codes)


@dataclass
class ResidualWriter:
    """One safetensors file per task, created whole; the residual pass writes coded rows into them."""

    directory: Path  # the store's (temporary) directory
    codes: dict[str, TensorCode]
    shapes: dict[str, tuple[int, ...]]
    task_names: list[str]
    _writers: list[RowWriter] = field(default_factory=list, init=False, repr=False)

    @cached_property
    def parts(self) -> dict[str, list[PayloadPart]]:
        return {n: payload_parts(tc.residual, self.shapes[n]) for n, tc in self.codes.items()}

    def create(self) -> None:
        (self.directory / RESIDUALS_DIR).mkdir(parents=True, exist_ok=True)
        specs = [TensorSpec(part_key(n, p.name), p.shape, p.dtype) for n, parts in self.parts.items() for p in parts]
        for t, task in enumerate(self.task_names):
            self._writers.append(
                RowWriter(self.directory / task_file(t), specs, {"tvbasis_residual_task": task}, create=True)
            )

    def write(self, t: int, enc: Encoded, first_row: int, whole: bool) -> None:
        """Write task ``t``'s coded block (rows from ``first_row``; ``whole``: the block is the whole tensor)."""
        w = self._writers[t]
        for p in self.parts[enc.key.tensor]:
            value = enc.payload[p.name]
            if p.per_row and not whole:
                w.write_rows(part_key(enc.key.tensor, p.name), first_row, value)
            elif p.per_row or first_row == 0:  # a whole part is written once, with the first block
                w.write_rows(part_key(enc.key.tensor, p.name), 0, value)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        self._writers = []

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "dir": RESIDUALS_DIR,
            "tensors": {n: tc.to_json() for n, tc in self.codes.items()},
            "files": [task_file(t) for t in range(len(self.task_names))],
            "payload_bytes": residual_nbytes(self.codes, self.shapes, len(self.task_names)),
        }


class ResidualReader:
    """Decodes a store's residuals chunk by chunk (see the module's docstring)."""

    def __init__(self, path: Path, entry: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], tasks: list[str]):
        self.path = path
        self.codes = {n: TensorCode.from_json(v) for n, v in entry["tensors"].items()}
        self.shapes = dict(shapes)
        self.task_names = tasks
        self.files = [path / f for f in entry["files"]]
        self._readers: list[Checkpoint] | None = None
        # Tensor-wide codes decode the whole tensor once; the current tensor's decodings are kept.
        self._whole: dict[tuple[str, int], torch.Tensor] = {}

    @cached_property
    def parts(self) -> dict[str, list[PayloadPart]]:
        return {n: payload_parts(tc.residual, self.shapes[n]) for n, tc in self.codes.items()}

    def covered(self, tensor: str) -> bool:
        """Whether the global basis covers ``tensor`` (its atoms are stored there)."""
        return self.codes[tensor].basis

    def _reader(self, t: int) -> Checkpoint:
        if self._readers is None:
            self._readers = [Checkpoint(self.path, _safetensors_infos([f]), "store-residual") for f in self.files]
        return self._readers[t]

    def _decode(self, t: int, chunk: Chunk) -> torch.Tensor:
        """Task ``t``'s decoded residual on ``chunk``'s rows, flat float64."""
        tc = self.codes[chunk.tensor]
        shape = self.shapes[chunk.tensor]
        reader = self._reader(t)
        key = TensorKey(chunk.tensor, self.task_names[t], 0)
        if whole_tensor(tc.residual, shape):
            cache_key = (chunk.tensor, t)
            if cache_key not in self._whole:
                if any(k[0] != chunk.tensor for k in self._whole):
                    self._whole.clear()
                payload = {p.name: reader.read(part_key(chunk.tensor, p.name)) for p in self.parts[chunk.tensor]}
                self._whole[cache_key] = decode(Encoded(tc.residual, shape, key, payload)).reshape(-1)
            flat = self._whole[cache_key]
            return flat[chunk.start * chunk.row_numel : chunk.stop * chunk.row_numel]
        payload = {
            p.name: reader.read(part_key(chunk.tensor, p.name), chunk.start, chunk.stop)
            if p.per_row
            else reader.read(part_key(chunk.tensor, p.name))
            for p in self.parts[chunk.tensor]
        }
        block_shape = (chunk.stop - chunk.start, *shape[1:])
        block_key = TensorKey(chunk.tensor, self.task_names[t], chunk.start)
        return decode(Encoded(tc.residual, block_shape, block_key, payload)).reshape(-1)

    def rows(self, chunk: Chunk, weights: np.ndarray) -> torch.Tensor | None:
        """``sum_t weights[t] * R_hat_t`` on ``chunk``'s rows (flat float64), or None where nothing is coded."""
        if self.codes[chunk.tensor].residual.name == "none":
            return None
        out: torch.Tensor | None = None
        for t in np.nonzero(np.asarray(weights))[0]:
            r = self._decode(int(t), chunk) * float(weights[t])
            out = r if out is None else out.add_(r)
        return out

    def columns(self, chunk: Chunk, tasks: Sequence[int]) -> torch.Tensor:
        """The decoded residuals of ``tasks`` on ``chunk``: ``(numel, len(tasks))`` float64 (zeros where uncoded)."""
        out = torch.zeros(chunk.numel, len(tasks), dtype=torch.float64)
        if self.codes[chunk.tensor].residual.name != "none":
            for i, t in enumerate(tasks):
                out[:, i] = self._decode(int(t), chunk)
        return out
