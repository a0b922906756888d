"""``import-tvb``: run directories of the official Task Vector Bases code become stores.

The run directories are written here in the official layout (``method_info.json``,
``basis_vectors.pt``, ``AWB.pt`` or ``pca_components.pt``) with tiny tensors, so the expected
reconstruction ``sum_k atom_k * W[k, t]`` (+ the PCA mean) is known densely.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from common import tree_digest
from tvbasis.arithmetic import edit_model, reconstruct_task, task_coefficients
from tvbasis.cli import app
from tvbasis.errors import TvbasisError
from tvbasis.interop import UnsafeLoadWarning, import_official_run
from tvbasis.store import open_store
from tvbasis.store.format import ATOMS_DIR

# tiny matrices: BLAS threads only add wake-up latency
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES: dict[str, tuple[int, ...]] = {
    "model.visual.conv1.weight": (3, 1, 2, 2),
    "model.visual.proj": (5, 3),
    "model.visual.ln_post.bias": (3,),
    "model.logit_scale": (),
}
TASKS = ["Cars", "DTD", "EuroSAT", "GTSRB"]
M = 2
runner = CliRunner()


@dataclass
class Run:
    """A fake run directory and what it encodes."""

    path: Path
    tasks: list[str]
    vectors: list[dict[str, torch.Tensor]]  # the task vectors the run was built from
    basis: list[dict[str, torch.Tensor]]
    decoder: np.ndarray  # (M, T)
    mean: dict[str, torch.Tensor] | None = None
    A: np.ndarray | None = None
    B: np.ndarray | None = None

    def expected(self, t: int) -> dict[str, torch.Tensor]:
        """Task t as the official recovery computes it."""
        out = {}
        for name in SHAPES:
            acc = torch.zeros(SHAPES[name], dtype=torch.float64)
            if self.mean is not None:
                acc += self.mean[name].double()
            for m, vec in enumerate(self.basis):
                acc += float(self.decoder[m, t]) * vec[name].double()
            out[name] = acc
        return out


def task_vectors(T: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(T)]


def flatten(vec: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([vec[k].reshape(-1) for k in SHAPES])


def unflatten(x: torch.Tensor) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for k, s in SHAPES.items():
        n = int(np.prod(s))
        out[k] = x[offset : offset + n].reshape(s).clone()
        offset += n
    return out


def write_ae_run(root: Path, seed: int = 0, legacy: bool = False) -> Run:
    """An AutoencoderBasisMethod run: A, W, B in AWB.pt; B = softmax(A / tau_final) over tasks."""
    root.mkdir(parents=True)
    T = len(TASKS)
    V = task_vectors(T, seed)
    g = torch.Generator().manual_seed(seed + 1)
    A = torch.randn(T, M, generator=g)
    W = torch.randn(M, T, generator=g)
    tau_final = 5.0 * 0.5**3  # tau_init 5, halved every 3 of 10 steps
    B = torch.softmax(A / tau_final, dim=0)
    basis = [{k: sum(float(B[t, m]) * V[t][k] for t in range(T)) for k in SHAPES} for m in range(M)]
    meta = {
        "model": "ViT-B-32",
        "finetuning_mode": "standard",
        "datasets": TASKS,
        "M": M,
        "steps": 10,
        "lr": 0.01,
        "tau_init": 5.0,
        "anneal_every": 3,
        "anneal_factor": 0.5,
        "weight_decay": 1e-6,
        "grad_clip": None,
        "batch_cols": None,
        "device": "cuda",
        "seed": 0,
        "softmax_w": False,
        "encoder": "softmax",
        "w_activation": "linear",
        "gram_dtype": "float32",
        "notes": None,
        "task_scenario": None,
        "timestamp": "2025-01-01 00:00:00",
        "method": "AutoencoderBasisMethod",
    }
    extra = {"_use_new_zipfile_serialization": False} if legacy else {}
    torch.save(
        {"basis_vectors": basis, "num_basis": M, "method": "AutoencoderBasisMethod"}, root / "basis_vectors.pt", **extra
    )
    torch.save({"A": A, "W": W, "B": B, "metadata": meta}, root / "AWB.pt", **extra)
    (root / "method_info.json").write_text(json.dumps(meta, indent=2))
    return Run(root, TASKS, V, basis, W.double().numpy(), A=A.double().numpy(), B=B.double().numpy())


def write_pca_run(root: Path, seed: int = 0, storage_info: Any = None) -> Run:
    """A PCABasisMethod run: variance-scaled components, coefficients Vh, the mean (D,) flat."""
    root.mkdir(parents=True)
    T = len(TASKS)
    V = task_vectors(T, seed)
    X = torch.stack([flatten(v) for v in V], dim=1)  # (D, T)
    mean = X.mean(dim=1)
    U, S, Vh = torch.linalg.svd(X - mean[:, None], full_matrices=False)
    basis = [unflatten(U[:, m] * S[m]) for m in range(M)]
    info = {
        "method": "PCABasisMethod",
        "M": M,
        "seed": 0,
        "datasets": TASKS,
        "timestamp": "2025-01-01 00:00:00",
        "finetuning_mode": "standard",
        "task_scenario": None,
        "anneal_tau": None,
    }
    torch.save({"basis_vectors": basis, "num_basis": M, "method": "PCABasisMethod"}, root / "basis_vectors.pt")
    torch.save(
        {
            "coefficients": Vh[:M].clone(),
            "mean_vector": mean,
            "singular_values": S[:M].clone(),
            "M_actual": M,
            "total_dim": X.shape[0],
            "keys_order": list(SHAPES),
            "param_shapes": {k: torch.Size(s) for k, s in SHAPES.items()},
            "dataset_names": TASKS,
            "storage_info": storage_info if storage_info is not None else {"compact_size_mb": 0.0},
        },
        root / "pca_components.pt",
    )
    (root / "method_info.json").write_text(json.dumps(info, indent=2))
    return Run(root, TASKS, V, basis, Vh[:M].double().numpy(), mean=unflatten(mean))


def reconstructed(store_path: Path, task: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / f"rec-{task}.safetensors"
    reconstruct_task(open_store(store_path), task, out)
    return load_file(str(out))


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for k in want:
        assert tuple(got[k].shape) == tuple(want[k].shape), k
        torch.testing.assert_close(got[k].double(), want[k].double(), atol=atol, rtol=1e-5)


# -- good input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_autoencoder_run(tmp_path: Path, legacy: bool) -> None:
    run = write_ae_run(tmp_path / "run", legacy=legacy)
    store = import_official_run(run.path, tmp_path / "store")

    m = store.manifest
    assert m["method"]["name"] == "autoencoder"
    assert (store.n_atoms, store.n_tasks, store.has_mean) == (M, len(TASKS), False)
    assert store.task_names == TASKS
    np.testing.assert_array_equal(store.decoder, run.decoder)
    np.testing.assert_array_equal(store.matrices["state.A"], run.A)
    np.testing.assert_array_equal(store.matrices["state.encoder"], run.B)
    params = m["method"]["params"]
    assert (params["n_atoms"], params["steps"], params["temperature"]) == (M, 10, 5.0)
    assert (params["anneal_every"], params["anneal_factor"], params["linear"]) == (3, 0.5, False)
    # the final temperature, which the official code does not save, recovered from the schedule
    assert store.method.final_temperature_ == pytest.approx(0.625)
    assert m["imported"]["method"] == "AutoencoderBasisMethod"

    for t, name in enumerate(TASKS):
        assert_close(reconstructed(store.path, name, tmp_path), run.expected(t))
    # S^T S is measured on the atoms as written; what needs the task vectors is NaN
    S = torch.stack([flatten(b).double() for b in run.basis], dim=1)
    np.testing.assert_allclose(store.matrices["atom_gram"], (S.T @ S).numpy(), rtol=1e-6)
    assert np.isnan(store.gram).all() and np.isnan(store.matrices["atom_cross"]).all()
    assert all(t["rel_error"] is None and t["norm"] is None for t in m["tasks"])
    assert m["base"]["known"] is False


def test_pca_run_keeps_and_counts_the_mean(tmp_path: Path) -> None:
    run = write_pca_run(tmp_path / "run")
    store = import_official_run(run.path, tmp_path / "store")

    assert store.manifest["method"]["name"] == "pca"
    assert store.manifest["method"]["params"]["center"] is True
    assert (store.n_atoms, store.has_mean, store.manifest["n_vectors"]) == (M, True, M + 1)
    assert store.task_names == TASKS
    np.testing.assert_allclose(store.decoder[:M], run.decoder)
    np.testing.assert_array_equal(store.decoder[M], np.ones(len(TASKS)))

    mean_file = store.path / ATOMS_DIR / "mean.safetensors"
    assert mean_file.is_file()
    atom_files = sorted((store.path / ATOMS_DIR).iterdir())
    assert len(atom_files) == M + 1
    assert store.manifest["bytes"]["atoms"] == sum(f.stat().st_size for f in atom_files)
    assert store.manifest["files"][f"{ATOMS_DIR}/mean.safetensors"] == mean_file.stat().st_size

    for t, name in enumerate(TASKS):
        assert_close(reconstructed(store.path, name, tmp_path), run.expected(t), atol=1e-5)
    # the stored encoder is the one the official PCA used: atoms (and the mean) = V @ encoder
    V = torch.stack([flatten(v).double() for v in run.vectors], dim=1).numpy()
    stored = np.stack([flatten(b).double().numpy() for b in [*run.basis, run.mean]], axis=1)  # type: ignore[list-item]
    np.testing.assert_allclose(V @ store.matrices["state.encoder"], stored, atol=1e-5)
    eig = store.matrices["state.eigenvalues"]
    assert np.isfinite(eig[:M]).all() and np.isnan(eig[M:]).all()


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_store_dtypes(tmp_path: Path, dtype: str) -> None:
    run = write_pca_run(tmp_path / "run")
    store = import_official_run(run.path, tmp_path / "store", dtype=dtype)
    assert store.manifest["atoms"]["dtype"] == dtype
    for t, name in enumerate(TASKS):
        assert_close(reconstructed(store.path, name, tmp_path), run.expected(t), atol=0.05)


def test_edit_requires_ignore_base_mismatch(tmp_path: Path) -> None:
    run = write_ae_run(tmp_path / "run")
    store = import_official_run(run.path, tmp_path / "store")
    g = torch.Generator().manual_seed(7)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    a = np.zeros(len(TASKS))
    a[1] = -1.0  # negate DTD
    coefs = task_coefficients(store.decoder, a)

    with pytest.raises(TvbasisError, match="--ignore-base-mismatch") as err:
        edit_model(tmp_path / "base.safetensors", store, coefs, tmp_path / "edited.safetensors")
    assert "records no base" in str(err.value)
    assert not (tmp_path / "edited.safetensors").exists()

    extra = {**base, "extra.weight": torch.zeros(2)}  # a layout mismatch too: still the clear message
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(TvbasisError, match="records no base"):
        edit_model(tmp_path / "extra.safetensors", store, coefs, tmp_path / "edited.safetensors")

    edit_model(tmp_path / "base.safetensors", store, coefs, tmp_path / "edited.safetensors", ignore_base_mismatch=True)
    edited = load_file(str(tmp_path / "edited.safetensors"))
    want = run.expected(1)
    assert_close(edited, {k: base[k].double() - want[k] for k in SHAPES}, atol=1e-5)

    from tvbasis.tasks import TaskSource
    from tvbasis.update import add_task

    with pytest.raises(TvbasisError, match="imported"):
        add_task(store, TaskSource("new", tmp_path / "base.safetensors"), base=tmp_path / "base.safetensors")


def test_trust_pickle_loads_with_a_warning(tmp_path: Path) -> None:
    run = write_pca_run(tmp_path / "run", storage_info=Opaque(1.5))
    with pytest.warns(UnsafeLoadWarning, match="pca_components.pt"):
        store = import_official_run(run.path, tmp_path / "store", trust_pickle=True)
    assert store.task_names == TASKS


def test_cli_import_then_info(tmp_path: Path) -> None:
    run = write_ae_run(tmp_path / "run")
    result = runner.invoke(app, ["import-tvb", str(run.path), "--out", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    assert "autoencoder basis, M = 2 of T = 4" in " ".join(result.output.split())  # rich wraps lines
    info = runner.invoke(app, ["info", str(tmp_path / "store")])
    assert info.exit_code == 0, info.output
    assert "DTD" in info.output
    again = runner.invoke(app, ["import-tvb", str(run.path), "--out", str(tmp_path / "store")])
    assert again.exit_code == 2 and "--overwrite" in again.output, again.output
    again = runner.invoke(app, ["import-tvb", str(run.path), "--out", str(tmp_path / "store"), "--overwrite"])
    assert again.exit_code == 0, again.output


def test_cli_trust_pickle_prints_a_warning(tmp_path: Path) -> None:
    run = write_pca_run(tmp_path / "run", storage_info=Opaque(1.5))
    args = ["import-tvb", str(run.path), "--out", str(tmp_path / "store"), "--trust-pickle", "--dtype", "bf16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "pca_components.pt" in warning[0], result.output
    assert open_store(tmp_path / "store").manifest["atoms"]["dtype"] == "bf16"


# -- bad input ----------------------------------------------------------------------------------


@dataclass
class Opaque:
    """Not a tensor: unpickling it needs this module's code."""

    value: float


