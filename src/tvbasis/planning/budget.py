"""Choosing every tensor's code for a byte budget (``tvbasis plan --budget``, ``tvbasis build --budget``).

Per tensor the planner picks one *candidate*: whether a global PCA basis of M atoms covers it,
and the code of each task's residual there (``none``, ``int8``, ``int4``, ``lloydmax2``,
``sign``, random keep at several rates ...). It also picks M. Everything it reads is cheap and
comes from one pass: the per-tensor Gram matrices ``G_n`` (``build --tensor-stats``) give each
task's residual energy ``r_nt`` on every tensor for any linear basis; a code's error on a residual
is estimated as ``r_nt`` times the code's relative bias and variance on Gaussian rows of the
tensor's row length (``planning.calibration``: measured once per code and row length with
``codes.bias_variance``, and cached on disk).

**Objective (the accuracy proxy).** Squared weight error does not predict accuracy: unbiased
random error costs far less accuracy than the same energy of biased error. The planner
therefore charges each task ``bias_t / ||tau_t||^2 + noise_weight * variance_t / ||tau_t||^2``
and minimises the mean over tasks; ``noise_weight`` (default 1/256) says how much less an
unbiased error hurts. ``benchmarks/frontier.py`` checks the resulting ranking of codes against
measured gain and negation on the text suite. With ``sensitivity`` (``planning.sensitivity``)
each tensor's bias and variance are further weighted by how far a unit of error there moves the
model's outputs.

**Search.** One candidate per tensor under a byte budget is a multiple-choice knapsack; a
Lagrange multiplier ``mu`` on bytes makes it separable (each tensor takes
``argmin loss + mu * bytes``), and bisection on ``mu`` finds the cheapest plan within budget. This
is repeated for every M considered and the best plan kept. Planning costs milliseconds to
seconds (``T x T`` matrices only), far below a build.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.codes import CodeSpec, nbytes, parse_code
from tvbasis.codes.core import row_view_shape
from tvbasis.errors import TvbasisError
from tvbasis.io.writer import TensorSpec, safetensors_header
from tvbasis.planning.calibration import relative_error, save_calibration
from tvbasis.planning.estimates import atom_bytes, coefficient_bytes
from tvbasis.store.residuals import (
    NO_CODE,
    TENSOR_ATOM_CODE,
    TENSOR_ATOM_CODES,
    CodePlan,
    TensorCode,
    check_atom_code,
    payload_parts,
    residual_header_bytes,
    task_file_specs,
    tensor_residual_nbytes,
)

#: Keep shares the planner tries with ``sr2`` values.
SR2_SHARES = (0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625)
#: Shares of rotated coordinates the planner tries with ``rsign`` (one bit each).
RSIGN_SHARES = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125)
#: Residual codes the planner tries on every tensor; ``{seed}`` is the build's seed.
DEFAULT_CODES: tuple[str, ...] = (
    "none",
    "int8",
    "int4",
    "lloydmax2",
    "sign",
    "keep:0.5:int4:seed={seed}",
    "keep:0.25:int4:seed={seed}",
    "keep:0.125:int4:seed={seed}",
    "keep:0.0625:int4:seed={seed}",
    "keep:0.03125:int4:seed={seed}",
    # stochastic 2-bit values clipped at 2 row RMS (less variance) and at 3 (less bias): the first
    # wins where the budget leaves much variance, the second where it leaves little
    *(f"keep:{p}:sr2{clip}:seed={{seed}}" for clip in ("", ":clip=3") for p in SR2_SHARES),
    # signs of a random rotation's coordinates: no bias, and per byte less variance than sr2
    *(f"rsign:{p}:seed={{seed}}" for p in RSIGN_SHARES),
    "keep:0.0125:int8:seed={seed}",
    "keep:0.00625:int8:seed={seed}",
    "keep:0.003:int8:seed={seed}",
)
#: Ranks codes closest to measured per-task negation and gain (docs/frontier.md).
DEFAULT_NOISE_WEIGHT = 1 / 256
#: What a plan minimises over tasks: the mean loss, or the worst task's.
OBJECTIVES = ("mean", "worst")
#: Atoms of a planned store are int8 (the residuals correct their rounding).
ATOM_DTYPE = "int8"
#: Bytes of a store beyond payloads, headers and matrices: model card and manifest (an upper
#: estimate: a fixed part, and per tensor its layout, base fingerprint and code entries).
FIXED_OVERHEAD = 16 * 1024
MANIFEST_BYTES_PER_TENSOR = 400
#: Header bytes of one per-tensor atom (two parts) and its share of the coefficients' entry.
TENSOR_ATOM_HEADER = 256


@dataclass(frozen=True)
class Choice:
    """One tensor's chosen candidate, its bytes and estimated per-task proxy loss (relative to ``||tau_t||^2``)."""

    tensor: str
    code: TensorCode
    nbytes: int
    bias: np.ndarray = field(repr=False)  # (T,)
    variance: np.ndarray = field(repr=False)  # (T,)


