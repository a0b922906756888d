"""Composable per-tensor codes for task vectors and residuals, with exact byte accounting (SPEC section 8).

A ``CodeSpec`` (parsed from a short string such as ``int4``, ``lloydmax2``, ``sign``,
``keep:0.0625:int4:seed=0``, ``rsign:0.125:seed=0``, ``topk:0.05``, ``lowrank:8``, ``fp16`` or
``none``) names a code; ``encode`` turns a tensor into an ``Encoded`` payload, ``decode`` turns
it back, and ``nbytes`` prices a shape without encoding (always equal to ``Encoded.nbytes``).
``bias_variance`` splits a code's expected squared error into bias and variance. See
docs/codes.md. Stores use them for residuals and per-tensor atoms (``store.residuals``).
"""

from tvbasis.codes.core import (
    Code,
    CodeError,
    CodeSpec,
    Encoded,
    TensorKey,
    bias_variance,
    code,
    decode,
    encode,
    nbytes,
    parse_code,
    registry,
)

__all__ = [
    "Code",
    "CodeError",
    "CodeSpec",
    "Encoded",
    "TensorKey",
    "bias_variance",
    "code",
    "decode",
    "encode",
    "nbytes",
    "parse_code",
    "registry",
]
