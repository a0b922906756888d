"""Outputs appear whole or not at all.

Everything tvbasis writes goes to a temporary sibling (``NAME.tmp-XXXX``) and is renamed
to its final name only once complete, so a crash or an error never leaves something under
the final name that looks whole.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tvbasis.errors import TvbasisError


def check_output_path(path: Path, overwrite: bool) -> None:
    """Fail early, before any work, if ``path`` exists and may not be replaced."""
    if path.exists() and not overwrite:
        raise TvbasisError(f"{path}: output already exists (pass --overwrite to replace it)")
    if not path.parent.exists():
        raise TvbasisError(f"{path}: parent directory {path.parent} does not exist")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | Path, overwrite: bool = False, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write into; rename it to ``path`` when the block succeeds.

    With ``directory=True`` the temporary path is a fresh empty directory, otherwise a file
    path that does not exist yet. On error the temporary output is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    check_output_path(path, overwrite)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.exists() or path.is_symlink():
        if not overwrite:  # appeared while we worked
            _remove(tmp)
            raise TvbasisError(f"{path}: output appeared while writing (pass --overwrite to replace it)")
        old = path.with_name(f"{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)
