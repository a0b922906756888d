"""Stores with coded residuals: basis plus each task's coded ``tau_t - S W[:, t]``, tensor by tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from common import read_flat, tree_digest, write_family
from tvbasis.arithmetic import MergeSpec, edit_model, reconstruct_task, task_combination
from tvbasis.arithmetic.merge import iter_merged
from tvbasis.build import build_store
from tvbasis.cli import app
from tvbasis.codes import TensorKey, decode, encode, nbytes, parse_code
from tvbasis.errors import TvbasisError
from tvbasis.methods import make_method
from tvbasis.store import open_store
from tvbasis.store.residuals import CodePlan, PayloadPart, TensorCode, payload_parts, uniform_plan
from tvbasis.tasks import TaskVectorSet
from tvbasis.tasks.taskvectors import plan_chunks
from tvbasis.update import add_task

pytestmark = pytest.mark.usefixtures("one_thread")
EXCLUDE = ["head.*"]
runner = CliRunner()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    return write_family(tmp_path_factory.mktemp("fam"), T=5, rank=2)


def layout(family) -> list[str]:
    return [i.name for i in TaskVectorSet(family.base, family.tasks, exclude=EXCLUDE).tensors]


def dense(family) -> np.ndarray:
    """V (D x T) in the store's tensor order."""
    names = layout(family)
    return np.stack([np.concatenate([d[n].reshape(-1).numpy() for n in names]) for d in family.deltas], axis=1)


def build(family, tmp: Path, m: int, plan: CodePlan | str, name: str, **kw) -> object:
    plan = uniform_plan(plan) if isinstance(plan, str) else plan
    return build_store(family.base, family.tasks, make_method("pca", m), tmp / name, exclude=EXCLUDE, codes=plan, **kw)


def task_matrix(store, weights_rows: np.ndarray, chunk_elements: int = 1 << 20) -> np.ndarray:
    """``store.task_rows`` for each row of ``weights_rows`` (one column each), flat in layout order."""
    chunks = plan_chunks(store.tensors, chunk_elements)
    return np.stack([np.concatenate([store.task_rows(c, a).numpy() for c in chunks]) for a in weights_rows], axis=1)


def test_exact_residuals_reconstruct_every_task(family, tmp_path: Path) -> None:
    V = dense(family)
    for m in (0, 2):
        store = build(family, tmp_path, m, "fp32", f"m{m}")
        hat = task_matrix(store, np.eye(5))
        np.testing.assert_allclose(hat, V, atol=1e-6 * np.abs(V).max())
        assert all(t["rel_error"] < 1e-6 for t in store.manifest["tasks"])
    assert store.manifest["tasks"][0]["rel_error_basis"] > 0.01  # M = 2 alone does not reconstruct


def test_weights_are_linear_one_reproduces_minus_one_negates(family, tmp_path: Path) -> None:
    store = build(family, tmp_path, 1, "keep:0.5:int4:seed=3", "keep")
    singles = task_matrix(store, np.eye(5))
    a = np.array([1.0, -1.0, 0.5, 0.0, 2.0])
    combo = task_matrix(store, a[None])[:, 0]
    np.testing.assert_allclose(combo, singles @ a, rtol=1e-12, atol=1e-12)
    neg = task_matrix(store, -np.eye(5)[2][None])[:, 0]
    np.testing.assert_array_equal(neg, -singles[:, 2])


def test_reported_errors_are_the_stores_own(family, tmp_path: Path) -> None:
    V = dense(family)
    for spec in ("int4", "keep:0.25:int8:seed=1", "topk:0.2", "lowrank:2", "sign"):
        store = build(family, tmp_path, 1, spec, spec.replace(":", "_"))
        hat = task_matrix(store, np.eye(5))
        measured = np.linalg.norm(hat - V, axis=0) / np.linalg.norm(V, axis=0)
        reported = [t["rel_error"] for t in store.manifest["tasks"]]
        np.testing.assert_allclose(reported, measured, rtol=1e-9)
        cos = (hat * V).sum(0) / np.linalg.norm(hat, axis=0) / np.linalg.norm(V, axis=0)
        np.testing.assert_allclose([t["cosine"] for t in store.manifest["tasks"]], cos, rtol=1e-9)


