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
from tvbasis.codes.packing import pack_positions, positions_nbytes, unpack_positions
from tvbasis.errors import TvbasisError


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
    return {"values": flat[idx].to(torch.float16), "positions": pack_positions(idx, numel)}


def _decode(
    spec: CodeSpec, shape: tuple[int, ...], key: TensorKey, payload: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    numel = math.prod(shape)
    k = _k(spec, numel)
    idx = unpack_positions(payload["positions"], numel, k)
    out = torch.zeros(numel, dtype=torch.float64)
    out[idx] = payload["values"].to(torch.float64)
    return out.reshape(shape)


def _nbytes(spec: CodeSpec, shape: tuple[int, ...]) -> int:
    numel = math.prod(shape)
    k = _k(spec, numel)
    return 2 * k + positions_nbytes(numel, k)


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
