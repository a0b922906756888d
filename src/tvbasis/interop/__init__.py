"""Converters between tvbasis stores and the files of other task-vector tools."""

from __future__ import annotations

from tvbasis.interop.official import UnsafeLoadWarning, import_official_run

__all__ = ["UnsafeLoadWarning", "import_official_run"]
