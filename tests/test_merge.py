"""Interference-aware merges (TIES, DARE) over the task vectors a store reconstructs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from common import Family, read_flat, write_family
from tvbasis.arithmetic import MergeSpec, TaskMerger, dare_rows, edit_model, merged_state, task_coefficients
from tvbasis.arithmetic import merge as merge_mod
from tvbasis.arithmetic.merge import dare_keep
from tvbasis.build import build_store
from tvbasis.cli import app
from tvbasis.errors import TvbasisError
from tvbasis.methods import make_method
from tvbasis.store import Store
from tvbasis.tasks.taskvectors import Chunk, plan_chunks

pytestmark = pytest.mark.usefixtures("one_thread")

EXCLUDE = ["head.*"]
T = 3
runner = CliRunner()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return write_family(tmp_path_factory.mktemp("fam"), T=T)


@pytest.fixture(scope="module")
def store(family: Family, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """PCA with M = T: the reconstructions are the task vectors."""
    out = tmp_path_factory.mktemp("s") / "pca"
    return build_store(family.base, family.tasks, make_method("pca", T), out, exclude=EXCLUDE)


@pytest.fixture(scope="module")
def centred(family: Family, tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Centred PCA with M = 2 < T: a stored mean and lossy reconstructions."""
    out = tmp_path_factory.mktemp("s") / "pca-c"
    return build_store(family.base, family.tasks, make_method("pca", 2, center=True), out, exclude=EXCLUDE)


# -- dense references -------------------------------------------------------------------------


def names_of(store: Store) -> list[str]:
    return [i.name for i in store.tensors]


def dense_reconstructions(store: Store, weights: np.ndarray) -> np.ndarray:
    """``D x T`` weighted reconstructions ``a_t S W[:, t]``, from the whole stored vectors at once."""
    atoms = torch.cat([store.vector_rows(c) for c in plan_chunks(store.tensors, 1 << 30)]).numpy()
    return atoms @ store.decoder * weights


def ties_reference(V: np.ndarray, density: float) -> tuple[np.ndarray, np.ndarray]:
    """TIES on dense columns: exact top-k per task, elected sign, disjoint mean; and the thresholds."""
    k = math.ceil(density * V.shape[0])
    thr = np.array([np.sort(np.abs(v))[::-1][k - 1] for v in V.T])
    trimmed = np.where(np.abs(V) >= thr, V, 0.0)
    sign = np.sign(trimmed.sum(axis=1, keepdims=True))
    agree = (np.sign(trimmed) == sign) & (trimmed != 0)
    return (trimmed * agree).sum(axis=1) / np.maximum(agree.sum(axis=1), 1), thr


def dense_masks(store: Store, tasks: list[str], drop_rate: float, seed: int) -> np.ndarray:
    """DARE keep masks ``D x n``, each tensor's drawn in one piece."""
    cols = [
        np.concatenate([dare_keep(seed, i.name, task, 0, max(i.numel, 1), drop_rate).numpy() for i in store.tensors])
        for task in tasks
    ]
    return np.stack(cols, axis=1)


