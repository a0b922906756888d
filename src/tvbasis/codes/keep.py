"""``keep:P[:intN|:sr2[:clip=C]][:seed=S]``: seeded random keep-and-rescale of coded values, no index bytes.

Exactly ``k = round(P * row_numel)`` (at least 1) entries of every row are kept, a uniformly
random subset drawn from (seed, tensor name, task, row); decoding puts their coded values back at
their places times ``row_numel / k`` and leaves the rest zero. The kept set is regenerated when
decoding, so only the kept codes and the scales are stored (the seed is in the spec, which the
store keeps anyway). Kept values are coded as:

- ``int8``/``int4``/``int2`` (``tvbasis.codes.uniform``): the row is quantized whole, with one
  float32 scale per row from the *whole* row, and the kept codes are stored. The expectation over
  the seed is the quantized tensor ``Q(x)``: unbiased up to quantization.
- ``sr2``: each kept value is clipped to ``[-a, a]``, ``a = C * RMS(row)`` (``C = clip``, default
  ``SR2_CLIP``; ``a`` stored as one bfloat16 per row), and rounded *at random* to one of the levels
  ``-a, -a/3, a/3, a``, up with probability equal to its distance above the level below, in
  steps. The expectation is the clipped tensor (on Gaussian rows 1.2% of the energy is clipped at
  C = 2, 0.04% at C = 3), and per byte it has about 40% (C = 2) or 18% (C = 3) less variance than
  ``int4``: unbiased error is the cheap kind. A wider clip trades variance for less bias, which
  pays where the budget leaves little variance (the planner tries both).

Every entry is kept with probability ``p = k / row_numel`` exactly, so an entry whose coded
value is ``c`` decodes with variance ``E[c^2] / p - (E c)^2``; ``keep_error`` gives the bias and
variance exactly. A fixed count per row (rather than a coin per entry) makes the bytes a
function of the shape.

The random numbers (the kept sets, and sr2's rounding, a separate stream) come in blocks of
``KEEP_BLOCK`` entries' worth of whole rows, each block its own generator, and a row's numbers
depend only on its index in the tensor, so a tensor coded in row blocks (chunks) is coded the
same whatever the chunking. A 1-D tensor is one row.

Bytes: ``rows * ceil(k * bits / 8) + 4 * rows`` for ``intN``; ``rows * (2 + ceil(k / 4))`` for
``sr2``, whose payload is one ``(rows, 2 + ceil(k / 4))`` byte matrix (each row its bfloat16 scale,
then its packed codes; part ``kept``), so a store gives it one entry per tensor and task.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping

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
    seed_arg,
)
from tvbasis.codes.packing import (
    ROW_SCALE_BYTES,
    pack_rows,
    packed_row_bytes,
    split_row_scales,
    unpack_rows,
    with_row_scales,
)
from tvbasis.codes.uniform import UNIFORM_BITS, pack_signed, quantize, unpack_signed, values_nbytes
from tvbasis.errors import TvbasisError
from tvbasis.store.quantize import dequantize_rows

#: Entries per random block (whole rows, at least one): part of the code's format, like a seed.
KEEP_BLOCK = 1 << 16
#: Separates this code's random streams from other seeded ones (DARE, random bases) with the same seed.
_STREAM = zlib.crc32(b"tvbasis.codes.keep")
_ROUND_STREAM = zlib.crc32(b"tvbasis.codes.keep.round")
#: ``(generator, shape) -> numbers``, drawn in row-major order (so a prefix of rows draws the same).
Draw = Callable[[np.random.Generator, tuple[int, int]], np.ndarray]
#: The value word of stochastic 2-bit rounding, and where it clips by default: this many times the row's RMS.
SR2 = "sr2"
SR2_CLIP = 2.0
#: sr2's levels in units of its scale ``a``: -a, -a/3, a/3, a (codes 0..3).
_SR2_STEP = 2.0 / 3.0


def uniform_blocks(
    keys: list[int], start: int, stop: int, n: int, cols: int, draw: Draw | None = None
) -> Iterator[np.ndarray]:
    """Uniforms ``(rows, cols)`` for rows ``start:stop`` of a tensor with rows of ``n``, block by block
    (or what ``draw(rng, shape)`` draws instead, e.g. random bytes).

    Each block of ``max(1, KEEP_BLOCK // n)`` whole rows has its own generator and a row's numbers
    depend only on its index, so any row range (chunk) gets the same numbers.
    """
    per_block = max(1, KEEP_BLOCK // n)
    for block in range(start // per_block, (stop - 1) // per_block + 1):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*keys, block])))
        first = block * per_block
        lo, hi = max(start, first) - first, min(stop, first + per_block) - first
        # drawing only up to row ``hi`` gives the same numbers as drawing the whole block
        yield (draw(rng, (hi, cols)) if draw else rng.random((hi, cols)))[lo:]


def stream_keys(seed: int, key: TensorKey, stream: int) -> list[int]:
    return [seed, zlib.crc32(key.tensor.encode("utf-8")), zlib.crc32(key.task.encode("utf-8")), stream]


def keep_positions(seed: int, key: TensorKey, rows: int, n: int, k: int, stream: int = _STREAM) -> torch.Tensor:
    """Sorted column indices ``(rows, k)`` kept in rows ``key.row : key.row + rows`` of a tensor with
    rows of ``n`` (another code passes its own ``stream``, so its subsets are not this code's)."""
    if k >= n or rows == 0:
        return torch.arange(k, dtype=torch.int64).expand(rows, k).clone()
    blocks = uniform_blocks(stream_keys(seed, key, stream), key.row, key.row + rows, n, n)
    parts = [np.sort(np.argpartition(u, k - 1, axis=1)[:, :k], axis=1) for u in blocks]
    return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])


