"""Code specs, encoded payloads, the registry of codes, and the functions that dispatch to them.

A code turns one tensor (or a block of whole rows of one) into a payload of plain tensors and
back. The payload is everything the code stores: ``Encoded.nbytes`` is the sum of its tensors'
bytes, and every code's ``nbytes(shape, spec)`` gives the same number from the shape alone,
without encoding, so a planner can price a code before building it. What the store knows
anyway (the tensor's name and shape, the task, the code's spec string) is not in the payload.

Adding a code is one module in this package that defines ``CODES``, a tuple of ``Code``: the
registry imports every module of the package on first use and collects them.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tvbasis.errors import TvbasisError

#: A parameter's value in a spec: counts and bit widths are int, rates float, dtypes str.
ParamValue = int | float | str
Params = tuple[tuple[str, ParamValue], ...]


@dataclass(frozen=True)
class CodeSpec:
    """A code's name and its parameters (sorted ``(key, value)`` pairs), e.g. ``keep`` with p, bits, seed."""

    name: str
    params: Params = ()

    def get(self, key: str) -> ParamValue:
        for k, v in self.params:
            if k == key:
                return v
        raise KeyError(f"code {self.name!r} has no parameter {key!r}")

    def __str__(self) -> str:
        return code(self.name).format(self)


@dataclass(frozen=True)
class TensorKey:
    """Where a block of rows sits: its tensor, its task and the index of its first row in the tensor.

    Seeded codes derive their randomness from it, so a block is coded the same whatever the
    chunking; the store knows all three, so they are not payload bytes.
    """

    tensor: str = ""
    task: str = ""
    row: int = 0


@dataclass(frozen=True, eq=False)
class Encoded:
    """A coded tensor: its spec, its shape, where it sits, and the tensors it stores (``payload``)."""

    spec: CodeSpec
    shape: tuple[int, ...]
    key: TensorKey
    payload: Mapping[str, torch.Tensor] = field(repr=False)

    @property
    def nbytes(self) -> int:
        """The bytes the payload really takes: every value, scale, index, bitmap and seed."""
        return sum(t.numel() * t.element_size() for t in self.payload.values())


#: ``(bias_sq, variance)`` of a code applied to a tensor; see ``bias_variance``.
ErrorFn = Callable[[CodeSpec, torch.Tensor, TensorKey], tuple[float, float]]


@dataclass(frozen=True)
class Code:
    """One code's functions. ``names`` are the spec heads it answers to (``int8``, ``int4`` ... share one)."""

    names: tuple[str, ...]
    #: ``(head, args, text) -> spec``; ``args`` are the ``:``-separated words after the head.
    parse: Callable[[str, list[str], str], CodeSpec]
    #: ``spec -> canonical string`` that ``parse`` reads back.
    format: Callable[[CodeSpec], str]
    encode: Callable[[CodeSpec, torch.Tensor, TensorKey], Mapping[str, torch.Tensor]]
    #: ``(spec, shape, key, payload) -> float64 tensor of shape``.
    decode: Callable[[CodeSpec, tuple[int, ...], TensorKey, Mapping[str, torch.Tensor]], torch.Tensor]
    nbytes: Callable[[CodeSpec, tuple[int, ...]], int]
    #: Whether E[decode(encode(x))] == x (over the code's seed); deterministic codes are biased.
    unbiased: bool = False
    #: Whether rows are coded independently, so a tensor may be coded in row blocks (chunks).
    row_local: bool = True
    #: Exact (bias_sq, variance) for a random code; None: deterministic, error is all bias.
    error: ErrorFn | None = None
    #: For a code whose size depends on the data: ``(spec, shape, nonzero_rows) -> bytes`` when
    #: only that many rows are nonzero (``nbytes`` then prices every row nonzero, an upper bound).
    sparse_nbytes: Callable[[CodeSpec, tuple[int, ...], int], int] | None = None


_REGISTRY: dict[str, Code] = {}


def _load() -> dict[str, Code]:
    """Import every module of this package once and register the codes in their ``CODES``."""
    if _REGISTRY:
        return _REGISTRY
    import tvbasis.codes as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for c in getattr(module, "CODES", ()):
            for name in c.names:
                if name in _REGISTRY:
                    raise RuntimeError(f"code {name!r} registered twice")  # a bug, not user input
                _REGISTRY[name] = c
    return _REGISTRY


def registry() -> Mapping[str, Code]:
    """Every code by spec head."""
    return dict(_load())


def code(name: str) -> Code:
    codes = _load()
    if name not in codes:
        raise TvbasisError(f"code {name!r}: choose one of {', '.join(sorted(codes))}")
    return codes[name]


