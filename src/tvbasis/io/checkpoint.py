"""Lazy, read-only access to one model's tensors, whatever format it is stored in.

Supported inputs:

- a single ``.safetensors`` file;
- a Hugging Face model directory holding ``model.safetensors``, sharded safetensors with
  ``model.safetensors.index.json``, ``pytorch_model.bin`` or sharded ``.bin`` files with
  ``pytorch_model.bin.index.json``;
- a torch file (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) holding a state dict, loaded with
  ``weights_only=True`` (a nested ``state_dict`` key is unwrapped). Such files are memory
  mapped where the format allows, so only the rows asked for are paged in.

Safetensors reads are plain positional reads of the bytes the header points at, so a chunk
of rows is read without touching the rest of the tensor. Files are not memory mapped: pages
of a mapping stay in the reader's resident memory, which would grow with the inputs read.
"""

from __future__ import annotations

import json
import pickle
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from tvbasis.errors import CheckpointError
from tvbasis.io.paths import as_input_path, is_remote

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one stored tensor, and the file that holds it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    #: Where the tensor's bytes start in ``file`` (safetensors files only).
    offset: int | None = field(default=None, compare=False)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and validate a safetensors header, raising a clear error for a corrupt file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise CheckpointError(f"{path}: file not found") from None
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = meta["data_offsets"]
            shape = meta["shape"]
            valid = (
                isinstance(meta["dtype"], str)
                and isinstance(shape, list)
                and all(isinstance(v, int) and v >= 0 for v in [*shape, begin, stop])
                and begin <= stop
            )
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}")
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is not None and TensorInfo(name, tuple(shape), dtype, path).numel * dtype.itemsize != stop - begin:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {name!r} of shape {shape} takes "
                f"{stop - begin} bytes in the file"
            )
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file (header promises {8 + n + end} bytes, file has {size})"
        )
    return header


