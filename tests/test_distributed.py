"""The Dask engine gives the same store as the local engine, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import tree_digest, write_family
from tvbasis.build import build_store
from tvbasis.codes import parse_code
from tvbasis.engine.streaming import LocalEngine
from tvbasis.errors import TvbasisError
from tvbasis.methods import make_method
from tvbasis.store.residuals import CodePlan, TensorCode

distributed = pytest.importorskip("distributed", reason="the dask engine needs the 'distributed' extra")
from tvbasis.engine.distributed import DaskEngine  # noqa: E402

EXCLUDE = ["head.*"]
PARTITION = 40  # entries per task: several partitions even in the tiny test model


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    return write_family(tmp_path_factory.mktemp("fam"), T=5, rank=2)


@pytest.fixture(scope="module")
def dask_engine():
    with DaskEngine(n_workers=2, partition_elements=PARTITION) as engine:
        assert engine.n_workers == 2
        yield engine


def _same_store(a: Path, b: Path) -> None:
    da, db = tree_digest(a), tree_digest(b)
    # everything but the manifest's creation time and the model card is identical, bit for bit
    for f in da:
        if f not in ("tvbasis.json", "README.md"):
            assert da[f] == db[f], f
    assert set(da) == set(db)


@pytest.mark.parametrize(
    "method,kw,dtype,tensor_stats",
    [
        ("pca", {}, "fp32", False),
        ("autoencoder", {"steps": 200}, "fp32", False),
        ("pca", {"center": True}, "int8", False),
        ("cluster", {}, "bf16", False),
        ("pca", {}, "fp32", True),  # per-tensor Gram matrices too (tensor_gram.safetensors)
        ("cluster", {}, "bf16", True),
    ],
)
def test_dask_engine_builds_the_same_store(
    family, dask_engine, tmp_path: Path, method, kw, dtype, tensor_stats
) -> None:
    local = build_store(
        family.base,
        family.tasks,
        make_method(method, 2, **kw),
        tmp_path / "local",
        exclude=EXCLUDE,
        dtype=dtype,
        chunk_elements=7,
        engine=LocalEngine(PARTITION),
        tensor_stats=tensor_stats,
    )
    remote = build_store(
        family.base,
        family.tasks,
        make_method(method, 2, **kw),
        tmp_path / "dask",
        exclude=EXCLUDE,
        dtype=dtype,
        chunk_elements=7,
        engine=dask_engine,
        tensor_stats=tensor_stats,
    )
    _same_store(local.path, remote.path)
    assert (local.path / "tensor_gram.safetensors").is_file() == tensor_stats
    ml, mr = dict(local.manifest), dict(remote.manifest)
    for m in (ml, mr):
        m.pop("created")
        m.pop("files")
    assert ml == mr


@pytest.mark.parametrize(
    "n_atoms,code",
    [
        (2, TensorCode(True, parse_code("keep:0.5:int4:seed=3"))),  # global basis + random-keep residuals
        (0, TensorCode(False, parse_code("int4"), tensor_atoms=2)),  # per-tensor bases + int4 residuals
        (0, TensorCode(False, parse_code("rows:keep:0.5:int4:seed=1"))),  # sized by the engine's row counts
    ],
)
def test_dask_engine_builds_the_same_coded_store(family, dask_engine, tmp_path: Path, n_atoms, code) -> None:
    """Coded residuals and per-tensor atoms (their Gram matrices come from the engine's pass) match too."""
    stores = [
        build_store(
            family.base,
            family.tasks,
            make_method("pca", n_atoms),
            tmp_path / name,
            exclude=EXCLUDE,
            chunk_elements=7,
            engine=engine,
            codes=CodePlan(default=code),
        )
        for name, engine in (("local", LocalEngine(PARTITION)), ("dask", dask_engine))
    ]
    _same_store(stores[0].path, stores[1].path)
    assert stores[0].manifest["residuals"] == stores[1].manifest["residuals"]


def test_worker_errors_reach_the_caller(family, dask_engine, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in family.base_state.items()}
    state["layer.1.mlp.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    from tvbasis.tasks import TaskSource

    with pytest.raises(TvbasisError, match=r"NaN or Inf.*'bad'"):
        build_store(
            family.base,
            [*family.tasks[:2], TaskSource("bad", bad)],
            make_method("pca", 1),
            tmp_path / "s",
            exclude=EXCLUDE,
            engine=dask_engine,
        )
    assert not (tmp_path / "s").exists() and torch.isnan(state["layer.1.mlp.weight"][0, 0])


def test_unreachable_scheduler_is_a_clear_error() -> None:
    with pytest.raises(TvbasisError, match="cannot connect"):
        DaskEngine(scheduler="tcp://127.0.0.1:1", trust_scheduler=True)


def test_an_external_scheduler_needs_an_explicit_trust_flag(family, tmp_path: Path) -> None:
    """Dask unpickles what its workers send: no connection is even tried without the opt-in."""
    from typer.testing import CliRunner

    from tvbasis.cli import app

    with pytest.raises(TvbasisError, match="--trust-scheduler"):
        DaskEngine(scheduler="tcp://127.0.0.1:1")
    args = ["build", "--base", str(family.base), "--method", "pca", "-M", "2", "--exclude", "head.*"]
    args += ["--task", f"task0={family.tasks[0].path}", "--out", str(tmp_path / "x")]
    r = CliRunner().invoke(app, [*args, "--engine", "dask", "--scheduler", "tcp://127.0.0.1:1"])
    assert r.exit_code == 2 and "--trust-scheduler" in r.output and "cannot connect" not in r.output
    assert not (tmp_path / "x").exists()


def test_methods_that_observe_the_data_are_refused(family, dask_engine, tmp_path: Path) -> None:
    with pytest.raises(TvbasisError, match="local engine"):
        build_store(
            family.base, family.tasks, make_method("random", 2), tmp_path / "r", exclude=EXCLUDE, engine=dask_engine
        )
    assert not (tmp_path / "r").exists()


def test_cli_build_with_the_dask_engine(family, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tvbasis.cli import app

    args = ["build", "--base", str(family.base), "--method", "pca", "-M", "2", "--exclude", "head.*", "--quiet"]
    for t in family.tasks:
        args += ["--task", f"{t.name}={t.path}"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "d"), "--engine", "dask", "--workers", "2"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "l")])
    assert r.exit_code == 0, r.output
    _same_store(tmp_path / "d", tmp_path / "l")
    r = CliRunner().invoke(
        app,
        [
            *args,
            "--out",
            str(tmp_path / "x"),
            "--engine",
            "dask",
            "--scheduler",
            "tcp://127.0.0.1:1",
            "--trust-scheduler",
        ],
    )
    assert r.exit_code == 2 and "cannot connect" in r.output and not (tmp_path / "x").exists()


