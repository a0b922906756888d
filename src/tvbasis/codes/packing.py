"""Bit packing of small unsigned codes, row by row, and of sorted positions.

Each row is packed on its own (padded to a whole byte), so a block of rows packs to the same
bytes whatever the chunking and a row's bytes are ``ceil(row_numel * bits / 8)``. A sorted set
of ``k`` positions among ``n`` is stored as a bitmap or as ``k`` little-endian indices of the
fewest whole bytes, whichever is smaller: the choice follows from ``(n, k)``, so it costs nothing.
"""

from __future__ import annotations

import torch

PACK_BITS = (1, 2, 4, 8)


def packed_row_bytes(row_numel: int, bits: int) -> int:
    return (row_numel * bits + 7) // 8


def pack_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``(rows, n)`` codes in ``[0, 2**bits)`` into ``(rows, ceil(n * bits / 8))`` uint8, low bits first."""
    if bits not in PACK_BITS:
        raise ValueError(f"bits {bits}: choose one of {PACK_BITS}")
    u = u.to(torch.uint8)
    if bits == 8:
        return u.clone()
    per = 8 // bits
    rows, n = u.shape
    if rows == 0:
        return torch.zeros(0, packed_row_bytes(n, bits), dtype=torch.uint8)
    pad = -n % per
    if pad:
        u = torch.cat([u, torch.zeros(rows, pad, dtype=torch.uint8)], dim=1)
    u = u.reshape(rows, -1, per)
    out = torch.zeros(u.shape[:2], dtype=torch.uint8)
    for j in range(per):
        out |= u[:, :, j] << (bits * j)
    return out


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: ``(rows, n)`` uint8 codes."""
    if bits not in PACK_BITS:
        raise ValueError(f"bits {bits}: choose one of {PACK_BITS}")
    if bits == 8:
        return packed[:, :n]
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per)]
    return torch.stack(parts, dim=2).reshape(packed.shape[0], packed.shape[1] * per)[:, :n]


def index_width(n: int) -> int:
    """Bytes of one index into ``n`` positions."""
    return max(1, ((n - 1).bit_length() + 7) // 8)


def uses_bitmap(n: int, k: int) -> bool:
    """Whether ``k`` positions among ``n`` take fewer bytes (or as few) as a bitmap than as indices."""
    return packed_row_bytes(n, 1) <= k * index_width(n)


def positions_nbytes(n: int, k: int) -> int:
    return min(packed_row_bytes(n, 1), k * index_width(n))


def pack_positions(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted positions ``idx`` (int64) among ``n`` as uint8 bytes: a bitmap or little-endian indices."""
    k = idx.numel()
    if uses_bitmap(n, k):
        bitmap = torch.zeros(1, n, dtype=torch.uint8)
        bitmap[0, idx] = 1
        return pack_rows(bitmap, 1).reshape(-1)
    width = index_width(n)
    return torch.stack([(idx >> (8 * b)) & 0xFF for b in range(width)], dim=1).to(torch.uint8).reshape(-1)


def unpack_positions(where: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_positions``: the ``k`` sorted positions, int64."""
    if uses_bitmap(n, k):
        return unpack_rows(where.reshape(1, -1), 1, n).reshape(-1).nonzero().reshape(-1)
    width = index_width(n)
    parts = where.reshape(k, width).to(torch.int64)
    return sum((parts[:, b] << (8 * b) for b in range(width)), torch.zeros(k, dtype=torch.int64))


#: Bytes of the bfloat16 scale that ``with_row_scales`` puts before each row's packed codes.
ROW_SCALE_BYTES = 2


def with_row_scales(scale: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """One ``(rows, 2 + width)`` byte matrix: each row's bfloat16 ``scale``, then its ``packed`` codes.

    A code that stores both as one payload part costs a store one header entry per tensor and
    task instead of two.
    """
    head = scale.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(-1, ROW_SCALE_BYTES)
    return torch.cat([head, packed], dim=1)


def split_row_scales(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``with_row_scales``: the ``(rows,)`` bfloat16 scales and the packed codes."""
    scale = kept[:, :ROW_SCALE_BYTES].contiguous().reshape(-1).view(torch.bfloat16)
    return scale, kept[:, ROW_SCALE_BYTES:]
