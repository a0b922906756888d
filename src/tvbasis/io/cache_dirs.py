"""Content-addressed output directories: hashing, atomic install, markers (text and vision suites).

A cached output (a converted image encoder, a fine-tune, a derived model) is a directory built under a
temporary sibling name, its marker JSON written last, then renamed into place. A directory
is reused only when its marker records the same cache key, so a crash never leaves something
that looks complete, and a changed input gets a new directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tvbasis.errors import TvbasisError

WEIGHTS_FILE = "model.safetensors"

_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime) so repeated cache lookups stay cheap."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _digests.get(memo)
    if digest is None:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = _digests[memo] = h.hexdigest()
    return digest


def fingerprint_files(files: Iterable[Path]) -> str:
    """One hash over the names and contents of ``files`` (in the order given)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


def json_digest(payload: Any) -> str:
    """SHA-256 of a JSON-serialisable payload in a canonical form."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def marker_matches(out_dir: Path, marker: str, expected: Mapping[str, Any]) -> bool:
    """Whether ``out_dir`` has its weights, config and a marker JSON holding the ``expected`` items."""
    if not all((out_dir / n).is_file() for n in (marker, WEIGHTS_FILE, "config.json")):
        return False
    try:
        found = json.loads((out_dir / marker).read_text())
        return all(found.get(k) == v for k, v in expected.items())
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(out_dir: Path, marker: str) -> None:
    """Refuse to replace a non-empty directory that tvbasis did not write."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / marker).is_file())):
        raise TvbasisError(f"{out_dir}: exists and is not a tvbasis output ({marker} missing); not overwriting it")


def tmp_dir(out_dir: Path) -> Path:
    """A fresh, empty sibling of ``out_dir`` to build it in."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def install(tmp: Path, out_dir: Path, done_by_other: Callable[[], bool]) -> None:
    """Rename the finished ``tmp`` into place, replacing an older output (not a concurrent equal one)."""
    if out_dir.exists():
        if done_by_other():
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same work first
            return
        trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out_dir.rename(trash)
        tmp.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        tmp.rename(out_dir)
    except OSError:
        if not (out_dir.exists() and done_by_other()):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON under a temporary name and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _jsonable(x: object) -> object:
    import numpy as np

    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def default_cache_dir() -> Path:
    """Where tvbasis caches models, fine-tunes and calibrations: $TVBASIS_CACHE or ~/.cache/tvbasis."""
    return Path(os.environ.get("TVBASIS_CACHE", Path.home() / ".cache" / "tvbasis"))
