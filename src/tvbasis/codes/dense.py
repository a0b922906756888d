"""``none`` stores nothing and decodes to zeros; ``fp32``, ``fp16``, ``bf16`` store every entry.

Bytes: 0 for ``none``; ``numel * (4, 2, 2)`` for the dense codes. All are row-local.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from tvbasis.codes.core import Code, CodeSpec, TensorKey, no_args

DENSE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _encode_dense(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> Mapping[str, torch.Tensor]:
    return {"values": x.to(DENSE_DTYPES[spec.name]).contiguous()}


def _decode_dense(
    spec: CodeSpec, shape: tuple[int, ...], key: TensorKey, payload: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    return payload["values"].to(torch.float64).reshape(shape)


def _nbytes_dense(spec: CodeSpec, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DENSE_DTYPES[spec.name].itemsize


def _encode_none(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> Mapping[str, torch.Tensor]:
    return {}


def _decode_none(
    spec: CodeSpec, shape: tuple[int, ...], key: TensorKey, payload: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float64)


CODES = (
    Code(
        names=tuple(DENSE_DTYPES),
        parse=no_args,
        format=lambda spec: spec.name,
        encode=_encode_dense,
        decode=_decode_dense,
        nbytes=_nbytes_dense,
    ),
    Code(
        names=("none",),
        parse=no_args,
        format=lambda spec: spec.name,
        encode=_encode_none,
        decode=_decode_none,
        nbytes=lambda spec, shape: 0,
    ),
)
