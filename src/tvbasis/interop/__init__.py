"""Converters between tvbasis stores and the files of other task-vector tools."""

from __future__ import annotations

from tvbasis.interop.official import UnsafeLoadWarning, import_official_run
from tvbasis.interop.peft import LoraReport, write_lora_adapter

__all__ = ["LoraReport", "UnsafeLoadWarning", "import_official_run", "write_lora_adapter"]