def nothing_written(tmp_path: Path, before: dict[str, str]) -> None:
    assert tree_digest(tmp_path) == before
    assert not (tmp_path / "store").exists()


Spoil = Callable[[Run], None]


def drop(name: str) -> Spoil:
    return lambda run: (run.path / name).unlink()


def edit_info(**changes: Any) -> Spoil:
    def spoil(run: Run) -> None:
        path = run.path / "method_info.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return spoil


def edit_pt(name: str, key: str, value: Any) -> Spoil:
    def spoil(run: Run) -> None:
        path = run.path / name
        data = torch.load(path, weights_only=True)
        data[key] = value
        torch.save(data, path)

    return spoil


def reshape_tensor(run: Run) -> None:
    path = run.path / "basis_vectors.pt"
    data = torch.load(path, weights_only=True)
    data["basis_vectors"][1]["model.visual.proj"] = torch.zeros(3, 5)
    torch.save(data, path)


BAD: dict[str, tuple[Callable[[Path], Run], Spoil, Sequence[str]]] = {
    "pickle-without-trust": (
        lambda p: write_pca_run(p, storage_info=Opaque(1.5)),
        lambda run: None,
        ["pca_components.pt", "--trust-pickle", "Opaque"],
    ),
    "missing-awb": (write_ae_run, drop("AWB.pt"), ["AWB.pt", "missing"]),
    "missing-basis": (write_pca_run, drop("basis_vectors.pt"), ["basis_vectors.pt", "missing"]),
    "missing-info": (write_ae_run, drop("method_info.json"), ["method_info.json", "missing"]),
    "info-M": (write_ae_run, edit_info(M=3), ["basis_vectors.pt", "'M'", "method_info.json"]),
    "awb-M": (write_ae_run, edit_pt("AWB.pt", "A", torch.zeros(4, 3)), ["AWB.pt", "'A'", "[4, 3]", "expected [4, 2]"]),
    "task-count": (write_ae_run, edit_info(datasets=TASKS[:3]), ["AWB.pt", "'A'", "T = 3 tasks"]),
    "pca-task-count": (write_pca_run, edit_info(datasets=[*TASKS, "SUN397"]), ["pca_components.pt", "'coefficients'"]),
    "shapes": (write_ae_run, reshape_tensor, ["basis_vectors.pt", "model.visual.proj", "basis vector 1"]),
    "pca-mean": (write_pca_run, edit_pt("pca_components.pt", "mean_vector", torch.zeros(5)), ["'mean_vector'"]),
    "method": (write_ae_run, edit_info(method="RandomBasisMethod"), ["method_info.json", "RandomBasisMethod"]),
    "not-json": (write_ae_run, lambda run: (run.path / "method_info.json").write_text("{"), ["method_info.json"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_run_directory(tmp_path: Path, case: str) -> None:
    write, spoil, culprits = BAD[case]
    run = write(tmp_path / "run")
    spoil(run)
    before = tree_digest(tmp_path)
    with pytest.raises(TvbasisError) as err:
        import_official_run(run.path, tmp_path / "store")
    for c in culprits:
        assert c in str(err.value), (c, str(err.value))
    nothing_written(tmp_path, before)


def test_cli_refusal_is_one_line_exit_2(tmp_path: Path) -> None:
    run = write_pca_run(tmp_path / "run", storage_info=Opaque(1.5))
    before = tree_digest(tmp_path)
    result = runner.invoke(app, ["import-tvb", str(run.path), "--out", str(tmp_path / "store")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--trust-pickle" in lines[0], result.output
    nothing_written(tmp_path, before)
