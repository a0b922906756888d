"""The store format, version 1.

A store is a directory that uploads to a model hub as it is::

    STORE/
      tvbasis.json            manifest, written last: format version, method and settings,
                              fitted scalars, tasks in order (source, content hash, metrics),
                              base fingerprint, tensor layout, files and byte counts
      matrices.safetensors    decoder (K x T), gram (T x T), atom_gram, atom_cross, state.*
      atoms/atom-000.safetensors ...   one file (or shards) per stored vector, keyed by the
      atoms/mean.safetensors           base's tensor names, so each is itself a task vector
      tensor_gram.safetensors  optional (``build --tensor-stats``): each tensor's own T x T Gram
                               matrix G_n, keyed by the tensor's name (sum over n = gram)
      residuals/task-000.safetensors ...  optional (``build --residual``/``--budget``): each task's
                               coded residual per tensor (see ``store.residuals``)
      README.md               a short model card

The directory is assembled under a temporary name and renamed when complete, and
``open_store`` checks that every file the manifest lists is there with its recorded size,
so an incomplete store never loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from tvbasis.errors import StoreError
from tvbasis.io.checkpoint import Checkpoint, TensorInfo, _safetensors_infos
from tvbasis.methods import METHODS, BasisMethod
from tvbasis.store.quantize import dequantize_rows, is_quantized, scale_name
from tvbasis.store.residuals import ResidualReader
from tvbasis.tasks.taskvectors import Chunk

FORMAT_NAME = "tvbasis-store"
FORMAT_VERSION = 1
MANIFEST = "tvbasis.json"
MATRICES = "matrices.safetensors"
ATOMS_DIR = "atoms"
#: Per-tensor Gram matrices (opt-in): one (T, T) float64 tensor per task-vector tensor.
TENSOR_GRAM = "tensor_gram.safetensors"
#: With them, each tensor's count of nonzero rows per task: one (T,) int64 tensor per tensor.
TENSOR_ROWS = "tensor_rows.safetensors"
#: ...and the tasks' mean squared norm of each row: one (rows,) float64 tensor per tensor.
TENSOR_ROW_ENERGY = "tensor_row_energy.safetensors"


def vector_names(n_atoms: int, has_mean: bool) -> list[str]:
    return [f"atom-{m:03d}" for m in range(n_atoms)] + (["mean"] if has_mean else [])


def save_matrices(path: Path, arrays: dict[str, np.ndarray]) -> None:
    save_numpy({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, str(path))


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def file_sizes(directory: Path) -> dict[str, int]:
    """Every file under ``directory`` (relative POSIX path -> bytes), the manifest excepted."""
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


@dataclass
class Store:
    """An opened, complete store. Reads atom rows lazily; holds only the small matrices."""

    path: Path
    manifest: dict[str, Any]
    matrices: dict[str, np.ndarray]
    method: BasisMethod

    # -- what it holds ------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]]

    @property
    def n_tasks(self) -> int:
        return int(self.manifest["n_tasks"])

    @property
    def n_atoms(self) -> int:
        return int(self.manifest["n_atoms"])

    @property
    def has_mean(self) -> bool:
        return bool(self.manifest["has_mean"])

    @property
    def decoder(self) -> np.ndarray:
        """``(K, T)``: task t is ``sum_k vector_k * decoder[k, t]`` (the mean's row is all ones)."""
        return self.matrices["decoder"]

    @property
    def gram(self) -> np.ndarray:
        return self.matrices["gram"]

    @property
    def has_tensor_grams(self) -> bool:
        return TENSOR_GRAM in self.manifest.get("files", {})

    @cached_property
    def tensor_grams(self) -> dict[str, np.ndarray] | None:
        """Each tensor's ``G_n = X_n^T X_n`` (T, T) in layout order, or None for a store built
        without ``--tensor-stats`` (read on first use: the file can be large)."""
        return self._per_tensor(TENSOR_GRAM, "Gram matrix")

    @cached_property
    def tensor_nonzero_rows(self) -> dict[str, np.ndarray] | None:
        """Each tensor's count of nonzero rows per task (T,) int64 in layout order, or None (a store
        without per-tensor statistics, or one whose Gram pass did not read the rows)."""
        counts = self._per_tensor(TENSOR_ROWS, "row counts")
        return None if counts is None else {n: c.astype(np.int64) for n, c in counts.items()}

    @cached_property
    def tensor_row_energy(self) -> dict[str, np.ndarray] | None:
        """Each tensor's per-row energy, the tasks' mean squared row norm (rows,) float64 in
        layout order, or None (as ``tensor_nonzero_rows``)."""
        return self._per_tensor(TENSOR_ROW_ENERGY, "row energies")

    def _per_tensor(self, file: str, what: str) -> dict[str, np.ndarray] | None:
        """One array per tensor from ``file`` in layout order, or None if the store has no such file."""
        if file not in self.manifest.get("files", {}):
            return None
        try:
            arrays = load_numpy(str(self.path / file))
        except Exception as exc:
            raise StoreError(f"{self.path / file}: cannot read ({exc})") from None
        missing = [n for n in self._shapes if n not in arrays]
        if missing:
            raise StoreError(f"{self.path / file}: no {what} for tensor {missing[0]!r}")
        return {n: arrays[n] for n in self._shapes}

    @property
    def tensors(self) -> list[TensorInfo]:
        """The task-vector tensors, in the store's fixed order (dtype: the base's)."""
        return [TensorInfo(name, tuple(shape), _dtype(dtype), Path()) for name, shape, dtype in self.manifest["layout"]]

    @cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(s) for n, s, _ in self.manifest["layout"]}

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def task_index(self, name: str) -> int:
        try:
            return self.task_names.index(name)
        except ValueError:
            raise StoreError(f"{self.path}: no task {name!r} (tasks: {', '.join(self.task_names)})") from None

    @cached_property
    def residuals(self) -> ResidualReader | None:
        """The coded residuals (``build --residual``/``--budget``), or None for a basis-only store."""
        entry = self.manifest.get("residuals")
        if entry is None:
            return None
        return ResidualReader(self.path, entry, self._shapes, self.task_names)

    # -- reading atoms ------------------------------------------------------------------
    @cached_property
    def _vectors(self) -> list[Checkpoint]:
        """One lazy reader per stored vector, opened on first use."""
        return [
            Checkpoint(self.path / ATOMS_DIR, _safetensors_infos([self.path / f for f in vec["files"]]), "store-atom")
            for vec in self.manifest["atoms"]["vectors"]
        ]

    def vector_rows(self, chunk: Chunk) -> torch.Tensor:
        """Rows of all K stored vectors for ``chunk``: ``(numel, K)`` float64 (regenerated if not stored)."""
        if not self.manifest["atoms"]["stored"]:
            return self.method.atom_rows(chunk, None)
        if self.residuals is not None and not self.residuals.covered(chunk.tensor):
            return torch.zeros(chunk.numel, int(self.manifest["n_vectors"]), dtype=torch.float64)
        cols = []
        quantized = is_quantized(self.manifest["atoms"]["dtype"], self.shape_of(chunk.tensor))
        for ckpt in self._vectors:
            info = ckpt.info(chunk.tensor)
            rows = ckpt.read(chunk.tensor) if not info.shape else ckpt.read(chunk.tensor, chunk.start, chunk.stop)
            if quantized:
                scale = ckpt.read(scale_name(chunk.tensor), chunk.start, chunk.stop)
                cols.append(dequantize_rows(rows.reshape(len(scale), -1), scale).reshape(-1))
            else:
                cols.append(rows.reshape(-1).to(torch.float64))
        if not cols:  # M = 0: residuals only
            return torch.zeros(chunk.numel, 0, dtype=torch.float64)
        return torch.stack(cols, dim=1)

    def combination_rows(
        self, chunk: Chunk, coefficients: np.ndarray, residual_weights: np.ndarray | None = None
    ) -> torch.Tensor:
        """``sum_k c_k * vector_k`` on ``chunk``'s rows, flat float64, plus ``sum_t r_t * R_hat_t``
        of the coded residuals when the store has them and ``residual_weights`` (``r``, one per
        task) is given: task-weighted addition with weights ``a`` is ``c = W a``, ``r = a``."""
        rows = self.vector_rows(chunk) @ torch.from_numpy(np.asarray(coefficients, dtype=np.float64))
        if residual_weights is not None and self.residuals is not None:
            extra = self.residuals.rows(chunk, np.asarray(residual_weights, dtype=np.float64))
            if extra is not None:
                rows += extra
        return rows

    def task_rows(self, chunk: Chunk, weights: np.ndarray) -> torch.Tensor:
        """Task-weighted addition ``sum_t a_t tau_hat_t`` on ``chunk``'s rows, residuals included."""
        weights = np.asarray(weights, dtype=np.float64)
        return self.combination_rows(chunk, self.decoder @ weights, weights)

    def task_columns(self, chunk: Chunk, tasks: list[int], weights: np.ndarray | None = None) -> torch.Tensor:
        """The reconstructions ``a_t tau_hat_t`` of ``tasks`` side by side: ``(numel, len(tasks))`` float64."""
        a = np.ones(len(tasks)) if weights is None else np.asarray(weights, dtype=np.float64)
        coefficients = torch.from_numpy(np.ascontiguousarray(self.decoder[:, tasks] * a))
        cols = self.vector_rows(chunk) @ coefficients
        if self.residuals is not None:
            cols += self.residuals.columns(chunk, tasks) * torch.from_numpy(a)
        return cols

    def summary(self) -> dict[str, Any]:
        """What ``tvbasis info --json`` prints."""
        m = self.manifest
        return {
            "path": str(self.path),
            "format_version": m["format_version"],
            "method": m["method"]["name"],
            "settings": m["method"]["params"],
            "fit": m["method"].get("report", {}),
            "M": m["n_atoms"],
            "T": m["n_tasks"],
            "stored_vectors": m["n_vectors"],
            "has_mean": m["has_mean"],
            "atom_dtype": m["atoms"]["dtype"],
            "tasks": [
                {
                    k: t[k]
                    for k in (
                        "name",
                        "input",
                        "rel_error",
                        "rel_error_unrounded",
                        "rel_error_basis",
                        "cosine",
                        "norm",
                        "source",
                        "content_hash",
                    )
                    if k in t
                }
                for t in m["tasks"]
            ],
            "dim": m["dim"],
            "bytes": m["bytes"],
            "base": {k: m["base"][k] for k in ("source", "fingerprint")},
            **({"tensor_stats": True} if self.has_tensor_grams else {}),
            **({"codes": self.code_summary()} if self.residuals is not None else {}),
        }

    def code_summary(self) -> dict[str, Any]:
        """How many tensors (and task-vector entries) each code holds: ``{"basis + int4": {...}}``."""
        assert self.residuals is not None
        out: dict[str, dict[str, int]] = {}
        for name, tc in self.residuals.codes.items():
            row = out.setdefault(str(tc), {"tensors": 0, "params": 0})
            row["tensors"] += 1
            row["params"] += int(np.prod(self.shape_of(name), dtype=np.int64))
        return out


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def open_store(path: str | Path) -> Store:
    """Open a store, refusing anything that is not complete and of a known format version."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path}: no such store directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: not a complete tvbasis store ({MANIFEST} is missing)") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path / MANIFEST}: unreadable manifest ({exc})") from None
    if manifest.get("format") != FORMAT_NAME:
        raise StoreError(f"{path / MANIFEST}: not a tvbasis store manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {manifest.get('format_version')} is not "
            f"supported (this tvbasis reads version {FORMAT_VERSION})"
        )
    for rel, size in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise StoreError(f"{path}: incomplete store, {rel} is missing")
        if f.stat().st_size != size:
            raise StoreError(f"{path}: corrupt store, {rel} has {f.stat().st_size} bytes, manifest says {size}")
    try:
        matrices = load_numpy(str(path / MATRICES))
    except Exception as exc:
        raise StoreError(f"{path / MATRICES}: cannot read ({exc})") from None
    meta = manifest["method"]
    cls = METHODS.get(meta["name"])
    if cls is None:
        raise StoreError(f"{path}: unknown method {meta['name']!r}")
    method = cls(**meta["params"])
    state = {k.removeprefix("state."): v for k, v in matrices.items() if k.startswith("state.")}
    method.load_state(state, meta.get("state", {}), matrices["decoder"])
    return Store(path=path, manifest=manifest, matrices=matrices, method=method)
