"""The store format: complete or absent, self-describing, sharded above a size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common import flat, read_flat, write_family
from tvbasis.arithmetic import reconstruct_task
from tvbasis.build import build_store
from tvbasis.errors import StoreError
from tvbasis.methods import make_method
from tvbasis.store import MANIFEST, open_store

EXCLUDE = ["head.*"]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    return write_family(tmp_path_factory.mktemp("fam"), T=4, rank=2)


def test_manifest_describes_everything(family, tmp_path: Path) -> None:
    store = build_store(family.base, family.tasks, make_method("pca", 2), tmp_path / "s", exclude=EXCLUDE)
    m = json.loads((store.path / MANIFEST).read_text())
    assert m["format"] == "tvbasis-store" and m["format_version"] == 1
    assert m["n_atoms"] == 2 and m["n_tasks"] == 4
    assert [t["name"] for t in m["tasks"]] == ["task0", "task1", "task2", "task3"]
    assert m["content_hash_algorithm"] == "xxh3-128"
    assert all(len(t["content_hash"]) == 32 and Path(t["source"]).name.endswith(".safetensors") for t in m["tasks"])
    assert {"tensors", "content_hash", "layout_sha256", "fingerprint"} <= set(m["base"])
    assert m["selection"]["exclude"] == EXCLUDE
    total = sum(p.stat().st_size for p in store.path.rglob("*") if p.is_file())
    assert m["bytes"]["total"] == total  # everything stored is counted, manifest included
    assert m["bytes"]["original_fp32"] == 4 * 4 * len(flat(family.base_state, family.names))
    assert (store.path / "README.md").read_text().startswith("---")


def test_atoms_are_sharded_above_the_limit(family, tmp_path: Path) -> None:
    store = build_store(
        family.base, family.tasks, make_method("pca", 4), tmp_path / "s", exclude=EXCLUDE, max_shard_bytes=600
    )
    files = store.manifest["atoms"]["vectors"][0]["files"]
    assert len(files) > 1 and "-00001-of-" in files[0]
    out = reconstruct_task(store, "task2", tmp_path / "t.safetensors")
    np.testing.assert_allclose(read_flat(out, family.names), flat(family.deltas[2], family.names), atol=1e-5)


def test_incomplete_or_damaged_store_never_loads(family, tmp_path: Path) -> None:
    store = build_store(family.base, family.tasks, make_method("sample", 2), tmp_path / "s", exclude=EXCLUDE)
    atom = store.path / store.manifest["atoms"]["vectors"][0]["files"][0]
    data = atom.read_bytes()
    atom.write_bytes(data[:-4])
    with pytest.raises(StoreError, match="atom-000"):
        open_store(store.path)
    atom.unlink()
    with pytest.raises(StoreError, match="missing"):
        open_store(store.path)
    (store.path / MANIFEST).unlink()
    with pytest.raises(StoreError, match="not a complete tvbasis store"):
        open_store(store.path)


def test_a_crash_mid_build_leaves_nothing(family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tvbasis.engine.streaming as streaming

    real = streaming.atom_pass

    def boom(tvs, atoms, sink, *args: object, **kwargs: object) -> None:
        def failing_sink(chunk, S):
            if chunk.offset > 0:  # after the atom files exist and have some rows
                raise RuntimeError("disk full")
            return sink(chunk, S)

        real(tvs, atoms, failing_sink, *args, **kwargs)

    monkeypatch.setattr(streaming, "atom_pass", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_store(family.base, family.tasks, make_method("pca", 2), tmp_path / "s", exclude=EXCLUDE)
    assert list(tmp_path.iterdir()) == []


def test_newer_format_version_is_refused(family, tmp_path: Path) -> None:
    store = build_store(family.base, family.tasks, make_method("pca", 1), tmp_path / "s", exclude=EXCLUDE)
    m = json.loads((store.path / MANIFEST).read_text())
    m["format_version"] = 99
    (store.path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match="version 99"):
        open_store(store.path)