def _params(spec: CodeSpec) -> tuple[float, int, int]:
    return float(spec.get("p")), int(spec.get("bits")), int(spec.get("seed"))


def is_stochastic(spec: CodeSpec) -> bool:
    """Whether kept values are rounded at random (``sr2``) rather than quantized with the row (``intN``)."""
    return dict(spec.params).get("round") == "stochastic"


def sr2_clip(spec: CodeSpec) -> float:
    """Where sr2 clips, in multiples of the row's RMS (specs at the default do not carry it)."""
    return float(dict(spec.params).get("clip", SR2_CLIP))


def _parse(head: str, args: list[str], text: str) -> CodeSpec:
    if not args:
        raise TvbasisError(f"code {text!r}: give the share to keep, e.g. keep:0.0625:int4:seed=0")
    p = fraction_arg(args[0], "keep share", text)
    bits, seed, stochastic, clip = 8, 0, False, SR2_CLIP
    for word in args[1:]:
        if word in UNIFORM_BITS:
            bits, stochastic = UNIFORM_BITS[word], False
        elif word == SR2:
            bits, stochastic = 2, True
        elif word.startswith("seed="):
            seed = seed_arg(word.removeprefix("seed="), text)
        elif word.startswith("clip="):
            clip = _clip_arg(word.removeprefix("clip="), text)
        else:
            expected = f"{', '.join(UNIFORM_BITS)}, {SR2}, clip=C or seed=S"
            raise TvbasisError(f"code {text!r}: unknown parameter {word!r}; expected {expected}")
    if clip != SR2_CLIP and not stochastic:
        raise TvbasisError(f"code {text!r}: clip=C sets where {SR2} clips; intN values are not clipped")
    # the default clip is left out of the spec, so specs (and stores) from before it existed compare equal
    clipping = (("clip", clip),) if clip != SR2_CLIP else ()
    rounding = (("round", "stochastic"),) if stochastic else ()
    return CodeSpec(head, (("bits", bits), *clipping, ("p", p), *rounding, ("seed", seed)))


def _clip_arg(value: str, text: str) -> float:
    try:
        clip = float(value)
    except ValueError:
        clip = float("nan")
    if not (0 < clip <= 64):  # also refuses nan and inf
        raise TvbasisError(f"code {text!r}: clip {value!r} must be a number of row RMS above 0 and at most 64")
    return clip


def _format(spec: CodeSpec) -> str:
    p, bits, seed = _params(spec)
    if not is_stochastic(spec):
        return f"keep:{p!r}:int{bits}:seed={seed}"
    clip = sr2_clip(spec)
    word = "" if clip == SR2_CLIP else f":clip={int(clip) if clip.is_integer() else clip!r}"
    return f"keep:{p!r}:{SR2}{word}:seed={seed}"


def sr2_scale(spec: CodeSpec, rows: torch.Tensor) -> torch.Tensor:
    """sr2's per-row clip ``a = clip * RMS(row)`` as stored (bfloat16: the range of float32 in 2 bytes)."""
    x = rows.to(torch.float64)
    rms = x.square().mean(dim=1).sqrt() if x.shape[1] else torch.zeros(x.shape[0], dtype=torch.float64)
    return (sr2_clip(spec) * rms).to(torch.bfloat16)


