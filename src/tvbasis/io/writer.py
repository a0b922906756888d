"""Streaming safetensors writer.

``safetensors.torch.save_file`` needs every tensor in memory at once. The format is just a
JSON header followed by the raw bytes of each tensor in order, so when names, shapes and
dtypes are known up front we can write the header first and then append each tensor's
bytes chunk by chunk. Files written here are read back with ``safetensors.safe_open``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import torch

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """What will be written for one tensor: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's raw little-endian bytes as a uint8 array, for any dtype (no copy when contiguous)."""
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8).numpy()


def safetensors_header(
    specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, int]]:
    """The bytes before the data (length prefix and JSON header) and each tensor's data offset in the file."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    relative: dict[str, int] = {}
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        relative[spec.name] = offset
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, {name: len(prefix) + off for name, off in relative.items()}


class SafetensorsStreamWriter:
    """Write one safetensors file whose tensors arrive in order, possibly in row chunks."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = list(specs)
        prefix, _ = safetensors_header(self._specs, metadata)
        self._file = self.path.open("wb")
        self._file.write(prefix)
        self._index = 0
        self._written = 0  # bytes of the current tensor written so far

    @property
    def done(self) -> bool:
        return self._index == len(self._specs)

    def current(self) -> TensorSpec:
        return self._specs[self._index]

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append rows (or the whole) of tensor ``name``; tensors must come in header order."""
        if self.done:
            raise RuntimeError(f"{self.path}: all tensors already written, got {name!r}")
        spec = self._specs[self._index]
        if name != spec.name:
            raise RuntimeError(f"{self.path}: expected tensor {spec.name!r} next, got {name!r}")
        if chunk.dtype != spec.dtype:
            chunk = chunk.to(spec.dtype)
        data = tensor_bytes(chunk)
        self._written += data.nbytes
        if self._written > spec.nbytes:
            raise RuntimeError(f"{self.path}: too many bytes for tensor {name!r}")
        self._file.write(data)
        if self._written == spec.nbytes:
            self._index += 1
            self._written = 0

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if not self.done:
            raise RuntimeError(f"{self.path}: closed before tensor {self.current().name!r} was complete")

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.close()
        else:
            self._file.close()


def shard_plan(
    specs: Sequence[TensorSpec], max_shard_bytes: int, stem: str = "model"
) -> list[tuple[str, list[TensorSpec]]]:
    """Split tensors, in order, into files of at most ``max_shard_bytes`` (a tensor is never split).

    One shard is named ``{stem}.safetensors``; several follow the Hugging Face pattern
    ``{stem}-00001-of-00003.safetensors``.
    """
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return [(f"{stem}.safetensors", groups[0])]
    n = len(groups)
    return [(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class ShardedWriter:
    """Write tensors, in order, into the files of a shard plan; several files may be open at once.

    When the plan has more than one file an index ``{index_name}`` in the Hugging Face layout
    (``metadata.total_size`` and ``weight_map``) is written beside them.
    """

    def __init__(
        self,
        directory: Path,
        plan: Sequence[tuple[str, Sequence[TensorSpec]]],
        index_name: str | None = None,
        metadata: dict[str, str] | None = None,
    ):
        self.directory = Path(directory)
        self.plan = [(f, list(s)) for f, s in plan]
        self._writer_of: dict[str, SafetensorsStreamWriter] = {}
        self._writers: list[SafetensorsStreamWriter] = []
        for fname, specs in self.plan:
            w = SafetensorsStreamWriter(self.directory / fname, specs, metadata)
            self._writers.append(w)
            for s in specs:
                self._writer_of[s.name] = w
        self.index_name = index_name

    def write(self, name: str, chunk: torch.Tensor) -> None:
        self._writer_of[name].write(name, chunk)

    def files(self) -> list[str]:
        return [f for f, _ in self.plan]

    def close(self) -> None:
        for w in self._writers:
            w.close()
        if self.index_name and len(self.plan) > 1:
            total = sum(s.nbytes for _, specs in self.plan for s in specs)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {s.name: f for f, specs in self.plan for s in specs},
            }
            (self.directory / self.index_name).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for w in self._writers:
            w._file.close()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.close()
        else:
            self.abort()


class RowWriter:
    """Write rows of the tensors of one safetensors file at their places, in any order.

    The file is created at its full size with its header (``create=True``); any process
    may then open it again (``create=False``) and write rows of any tensor, which is how the
    workers of the distributed engine write their parts of the same atom files.
    """

    def __init__(
        self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None, create: bool = True
    ) -> None:
        self.path = Path(path)
        self._specs = {s.name: s for s in specs}
        prefix, self._offsets = safetensors_header(list(specs), metadata)
        if create:
            with self.path.open("wb") as f:
                f.write(prefix)
                f.truncate(len(prefix) + sum(s.nbytes for s in specs))
        self._fd = os.open(self.path, os.O_WRONLY)

    def write_rows(self, name: str, first_row: int, rows: torch.Tensor) -> None:
        """Write ``rows`` as rows ``first_row, first_row + 1, ...`` of tensor ``name`` (the whole tensor if 0-D)."""
        spec = self._specs[name]
        if rows.dtype != spec.dtype:
            rows = rows.to(spec.dtype)
        data = tensor_bytes(rows)
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else spec.nbytes
        begin = first_row * row_bytes
        if begin + data.nbytes > spec.nbytes:
            raise RuntimeError(f"{self.path}: rows {first_row}.. overrun tensor {name!r}")
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], self._offsets[name] + begin + done)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __getstate__(self) -> dict[str, object]:
        raise TypeError("RowWriter holds an open file; send its path and specs instead")
