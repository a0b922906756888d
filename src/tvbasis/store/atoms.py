"""Writing a store's atom files: every stored vector's rows, rounded to the store dtype.

The files are created whole (header first, data area at its final size), and rows are then
written at their places, so any process that can reach the files can write its part: the
local engine writes chunk by chunk, the distributed engine's workers write their partitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tvbasis.io.writer import RowWriter, TensorSpec, shard_plan
from tvbasis.store.quantize import dequantize_rows, is_quantized, quantize_rows, scale_name, value_dtype
from tvbasis.tasks.taskvectors import Chunk


@dataclass
class AtomWriter:
    """The atom files of one store under ``directory``: ``names[k]`` holds vector k.

    ``shapes`` names the tensors the atoms cover (all of them but those a code plan leaves to
    the residuals); the atoms are zero, and not stored, on the others.

    Call it as an atom-pass sink: ``writer(chunk, S)`` writes the chunk's rows of the K
    vectors (``S`` is ``(numel, K)``) and returns them as stored, in float64 for int8. It
    pickles as plain data (paths, shapes, dtype) and opens its files where it is used.
    """

    directory: Path
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtype: str
    max_shard_bytes: int
    plans: list[list[tuple[str, list[TensorSpec]]]] = field(init=False)
    _writers: list[dict[str, RowWriter]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        specs: list[TensorSpec] = []
        for name, shape in self.shapes.items():
            specs.append(TensorSpec(name, shape, value_dtype(self.dtype, shape)))
            if is_quantized(self.dtype, shape):
                specs.append(TensorSpec(scale_name(name), shape[:1], torch.float32))
        self.plans = [shard_plan(specs, self.max_shard_bytes, stem=name) for name in self.names]

    def vectors(self, atoms_dir: str) -> list[dict[str, Any]]:
        """The manifest's ``atoms.vectors`` entries (file paths relative to the store)."""
        return [
            {"name": name, "files": [f"{atoms_dir}/{f}" for f, _ in plan]}
            for name, plan in zip(self.names, self.plans, strict=True)
        ]

    def create(self) -> None:
        """Create every file at its full size (once, before any rows are written)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._open(create=True)

    def _open(self, create: bool) -> list[dict[str, RowWriter]]:
        if self._writers is None:
            writers: list[dict[str, RowWriter]] = []
            for name, plan in zip(self.names, self.plans, strict=True):
                by_tensor: dict[str, RowWriter] = {}
                for fname, specs in plan:
                    w = RowWriter(self.directory / fname, specs, {"tvbasis_vector": name}, create=create)
                    by_tensor.update(dict.fromkeys((s.name for s in specs), w))
                writers.append(by_tensor)
            self._writers = writers
        return self._writers

    def __call__(self, chunk: Chunk, S: torch.Tensor) -> torch.Tensor:
        if chunk.tensor not in self.shapes:
            # a tensor the basis does not cover (its residuals are coded instead): the atoms are zero there
            return torch.zeros_like(S, dtype=torch.float64)
        writers = self._open(create=False)
        shape = self.shapes[chunk.tensor]
        n_rows = chunk.stop - chunk.start
        row_shape = (n_rows, *shape[1:]) if shape else ()
        if not is_quantized(self.dtype, shape):
            stored = S.to(value_dtype(self.dtype, shape))  # S is (numel, K) column-major: atoms' rows contiguous
            for k, w in enumerate(writers):
                w[chunk.tensor].write_rows(chunk.tensor, chunk.start, stored[:, k].reshape(row_shape))
            return stored
        values = []
        for k, w in enumerate(writers):
            q, scale = quantize_rows(S[:, k].reshape(n_rows, -1))
            w[chunk.tensor].write_rows(chunk.tensor, chunk.start, q.reshape(row_shape))
            w[scale_name(chunk.tensor)].write_rows(scale_name(chunk.tensor), chunk.start, scale)
            values.append(dequantize_rows(q, scale).reshape(-1))
        return torch.stack(values, dim=1)

    def close(self) -> None:
        if self._writers is not None:
            for w in {id(w): w for by in self._writers for w in by.values()}.values():
                w.close()
            self._writers = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_writers"] = None  # files are opened again where the writer is unpickled
        return state
