"""The codes' calibration on Gaussian rows, kept across processes (``planning.calibration``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tvbasis.codes import parse_code
from tvbasis.planning import calibration
from tvbasis.planning.calibration import (
    calibration_file,
    forget_calibration,
    measure_relative_error,
    relative_error,
    save_calibration,
)

INT4 = parse_code("int4")
KEEP = parse_code("keep:0.25:sr2:seed=0")
LOWRANK = parse_code("lowrank:2")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("TVBASIS_CACHE", str(tmp_path))
    forget_calibration()
    yield tmp_path
    forget_calibration()


def _no_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError(f"measured {args} again")

    monkeypatch.setattr(calibration, "measure_relative_error", fail)


def test_a_new_process_reads_what_an_earlier_one_measured(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = {spec: relative_error(spec, 96, 40) for spec in (INT4, KEEP, LOWRANK)}
    assert figures == {spec: measure_relative_error(spec, 96, 40) for spec in figures}
    save_calibration()
    assert calibration_file().is_file() and calibration_file().parent.parent == cache
    forget_calibration()
    _no_measuring(monkeypatch)
    assert {spec: relative_error(spec, 96, 40) for spec in figures} == figures


def test_tall_tensors_share_a_row_local_codes_entry(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row-local code sees the same few rows of any tensor taller than them; tensor-wide codes
    see up to CALIBRATION_ROWS rows, so their figures differ by height."""
    tall = relative_error(INT4, 384, 30522)
    _no_measuring(monkeypatch)
    assert relative_error(INT4, 384, 512) == tall
    with pytest.raises(AssertionError, match="measured"):
        relative_error(LOWRANK, 384, 30)  # 30 rows against 64: another entry


def test_a_damaged_or_unwritable_cache_only_costs_time(cache: Path) -> None:
    expected = measure_relative_error(INT4, 64, 8)
    path = calibration_file()
    path.parent.mkdir(parents=True)
    path.write_text('{"format": "tvbasis-code-calibration/1", "entries": {"x": [1')
    assert relative_error(INT4, 64, 8) == expected
    save_calibration()  # replaces the damaged file
    forget_calibration()
    assert relative_error(INT4, 64, 8) == expected and calibration._table
    blocked = cache / "blocked"
    blocked.write_text("a file where the cache directory would be")
    forget_calibration()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TVBASIS_CACHE", str(blocked))
        assert relative_error(INT4, 64, 8) == expected
        save_calibration()  # cannot create blocked/code-calibration: no error, nothing written
    assert blocked.read_text().startswith("a file")


def test_a_changed_code_measures_afresh(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache file is named by the sources the figures depend on: edit one, and it is another file."""
    sources = list(calibration._sources())
    assert {"keep.py", "rsign.py", "quantize.py", "calibration.py"} <= {f.name for f in sources}
    copy = cache / "keep.py"
    copy.write_bytes(sources[0].read_bytes())
    monkeypatch.setattr(calibration, "_sources", lambda: [*sources[1:], copy])
    first = calibration_file()
    copy.write_bytes(copy.read_bytes() + b"# changed")
    assert calibration_file() != first and calibration_file().parent == first.parent
