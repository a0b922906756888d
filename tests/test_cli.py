"""The command line on good input: build -> info -> reconstruct -> edit, recipes, ``info --json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from safetensors.torch import load_file
from typer.testing import CliRunner

from common import Family, write_family
from tvbasis.cli import app
from tvbasis.store import MANIFEST, open_store

# tiny matrices: BLAS threads only add wake-up latency
pytestmark = pytest.mark.usefixtures("one_thread")

T = 4
runner = CliRunner()


def invoke(args: Sequence[str | Path | int | float]) -> Result:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


def task_flags(fam: Family) -> list[str]:
    return [a for t in fam.tasks for a in ("--task", f"{t.name}={t.path}")]


@pytest.fixture
def fam(tmp_path: Path) -> Family:
    return write_family(tmp_path / "in", T=T)


def test_build_info_reconstruct_edit(fam: Family, tmp_path: Path) -> None:
    store = tmp_path / "store"
    r = invoke(
        [
            "build",
            "--base",
            fam.base,
            *task_flags(fam),
            "--method",
            "pca",
            "-M",
            T,
            "--exclude",
            "head.*",
            "--out",
            store,
        ]
    )
    assert "pca basis, M = 4 of T = 4" in " ".join(r.stdout.split()) and r.stderr == ""  # rich wraps at 80
    assert all(t.name in r.stdout for t in fam.tasks)

    # info: a human table of the tasks
    r = invoke(["info", store])
    assert "relative error" in r.stdout and "cosine" in r.stdout
    for t in fam.tasks:
        row = next(line for line in r.stdout.splitlines() if t.name in line)
        assert "0.0000" in row and "1.0000" in row  # M = T: exact

    # reconstruct: equals the dense reference task vector
    base = load_file(fam.base)
    for t, src in enumerate(fam.tasks):
        out = tmp_path / f"{src.name}.safetensors"
        r = invoke(["reconstruct", store, "--task", src.name, "--out", out])
        assert f"wrote {out}" in r.stdout
        vec = load_file(out)
        assert set(vec) == set(fam.names)  # the task-vector tensors only
        for name in fam.names:
            assert vec[name].dtype == torch.float32 and vec[name].shape == base[name].shape
            np.testing.assert_allclose(vec[name].double().numpy(), fam.deltas[t][name].numpy(), atol=1e-5)
    V = np.stack(
        [
            np.concatenate(
                [load_file(tmp_path / f"{s.name}.safetensors")[n].double().reshape(-1).numpy() for n in fam.names]
            )
            for s in fam.tasks
        ],
        axis=1,
    )
    np.testing.assert_allclose(V, fam.dense(), atol=1e-5)

    def check_edit(out: Path, delta: dict[str, torch.Tensor]) -> None:
        edited = load_file(out)
        assert set(edited) == set(base)  # every base tensor
        for name, b in base.items():
            assert edited[name].dtype == b.dtype and edited[name].shape == b.shape
            if name in delta:
                np.testing.assert_allclose(edited[name].double().numpy(), (b.double() + delta[name]).numpy(), atol=1e-5)
            else:  # integer buffer and the excluded head: copied untouched
                assert torch.equal(edited[name], b)

    # edit --add / --negate (tasks mode)
    out = tmp_path / "edited.safetensors"
    invoke(["edit", "--base", fam.base, "--store", store, "--add", "task0=0.5", "--negate", "task2", "--out", out])
    check_edit(out, {n: 0.5 * fam.deltas[0][n] - fam.deltas[2][n] for n in fam.names})

    # edit --add-all with --scale
    out = tmp_path / "all.safetensors"
    invoke(["edit", "--base", fam.base, "--store", store, "--add-all", 1, "--scale", 0.25, "--out", out, "--quiet"])
    check_edit(out, {n: 0.25 * sum(d[n] for d in fam.deltas) for n in fam.names})

    # edit --mode atoms: base + scale * (sum of the M atoms)
    out = tmp_path / "atoms.safetensors"
    invoke(["edit", "--base", fam.base, "--store", store, "--mode", "atoms", "--scale", 0.3, "--out", out])
    atoms = [load_file(store / "atoms" / f"atom-{m:03d}.safetensors") for m in range(T)]
    check_edit(out, {n: 0.3 * sum(a[n].double() for a in atoms) for n in fam.names})


def test_quiet_prints_nothing(fam: Family, tmp_path: Path) -> None:
    store = tmp_path / "store"
    common = ["--exclude", "head.*", "--out", store, "--quiet"]
    r = invoke(["build", "--base", fam.base, *task_flags(fam), "--method", "sample", "-M", 2, *common])
    assert r.stdout == "" and r.stderr == ""
    r = invoke(["reconstruct", store, "--task", "task1", "--out", tmp_path / "t.safetensors", "--quiet"])
    assert r.stdout == "" and r.stderr == ""
    r = invoke(
        [
            "edit",
            "--base",
            fam.base,
            "--store",
            store,
            "--negate",
            "task1",
            "--out",
            tmp_path / "e.safetensors",
            "--quiet",
        ]
    )
    assert r.stdout == "" and r.stderr == ""


@pytest.mark.parametrize(
    ("method", "flags", "M", "settings"),
    [
        ("pca", ["--center"], 2, {"center": True}),
        ("autoencoder", ["--steps", 200, "--temperature", 2.0], 2, {"steps": 200, "temperature": 2.0}),
        ("random", ["--seed", 7], 3, {"seed": 7}),
        ("cluster", ["--cluster-merge", "ties", "--density", 0.5], 2, {"merge": "ties", "density": 0.5}),
    ],
)
def test_info_json(fam: Family, tmp_path: Path, method: str, flags: list, M: int, settings: dict) -> None:
    store = tmp_path / "store"
    invoke(
        [
            "build",
            "--base",
            fam.base,
            *task_flags(fam),
            "--method",
            method,
            "-M",
            M,
            *flags,
            "--exclude",
            "head.*",
            "--out",
            store,
            "--quiet",
        ]
    )
    r = invoke(["info", store, "--json"])
    s = json.loads(r.stdout)
    assert {"method", "settings", "M", "T", "tasks", "bytes"} <= set(s)
    assert s["method"] == method and s["M"] == M and s["T"] == T
    assert s["settings"]["n_atoms"] == M and settings.items() <= s["settings"].items()
    assert [t["name"] for t in s["tasks"]] == [t.name for t in fam.tasks]
    for t in s["tasks"]:
        assert {"name", "rel_error", "cosine"} <= set(t)
        assert 0.0 <= t["rel_error"] <= 1.0 + 1e-9 and -1.0 - 1e-9 <= t["cosine"] <= 1.0 + 1e-9
    b = s["bytes"]
    assert {"total", "original_fp32", "ratio"} <= set(b)
    assert b["total"] == sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    assert b["original_fp32"] == 4 * T * len(fam.dense())
    assert b["ratio"] == pytest.approx(b["total"] / b["original_fp32"])


def test_info_byte_counts_are_exact_whatever_the_paths(tmp_path: Path) -> None:
    """The manifest counts its own bytes; the count must be exact for every length of the paths it holds."""
    for i in range(16):
        f = write_family(tmp_path / ("d" * (i + 1)) / "in", T=T)
        store = f.base.parent.parent / "store"
        invoke(
            [
                "build",
                "--base",
                f.base,
                *task_flags(f),
                "--method",
                "pca",
                "--center",
                "-M",
                2,
                "--exclude",
                "head.*",
                "--out",
                store,
                "--quiet",
            ]
        )
        b = json.loads(invoke(["info", store, "--json"]).stdout)["bytes"]
        assert b["total"] == sum(p.stat().st_size for p in store.rglob("*") if p.is_file()), i
        assert b["manifest"] == (store / MANIFEST).stat().st_size, i
        json.loads((store / MANIFEST).read_text())  # padding keeps it valid JSON


# -- recipes ---------------------------------------------------------------------------------


def _stores_equal(a: Path, b: Path) -> None:
    """Same atoms and matrices byte for byte; same manifest but for the creation time and source paths."""
    ma, mb = (json.loads((p / MANIFEST).read_text()) for p in (a, b))
    for key in ("method", "n_atoms", "n_tasks", "n_vectors", "has_mean", "dim", "layout", "selection", "atoms"):
        assert ma[key] == mb[key], key
    assert ma["base"]["fingerprint"] == mb["base"]["fingerprint"]
    assert Path(ma["base"]["source"]).resolve() == Path(mb["base"]["source"]).resolve()
    for ta, tb in zip(ma["tasks"], mb["tasks"], strict=True):
        assert (ta["name"], ta["content_hash"], ta["norm"]) == (tb["name"], tb["content_hash"], tb["norm"])
        assert Path(ta["source"]).resolve() == Path(tb["source"]).resolve()
    for rel in ma["files"]:
        if rel != "README.md":  # names the base's source path
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


RECIPE_LIST = """\
base: ../in/base.safetensors
tasks:
  - {name: task0, path: ../in/task0.safetensors}
  - {name: task1, path: ../in/task1.safetensors}
  - name: task2
    path: ../in/task2.safetensors
  - {name: task3, path: ../in/task3.safetensors}
