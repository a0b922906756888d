"""The residual pass: code what the basis leaves of every task, tensor by tensor.

After the atoms are written, one more streaming pass reads the task vectors, subtracts the
basis' reconstruction ``S W`` as stored (so the codes correct the stored atoms' rounding too),
codes each task's residual with its tensor's code and writes it. Row-local codes go chunk by
chunk; tensor-wide codes (``topk``, ``lowrank``, ``rows:...``) and 1-D tensors are coded whole, so those
hold one tensor's T residuals in memory. The pass also measures every task's error through
the finished store, basis and decoded residual together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tvbasis.codes import TensorKey, decode, encode
from tvbasis.engine.streaming import _hash_rows
from tvbasis.io.hashing import ContentHash
from tvbasis.progress import progress
from tvbasis.store.residuals import ResidualWriter, TensorCode, whole_tensor
from tvbasis.tasks.taskvectors import Chunk, TaskVectorSet, plan_chunks

#: ``chunk -> (numel, T)`` float64: the basis' reconstruction of every task on the chunk.
BasisRows = Callable[[Chunk], torch.Tensor]


@dataclass
class TaskErrors:
    """Per task: ``||tau||^2``, ``||tau - tau_hat||^2``, ``<tau, tau_hat>`` and ``||tau_hat||^2``."""

    sq_norm: np.ndarray
    err_sq: np.ndarray
    inner: np.ndarray
    hat_sq: np.ndarray

    def metrics(self) -> dict[str, np.ndarray]:
        safe = np.where(self.sq_norm > 0, self.sq_norm, 1.0)
        rel = np.sqrt(np.where(self.sq_norm > 0, self.err_sq / safe, self.err_sq))
        denom = np.sqrt(self.sq_norm * self.hat_sq)
        cos = np.where(denom > 0, self.inner / np.where(denom > 0, denom, 1.0), 0.0)
        return {"sq_norm": self.sq_norm, "rel_error": rel, "cosine": np.clip(cos, -1.0, 1.0)}


def residual_chunks(tvs: TaskVectorSet, codes: dict[str, TensorCode], chunk_elements: int) -> list[Chunk]:
    """Chunks of the pass: rows as usual, the whole tensor where its code needs it (offsets kept)."""
    chunks: list[Chunk] = []
    offset = 0
    for info in tvs.tensors:
        if whole_tensor(codes[info.name].residual, info.shape):
            rows = info.shape[0] if info.shape else 1
            row_numel = info.numel // rows if rows else 0
            chunks.append(Chunk(info.name, 0, rows, row_numel, offset, True))
        else:
            chunks.extend(dataclasses.replace(c, offset=c.offset + offset) for c in plan_chunks([info], chunk_elements))
        offset += info.numel
    return chunks


def residual_pass(
    tvs: TaskVectorSet,
    basis_rows: BasisRows,
    writer: ResidualWriter,
    chunk_elements: int,
    hashers: list[ContentHash] | None = None,
    tensor_bases: dict[str, np.ndarray] | None = None,
) -> TaskErrors:
    """Code every task's residual into ``writer`` and return the tasks' errors through the store.

    ``hashers`` (base first, then each task) are fed the inputs' bytes, so the caller can check
    that they did not change since the Gram pass. ``tensor_bases`` holds, for each tensor with a
    basis of its own, its orthonormal PCA encoder ``B_n`` (T, m): its atoms ``X_n B_n`` are coded
    (with the tensor's ``atom_code``) and written, and its reconstruction is ``S_n B_n^T``."""
    T = tvs.n_tasks
    sums = TaskErrors(*(np.zeros(T) for _ in range(4)))
    names = tvs.task_names
    with progress(tvs.dim * (T + 1), "Residual pass", unit="param") as bar:
        for chunk in residual_chunks(tvs, writer.codes, chunk_elements):
            tc = writer.codes[chunk.tensor]
            shape = tvs.base.info(chunk.tensor).shape
            rows = tvs.read_rows(chunk)
            _hash_rows(hashers, chunk, rows)
            X = tvs.task_rows(rows)  # (numel, T) float64
            if tc.tensor_atoms:
                base = _tensor_basis(chunk, X, tensor_bases, writer, shape)
            else:
                base = basis_rows(chunk) if tc.basis else torch.zeros_like(X)
            R = X - base
            whole = whole_tensor(tc.residual, shape)
            block_shape = shape if whole else (chunk.stop - chunk.start, *shape[1:])
            hat = base.clone()
            if tc.residual.name != "none":
                for t in range(T):
                    key = TensorKey(chunk.tensor, names[t], 0 if whole else chunk.start)
                    enc = encode(tc.residual, R[:, t].reshape(block_shape), key)
                    writer.write(t, enc, chunk.start, whole)
                    hat[:, t] += decode(enc).reshape(-1)
            sums.sq_norm += (X * X).sum(0).numpy()
            sums.err_sq += ((X - hat) ** 2).sum(0).numpy()
            sums.inner += (X * hat).sum(0).numpy()
            sums.hat_sq += (hat * hat).sum(0).numpy()
            bar.update(chunk.numel * (T + 1))
    return sums


def _tensor_basis(
    chunk: Chunk,
    X: torch.Tensor,
    tensor_bases: dict[str, np.ndarray] | None,
    writer: ResidualWriter,
    shape: tuple[int, ...],
) -> torch.Tensor:
    """Code and write the chunk's rows of a per-tensor basis' atoms; return its reconstruction ``(numel, T)``."""
    assert tensor_bases is not None and chunk.tensor in tensor_bases, f"no basis fitted for {chunk.tensor}"
    B = torch.from_numpy(np.ascontiguousarray(tensor_bases[chunk.tensor]))  # (T, m)
    if chunk.start == 0:
        writer.write_coefficients(chunk.tensor, B.T.contiguous())
    S = X @ B
    atom_code = writer.codes[chunk.tensor].atom_code
    whole = whole_tensor(atom_code, shape)
    block_shape = shape if whole else (chunk.stop - chunk.start, *shape[1:])
    stored = torch.empty_like(S)
    for j in range(S.shape[1]):
        enc = encode(atom_code, S[:, j].reshape(block_shape), TensorKey(chunk.tensor, "", 0 if whole else chunk.start))
        writer.write_atom(j, enc, chunk.start, whole)
        stored[:, j] = decode(enc).reshape(-1)
    return stored @ B.T
