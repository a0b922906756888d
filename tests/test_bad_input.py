"""Bad input gets one line naming the culprit, exit status 2, no partial output, inputs untouched.

Each case below sets up one kind of bad input and says which strings (the file, tensor or
option at fault) the error must name. Every case runs through the CLI (typer's CliRunner on
``tvbasis.cli.app``); cases with a Python API counterpart also run through it, which must
raise ``TvbasisError``. In both, a digest of every file under the test's folder taken
before the command must equal the one taken after: nothing written, nothing changed.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import Result
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from common import Family, flat, read_flat, save_hf_sharded, tree_digest, write_family
from tvbasis.arithmetic import edit_model, reconstruct_task, task_coefficients, task_weights
from tvbasis.build import build_store
from tvbasis.cli import app
from tvbasis.errors import CheckpointError, TvbasisError
from tvbasis.interop.official import UnsafeLoadWarning, load_torch_file
from tvbasis.io.checkpoint import open_checkpoint
from tvbasis.methods import make_method
from tvbasis.recipe import load_recipe
from tvbasis.store import MANIFEST, open_store
from tvbasis.tasks import TaskSource, TaskVectorSet, parse_task_arg

# tiny matrices: BLAS threads only add wake-up latency
pytestmark = pytest.mark.usefixtures("one_thread")

EXCLUDE = ["head.*"]
T = 3
runner = CliRunner()


# -- checking a refusal -----------------------------------------------------------------------


def invoke(args: Sequence[str | Path | int]) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def assert_refused(result: Result, culprits: Sequence[str | Path], root: Path, before: dict[str, str]) -> str:
    """Exit 2 with one line on stderr naming every culprit, nothing on stdout, ``root`` unchanged."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit)  # not a traceback
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for culprit in culprits:
        assert str(culprit) in line, f"{culprit!s} not named in: {line}"
    assert result.stdout == ""
    assert not leftovers(root)
    assert tree_digest(root) == before  # inputs untouched, no output, partial or whole
    return line


# -- the cases --------------------------------------------------------------------------------


@dataclass
class Case:
    """A bad command line, what its error must name, and the same through the Python API."""

    args: list[Any]
    culprits: list[Any]
    api: Callable[[], object] | None = None  # None: a command-line-only check (option parsing)


@dataclass
class Env:
    """A tiny base, T fine-tunes and a PCA store built on them, all under ``root``."""

    root: Path
    fam: Family
    store: Path
    out: Path = field(init=False)  # a store directory the command would create
    out_file: Path = field(init=False)  # a safetensors file the command would write

    def __post_init__(self) -> None:
        (self.root / "out").mkdir()
        self.out = self.root / "out" / "result"
        self.out_file = self.root / "out" / "result.safetensors"

    @property
    def tasks(self) -> list[TaskSource]:
        return list(self.fam.tasks)

    def path(self, name: str) -> Path:
        return self.root / "in" / name

    def changed(self, src: Path, name: str, change: Callable[[dict[str, torch.Tensor]], object]) -> Path:
        """A copy of the safetensors file ``src`` with ``change`` applied to its tensors."""
        state = {k: v.clone() for k, v in load_file(src).items()}
        change(state)
        p = self.path(name)
        save_file(state, str(p))
        return p

    def task_with(self, name: str, change: Callable[[dict[str, torch.Tensor]], object]) -> Path:
        return self.changed(self.fam.tasks[0].path, name, change)

    def base_with(self, name: str, change: Callable[[dict[str, torch.Tensor]], object]) -> Path:
        return self.changed(self.fam.base, name, change)

    def bytes_file(self, name: str, data: bytes) -> Path:
        p = self.path(name)
        p.write_bytes(data)
        return p

    def with_bad_task(self, bad: Path) -> list[TaskSource]:
        return [*self.tasks[:2], TaskSource("bad", bad)]

    # -- build ---------------------------------------------------------------------------
    def build(
        self,
        culprits: list[Any],
        tasks: list[TaskSource] | None = None,
        *,
        base: Path | None = None,
        method: str = "pca",
        M: int = 2,
        flags: Sequence[Any] = (),
        settings: dict[str, Any] | None = None,
        out: Path | None = None,
        api_kwargs: dict[str, Any] | None = None,
    ) -> Case:
        tasks = self.tasks if tasks is None else tasks
        base = base or self.fam.base
        out = out or self.out
        args = ["build", "--base", base, *[a for t in tasks for a in ("--task", f"{t.name}={t.path}")]]
        args += ["--method", method, "-M", M, "--exclude", "head.*", "--out", out, *flags]

        def api() -> object:
            est = make_method(method, M, **(settings or {}))
            return build_store(base, tasks, est, out, exclude=EXCLUDE, **(api_kwargs or {}))

        return Case(args, culprits, api)

    def recipe(self, name: str, text: str) -> Path:
        p = self.root / "cfg" / name
        p.parent.mkdir(exist_ok=True)
        p.write_text(text)
        return p

    def build_recipe(self, recipe: Path, culprits: list[Any]) -> Case:
        def api() -> object:
            rec, root = load_recipe(recipe)
            assert rec.method and rec.n_atoms and rec.base
            est = make_method(rec.method, rec.n_atoms, **rec.settings)
            return build_store(root / rec.base, rec.task_sources(root), est, self.out, exclude=rec.exclude)

        return Case(["build", "--recipe", recipe, "--out", self.out], culprits, api)

    # -- edit, reconstruct, info ---------------------------------------------------------
    def edit(
        self,
        culprits: list[Any],
        *,
        base: Path | None = None,
        store: Path | None = None,
        ops: Sequence[Any] = ("--add", "task0=1"),
        flags: Sequence[Any] = (),
        out: Path | None = None,
        weights: Callable[[list[str]], np.ndarray] | None = None,
        ignore: bool = False,
        api: bool = True,
    ) -> Case:
        base = base or self.fam.base
        store = store or self.store
        out = out or self.out_file
        args = ["edit", "--base", base, "--store", store, *ops, "--out", out, *flags]

        def run_api() -> object:
            s = open_store(store)
            a = weights(s.task_names) if weights else task_weights(s.task_names, {"task0": 1.0})
            return edit_model(base, s, task_coefficients(s.decoder, a), out, ignore_base_mismatch=ignore)

        return Case(args, culprits, run_api if api else None)

    def reconstruct(
        self, culprits: list[Any], *, store: Path | None = None, task: str = "task0", flags: Sequence[Any] = ()
    ) -> Case:
        store = store or self.store
        args = ["reconstruct", store, "--task", task, "--out", self.out_file, *flags]
        return Case(args, culprits, lambda: reconstruct_task(open_store(store), task, self.out_file))

    def info(self, culprits: list[Any], store: Path) -> Case:
        return Case(["info", store], culprits, lambda: open_store(store).summary())

    def first_atom(self, store: Path | None = None) -> Path:
        return (store or self.store) / "atoms" / "atom-000.safetensors"