@pytest.mark.parametrize("text", ["keep:0.3:int4:seed=5", "keep:0.3:sr2:seed=5", "rsign:0.3:seed=5"])
def test_residual_codes_match_the_codes_library(family, tmp_path: Path, text: str) -> None:
    """What the store decodes is exactly codes.decode(codes.encode(tau - S W)) of each whole tensor."""
    spec = parse_code(text)
    store = build(family, tmp_path, 2, text, "lib")
    names = layout(family)
    V = dense(family)
    basis_only = build_store(family.base, family.tasks, make_method("pca", 2), tmp_path / "plain", exclude=EXCLUDE)
    B = task_matrix(basis_only, np.eye(5))
    hat = task_matrix(store, np.eye(5))
    offset = 0
    for n in names:
        shape = store.shape_of(n)
        numel = int(np.prod(shape, dtype=np.int64))
        for t, task in enumerate(store.task_names):
            r = torch.from_numpy(V[offset : offset + numel, t] - B[offset : offset + numel, t]).reshape(shape)
            expect = decode(encode(spec, r, TensorKey(n, task, 0))).reshape(-1).numpy()
            np.testing.assert_allclose(
                hat[offset : offset + numel, t] - B[offset : offset + numel, t], expect, atol=1e-12
            )
        offset += numel


def test_chunk_size_changes_nothing(family, tmp_path: Path) -> None:
    plans = ["keep:0.25:int2:seed=0", "keep:0.25:sr2:seed=4", "rsign:0.5:seed=2", "topk:0.1"]
    for spec in plans:
        a = build(family, tmp_path, 1, spec, f"a-{spec}", chunk_elements=7)
        b = build(family, tmp_path, 1, spec, f"b-{spec}", chunk_elements=1 << 20)
        for f in a.manifest["residuals"]["files"]:
            assert (a.path / f).read_bytes() == (b.path / f).read_bytes()
        # the codes are bit-identical; decoding sums the basis part with BLAS, so rounding may differ
        np.testing.assert_allclose(task_matrix(a, np.eye(5), 5), task_matrix(b, np.eye(5), 1 << 20), atol=1e-14)


def test_uncovered_tensors_have_no_atoms_and_code_the_task_vector(family, tmp_path: Path) -> None:
    V = dense(family)
    names = layout(family)
    left_out = "layer.1.mlp.weight"
    plan = CodePlan(
        tensors={left_out: TensorCode(False, parse_code("fp32"))}, default=TensorCode(True, parse_code("none"))
    )
    store = build(family, tmp_path, 2, plan, "mixed")
    with safe_open(str(store.path / store.manifest["atoms"]["vectors"][0]["files"][0]), "pt") as f:
        assert left_out not in f.keys() and "embed.weight" in f.keys()
    hat = task_matrix(store, np.eye(5))
    offset = sum(int(np.prod(store.shape_of(n))) for n in names[: names.index(left_out)])
    numel = int(np.prod(store.shape_of(left_out)))
    np.testing.assert_allclose(hat[offset : offset + numel], V[offset : offset + numel], atol=1e-6)
    assert store.summary()["codes"] == {
        "basis + none": {"tensors": len(names) - 1, "params": V.shape[0] - numel},
        "fp32": {"tensors": 1, "params": numel},
    }


def test_bytes_are_counted(family, tmp_path: Path) -> None:
    store = build(family, tmp_path, 1, "int4", "bytes")
    entry = store.manifest["residuals"]
    files = sum(store.manifest["files"][f] for f in entry["files"])
    assert store.manifest["bytes"]["residuals"] == files
    shapes = {n: store.shape_of(n) for n in layout(family)}
    assert entry["payload_bytes"] == 5 * sum(nbytes(parse_code("int4"), s) for s in shapes.values())
    assert files > entry["payload_bytes"]  # plus the safetensors headers
    parts = payload_parts(parse_code("keep:0.5:int4"), (19, 8))
    assert {p.name: p.per_row for p in parts} == {"codes": True, "scale": True}  # the seed is the spec's
    # sr2 keeps each row's scale with its codes: one part, so one header entry per tensor and task
    assert payload_parts(parse_code("keep:0.5:sr2"), (19, 8)) == [PayloadPart("kept", (19, 3), torch.uint8, True)]
    assert payload_parts(parse_code("rsign:0.5"), (19, 8)) == [PayloadPart("kept", (19, 3), torch.uint8, True)]


def test_stores_whose_keep_payloads_hold_their_seed_still_decode(family, tmp_path: Path) -> None:
    """Keep codes once stored their seed as a payload part (``TENSOR/seed``); it is the spec's, so
    such stores decode the same, the extra part unread."""
    store = build(family, tmp_path, 1, "keep:0.5:int4:seed=3", "now")
    older = tmp_path / "older"
    shutil.copytree(store.path, older)
    manifest = json.loads((older / "tvbasis.json").read_text())
    for rel in manifest["residuals"]["files"]:
        tensors = load_file(older / rel)
        for tensor in {k.rsplit("/", 1)[0] for k in tensors}:
            tensors[f"{tensor}/seed"] = torch.tensor(3, dtype=torch.int64)
        save_file(tensors, older / rel, metadata={"tvbasis_residual_task": "x"})
        manifest["files"][rel] = (older / rel).stat().st_size
    (older / "tvbasis.json").write_text(json.dumps(manifest))
    np.testing.assert_array_equal(task_matrix(open_store(older), np.eye(5)), task_matrix(store, np.eye(5)))


