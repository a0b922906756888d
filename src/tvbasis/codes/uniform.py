"""``int8``, ``int4``, ``int2``: symmetric uniform quantization with one float32 scale per row.

Row ``i`` gets scale ``max|row_i| / L`` with ``L = 2**(bits-1) - 1`` (127, 7, 1) and codes
``round(row_i / scale)`` in ``[-L, L]``, so every entry is off by at most ``scale / 2``.
int8 is exactly the store's quantizer (``tvbasis.store.quantize``); int4 and int2 codes are
offset to unsigned and packed two and four to a byte, row by row. int2 is symmetric, so it
uses three levels ``{-1, 0, 1} * max|row|``; ``lloydmax2`` uses all four.

Bytes: ``rows * ceil(row_numel * bits / 8) + 4 * rows``. A 1-D tensor is one row.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tvbasis.codes.core import Code, CodeSpec, TensorKey, no_args, row_view_shape, rows_of
from tvbasis.codes.packing import pack_rows, packed_row_bytes, unpack_rows
from tvbasis.store.quantize import dequantize_rows, quantize_rows

UNIFORM_BITS = {"int8": 8, "int4": 4, "int2": 2}


def levels_of(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def quantize(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed codes (int8) and float32 scales of a ``(rows, n)`` block at ``bits`` (8, 4 or 2)."""
    return quantize_rows(rows, levels_of(bits))


def pack_signed(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes as stored: int8 as is, narrower ones offset by ``2**(bits-1)`` and packed."""
    if bits == 8:
        return q
    return pack_rows((q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8), bits)


def unpack_signed(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return packed
    return (unpack_rows(packed, bits, n).to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def values_nbytes(rows: int, n: int, bits: int) -> int:
    """Bytes of ``rows`` rows of ``n`` codes at ``bits`` plus one float32 scale per row."""
    return rows * packed_row_bytes(n, bits) + 4 * rows


def _encode(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> Mapping[str, torch.Tensor]:
    bits = UNIFORM_BITS[spec.name]
    q, scale = quantize(rows_of(x), bits)
    return {"codes": pack_signed(q, bits), "scale": scale}


def _decode(
    spec: CodeSpec, shape: tuple[int, ...], key: TensorKey, payload: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    bits = UNIFORM_BITS[spec.name]
    _, n = row_view_shape(shape)
    q = unpack_signed(payload["codes"], bits, n)
    return dequantize_rows(q, payload["scale"]).reshape(shape)


def _nbytes(spec: CodeSpec, shape: tuple[int, ...]) -> int:
    return values_nbytes(*row_view_shape(shape), UNIFORM_BITS[spec.name])


CODES = (
    Code(
        names=tuple(UNIFORM_BITS),
        parse=no_args,
        format=lambda spec: spec.name,
        encode=_encode,
        decode=_decode,
        nbytes=_nbytes,
    ),
)
