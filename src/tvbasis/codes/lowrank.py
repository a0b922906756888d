"""``lowrank:R[:fp16|fp32]``: the rank-R truncated SVD of the tensor's ``(rows, row_numel)`` view.

Stores ``A = U_r sqrt(S_r)`` (rows x r) and ``B = sqrt(S_r) V_r^T`` (r x row_numel) in
float16 (default) or float32, with ``r = min(R, rows, row_numel)``; decodes to ``A @ B``.
Splitting the singular values evenly keeps both factors in float16's range. At full rank
(fp32 factors) it is exact up to float32 rounding. Tensor-wide: the SVD needs the whole
tensor. A 1-D tensor is one row (rank 1 is then exact).

Bytes: ``(rows + row_numel) * r * (2 or 4)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tvbasis.codes.core import Code, CodeSpec, TensorKey, row_view_shape, rows_of
from tvbasis.errors import TvbasisError

FACTOR_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def _parse(head: str, args: list[str], text: str) -> CodeSpec:
    if not 1 <= len(args) <= 2:
        raise TvbasisError(f"code {text!r}: give the rank and optionally the factor dtype, e.g. lowrank:8:fp16")
    if not args[0].isdigit() or int(args[0]) < 1:
        raise TvbasisError(f"code {text!r}: rank {args[0]!r} must be a whole number 1 or more")
    dtype = args[1] if len(args) == 2 else "fp16"
    if dtype not in FACTOR_DTYPES:
        raise TvbasisError(f"code {text!r}: factor dtype {dtype!r}: choose one of {', '.join(FACTOR_DTYPES)}")
    return CodeSpec(head, (("dtype", dtype), ("rank", int(args[0]))))


def _rank(spec: CodeSpec, shape: tuple[int, ...]) -> int:
    return min(int(spec.get("rank")), *row_view_shape(shape))


def _encode(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> Mapping[str, torch.Tensor]:
    dtype = FACTOR_DTYPES[str(spec.get("dtype"))]
    r = _rank(spec, tuple(x.shape))
    rows = rows_of(x).to(torch.float64)
    if r == 0:
        return {"left": torch.zeros(rows.shape[0], 0, dtype=dtype), "right": torch.zeros(0, rows.shape[1], dtype=dtype)}
    U, S, Vh = torch.linalg.svd(rows, full_matrices=False)
    root = S[:r].sqrt()
    return {"left": (U[:, :r] * root).to(dtype), "right": (root[:, None] * Vh[:r]).to(dtype)}


def _decode(
    spec: CodeSpec, shape: tuple[int, ...], key: TensorKey, payload: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    return (payload["left"].to(torch.float64) @ payload["right"].to(torch.float64)).reshape(shape)


def _nbytes(spec: CodeSpec, shape: tuple[int, ...]) -> int:
    rows, n = row_view_shape(shape)
    size = FACTOR_DTYPES[str(spec.get("dtype"))].itemsize
    return (rows + n) * _rank(spec, shape) * size


CODES = (
    Code(
        names=("lowrank",),
        parse=_parse,
        format=lambda spec: f"lowrank:{spec.get('rank')}:{spec.get('dtype')}",
        encode=_encode,
        decode=_decode,
        nbytes=_nbytes,
        row_local=False,
    ),
)
