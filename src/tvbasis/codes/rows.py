"""``rows:CODE``: only the rows that are not all zero, coded with ``CODE``; zero rows cost nothing.

Fine-tuning leaves whole rows untouched where the gradient never reaches them: the embeddings
of tokens (and positions) the task's data never contain. A task's word-embedding delta may
have a few hundred nonzero rows out of 30,000; a code priced by the shape (``keep``, ``int4``
...) pays for every zero row. This code stores which rows are nonzero (``count``, an int64,
and their positions as a bitmap or as indices, whichever is smaller: ``codes.packing``) and
codes the ``(count, ...)`` matrix of those rows with the inner ``CODE`` (any code but ``none``
and ``rows`` itself; its payload parts keep their names). Decoding puts the rows back and
leaves the rest exactly zero, so the error is the inner code's on the nonzero rows.

The bytes depend on the data (``sparse_nbytes`` gives them from the count; ``nbytes`` from the
shape alone prices every row nonzero). Tensor-wide: it needs the whole tensor at once.

Bytes: ``8 + min(ceil(rows / 8), count * index_width(rows)) + inner bytes of (count, ...)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tvbasis.codes.core import (
    Code,
    CodeSpec,
    Encoded,
    TensorKey,
    bias_variance,
    decode,
    encode,
    nbytes,
    parse_code,
    row_view_shape,
    rows_of,
)
from tvbasis.codes.packing import pack_positions, positions_nbytes, unpack_positions
from tvbasis.errors import TvbasisError

#: Payload parts of the row set; the inner code's parts must not use these names.
COUNT, POSITIONS = "count", "rows"
#: The parts this code stores itself, before the inner code's.
OWN_PARTS = (COUNT, POSITIONS)


def inner_spec(spec: CodeSpec) -> CodeSpec:
    """The code of the nonzero rows."""
    return parse_code(str(spec.get("inner")))


def _parse(head: str, args: list[str], text: str) -> CodeSpec:
    if not args or not args[0]:
        raise TvbasisError(f"code {text!r}: name the code of the nonzero rows, e.g. rows:keep:0.25:int4:seed=0")
    inner = parse_code(":".join(args))
    if inner.name in ("none", head):
        raise TvbasisError(f"code {text!r}: the nonzero rows need a code other than {inner.name!r}")
    return CodeSpec(head, (("inner", str(inner)),))


def _nonzero(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions of the nonzero rows, those rows)`` of ``x``'s row view."""
    rows = rows_of(x)
    idx = rows.ne(0).any(dim=1).nonzero().reshape(-1)
    return idx, rows[idx]


def inner_shape(shape: tuple[int, ...], count: int) -> tuple[int, ...]:
    return (count, *shape[1:]) if len(shape) >= 2 else (count, *shape)


def _encode(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> Mapping[str, torch.Tensor]:
    n_rows, _ = row_view_shape(tuple(x.shape))
    idx, kept = _nonzero(x)
    inner = encode(inner_spec(spec), kept.reshape(inner_shape(tuple(x.shape), len(idx))), key)
    clash = {COUNT, POSITIONS} & set(inner.payload)
    if clash:  # a code added later with these part names: a bug, not user input
        raise RuntimeError(f"code {inner.spec}: payload part {sorted(clash)[0]!r} clashes with rows:")
    return {
        COUNT: torch.tensor(len(idx), dtype=torch.int64),
        POSITIONS: pack_positions(idx, n_rows),
        **inner.payload,
    }


def _decode(
    spec: CodeSpec, shape: tuple[int, ...], key: TensorKey, payload: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    n_rows, row_numel = row_view_shape(shape)
    count = int(payload[COUNT])
    idx = unpack_positions(payload[POSITIONS], n_rows, count)
    inner_payload = {k: v for k, v in payload.items() if k not in (COUNT, POSITIONS)}
    kept = decode(Encoded(inner_spec(spec), inner_shape(shape, count), key, inner_payload))
    out = torch.zeros(n_rows, row_numel, dtype=torch.float64)
    out[idx] = kept.reshape(count, row_numel)
    return out.reshape(shape)


def _sparse_nbytes(spec: CodeSpec, shape: tuple[int, ...], count: int) -> int:
    n_rows, _ = row_view_shape(shape)
    if not 0 <= count <= n_rows:
        raise TvbasisError(f"code {spec}: {count} nonzero rows of a tensor with {n_rows}")
    return 8 + positions_nbytes(n_rows, count) + nbytes(inner_spec(spec), inner_shape(shape, count))


def _nbytes(spec: CodeSpec, shape: tuple[int, ...]) -> int:
    return _sparse_nbytes(spec, shape, row_view_shape(shape)[0])


def _error(spec: CodeSpec, x: torch.Tensor, key: TensorKey) -> tuple[float, float]:
    """The inner code's exact error on the nonzero rows (zero rows are exact)."""
    idx, kept = _nonzero(x)
    err = bias_variance(inner_spec(spec), kept.reshape(inner_shape(tuple(x.shape), len(idx))), key)
    return err.bias_sq, err.variance


CODES = (
    Code(
        names=("rows",),
        parse=_parse,
        format=lambda spec: f"rows:{spec.get('inner')}",
        encode=_encode,
        decode=_decode,
        nbytes=_nbytes,
        row_local=False,
        error=_error,
        sparse_nbytes=_sparse_nbytes,
    ),
)