def flat_state(state: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    return np.concatenate([state[n].double().reshape(-1).numpy() for n in names])


def weights(*pairs: tuple[int, float]) -> np.ndarray:
    a = np.zeros(T)
    for t, w in pairs:
        a[t] = w
    return a


# -- TIES -------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["store", "centred"])
def test_ties_matches_dense_reference(which: str, request: pytest.FixtureRequest) -> None:
    s: Store = request.getfixturevalue(which)
    a = weights((0, 1.0), (1, 0.5), (2, -1.0))  # a negated task votes with its sign flipped
    spec = MergeSpec("ties", a, scale=0.8, density=0.3)
    got = flat_state(merged_state(s, spec, dtype=torch.float64), names_of(s))
    ref, thr = ties_reference(dense_reconstructions(s, a), 0.3)
    np.testing.assert_allclose(got, 0.8 * ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(TaskMerger(s, spec).thresholds, thr, rtol=1e-12)


def test_ties_thresholds_exact_through_sub_bins(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Boundary bins too full to collect are cut into linear sub-bins until few values remain."""
    a = weights((0, 1.0), (1, 2.0), (2, 1.0))
    coefficients = torch.from_numpy(store.decoder * a)
    _, thr = ties_reference(dense_reconstructions(store, a), 0.25)
    monkeypatch.setattr(merge_mod, "_COLLECT", 3)
    monkeypatch.setattr(merge_mod, "_SUBBINS", 4)
    np.testing.assert_allclose(merge_mod.ties_thresholds(store, coefficients, 0.25, 50), thr, rtol=1e-12)
    coarse = merge_mod.ties_thresholds(store, coefficients, 0.25, 50, exact=False)
    assert np.all(coarse <= thr) and np.all(coarse > thr / 2 ** (1 / 16) / 1.0001)


def test_ties_density_one_single_task_is_plain_addition(family: Family, store: Store, tmp_path: Path) -> None:
    names = names_of(store)
    for t, w in ((1, 0.7), (2, -1.0)):  # one negated task alone is -tau_hat
        a = weights((t, w))
        plain = edit_model(family.base, store, task_coefficients(store.decoder, a, 0.5), tmp_path / f"p{t}.safetensors")
        merged = edit_model(
            family.base, store, np.zeros(0), tmp_path / f"m{t}.safetensors", merge=MergeSpec("ties", a, 0.5, 1.0)
        )
        np.testing.assert_allclose(read_flat(merged, names), read_flat(plain, names), rtol=0, atol=1e-6)


# -- DARE -------------------------------------------------------------------------------------


def test_dare_without_drops_is_plain_addition(family: Family, centred: Store, tmp_path: Path) -> None:
    names = names_of(centred)
    a = weights((0, 1.0), (1, -0.5), (2, 0.3))
    plain = edit_model(family.base, centred, task_coefficients(centred.decoder, a, 0.9), tmp_path / "p.safetensors")
    spec = MergeSpec("dare", a, 0.9, drop_rate=0.0, seed=5)
    merged = edit_model(family.base, centred, np.zeros(0), tmp_path / "m.safetensors", merge=spec)
    np.testing.assert_allclose(read_flat(merged, names), read_flat(plain, names), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["dare", "dare-ties"])
def test_dare_matches_reference_masks(method: str, store: Store) -> None:
    a = weights((0, 1.0), (1, 1.0), (2, -0.5))
    p, seed = 0.6, 3
    got = flat_state(
        merged_state(store, MergeSpec(method, a, 1.5, drop_rate=p, seed=seed), torch.float64), names_of(store)
    )
    keep = dense_masks(store, store.task_names, p, seed)
    assert abs(keep.mean() - (1 - p)) < 0.05
    assert not np.array_equal(keep[:, 0], keep[:, 1])  # tasks draw their own masks
    X = np.where(keep, dense_reconstructions(store, a) / (1 - p), 0.0)
    ref = X.sum(axis=1) if method == "dare" else ties_reference(X, 1.0)[0]
    np.testing.assert_allclose(got, 1.5 * ref, rtol=0, atol=1e-12)


def test_dare_is_unbiased_over_seeds() -> None:
    X = torch.randn((2000, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chunk = Chunk("w", 0, 2000, 1, 0)
    runs = [dare_rows(X, 0.5, seed, chunk, ["a", "b", "c"]).sum(dim=1) for seed in range(100)]
    mean = torch.stack(runs).mean(dim=0)
    assert torch.linalg.norm(mean - X.sum(dim=1)) / torch.linalg.norm(X.sum(dim=1)) < 0.2
    assert not torch.equal(runs[0], runs[1])


def test_dare_masks_do_not_depend_on_the_cut() -> None:
    whole = dare_keep(7, "layer.w", "task", 10, 140_000, 0.3)
    parts = [
        dare_keep(7, "layer.w", "task", lo, hi, 0.3) for lo, hi in ((10, 65_537), (65_537, 70_000), (70_000, 140_000))
    ]
    assert torch.equal(whole, torch.cat(parts))


# -- streaming and the command line -----------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "dare", "dare-ties"])
def test_chunk_size_does_not_change_the_output(method: str, family: Family, store: Store, tmp_path: Path) -> None:
    a = weights((0, 1.0), (1, 0.5), (2, -1.0))
    spec = MergeSpec(method, a, 0.7, density=0.35, drop_rate=0.5, seed=1)
    small = merged_state(store, spec, torch.float64, chunk_elements=5)
    large = merged_state(store, spec, torch.float64)
    assert all(torch.equal(small[n], large[n]) for n in large)
    outs = [
        edit_model(family.base, store, np.zeros(0), tmp_path / f"{c}.safetensors", chunk_elements=c, merge=spec)
        for c in (7, 1 << 20)
    ]
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_cli_merge_writes_the_model(family: Family, store: Store, tmp_path: Path) -> None:
    out = tmp_path / "ties.safetensors"
    args = ["edit", "--base", family.base, "--store", store.path, "--out", out, "--add-all", "1", "--negate", "task2"]
    result = runner.invoke(app, [str(x) for x in [*args, "--merge", "ties", "--density", "0.4", "--scale", "0.6"]])
    assert result.exit_code == 0, result.output
    spec = MergeSpec("ties", weights((0, 1.0), (1, 1.0)), 0.6, density=0.4)
    api = edit_model(family.base, store, np.zeros(0), tmp_path / "api.safetensors", merge=spec)
    assert out.read_bytes() == api.read_bytes()


@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        (["--merge", "ties", "--density", "0"], "--density"),
        (["--merge", "ties", "--density", "1.5"], "--density"),
        (["--merge", "dare", "--drop-rate", "1"], "--drop-rate"),
        (["--merge", "dare", "--drop-rate", "-0.1"], "--drop-rate"),
        (["--merge", "dare", "--seed", "-1"], "--seed"),
        (["--merge", "bogus"], "--merge"),
        (["--merge", "ties", "--mode", "atoms"], "--mode tasks"),
        (["--merge", "ties", "--add", "task0=0"], "nothing to merge"),
    ],
)
def test_cli_refuses_bad_values(extra: list[str], culprit: str, family: Family, store: Store, tmp_path: Path) -> None:
    out = tmp_path / "e.safetensors"
    args = ["edit", "--base", str(family.base), "--store", str(store.path), "--out", str(out)]
    if "--add" not in extra and "--mode" not in extra:
        args += ["--add-all", "1"]
    result = runner.invoke(app, args + extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], result.stderr
    assert not out.exists()


def test_merge_spec_checks_its_values(store: Store) -> None:
    with pytest.raises(TvbasisError, match="--density"):
        MergeSpec("ties", weights((0, 1.0)), density=float("nan"))
    with pytest.raises(TvbasisError, match="task weights"):
        TaskMerger(store, MergeSpec("dare", np.ones(T + 1)))