def parse_code(text: str) -> CodeSpec:
    """Parse a short spec string: ``int4``, ``lloydmax2``, ``sign``, ``keep:0.0625:int4:seed=0``, ``topk:0.05`` ..."""
    head, *args = text.strip().split(":")
    codes = _load()
    if head not in codes:
        raise TvbasisError(f"code {text!r}: unknown code {head!r}; choose one of {', '.join(sorted(codes))}")
    return codes[head].parse(head, args, text)


def encode(spec: CodeSpec, x: torch.Tensor, key: TensorKey = TensorKey()) -> Encoded:
    """Code a tensor (or, for a row-local code, a block of whole rows starting at row ``key.row``)."""
    c = code(spec.name)
    if key.row and (not c.row_local or x.dim() < 2):
        # a tensor-wide code, or a 1-D tensor (one row), is coded whole: a block would code differently
        raise ValueError(f"code {spec.name!r} on a {x.dim()}-D block at row {key.row}: code the whole tensor")
    payload = c.encode(spec, x, key)
    return Encoded(spec, tuple(x.shape), key, dict(payload))


def decode(enc: Encoded) -> torch.Tensor:
    """The float64 tensor an ``Encoded`` stands for."""
    return code(enc.spec.name).decode(enc.spec, enc.shape, enc.key, enc.payload)


def nbytes(spec: CodeSpec, shape: Sequence[int], nonzero_rows: int | None = None) -> int:
    """Bytes the payload of a tensor of ``shape`` takes under ``spec``, from the shape alone; for a
    code that skips zero rows (``rows:...``), from the shape and the count of nonzero rows
    (without it, every row counts as nonzero)."""
    c = code(spec.name)
    dims = tuple(int(s) for s in shape)
    if nonzero_rows is not None and c.sparse_nbytes is not None:
        return c.sparse_nbytes(spec, dims, int(nonzero_rows))
    return c.nbytes(spec, dims)


def nonzero_row_count(x: torch.Tensor) -> int:
    """Rows of ``x`` (its ``row_view_shape``) with any nonzero entry."""
    return int(rows_of(x).ne(0).any(dim=1).sum()) if x.numel() else 0


@dataclass(frozen=True)
class CodeError:
    """A code's error on one tensor: ``bias_sq = ||E x_hat - x||^2`` and ``variance = E||x_hat - E x_hat||^2``."""

    bias_sq: float
    variance: float

    @property
    def expected_sq(self) -> float:
        """``E||x_hat - x||^2``: the two add up, as the cross term has mean zero."""
        return self.bias_sq + self.variance


def bias_variance(spec: CodeSpec, x: torch.Tensor, key: TensorKey = TensorKey()) -> CodeError:
    """The squared error of the code's expectation and its variance, for ``x_hat = decode(encode(x))``.

    A byte-budget planner needs them apart, as unbiased error (random keep) harms accuracy far
    less than the same energy of biased error. Random codes give both exactly (over their
    seed); a deterministic code's error is all bias.
    """
    c = code(spec.name)
    if c.error is not None:
        return CodeError(*c.error(spec, x, key))
    diff = decode(encode(spec, x, key)) - x.to(torch.float64)
    return CodeError(float(diff.square().sum()), 0.0)


# -- helpers shared by the code modules ------------------------------------------------------


def row_view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, row_numel)`` a code sees: ``W[i, ...]`` are the rows of a tensor of 2+ dims; one row otherwise.

    A 1-D tensor (bias, norm) is a single row, so it gets one scale per tensor; such tensors
    are small and must be coded whole, not in row blocks.
    """
    if len(shape) >= 2:
        rows = shape[0]
        return rows, (math.prod(shape) // rows if rows else math.prod(shape[1:]))
    return 1, math.prod(shape)


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """``x`` as its ``(rows, row_numel)`` view."""
    return x.reshape(row_view_shape(tuple(x.shape)))


def no_args(head: str, args: list[str], text: str) -> CodeSpec:
    """``parse`` of a code without parameters."""
    if args:
        raise TvbasisError(f"code {text!r}: {head!r} takes no parameters")
    return CodeSpec(head)


def fraction_arg(word: str, what: str, text: str) -> float:
    """A rate in (0, 1]."""
    try:
        value = float(word)
    except ValueError:
        raise TvbasisError(f"code {text!r}: {what} {word!r} is not a number") from None
    if not 0 < value <= 1:
        raise TvbasisError(f"code {text!r}: {what} {word} must be in (0, 1]")
    return value


def seed_arg(value: str, text: str) -> int:
    """The ``S`` of a ``seed=S`` word: a whole number 0 or more."""
    if not value.isdigit():
        raise TvbasisError(f"code {text!r}: seed {value!r} must be a whole number 0 or more")
    return int(value)


def count_of(fraction: float, n: int) -> int:
    """Entries a rate keeps of ``n``: ``fraction * n`` rounded half up, at least 1 (none of none)."""
    return min(n, max(1, math.floor(fraction * n + 0.5))) if n else 0