def test_inputs_given_as_urls_build_the_same_store(family, dask_engine, tmp_path: Path) -> None:
    """fsspec URLs: an in-memory file system read by this process, file:// URLs read by the workers."""
    import fsspec

    from tvbasis.tasks import TaskSource

    mem = fsspec.filesystem("memory")
    for src in [family.base, *(t.path for t in family.tasks)]:
        mem.pipe(f"/fam-{tmp_path.name}/{src.name}", src.read_bytes())
    url = f"memory:///fam-{tmp_path.name}"
    tasks = [TaskSource(t.name, f"{url}/{t.path.name}") for t in family.tasks]
    local = build_store(family.base, family.tasks, make_method("pca", 2), tmp_path / "l", exclude=EXCLUDE)
    remote = build_store(f"{url}/{family.base.name}", tasks, make_method("pca", 2), tmp_path / "m", exclude=EXCLUDE)
    _same_store(local.path, remote.path)
    assert remote.manifest["tasks"][0]["source"].startswith("memory://")

    file_tasks = [TaskSource(t.name, f"file://{t.path}") for t in family.tasks]
    on_workers = build_store(
        f"file://{family.base}",
        file_tasks,
        make_method("pca", 2),
        tmp_path / "w",
        exclude=EXCLUDE,
        engine=dask_engine,
    )
    local_parts = build_store(
        family.base,
        family.tasks,
        make_method("pca", 2),
        tmp_path / "lp",
        exclude=EXCLUDE,
        engine=LocalEngine(PARTITION),
    )
    _same_store(local_parts.path, on_workers.path)


def test_url_inputs_that_cannot_be_read_are_clear_errors(tmp_path: Path) -> None:
    import fsspec

    from tvbasis.io import open_checkpoint

    mem = fsspec.filesystem("memory")
    mem.pipe(f"/bad-{tmp_path.name}/model.pt", b"not a pickle")
    with pytest.raises(TvbasisError, match="local paths only"):
        open_checkpoint(f"memory:///bad-{tmp_path.name}/model.pt")
    with pytest.raises(TvbasisError, match="no such file"):
        open_checkpoint(f"memory:///bad-{tmp_path.name}/missing.safetensors")
    mem.pipe(f"/bad-{tmp_path.name}/cut.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(TvbasisError, match=r"cut\.safetensors"):
        open_checkpoint(f"memory:///bad-{tmp_path.name}/cut.safetensors")