class Checkpoint:
    """A lazy view of one model's tensors.

    ``read(name, start, stop)`` returns rows ``start:stop`` of a tensor's first dimension
    (the whole tensor when both are None) without loading other tensors.
    """

    def __init__(
        self,
        path: Path,
        infos: dict[str, TensorInfo],
        kind: str,
        torch_state: dict[str, torch.Tensor] | None = None,
        index_file: Path | None = None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.index_file = index_file
        self._infos = infos
        self._torch_state = torch_state
        self._handles: dict[Path, Any] = {}
        self._file: tuple[Path, BinaryIO] | None = None  # the last file read (one fd per checkpoint)
        self._lock = threading.Lock()

    # -- metadata -----------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def weight_files(self) -> list[Path]:
        """The files holding tensors, in the order tensors are first found in them."""
        return list(dict.fromkeys(i.file for i in self._infos.values()))

    def names_in(self, file: Path) -> list[str]:
        return [i.name for i in self._infos.values() if i.file == file]

    # -- data -----------------------------------------------------------------------
    def read(
        self, name: str, start: int | None = None, stop: int | None = None, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (all of it when both are None).

        ``out``, a 1-D uint8 tensor of at least the rows' byte size, is memory to read into;
        the result is then a view of it, valid until ``out`` is reused. Tensors of a torch
        file are returned as they are, without copying.
        """
        info = self.info(name)
        if self._torch_state is not None:
            t = self._torch_state[name]
            return t if start is None and stop is None else t[start:stop]
        if info.offset is not None and sys.byteorder == "little":
            return self._read_bytes(info, start, stop, out)
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = safe_open(str(info.file), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{info.file}: cannot open safetensors file ({exc})") from None
            self._handles[info.file] = handle
        try:
            if start is None and stop is None:
                return handle.get_tensor(name)
            if not info.shape:
                return handle.get_tensor(name)
            return handle.get_slice(name)[start:stop]
        except SafetensorError as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r} ({exc})") from None

    def _read_bytes(
        self, info: TensorInfo, start: int | None, stop: int | None, out: torch.Tensor | None
    ) -> torch.Tensor:
        """Read rows of a safetensors tensor straight from the file (little-endian, as stored)."""
        assert info.offset is not None
        shape = info.shape
        begin = 0
        if shape and (start is not None or stop is not None):
            lo, hi, _ = slice(start, stop).indices(shape[0])
            hi = max(hi, lo)
            row_bytes = info.numel // shape[0] * info.dtype.itemsize if shape[0] else 0
            begin, shape = lo * row_bytes, (hi - lo, *shape[1:])
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * info.dtype.itemsize
        if out is None:
            flat = torch.empty(numel, dtype=info.dtype)
            raw = flat.view(torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        else:
            if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < nbytes:
                raise ValueError(f"out: need a 1-D uint8 tensor of at least {nbytes} bytes")
            raw = out[:nbytes]
            flat = raw.view(info.dtype) if nbytes else torch.empty(0, dtype=info.dtype)
        if nbytes:
            try:
                self._read_into(info.file, info.offset + begin, memoryview(raw.numpy()))
            except OSError as exc:
                raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r} ({exc})") from None
        return flat.reshape(shape)

    def _read_into(self, file: Path, offset: int, view: memoryview) -> None:
        """Fill ``view`` from ``file`` at ``offset``. Reads are serialised per checkpoint, and
        only the file last read stays open, so T checkpoints hold T descriptors however many
        shards they have."""
        with self._lock:
            if self._file is None or self._file[0] != file:
                self._close_file()
                self._file = (file, file.open("rb") if is_remote(file) else open(file, "rb", buffering=0))
            f = self._file[1]
            f.seek(offset)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise OSError("file is shorter than its header says")
                done += n

    def _close_file(self) -> None:
        if self._file is not None:
            self._file[1].close()
            self._file = None

    def close(self) -> None:
        self._handles.clear()
        with self._lock:
            self._close_file()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, kind={self.kind!r}, tensors={len(self._infos)})"


def _safetensors_infos(files: list[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        header = read_safetensors_header(file)
        data_start = 8 + _header_length(file)
        entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
        # Keep the file's storage order so sequential reads stay sequential.
        entries.sort(key=lambda kv: kv[1]["data_offsets"][0])
        for name, meta in entries:
            dtype = SAFETENSORS_DTYPES.get(meta.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
            if name in infos:
                raise CheckpointError(f"{file}: tensor {name!r} appears in more than one shard")
            shape = tuple(int(s) for s in meta["shape"])
            infos[name] = TensorInfo(name, shape, dtype, file, data_start + int(meta["data_offsets"][0]))
    return infos


def _header_length(path: Path) -> int:
    """The byte length of a safetensors header (its data section starts 8 bytes later)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return int(n)


def _load_torch_state(file: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Legacy (non-zip) torch files cannot be memory mapped.
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: file not found") from None
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{file}: refusing to load: this torch file needs code execution to unpickle "
            f"(weights_only=True failed: {first}). Convert it to safetensors with code you trust."
        ) from None
    except Exception as exc:  # torch raises many types for corrupt archives
        raise CheckpointError(f"{file}: cannot load torch file ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: torch file holds a {type(obj).__name__}, not a state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{file}: torch file holds no tensors")
    return state


def _torch_checkpoint(path: Path, files: list[Path], kind: str, index: Path | None) -> Checkpoint:
    state: dict[str, torch.Tensor] = {}
    infos: dict[str, TensorInfo] = {}
    for file in files:
        for name, t in _load_torch_state(file).items():
            if name in infos:
                raise CheckpointError(f"{file}: tensor {name!r} appears in more than one shard")
            state[name] = t
            infos[name] = TensorInfo(name, tuple(t.shape), t.dtype, file)
    return Checkpoint(path, infos, kind, torch_state=state, index_file=index)


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: cannot read shard index ({exc})") from None
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{index}: lists shard {f.name!r}, which is missing")
    return files


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint lazily; raise ``CheckpointError`` naming the path if it cannot be read.

    ``path`` may be a URL of an fsspec file system (safetensors files and directories only).
    """
    path = as_input_path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / SAFETENSORS_INDEX).is_file():
            index = path / SAFETENSORS_INDEX
            files = _index_files(index)
            return Checkpoint(path, _safetensors_infos(files), "hf-sharded-safetensors", index_file=index)
        if (path / "model.safetensors").is_file():
            file = path / "model.safetensors"
            return Checkpoint(path, _safetensors_infos([file]), "hf-safetensors")
        if is_remote(path) and ((path / BIN_INDEX).is_file() or (path / "pytorch_model.bin").is_file()):
            raise CheckpointError(f"{path}: torch weights are read from local paths only; use safetensors")
        if (path / BIN_INDEX).is_file():
            index = path / BIN_INDEX
            return _torch_checkpoint(path, _index_files(index), "hf-sharded-bin", index)
        if (path / "pytorch_model.bin").is_file():
            return _torch_checkpoint(path, [path / "pytorch_model.bin"], "hf-bin", None)
        raise CheckpointError(
            f"{path}: directory holds no model weights (looked for {SAFETENSORS_INDEX}, "
            f"model.safetensors, {BIN_INDEX}, pytorch_model.bin)"
        )
    if path.suffix == ".safetensors":
        return Checkpoint(path, _safetensors_infos([path]), "safetensors")
    if path.suffix in TORCH_SUFFIXES:
        if is_remote(path):
            raise CheckpointError(f"{path}: torch files are read from local paths only; convert it to safetensors")
        return _torch_checkpoint(path, [path], "torch", None)
    raise CheckpointError(
        f"{path}: unknown checkpoint format (expected .safetensors, a torch file "
        f"{'/'.join(TORCH_SUFFIXES)}, or a Hugging Face model directory)"
    )


def iter_tensors(ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of a checkpoint, one at a time."""
    for name in ckpt.names():
        yield name, ckpt.read(name)
