"""How atoms are rounded to the store dtype: fp32, fp16, bf16, or int8 with per-row scales.

int8 is symmetric and per output channel: every row of a tensor with two or more dimensions
(``W[i, ...]``) gets its own scale ``max|row| / 127`` and is stored as ``round(row / scale)``;
the scales are float32 tensors named ``{name}.qscale`` beside the int8 tensor in the same
file. One- and zero-dimensional tensors (biases, norms: a negligible share of the bytes,
and rows of one entry each) stay float32. Rows are whole within a chunk, so quantizing is
chunk-local and streams.

``quantize_rows`` also takes fewer levels (int4, int2) for the codes of ``tvbasis.codes``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tvbasis.errors import TvbasisError

#: The store dtypes ``--dtype`` accepts, and the torch dtype each stores its atoms' values in.
STORE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
}
SCALE_SUFFIX = ".qscale"
INT8_LEVELS = 127


def check_store_dtype(dtype: str) -> torch.dtype:
    if dtype not in STORE_DTYPES:
        raise TvbasisError(f"--dtype {dtype!r}: choose one of {', '.join(STORE_DTYPES)}")
    return STORE_DTYPES[dtype]


def is_quantized(dtype: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` is stored as int8 plus scales in a ``dtype`` store."""
    return dtype == "int8" and len(shape) >= 2


def value_dtype(dtype: str, shape: tuple[int, ...]) -> torch.dtype:
    """The dtype a tensor of ``shape`` has in the atom files of a ``dtype`` store."""
    if dtype == "int8":
        return torch.int8 if is_quantized(dtype, shape) else torch.float32
    return STORE_DTYPES[dtype]


def scale_name(tensor: str) -> str:
    return tensor + SCALE_SUFFIX


def check_scale_names(
    shapes: Mapping[str, tuple[int, ...]], dtype: str, where: object, remedy: str = "choose another --dtype"
) -> None:
    """Refuse tensors (of ``where``) whose names would clash with the int8 scales of others."""
    for name, shape in shapes.items():
        if is_quantized(dtype, shape) and scale_name(name) in shapes:
            raise TvbasisError(
                f"tensor {scale_name(name)!r} of {where} clashes with the int8 scales of {name!r}; {remedy}"
            )


def quantize_rows(rows: torch.Tensor, levels: int = INT8_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes in ``[-levels, levels]`` (as int8) and float32 scales of a ``(n_rows, row_numel)`` block.

    One scale per row, ``max|row| / levels``, and round to nearest. The store uses int8
    (``levels = 127``); ``tvbasis.codes`` also int4 (7) and int2 (1), packing the codes itself.
    """
    if not 1 <= levels <= INT8_LEVELS:
        raise ValueError(f"levels {levels}: must be in 1..{INT8_LEVELS}")
    x = rows.to(torch.float32)
    scale = x.abs().amax(dim=1) / levels if x.shape[1] else torch.zeros(x.shape[0], dtype=torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe[:, None]).clamp_(-levels, levels).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 values of int8 codes ``(n_rows, row_numel)`` with per-row scales."""
    return q.to(torch.float64) * scale.to(torch.float64)[:, None]
