"""Where inputs live: local paths, or URLs of any file system fsspec knows (``s3://``, ``gs://``,
``file://``, ``memory://``, ...), through ``universal_pathlib``'s ``UPath``, which offers the
``pathlib`` API over fsspec. Remote inputs are read lazily with ranged reads, like local ones."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tvbasis.errors import TvbasisError

#: A local path, or a ``UPath`` for a URL.
InputPath = Any


def is_url(path: object) -> bool:
    return isinstance(path, str) and "://" in path


def as_input_path(path: str | os.PathLike[str]) -> InputPath:
    """``path`` as a ``Path``, or a ``UPath`` when it is a URL (kept as given; never mangled)."""
    if is_url(path):
        try:
            from upath import UPath
        except ImportError:
            raise TvbasisError(
                f"{path}: reading URLs needs universal_pathlib and fsspec (pip install 'tvbasis[remote]')"
            ) from None
        return UPath(path)
    if type(path).__module__.startswith("upath"):
        return path
    return Path(path)


def is_remote(path: object) -> bool:
    """Whether ``path`` goes through fsspec rather than the local file system."""
    return type(path).__module__.startswith("upath")