@dataclass
class BudgetPlan:
    """A planned store: the basis size, every tensor's choice, and the estimated bytes and loss."""

    n_atoms: int
    choices: list[Choice]
    budget_bytes: int
    original_bytes: int
    overhead_bytes: int
    noise_weight: float
    task_names: list[str]
    objective: str = "mean"
    #: whether losses are weighted by per-tensor output sensitivity
    weighted: bool = False

    @property
    def codes(self) -> CodePlan:
        return CodePlan(tensors={c.tensor: c.code for c in self.choices})

    @property
    def nbytes(self) -> int:
        return self.overhead_bytes + sum(c.nbytes for c in self.choices)

    def task_bias(self) -> np.ndarray:
        return np.sum([c.bias for c in self.choices], axis=0)

    def task_variance(self) -> np.ndarray:
        return np.sum([c.variance for c in self.choices], axis=0)

    def task_loss(self) -> np.ndarray:
        return self.task_bias() + self.noise_weight * self.task_variance()

    @property
    def loss(self) -> float:
        return float(self.task_loss().mean())

    @property
    def worst_loss(self) -> float:
        return float(self.task_loss().max())

    @property
    def score(self) -> float:
        """What the plan minimises: the mean or the worst task's loss."""
        return self.worst_loss if self.objective == "worst" else self.loss

    def summary(self) -> dict[str, Any]:
        """What ``tvbasis plan --budget --json`` prints."""
        groups: dict[str, dict[str, float]] = {}
        for c in self.choices:
            g = groups.setdefault(str(c.code), {"tensors": 0, "bytes": 0, "loss": 0.0})
            g["tensors"] += 1
            g["bytes"] += c.nbytes
            g["loss"] += float((c.bias + self.noise_weight * c.variance).mean())
        return {
            "M": self.n_atoms,
            "budget_bytes": self.budget_bytes,
            "estimated_bytes": self.nbytes,
            "ratio": self.nbytes / self.original_bytes,
            "noise_weight": self.noise_weight,
            "objective": self.objective,
            "sensitivity_weighted": self.weighted,
            "estimated_loss": self.loss,
            "estimated_worst_loss": self.worst_loss,
            "tasks": {
                n: {"bias": float(b), "variance": float(v), "loss": float(lo)}
                for n, b, v, lo in zip(
                    self.task_names, self.task_bias(), self.task_variance(), self.task_loss(), strict=True
                )
            },
            "codes": groups,
            "tensors": {c.tensor: str(c.code) for c in self.choices},
        }


def tensor_weights(
    tensor_grams: Mapping[str, np.ndarray], sensitivity: Mapping[str, float] | None
) -> dict[str, float] | None:
    """Per tensor, the planner's weight of its error: ``sensitivity`` normalised by the tasks'
    energy in each tensor (``planning.sensitivity.normalised_weights``); None without one."""
    if sensitivity is None:
        return None
    from tvbasis.planning.sensitivity import normalised_weights

    return normalised_weights(sensitivity, {n: max(float(np.trace(g)), 0.0) for n, g in tensor_grams.items()})


