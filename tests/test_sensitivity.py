"""Per-tensor output sensitivity: its measurement, its file, and how the budget planner weighs errors by it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from common import write_large_family
from tvbasis.build import build_store
from tvbasis.cli import app
from tvbasis.codes.core import row_view_shape
from tvbasis.errors import TvbasisError
from tvbasis.methods import make_method
from tvbasis.planning.budget import (
    build_for_budget,
    estimate_plan,
    plan_budget,
    sensitivity_for_store,
    stats_from_store,
    tensor_weights,
)
from tvbasis.planning.sensitivity import (
    load_sensitivity,
    normalised_weights,
    output_sensitivity,
    row_sensitivity,
    save_sensitivity,
    tensor_sensitivity,
)
from tvbasis.store import open_store

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def linear_forward(x: torch.Tensor, shapes: dict[str, tuple[int, ...]]):
    """Outputs ``x @ W^T`` of a bias-free linear layer ``W`` (zero base) plus a tensor ``unused`` it ignores."""

    def forward(delta):
        assert set(delta) == set(shapes)
        return x @ delta["w"].T

    return forward


def test_a_linear_layers_sensitivity_is_its_inputs_energy_per_input() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g) * torch.linspace(0.5, 2.0, 8)
    shapes = {"w": (5, 8), "unused": (3, 3)}
    got = output_sensitivity(linear_forward(x, shapes), shapes, probes=200)
    # E||e x||^2 / ||e||^2 = ||x||^2 / in for isotropic e: the mean over examples
    expected = float(x.square().sum(dim=1).mean()) / 8
    assert got["w"] == pytest.approx(expected, rel=0.1)
    assert got["unused"] == 0.0
    # twice the inputs move the outputs four times as far (the same probes: exactly)
    doubled = output_sensitivity(linear_forward(2 * x, shapes), shapes, probes=200)
    assert doubled["w"] == pytest.approx(4 * got["w"], rel=1e-5)
    # the estimate is a mean over probes: one probe is a noisy, unbiased draw of it
    draws = [output_sensitivity(linear_forward(x, shapes), shapes, probes=1, seed=s)["w"] for s in range(50)]
    assert np.std(draws) > 0 and np.mean(draws) == pytest.approx(expected, rel=0.15)


def test_the_profile_puts_the_error_on_the_rows_tasks_change() -> None:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    shapes = {"w": (5, 8)}

    def row0_only(delta):
        return x @ delta["w"][:1].T  # the outputs read row 0 only

    on_row0 = torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64)
    assert output_sensitivity(row0_only, shapes, {"w": on_row0.roll(1)})["w"] == 0.0
    assert output_sensitivity(row0_only, shapes, {"w": on_row0})["w"] > 0
    assert output_sensitivity(row0_only, shapes, {"w": torch.zeros(5, dtype=torch.float64)})["w"] == 0.0
    with pytest.raises(TvbasisError, match=r"'w'.*5 rows"):
        output_sensitivity(row0_only, shapes, {"w": torch.ones(4)})
    with pytest.raises(TvbasisError, match="no row profile"):
        output_sensitivity(row0_only, shapes, {})
    with pytest.raises(TvbasisError, match="--probes"):
        output_sensitivity(row0_only, shapes, probes=0)


def test_row_figures_combine_with_any_profile_as_one_measurement_would() -> None:
    """Measured once per base, the row figures give what a measurement shaped by the tasks' rows
    gives, for any tasks: the profile only weighs the rows."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 8, generator=g)
    shapes = {"w": (5, 8), "b": (5,)}

    def forward(delta):
        return x @ (delta["w"] * torch.arange(1.0, 6.0)[:, None]).T + delta["b"]

    rows = row_sensitivity(forward, shapes, probes=4, seed=3)
    assert rows["w"].shape == (5,) and rows["b"].shape == (1,)
    # row i's outputs are scaled by i + 1: per unit error, (i + 1)^2 ||x||^2 / (examples x inputs)
    many = row_sensitivity(forward, shapes, probes=400)["w"]
    expected = torch.arange(1.0, 6.0, dtype=torch.float64) ** 2 * float(x.square().sum()) / (32 * 8)
    torch.testing.assert_close(many, expected, rtol=0.2, atol=0)
    for profile in ({"w": torch.rand(5, generator=g, dtype=torch.float64), "b": torch.ones(1)}, None):
        once = output_sensitivity(forward, shapes, profile, probes=4, seed=3)
        assert tensor_sensitivity(rows, profile) == pytest.approx(once, rel=1e-12)
    weights = torch.tensor([0.0, 0, 0, 0, 1.0])
    assert tensor_sensitivity(rows, {"w": weights}) == pytest.approx({"w": float(rows["w"][4])}, rel=1e-12)
    with pytest.raises(TvbasisError, match=r"no figures for tensor 'c'"):
        tensor_sensitivity(rows, names=["w", "c"])


