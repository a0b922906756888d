"""``rsign:P[:seed=S]``: the signs of a random share of a random rotation's coordinates, one scale per row.

Each row ``x`` (length ``n``) is rotated at random, ``y = R x`` with ``R`` orthogonal and drawn
from (seed, tensor name, task, row); ``k = round(P * n)`` of the rotated coordinates (at least
``MIN_KEPT``, or the whole row if shorter) are kept, a random subset, and stored as their signs,
with one bfloat16 scale per row

    s = ||x||^2 / sum_{j kept} |y_j|,        x_hat = R^T (s * sign(y) on the kept coordinates, 0 elsewhere).

This is the unbiased one-bit estimator of DRIVE (Vargaftik et al., NeurIPS 2021) with random
subsampling. Its projection on the row is exact, ``<x_hat, x> = ||x||^2`` for every seed, so the
error is orthogonal to ``x``; over the rotation it averages to zero (no bias, up to the bfloat16
scale). After a random rotation the coordinates are nearly Gaussian whatever the row looks like,
so the variance is a function of ``(n, k)`` alone: ``E||x_hat - x||^2 = v(n, k) ||x||^2`` with
``v ~ (pi n / 2k)(1 + 1.71 / k) - 1`` (``variance_factor`` computes it on the sphere). Per byte
this is about 40% less variance than ``keep:P:sr2`` (one bit a kept value instead of two, at
``pi / 2`` times the variance), with no clipping bias.

The rotation is a randomized Hadamard transform: a random permutation of the row, random signs,
then an orthonormal Walsh-Hadamard transform of the first ``a`` entries (``a`` the largest power
of two not above ``n``); when ``a < n``, new random signs and a second transform of the last
``a`` entries mix the rest in. It costs ``O(n log n)`` a row. Permutations, signs and kept
subsets come from the seeded row streams of ``tvbasis.codes.keep`` (each its own), so a tensor
coded in row blocks is coded the same whatever the chunking. A 1-D tensor is one row.

Bytes: ``rows * (2 + ceil(k / 8))``: one ``(rows, 2 + ceil(k / 8))`` byte matrix (each row its
bfloat16 scale, then its packed signs; part ``kept``).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

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
from tvbasis.codes.keep import keep_positions, stream_keys, uniform_blocks
from tvbasis.codes.packing import (
    ROW_SCALE_BYTES,
    pack_rows,
    packed_row_bytes,
    split_row_scales,
    unpack_rows,
    with_row_scales,
)
from tvbasis.errors import TvbasisError

#: Fewest kept coordinates of a row: the scale divides by their summed magnitudes, whose chance
#: of being near zero makes the variance infinite for k <= 2 and heavy-tailed just above.
MIN_KEPT = 8
#: This code's random streams (kept subsets, the rotation's signs), apart from ``keep``'s.
_KEEP_STREAM = zlib.crc32(b"tvbasis.codes.rsign.keep")
_SIGN_STREAM = zlib.crc32(b"tvbasis.codes.rsign.signs")
_PERMUTATION_STREAM = zlib.crc32(b"tvbasis.codes.rsign.permutation")
_FACTOR_SEED = zlib.crc32(b"tvbasis.codes.rsign.variance")


def kept_count(p: float, n: int) -> int:
    """Coordinates kept of a row of ``n``: the share's count, at least ``MIN_KEPT`` (all, for shorter rows)."""
    return max(count_of(p, n), min(n, MIN_KEPT))


def _params(spec: CodeSpec) -> tuple[float, int]:
    return float(spec.get("p")), int(spec.get("seed"))


def _parse(head: str, args: list[str], text: str) -> CodeSpec:
    if not args:
        raise TvbasisError(f"code {text!r}: give the share of rotated coordinates to keep, e.g. rsign:0.125:seed=0")
    p = fraction_arg(args[0], "share", text)
    seed = 0
    for word in args[1:]:
        if not word.startswith("seed="):
            raise TvbasisError(f"code {text!r}: unknown parameter {word!r}; expected seed=S")
        seed = seed_arg(word.removeprefix("seed="), text)
    return CodeSpec(head, (("p", p), ("seed", seed)))


def _format(spec: CodeSpec) -> str:
    p, seed = _params(spec)
    return f"rsign:{p!r}:seed={seed}"


