"""Bit packing of small unsigned codes, row by row.

Each row is packed on its own (padded to a whole byte), so a block of rows packs to the same
bytes whatever the chunking and a row's bytes are ``ceil(row_numel * bits / 8)``.
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
    return torch.stack(parts, dim=2).reshape(packed.shape[0], -1)[:, :n]
