"""The codes' relative error on Gaussian rows: what the planner multiplies a residual's energy by.

A code's bias and variance relative to the energy it codes depend on the code and on the row
length (and, for tensor-wide codes such as low rank and top-k, on how many rows it sees), not on
the tensor's values to first order, so the planner measures them once on fixed-seed Gaussian
rows (``codes.bias_variance``) and reuses them for every tensor of that shape.

Measuring every default candidate on MiniLM-L6's row lengths takes about 1.5 s, three quarters
as long as the rest of planning, so the figures are kept in memory and on disk
(``$TVBASIS_CACHE/code-calibration/<fingerprint>.json``): a new process plans as fast as a warm
one. The fingerprint covers the code implementations (``tvbasis/codes`` and the row quantizer
they share), this module and torch's version (its generator draws the rows), so a change to any
of them measures afresh; a missing, unreadable or unwritable cache only costs the time to measure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import uuid
from functools import lru_cache
from pathlib import Path

import torch

from tvbasis.codes import CodeSpec, TensorKey, bias_variance, code
from tvbasis.io.cache_dirs import default_cache_dir

#: Tensor-wide codes see at most this many rows of the tensor's row length.
CALIBRATION_ROWS = 64
#: Row-local codes see about this many entries (their relative errors are averages over entries).
CALIBRATION_ENTRIES = 16384
FORMAT = "tvbasis-code-calibration/1"

# key -> (bias, variance); the file it was read from and whether entries were added since
_table: dict[str, tuple[float, float]] = {}
_loaded_from: Path | None = None
_dirty = False


def calibration_rows(spec: CodeSpec, row_numel: int, rows: int) -> tuple[int, bool]:
    """``(rows measured, as one flat row?)`` for ``spec`` on a tensor of ``rows`` rows of ``row_numel``."""
    n_rows = min(rows, CALIBRATION_ROWS)
    if code(spec.name).row_local:
        n_rows = min(n_rows, -(-CALIBRATION_ENTRIES // max(row_numel, 1)))
    n_rows = max(1, n_rows)
    return n_rows, rows == 1 and n_rows == 1


def measure_relative_error(spec: CodeSpec, row_numel: int, rows: int) -> tuple[float, float]:
    """``(bias, variance) / ||x||^2`` of ``spec`` on Gaussian rows of ``row_numel`` entries (fixed
    seed), measured now (``relative_error`` is the cached form)."""
    if spec.name == "none":
        return 1.0, 0.0
    n_rows, flat = calibration_rows(spec, row_numel, rows)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n_rows, row_numel), generator=g, dtype=torch.float64)
    if flat:  # a 1-D tensor is one row; tensor-wide codes see a (sub)matrix of the tensor's row length
        x = x.reshape(-1)
    err = bias_variance(spec, x, TensorKey("calibration", "calibration", 0))
    energy = float(x.square().sum())
    return err.bias_sq / energy, err.variance / energy


@lru_cache(maxsize=16384)
def relative_error(spec: CodeSpec, row_numel: int, rows: int) -> tuple[float, float]:
    """``measure_relative_error``, from memory or the on-disk cache where measured before. Tensors
    whose calibration sees the same rows share one entry (row-local codes see the same few rows
    of any tall tensor)."""
    global _dirty
    if spec.name == "none":
        return 1.0, 0.0
    _load()
    n_rows, flat = calibration_rows(spec, row_numel, rows)
    key = f"{spec!r}|{row_numel}|{n_rows}|{int(flat)}"
    found = _table.get(key)
    if found is None:
        found = _table[key] = measure_relative_error(spec, row_numel, rows)
        _dirty = True
    return found


def calibration_file() -> Path:
    """Where this installation's figures are cached (the name fingerprints what they depend on)."""
    h = hashlib.sha256(f"{FORMAT}\0{torch.__version__}\n".encode())
    for f in _sources():
        h.update(f"{f.name}\0".encode() + f.read_bytes())
    return default_cache_dir() / "code-calibration" / f"{h.hexdigest()[:20]}.json"


def _sources() -> list[Path]:
    """The files whose code the figures depend on."""
    package = Path(__file__).parents[1]
    return [*sorted((package / "codes").glob("*.py")), package / "store" / "quantize.py", Path(__file__)]


def save_calibration() -> None:
    """Write the figures measured since the cache was read (merged with what another process may
    have written meanwhile) under a temporary name, then rename it into place. Failing to write
    (a read-only cache, a full disk) is not an error: the cache only saves time."""
    global _dirty
    if not _dirty or _loaded_from is None:
        return
    path = _loaded_from
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = {**_read(path), **_table}
        tmp.write_text(json.dumps({"format": FORMAT, "entries": entries}, sort_keys=True) + "\n")
        os.replace(tmp, path)
        _dirty = False
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def forget_calibration() -> None:
    """Forget what this process holds (not the file), as a new process would start."""
    global _loaded_from, _dirty
    relative_error.cache_clear()
    _table.clear()
    _loaded_from, _dirty = None, False


def _load() -> None:
    """Read the cache file once per process (and again if ``$TVBASIS_CACHE`` changed)."""
    global _loaded_from, _dirty
    if _loaded_from is not None and _loaded_from.parents[1] == default_cache_dir():
        return
    path = calibration_file()
    _table.clear()
    _table.update(_read(path))
    _loaded_from, _dirty = path, False


def _read(path: Path) -> dict[str, tuple[float, float]]:
    """The entries of a cache file; nothing for a missing or damaged one (it is measured again)."""
    try:
        body = json.loads(path.read_text())
        entries = body["entries"] if body.get("format") == FORMAT else {}
        return {
            str(k): (float(v[0]), float(v[1]))
            for k, v in entries.items()
            if len(v) == 2 and all(math.isfinite(float(x)) for x in v)
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}