# -- the rotation ---------------------------------------------------------------------------------
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard transform of every row of ``x`` (row length a power of two).

    Symmetric and orthogonal, so it is its own inverse. Butterflies in place, elementwise: a row's
    result does not depend on the other rows (a matrix product's could, through its blocking).
    """
    rows, a = x.shape
    y = x.clone()
    m = 1
    while m < a:
        halves = y.view(rows, m, 2, a // (2 * m))
        second = halves[:, :, 1].clone()
        halves[:, :, 1].neg_().add_(halves[:, :, 0])
        halves[:, :, 0].add_(second)
        m *= 2
    return y.mul_(a**-0.5) if a else y


def _block(n: int) -> int:
    """The transform's length: the largest power of two not above ``n``."""
    return 1 << (n.bit_length() - 1) if n else 0


@dataclass(frozen=True)
class Rotation:
    """A block of rows' random rotations: a permutation of each row, then random signs and the
    Hadamard transforms (``signs[1]`` is used only when the row length is not a power of two)."""

    permutation: torch.Tensor  # (rows, n) int64
    signs: torch.Tensor  # (2, rows, n) float64, +-1


def rotation(seed: int, key: TensorKey, rows: int, n: int) -> Rotation:
    """The rotations of rows ``key.row : key.row + rows`` of a tensor with rows of ``n``."""
    if rows == 0 or n == 0:
        return Rotation(torch.zeros(rows, n, dtype=torch.int64), torch.ones(2, rows, n, dtype=torch.float64))
    start, stop = key.row, key.row + rows
    u = uniform_blocks(stream_keys(seed, key, _PERMUTATION_STREAM), start, stop, n, n)
    permutation = torch.from_numpy(np.concatenate([np.argsort(block, axis=1) for block in u]))
    width = packed_row_bytes(2 * n, 1)
    raw = uniform_blocks(stream_keys(seed, key, _SIGN_STREAM), start, stop, n, width, _random_bytes)
    bits = np.unpackbits(np.concatenate(list(raw)), axis=1, count=2 * n, bitorder="little")
    signs = torch.from_numpy(bits).to(torch.float64).mul_(2).sub_(1)
    return Rotation(permutation, torch.stack((signs[:, :n], signs[:, n:])))


def _random_bytes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def rotate(x: torch.Tensor, r: Rotation) -> torch.Tensor:
    """``R x`` for every row of ``x`` (float64).

    The permutation spreads any structure of the row (a block of large entries) over both
    Hadamard blocks; without it, rows whose length is not a power of two come out biased.
    """
    n = x.shape[1]
    a = _block(n)
    y = x.gather(1, r.permutation) * r.signs[0]
    y = torch.cat([hadamard(y[:, :a]), y[:, a:]], dim=1)
    if a < n:
        y = y * r.signs[1]
        y = torch.cat([y[:, : n - a], hadamard(y[:, n - a :])], dim=1)
    return y


def unrotate(y: torch.Tensor, r: Rotation) -> torch.Tensor:
    """``R^T y``: the inverse of ``rotate``."""
    n = y.shape[1]
    a = _block(n)
    if a < n:
        y = torch.cat([y[:, : n - a], hadamard(y[:, n - a :])], dim=1) * r.signs[1]
    y = torch.cat([hadamard(y[:, :a]), y[:, a:]], dim=1) * r.signs[0]
    return torch.empty_like(y).scatter_(1, r.permutation, y)


# -- encode, decode, bytes, error ---------------------------------------------------------------------
def _encode(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> Mapping[str, torch.Tensor]:
    p, seed = _params(spec)
    rows = rows_of(x).to(torch.float64)
    n_rows, n = rows.shape
    k = kept_count(p, n)
    pos = keep_positions(seed, key, n_rows, n, k, _KEEP_STREAM)
    kept = rotate(rows, rotation(seed, key, n_rows, n)).gather(1, pos)
    magnitude = kept.abs().sum(dim=1)
    energy = rows.square().sum(dim=1)
    scale = torch.where(magnitude > 0, energy / torch.where(magnitude > 0, magnitude, 1.0), 0.0)
    return {"kept": with_row_scales(scale, pack_rows((kept >= 0).to(torch.uint8), 1))}


def _decode(
    spec: CodeSpec, shape: tuple[int, ...], key: TensorKey, payload: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    p, seed = _params(spec)
    n_rows, n = row_view_shape(shape)
    k = kept_count(p, n)
    scale, packed = split_row_scales(payload["kept"])
    signs = unpack_rows(packed, 1, k).to(torch.float64) * 2 - 1
    z = torch.zeros(n_rows, n, dtype=torch.float64)
    if k:
        z.scatter_(1, keep_positions(seed, key, n_rows, n, k, _KEEP_STREAM), signs * scale.to(torch.float64)[:, None])
    return unrotate(z, rotation(seed, key, n_rows, n)).reshape(shape)


def _nbytes(spec: CodeSpec, shape: tuple[int, ...]) -> int:
    p, _ = _params(spec)
    n_rows, n = row_view_shape(shape)
    return n_rows * (ROW_SCALE_BYTES + packed_row_bytes(kept_count(p, n), 1))


@lru_cache(maxsize=1024)
def variance_factor(n: int, k: int) -> float:
    """``v(n, k) = E||x_hat - x||^2 / ||x||^2`` when the rotated row is uniform on its sphere.

    With ``y = g / ||g||``, ``g`` standard normal in ``n`` dimensions, ``||x_hat||^2 = k s^2`` and the
    exact projection give ``v = E[k ||g||^2 / (sum_kept |g_j|)^2] - 1``; computed on a fixed set of
    draws (about 0.3% precision at ``k = 8``, better above), so the same ``(n, k)`` always gives
    the same number.
    """
    if n <= 1:
        return 0.0  # a single entry is coded exactly
    draws = int(min(16384, max(1024, (1 << 22) // max(k, 1))))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_FACTOR_SEED, n, k])))
    g = rng.standard_normal((draws, k))
    rest = rng.chisquare(n - k, draws) if n > k else 0.0
    total = np.square(g).sum(axis=1) + rest
    return float(np.mean(k * total / np.square(np.abs(g).sum(axis=1))) - 1.0)


def rsign_error(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> tuple[float, float]:
    """``(0, v(n, k) ||x||^2)``: no bias (the projection on every row is exact and the rest averages
    out over the rotation; the bfloat16 scale's rounding, at most 0.4% of a row, is left out)."""
    p, _ = _params(spec)
    _, n = row_view_shape(tuple(x.shape))
    energy = float(x.to(torch.float64).square().sum())
    return 0.0, variance_factor(n, kept_count(p, n)) * energy if n else 0.0


CODES = (
    Code(
        names=("rsign",),
        parse=_parse,
        format=_format,
        encode=_encode,
        decode=_decode,
        nbytes=_nbytes,
        unbiased=True,
        error=rsign_error,
    ),
)