def test_edit_and_reconstruct_use_the_residuals(family, tmp_path: Path) -> None:
    store = build(family, tmp_path, 1, "int8", "edit")
    names = layout(family)
    reconstruct_task(store, "task3", tmp_path / "t3.safetensors")
    rec = read_flat(tmp_path / "t3.safetensors", names)
    np.testing.assert_allclose(rec, task_matrix(store, np.eye(5)[3][None])[:, 0].astype(np.float32), rtol=1e-6)
    a = np.array([0.0, 1.0, 0.0, -1.0, 0.0])
    coefs, r = task_combination(store.decoder, a, 0.5)
    edit_model(family.base, store, coefs, tmp_path / "ed.safetensors", residual_weights=r)
    edited = read_flat(tmp_path / "ed.safetensors", names)
    base = read_flat(family.base, names)
    np.testing.assert_allclose(edited - base, 0.5 * task_matrix(store, a[None])[:, 0], atol=1e-6)


def test_updates_and_merges_refuse_a_coded_store(family, tmp_path: Path) -> None:
    store = build(family, tmp_path, 1, "int8", "refuse")
    with pytest.raises(TvbasisError, match="codes residuals per task"):
        add_task(store, family.tasks[0].__class__("extra", family.tasks[0].path), out=tmp_path / "more")
    with pytest.raises(TvbasisError, match="basis-only store"):
        next(iter_merged(store, MergeSpec("ties", np.ones(5))))
    with pytest.raises(TvbasisError, match="-M 0 stores no basis"):
        build_store(family.base, family.tasks, make_method("pca", 0), tmp_path / "empty", exclude=EXCLUDE)
    with pytest.raises(TvbasisError, match="not a task-vector tensor"):
        build(
            family,
            tmp_path,
            1,
            CodePlan(tensors={"nope": TensorCode()}, default=TensorCode(True, parse_code("int8"))),
            "x",
        )
    assert not (tmp_path / "empty").exists() and not (tmp_path / "x").exists()