def _pca(gram: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder ``B`` (T, m) and decoder ``W`` (m, T) of the (uncentred) PCA basis, as ``methods.PCA`` fits it."""
    from tvbasis.methods import PCA

    method = PCA(m).fit(gram)
    assert method.encoder_ is not None and method.decoder_ is not None
    return method.encoder_, method.decoder_


def _residual_energy(tensor_gram: np.ndarray, encoder: np.ndarray, decoder: np.ndarray) -> np.ndarray:
    """Per task ``||x_nt - (X_n B W)_t||^2 = diag(E^T G_n E)``, ``E = I - B W``."""
    E = np.eye(tensor_gram.shape[0]) - encoder @ decoder
    return np.clip(np.einsum("it,ij,jt->t", E, tensor_gram, E), 0.0, None)


def _header_bytes(specs: list[TensorSpec]) -> int:
    prefix, _ = safetensors_header(specs, {"tvbasis_residual_task": "x" * 16})
    return len(prefix)


def _fixed_overhead(n_tasks: int, shapes: Mapping[str, tuple[int, ...]], n_atoms: int) -> int:
    """Headers of the atom files, the matrices and the manifest (a fixed allowance: an upper estimate)."""
    atom_specs = [TensorSpec(n, s, torch.int8) for n, s in shapes.items()]
    atom_specs += [TensorSpec(n + ".qscale", s[:1], torch.float32) for n, s in shapes.items() if len(s) >= 2]
    atom_headers = n_atoms * _header_bytes(atom_specs)
    matrices = 8 * (3 * n_tasks * n_tasks + 3 * (n_atoms + 1) * n_tasks) + 4096
    manifest = FIXED_OVERHEAD + MANIFEST_BYTES_PER_TENSOR * len(shapes) + 200 * n_tasks
    return manifest + atom_headers + matrices + coefficient_bytes(n_atoms, n_tasks)


#: ``payload_parts`` probes codes on zeros (whole tensors for ``rows:...``): once per argument set.
_cached_parts = lru_cache(maxsize=8192)(payload_parts)


def _residual_header_bound(
    n_tasks: int, shapes: Mapping[str, tuple[int, ...]], residual_codes: Sequence[str], sparse: Collection[str] = ()
) -> int:
    """Headers of the residual files before the codes are chosen: every tensor priced with the
    candidate whose parts are most numerous (with a code that skips zero rows for the tensors in
    ``sparse``, which have some)."""
    parsed = [parse_code(c) for c in residual_codes]
    dense = [s for s in parsed if s.name != "rows"] or parsed
    widest = max(dense, key=lambda s: len(_cached_parts(s, (2, 2), None)))
    widest_sparse = max(parsed, key=lambda s: len(_cached_parts(s, (2, 2), None)))
    parts = {n: _cached_parts(widest_sparse if n in sparse else widest, tuple(s), None) for n, s in shapes.items()}
    return n_tasks * _header_bytes(task_file_specs(parts))


def _residual_headers(
    choices: Sequence[Choice],
    shapes: Mapping[str, tuple[int, ...]],
    task_names: Sequence[str],
    nonzero_rows: Mapping[str, np.ndarray] | None,
) -> int:
    """The residual files' headers of a plan, exactly as the store will write them."""
    codes = {c.tensor: c.code for c in choices}
    return residual_header_bytes(codes, shapes, [str(t) for t in task_names], nonzero_rows, _cached_parts)


def plan_budget(
    gram: np.ndarray,
    tensor_grams: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    budget: float,
    *,
    task_names: Sequence[str] | None = None,
    atoms: Sequence[int] | None = None,
    codes: Sequence[str] = DEFAULT_CODES,
    seed: int = 0,
    noise_weight: float = DEFAULT_NOISE_WEIGHT,
    tensor_atoms: Sequence[int] | None = None,
    tensor_atom_codes: Sequence[str] = TENSOR_ATOM_CODES,
    objective: str = "mean",
    nonzero_rows: Mapping[str, np.ndarray] | None = None,
    sensitivity: Mapping[str, float] | None = None,
) -> BudgetPlan:
    """The plan with the least estimated proxy loss within ``budget`` (a fraction of the T fp32
    task vectors' bytes if <= 1, else bytes), over M in ``atoms`` (default 0, 1, 2, 4 ... T - 1)
    for the global basis, and per tensor over its own bases of ``tensor_atoms`` atoms (default
    the same sizes but 0; a tensor with its own basis is not covered by the global one), their
    atoms coded with each of ``tensor_atom_codes``. ``objective`` is the loss minimised: the mean
    over tasks, or the worst task's (``worst``, by reweighting tasks; see ``_worst_case``).
    ``nonzero_rows`` (per tensor, each task's count of nonzero rows) lets a tensor that no basis
    covers and that some task leaves with zero rows use each code as ``rows:CODE``, which pays
    only for the nonzero rows. ``sensitivity`` (per tensor, the outputs' shift per unit squared
    weight error: ``planning.sensitivity``) weighs each tensor's error by it, normalised so that
    an error spread like the tasks' energy weighs as much as unweighted."""
    T = gram.shape[0]
    names = list(tensor_grams)
    if set(names) != set(shapes):
        raise TvbasisError("per-tensor Gram matrices and tensor shapes name different tensors")
    original = 4 * T * sum(math.prod(s) for s in shapes.values())
    budget_bytes = int(budget * original) if budget <= 1 else int(budget)
    if budget <= 0:
        raise TvbasisError(f"--budget {budget}: must be positive (a fraction of the fp32 task vectors, or bytes)")
    if noise_weight < 0:
        raise TvbasisError(f"--noise-weight {noise_weight}: must be 0 or more")
    if objective not in OBJECTIVES:
        raise TvbasisError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    specs = [parse_code(c.format(seed=seed)) for c in codes]
    atom_codes = [check_atom_code(parse_code(c)) for c in tensor_atom_codes]
    if not any(s.name == "none" for s in specs):
        specs.insert(0, CodeSpec("none"))
    row_specs = (
        [] if nonzero_rows is None else [parse_code(f"rows:{s}") for s in specs if s.name not in ("none", "rows")]
    )
    sparse = {n for n in shapes if _has_zero_rows(nonzero_rows, n, shapes[n], T)}
    sq_norm = np.where(np.diag(gram) > 0, np.diag(gram), 1.0)
    weights = tensor_weights(tensor_grams, sensitivity)
    if atoms is None:
        atoms = sorted({0, *(m for m in (1, 2, 4, 8, 16, 32) if m < T), max(T - 1, 0)})
    if tensor_atoms is None:
        tensor_atoms = [m for m in atoms if m > 0]
    best: BudgetPlan | None = None
    best_options: list[list[tuple[float, Choice]]] = []
    own_energy: dict[tuple[str, int], np.ndarray] = {}
    plan_names = list(task_names or range(T))

    def solve(options: list[list[tuple[float, Choice]]], room: int) -> list[Choice] | None:
        if objective == "worst":
            return _worst_case(options, room, noise_weight)
        return _knapsack(options, room)

    header_bound = _residual_header_bound(T, shapes, [str(s) for s in (*specs, *row_specs)], sparse)
    for m in atoms:
        if not 0 <= m <= T:
            raise TvbasisError(f"--atoms {m}: must be between 0 and T = {T}")
        encoder, decoder = _pca(gram, m) if m else (np.zeros((T, 0)), np.zeros((0, T)))
        overhead = _fixed_overhead(T, shapes, m) + header_bound
        options = _tensor_options(
            names,
            shapes,
            tensor_grams,
            encoder,
            decoder,
            m,
            specs,
            sq_norm,
            noise_weight,
            tensor_atoms,
            own_energy,
            atom_codes,
            nonzero_rows,
            row_specs,
            weights,
        )
        plan = solve(options, budget_bytes - overhead)
        if plan is None:
            continue
        candidate = BudgetPlan(
            m, plan, budget_bytes, original, overhead, noise_weight, plan_names, objective, weights is not None
        )
        if best is None or candidate.score < best.score:
            best, best_options = candidate, options
    if best is None:
        raise TvbasisError(
            f"--budget {budget}: {budget_bytes:,} bytes cannot hold even the store's headers and matrices; "
            f"give a larger budget"
        )
    # The headers were priced with every tensor's widest candidate; price the chosen plan's exactly
    # and plan again with the bytes that frees. A new plan can need more header bytes than the one
    # it replaces (other codes, more parts): then plan with that excess taken off the room, a few
    # times, and keep the first plan that fits with its own headers and scores no worse.
    fixed = _fixed_overhead(T, shapes, best.n_atoms)
    best.overhead_bytes = fixed + _residual_headers(best.choices, shapes, plan_names, nonzero_rows)
    room = budget_bytes - best.overhead_bytes
    for _ in range(4):
        again = solve(best_options, room)
        if again is None:
            break
        overhead = fixed + _residual_headers(again, shapes, plan_names, nonzero_rows)
        excess = overhead + sum(c.nbytes for c in again) - budget_bytes
        if excess <= 0:
            trial = replace(best, choices=again, overhead_bytes=overhead)
            if trial.score <= best.score:
                best = trial
            break
        room -= excess
    return best


def estimate_plan(
    gram: np.ndarray,
    tensor_grams: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    codes: CodePlan,
    n_atoms: int,
    *,
    task_names: Sequence[str] | None = None,
    noise_weight: float = DEFAULT_NOISE_WEIGHT,
    nonzero_rows: Mapping[str, np.ndarray] | None = None,
    sensitivity: Mapping[str, float] | None = None,
) -> BudgetPlan:
    """The planner's estimates (bytes, per-task bias and variance) for a given code plan with a
    global pca basis of ``n_atoms`` atoms: how the planner sees a store it did not choose
    (``nonzero_rows`` as for ``plan_budget``: needed to price ``rows:...`` codes)."""
    T = gram.shape[0]
    names = list(tensor_grams)
    encoder, decoder = _pca(gram, n_atoms) if n_atoms else (np.zeros((T, 0)), np.zeros((0, T)))
    sq_norm = np.where(np.diag(gram) > 0, np.diag(gram), 1.0)
    weights = tensor_weights(tensor_grams, sensitivity)
    choices = []
    for n in names:
        tc = codes.of(n)
        if tc.basis and not n_atoms:
            tc = TensorCode(False, tc.residual, tc.tensor_atoms, tc.atom_code)
        (options,) = _tensor_options(
            [n],
            shapes,
            tensor_grams,
            encoder,
            decoder,
            n_atoms,
            [tc.residual],
            sq_norm,
            noise_weight,
            [tc.tensor_atoms] if tc.tensor_atoms else [],
            atom_codes=[tc.atom_code],
            nonzero_rows=nonzero_rows,
            weights=weights,
        )
        choices.append(next(c for _, c in options if c.code == tc))
    original = 4 * T * sum(math.prod(s) for s in shapes.values())
    plan_names = list(task_names or range(T))
    overhead = _fixed_overhead(T, shapes, n_atoms) + _residual_headers(choices, shapes, plan_names, nonzero_rows)
    plan = BudgetPlan(n_atoms, choices, 0, original, overhead, noise_weight, plan_names, weighted=weights is not None)
    plan.budget_bytes = plan.nbytes
    return plan


def _tensor_options(
    names: list[str],
    shapes: Mapping[str, tuple[int, ...]],
    tensor_grams: Mapping[str, np.ndarray],
    encoder: np.ndarray,
    decoder: np.ndarray,
    m: int,
    specs: list[CodeSpec],
    sq_norm: np.ndarray,
    noise_weight: float,
    tensor_atoms: Sequence[int] = (),
    own_energy: dict[tuple[str, int], np.ndarray] | None = None,
    atom_codes: Sequence[CodeSpec] = (TENSOR_ATOM_CODE,),
    nonzero_rows: Mapping[str, np.ndarray] | None = None,
    row_specs: Sequence[CodeSpec] = (),
    weights: Mapping[str, float] | None = None,
) -> list[list[tuple[float, Choice]]]:
    """Per tensor, every candidate as ``(mean proxy loss, Choice)``. ``own_energy`` caches the
    residual energies of the tensors' own bases, which do not depend on the global basis.

    ``rows:CODE`` candidates (``row_specs``, on tensors where some task has zero rows, and any
    in ``specs``) code only what no basis covers; they cost each task's nonzero rows' bytes and
    lose what ``CODE`` loses, as zero rows carry no energy and decode exactly.

    A tensor's own atoms are coded with each of ``atom_codes``; their rounding adds the code's
    relative error of the energy the basis captures to the residual (the atoms are orthogonal, so
    each task gets its share ``sum_j lambda_j B_tj^2``, which is what it has captured).

    ``weights`` (``tensor_weights``) scales each tensor's losses by what its error does to the
    model's outputs."""
    own_energy = {} if own_energy is None else own_energy
    # one TensorCode per kind of candidate, shared by every tensor (keyed by the specs' identities:
    # the same objects throughout, and cheaper to hash than the specs)
    kinds: dict[tuple[bool, int, int, int], TensorCode] = {}

    def tensor_code(basis: bool, spec: CodeSpec, own: int, atom_code: CodeSpec) -> TensorCode:
        key = (basis, own, id(atom_code), id(spec))
        if key not in kinds:
            kinds[key] = TensorCode(basis, spec, own, atom_code) if own else TensorCode(basis, spec)
        return kinds[key]

    options = []
    for n in names:
        shape = tuple(shapes[n])
        rows, row_numel = row_view_shape(shape)
        G_n = tensor_grams[n]
        T = len(sq_norm)
        energy_n = np.clip(np.diag(G_n), 0.0, None)
        # (global basis?, own atoms, their code) -> (residual energy per task, bytes of the basis part)
        bases: dict[tuple[bool, int, CodeSpec], tuple[np.ndarray, int]] = {(False, 0, NO_CODE): (energy_n, 0)}
        if m:
            bases[(True, 0, NO_CODE)] = (_residual_energy(G_n, encoder, decoder), m * atom_bytes(shape, ATOM_DTYPE))
        for own in tensor_atoms:
            if own < T:
                if (n, own) not in own_energy:
                    own_energy[(n, own)] = _residual_energy(G_n, *_pca(G_n, own))
                residual = own_energy[(n, own)]
                for atom_code in atom_codes:
                    rounding = relative_error(atom_code, row_numel, rows)[0] * np.clip(energy_n - residual, 0.0, None)
                    own_bytes = own * (nbytes(atom_code, shape) + 8 * T + TENSOR_ATOM_HEADER)
                    bases[(False, own, atom_code)] = (residual + rounding, own_bytes)
        counts = None if nonzero_rows is None else nonzero_rows.get(n)
        tensor_specs = list(specs)
        if _has_zero_rows(nonzero_rows, n, shape, T):
            tensor_specs += [s for s in row_specs if s not in tensor_specs]
        rel = np.array([relative_error(spec, row_numel, rows) for spec in tensor_specs])  # (codes, 2)
        code_bytes = [_code_bytes(n, spec, shape, counts, T) for spec in tensor_specs]
        per_tensor = []
        weight = 1.0 if weights is None else weights[n]
        for (basis, own, atom_code), (energy, basis_bytes) in bases.items():
            share = energy / sq_norm * weight
            bias, var = rel[:, :1] * share, rel[:, 1:] * share  # (codes, T)
            losses = (bias + noise_weight * var).mean(axis=1)
            for k, spec in enumerate(tensor_specs):
                if spec.name == "rows" and (basis or own):
                    continue  # a basis' residual is nonzero wherever any task is
                choice = Choice(
                    n, tensor_code(basis, spec, own, atom_code), basis_bytes + code_bytes[k], bias[k], var[k]
                )
                per_tensor.append((float(losses[k]), choice))
        options.append(per_tensor)
    save_calibration()  # what was measured for new code and row-length pairs, for the next process
    return options


def _has_zero_rows(
    nonzero_rows: Mapping[str, np.ndarray] | None, tensor: str, shape: tuple[int, ...], n_tasks: int
) -> bool:
    """Whether some task leaves rows of ``tensor`` all zero (``rows:...`` codes save bytes there)."""
    if nonzero_rows is None or tensor not in nonzero_rows:
        return False
    return int(np.sum(nonzero_rows[tensor])) < n_tasks * row_view_shape(tuple(shape))[0]


def _code_bytes(tensor: str, spec: CodeSpec, shape: tuple[int, ...], counts: np.ndarray | None, n_tasks: int) -> int:
    """Bytes of all tasks' residuals of ``tensor`` under ``spec`` (by each task's nonzero rows for ``rows:...``)."""
    if spec.name == "rows" and counts is None:
        raise TvbasisError(
            f"tensor {tensor!r}: pricing code {spec} needs every task's count of nonzero rows; plan from a "
            f"store built with --tensor-stats by this version (from full fine-tunes, not only LoRA adapters)"
        )
    return _residual_bytes(spec, tuple(shape), n_tasks, tuple(counts.tolist()) if spec.name == "rows" else None)


@lru_cache(maxsize=65536)
def _residual_bytes(spec: CodeSpec, shape: tuple[int, ...], n_tasks: int, counts: tuple[int, ...] | None) -> int:
    """``tensor_residual_nbytes``, once per code, shape and row counts (every global basis size asks again)."""
    return tensor_residual_nbytes(spec, shape, n_tasks, None if counts is None else np.asarray(counts))


def _worst_case(
    options: list[list[tuple[float, Choice]]], budget: int, noise_weight: float, rounds: int = 16
) -> list[Choice] | None:
    """Choices that keep the worst task's loss low: multiplicative weights over tasks.

    Each round solves the knapsack for a weighted mean of the tasks' losses, then raises the
    weights of the tasks that lose most; the plan with the smallest worst-task loss is kept. The
    first round weighs tasks equally, so the result is never worse on the worst task than the
    mean objective's plan."""
    mean_loss, size = _candidate_arrays(options)
    padded = ~np.isfinite(mean_loss)
    T = len(options[0][0][1].bias)
    task_loss = np.zeros((*size.shape, T))  # (tensors, candidates, T); padding is masked below
    for i, opts in enumerate(options):
        task_loss[i, : len(opts)] = [c.bias + noise_weight * c.variance for _, c in opts]
    rows = np.arange(len(options))
    weights = np.full(T, 1.0 / T)
    best, best_worst = None, np.inf
    for _ in range(rounds):
        idx = _solve(np.where(padded, np.inf, task_loss @ weights), size, budget)
        if idx is None:
            return None
        per_task = task_loss[rows, idx].sum(axis=0)
        if per_task.max() < best_worst:
            best, best_worst = idx, float(per_task.max())
        weights = weights * np.exp(2.0 * per_task / max(float(per_task.max()), 1e-30))
        weights /= weights.sum()
    assert best is not None
    return [options[i][j][1] for i, j in enumerate(best)]


def _candidate_arrays(options: list[list[tuple[float, Choice]]]) -> tuple[np.ndarray, np.ndarray]:
    """``(loss, bytes)`` of every tensor's candidates as (tensors, candidates) arrays, padded with infinite loss."""
    width = max(len(opts) for opts in options)
    loss = np.full((len(options), width), np.inf)
    size = np.zeros((len(options), width))
    for i, opts in enumerate(options):
        loss[i, : len(opts)] = [lo for lo, _ in opts]
        size[i, : len(opts)] = [c.nbytes for _, c in opts]
    return loss, size


def _knapsack(options: list[list[tuple[float, Choice]]], budget: int) -> list[Choice] | None:
    """One choice per tensor minimising the summed loss with summed bytes <= ``budget``."""
    idx = _solve(*_candidate_arrays(options), budget)
    return None if idx is None else [options[i][j][1] for i, j in enumerate(idx)]


def _solve(loss: np.ndarray, size: np.ndarray, budget: int) -> np.ndarray | None:
    """The candidate index per tensor (Lagrangian bisection, then a greedy fill): each step of
    the bisection is one vectorised argmin over the (tensors, candidates) arrays."""
    if budget < 0:
        return None
    rows = np.arange(len(loss))
    # ties go to the smaller candidate: a tie-break far below any real difference in loss
    tie = size / (size.max() + 1.0) * 1e-12

    def pick(mu: float) -> np.ndarray:
        return np.argmin(loss + mu * size + tie, axis=1)

    def total(idx: np.ndarray) -> float:
        return float(size[rows, idx].sum())

    # the fewest bytes per tensor (sizes are whole bytes, so the loss only breaks ties)
    finite = np.isfinite(loss)  # padding (tensors with fewer candidates) is infinite
    bounded = np.where(finite, loss, 0.0) / (1.0 + np.where(finite, loss, 0.0))
    cheapest = np.argmin(np.where(finite, size + 1e-3 * bounded, np.inf), axis=1)
    if total(cheapest) > budget:
        return None
    idx = pick(0.0)
    if total(idx) > budget:
        lo, hi = 0.0, 1.0
        while total(pick(hi)) > budget:
            hi *= 4
            if hi > 1e30:
                idx = cheapest
                break
        else:
            for _ in range(64):
                mid = (lo + hi) / 2
                if total(pick(mid)) > budget:
                    lo = mid
                else:
                    hi = mid
            idx = pick(hi)
    return _exchange(_fill(idx, loss, size, budget), loss, size, budget)


def _fill(idx: np.ndarray, loss: np.ndarray, size: np.ndarray, budget: int) -> np.ndarray:
    """Spend what the multiplier's plan leaves of the budget: upgrade tensors greedily by loss saved per byte."""
    idx = idx.copy()
    rows = np.arange(len(idx))
    left = budget - size[rows, idx].sum()
    while True:
        saved = loss[rows, idx][:, None] - loss
        extra = size - size[rows, idx][:, None]
        ok = (saved > 0) & (extra > 0) & (extra <= left)
        if not ok.any():
            return idx
        ratio = np.where(ok, saved / np.where(extra > 0, extra, 1.0), -np.inf)
        i, j = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        left -= extra[i, j]
        idx[i] = j


def _exchange(idx: np.ndarray, loss: np.ndarray, size: np.ndarray, budget: int, rounds: int = 64) -> np.ndarray:
    """Trade bytes between two tensors where the greedy fill cannot: one steps down a candidate so
    another can step up, when that lowers the summed loss (then fill again).

    The multiplier's plan and single upgrades leave bytes unspent where candidate sizes are coarse;
    each round applies the best such pair (vectorised: upgrades sorted by cost, a running best
    saving per cost, one search per downgrade).
    """
    rows = np.arange(len(idx))
    finite = np.isfinite(loss)
    for _ in range(rounds):
        current_loss, current_size = loss[rows, idx], size[rows, idx]
        left = budget - float(current_size.sum())
        d_loss, d_size = loss - current_loss[:, None], size - current_size[:, None]
        ui, uj = np.nonzero(finite & (d_size > 0) & (d_loss < 0))
        di, dj = np.nonzero(finite & (d_size < 0))
        if not len(ui) or not len(di):
            break
        order = np.argsort(d_size[ui, uj], kind="stable")
        ui, uj = ui[order], uj[order]
        cost, saving = d_size[ui, uj], -d_loss[ui, uj]
        best_so_far = np.maximum.accumulate(saving)
        # where the running best was reached last: its tensor may be the downgraded one (checked below)
        best_at = np.maximum.accumulate(np.where(saving >= best_so_far, np.arange(len(saving)), 0))
        reach = np.searchsorted(cost, left - d_size[di, dj], side="right") - 1
        bound = np.where(reach >= 0, best_so_far[np.maximum(reach, 0)], 0.0) - d_loss[di, dj]
        found, found_gain = None, 1e-12 * max(float(np.abs(current_loss).sum()), 1e-30)
        for d in np.argsort(-bound, kind="stable"):
            if bound[d] <= found_gain:
                break  # sorted by bound: no later downgrade can do better
            if reach[d] < 0:
                continue  # no upgrade is affordable beside this downgrade; a later one may have room
            u = best_at[reach[d]]
            if ui[u] == di[d]:  # the best upgrade within reach is on the same tensor: look past it
                within = np.flatnonzero(ui[: reach[d] + 1] != di[d])
                if not len(within):
                    continue
                u = within[np.argmax(saving[within])]
            gain = saving[u] - d_loss[di[d], dj[d]]
            if gain > found_gain:
                found, found_gain = (di[d], dj[d], ui[u], uj[u]), gain
        if found is None:
            break
        idx = idx.copy()
        idx[found[0]], idx[found[2]] = found[1], found[3]
        idx = _fill(idx, loss, size, budget)
    return idx


def stats_from_store(
    path: str | Path,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, tuple[int, ...]], list[str]]:
    """``(G, {tensor: G_n}, {tensor: shape}, task names)`` of a store built with ``--tensor-stats``."""
    from tvbasis.store import open_store

    store = open_store(path)
    grams = store.tensor_grams
    if grams is None:
        raise TvbasisError(f"{store.path}: no per-tensor Gram matrices; build it with --tensor-stats to plan a budget")
    if not np.isfinite(store.gram).all():
        raise TvbasisError(f"{store.path}: its Gram matrix is incomplete (add-task could not read earlier inputs)")
    return store.gram, grams, {n: store.shape_of(n) for n in grams}, store.task_names


