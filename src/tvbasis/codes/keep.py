"""``keep:P[:intN][:seed=S]``: seeded random keep-and-rescale of quantized values, no index bytes.

Each row is first quantized whole (``int8``/``int4``/``int2`` of ``tvbasis.codes.uniform``:
one float32 scale per row from the *whole* row), then exactly ``k = round(P * row_numel)``
(at least 1) of its codes are kept, a uniformly random subset drawn from
(seed, tensor name, task, row); decoding puts them back at their places times
``row_numel / k`` and leaves the rest zero. The kept set is regenerated when decoding, so only
the kept codes, the scales and the seed are stored.

Every entry is kept with probability ``p = k / row_numel`` exactly, so over the seed the
decoded tensor's expectation is the quantized tensor ``Q(x)`` (unbiased up to quantization)
and its variance is ``(1 - p) / p * ||Q(x)||^2``; ``keep_error`` gives both exactly. A fixed
count per row (rather than a coin per entry) makes the bytes a function of the shape.

The random numbers come in blocks of ``KEEP_BLOCK`` entries' worth of whole rows, each block
its own generator, and a row's subset depends only on its index in the tensor, so a tensor
coded in row blocks (chunks) gets the same subsets whatever the chunking. A 1-D tensor is one row.

Bytes: ``rows * ceil(k * bits / 8) + 4 * rows + 8`` (the seed, an int64).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
import torch

from tvbasis.codes.core import (
    Code,
    CodeSpec,
    TensorKey,
    count_of,
    fraction_arg,
    row_view_shape,
    rows_of,
)
from tvbasis.codes.uniform import UNIFORM_BITS, pack_signed, quantize, unpack_signed, values_nbytes
from tvbasis.errors import TvbasisError
from tvbasis.store.quantize import dequantize_rows

#: Entries per random block (whole rows, at least one): part of the code's format, like a seed.
KEEP_BLOCK = 1 << 16
#: Separates this code's random stream from other seeded ones (DARE, random bases) with the same seed.
_STREAM = zlib.crc32(b"tvbasis.codes.keep")
SEED_BYTES = 8


def keep_positions(seed: int, key: TensorKey, rows: int, n: int, k: int) -> torch.Tensor:
    """Sorted column indices ``(rows, k)`` kept in rows ``key.row : key.row + rows`` of a tensor with rows of ``n``."""
    if k >= n or rows == 0:
        return torch.arange(n, dtype=torch.int64).expand(rows, n).clone()
    keys = [seed, zlib.crc32(key.tensor.encode("utf-8")), zlib.crc32(key.task.encode("utf-8")), _STREAM]
    per_block = max(1, KEEP_BLOCK // n)
    start, stop = key.row, key.row + rows
    parts = []
    for block in range(start // per_block, (stop - 1) // per_block + 1):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*keys, block])))
        first = block * per_block
        lo, hi = max(start, first) - first, min(stop, first + per_block) - first
        # drawing only up to row ``hi`` gives the same numbers as drawing the whole block
        u = rng.random((hi, n))[lo:]
        parts.append(np.sort(np.argpartition(u, k - 1, axis=1)[:, :k], axis=1))
    return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])


def _params(spec: CodeSpec) -> tuple[float, int, int]:
    return float(spec.get("p")), int(spec.get("bits")), int(spec.get("seed"))


def _parse(head: str, args: list[str], text: str) -> CodeSpec:
    if not args:
        raise TvbasisError(f"code {text!r}: give the share to keep, e.g. keep:0.0625:int4:seed=0")
    p = fraction_arg(args[0], "keep share", text)
    bits, seed = 8, 0
    for word in args[1:]:
        if word in UNIFORM_BITS:
            bits = UNIFORM_BITS[word]
        elif word.startswith("seed="):
            value = word.removeprefix("seed=")
            if not value.isdigit():
                raise TvbasisError(f"code {text!r}: seed {value!r} must be a whole number 0 or more")
            seed = int(value)
        else:
            raise TvbasisError(
                f"code {text!r}: unknown parameter {word!r}; expected {', '.join(UNIFORM_BITS)} or seed=S"
            )
    return CodeSpec(head, (("bits", bits), ("p", p), ("seed", seed)))


def _format(spec: CodeSpec) -> str:
    p, bits, seed = _params(spec)
    return f"keep:{p!r}:int{bits}:seed={seed}"


def _encode(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> Mapping[str, torch.Tensor]:
    p, bits, seed = _params(spec)
    rows = rows_of(x)
    n_rows, n = rows.shape
    q, scale = quantize(rows, bits)
    pos = keep_positions(seed, key, n_rows, n, count_of(p, n))
    return {
        "codes": pack_signed(q.gather(1, pos), bits),
        "scale": scale,
        "seed": torch.tensor(seed, dtype=torch.int64),
    }


def _decode(
    spec: CodeSpec, shape: tuple[int, ...], key: TensorKey, payload: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    p, bits, _ = _params(spec)
    n_rows, n = row_view_shape(shape)
    k = count_of(p, n)
    pos = keep_positions(int(payload["seed"]), key, n_rows, n, k)
    kept = dequantize_rows(unpack_signed(payload["codes"], bits, k), payload["scale"])
    out = torch.zeros(n_rows, n, dtype=torch.float64)
    if k:
        out.scatter_(1, pos, kept * (n / k))
    return out.reshape(shape)


def _nbytes(spec: CodeSpec, shape: tuple[int, ...]) -> int:
    p, bits, _ = _params(spec)
    n_rows, n = row_view_shape(shape)
    return values_nbytes(n_rows, count_of(p, n), bits) + SEED_BYTES


def expected_rows(spec: CodeSpec, x: torch.Tensor) -> torch.Tensor:
    """The decoded tensor's expectation over the seed: the quantized tensor (float64, ``x``'s shape)."""
    _, bits, _ = _params(spec)
    return dequantize_rows(*quantize(rows_of(x), bits)).reshape(x.shape)


def keep_error(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> tuple[float, float]:
    """Exact ``(||Q(x) - x||^2, (1 - p) / p * ||Q(x)||^2)`` with ``p = k / row_numel``."""
    p, _, _ = _params(spec)
    _, n = row_view_shape(tuple(x.shape))
    expected = expected_rows(spec, x)
    bias = float((expected - x.to(torch.float64)).square().sum())
    k = count_of(p, n)
    variance = (n / k - 1) * float(expected.square().sum()) if k else 0.0
    return bias, variance


CODES = (
    Code(
        names=("keep",),
        parse=_parse,
        format=_format,
        encode=_encode,
        decode=_decode,
        nbytes=_nbytes,
        unbiased=True,
        error=keep_error,
    ),
)
