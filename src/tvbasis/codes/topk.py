"""``topk:F``: the ``k = round(F * numel)`` (at least 1) largest-magnitude entries of the whole tensor, fp16.

The kept values are stored as float16 in the order of their flat positions, and the
positions either as a bitmap (one bit per entry) or as ``k`` indices of the fewest whole
bytes that hold ``numel - 1`` (little-endian), whichever is smaller for the shape; the
decoder makes the same choice from the shape, so the choice costs nothing. Ties in magnitude
are broken by ``torch.topk``. Tensor-wide: it needs the whole tensor, not a row block.

Bytes: ``2 * k + min(ceil(numel / 8), k * index_width)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from tvbasis.codes.core import Code, CodeSpec, TensorKey, count_of, fraction_arg
from tvbasis.codes.packing import pack_rows, packed_row_bytes, unpack_rows
from tvbasis.errors import TvbasisError


def index_width(numel: int) -> int:
    """Bytes of one flat index into ``numel`` entries."""
    return max(1, ((numel - 1).bit_length() + 7) // 8)


def uses_bitmap(numel: int, k: int) -> bool:
    return packed_row_bytes(numel, 1) <= k * index_width(numel)


def _parse(head: str, args: list[str], text: str) -> CodeSpec:
    if len(args) != 1:
        raise TvbasisError(f"code {text!r}: give the share to keep, e.g. topk:0.05")
    return CodeSpec(head, (("fraction", fraction_arg(args[0], "top-k share", text)),))


def _k(spec: CodeSpec, numel: int) -> int:
    return count_of(float(spec.get("fraction")), numel)


def _encode(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> Mapping[str, torch.Tensor]:
    flat = x.reshape(-1).to(torch.float32)
    numel = flat.numel()
    k = _k(spec, numel)
    idx = torch.sort(torch.topk(flat.abs(), k).indices).values
    if uses_bitmap(numel, k):
        bitmap = torch.zeros(1, numel, dtype=torch.uint8)
        bitmap[0, idx] = 1
        where = pack_rows(bitmap, 1).reshape(-1)
    else:
        width = index_width(numel)
        # little-endian bytes of each index
        where = torch.stack([(idx >> (8 * b)) & 0xFF for b in range(width)], dim=1).to(torch.uint8).reshape(-1)
    return {"values": flat[idx].to(torch.float16), "positions": where}


def _decode(
    spec: CodeSpec, shape: tuple[int, ...], key: TensorKey, payload: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    numel = math.prod(shape)
    k = _k(spec, numel)
    where = payload["positions"]
    if uses_bitmap(numel, k):
        idx = unpack_rows(where.reshape(1, -1), 1, numel).reshape(-1).nonzero().reshape(-1)
    else:
        width = index_width(numel)
        parts = where.reshape(k, width).to(torch.int64)
        idx = sum((parts[:, b] << (8 * b) for b in range(width)), torch.zeros(k, dtype=torch.int64))
    out = torch.zeros(numel, dtype=torch.float64)
    out[idx] = payload["values"].to(torch.float64)
    return out.reshape(shape)


def _nbytes(spec: CodeSpec, shape: tuple[int, ...]) -> int:
    numel = math.prod(shape)
    k = _k(spec, numel)
    return 2 * k + min(packed_row_bytes(numel, 1), k * index_width(numel))


CODES = (
    Code(
        names=("topk",),
        parse=_parse,
        format=lambda spec: f"topk:{float(spec.get('fraction'))!r}",
        encode=_encode,
        decode=_decode,
        nbytes=_nbytes,
        row_local=False,
    ),
)
