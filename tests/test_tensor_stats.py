"""Per-tensor Gram matrices (``build --tensor-stats``) and ``tvbasis plan``'s estimates from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from common import read_flat, tiny_bert_config, tree_digest, write_family
from tvbasis.build import build_store
from tvbasis.cli import app
from tvbasis.engine.streaming import gram_pass
from tvbasis.errors import TvbasisError
from tvbasis.methods import make_method
from tvbasis.planning import atom_bytes, estimate_store
from tvbasis.store import open_store
from tvbasis.store.format import MANIFEST, MATRICES, TENSOR_GRAM, TENSOR_ROW_ENERGY, TENSOR_ROWS
from tvbasis.tasks import TaskSource, TaskVectorSet
from tvbasis.update import add_task, refit, remove_task

pytestmark = pytest.mark.usefixtures("one_thread")
EXCLUDE = ["head.*"]
runner = CliRunner()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    return write_family(tmp_path_factory.mktemp("fam"), T=6, rank=3, untouched_rows=0.5)


def layout(family) -> list[str]:
    """The task-vector tensors in the store's order."""
    return [i.name for i in TaskVectorSet(family.base, family.tasks, exclude=EXCLUDE).tensors]


def tensor_blocks(family) -> dict[str, np.ndarray]:
    """Each tensor's dense (numel, T) task-vector rows X_n, in layout order."""
    return {n: np.stack([d[n].reshape(-1).numpy() for d in family.deltas], axis=1) for n in layout(family)}


def dense_row_energy(family, tasks: list[int] | None = None) -> dict[str, np.ndarray]:
    """Each tensor's per-row energy (a 1-D tensor: one row), the mean over ``tasks`` (default all)."""
    out = {}
    for n in layout(family):
        x = np.stack([family.deltas[t][n].double().numpy() for t in tasks or range(len(family.deltas))])
        rows = x.reshape(len(x), x.shape[1] if x.ndim >= 3 else 1, -1)  # (T, rows, row_numel)
        out[n] = np.square(rows).sum(axis=2).mean(axis=0)
    return out


def _close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-12) -> None:
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1e-300))


# -- the Gram pass ---------------------------------------------------------------------------------


def test_tensor_grams_are_the_dense_ones_and_sum_to_G(family) -> None:
    tvs = TaskVectorSet(family.base, family.tasks, exclude=EXCLUDE)
    blocks = tensor_blocks(family)
    plain = gram_pass(tvs, chunk_elements=7)
    assert plain.tensor_grams is None
    for chunk in (1, 7, 1 << 20):
        stats = gram_pass(tvs, chunk_elements=chunk, tensor_stats=True)
        assert stats.tensor_grams is not None and list(stats.tensor_grams) == layout(family)
        for n, X in blocks.items():
            _close(stats.tensor_grams[n], X.T @ X)
            assert np.array_equal(stats.tensor_grams[n], stats.tensor_grams[n].T)
        _close(sum(stats.tensor_grams.values()), stats.gram)
        # and each row's energy, the tasks' mean, whatever the chunks
        assert stats.row_energy is not None and list(stats.row_energy) == layout(family)
        for n, want in dense_row_energy(family).items():
            _close(stats.row_energy[n], want)
        if chunk == 7:  # the option changes nothing else
            assert np.array_equal(stats.gram, plain.gram) and stats.task_hashes == plain.task_hashes


# -- the store -----------------------------------------------------------------------------------