def test_weights_are_normalised_by_the_tasks_energy() -> None:
    energy = {"a": 3.0, "b": 1.0, "c": 0.0}
    w = normalised_weights({"a": 2.0, "b": 10.0, "c": 5.0}, energy)
    assert sum(w[n] * e for n, e in energy.items()) / sum(energy.values()) == pytest.approx(1.0)
    assert w["b"] / w["a"] == pytest.approx(5.0)
    with pytest.raises(TvbasisError, match="'c'"):
        normalised_weights({"a": 1.0, "b": 1.0}, energy)
    with pytest.raises(TvbasisError, match=r"'b'.*finite"):
        normalised_weights({"a": 1.0, "b": -1.0, "c": 1.0}, energy)
    with pytest.raises(TvbasisError, match="sensitivity 0"):
        normalised_weights({"a": 0.0, "b": 0.0, "c": 1.0}, energy)


def test_the_file_round_trips_and_bad_files_are_named(tmp_path: Path) -> None:
    rows = {"a": torch.tensor([1.5, 0.0, 2.0], dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
    path = save_sensitivity(tmp_path / "s.safetensors", rows, {"texts": 3})
    back = load_sensitivity(path)
    assert set(back) == {"a", "b"} and all(torch.equal(back[n], rows[n]) for n in rows)
    with pytest.raises(TvbasisError, match="already exists"):
        save_sensitivity(path, rows)
    assert not list(tmp_path.glob("*.tmp-*"))
    (tmp_path / "old.json").write_text(json.dumps({"format": "tvbasis-sensitivity/1", "tensors": {"a": 1.0}}))
    with pytest.raises(TvbasisError, match=r"old\.json: not a sensitivity file"):
        load_sensitivity(tmp_path / "old.json")
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "other"})
    with pytest.raises(TvbasisError, match=r"other\.safetensors: not a sensitivity file"):
        load_sensitivity(tmp_path / "other.safetensors")
    save_sensitivity(tmp_path / "nan.safetensors", {"a": torch.tensor([1.0, float("nan")])})
    with pytest.raises(TvbasisError, match=r"'a'.*finite"):
        load_sensitivity(tmp_path / "nan.safetensors")
    save_sensitivity(tmp_path / "2d.safetensors", {"a": torch.ones(2, 2)})
    with pytest.raises(TvbasisError, match=r"'a'.*vector"):
        load_sensitivity(tmp_path / "2d.safetensors")
    with pytest.raises(TvbasisError, match="no such sensitivity file"):
        load_sensitivity(tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def stats(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    fam = write_large_family(tmp_path_factory.mktemp("fam"), T=4)
    path = tmp_path_factory.mktemp("stats") / "s"
    build_store(fam.base, fam.tasks, make_method("pca", 1), path, exclude=["head.*"], tensor_stats=True)
    return path, fam


def _bytes_of(plan, tensor: str) -> int:
    return next(c.nbytes for c in plan.choices if c.tensor == tensor)


def test_the_planner_spends_bytes_where_error_moves_the_outputs(stats) -> None:
    gram, grams, shapes, names = stats_from_store(stats[0])
    plain = plan_budget(gram, grams, shapes, 0.3, task_names=names)
    uniform = plan_budget(gram, grams, shapes, 0.3, task_names=names, sensitivity=dict.fromkeys(shapes, 7.0))
    assert uniform.codes == plain.codes and uniform.weighted and not plain.weighted
    assert uniform.loss == pytest.approx(plain.loss, rel=1e-12)
    target = "big2.weight"
    tilted = {n: 1000.0 if n == target else 1.0 for n in shapes}
    weighted = plan_budget(gram, grams, shapes, 0.3, task_names=names, sensitivity=tilted)
    assert weighted.nbytes <= 0.3 * weighted.original_bytes
    assert _bytes_of(weighted, target) > _bytes_of(plain, target)
    # the estimate of a given plan weighs its errors the same way
    again = estimate_plan(gram, grams, shapes, weighted.codes, weighted.n_atoms, task_names=names, sensitivity=tilted)
    assert np.allclose(again.task_loss(), weighted.task_loss(), rtol=1e-9)
    weights = tensor_weights(grams, tilted)
    assert weights is not None and weights[target] > 1 > weights["embed.weight"]
    with pytest.raises(TvbasisError, match="no figure for tensor"):
        plan_budget(gram, grams, shapes, 0.3, sensitivity={target: 1.0})


def _row_figures(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(row_view_shape(s)[0], generator=g, dtype=torch.float64) + i for i, (n, s) in
            enumerate(shapes.items())}  # fmt: skip


def test_the_stores_row_energies_shape_the_figures(stats) -> None:
    path, fam = stats
    shapes = stats_from_store(path)[2]
    rows = _row_figures(shapes)
    figures = sensitivity_for_store(path, rows)
    energy = open_store(path).tensor_row_energy
    assert energy is not None and list(figures) == list(shapes)
    for n in shapes:
        e = torch.as_tensor(energy[n])
        assert figures[n] == pytest.approx(float((e * rows[n]).sum() / e.sum()), rel=1e-12)
    # the same as weighing by each task's squared rows directly
    name = "embed.weight"
    deltas = torch.stack([d[name].double() for d in fam.deltas])
    direct = deltas.square().sum(dim=2).mean(dim=0)
    assert figures[name] == pytest.approx(float((direct * rows[name]).sum() / direct.sum()), rel=1e-10)


def test_cli_plan_and_build_with_a_sensitivity_file(stats, tmp_path: Path) -> None:
    path, fam = stats
    shapes = stats_from_store(path)[2]
    good = save_sensitivity(tmp_path / "good.safetensors", _row_figures(shapes))
    res = runner.invoke(app, ["plan", str(path), "--budget", "0.2", "--json", "--sensitivity", str(good)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["sensitivity_weighted"] is True
    res = runner.invoke(app, ["plan", str(path), "--budget", "0.2", "--sensitivity", str(good)])
    assert res.exit_code == 0 and "output sensitivity" in res.output
    partial = save_sensitivity(
        tmp_path / "partial.safetensors", {"embed.weight": torch.ones(shapes["embed.weight"][0])}
    )
    res = runner.invoke(app, ["plan", str(path), "--budget", "0.2", "--sensitivity", str(partial)])
    assert res.exit_code == 2 and "no figures for tensor" in res.output
    res = runner.invoke(app, ["plan", str(path), "--sensitivity", str(good)])
    assert res.exit_code == 2 and "--budget only" in res.output
    tasks = [a for t in fam.tasks for a in ("--task", f"{t.name}={t.path}")]
    args = ["build", "--base", str(fam.base), *tasks, "--exclude", "head.*", "-q"]
    res = runner.invoke(app, [*args, "--budget", "0.2", "--sensitivity", str(good), "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    info = json.loads(runner.invoke(app, ["info", str(tmp_path / "s"), "--json"]).output)
    assert info["bytes"]["ratio"] <= 0.2
    res = runner.invoke(app, [*args, "--budget", "0.2", "--sensitivity", str(partial), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no figures for tensor" in res.output and not (tmp_path / "x").exists()


def test_a_build_plans_with_its_own_passs_row_energies_as_plan_does(stats, tmp_path: Path) -> None:
    """``build --budget`` (its own Gram pass) and ``plan`` on a statistics store weigh alike."""
    path, fam = stats
    shapes = stats_from_store(path)[2]
    rows = _row_figures(shapes, seed=1)
    gram, grams, _, names = stats_from_store(path)
    planned = plan_budget(gram, grams, shapes, 0.2, task_names=names, sensitivity=sensitivity_for_store(path, rows))
    built = build_for_budget(fam.base, fam.tasks, tmp_path / "b", 0.2, exclude=["head.*"], sensitivity=rows)
    report, summary = built.manifest["budget_plan"], planned.summary()
    assert report["M"] == summary["M"] and report["codes"] == summary["codes"] and report["sensitivity_weighted"]
    assert report["estimated_loss"] == pytest.approx(summary["estimated_loss"], rel=1e-12)


def test_a_store_without_row_energies_weighs_rows_evenly_and_says_so(stats, tmp_path: Path) -> None:
    import shutil

    path, _ = stats
    old = tmp_path / "old"
    shutil.copytree(path, old)
    manifest = json.loads((old / "tvbasis.json").read_text())
    file = manifest["tensor_stats"].pop("row_energy")  # as a store built before they were kept
    del manifest["files"][file]
    (old / file).unlink()
    (old / "tvbasis.json").write_text(json.dumps(manifest))
    shapes = stats_from_store(path)[2]
    rows = _row_figures(shapes)
    assert sensitivity_for_store(old, rows) == pytest.approx({n: float(r.mean()) for n, r in rows.items()})
    good = save_sensitivity(tmp_path / "good.safetensors", rows)
    res = runner.invoke(app, ["plan", str(old), "--budget", "0.2", "--sensitivity", str(good)])
    assert res.exit_code == 0 and "keeps no row energies" in res.output


def test_cli_defaults_are_the_modules() -> None:
    import inspect

    from tvbasis.cli import sensitivity_command
    from tvbasis.planning.sensitivity import DEFAULT_PROBES, DEFAULT_TEXTS

    params = inspect.signature(sensitivity_command).parameters
    assert params["limit"].default == DEFAULT_TEXTS and params["probes"].default == DEFAULT_PROBES
