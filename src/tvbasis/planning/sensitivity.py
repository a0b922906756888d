"""How far a unit of weight error in each tensor moves a model's outputs (``tvbasis sensitivity``).

The planner charges a code's squared error on a tensor relative to the task's energy, as if a
unit of error cost the same everywhere. It does not: in MiniLM-L6 random error in the last two
layers moves the output embeddings 2.5-4.6 times as far as the same error in the first four,
and in the 1-D tensors (norms, biases) about 40 times (docs/frontier.md). A *sensitivity* per
tensor, measured once on a small calibration batch, lets the planner weigh each tensor's error
by what it does to the outputs.

Measurement: the expected mean squared shift of the model's outputs on the calibration inputs
under random error shaped like a code's error on the task vectors (each row's variance in
proportion to the tasks' energy on that row, as row-local codes with per-row scales err),
divided by the error's squared norm, to first order at the base model. It needs the outputs'
Jacobian only through a few random projections: one forward pass and one backward pass per
probe give every tensor's figure at once (``output_sensitivity``).

The result is a plain ``{tensor: shift per unit squared error}`` mapping, saved as JSON; the
planner rescales it (``normalised_weights``) so that an error spread like the tasks' energy
costs what it cost before, which keeps ``noise_weight`` meaning the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tvbasis.codes.core import row_view_shape
from tvbasis.errors import TvbasisError
from tvbasis.io.outputs import atomic_output
from tvbasis.progress import progress

if TYPE_CHECKING:
    from tvbasis.tasks import TaskVectorSet

#: A model's outputs on the calibration inputs with ``delta`` added to its (base) weights,
#: ``(examples, features)``, differentiable in ``delta`` (which names every measured tensor).
Forward = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]

#: Random output directions (one backward pass each) the expectation is averaged over. One is
#: enough where the outputs are many (examples x features): a probe's estimate of ``tr(A)``
#: (``A = J D J^T``) has relative variance ``2 tr(A^2) / tr(A)^2``, small when ``A`` spreads over
#: many directions; on the text suite 128 texts and one probe plan as well as 256 texts and eight
#: (estimated loss within 1% by the larger calibration's figures) at a seventeenth of the passes
#: (``benchmarks/plan_cost.py``).
DEFAULT_PROBES = 1
#: Calibration texts used at most by default.
DEFAULT_TEXTS = 128
FORMAT = "tvbasis-sensitivity/1"


def row_energy(tasks: TaskVectorSet, chunk_elements: int = 1 << 22) -> dict[str, torch.Tensor]:
    """Per tensor of ``tasks``, the tasks' mean squared norm of each row (``row_view_shape`` rows),
    float64, from one streamed pass (a chunk of rows of every task at a time)."""
    from tvbasis.tasks.taskvectors import plan_chunks

    out = {i.name: torch.zeros(row_view_shape(tuple(i.shape))[0], dtype=torch.float64) for i in tasks.tensors}
    for chunk in plan_chunks(tasks.tensors, chunk_elements):
        sq = tasks.task_rows(tasks.read_rows(chunk)).square().sum(dim=1) / tasks.n_tasks  # (numel,)
        rows = out[chunk.tensor]
        if len(rows) == 1:  # a 1-D (or 0-D) tensor is one row
            rows += sq.sum()
        else:
            rows[chunk.start : chunk.stop] += sq.view(chunk.stop - chunk.start, chunk.row_numel).sum(dim=1)
    return out


def output_sensitivity(
    forward: Forward,
    shapes: Mapping[str, Sequence[int]],
    profile: Mapping[str, torch.Tensor] | None = None,
    *,
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
) -> dict[str, float]:
    """Per tensor of ``shapes``, the expected mean squared output shift per unit squared weight
    error, for random error shaped by ``profile`` (``row_energy`` of the task vectors: each row's
    variance in proportion to its energy) or isotropic without one.

    For error ``e`` with diagonal covariance ``D`` the expected shift is ``tr(J D J^T)`` (``J``
    the outputs' Jacobian in that tensor), which is ``E_u[g^T D g]`` with ``g = J^T u`` for
    Gaussian ``u`` over the outputs: one backward pass per probe ``u`` gives ``g`` for every
    tensor at once. Tensors whose profile is all zero (no task changes them) get 0: the planner
    charges no error there, as it has none.
    """
    if probes < 1:
        raise TvbasisError(f"--probes {probes}: must be at least 1")
    names = list(shapes)
    scales: dict[str, torch.Tensor] = {}  # per row: the error's variance per entry (up to a constant)
    error_energy: dict[str, float] = {}  # the error's expected squared norm under those variances
    for name in names:
        rows, row_numel = row_view_shape(tuple(int(s) for s in shapes[name]))
        if profile is None:
            scales[name] = torch.ones(rows, dtype=torch.float64)
            error_energy[name] = float(rows * row_numel)
            continue
        if name not in profile:
            raise TvbasisError(f"sensitivity: tensor {name!r} has no row profile")
        energy = profile[name].to(torch.float64)
        if tuple(energy.shape) != (rows,):
            got = tuple(energy.shape)
            raise TvbasisError(f"sensitivity: tensor {name!r}: a row profile of {rows} rows, got {got}")
        scales[name] = energy / row_numel
        error_energy[name] = float(energy.sum())
    deltas = {n: torch.zeros(tuple(shapes[n]), requires_grad=True) for n in names}
    with torch.enable_grad():
        outputs = forward(deltas)
        if outputs.ndim != 2 or not outputs.shape[0]:
            shape = tuple(outputs.shape)
            raise TvbasisError(f"sensitivity: the model's outputs must be (examples, features), got {shape}")
        g = torch.Generator().manual_seed(seed)
        total = dict.fromkeys(names, 0.0)
        bar = progress(probes, "sensitivity", unit="probe")
        for k in range(probes):
            u = torch.randn(outputs.shape, generator=g, dtype=outputs.dtype)
            grads = torch.autograd.grad(
                outputs, [deltas[n] for n in names], u, retain_graph=k < probes - 1, allow_unused=True
            )
            for name, grad in zip(names, grads, strict=True):
                if grad is not None:
                    rows_sq = grad.detach().to(torch.float64).reshape(len(scales[name]), -1).square().sum(dim=1)
                    total[name] += float((scales[name] * rows_sq).sum())
            bar.update()
        bar.close()
    n_examples = outputs.shape[0]
    return {n: total[n] / probes / error_energy[n] / n_examples if error_energy[n] > 0 else 0.0 for n in names}


def normalised_weights(sensitivity: Mapping[str, float], tensor_energy: Mapping[str, float]) -> dict[str, float]:
    """Per tensor, its sensitivity over the energy-weighted mean sensitivity: an error spread over
    the tensors like the tasks' energy then weighs what it weighed unweighted. Every tensor of
    ``tensor_energy`` must have a finite, non-negative sensitivity."""
    missing = [n for n in tensor_energy if n not in sensitivity]
    if missing:
        raise TvbasisError(
            f"sensitivity: no figure for tensor {missing[0]!r} ({len(missing)} missing); measure it for these inputs"
        )
    bad = [n for n in tensor_energy if not (math.isfinite(sensitivity[n]) and sensitivity[n] >= 0)]
    if bad:
        raise TvbasisError(f"sensitivity: tensor {bad[0]!r} has {sensitivity[bad[0]]}; figures must be finite and >= 0")
    total = sum(tensor_energy.values())
    mean = sum(sensitivity[n] * e for n, e in tensor_energy.items()) / total if total > 0 else 0.0
    if mean <= 0:
        raise TvbasisError("sensitivity: every tensor that carries energy has sensitivity 0")
    return {n: sensitivity[n] / mean for n in tensor_energy}


def save_sensitivity(
    path: str | Path,
    sensitivity: Mapping[str, float],
    meta: Mapping[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``{"format", "meta", "tensors"}`` JSON (to a temporary name, then renamed)."""
    path = Path(path)
    body = {"format": FORMAT, "meta": dict(meta or {}), "tensors": dict(sensitivity)}
    with atomic_output(path, overwrite, directory=False) as tmp:
        tmp.write_text(json.dumps(body, indent=1) + "\n")
    return path


def load_sensitivity(path: str | Path) -> dict[str, float]:
    """A sensitivity file's ``{tensor: figure}``; a clear error for anything else."""
    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise TvbasisError(f"{path}: no such sensitivity file (make one with `tvbasis sensitivity`)") from None
    except (OSError, ValueError) as e:
        raise TvbasisError(f"{path}: not a sensitivity file ({e})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("tensors"), dict):
        raise TvbasisError(f"{path}: not a sensitivity file (expected format {FORMAT!r})")
    out = {}
    for name, value in body["tensors"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TvbasisError(f"{path}: tensor {name!r}: figure {value!r} is not a number")
        out[str(name)] = float(value)
    return out