def test_store_keeps_them_counted_and_otherwise_unchanged(family, tmp_path: Path) -> None:
    kw = {"exclude": EXCLUDE, "chunk_elements": 7}
    without = build_store(family.base, family.tasks, make_method("pca", 2), tmp_path / "a", **kw)
    with_ = build_store(family.base, family.tasks, make_method("pca", 2), tmp_path / "b", tensor_stats=True, **kw)
    # stores without them are as before: no file, no manifest key, no byte key, nothing to load
    assert not (without.path / TENSOR_GRAM).exists() and without.tensor_grams is None
    assert "tensor_stats" not in without.manifest and "tensor_gram" not in without.manifest["bytes"]
    assert "tensor_stats" not in without.summary()
    # every other file is the same, bit for bit
    da, db = tree_digest(without.path), tree_digest(with_.path)
    assert set(db) - set(da) == {TENSOR_GRAM, TENSOR_ROWS, TENSOR_ROW_ENERGY}
    assert all(da[f] == db[f] for f in da if f not in (MANIFEST, "README.md"))
    # loaded in layout order, equal to the pass's, summing to G
    reopened = open_store(with_.path)
    grams = reopened.tensor_grams
    assert grams is not None and list(grams) == layout(family)
    tvs = TaskVectorSet(family.base, family.tasks, exclude=EXCLUDE)
    stats = gram_pass(tvs, chunk_elements=7, tensor_stats=True)
    assert all(np.array_equal(grams[n], stats.tensor_grams[n]) for n in family.names)  # type: ignore[index]
    _close(sum(grams.values()), reopened.gram)
    # with each tensor's count of nonzero rows per task
    counts = reopened.tensor_nonzero_rows
    assert counts is not None and list(counts) == layout(family)
    assert all(np.array_equal(counts[n], stats.nonzero_rows[n]) for n in family.names)  # type: ignore[index]
    # and each row's energy
    energy = reopened.tensor_row_energy
    assert energy is not None and list(energy) == layout(family)
    assert all(np.array_equal(energy[n], stats.row_energy[n]) for n in family.names)  # type: ignore[index]
    # counted in the store's bytes like everything else
    files = (TENSOR_GRAM, TENSOR_ROWS, TENSOR_ROW_ENERGY)
    size = sum((with_.path / f).stat().st_size for f in files)
    b = reopened.manifest["bytes"]
    assert sum(reopened.manifest["files"][f] for f in files) == size
    assert b["tensor_gram"] == size
    assert b["matrices"] == size + (with_.path / MATRICES).stat().st_size
    on_disk = sum(p.stat().st_size for p in with_.path.rglob("*") if p.is_file())
    assert b["total"] == on_disk and b["total"] == b["atoms"] + b["matrices"] + b["other"] + b["manifest"]
    assert reopened.manifest["tensor_stats"] == {
        "gram": TENSOR_GRAM,
        "nonzero_rows": TENSOR_ROWS,
        "row_energy": TENSOR_ROW_ENERGY,
    }
    assert reopened.summary()["tensor_stats"]


def test_a_damaged_tensor_gram_file_is_refused(family, tmp_path: Path) -> None:
    store = build_store(family.base, family.tasks, make_method("pca", 2), tmp_path / "s", exclude=EXCLUDE,
                        tensor_stats=True)  # fmt: skip
    (store.path / TENSOR_GRAM).write_bytes(b"x" * (store.path / TENSOR_GRAM).stat().st_size)
    with pytest.raises(TvbasisError, match=TENSOR_GRAM):
        estimate_store(open_store(store.path))


# -- updates keep them up to date like G ------------------------------------------------------------


def test_add_remove_refit_keep_the_tensor_grams(family, tmp_path: Path) -> None:
    kw = {"exclude": EXCLUDE, "tensor_stats": True}
    full = build_store(family.base, family.tasks, make_method("pca", 2), tmp_path / "full", **kw)
    part = build_store(family.base, family.tasks[:5], make_method("pca", 2), tmp_path / "part", **kw)
    added, _ = add_task(part, family.tasks[5], out=tmp_path / "added")
    assert added.tensor_grams is not None and full.tensor_grams is not None
    for n in family.names:
        _close(added.tensor_grams[n], full.tensor_grams[n])
    _close(sum(added.tensor_grams.values()), added.gram)
    assert estimate_store(added).tensors  # the planner reads an updated store too
    # the counts of nonzero rows follow the same way (18 of embed.weight's 37 rows are untouched)
    assert full.tensor_nonzero_rows is not None and list(full.tensor_nonzero_rows["embed.weight"]) == [19] * 6
    assert _counts(added) == _counts(full)
    # the row energies too (the pass read every task: its own mean)
    assert added.tensor_row_energy is not None and full.tensor_row_energy is not None
    for n in family.names:
        _close(added.tensor_row_energy[n], full.tensor_row_energy[n])

    removed = remove_task(added, "task2", out=tmp_path / "removed")
    keep = [0, 1, 3, 4, 5]
    assert removed.tensor_grams is not None
    for n in family.names:
        assert np.array_equal(removed.tensor_grams[n], added.tensor_grams[n][np.ix_(keep, keep)])
    assert _counts(removed) == {n: [c[i] for i in keep] for n, c in _counts(added).items()}
    # the mean row energy cannot drop one task's share: it is gone until a refit or new build
    assert removed.tensor_row_energy is None
    # the atoms were fitted on task2, which is gone: the planner says so
    with pytest.raises(TvbasisError, match=r"task2.*refit"):
        estimate_store(removed)

    refitted = refit(removed, out=tmp_path / "refitted")
    assert refitted.tensor_grams is not None
    for n in family.names:
        assert np.array_equal(refitted.tensor_grams[n], removed.tensor_grams[n])  # carried over, not recomputed
    assert _counts(refitted) == _counts(removed)
    fresh = build_store(family.base, [family.tasks[i] for i in keep], make_method("pca", 2), tmp_path / "fr", **kw)
    assert fresh.tensor_grams is not None
    for n in family.names:
        _close(refitted.tensor_grams[n], fresh.tensor_grams[n])
    assert estimate_store(refitted).tensors

    # a store without them stays without them
    plain = build_store(family.base, family.tasks[:5], make_method("pca", 2), tmp_path / "p", exclude=EXCLUDE)
    plain_added = add_task(plain, family.tasks[5], out=tmp_path / "pa")[0]
    assert plain_added.tensor_grams is None and plain_added.tensor_nonzero_rows is None


