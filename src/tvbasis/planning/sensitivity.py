"""How far a unit of weight error in each tensor moves a model's outputs (``tvbasis sensitivity``).

The planner charges a code's squared error on a tensor relative to the task's energy, as if a
unit of error cost the same everywhere. It does not: in MiniLM-L6 random error in the last two
layers moves the output embeddings 2.5-4.6 times as far as the same error in the first four,
and in the 1-D tensors (norms, biases) about 40 times (docs/frontier.md). A *sensitivity* per
tensor, measured once on a small calibration batch, lets the planner weigh each tensor's error
by what it does to the outputs.

Measurement: for each tensor, add random error shaped like a code's error on the task vectors
(Gaussian, each row scaled by the task vectors' root mean square on that row, as row-local
codes with per-row scales err), run the model on the calibration inputs, and divide the mean
squared shift of its outputs by the error's squared norm. The linearisation point is the base
model; the error is small (``relative`` of the tasks' mean energy in that tensor) so the shift
is in its linear regime. One forward pass per tensor and repeat.

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

import numpy as np
import torch

from tvbasis.codes.core import row_view_shape
from tvbasis.errors import TvbasisError
from tvbasis.io.outputs import atomic_output
from tvbasis.progress import progress

if TYPE_CHECKING:
    from tvbasis.tasks import TaskVectorSet

#: A model's outputs on the calibration inputs with ``delta`` added to its (base) weights:
#: ``(examples, features)``.
Forward = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]

#: The error's squared norm per tensor, relative to the tasks' mean squared norm there.
DEFAULT_RELATIVE_ERROR = 0.05
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
    relative: float = DEFAULT_RELATIVE_ERROR,
    repeats: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    """Per tensor of ``shapes``, the mean squared output shift per unit squared weight error.

    ``profile`` (``row_energy`` of the task vectors) shapes the error's rows and sets its size to
    ``relative`` times the tensor's row energy; without it the error is isotropic with squared
    norm ``relative`` times the tensor's size. Tensors whose profile is all zero (no task changes
    them) get 0: the planner never charges error there.
    """
    if relative <= 0 or not math.isfinite(relative):
        raise TvbasisError(f"--relative-error {relative}: must be positive")
    if repeats < 1:
        raise TvbasisError(f"--repeats {repeats}: must be at least 1")
    with torch.no_grad():
        reference = forward({}).to(torch.float64)
    if reference.ndim != 2 or not reference.shape[0]:
        shape = tuple(reference.shape)
        raise TvbasisError(f"sensitivity: the model's outputs must be (examples, features), got {shape}")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    bar = progress(len(shapes), "sensitivity", unit="tensor")
    for name in shapes:
        bar.update()
        shape = tuple(int(s) for s in shapes[name])
        rows, row_numel = row_view_shape(shape)
        if profile is None:
            row_scale = torch.ones(rows, dtype=torch.float64)
        else:
            if name not in profile:
                raise TvbasisError(f"sensitivity: tensor {name!r} has no row profile")
            energy = profile[name].to(torch.float64)
            if tuple(energy.shape) != (rows,):
                got = tuple(energy.shape)
                raise TvbasisError(f"sensitivity: tensor {name!r}: a row profile of {rows} rows, got {got}")
            if float(energy.sum()) <= 0:
                out[name] = 0.0
                continue
            row_scale = (energy / row_numel).sqrt()
        shifts = []
        for _ in range(repeats):
            noise = torch.randn((rows, row_numel), generator=g, dtype=torch.float64) * row_scale[:, None]
            target = relative * (float(energy.sum()) if profile is not None else rows * row_numel)
            noise *= math.sqrt(target / max(float(noise.square().sum()), 1e-300))
            with torch.no_grad():
                moved = forward({name: noise.reshape(shape).to(torch.float32)}).to(torch.float64)
            shifts.append(float((moved - reference).square().sum(dim=1).mean()) / target)
        out[name] = float(np.mean(shifts))
    bar.close()
    return out


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