def test_cli_build_info_reconstruct(family, tmp_path: Path) -> None:
    tasks = [a for t in family.tasks for a in ("--task", f"{t.name}={t.path}")]
    before = tree_digest(family.base.parent)
    args = ["build", "--base", str(family.base), *tasks, "--method", "pca", "-M", "0", "--exclude", "head.*"]
    res = runner.invoke(app, [*args, "--residual", "keep:0.5:int8", "--out", str(tmp_path / "s"), "-q"])
    assert res.exit_code == 0, res.output
    info = json.loads(runner.invoke(app, ["info", str(tmp_path / "s"), "--json"]).output)
    assert list(info["codes"]) == ["keep:0.5:int8:seed=0"] and info["bytes"]["residuals"] > 0
    res = runner.invoke(
        app, ["reconstruct", str(tmp_path / "s"), "--task", "task1", "--out", str(tmp_path / "t1.safetensors")]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*args, "--residual", "int9", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--residual" in res.output and "int9" in res.output
    assert not (tmp_path / "bad").exists()
    res = runner.invoke(
        app, ["add-task", str(tmp_path / "s"), "--task", f"x={family.tasks[0].path}", "--out", str(tmp_path / "s2")]
    )
    assert res.exit_code == 2 and "codes residuals" in res.output
    assert tree_digest(family.base.parent) == before
    store = open_store(tmp_path / "s")
    assert store.n_atoms == 0 and store.manifest["atoms"]["vectors"] == []


def test_per_tensor_bases(family, tmp_path: Path) -> None:
    """A tensor's own PCA basis: with m = T atoms and exact residuals it reconstructs; with fewer
    atoms and no residual its error is that tensor's PCA tail (int8 atoms aside)."""
    V = dense(family)
    names = layout(family)
    own = CodePlan(default=TensorCode(False, parse_code("fp32"), tensor_atoms=2))
    store = build(family, tmp_path, 0, own, "own-exact", chunk_elements=7)
    np.testing.assert_allclose(task_matrix(store, np.eye(5)), V, atol=1e-6 * np.abs(V).max())
    assert store.manifest["residuals"]["tensor_bases"] == "residuals/tensor-bases.safetensors"
    assert str(store.residuals.codes[names[0]]) == "tensor basis M=2 + fp32"

    plan = CodePlan(
        tensors={"embed.weight": TensorCode(False, parse_code("none"), tensor_atoms=2)},
        default=TensorCode(True, parse_code("none")),
    )
    store = build(family, tmp_path, 1, plan, "own-embed")
    hat = task_matrix(store, np.eye(5))
    numel = int(np.prod(store.shape_of("embed.weight")))
    X = V[:numel]  # embed.weight is first in the layout
    U, sv, Vt = np.linalg.svd(X, full_matrices=False)
    best = U[:, :2] * sv[:2] @ Vt[:2]
    np.testing.assert_allclose(hat[:numel], best, atol=0.02 * np.abs(X).max())  # int8 atoms
    a = np.array([1.0, 0.0, -2.0, 0.0, 0.5])
    np.testing.assert_allclose(task_matrix(store, a[None])[:, 0], hat @ a, atol=1e-12)
    with pytest.raises(TvbasisError, match="not both"):
        TensorCode(True, parse_code("none"), tensor_atoms=2)


def test_int4_tensor_atoms(family, tmp_path: Path) -> None:
    """int4 atoms: exact residuals still reconstruct (they carry the rounding); without residuals the
    error grows by the rounding, and the atoms' codes take half the bytes of int8 ones."""
    V = dense(family)

    def own(residual: str, atom_code: str) -> CodePlan:
        return CodePlan(default=TensorCode(False, parse_code(residual), 2, parse_code(atom_code)))

    exact = build(family, tmp_path, 0, own("fp32", "int4"), "int4-exact", chunk_elements=7)
    np.testing.assert_allclose(task_matrix(exact, np.eye(5)), V, atol=1e-6 * np.abs(V).max())
    entry = exact.manifest["residuals"]["tensors"]["embed.weight"]
    assert entry["atom_code"] == "int4" and str(exact.residuals.codes["embed.weight"]) == "tensor basis M=2 int4 + fp32"
    int8 = build(family, tmp_path, 0, own("none", "int8"), "own-int8")
    int4 = build(family, tmp_path, 0, own("none", "int4"), "own-int4")
    err8 = np.linalg.norm(task_matrix(int8, np.eye(5)) - V)
    err4 = np.linalg.norm(task_matrix(int4, np.eye(5)) - V)
    assert err4 > err8
    b8, b4 = (s.manifest["residuals"]["payload_bytes"] for s in (int8, int4))
    i8, i4 = parse_code("int8"), parse_code("int4")
    saved = sum(2 * (nbytes(i8, int4.shape_of(n)) - nbytes(i4, int4.shape_of(n))) for n in layout(family))
    assert b8 - b4 == saved > 0  # two atoms per tensor, each at half the code bytes (scales stay)
    # a store written before atoms had a code reads them as int8
    assert TensorCode.from_json({"basis": False, "tensor_atoms": 2, "residual": "none"}).atom_code == parse_code("int8")
    with pytest.raises(TvbasisError, match="per-tensor atoms coded int2"):
        TensorCode(False, parse_code("none"), 2, parse_code("int2"))


def test_cli_tensor_atoms(family, tmp_path: Path) -> None:
    tasks = [a for t in family.tasks for a in ("--task", f"{t.name}={t.path}")]
    args = ["build", "--base", str(family.base), *tasks, "--method", "pca", "--exclude", "head.*", "-q"]
    res = runner.invoke(
        app, [*args, "-M", "0", "--residual", "int8", "--tensor-atoms", "2", "--out", str(tmp_path / "s")]
    )
    assert res.exit_code == 0, res.output
    assert "tensor basis M=2 + int8" in open_store(tmp_path / "s").summary()["codes"]
    res = runner.invoke(
        app, [*args, "-M", "1", "--residual", "int8", "--tensor-atoms", "2", "--out", str(tmp_path / "b")]
    )
    assert res.exit_code == 2 and "needs -M 0" in res.output and not (tmp_path / "b").exists()
    int4 = ["--tensor-atoms", "2", "--tensor-atom-code", "int4", "--out", str(tmp_path / "s4")]
    res = runner.invoke(app, [*args, "-M", "0", "--residual", "int8", *int4])
    assert res.exit_code == 0, res.output
    assert "tensor basis M=2 int4 + int8" in open_store(tmp_path / "s4").summary()["codes"]
    res = runner.invoke(
        app, [*args, "-M", "0", "--residual", "int8", "--tensor-atom-code", "int4", "--out", str(tmp_path / "c")]
    )
    assert res.exit_code == 2 and "--tensor-atom-code applies with --tensor-atoms" in res.output
