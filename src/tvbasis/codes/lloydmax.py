"""``lloydmax2``: two bits per entry at the four Lloyd-Max levels of a Gaussian, one float32 sigma per row.

Row ``i`` stores ``sigma_i = sqrt(mean(row_i ** 2))`` (the row's RMS: task-vector rows are
close to zero-mean) and, per entry, which of ``-b, -a, a, b`` times ``sigma_i`` is nearest,
with ``a = 0.45278``, ``b = 1.51042`` and decision thresholds ``0, +-0.98160`` sigma: the
minimum-squared-error 4-level quantizer of a normal distribution (Max, 1960), where each level
is the mean of the normal over its cell. Indices are packed four to a byte, row by row.

Bytes: ``rows * ceil(row_numel / 4) + 4 * rows``. A 1-D tensor is one row.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tvbasis.codes.core import Code, CodeSpec, TensorKey, no_args, row_view_shape, rows_of
from tvbasis.codes.packing import pack_rows, unpack_rows
from tvbasis.codes.uniform import values_nbytes

#: Inner and outer level of the 4-level Lloyd-Max quantizer of N(0, 1); the threshold is their mean.
LEVEL_INNER = 0.4527800346364921
LEVEL_OUTER = 1.510417608499096
THRESHOLD = (LEVEL_INNER + LEVEL_OUTER) / 2
#: Level of each 2-bit index.
LEVELS = (-LEVEL_OUTER, -LEVEL_INNER, LEVEL_INNER, LEVEL_OUTER)


def _encode(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> Mapping[str, torch.Tensor]:
    rows = rows_of(x).to(torch.float64)
    sigma = rows.square().mean(dim=1).sqrt() if rows.shape[1] else torch.zeros(rows.shape[0], dtype=torch.float64)
    sigma32 = sigma.to(torch.float32)
    safe = torch.where(sigma32 > 0, sigma32, torch.ones_like(sigma32)).to(torch.float64)
    z = rows / safe[:, None]
    # index = cell of z among (-inf, -t), [-t, 0), [0, t), [t, inf)
    idx = (z >= -THRESHOLD).to(torch.uint8) + (z >= 0).to(torch.uint8) + (z >= THRESHOLD).to(torch.uint8)
    return {"codes": pack_rows(idx, 2), "sigma": sigma32}


def _decode(
    spec: CodeSpec, shape: tuple[int, ...], key: TensorKey, payload: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    _, n = row_view_shape(shape)
    idx = unpack_rows(payload["codes"], 2, n).long()
    levels = torch.tensor(LEVELS, dtype=torch.float64)
    return (levels[idx] * payload["sigma"].to(torch.float64)[:, None]).reshape(shape)


def _nbytes(spec: CodeSpec, shape: tuple[int, ...]) -> int:
    return values_nbytes(*row_view_shape(shape), 2)


CODES = (
    Code(
        names=("lloydmax2",),
        parse=no_args,
        format=lambda spec: spec.name,
        encode=_encode,
        decode=_decode,
        nbytes=_nbytes,
    ),
)