def _counts(store) -> dict[str, list[int]]:
    assert store.tensor_nonzero_rows is not None
    return {n: c.tolist() for n, c in store.tensor_nonzero_rows.items()}


def test_add_task_without_the_other_inputs_leaves_nan_like_G(family, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "moved"
    shutil.copytree(family.base.parent, root)
    tasks = [TaskSource(t.name, root / t.path.name) for t in family.tasks]
    store = build_store(root / "base.safetensors", tasks[:5], make_method("pca", 2), tmp_path / "s",
                        exclude=EXCLUDE, tensor_stats=True)  # fmt: skip
    (root / "task0.safetensors").unlink()
    added, info = add_task(store, tasks[5], out=tmp_path / "a")
    assert not info.gram_row_known and added.tensor_grams is not None
    for n, g in added.tensor_grams.items():
        assert np.array_equal(np.isnan(g), np.isnan(added.gram)), n
    # the mean row energy is known all the same: the old mean and the new task's rows, 5 : 1
    assert added.tensor_row_energy is not None
    for n, want in dense_row_energy(family).items():
        _close(added.tensor_row_energy[n], want, rtol=1e-10)
    with pytest.raises(TvbasisError, match=r"incomplete.*refit"):
        estimate_store(added)


# -- the planner's estimates against dense references ------------------------------------------------


@pytest.mark.parametrize(
    "method,kw", [("pca", {}), ("pca", {"center": True}), ("autoencoder", {"steps": 300}), ("sample", {})]
)
def test_estimates_equal_the_measured_errors(family, tmp_path: Path, method: str, kw: dict) -> None:
    store = build_store(family.base, family.tasks, make_method(method, 2, **kw), tmp_path / "s", exclude=EXCLUDE,
                        tensor_stats=True)  # fmt: skip
    est = estimate_store(store, [1, 2, 4, 6])
    blocks = tensor_blocks(family)
    # the store's own reconstruction of every task, from its fp32 atom files
    atoms = np.stack(
        [read_flat(store.path / v["files"][0], list(blocks)) for v in store.manifest["atoms"]["vectors"]], 1
    )
    recon = atoms @ store.decoder
    total_trace = sum(float(np.sum(X**2)) for X in blocks.values())
    offset, resid_total = 0, 0.0
    for t in est.tensors:
        X = blocks[t.name]
        R = recon[offset : offset + X.shape[0]]
        offset += X.shape[0]
        energy = float(np.sum(X**2))
        resid = float(np.sum((X - R) ** 2))
        resid_total += resid
        assert t.energy_share == pytest.approx(energy / total_trace, rel=1e-10)
        # exact up to the fp32 rounding of the stored atoms
        assert t.basis_rel_error == pytest.approx(resid / energy, rel=1e-4, abs=1e-7), t.name
        s = np.linalg.svd(X, compute_uv=False)
        for m in est.atoms:
            assert t.pca_rel_error[m] == pytest.approx(float(np.sum(s[m:] ** 2)) / energy, rel=1e-8, abs=1e-12)
            assert t.pca_bytes[m] == m * X.shape[0] * 4 + m * 6 * 8
        assert t.basis_bytes == store.decoder.shape[0] * X.shape[0] * 4
    assert est.total_basis_rel_error == pytest.approx(resid_total / total_trace, rel=1e-4)
    # M = T reconstructs every tensor exactly; the per-tensor basis is never worse than the global one at M = K
    assert all(t.pca_rel_error[6] < 1e-12 for t in est.tensors)
    assert store.decoder.shape[0] <= 4 and est.total_pca_rel_error[4] <= est.total_basis_rel_error + 1e-12
    # the global basis's relative error over all tasks is the store's own (Frobenius) error
    norms = np.array([t["norm"] for t in store.manifest["tasks"]])
    rel = np.array([t["rel_error"] for t in store.manifest["tasks"]])
    assert est.total_basis_rel_error == pytest.approx(float(np.sum((rel * norms) ** 2) / np.sum(norms**2)), rel=1e-6)


def test_atom_bytes_are_the_stored_payload(family, tmp_path: Path) -> None:
    for dtype in ("int8", "bf16"):
        store = build_store(family.base, family.tasks, make_method("pca", 2), tmp_path / dtype, exclude=EXCLUDE,
                            dtype=dtype, tensor_stats=True)  # fmt: skip
        est = estimate_store(store)
        payload = 0
        for v in store.manifest["atoms"]["vectors"]:
            with safe_open(str(store.path / v["files"][0]), "pt") as f:
                payload += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
        assert sum(t.basis_bytes for t in est.tensors) == payload
        assert est.total_basis_bytes == payload + store.decoder.size * 8
        assert atom_bytes((19, 8), dtype) == (19 * 8 + 19 * 4 if dtype == "int8" else 19 * 8 * 2)
        assert est.to_dict()["note"]  # rounded atoms: the global-basis figures are of the unrounded ones


# -- refusals ----------------------------------------------------------------------------------------


def test_plan_refuses_clearly(family, tmp_path: Path) -> None:
    plain = build_store(family.base, family.tasks, make_method("pca", 2), tmp_path / "plain", exclude=EXCLUDE)
    with pytest.raises(TvbasisError, match=rf"{tmp_path / 'plain'}.*--tensor-stats"):
        estimate_store(plain)
    rnd = build_store(family.base, family.tasks, make_method("random", 2), tmp_path / "rnd", exclude=EXCLUDE,
                      tensor_stats=True)  # fmt: skip
    with pytest.raises(TvbasisError, match=rf"{tmp_path / 'rnd'}.*not linear"):
        estimate_store(rnd)
    ties = build_store(family.base, family.tasks, make_method("cluster", 2, merge="ties"), tmp_path / "ties",
                       exclude=EXCLUDE, tensor_stats=True)  # fmt: skip
    with pytest.raises(TvbasisError, match="not linear"):
        estimate_store(ties)
    pca = build_store(family.base, family.tasks, make_method("pca", 2), tmp_path / "pca", exclude=EXCLUDE,
                      tensor_stats=True)  # fmt: skip
    with pytest.raises(TvbasisError, match="--atoms 7"):
        estimate_store(pca, [7])


# -- LoRA inputs ---------------------------------------------------------------------------------------


def test_lora_tensor_grams_from_factors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import transformers

    import test_lora_inputs as lo

    torch.manual_seed(0)
    transformers.BertModel(tiny_bert_config()).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    ft = transformers.BertModel.from_pretrained(base, use_safetensors=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    ft.save_pretrained(tmp_path / "dense")
    adapters = []
    for i, name in enumerate(("plain", "embed", "pattern")):
        cls_name, settings, bin_file = lo.ADAPTERS[name]
        lo.make_adapter(base, tmp_path / name, cls_name, settings, bin_file, 100 + i)
        adapters.append(TaskSource(name, tmp_path / name))

    def per_tensor_dense(tvs: TaskVectorSet, energy: bool = False) -> dict[str, np.ndarray]:
        V = lo.dense_rows(tvs)
        out, offset = {}, 0
        for info in tvs.tensors:
            X = V[offset : offset + info.numel]
            offset += info.numel
            rows = info.shape[0] if len(info.shape) >= 2 else 1
            out[info.name] = np.square(X).reshape(rows, -1).sum(axis=1) / X.shape[1] if energy else X.T @ X
        return out

    mixed = TaskVectorSet(base, [TaskSource("ft", tmp_path / "dense"), *adapters])
    only_lora = TaskVectorSet(base, adapters)
    want_mixed, want_lora = per_tensor_dense(mixed), per_tensor_dense(only_lora)
    for chunk in (37, 1 << 20):
        stats = gram_pass(mixed, chunk_elements=chunk, tensor_stats=True)
        assert stats.tensor_grams is not None
        for n, want in want_mixed.items():
            _close(stats.tensor_grams[n], want, rtol=1e-10)
        _close(sum(stats.tensor_grams.values()), stats.gram, rtol=1e-10)
        assert stats.row_energy is not None  # the adapters' rows are read beside the full fine-tune's
        for n, want in per_tensor_dense(mixed, energy=True).items():
            _close(stats.row_energy[n], want, rtol=1e-10)

    def no_rows(*args: object, **kw: object) -> None:
        raise AssertionError("the Gram pass materialised LoRA rows")

    with monkeypatch.context() as m:
        m.setattr(TaskVectorSet, "task_rows", no_rows)
        stats = gram_pass(only_lora, chunk_elements=100, tensor_stats=True)
    assert stats.tensor_grams is not None
    for n, want in want_lora.items():  # between adapters: from the factors, zero where none touches n
        _close(stats.tensor_grams[n], want, rtol=1e-10)
    assert stats.row_energy is None and stats.nonzero_rows is None  # no rows were read

    sources = [TaskSource("ft", tmp_path / "dense"), *adapters]
    store = build_store(base, sources, make_method("pca", 2), tmp_path / "s", tensor_stats=True)
    assert store.tensor_grams is not None and estimate_store(store, [1, 3]).tensors

    pytest.importorskip("distributed")
    from tvbasis.engine.distributed import DaskEngine
    from tvbasis.engine.streaming import LocalEngine

    local = LocalEngine(partition_elements=5000).gram_pass(mixed, 300, tensor_stats=True)
    with DaskEngine(n_workers=1, partition_elements=5000) as engine:
        remote = engine.gram_pass(mixed, 300, tensor_stats=True)
    assert np.array_equal(local.gram, remote.gram)
    assert local.tensor_grams is not None and remote.tensor_grams is not None
    assert list(local.tensor_grams) == list(remote.tensor_grams)
    assert all(np.array_equal(local.tensor_grams[n], remote.tensor_grams[n]) for n in local.tensor_grams)
    assert local.row_energy is not None and remote.row_energy is not None
    assert all(np.array_equal(local.row_energy[n], remote.row_energy[n]) for n in local.row_energy)


# -- the CLI -------------------------------------------------------------------------------------------


def test_cli_build_tensor_stats_and_plan(family, tmp_path: Path) -> None:
    args = ["build", "--base", str(family.base), "--method", "pca", "-M", "2", "--exclude", "head.*", "--quiet"]
    for t in family.tasks:
        args += ["--task", f"{t.name}={t.path}"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "s"), "--tensor-stats"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s" / TENSOR_GRAM).is_file()
    # ten columns (with the share of rows changed: embed.weight's tasks leave half untouched) want a wide terminal
    r = runner.invoke(app, ["plan", str(tmp_path / "s"), "--atoms", "1", "--atoms", "3"], env={"COLUMNS": "160"})
    assert r.exit_code == 0, r.output
    assert "layer." in r.output and "M=3 err" in r.output and "total" in r.output and "51.4%" in r.output
    r = runner.invoke(app, ["plan", str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["atoms"] == [2] and [t["name"] for t in data["tensors"]] == layout(family)
    assert sum(t["energy_share"] for t in data["tensors"]) == pytest.approx(1.0)
    assert data["total"]["per_tensor_pca"]["2"]["rel_error"] <= data["total"]["store_basis"]["rel_error"] + 1e-12
    r = runner.invoke(app, ["info", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output

    r = runner.invoke(app, [*args, "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["plan", str(tmp_path / "p")])
    assert r.exit_code == 2 and "--tensor-stats" in r.output and "Traceback" not in r.output
