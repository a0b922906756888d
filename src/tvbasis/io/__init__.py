"""Checkpoint I/O: lazy readers for real checkpoint formats and a streaming safetensors writer."""

from tvbasis.io.checkpoint import Checkpoint, open_checkpoint
from tvbasis.io.outputs import atomic_output
from tvbasis.io.writer import SafetensorsStreamWriter, ShardedWriter

__all__ = [
    "Checkpoint",
    "SafetensorsStreamWriter",
    "ShardedWriter",
    "atomic_output",
    "open_checkpoint",
]