def nonzero_rows_from_store(path: str | Path) -> dict[str, np.ndarray] | None:
    """Per tensor, each task's count of nonzero rows, as a store built with ``--tensor-stats`` keeps
    them (None for a store built before they were kept, or from LoRA adapters only)."""
    from tvbasis.store import open_store

    return open_store(path).tensor_nonzero_rows


def sensitivity_for_store(path: str | Path, rows: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor of the statistics store at ``path``, its output sensitivity for error shaped like
    its tasks (``rows``: ``load_sensitivity``'s row figures; the store's row energies, or rows
    weighed evenly where the store has none: see ``Store.tensor_row_energy``)."""
    from tvbasis.planning.sensitivity import tensor_sensitivity
    from tvbasis.store import open_store

    store = open_store(path)
    return tensor_sensitivity(rows, store.tensor_row_energy, names=[i.name for i in store.tensors])


def build_for_budget(
    base: str | Path,
    tasks: Sequence[Any],
    out: str | Path,
    budget: float,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    stats_store: str | Path | None = None,
    seed: int = 0,
    noise_weight: float = DEFAULT_NOISE_WEIGHT,
    atoms: Sequence[int] | None = None,
    codes: Sequence[str] = DEFAULT_CODES,
    tensor_atoms: Sequence[int] | None = None,
    tensor_atom_codes: Sequence[str] = TENSOR_ATOM_CODES,
    objective: str = "mean",
    chunk_elements: int | None = None,
    overwrite: bool = False,
    engine: Any = None,
    row_codes: bool = True,
    sensitivity: Mapping[str, torch.Tensor] | None = None,
) -> Any:
    """Plan every tensor's code for ``budget`` and build that store (int8 global atoms, per-tensor
    atoms in int8 or int4, coded residuals).

    The statistics come from ``stats_store`` (a store of the same inputs built with
    ``--tensor-stats``; its content hashes are checked while building) or from a Gram pass
    gathering them; then the atom and residual passes write the store. ``row_codes=False`` keeps
    ``rows:...`` codes out of the plan (as planned before they existed); ``sensitivity`` (the row
    figures of ``tvbasis sensitivity``, shaped by the statistics' row energies) weighs each
    tensor's error (``plan_budget``). If the store comes out
    above the budget (the fixed overhead is an estimate), it is planned and built once more with
    the excess taken off.
    """
    from tvbasis.build import build_store
    from tvbasis.engine.streaming import DEFAULT_CHUNK_ELEMENTS, GramStats, LocalEngine
    from tvbasis.io.outputs import check_output_path
    from tvbasis.methods import PCA
    from tvbasis.store import open_store
    from tvbasis.tasks import TaskVectorSet

    out = Path(out)
    check_output_path(out, overwrite)
    chunk_elements = chunk_elements or DEFAULT_CHUNK_ELEMENTS
    tvs = TaskVectorSet(base, tasks, include, exclude)
    layout = {i.name: tuple(i.shape) for i in tvs.tensors}
    if stats_store is not None:
        source = open_store(stats_store)
        gram, grams, shapes, names = stats_from_store(stats_store)
        if shapes != layout or names != tvs.task_names:
            raise TvbasisError(
                f"{source.path}: its tasks or tensors differ from this build's; plan from a store of the same inputs"
            )
        stats = GramStats(
            gram,
            source.manifest["base"]["content_hash"],
            [t["content_hash"] for t in source.manifest["tasks"]],
            grams,
            source.tensor_nonzero_rows,
            source.tensor_row_energy,
        )
    else:
        stats = (engine or LocalEngine()).gram_pass(tvs, chunk_elements, tensor_stats=True)
        assert stats.tensor_grams is not None
        gram, grams = stats.gram, stats.tensor_grams
    weights = None
    if sensitivity is not None:
        from tvbasis.planning.sensitivity import tensor_sensitivity

        weights = tensor_sensitivity(sensitivity, stats.row_energy, names=list(layout))
    original = 4 * tvs.n_tasks * tvs.dim
    target = budget * original if budget <= 1 else budget
    store = None
    for _ in range(2):
        plan = plan_budget(
            gram,
            grams,
            layout,
            target,
            task_names=tvs.task_names,
            atoms=atoms,
            codes=codes,
            seed=seed,
            noise_weight=noise_weight,
            tensor_atoms=tensor_atoms,
            tensor_atom_codes=tensor_atom_codes,
            objective=objective,
            nonzero_rows=stats.nonzero_rows if row_codes else None,
            sensitivity=weights,
        )
        store = build_store(
            base,
            tasks,
            PCA(plan.n_atoms),
            out,
            include=include,
            exclude=exclude,
            dtype=ATOM_DTYPE,
            chunk_elements=chunk_elements,
            overwrite=True if store is not None else overwrite,
            known=stats,
            engine=engine,
            codes=plan.codes,
            plan_report={k: v for k, v in plan.summary().items() if k != "tensors"},
        )
        excess = store.manifest["bytes"]["total"] - (budget * original if budget <= 1 else budget)
        if excess <= 0:
            break
        target -= excess
    assert store is not None
    return store