CASES: dict[str, Callable[[Env], Case]] = {}


CLI_ONLY: set[str] = set()  # option parsing of the command line: no API counterpart


def case(fn: Callable[[Env], Case]) -> Callable[[Env], Case]:
    CASES[fn.__name__] = fn
    return fn


def cli_only_case(fn: Callable[[Env], Case]) -> Callable[[Env], Case]:
    CLI_ONLY.add(fn.__name__)
    return case(fn)


def _corrupt_header_entry(src: Path, dest: Path, tensor: str, change: Callable[[dict[str, Any]], object]) -> Path:
    """Copy a safetensors file, editing one tensor's header entry (the data is kept as it is)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header[tensor])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dest.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return dest


class CustomHolder:
    """A custom class: unpickling an instance means importing and running this module's code."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state


def _leave_marker(path: str) -> dict[str, str]:
    Path(path).write_text("code ran while loading")
    return {}


class RunsCodeOnLoad:
    """Unpickling an instance calls ``_leave_marker``: exactly what ``weights_only=True`` must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_leave_marker, (self.marker,))


# build: tensor names and shapes


@case
def task_lacks_a_base_tensor(env: Env) -> Case:
    bad = env.task_with("lacks.safetensors", lambda s: s.pop("layer.0.attn.bias"))
    return env.build([bad, "'layer.0.attn.bias'"], env.with_bad_task(bad))


@case
def task_has_a_tensor_the_base_lacks(env: Env) -> Case:
    bad = env.task_with("extra.safetensors", lambda s: s.update({"extra.weight": torch.zeros(4)}))
    return env.build([bad, "'extra.weight'"], env.with_bad_task(bad))


@case
def task_tensor_has_another_shape(env: Env) -> Case:
    bad = env.task_with("shape.safetensors", lambda s: s.update({"layer.1.mlp.weight": torch.zeros(19, 9)}))
    return env.build([bad, "'layer.1.mlp.weight'", "[19, 9]"], env.with_bad_task(bad))


@case
def task_tensor_is_not_floating_point(env: Env) -> Case:
    bad = env.task_with(
        "int.safetensors", lambda s: s.update({"layer.0.norm.weight": torch.ones(8, dtype=torch.int64)})
    )
    return env.build([bad, "'layer.0.norm.weight'"], env.with_bad_task(bad))


@case
def base_tensor_has_another_shape(env: Env) -> Case:
    base = env.base_with("base_shape.safetensors", lambda s: s.update({"layer.1.mlp.bias": torch.zeros(20)}))
    return env.build(["'layer.1.mlp.bias'", env.fam.tasks[0].path], base=base)


@case
def base_lacks_a_task_tensor(env: Env) -> Case:
    base = env.base_with("base_lacks.safetensors", lambda s: s.pop("layer.0.attn.weight"))
    return env.build(["'layer.0.attn.weight'", env.fam.tasks[0].path], base=base)


# build: values


@case
def nan_in_a_task_vector(env: Env) -> Case:
    bad = env.task_with("nan.safetensors", lambda s: s["layer.1.mlp.weight"].__setitem__((2, 3), math.nan))
    return env.build([bad, "'layer.1.mlp.weight'", "'bad'"], env.with_bad_task(bad))


@case
def inf_in_a_scalar_of_a_task(env: Env) -> Case:
    bad = env.task_with("inf.safetensors", lambda s: s.update({"logit_scale": torch.tensor(math.inf)}))
    return env.build([bad, "'logit_scale'", "'bad'"], env.with_bad_task(bad))


@case
def minus_inf_in_a_task_bias(env: Env) -> Case:
    bad = env.task_with("ninf.safetensors", lambda s: s["layer.0.attn.bias"].__setitem__(5, -math.inf))
    return env.build([bad, "'layer.0.attn.bias'"], env.with_bad_task(bad))


@case
def nan_in_the_base(env: Env) -> Case:
    base = env.base_with("base_nan.safetensors", lambda s: s["embed.weight"].__setitem__((0, 0), math.nan))
    return env.build(["'embed.weight'", base], base=base)


# build: M and task names


@case
def zero_atoms(env: Env) -> Case:
    return env.build(["-M 0"], M=0)


@case
def negative_atoms(env: Env) -> Case:
    return env.build(["-M -1"], M=-1)


@case
def more_atoms_than_tasks(env: Env) -> Case:
    return env.build(["-M 4", f"T = {T}"], M=4)


@case
def more_atoms_than_tasks_autoencoder(env: Env) -> Case:
    return env.build(["-M 4"], method="autoencoder", M=4, flags=["--steps", 200], settings={"steps": 200})


@case
def centred_pca_with_as_many_atoms_as_tasks(env: Env) -> Case:
    return env.build([f"-M {T}"], M=T, flags=["--center"], settings={"center": True})


@case
def duplicate_task_names(env: Env) -> Case:
    tasks = [*env.tasks[:2], TaskSource("task0", env.fam.tasks[2].path)]
    return env.build(["'task0'", "twice"], tasks)


@case
def invalid_task_name(env: Env) -> Case:
    c = env.build(["'bad name'"], [*env.tasks[:2], TaskSource("bad name", env.fam.tasks[2].path)])
    c.api = lambda: parse_task_arg(f"bad name={env.fam.tasks[2].path}")
    return c


@case
def task_argument_without_a_path(env: Env) -> Case:
    c = env.build(["--task", "'task9'"])
    c.args[c.args.index("--method") : c.args.index("--method")] = ["--task", "task9"]
    c.api = lambda: parse_task_arg("task9")
    return c


@case
def no_tensor_selected(env: Env) -> Case:
    c = env.build([env.fam.base, "include"], flags=["--include", "nothing.*"])
    c.api = lambda: build_store(env.fam.base, env.tasks, make_method("pca", 2), env.out, include=["nothing.*"])
    return c


# build: files that are missing or damaged


@case
def missing_task_file(env: Env) -> Case:
    ghost = env.path("ghost.safetensors")
    return env.build([ghost], env.with_bad_task(ghost))


@case
def missing_base_file(env: Env) -> Case:
    ghost = env.path("no_base.safetensors")
    return env.build([ghost], base=ghost)


@case
def truncated_task_file(env: Env) -> Case:
    bad = env.bytes_file("truncated.safetensors", env.fam.tasks[0].path.read_bytes()[:-7])
    return env.build([bad, "truncated"], env.with_bad_task(bad))


@case
def truncated_base_file(env: Env) -> Case:
    bad = env.bytes_file("base_truncated.safetensors", env.fam.base.read_bytes()[:-100])
    return env.build([bad], base=bad)


@case
def task_file_shorter_than_a_header(env: Env) -> Case:
    bad = env.bytes_file("tiny.safetensors", b"\x01\x02")
    return env.build([bad], env.with_bad_task(bad))


@case
def empty_task_file(env: Env) -> Case:
    bad = env.bytes_file("empty.safetensors", b"")
    return env.build([bad], env.with_bad_task(bad))


@case
def corrupt_header_bytes(env: Env) -> Case:
    data = bytearray(env.fam.tasks[0].path.read_bytes())
    data[8:24] = b"\xff" * 16
    bad = env.bytes_file("garbled.safetensors", bytes(data))
    return env.build([bad, "corrupt"], env.with_bad_task(bad))


@case
def header_length_beyond_the_file(env: Env) -> Case:
    data = bytearray(env.fam.tasks[0].path.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)
    bad = env.bytes_file("huge_header.safetensors", bytes(data))
    return env.build([bad], env.with_bad_task(bad))


@case
def header_entry_without_a_shape(env: Env) -> Case:
    bad = _corrupt_header_entry(
        env.fam.tasks[0].path, env.path("noshape.safetensors"), "embed.weight", lambda e: e.pop("shape")
    )
    return env.build([bad, "'embed.weight'"], env.with_bad_task(bad))


@case
def header_entry_with_text_offsets(env: Env) -> Case:
    bad = _corrupt_header_entry(
        env.fam.tasks[0].path,
        env.path("textoffsets.safetensors"),
        "embed.weight",
        lambda e: e["data_offsets"].append("x"),
    )
    return env.build([bad, "'embed.weight'"], env.with_bad_task(bad))


@case
def header_shape_disagrees_with_the_data(env: Env) -> Case:
    bad = _corrupt_header_entry(
        env.fam.tasks[0].path, env.path("badshape.safetensors"), "embed.weight", lambda e: e.update(shape=[38, 8])
    )
    return env.build([bad, "'embed.weight'"], env.with_bad_task(bad))


@case
def unknown_dtype_in_header(env: Env) -> Case:
    bad = _corrupt_header_entry(
        env.fam.tasks[0].path, env.path("baddtype.safetensors"), "embed.weight", lambda e: e.update(dtype="F7")
    )
    return env.build([bad, "'embed.weight'", "'F7'"], env.with_bad_task(bad))


@case
def unknown_file_format(env: Env) -> Case:
    bad = env.bytes_file("task.npz", env.fam.tasks[0].path.read_bytes())
    return env.build([bad], env.with_bad_task(bad))


@case
def torch_file_with_a_custom_class(env: Env) -> Case:
    bad = env.path("custom.pt")
    torch.save({"model": CustomHolder(load_file(env.fam.tasks[0].path))}, bad)
    return env.build([bad, "code execution"], env.with_bad_task(bad))


@case
def torch_base_with_a_custom_class(env: Env) -> Case:
    bad = env.path("custom_base.pt")
    torch.save({"state_dict": load_file(env.fam.base), "extra": CustomHolder({})}, bad)
    return env.build([bad, "code execution"], base=bad)


@case
def truncated_torch_file(env: Env) -> Case:
    whole = env.path("whole.pt")
    torch.save(load_file(env.fam.tasks[0].path), whole)
    bad = env.bytes_file("half.pt", whole.read_bytes()[: whole.stat().st_size // 2])
    return env.build([bad], env.with_bad_task(bad))


@case
def torch_file_without_a_state_dict(env: Env) -> Case:
    bad = env.path("list.pt")
    torch.save([torch.zeros(3)], bad)
    return env.build([bad, "state dict"], env.with_bad_task(bad))


@case
def sharded_directory_missing_a_shard(env: Env) -> Case:
    d = save_hf_sharded(load_file(env.fam.tasks[0].path), env.path("sharded"), n_shards=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    return env.build([d / "model.safetensors.index.json", "'model-00002-of-00003.safetensors'"], env.with_bad_task(d))


@case
def sharded_directory_with_a_broken_index(env: Env) -> Case:
    d = save_hf_sharded(load_file(env.fam.tasks[0].path), env.path("sharded"), n_shards=2)
    (d / "model.safetensors.index.json").write_text("{not json")
    return env.build([d / "model.safetensors.index.json"], env.with_bad_task(d))


@case
def directory_without_weights(env: Env) -> Case:
    d = env.path("empty_model")
    d.mkdir()
    (d / "config.json").write_text("{}")
    return env.build([d, "no model weights"], env.with_bad_task(d))


# build: the output


@case
def output_store_exists(env: Env) -> Case:
    env.out.mkdir()
    (env.out / "keep.txt").write_text("mine")
    return env.build([env.out, "--overwrite"])


@case
def output_exists_as_a_file(env: Env) -> Case:
    env.out.write_text("mine")
    return env.build([env.out, "--overwrite"])


@case
def output_parent_missing(env: Env) -> Case:
    out = env.root / "nowhere" / "store"
    return env.build([out.parent], out=out)


# build: options


@case
def center_with_autoencoder(env: Env) -> Case:
    return env.build(["center", "autoencoder"], method="autoencoder", flags=["--center"], settings={"center": True})


@case
def steps_with_pca(env: Env) -> Case:
    return env.build(["steps", "pca"], flags=["--steps", 200], settings={"steps": 200})


@case
def cluster_merge_with_random(env: Env) -> Case:
    return env.build(
        ["merge", "random"], method="random", flags=["--cluster-merge", "ties"], settings={"merge": "ties"}
    )


@case
def unknown_method(env: Env) -> Case:
    return env.build(["--method", "'nope'"], method="nope")


@case
def unknown_atom_dtype(env: Env) -> Case:
    return env.build(["--dtype", "'fp8'"], flags=["--dtype", "fp8"], api_kwargs={"dtype": "fp8"})


@cli_only_case
def build_without_a_base(env: Env) -> Case:
    c = env.build(["--base"])
    del c.args[1:3]
    c.api = None
    return c


@cli_only_case
def build_without_atoms_count(env: Env) -> Case:
    c = env.build(["-M"])
    i = c.args.index("-M")
    del c.args[i : i + 2]
    c.api = None
    return c


# build: recipes


@case
def recipe_missing(env: Env) -> Case:
    return env.build_recipe(env.root / "cfg" / "absent.yaml", [env.root / "cfg" / "absent.yaml"])


@case
def recipe_with_an_unknown_key(env: Env) -> Case:
    r = env.recipe(
        "r.yaml", "base: ../in/base.safetensors\ntasks: {task0: ../in/task0.safetensors}\nmethod: pca\nM: 1\nbogus: 1\n"
    )
    return env.build_recipe(r, [r, "bogus"])


@case
def recipe_with_a_duplicate_task(env: Env) -> Case:
    r = env.recipe(
        "r.yaml",
        "base: ../in/base.safetensors\nmethod: pca\nM: 1\nexclude: ['head.*']\n"
        "tasks:\n  task0: ../in/task0.safetensors\n  task0: ../in/task1.safetensors\n",
    )
    return env.build_recipe(r, [r, "'task0'", "twice"])


@case
def recipe_with_a_duplicate_task_in_a_list(env: Env) -> Case:
    r = env.recipe(
        "r.yaml",
        "base: ../in/base.safetensors\nmethod: pca\nM: 1\nexclude: ['head.*']\ntasks:\n"
        "  - {name: task0, path: ../in/task0.safetensors}\n  - {name: task0, path: ../in/task1.safetensors}\n",
    )
    return env.build_recipe(r, ["'task0'", "twice"])


@case
def recipe_not_yaml(env: Env) -> Case:
    r = env.recipe("r.yaml", "base: [unclosed\nmethod: pca\n")
    return env.build_recipe(r, [r, "line 2"])


@case
def recipe_task_file_missing(env: Env) -> Case:
    r = env.recipe(
        "r.yaml",
        "base: ../in/base.safetensors\nmethod: pca\nM: 1\nexclude: ['head.*']\n"
        "tasks: {task0: ../in/task0.safetensors, ghost: ghost.safetensors}\n",
    )
    return env.build_recipe(r, [env.root / "cfg" / "ghost.safetensors"])  # resolved against the recipe's folder


@case
def recipe_setting_that_does_not_apply(env: Env) -> Case:
    r = env.recipe(
        "r.yaml",
        "base: ../in/base.safetensors\nmethod: autoencoder\nM: 1\nexclude: ['head.*']\n"
        "tasks: {task0: ../in/task0.safetensors, task1: ../in/task1.safetensors}\nsettings: {center: true}\n",
    )
    return env.build_recipe(r, ["center", "autoencoder"])


# edit: a base that does not match the store


@case
def edit_base_with_other_weights(env: Env) -> Case:
    other = env.base_with("other.safetensors", lambda s: s["layer.0.attn.weight"].__setitem__((1, 1), 7.0))
    return env.edit([other, "does not match", "--ignore-base-mismatch"], base=other)


@case
def edit_int8_store_with_a_base_of_other_weights(env: Env) -> Case:
    store = env.root / "int8-store"
    if not store.exists():
        build_store(env.fam.base, env.fam.tasks, make_method("pca", 2), store, exclude=EXCLUDE, dtype="int8")
    other = env.base_with("other8.safetensors", lambda s: s["layer.0.attn.weight"].__setitem__((0, 1), 5.0))
    return env.edit([other, "does not match", "--ignore-base-mismatch"], base=other, store=store)


@case
def edit_base_with_another_shape(env: Env) -> Case:
    other = env.base_with("wide.safetensors", lambda s: s.update({"embed.weight": torch.zeros(37, 9)}))
    return env.edit([other, "'embed.weight'", "[37, 9]"], base=other)


@case
def edit_base_with_another_shape_even_when_ignoring_mismatch(env: Env) -> Case:
    other = env.base_with("wide.safetensors", lambda s: s.update({"embed.weight": torch.zeros(37, 9)}))
    return env.edit([other, "'embed.weight'"], base=other, flags=["--ignore-base-mismatch"], ignore=True)


@case
def edit_base_lacking_a_tensor(env: Env) -> Case:
    other = env.base_with("lacks.safetensors", lambda s: s.pop("layer.0.attn.bias"))
    return env.edit([other, "'layer.0.attn.bias'"], base=other)


@case
def edit_base_lacking_a_tensor_even_when_ignoring_mismatch(env: Env) -> Case:
    other = env.base_with("lacks.safetensors", lambda s: s.pop("layer.0.attn.bias"))
    return env.edit([other, "'layer.0.attn.bias'"], base=other, flags=["--ignore-base-mismatch"], ignore=True)


@case
def edit_base_with_another_dtype(env: Env) -> Case:
    other = env.base_with("half.safetensors", lambda s: s.update({"embed.weight": s["embed.weight"].half()}))
    return env.edit([other, "'embed.weight'", "float16"], base=other)


@case
def edit_base_with_an_extra_tensor(env: Env) -> Case:
    other = env.base_with("extra.safetensors", lambda s: s.update({"extra.weight": torch.zeros(3)}))
    return env.edit([other, "'extra.weight'"], base=other)


@case
def edit_base_truncated(env: Env) -> Case:
    bad = env.bytes_file("base_truncated.safetensors", env.fam.base.read_bytes()[:-3])
    return env.edit([bad], base=bad)


@case
def edit_base_missing(env: Env) -> Case:
    ghost = env.path("ghost_base.safetensors")
    return env.edit([ghost], base=ghost)


@case
def edit_base_needing_code_execution(env: Env) -> Case:
    bad = env.path("custom_base.pt")
    torch.save({"state_dict": load_file(env.fam.base), "extra": CustomHolder({})}, bad)
    return env.edit([bad, "code execution"], base=bad)


# edit: options


@case
def edit_add_of_an_unknown_task(env: Env) -> Case:
    return env.edit(["--add nope", "task0"], ops=["--add", "nope=1"], weights=lambda n: task_weights(n, {"nope": 1}))


@case
def edit_negate_of_an_unknown_task(env: Env) -> Case:
    return env.edit(["--negate nope"], ops=["--negate", "nope"], weights=lambda n: task_weights(n, negate=["nope"]))


@case
def edit_add_with_an_infinite_weight(env: Env) -> Case:
    return env.edit(
        ["--add task0=inf"], ops=["--add", "task0=inf"], weights=lambda n: task_weights(n, {"task0": math.inf})
    )


@cli_only_case
def edit_add_with_a_weight_that_is_not_a_number(env: Env) -> Case:
    return env.edit(["--add", "'task0=abc'"], ops=["--add", "task0=abc"], api=False)


@cli_only_case
def edit_add_of_a_task_twice(env: Env) -> Case:
    return env.edit(["--add task0", "twice"], ops=["--add", "task0=1", "--add", "task0=2"], api=False)


@cli_only_case
def edit_atoms_mode_with_add(env: Env) -> Case:
    return env.edit(["--mode atoms", "--add"], ops=["--mode", "atoms", "--add", "task0=1"], api=False)


@cli_only_case
def edit_unknown_mode(env: Env) -> Case:
    return env.edit(["--mode", "'sideways'"], ops=["--mode", "sideways"], api=False)


@cli_only_case
def edit_with_nothing_to_do(env: Env) -> Case:
    return env.edit(["--add", "--negate"], ops=[], api=False)


@case
def edit_output_exists(env: Env) -> Case:
    env.out_file.write_bytes(b"mine")
    return env.edit([env.out_file, "--overwrite"])


@case
def edit_output_not_safetensors_for_a_file_base(env: Env) -> Case:
    out = env.root / "out" / "edited.bin"
    return env.edit(["--out", out, "safetensors"], out=out)


# edit, reconstruct, info: a store that is missing or damaged


@case
def edit_store_missing(env: Env) -> Case:
    return env.edit([env.root / "no_store"], store=env.root / "no_store")


@case
def edit_store_incomplete(env: Env) -> Case:
    broken = env.root / "broken"
    shutil.copytree(env.store, broken)
    (broken / MANIFEST).unlink()
    return env.edit([broken, MANIFEST], store=broken)


@case
def edit_store_with_a_garbled_atom(env: Env) -> Case:
    # Same size, so the store opens; the damage shows only while the output is being written.
    atom = env.first_atom()
    data = bytearray(atom.read_bytes())
    data[8:24] = b"\xff" * 16
    atom.write_bytes(bytes(data))
    return env.edit([atom])


@case
def reconstruct_unknown_task(env: Env) -> Case:
    return env.reconstruct([env.store, "'nope'"], task="nope")


@case
def reconstruct_output_exists(env: Env) -> Case:
    env.out_file.write_bytes(b"mine")
    return env.reconstruct([env.out_file, "--overwrite"])


@case
def reconstruct_unknown_dtype(env: Env) -> Case:
    c = env.reconstruct(["--dtype", "'fp8'"], flags=["--dtype", "fp8"])
    c.api = lambda: reconstruct_task(open_store(env.store), "task0", env.out_file, dtype="fp8")
    return c


@case
def reconstruct_store_missing(env: Env) -> Case:
    return env.reconstruct([env.root / "no_store"], store=env.root / "no_store")


@case
def reconstruct_store_with_a_garbled_atom(env: Env) -> Case:
    atom = env.first_atom()
    data = bytearray(atom.read_bytes())
    data[8:24] = b"\xff" * 16
    atom.write_bytes(bytes(data))
    return env.reconstruct([atom])


@case
def reconstruct_store_of_a_newer_format(env: Env) -> Case:
    manifest = json.loads((env.store / MANIFEST).read_text())
    manifest["format_version"] = 99
    (env.store / MANIFEST).write_text(json.dumps(manifest))
    return env.reconstruct([env.store, "version 99"])


@case
def info_store_missing(env: Env) -> Case:
    return env.info([env.root / "no_store"], env.root / "no_store")


@case
def info_store_with_an_unreadable_manifest(env: Env) -> Case:
    (env.store / MANIFEST).write_text("{")
    return env.info([env.store / MANIFEST], env.store)


@case
def info_store_with_a_truncated_atom(env: Env) -> Case:
    atom = env.first_atom()
    atom.write_bytes(atom.read_bytes()[:-4])
    return env.info([env.store, "atoms/atom-000.safetensors"], env.store)


# -- the tests --------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> Env:
    fam = write_family(tmp_path / "in", T=T, rank=2)
    store = build_store(fam.base, fam.tasks, make_method("pca", 2), tmp_path / "store", exclude=EXCLUDE)
    return Env(tmp_path, fam, store.path)


@pytest.mark.parametrize("name", list(CASES))
def test_cli_refuses(name: str, env: Env) -> None:
    c = CASES[name](env)
    assert (c.api is None) == (name in CLI_ONLY)
    before = tree_digest(env.root)
    assert_refused(invoke(c.args), c.culprits, env.root, before)


@pytest.mark.parametrize("name", [n for n in CASES if n not in CLI_ONLY])
def test_api_raises(name: str, env: Env) -> None:
    c = CASES[name](env)
    assert c.api is not None
    before = tree_digest(env.root)
    with pytest.raises(TvbasisError) as info:
        c.api()
    message = str(info.value)
    assert "\n" not in message
    for culprit in c.culprits:
        assert str(culprit) in message, f"{culprit!s} not named in: {message}"
    assert not leftovers(env.root)
    assert tree_digest(env.root) == before


# -- code execution ---------------------------------------------------------------------------


def test_torch_file_needing_code_execution_is_refused_and_its_code_never_runs(env: Env) -> None:
    marker = env.root / "marker.txt"
    evil = env.path("evil.pt")
    torch.save({"state_dict": load_file(env.fam.tasks[0].path), "payload": RunsCodeOnLoad(marker)}, evil)
    before = tree_digest(env.root)

    line = assert_refused(invoke(env.build([], env.with_bad_task(evil)).args), [evil], env.root, before)
    assert "code execution" in line
    assert_refused(invoke(env.edit([evil], base=evil).args), [evil], env.root, before)
    with pytest.raises(CheckpointError, match="code execution"):
        open_checkpoint(evil)
    with pytest.raises(CheckpointError):
        TaskVectorSet(env.fam.base, env.with_bad_task(evil), exclude=EXCLUDE)
    assert not marker.exists()

    # The file really does run code when its loader is told to trust it (the explicit opt-in,
    # --trust-pickle): the refusal is what kept it out.
    with pytest.warns(UnsafeLoadWarning, match="code execution allowed"):
        load_torch_file(evil, trust_pickle=True)
    assert marker.read_text() == "code ran while loading"


# -- inputs that look odd but are fine ---------------------------------------------------------


def test_torch_file_with_a_nested_state_dict_loads(env: Env) -> None:
    base_pt = env.path("base.pt")
    torch.save({"state_dict": load_file(env.fam.base), "epoch": 3}, base_pt)
    t0 = env.path("task0.pt")
    torch.save({"state_dict": load_file(env.fam.tasks[0].path), "optimizer": {"lr": 0.1}}, t0)
    t1 = env.path("task1.ckpt")
    torch.save(load_file(env.fam.tasks[1].path), t1)  # a plain state dict, another suffix
    tasks = [TaskSource("task0", t0), TaskSource("task1", t1), env.fam.tasks[2]]
    out = env.root / "from_torch"
    r = invoke([*env.build([], tasks, base=base_pt, M=T, out=out).args, "--quiet"])
    assert r.exit_code == 0, r.output
    reference = build_store(env.fam.base, env.tasks, make_method("pca", T), env.root / "ref", exclude=EXCLUDE)
    np.testing.assert_allclose(open_store(out).gram, reference.gram, rtol=1e-12)

    # The torch base edits too; a single-file base gives a safetensors file.
    edited = env.root / "edited.safetensors"
    r = invoke(["edit", "--base", base_pt, "--store", out, "--add", "task1=1", "--out", edited, "--quiet"])
    assert r.exit_code == 0, r.output
    want = flat(env.fam.base_state, env.fam.names) + flat(env.fam.deltas[1], env.fam.names)
    np.testing.assert_allclose(read_flat(edited, env.fam.names), want, atol=1e-5)


def test_hf_directory_with_pytorch_model_bin(env: Env) -> None:
    def hf_dir(name: str, src: Path) -> Path:
        d = env.path(name)
        d.mkdir()
        torch.save(load_file(src), d / "pytorch_model.bin")
        (d / "config.json").write_text('{"model_type": "tiny"}')
        return d

    base = hf_dir("base_hf", env.fam.base)
    tasks = [TaskSource(f"task{t}", hf_dir(f"task{t}_hf", env.fam.tasks[t].path)) for t in range(T)]
    store = env.root / "hf_store"
    r = invoke([*env.build([], tasks, base=base, M=T, out=store).args, "--quiet"])
    assert r.exit_code == 0, r.output

    vec = env.root / "task2.safetensors"
    assert invoke(["reconstruct", store, "--task", "task2", "--out", vec, "--quiet"]).exit_code == 0
    np.testing.assert_allclose(read_flat(vec, env.fam.names), flat(env.fam.deltas[2], env.fam.names), atol=1e-5)

    edited = env.root / "edited"
    r = invoke(["edit", "--base", base, "--store", store, "--add", "task0=0.5", "--out", edited, "--quiet"])
    assert r.exit_code == 0, r.output
    assert (edited / "config.json").read_text() == '{"model_type": "tiny"}'
    assert (edited / "model.safetensors").is_file() and not (edited / "pytorch_model.bin").exists()
    want = flat(env.fam.base_state, env.fam.names) + 0.5 * flat(env.fam.deltas[0], env.fam.names)
    np.testing.assert_allclose(read_flat(edited, env.fam.names), want, atol=1e-5)
    head = load_file(edited / "model.safetensors")
    assert torch.equal(head["position_ids"], env.fam.base_state["position_ids"])


def test_sharded_safetensors_directory_loads(env: Env) -> None:
    sharded = save_hf_sharded(load_file(env.fam.tasks[1].path), env.path("task1_sharded"), n_shards=3)
    tasks = [env.fam.tasks[0], TaskSource("task1", sharded), env.fam.tasks[2]]
    out = env.root / "sharded_store"
    r = invoke([*env.build([], tasks, M=T, out=out).args, "--quiet"])
    assert r.exit_code == 0, r.output
    reference = build_store(env.fam.base, env.tasks, make_method("pca", T), env.root / "ref", exclude=EXCLUDE)
    np.testing.assert_allclose(open_store(out).gram, reference.gram, rtol=1e-12)


def test_nan_in_an_excluded_tensor_is_no_error(env: Env) -> None:
    odd = env.task_with("nan_head.safetensors", lambda s: s["head.weight"].__setitem__((0, 0), math.nan))
    r = invoke([*env.build([], env.with_bad_task(odd)).args, "--quiet"])
    assert r.exit_code == 0, r.output
    assert open_store(env.out).task_names == ["task0", "task1", "bad"]


# -- --overwrite and --ignore-base-mismatch ----------------------------------------------------


def test_overwrite_replaces_an_existing_store(env: Env) -> None:
    first = env.build([], M=1)
    assert invoke([*first.args, "--quiet"]).exit_code == 0
    assert open_store(env.out).n_atoms == 1

    second = env.build([env.out], M=2, flags=["--seed", 3])
    before = tree_digest(env.root)
    assert_refused(invoke(second.args), [env.out, "--overwrite"], env.root, before)

    r = invoke([*second.args, "--overwrite", "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads(invoke(["info", env.out, "--json"]).stdout)
    assert summary["M"] == 2 and summary["settings"]["seed"] == 3
    assert not leftovers(env.root)
    assert sorted(p.name for p in env.out.parent.iterdir()) == [env.out.name]
    assert not (env.out / "keep.txt").exists()

    # Files are replaced too: reconstruct and edit.
    for args in (
        ["reconstruct", env.out, "--task", "task1", "--out", env.out_file],
        ["edit", "--base", env.fam.base, "--store", env.out, "--add", "task1=1", "--out", env.out_file],
    ):
        env.out_file.write_bytes(b"old")
        assert invoke([*args, "--quiet"]).exit_code == 2
        assert env.out_file.read_bytes() == b"old"
        assert invoke([*args, "--overwrite", "--quiet"]).exit_code == 0
        assert open_checkpoint(env.out_file).names()
    assert not leftovers(env.root)


def test_failed_overwrite_keeps_the_old_output(env: Env) -> None:
    assert invoke([*env.build([], M=1).args, "--quiet"]).exit_code == 0
    bad = env.task_with("nan.safetensors", lambda s: s["embed.weight"].__setitem__((3, 3), math.nan))
    before = tree_digest(env.root)
    r = invoke(env.build([], env.with_bad_task(bad), flags=["--overwrite"]).args)
    assert_refused(r, [bad, "'embed.weight'"], env.root, before)
    assert open_store(env.out).n_atoms == 1


def test_ignore_base_mismatch_edits_another_base(env: Env) -> None:
    other = env.base_with("other.safetensors", lambda s: s["layer.1.mlp.weight"].add_(0.25))
    c = env.edit([other, "--ignore-base-mismatch"], base=other, ops=["--add", "task1=1"])
    before = tree_digest(env.root)
    assert_refused(invoke(c.args), c.culprits, env.root, before)

    exact = build_store(env.fam.base, env.tasks, make_method("pca", T), env.root / "exact", exclude=EXCLUDE)
    args = ["edit", "--base", other, "--store", exact.path, "--add", "task1=1", "--out", env.out_file]
    r = invoke([*args, "--ignore-base-mismatch", "--quiet"])
    assert r.exit_code == 0, r.output
    other_state = load_file(other)
    want = flat(other_state, env.fam.names) + flat(env.fam.deltas[1], env.fam.names)
    np.testing.assert_allclose(read_flat(env.out_file, env.fam.names), want, atol=1e-5)
    got = load_file(env.out_file)
    assert torch.equal(got["head.weight"], other_state["head.weight"])  # not a task-vector tensor: copied


# -- how the message is printed ----------------------------------------------------------------


def test_paths_with_brackets_are_named_exactly(env: Env) -> None:
    odd = env.root / "in" / "run[2] :x: [bold]"
    odd.mkdir()
    bad = odd / "task.safetensors"
    bad.write_bytes(env.fam.tasks[0].path.read_bytes()[:-5])
    before = tree_digest(env.root)
    assert_refused(invoke(env.build([], env.with_bad_task(bad)).args), [bad], env.root, before)


@pytest.mark.parametrize("kind", ["build", "edit"])
def test_end_to_end_subprocess(env: Env, kind: str) -> None:
    if kind == "build":
        bad = env.bytes_file("truncated.safetensors", env.fam.tasks[1].path.read_bytes()[:-1])
        c = env.build([bad], env.with_bad_task(bad))
    else:
        other = env.base_with("other.safetensors", lambda s: s["embed.weight"].mul_(2))
        c = env.edit([other, "--ignore-base-mismatch"], base=other)
    before = tree_digest(env.root)
    proc = subprocess.run(
        [sys.executable, "-m", "tvbasis.cli", *map(str, c.args)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for culprit in c.culprits:
        assert str(culprit) in lines[0]
    assert not leftovers(env.root)
    assert tree_digest(env.root) == before
