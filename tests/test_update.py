"""Adding, removing and refitting tasks of a store without a full rebuild."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from common import flat, read_flat, tree_digest, write_family
from tvbasis.arithmetic import reconstruct_task
from tvbasis.build import build_store
from tvbasis.errors import TvbasisError
from tvbasis.methods import make_method
from tvbasis.store import open_store
from tvbasis.tasks import TaskSource
from tvbasis.update import add_task, plan_refit, refit, remove_task

EXCLUDE = ["head.*"]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    return write_family(tmp_path_factory.mktemp("fam"), T=5, rank=3)


def _atoms(store, names: list[str]) -> np.ndarray:
    return np.stack([read_flat(store.path / v["files"][0], names) for v in store.manifest["atoms"]["vectors"]], axis=1)


def test_a_task_in_the_span_of_the_atoms_is_added_exactly(family, tmp_path: Path) -> None:
    store = build_store(family.base, family.tasks[:4], make_method("pca", 2), tmp_path / "s", exclude=EXCLUDE)
    atoms = _atoms(store, family.names)
    combo = atoms @ np.array([0.3, -0.7])
    state = {k: v.clone() for k, v in family.base_state.items()}
    offset = 0
    for name in family.names:
        n = state[name].numel()
        state[name] = state[name] + torch.from_numpy(combo[offset : offset + n]).reshape(state[name].shape).float()
        offset += n
    path = tmp_path / "in-span.safetensors"
    save_file(state, str(path))

    updated, added = add_task(store, TaskSource("new", path))
    assert updated.task_names == [*store.task_names, "new"]
    assert added.rel_error < 1e-5 and added.cosine > 1 - 1e-8 and added.gram_row_known
    np.testing.assert_allclose(added.coefficients, [0.3, -0.7], atol=1e-5)
    out = reconstruct_task(updated, "new", tmp_path / "new.safetensors")
    tau = flat(state, family.names) - flat(family.base_state, family.names)
    np.testing.assert_allclose(read_flat(out, family.names), tau, atol=1e-5)
    # the earlier tasks are untouched, and no temporary directory is left behind
    for t in store.task_names:
        assert updated.manifest["tasks"][updated.task_index(t)]["rel_error"] == pytest.approx(
            store.manifest["tasks"][store.task_index(t)]["rel_error"]
        )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("s")) == ["s"]


@pytest.mark.parametrize("method,kw", [("autoencoder", {"steps": 300}), ("pca", {"center": True}), ("sample", {})])
def test_refit_after_adds_equals_a_fresh_build(family, tmp_path: Path, method: str, kw: dict) -> None:
    s = build_store(family.base, family.tasks[:3], make_method(method, 2, **kw), tmp_path / "s", exclude=EXCLUDE)
    s, _ = add_task(s, family.tasks[3])
    s, _ = add_task(s, family.tasks[4])
    assert s.manifest["fitted_tasks"] == ["task0", "task1", "task2"]
    plan = plan_refit(s)
    assert plan.passes == 1 and [t.name for t in plan.tasks] == [f"task{i}" for i in range(5)]
    again = refit(s)
    fresh = build_store(family.base, family.tasks, make_method(method, 2, **kw), tmp_path / "f", exclude=EXCLUDE)
    assert again.task_names == fresh.task_names
    np.testing.assert_allclose(again.gram, fresh.gram, rtol=1e-12)
    np.testing.assert_allclose(again.decoder, fresh.decoder, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(_atoms(again, family.names), _atoms(fresh, family.names), rtol=1e-5, atol=1e-7)
    for a, b in zip(again.manifest["tasks"], fresh.manifest["tasks"], strict=True):
        assert a["content_hash"] == b["content_hash"]
        assert a["rel_error"] == pytest.approx(b["rel_error"], rel=1e-6, abs=1e-9)


def test_remove_task_keeps_the_others_and_refit_drops_it(family, tmp_path: Path) -> None:
    store = build_store(family.base, family.tasks, make_method("pca", 3), tmp_path / "s", exclude=EXCLUDE)
    before = read_flat(reconstruct_task(store, "task2", tmp_path / "a.safetensors"), family.names)
    original = tree_digest(store.path)
    smaller = remove_task(store, "task1", out=tmp_path / "s2")
    assert tree_digest(store.path) == original  # --out leaves the original store as it was
    assert smaller.task_names == ["task0", "task2", "task3", "task4"] and smaller.n_tasks == 4
    after = read_flat(reconstruct_task(smaller, "task2", tmp_path / "b.safetensors"), family.names)
    np.testing.assert_array_equal(before, after)
    again = refit(smaller)
    tasks = [t for t in family.tasks if t.name != "task1"]
    fresh = build_store(family.base, tasks, make_method("pca", 3), tmp_path / "f", exclude=EXCLUDE)
    np.testing.assert_allclose(again.decoder, fresh.decoder, rtol=1e-6, atol=1e-9)
    with pytest.raises(TvbasisError, match="only task"):
        one = build_store(family.base, family.tasks[:1], make_method("pca", 1), tmp_path / "one", exclude=EXCLUDE)
        remove_task(one, "task0")


def test_adding_without_the_earlier_inputs_leaves_gram_entries_unknown(family, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    moved.mkdir()
    tasks = []
    for t in family.tasks[:3]:
        shutil.copy(t.path, moved / t.path.name)
        tasks.append(TaskSource(t.name, moved / t.path.name))
    store = build_store(family.base, tasks, make_method("pca", 2), tmp_path / "s", exclude=EXCLUDE)
    (moved / tasks[0].path.name).unlink()
    updated, added = add_task(store, family.tasks[3])
    assert not added.gram_row_known and added.missing_inputs == [f"task0 ({tasks[0].path})"]
    assert np.isnan(updated.gram[3, :3]).all() and np.isfinite(updated.gram[3, 3])
    assert np.isfinite(added.rel_error)
    with pytest.raises(TvbasisError, match=r"missing: task0"):
        plan_refit(updated)
    shutil.copy(family.tasks[0].path, tasks[0].path)
    assert plan_refit(updated).passes == 2  # the Gram entries must be computed again


def test_add_task_refuses_bad_input_and_leaves_the_store_as_it_was(family, tmp_path: Path) -> None:
    store = build_store(family.base, family.tasks[:3], make_method("pca", 2), tmp_path / "s", exclude=EXCLUDE)
    digest = tree_digest(store.path)
    with pytest.raises(TvbasisError, match="already has a task"):
        add_task(store, family.tasks[0])
    wide = {k: v.clone() for k, v in family.base_state.items()}
    wide["embed.weight"] = torch.zeros(37, 9)
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(TvbasisError, match=r"embed\.weight"):
        add_task(store, TaskSource("wide", tmp_path / "wide.safetensors"))
    changed = tmp_path / "changed.safetensors"
    state = {k: v.clone() for k, v in family.base_state.items()}
    state["layer.0.attn.weight"][0, 0] += 1
    save_file(state, str(changed))
    with pytest.raises(TvbasisError, match="does not match the store"):
        add_task(store, family.tasks[3], base=changed)
    assert tree_digest(store.path) == digest
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("s")) == ["s"]


def test_cli_add_remove_refit(family, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tvbasis.cli import app

    def invoke(args: list) -> object:
        return CliRunner().invoke(app, [str(a) for a in args])

    store = tmp_path / "s"
    build_store(family.base, family.tasks[:3], make_method("pca", 2), store, exclude=EXCLUDE)
    r = invoke(["add-task", store, "--task", f"task3={family.tasks[3].path}", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "added task3" in r.output and "relative error" in r.output
    r = invoke(["remove-task", store, "--task", "task0"])
    assert r.exit_code == 0 and "3 tasks left" in r.output
    r = invoke(["refit", store, "--out", tmp_path / "r", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "1 pass(es)" in r.output and open_store(tmp_path / "r").task_names == ["task1", "task2", "task3"]
    r = invoke(["add-task", store, "--task", f"task1={family.tasks[1].path}"])
    assert r.exit_code == 2 and "already has a task" in r.output and len(r.output.strip().splitlines()) == 1