method: autoencoder
M: 2
exclude: ["head.*"]
dtype: fp16
settings: {steps: 200, seed: 3}
"""

RECIPE_MAPPING = """\
base: ../in/base.safetensors
tasks:
  task0: ../in/task0.safetensors
  task1: ../in/task1.safetensors
  task2: ../in/task2.safetensors
  task3: ../in/task3.safetensors
method: autoencoder
M: 2
exclude: ["head.*"]
dtype: fp16
settings:
  steps: 200
  seed: 3
"""


@pytest.mark.parametrize("text", [RECIPE_LIST, RECIPE_MAPPING], ids=["list", "mapping"])
def test_recipe_builds_the_same_store_as_flags(
    fam: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    flags = tmp_path / "flags"
    invoke(
        [
            "build",
            "--base",
            fam.base,
            *task_flags(fam),
            "--method",
            "autoencoder",
            "-M",
            2,
            "--steps",
            200,
            "--seed",
            3,
            "--dtype",
            "fp16",
            "--exclude",
            "head.*",
            "--out",
            flags,
            "--quiet",
        ]
    )

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "recipe.yaml").write_text(text)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths are the recipe's folder's, not the cwd's
    invoke(["build", "--recipe", "../cfg/recipe.yaml", "--out", "../from_recipe", "--quiet"])
    _stores_equal(flags, tmp_path / "from_recipe")
    assert open_store(tmp_path / "from_recipe").manifest["atoms"]["dtype"] == "fp16"


def test_flags_override_the_recipe(fam: Family, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"base: {fam.base}\ntasks: {{task0: in/task0.safetensors, task1: in/task1.safetensors}}\n"
        "method: pca\nM: 1\nexclude: ['head.*']\n"
    )
    invoke(["build", "--recipe", recipe, "-M", 2, "--out", tmp_path / "a", "--quiet"])
    s = open_store(tmp_path / "a")
    assert (s.n_atoms, s.task_names, s.manifest["method"]["name"]) == (2, ["task0", "task1"], "pca")

    # --task replaces the recipe's tasks; --method its method
    invoke(["build", "--recipe", recipe, *task_flags(fam), "--method", "sample", "--out", tmp_path / "b", "--quiet"])
    s = open_store(tmp_path / "b")
    assert (s.n_atoms, s.n_tasks, s.manifest["method"]["name"]) == (1, T, "sample")


# -- the installed command ---------------------------------------------------------------------


def test_installed_command_end_to_end(fam: Family, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "tvbasis"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tvbasis.cli"]
    store = tmp_path / "store"
    args = [
        "build",
        "--base",
        fam.base,
        *task_flags(fam),
        "--method",
        "pca",
        "-M",
        3,
        "--exclude",
        "head.*",
        "--out",
        store,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert all(t.name in proc.stdout for t in fam.tasks)
    s = json.loads(invoke(["info", store, "--json"]).stdout)
    assert (s["method"], s["M"], s["T"]) == ("pca", 3, T)
