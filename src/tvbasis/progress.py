"""Progress bars for passes over the data: shown on a terminal, silent otherwise or when quiet."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress bar tvbasis draws."""
    global _quiet
    _quiet = quiet


def progress(total: int, desc: str, unit: str = "B") -> tqdm:
    """A progress bar over ``total`` units that hides itself when stderr is not a terminal."""
    disable = _quiet or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=disable, leave=False, dynamic_ncols=True)
