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
probe give every row of every tensor at once (``row_sensitivity``).

The two factors are kept apart. What a unit of error in each *row* does depends only on the base
model and the calibration inputs: ``tvbasis sensitivity`` measures it once per base and saves it
(``save_sensitivity``, a safetensors file of one ``(rows,)`` vector per tensor). How the tasks'
energy spreads over the rows comes from the Gram pass of the planned build (``--tensor-stats``
keeps it beside the per-tensor Gram matrices), so planning any set of fine-tunes of that base
reads both and costs no model pass (``tensor_sensitivity`` combines them). The planner
rescales the per-tensor figures (``normalised_weights``) so that an error spread like the tasks'
energy costs what it cost before, which keeps ``noise_weight`` meaning the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from tvbasis.codes.core import row_view_shape
from tvbasis.errors import TvbasisError
from tvbasis.io.outputs import atomic_output
from tvbasis.progress import progress

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
FORMAT = "tvbasis-sensitivity/2"


def row_sensitivity(
    forward: Forward, shapes: Mapping[str, Sequence[int]], *, probes: int = DEFAULT_PROBES, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Per tensor of ``shapes``, per row (``row_view_shape`` rows): the expected mean squared output
    shift per unit squared weight error spread evenly over that row's entries, (rows,) float64.

    For error ``e`` with diagonal covariance ``D`` the expected shift is ``tr(J D J^T)`` (``J``
    the outputs' Jacobian in that tensor), which is ``E_u[g^T D g]`` with ``g = J^T u`` for
    Gaussian ``u`` over the outputs: one backward pass per probe ``u`` gives ``g`` for every
    tensor at once, and a row's figure is its mean ``g^2``.
    """
    if probes < 1:
        raise TvbasisError(f"--probes {probes}: must be at least 1")
    names = list(shapes)
    views = {n: row_view_shape(tuple(int(s) for s in shapes[n])) for n in names}
    deltas = {n: torch.zeros(tuple(shapes[n]), requires_grad=True) for n in names}
    total = {n: torch.zeros(views[n][0], dtype=torch.float64) for n in names}
    with torch.enable_grad():
        outputs = forward(deltas)
        if outputs.ndim != 2 or not outputs.shape[0]:
            shape = tuple(outputs.shape)
            raise TvbasisError(f"sensitivity: the model's outputs must be (examples, features), got {shape}")
        g = torch.Generator().manual_seed(seed)
        bar = progress(probes, "sensitivity", unit="probe")
        for k in range(probes):
            u = torch.randn(outputs.shape, generator=g, dtype=outputs.dtype)
            grads = torch.autograd.grad(
                outputs, [deltas[n] for n in names], u, retain_graph=k < probes - 1, allow_unused=True
            )
            for name, grad in zip(names, grads, strict=True):
                if grad is not None:
                    total[name] += grad.detach().to(torch.float64).reshape(views[name][0], -1).square().sum(dim=1)
            bar.update()
        bar.close()
    n_examples = outputs.shape[0]
    return {n: total[n] / (probes * n_examples * max(views[n][1], 1)) for n in names}


def tensor_sensitivity(
    rows: Mapping[str, torch.Tensor],
    profile: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Per tensor, the expected output shift per unit squared error (from ``row_sensitivity``'s
    row figures ``rows``) for random error shaped by ``profile`` (per tensor, the tasks' energy of
    each row, as the Gram pass's ``row_energy``: each row's variance in proportion to it): the
    rows' figures averaged with the profile as weights. Without a profile the error is spread
    evenly (the rows' mean). Covers ``names`` (default: ``profile``'s tensors, or ``rows``'
    without one); tensors whose profile is all zero (no task changes them) get 0: the planner charges no
    error there, as it has none."""
    if names is None:
        names = list(rows if profile is None else profile)
    missing = [n for n in names if n not in rows]
    if missing:
        raise TvbasisError(
            f"sensitivity: no figures for tensor {missing[0]!r} ({len(missing)} missing); measure them for this base"
        )
    out = {}
    for name in names:
        figures = rows[name].to(torch.float64)
        if profile is None:
            out[name] = float(figures.mean()) if len(figures) else 0.0
            continue
        if name not in profile:
            raise TvbasisError(f"sensitivity: tensor {name!r} has no row profile")
        energy = torch.as_tensor(profile[name], dtype=torch.float64)
        if tuple(energy.shape) != tuple(figures.shape):
            raise TvbasisError(
                f"sensitivity: tensor {name!r} has {len(figures)} rows of figures and a row profile of "
                f"{tuple(energy.shape)}; measure the sensitivity on the base these tasks were tuned from"
            )
        total = float(energy.sum())
        out[name] = float((energy * figures).sum()) / total if total > 0 else 0.0
    return out


def output_sensitivity(
    forward: Forward,
    shapes: Mapping[str, Sequence[int]],
    profile: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    *,
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
) -> dict[str, float]:
    """``tensor_sensitivity`` of ``row_sensitivity``: per tensor, the expected mean squared output
    shift per unit squared weight error, for error shaped by ``profile`` (or isotropic)."""
    return tensor_sensitivity(row_sensitivity(forward, shapes, probes=probes, seed=seed), profile, list(shapes))


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
    rows: Mapping[str, torch.Tensor],
    meta: Mapping[str, object] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the row figures (``row_sensitivity``) as safetensors, ``meta`` in its header (to a
    temporary name, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {n: v.detach().to(torch.float64).contiguous() for n, v in rows.items()}
    header = {"format": FORMAT, "meta": json.dumps(dict(meta or {}))}
    with atomic_output(path, overwrite, directory=False) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def load_sensitivity(path: str | Path) -> dict[str, torch.Tensor]:
    """A sensitivity file's row figures ``{tensor: (rows,) float64}``; a clear error for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise TvbasisError(f"{path}: no such sensitivity file (make one with `tvbasis sensitivity`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise TvbasisError(f"{path}: not a sensitivity file (expected format {FORMAT!r}; measure it again)")
            out = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise TvbasisError(f"{path}: not a sensitivity file ({e})") from None
    for name, figures in out.items():
        if figures.ndim != 1 or not torch.is_floating_point(figures):
            raise TvbasisError(f"{path}: tensor {name!r}: expected a vector of row figures, got {tuple(figures.shape)}")
        if not bool(torch.isfinite(figures).all()) or bool((figures < 0).any()):
            raise TvbasisError(f"{path}: tensor {name!r}: figures must be finite and >= 0")
        out[name] = figures.to(torch.float64)
    return out
