"""Task arithmetic on a store: identities that must hold for every method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from common import flat, read_flat, tree_digest, write_family
from tvbasis.arithmetic import (
    atoms_sum_coefficients,
    edit_model,
    reconstruct_task,
    task_coefficients,
    task_weights,
    write_task_vector,
)
from tvbasis.build import build_store
from tvbasis.methods import make_method
from tvbasis.store import open_store

EXCLUDE = ["head.*"]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    return write_family(tmp_path_factory.mktemp("fam"), T=4, rank=2)


@pytest.fixture(scope="module")
def exact_store(family, tmp_path_factory: pytest.TempPathFactory):
    """PCA with M = T: reconstruction is exact, so arithmetic equals arithmetic on the originals."""
    return build_store(
        family.base, family.tasks, make_method("pca", 4), tmp_path_factory.mktemp("s") / "pca", exclude=EXCLUDE
    )


def test_weight_one_reproduces_the_task_vector(family, exact_store, tmp_path: Path) -> None:
    for t in range(4):
        out = reconstruct_task(exact_store, f"task{t}", tmp_path / f"t{t}.safetensors")
        np.testing.assert_allclose(read_flat(out, family.names), flat(family.deltas[t], family.names), atol=1e-5)


def test_edit_add_and_negate(family, exact_store, tmp_path: Path) -> None:
    base = flat(family.base_state, family.names)
    tau = flat(family.deltas[1], family.names)
    a = task_weights(exact_store.task_names, {"task1": 1.0})
    out = edit_model(family.base, exact_store, task_coefficients(exact_store.decoder, a), tmp_path / "add.safetensors")
    np.testing.assert_allclose(read_flat(out, family.names), base + tau, atol=1e-5)
    neg = task_weights(exact_store.task_names, negate=["task1"])
    out = edit_model(
        family.base, exact_store, task_coefficients(exact_store.decoder, neg, 0.5), tmp_path / "neg.safetensors"
    )
    np.testing.assert_allclose(read_flat(out, family.names), base - 0.5 * tau, atol=1e-5)
    # untouched tensors are copied bit for bit: integer buffers and the excluded head
    from tvbasis.io import open_checkpoint

    edited, orig = open_checkpoint(out), open_checkpoint(family.base)
    for name in ("position_ids", "head.weight"):
        assert torch.equal(edited.read(name), orig.read(name))


def test_analogy_is_linear(family, exact_store, tmp_path: Path) -> None:
    a = task_weights(exact_store.task_names, {"task2": 1.0, "task1": 1.0, "task0": -1.0})
    out = write_task_vector(exact_store, task_coefficients(exact_store.decoder, a, 0.3), tmp_path / "v.safetensors")
    ref = 0.3 * sum(a[t] * flat(family.deltas[t], family.names) for t in range(4))
    np.testing.assert_allclose(read_flat(out, family.names), ref, atol=1e-5)


@pytest.mark.parametrize(
    "method,kw",
    [("autoencoder", {"steps": 200}), ("pca", {"center": True}), ("random", {}), ("sample", {}), ("cluster", {})],
)
def test_task_weighted_addition_equals_sum_of_reconstructions(family, tmp_path: Path, method: str, kw: dict) -> None:
    store = build_store(family.base, family.tasks, make_method(method, 2, **kw), tmp_path / "s", exclude=EXCLUDE)
    recons = [
        read_flat(reconstruct_task(store, n, tmp_path / f"{n}.safetensors"), family.names) for n in store.task_names
    ]
    a = np.array([0.5, -1.0, 2.0, 0.25])
    out = write_task_vector(store, task_coefficients(store.decoder, a), tmp_path / "sum.safetensors")
    np.testing.assert_allclose(
        read_flat(out, family.names), sum(w * r for w, r in zip(a, recons, strict=True)), atol=1e-5
    )
    # reported errors are the errors of what reconstruct writes
    for t, r in enumerate(recons):
        tau = flat(family.deltas[t], family.names)
        rel = np.linalg.norm(tau - r) / np.linalg.norm(tau)
        assert store.manifest["tasks"][t]["rel_error"] == pytest.approx(rel, rel=1e-4, abs=1e-6)


def test_atoms_mode_is_the_unit_sum_of_atoms(family, tmp_path: Path) -> None:
    store = build_store(
        family.base, family.tasks, make_method("autoencoder", 2, steps=100), tmp_path / "s", exclude=EXCLUDE
    )
    atoms = [read_flat(store.path / v["files"][0], family.names) for v in store.manifest["atoms"]["vectors"]]
    out = edit_model(family.base, store, atoms_sum_coefficients(2, False, 0.7), tmp_path / "e.safetensors")
    base = flat(family.base_state, family.names)
    np.testing.assert_allclose(read_flat(out, family.names), base + 0.7 * (atoms[0] + atoms[1]), atol=1e-5)
    c = atoms_sum_coefficients(2, True, 1.0)
    assert c.tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
def test_low_precision_atoms_report_their_real_error(family, tmp_path: Path, dtype: str) -> None:
    store = build_store(family.base, family.tasks, make_method("pca", 4), tmp_path / "s", exclude=EXCLUDE, dtype=dtype)
    fp32 = build_store(family.base, family.tasks, make_method("pca", 4), tmp_path / "s32", exclude=EXCLUDE)
    fp32_bytes = fp32.manifest["bytes"]["atoms"]
    # half (a quarter for int8) of the data; headers, scales and 1-D tensors are a fixed cost
    assert store.manifest["bytes"]["atoms"] < 0.7 * fp32_bytes
    for t, name in enumerate(store.task_names):
        r = read_flat(reconstruct_task(store, name, tmp_path / f"{name}.safetensors"), family.names)
        tau = flat(family.deltas[t], family.names)
        rel = np.linalg.norm(tau - r) / np.linalg.norm(tau)
        task = store.manifest["tasks"][t]
        assert rel > 0  # quantisation error is real, and reported
        assert task["rel_error"] == pytest.approx(rel, rel=0.05, abs=1e-6)
        # ... beside the error the same atoms have unrounded: the fp32 store's
        assert task["rel_error_unrounded"] == pytest.approx(fp32.manifest["tasks"][t]["rel_error"], rel=1e-6)
        assert task["rel_error"] >= task["rel_error_unrounded"] - 1e-6
    assert "rel_error_unrounded" not in fp32.manifest["tasks"][0]


def test_int8_atoms_are_per_row_codes_with_scales(family, tmp_path: Path) -> None:
    def ae():
        return make_method("autoencoder", 2, steps=50)

    fp32 = build_store(family.base, family.tasks, ae(), tmp_path / "f", exclude=EXCLUDE)
    stores = [
        build_store(
            family.base,
            family.tasks,
            ae(),
            tmp_path / f"q{c}",
            exclude=EXCLUDE,
            dtype="int8",
            chunk_elements=c,
        )
        for c in (7, 1 << 20)
    ]
    # rows are whole in every chunk, so the codes and scales do not depend on the chunk size
    assert tree_digest(stores[0].path / "atoms") == tree_digest(stores[1].path / "atoms")
    q = stores[0]
    vec = q.manifest["atoms"]["vectors"][0]["files"][0]
    with (
        safe_open(str(q.path / vec), "pt") as f,
        safe_open(str(fp32.path / fp32.manifest["atoms"]["vectors"][0]["files"][0]), "pt") as g,
    ):
        for name in family.names:
            exact = g.get_tensor(name).double()
            if exact.dim() >= 2:
                codes, scale = f.get_tensor(name), f.get_tensor(name + ".qscale")
                assert codes.dtype == torch.int8 and scale.shape == exact.shape[:1]
                assert codes.abs().amax(dim=1).tolist() == [127] * exact.shape[0]  # each row uses the full range
                err = (codes.double() * scale.double()[:, None] - exact.reshape(exact.shape[0], -1)).abs()
                assert (err <= scale.double()[:, None] / 2 + 1e-7).all()
            else:
                assert f.get_tensor(name).dtype == torch.float32
                torch.testing.assert_close(f.get_tensor(name).double(), exact)


def test_int8_store_edits_with_dequantized_atoms(family, tmp_path: Path) -> None:
    store = build_store(family.base, family.tasks, make_method("pca", 3), tmp_path / "s", exclude=EXCLUDE, dtype="int8")
    coef = task_coefficients(store.decoder, task_weights(store.task_names, negate=["task1"]))
    out = edit_model(family.base, store, coef, tmp_path / "e.safetensors")
    atoms = []
    for v in store.manifest["atoms"]["vectors"]:
        with safe_open(str(store.path / v["files"][0]), "pt") as f:
            parts = []
            for name in family.names:
                t = f.get_tensor(name).double()
                if t.dim() >= 2:
                    t = t * f.get_tensor(name + ".qscale").double().reshape(-1, *[1] * (t.dim() - 1))
                parts.append(t.reshape(-1).numpy())
            atoms.append(np.concatenate(parts))
    expected = flat(family.base_state, family.names) + np.stack(atoms, axis=1) @ coef
    np.testing.assert_allclose(read_flat(out, family.names), expected, atol=1e-5)


def test_store_round_trip_reconstructs_identically(family, tmp_path: Path) -> None:
    method = make_method("autoencoder", 2, steps=120, anneal_factor=0.5, anneal_every=40, seed=9)
    store = build_store(family.base, family.tasks, method, tmp_path / "s", exclude=EXCLUDE)
    again = open_store(store.path)
    assert again.method.final_temperature_ == pytest.approx(5.0 * 0.5**3)
    np.testing.assert_array_equal(again.method.encoder_, method.encoder_)
    np.testing.assert_array_equal(again.method.A_, method.A_)
    np.testing.assert_array_equal(again.decoder, method.decoder_)
    assert again.manifest["method"]["params"] == method.get_params()
    assert again.n_atoms == 2 and again.manifest["n_atoms"] == method.n_atoms
    a = reconstruct_task(store, "task3", tmp_path / "a.safetensors")
    b = reconstruct_task(again, "task3", tmp_path / "b.safetensors")
    assert a.read_bytes()[8:] != b"" and read_flat(a, family.names).tolist() == read_flat(b, family.names).tolist()


def test_rounded_ties_atoms_report_the_unrounded_error_too(family, tmp_path: Path) -> None:
    """TIES atoms are not linear in V, so the build measures them both before and after rounding."""

    def ties():
        return make_method("cluster", 2, merge="ties")

    fp32 = build_store(family.base, family.tasks, ties(), tmp_path / "f", exclude=EXCLUDE)
    q = build_store(family.base, family.tasks, ties(), tmp_path / "q", exclude=EXCLUDE, dtype="int8")
    for a, b in zip(q.manifest["tasks"], fp32.manifest["tasks"], strict=True):
        assert a["rel_error_unrounded"] == pytest.approx(b["rel_error"], rel=1e-5)
        assert a["rel_error"] != b["rel_error"]