def _sr2_levels(values: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values clipped to ``[-a, a]``, their level below (0..2) and the fraction ``t`` of a step above it."""
    a = scale.to(torch.float64)[:, None]
    clipped = torch.maximum(torch.minimum(values.to(torch.float64), a), -a)
    z = clipped / torch.where(a > 0, a, torch.ones_like(a)) / _SR2_STEP + 1 / _SR2_STEP  # in [0, 3]
    below = z.floor().clamp(max=2)
    return clipped, below, z - below


def _sr2_value(level: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (level.to(torch.float64) * _SR2_STEP - 1) * scale.to(torch.float64)[:, None]


def _encode(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> Mapping[str, torch.Tensor]:
    p, bits, seed = _params(spec)
    rows = rows_of(x)
    n_rows, n = rows.shape
    k = count_of(p, n)
    pos = keep_positions(seed, key, n_rows, n, k)
    if not is_stochastic(spec):
        q, scale = quantize(rows, bits)
        return {"codes": pack_signed(q.gather(1, pos), bits), "scale": scale}
    scale = sr2_scale(spec, rows)
    _, below, t = _sr2_levels(rows.gather(1, pos), scale)
    if n_rows and k:
        blocks = uniform_blocks(stream_keys(seed, key, _ROUND_STREAM), key.row, key.row + n_rows, n, k)
        below += torch.from_numpy(np.concatenate(list(blocks))) < t
    return {"kept": with_row_scales(scale, pack_rows(below, 2))}


def _decode(
    spec: CodeSpec, shape: tuple[int, ...], key: TensorKey, payload: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    p, bits, seed = _params(spec)
    n_rows, n = row_view_shape(shape)
    k = count_of(p, n)
    pos = keep_positions(seed, key, n_rows, n, k)
    if is_stochastic(spec):
        scale, packed = split_row_scales(payload["kept"])
        kept = _sr2_value(unpack_rows(packed, 2, k), scale)
    else:
        kept = dequantize_rows(unpack_signed(payload["codes"], bits, k), payload["scale"])
    out = torch.zeros(n_rows, n, dtype=torch.float64)
    if k:
        out.scatter_(1, pos, kept * (n / k))
    return out.reshape(shape)


def _nbytes(spec: CodeSpec, shape: tuple[int, ...]) -> int:
    p, bits, _ = _params(spec)
    n_rows, n = row_view_shape(shape)
    k = count_of(p, n)
    if is_stochastic(spec):
        return n_rows * (ROW_SCALE_BYTES + packed_row_bytes(k, 2))
    return values_nbytes(n_rows, k, bits)


def _moments(spec: CodeSpec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per entry of ``rows_of(x)``, given it is kept: the coded value's mean and mean square (float64)."""
    _, bits, _ = _params(spec)
    rows = rows_of(x)
    if not is_stochastic(spec):
        q = dequantize_rows(*quantize(rows, bits))
        return q, q.square()
    scale = sr2_scale(spec, rows)
    clipped, below, t = _sr2_levels(rows, scale)
    return clipped, (1 - t) * _sr2_value(below, scale).square() + t * _sr2_value(below + 1, scale).square()


def expected_rows(spec: CodeSpec, x: torch.Tensor) -> torch.Tensor:
    """The decoded tensor's expectation over the seed (float64, ``x``'s shape): the quantized
    tensor for ``intN``, the tensor clipped to each row's ``[-a, a]`` for ``sr2``."""
    return _moments(spec, x)[0].reshape(x.shape)


def keep_error(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> tuple[float, float]:
    """Exact ``(||E x_hat - x||^2, E||x_hat - E x_hat||^2)``: with ``p = k / row_numel``, each entry's
    decoded value is its coded value ``c`` over ``p`` with probability ``p``, so its variance is
    ``E[c^2] / p - (E c)^2``."""
    p, _, _ = _params(spec)
    _, n = row_view_shape(tuple(x.shape))
    mean, square = _moments(spec, x)
    bias = float((mean - rows_of(x).to(torch.float64)).square().sum())
    k = count_of(p, n)
    variance = n / k * float(square.sum()) - float(mean.square().sum()) if k else 0.0
    return bias, max(variance, 0.0)


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
