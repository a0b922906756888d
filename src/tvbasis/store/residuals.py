"""Per-tensor codes in a store: which tensors the basis covers, and each task's coded residual.

A store may code, tensor by tensor, what its basis leaves out of every task:
``R_t = tau_t - S W[:, t]`` on tensors the basis covers, ``R_t = tau_t`` on the others (the
atoms are zero there and take no bytes). Each tensor has one code (``tvbasis.codes``) for the
residuals of all tasks, e.g. ``keep:0.0625:int4:seed=0`` or ``int4`` or ``none``. Task-weighted
addition is then ``S (W a) + sum_t a_t R_hat_t``, decoded chunk by chunk.

Layout: ``residuals/task-000.safetensors`` ... one file per task (in task order) holding every
coded tensor's payload parts as ``TENSOR/PART`` (``codes``, ``scale`` ...). Parts with
one entry per row of the tensor keep the tensor's rows as their first dimension, so a chunk of
rows decodes from the same rows of the payload. The manifest's ``residuals`` section records
every tensor's code and whether the basis covers it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.codes import CodeSpec, TensorKey, code, decode, encode, nbytes, parse_code
from tvbasis.codes import rows as rows_code
from tvbasis.codes.core import Encoded, row_view_shape
from tvbasis.errors import TvbasisError
from tvbasis.io.checkpoint import Checkpoint, _safetensors_infos
from tvbasis.io.writer import RowWriter, TensorSpec, safetensors_header
from tvbasis.tasks.taskvectors import Chunk

RESIDUALS_DIR = "residuals"
NO_CODE = CodeSpec("none")


#: Default code of a per-tensor basis' atoms (their rounding is corrected by the residual like the
#: global atoms'); ``TENSOR_ATOM_CODES`` are the ones a store may use.
TENSOR_ATOM_CODE = CodeSpec("int8")
TENSOR_ATOM_CODES = ("int8", "int4")


def check_atom_code(spec: CodeSpec) -> CodeSpec:
    """``spec``, if per-tensor atoms may be coded with it."""
    if spec.name not in TENSOR_ATOM_CODES or spec.params:
        raise TvbasisError(f"per-tensor atoms coded {spec}: choose one of {', '.join(TENSOR_ATOM_CODES)}")
    return spec


@dataclass(frozen=True)
class TensorCode:
    """How one tensor is stored: the global basis covers it (``basis``), or a basis of its own with
    ``tensor_atoms`` atoms (its PCA, from ``G_n``, coded with ``atom_code``), or neither; and its
    residuals' code."""

    basis: bool = True
    residual: CodeSpec = NO_CODE
    tensor_atoms: int = 0
    atom_code: CodeSpec = TENSOR_ATOM_CODE

    def __post_init__(self) -> None:
        if self.tensor_atoms < 0 or (self.basis and self.tensor_atoms):
            raise TvbasisError(f"{self}: a tensor is covered by the global basis or by its own, not both")
        check_atom_code(self.atom_code)

    def to_json(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.tensor_atoms:
            extra = {"tensor_atoms": self.tensor_atoms, "atom_code": str(self.atom_code)}
        return {"basis": self.basis, **extra, "residual": str(self.residual)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorCode:
        # stores written before atoms had a code hold int8 atoms
        atom_code = parse_code(str(data["atom_code"])) if "atom_code" in data else TENSOR_ATOM_CODE
        return cls(bool(data["basis"]), parse_code(str(data["residual"])), int(data.get("tensor_atoms", 0)), atom_code)

    def __str__(self) -> str:
        head = ""
        if self.basis:
            head = "basis + "
        elif self.tensor_atoms:
            atoms = "" if self.atom_code == TENSOR_ATOM_CODE else f" {self.atom_code}"
            head = f"tensor basis M={self.tensor_atoms}{atoms} + "
        return head + str(self.residual)


TENSOR_BASES = f"{RESIDUALS_DIR}/tensor-bases.safetensors"


def tensor_atom_key(tensor: str, j: int, part: str) -> str:
    return f"{tensor}/atom-{j:03d}/{part}"


def coefficients_key(tensor: str) -> str:
    return f"{tensor}/coefficients"


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

    @property
    def tensor_bases(self) -> bool:
        """Whether some tensor has a basis of its own (the build needs per-tensor Gram matrices)."""
        return any(tc.tensor_atoms for tc in (*self.tensors.values(), self.default))


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


def payload_parts(spec: CodeSpec, shape: tuple[int, ...], nonzero_rows: int | None = None) -> list[PayloadPart]:
    """The payload tensors of one task's residual on a tensor of ``shape``, found by coding zeros.

    A row-local code on a 2+-D tensor is probed on two rows: parts with two rows scale with the
    tensor's rows, the others are whole. Other codes are probed on the whole shape, but
    ``rows:...``, whose parts depend on the count of nonzero rows (``nonzero_rows``, none if not
    given): its own parts on a one-column probe, its inner code's on the block of nonzero rows.
    """
    if spec.name == "none":
        return []
    if spec.name == "rows":
        # probed apart: spares encoding a whole tensor of zeros (30,522 x 384 for MiniLM's embeddings)
        n_rows, _ = row_view_shape(tuple(shape))
        probe = torch.zeros((n_rows, 1), dtype=torch.float32)
        probe[: nonzero_rows or 0] = 1.0
        own = encode(parse_code("rows:fp32"), probe).payload
        inner = payload_parts(rows_code.inner_spec(spec), rows_code.inner_shape(tuple(shape), nonzero_rows or 0))
        return [PayloadPart(k, tuple(own[k].shape), own[k].dtype, False) for k in rows_code.OWN_PARTS] + [
            PayloadPart(p.name, p.shape, p.dtype, False) for p in inner
        ]
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


#: ``(spec, shape, nonzero_rows) -> parts``: ``payload_parts`` or a cached stand-in for it.
PartsFn = Callable[[CodeSpec, tuple[int, ...], int | None], list[PayloadPart]]


def task_payload_parts(
    codes: Mapping[str, TensorCode],
    shapes: Mapping[str, tuple[int, ...]],
    n_tasks: int,
    nonzero_rows: Mapping[str, np.ndarray] | None = None,
    parts_of: PartsFn = payload_parts,
) -> list[dict[str, list[PayloadPart]]]:
    """Per task, every tensor's residual payload parts: the same for every task but where a code
    that skips zero rows (``rows:...``) is sized by the task's count of nonzero rows."""
    same = {n: parts_of(tc.residual, shapes[n], None) for n, tc in codes.items()}
    sparse = [n for n, tc in codes.items() if code(tc.residual.name).sparse_nbytes is not None]
    probed: dict[tuple[str, int], list[PayloadPart]] = {}  # tasks with the same count share a probe
    out = []
    for t in range(n_tasks):
        parts = dict(same)
        for n in sparse:
            if nonzero_rows is None or n not in nonzero_rows:
                raise TvbasisError(
                    f"tensor {n!r}: code {codes[n].residual} needs every task's count of nonzero rows, which the "
                    f"Gram pass gathers from full fine-tunes only (not when every task is a LoRA adapter)"
                )
            count = int(nonzero_rows[n][t])
            if (n, count) not in probed:
                probed[(n, count)] = parts_of(codes[n].residual, shapes[n], count)
            parts[n] = probed[(n, count)]
        out.append(parts)
    return out


def task_file_specs(parts: Mapping[str, list[PayloadPart]]) -> list[TensorSpec]:
    """The tensors of one task's residual file, in order."""
    return [TensorSpec(part_key(n, p.name), p.shape, p.dtype) for n, ps in parts.items() for p in ps]


def task_file_metadata(task: str) -> dict[str, str]:
    return {"tvbasis_residual_task": task}


def residual_header_bytes(
    codes: Mapping[str, TensorCode],
    shapes: Mapping[str, tuple[int, ...]],
    task_names: Sequence[str],
    nonzero_rows: Mapping[str, np.ndarray] | None = None,
    parts_of: PartsFn = payload_parts,
) -> int:
    """The bytes of the residual files beyond their payloads: each file's safetensors header, exactly."""
    per_task = task_payload_parts(codes, shapes, len(task_names), nonzero_rows, parts_of)
    return sum(
        len(safetensors_header(task_file_specs(parts), task_file_metadata(task))[0])
        for task, parts in zip(task_names, per_task, strict=True)
    )


def task_file(t: int) -> str:
    return f"{RESIDUALS_DIR}/task-{t:03d}.safetensors"


def residual_nbytes(
    codes: Mapping[str, TensorCode],
    shapes: Mapping[str, tuple[int, ...]],
    n_tasks: int,
    nonzero_rows: Mapping[str, np.ndarray] | None = None,
) -> int:
    """Payload bytes of all tasks' residuals (safetensors headers not counted); codes that skip
    zero rows are priced with each task's count of nonzero rows where given."""
    counts = nonzero_rows or {}
    return sum(tensor_residual_nbytes(codes[n].residual, shapes[n], n_tasks, counts.get(n)) for n in codes)


def tensor_residual_nbytes(
    spec: CodeSpec, shape: tuple[int, ...], n_tasks: int, nonzero_rows: np.ndarray | None = None
) -> int:
    """Payload bytes of all tasks' residuals on one tensor: by each task's count of nonzero rows
    (``nonzero_rows``, (T,)) for a code that skips zero rows, else by the shape."""
    if nonzero_rows is None:
        return n_tasks * nbytes(spec, shape)
    return sum(nbytes(spec, shape, int(c)) for c in nonzero_rows)


@dataclass
class ResidualWriter:
    """One safetensors file per task, created whole; the residual pass writes coded rows into them."""

    directory: Path  # the store's (temporary) directory
    codes: dict[str, TensorCode]
    shapes: dict[str, tuple[int, ...]]
    task_names: list[str]
    #: Per tensor, each task's count of nonzero rows: what ``rows:...`` codes store depends on it.
    nonzero_rows: Mapping[str, np.ndarray] | None = None
    _writers: list[RowWriter] = field(default_factory=list, init=False, repr=False)
    _bases: RowWriter | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _ = self.parts  # refuses a code that needs row counts it was not given, before anything is written

    @cached_property
    def parts(self) -> list[dict[str, list[PayloadPart]]]:
        """Per task, every tensor's payload parts (they differ between tasks for ``rows:...`` codes)."""
        return task_payload_parts(self.codes, self.shapes, len(self.task_names), self.nonzero_rows)

    @cached_property
    def atom_parts(self) -> dict[str, list[PayloadPart]]:
        """The payload parts of one per-tensor atom, for tensors with a basis of their own."""
        return {n: payload_parts(tc.atom_code, self.shapes[n]) for n, tc in self.codes.items() if tc.tensor_atoms}

    def create(self) -> None:
        (self.directory / RESIDUALS_DIR).mkdir(parents=True, exist_ok=True)
        for t, task in enumerate(self.task_names):
            specs = task_file_specs(self.parts[t])
            self._writers.append(RowWriter(self.directory / task_file(t), specs, task_file_metadata(task), create=True))
        if self.atom_parts:
            T = len(self.task_names)
            specs = []
            for n, parts in self.atom_parts.items():
                m = self.codes[n].tensor_atoms
                specs += [TensorSpec(tensor_atom_key(n, j, p.name), p.shape, p.dtype) for j in range(m) for p in parts]
                specs.append(TensorSpec(coefficients_key(n), (m, T), torch.float64))
            self._bases = RowWriter(self.directory / TENSOR_BASES, specs, {"tvbasis": "tensor-bases"}, create=True)

    def write_atom(self, j: int, enc: Encoded, first_row: int, whole: bool) -> None:
        """Write atom ``j`` of a per-tensor basis (a coded block, as ``write``)."""
        self._write_parts(self._bases, self.atom_parts[enc.key.tensor], enc, first_row, whole, j)

    def write_coefficients(self, tensor: str, coefficients: torch.Tensor) -> None:
        self._bases.write_rows(coefficients_key(tensor), 0, coefficients.to(torch.float64))

    def write(self, t: int, enc: Encoded, first_row: int, whole: bool) -> None:
        """Write task ``t``'s coded block (rows from ``first_row``; ``whole``: the block is the whole tensor)."""
        parts = self.parts[t][enc.key.tensor]
        for p in parts:
            if not p.per_row and tuple(enc.payload[p.name].shape) != p.shape:
                raise TvbasisError(
                    f"tensor {enc.key.tensor!r}, task {self.task_names[t]!r}: its coded residual's part "
                    f"{p.name!r} has shape {tuple(enc.payload[p.name].shape)} where the Gram pass's row counts "
                    f"made room for {p.shape}; did the input change during the build?"
                )
        self._write_parts(self._writers[t], parts, enc, first_row, whole)

    @staticmethod
    def _write_parts(
        w: RowWriter, parts: list[PayloadPart], enc: Encoded, first_row: int, whole: bool, atom: int | None = None
    ) -> None:
        for p in parts:
            name = part_key(enc.key.tensor, p.name) if atom is None else tensor_atom_key(enc.key.tensor, atom, p.name)
            value = enc.payload[p.name]
            if p.per_row and not whole:
                w.write_rows(name, first_row, value)
            elif p.per_row or first_row == 0:  # a whole part is written once, with the first block
                w.write_rows(name, 0, value)

    def close(self) -> None:
        for w in self._writers:
            w.close()
        self._writers = []
        if getattr(self, "_bases", None) is not None:
            self._bases.close()
            self._bases = None

    def manifest_entry(self) -> dict[str, Any]:
        T = len(self.task_names)
        basis_bytes = sum(
            tc.tensor_atoms * (nbytes(tc.atom_code, self.shapes[n]) + 8 * T)
            for n, tc in self.codes.items()
            if tc.tensor_atoms
        )
        return {
            "dir": RESIDUALS_DIR,
            "tensors": {n: tc.to_json() for n, tc in self.codes.items()},
            "files": [task_file(t) for t in range(T)],
            **({"tensor_bases": TENSOR_BASES} if self.atom_parts else {}),
            "payload_bytes": residual_nbytes(self.codes, self.shapes, T, self.nonzero_rows) + basis_bytes,
        }


class ResidualReader:
    """Decodes a store's residuals chunk by chunk (see the module's docstring)."""

    def __init__(self, path: Path, entry: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], tasks: list[str]):
        self.path = path
        self.codes = {n: TensorCode.from_json(v) for n, v in entry["tensors"].items()}
        self.shapes = dict(shapes)
        self.task_names = tasks
        self.files = [path / f for f in entry["files"]]
        self.tensor_bases_file: str | None = entry.get("tensor_bases")
        self._readers: list[Checkpoint] | None = None
        # Tensor-wide codes decode the whole tensor once; the current tensor's decodings are kept.
        self._whole: dict[tuple[str, int], torch.Tensor] = {}

    @cached_property
    def parts(self) -> dict[str, list[PayloadPart]]:
        return {n: payload_parts(tc.residual, self.shapes[n]) for n, tc in self.codes.items()}

    @cached_property
    def _tensor_bases(self) -> Checkpoint | None:
        if not self.tensor_bases_file:
            return None
        return Checkpoint(self.path, _safetensors_infos([self.path / self.tensor_bases_file]), "store-tensor-bases")

    def _tensor_basis_rows(self, chunk: Chunk, weights: np.ndarray) -> torch.Tensor | None:
        """``S_n (W_n a)`` of a tensor with its own basis on ``chunk``'s rows, or None."""
        m = self.codes[chunk.tensor].tensor_atoms
        atom_code = self.codes[chunk.tensor].atom_code
        if not m:
            return None
        reader = self._tensor_bases
        assert reader is not None
        c = reader.read(coefficients_key(chunk.tensor)).to(torch.float64) @ torch.from_numpy(weights)
        shape = self.shapes[chunk.tensor]
        parts = payload_parts(atom_code, shape)
        whole = whole_tensor(atom_code, shape)
        out = torch.zeros(chunk.numel, dtype=torch.float64)
        for j in range(m):
            payload = {
                p.name: reader.read(tensor_atom_key(chunk.tensor, j, p.name), chunk.start, chunk.stop)
                if p.per_row and not whole
                else reader.read(tensor_atom_key(chunk.tensor, j, p.name))
                for p in parts
            }
            if whole:
                atom = decode(Encoded(atom_code, shape, TensorKey(chunk.tensor), payload)).reshape(-1)
                atom = atom[chunk.start * chunk.row_numel : chunk.stop * chunk.row_numel]
            else:
                block = (chunk.stop - chunk.start, *shape[1:])
                atom = decode(Encoded(atom_code, block, TensorKey(chunk.tensor), payload)).reshape(-1)
            out += float(c[j]) * atom
        return out

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
        """``sum_t weights[t] * (S_n W_n[:, t] + R_hat_t)`` on ``chunk``'s rows (flat float64; ``S_n W_n``
        only for a tensor with a basis of its own), or None where nothing is stored."""
        out = self._tensor_basis_rows(chunk, np.asarray(weights, dtype=np.float64))
        if self.codes[chunk.tensor].residual.name == "none":
            return out
        for t in np.nonzero(np.asarray(weights))[0]:
            r = self._decode(int(t), chunk) * float(weights[t])
            out = r if out is None else out.add_(r)
        return out

    def columns(self, chunk: Chunk, tasks: Sequence[int]) -> torch.Tensor:
        """The decoded residuals of ``tasks`` on ``chunk``: ``(numel, len(tasks))`` float64 (zeros where uncoded)."""
        out = torch.zeros(chunk.numel, len(tasks), dtype=torch.float64)
        for i, t in enumerate(tasks):
            own = self._tensor_basis_rows(chunk, np.eye(len(self.task_names))[int(t)])
            if own is not None:
                out[:, i] += own
            if self.codes[chunk.tensor].residual.name != "none":
                out[:, i] += self._decode(int(t), chunk)
        return out
