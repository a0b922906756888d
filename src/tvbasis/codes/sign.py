"""``sign``: one sign bit per entry times one float32 mean magnitude per row.

Row ``i`` decodes to ``sign(row_i) * mean(|row_i|)``, the least-squares magnitude for fixed
signs. Zero entries get the + sign. Bits are packed eight to a byte, row by row.

Bytes: ``rows * ceil(row_numel / 8) + 4 * rows``. A 1-D tensor is one row.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tvbasis.codes.core import Code, CodeSpec, TensorKey, no_args, row_view_shape, rows_of
from tvbasis.codes.packing import pack_rows, unpack_rows
from tvbasis.codes.uniform import values_nbytes


def _encode(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> Mapping[str, torch.Tensor]:
    rows = rows_of(x).to(torch.float64)
    magnitude = rows.abs().mean(dim=1) if rows.shape[1] else torch.zeros(rows.shape[0], dtype=torch.float64)
    return {"signs": pack_rows((rows >= 0).to(torch.uint8), 1), "magnitude": magnitude.to(torch.float32)}


def _decode(
    spec: CodeSpec, shape: tuple[int, ...], key: TensorKey, payload: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    _, n = row_view_shape(shape)
    signs = unpack_rows(payload["signs"], 1, n).to(torch.float64) * 2 - 1
    return (signs * payload["magnitude"].to(torch.float64)[:, None]).reshape(shape)


def _nbytes(spec: CodeSpec, shape: tuple[int, ...]) -> int:
    return values_nbytes(*row_view_shape(shape), 1)


CODES = (
    Code(
        names=("sign",),
        parse=no_args,
        format=lambda spec: spec.name,
        encode=_encode,
        decode=_decode,
        nbytes=_nbytes,
    ),
)
