"""Import a run directory of the official Task Vector Bases implementation as a tvbasis store.

The layout below was read from the official code, github.com/uiuctml/TaskVectorBasis
(``src/basis_vectors.py``: ``BasisMethod.save_training_artifacts``,
``AutoencoderBasisMethod._save_awb_snapshot``, ``PCABasisMethod.save_training_artifacts``;
``scripts/load_basis.py``), and from the model card of its Hugging Face release,
``cindy2000sh/TaskVectorBasis-checkpoints``, whose folders (``{model}_{AE|PCA}_M{M}_{T}task``)
each hold one run::

    method_info.json   {"method": "AutoencoderBasisMethod" | "PCABasisMethod", "M", "seed",
                        "datasets": [task names in order], hyperparameters ...}
    basis_vectors.pt   {"basis_vectors": [M dicts tensor name -> tensor], "num_basis": M,
                        "method": the same class name}
    AWB.pt             autoencoder: {"A": T x M, "W": M x T, "B": T x M, "metadata": {...}}
                       (B = softmax(A / tau_final) over the tasks, or A / tau_final for the
                       linear encoder; W as the build applied it, i.e. after its optional softmax;
                       metadata: steps, lr, tau_init, anneal_every, anneal_factor, weight_decay,
                       encoder, w_activation, seed, datasets, M ...; tau_final is not saved)
    pca_components.pt  PCA: {"coefficients": M x T, "mean_vector": (D,) flat in keys_order,
                       "singular_values": (M,), "M_actual", "total_dim", "keys_order",
                       "param_shapes", "dataset_names", "storage_info"}

Task t of the autoencoder is ``sum_m basis_m * W[m, t]``; of PCA, ``mean + sum_m basis_m *
coefficients[m, t]`` (basis_m = U[:, m] * sigma_m of the centred task vectors). Both become a
store's atoms and decoder; the PCA mean is stored as ``atoms/mean.safetensors`` and counted.

A run directory holds neither the task vectors nor the base, so the imported store lacks
what only they can give: the Gram matrix ``G`` and ``S^T V`` (stored as NaN), the tasks' norms,
relative errors and cosines (null in the manifest), content hashes, and the base fingerprint. ``S^T S`` is
measured on the atoms as written. ``edit`` therefore refuses the store unless given
``--ignore-base-mismatch``, and ``refit`` needs the original fine-tunes.

``.pt`` files are read with ``torch.load(weights_only=True)``; a file that would need code
execution (a pickle of other objects) is refused unless ``trust_pickle`` is set.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.build import DEFAULT_MAX_SHARD_BYTES, finalise_store, manifest_header
from tvbasis.engine.streaming import DEFAULT_CHUNK_ELEMENTS
from tvbasis.errors import TvbasisError
from tvbasis.io.checkpoint import TensorInfo
from tvbasis.io.outputs import atomic_output, check_output_path
from tvbasis.methods import PCA, Autoencoder, BasisMethod
from tvbasis.store.atoms import AtomWriter
from tvbasis.store.format import (
    ATOMS_DIR,
    MATRICES,
    Store,
    open_store,
    save_matrices,
    vector_names,
)
from tvbasis.store.quantize import check_scale_names, check_store_dtype
from tvbasis.tasks.taskvectors import check_task_name, plan_chunks

INFO_FILE = "method_info.json"
BASIS_FILE = "basis_vectors.pt"
AWB_FILE = "AWB.pt"
PCA_FILE = "pca_components.pt"

#: The official class names this importer understands, and the tvbasis method each becomes.
OFFICIAL_METHODS = {"AutoencoderBasisMethod": "autoencoder", "PCABasisMethod": "pca"}
#: The official annealing schedule's fixed temperature floor.
OFFICIAL_MIN_TEMPERATURE = 0.1

#: Recorded where a built store names its inputs; none of these paths exists, so ``refit``
#: and ``add-task`` report them missing instead of reading something else.
UNKNOWN_BASE = "unknown (a Task Vector Bases run records no base)"
UNKNOWN_TASK_SOURCE = "unknown (a Task Vector Bases run holds no task vectors)"
#: In place of the content-hash algorithm: ``edit`` shows it when it refuses the store.
NO_CONTENT_HASH = "none (the store was imported from a Task Vector Bases run, which records no base)"

Layout = list[tuple[str, tuple[int, ...], torch.dtype]]


class UnsafeLoadWarning(UserWarning):
    """A file of the run directory is being unpickled with code execution allowed (``trust_pickle``)."""


@dataclass
class OfficialRun:
    """A run directory, read and checked: the K vectors to store and the fitted method."""

    official_method: str
    info: dict[str, Any]
    tasks: list[str]
    layout: Layout
    vectors: list[Mapping[str, torch.Tensor]]  # the M basis vectors (+ the PCA mean)
    labels: list[str]  # where each vector comes from, for error messages
    method: BasisMethod  # decoder_, encoder_ and state set; has_mean_ for PCA
    report: dict[str, Any]
    files: list[str]
    notes: list[str] = field(default_factory=list)


# -- reading --------------------------------------------------------------------------------
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_torch_file(path: Path, trust_pickle: bool = False) -> Any:
    """``torch.load`` on the CPU, tensors only unless ``trust_pickle`` (then with a warning)."""
    mmap = zipfile.is_zipfile(path)  # only the zip format maps; atoms are then read as written
    what = "objects other than tensors"
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found is None and "Unsupported global" not in str(exc):
            raise TvbasisError(f"{path}: not a readable torch file ({_first_line(exc)})") from None
        if found is not None:
            what = found.group(1)
        if not trust_pickle:
            raise TvbasisError(
                f"{path}: loading it would run code (it pickles {what}), so it was not loaded; "
                f"pass --trust-pickle if you trust its source"
            ) from None
    except Exception as exc:
        raise TvbasisError(f"{path}: not a readable torch file ({_first_line(exc)})") from None
    warnings.warn(
        f"{path}: unpickling {what} with code execution allowed (--trust-pickle)", UnsafeLoadWarning, stacklevel=2
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:
        raise TvbasisError(f"{path}: cannot unpickle ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _require(run_dir: Path, name: str, why: str) -> Path:
    path = run_dir / name
    if not path.is_file():
        raise TvbasisError(f"{path}: missing ({why})")
    return path


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TvbasisError(f"{path}: unreadable JSON ({_first_line(exc)})") from None
    if not isinstance(info, dict):
        raise TvbasisError(f"{path}: expected a JSON object, found {type(info).__name__}")
    return info


def _field(data: Mapping[str, Any], key: str, path: Path, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in data:
        raise TvbasisError(f"{path}: field {key!r} is missing")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TvbasisError(f"{path}: field {key!r} is {value!r}, expected {what}")
    return value


def _task_names(info: Mapping[str, Any], path: Path) -> list[str]:
    names = _field(info, "datasets", path, list, "a list of task names")
    if not names or not all(isinstance(n, str) for n in names):
        raise TvbasisError(f"{path}: field 'datasets' must be a non-empty list of task names")
    for n in names:
        try:
            check_task_name(n)
        except TvbasisError as exc:
            raise TvbasisError(f"{path}: field 'datasets': {exc}") from None
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TvbasisError(f"{path}: field 'datasets' names task {dup[0]!r} twice")
    return list(names)


def _array(data: Mapping[str, Any], key: str, path: Path, shape: tuple[int, ...], meaning: str) -> np.ndarray:
    """A tensor field as float64, of exactly ``shape``, finite."""
    value = data[key] if key in data else None
    if isinstance(value, torch.Tensor):
        arr = value.detach().to(torch.float64).numpy()
    elif isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.number):
        arr = value.astype(np.float64)
    elif key not in data:
        raise TvbasisError(f"{path}: field {key!r} is missing")
    else:
        raise TvbasisError(f"{path}: field {key!r} is {type(value).__name__}, expected a tensor")
    if arr.shape != shape:
        raise TvbasisError(f"{path}: field {key!r} has shape {list(arr.shape)}, expected {list(shape)} ({meaning})")
    if not np.isfinite(arr).all():
        raise TvbasisError(f"{path}: field {key!r} has non-finite values")
    return arr


def _read_basis(path: Path, data: Any, official: str) -> tuple[list[Mapping[str, torch.Tensor]], Layout]:
    """The basis vectors (state dicts with the same tensor names and shapes) and their layout."""
    vectors: Any = data
    if isinstance(data, Mapping):
        vectors = _field(data, "basis_vectors", path, (list, tuple), "a list of state dicts")
        recorded = data.get("method")
        if recorded is not None and recorded != official:
            raise TvbasisError(f"{path}: field 'method' is {recorded!r}, {INFO_FILE} says {official!r}")
        num = data.get("num_basis")
        if num is not None and num != len(vectors):
            raise TvbasisError(f"{path}: field 'num_basis' is {num}, but 'basis_vectors' holds {len(vectors)} vectors")
    elif not isinstance(data, (list, tuple)):
        raise TvbasisError(f"{path}: expected a dict with field 'basis_vectors', found {type(data).__name__}")
    if not vectors:
        raise TvbasisError(f"{path}: field 'basis_vectors' is empty")
    layout: Layout = []
    for m, vec in enumerate(vectors):
        if not isinstance(vec, Mapping) or not vec:
            raise TvbasisError(f"{path}: basis vector {m} is not a non-empty dict of tensor name -> tensor")
        for name, t in vec.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise TvbasisError(f"{path}: basis vector {m} has entry {name!r} that is not a named tensor")
            if not t.dtype.is_floating_point:
                raise TvbasisError(f"{path}: tensor {name!r} of basis vector {m} is {t.dtype}, not floating point")
        if m == 0:
            layout = [(name, tuple(t.shape), t.dtype) for name, t in vec.items()]
            continue
        missing = [name for name, _, _ in layout if name not in vec]
        if missing:
            raise TvbasisError(f"{path}: basis vector {m} lacks tensor {missing[0]!r} that basis vector 0 has")
        extra = [name for name in vec if name not in vectors[0]]
        if extra:
            raise TvbasisError(f"{path}: basis vector {m} has tensor {extra[0]!r} that basis vector 0 has not")
        for name, shape, _ in layout:
            if tuple(vec[name].shape) != shape:
                raise TvbasisError(
                    f"{path}: tensor {name!r} of basis vector {m} has shape {list(vec[name].shape)}, "
                    f"basis vector 0's has {list(shape)}"
                )
    return list(vectors), layout


def _setting(settings: Mapping[str, Any], keys: tuple[str, ...], kind: type, default: Any, where: str) -> Any:
    """The first of ``keys`` present and not null in ``settings``, as ``kind``; else ``default``."""
    for key in keys:
        value = settings.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, (int, float, str, bool)):
            raise TvbasisError(f"{where}: field {key!r} is {value!r}, expected a {kind.__name__}")
        try:
            return kind(value)
        except ValueError:
            raise TvbasisError(f"{where}: field {key!r} is {value!r}, expected a {kind.__name__}") from None
    return default


def _read_autoencoder(
    path: Path, data: Any, info: dict[str, Any], info_path: Path, tasks: list[str], M: int
) -> tuple[Autoencoder, dict[str, Any], list[str]]:
    T = len(tasks)
    if not isinstance(data, Mapping):
        raise TvbasisError(f"{path}: expected a dict with fields 'A', 'W', 'B', found {type(data).__name__}")
    dims = f"T = {T} tasks in {INFO_FILE}, M = {M} basis vectors in {BASIS_FILE}"
    A = _array(data, "A", path, (T, M), f"T x M: {dims}")
    W = _array(data, "W", path, (M, T), f"M x T: {dims}")
    B = _array(data, "B", path, (T, M), f"T x M: {dims}")
    meta = data.get("metadata") or {}
    if not isinstance(meta, Mapping):
        raise TvbasisError(f"{path}: field 'metadata' is {type(meta).__name__}, expected a dict")
    if "M" in meta and meta["M"] != M:
        raise TvbasisError(f"{path}: metadata field 'M' is {meta['M']!r}, {BASIS_FILE} holds {M} basis vectors")
    if "datasets" in meta and list(meta["datasets"]) != tasks:
        raise TvbasisError(f"{path}: metadata field 'datasets' differs from field 'datasets' of {INFO_FILE}")

    settings = {**info, **meta}  # AWB.pt's metadata is the complete record; method_info.json a copy
    where = f"{path} (metadata) or {info_path}"
    anneal = settings.get("anneal_tau")
    anneal_every, anneal_factor = anneal if isinstance(anneal, (list, tuple)) and len(anneal) == 2 else (None, None)
    every = _setting(settings, ("anneal_every",), int, None, where)
    factor = _setting(settings, ("anneal_factor",), float, None, where)
    params: dict[str, Any] = {
        "steps": _setting(settings, ("steps",), int, 6000, where),
        "lr": _setting(settings, ("lr",), float, 1e-2, where),
        "temperature": _setting(settings, ("tau_init", "tau"), float, 5.0, where),
        "weight_decay": _setting(settings, ("weight_decay",), float, 1e-6, where),
        "anneal_every": every if every is not None else int(anneal_every or 0),
        "anneal_factor": factor if factor is not None else float(anneal_factor or 1.0),
        "min_temperature": OFFICIAL_MIN_TEMPERATURE,
        "linear": _setting(settings, ("encoder",), str, "softmax", where) == "linear",
        "seed": _setting(settings, ("seed",), int, 0, where),
    }
    if params["anneal_every"] <= 0:
        params["anneal_every"], params["anneal_factor"] = 0, 1.0
    try:
        method = Autoencoder(M, **params)
    except TvbasisError as exc:
        raise TvbasisError(f"{where}: a setting is out of range: {exc}") from None

    notes: list[str] = []
    # tau_final is not saved; the schedule is deterministic, so recompute it and check it against B.
    tau = method.temperature
    if method.anneal_every > 0:
        for _ in range(method.steps // method.anneal_every):
            tau = max(tau * method.anneal_factor, OFFICIAL_MIN_TEMPERATURE)
    expected = A / tau if method.linear else _softmax_columns(A / tau)
    final_temperature: float | None = tau
    if not np.allclose(B, expected, rtol=1e-3, atol=1e-5):
        final_temperature = None
        notes.append("B is not the encoder of A at the recorded temperature schedule; final temperature unknown")
    if method.linear:
        notes.append("linear encoder: the official B is A / tau_final (tvbasis's linear encoder is A itself)")
    if settings.get("softmax_w") or settings.get("w_activation") == "softmax":
        notes.append(
            "softmax decoder: W in AWB.pt already has the softmax applied and is stored as is "
            "(the official reload applies it a second time); tvbasis has no softmax decoder, so a refit differs"
        )
    for key in ("grad_clip", "batch_cols"):
        if settings.get(key) is not None:
            notes.append(f"setting {key}={settings[key]!r} has no tvbasis counterpart; a refit would not use it")

    method.A_ = A
    method.encoder_ = B
    method.decoder_ = W
    method.final_temperature_ = final_temperature
    method.loss_ = None  # needs G
    method.spectral_floor_ = None
    method.loss_history_ = []
    report: dict[str, Any] = {} if final_temperature is None else {"final_temperature": final_temperature}
    return method, report, notes


def _softmax_columns(Z: np.ndarray) -> np.ndarray:
    e = np.exp(Z - Z.max(axis=0))
    return e / e.sum(axis=0)


def _read_pca(
    path: Path, data: Any, info: dict[str, Any], info_path: Path, tasks: list[str], layout: Layout, M: int
) -> tuple[PCA, dict[str, torch.Tensor], list[str]]:
    T = len(tasks)
    if not isinstance(data, Mapping):
        raise TvbasisError(
            f"{path}: expected a dict with fields 'coefficients', 'mean_vector', found {type(data).__name__}"
        )
    dims = f"T = {T} tasks in {INFO_FILE}, M = {M} basis vectors in {BASIS_FILE}"
    coefficients = _array(data, "coefficients", path, (M, T), f"M x T: {dims}")
    if "M_actual" in data and data["M_actual"] != M:
        raise TvbasisError(f"{path}: field 'M_actual' is {data['M_actual']!r}, {BASIS_FILE} holds {M} basis vectors")
    if data.get("dataset_names") is not None and list(data["dataset_names"]) != tasks:
        raise TvbasisError(f"{path}: field 'dataset_names' differs from field 'datasets' of {INFO_FILE}")
    shapes = {name: shape for name, shape, _ in layout}
    D = sum(math.prod(s) for s in shapes.values())
    if data.get("total_dim") is not None and data["total_dim"] != D:
        raise TvbasisError(
            f"{path}: field 'total_dim' is {data['total_dim']!r}, the basis vectors have D = {D} entries"
        )
    order = data.get("keys_order")
    if order is None:
        order = list(shapes)
    elif not isinstance(order, (list, tuple)) or sorted(order) != sorted(shapes):
        raise TvbasisError(f"{path}: field 'keys_order' does not list the tensors of {BASIS_FILE}")
    recorded = data.get("param_shapes")
    if recorded is not None:
        if not isinstance(recorded, Mapping):
            raise TvbasisError(f"{path}: field 'param_shapes' is {type(recorded).__name__}, expected a dict")
        for name, shape in shapes.items():
            if name not in recorded or tuple(recorded[name]) != shape:
                got = list(recorded[name]) if name in recorded else "missing"
                raise TvbasisError(
                    f"{path}: field 'param_shapes' gives tensor {name!r} shape {got}, {BASIS_FILE} has {list(shape)}"
                )
    mean_flat = data.get("mean_vector")
    if not isinstance(mean_flat, torch.Tensor):
        raise TvbasisError(f"{path}: field 'mean_vector' is {'missing' if mean_flat is None else 'not a tensor'}")
    if tuple(mean_flat.shape) != (D,):
        raise TvbasisError(
            f"{path}: field 'mean_vector' has shape {list(mean_flat.shape)}, expected (D,) = [{D}] "
            f"(the entries of the tensors in {BASIS_FILE})"
        )
    mean: dict[str, torch.Tensor] = {}
    offset = 0
    for name in order:
        n = math.prod(shapes[name])
        mean[name] = mean_flat[offset : offset + n].reshape(shapes[name])
        offset += n

    method = PCA(M, center=True, seed=_setting(info, ("seed",), int, 0, str(info_path)))
    C = np.eye(T) - 1.0 / T
    # s_m = U_m sigma_m = V C q_m with q_m the m-th row of the coefficients (right singular vectors).
    method.encoder_ = np.hstack([C @ coefficients.T, np.full((T, 1), 1.0 / T)])
    method.decoder_ = np.vstack([coefficients, np.ones((1, T))])
    method.has_mean_ = True
    eigenvalues = np.full(T, np.nan)  # of the centred Gram matrix; only the first M are recorded
    if data.get("singular_values") is not None:
        eigenvalues[:M] = _array(data, "singular_values", path, (M,), f"M: {dims}") ** 2
    method.eigenvalues_ = eigenvalues
    return method, mean, []


def read_official_run(run_dir: str | Path, *, trust_pickle: bool = False) -> OfficialRun:
    """Read and check a run directory; raise ``TvbasisError`` naming the file and field at fault."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TvbasisError(f"{run_dir}: no such run directory")
    info_path = _require(run_dir, INFO_FILE, "every Task Vector Bases run directory has one")
    info = _read_info(info_path)
    official = _field(info, "method", info_path, str, "a method class name")
    if official not in OFFICIAL_METHODS:
        raise TvbasisError(
            f"{info_path}: field 'method' is {official!r}; only AutoencoderBasisMethod ({AWB_FILE}) "
            f"and PCABasisMethod ({PCA_FILE}) runs can be imported"
        )
    artifact_name = AWB_FILE if official == "AutoencoderBasisMethod" else PCA_FILE
    basis_path = _require(run_dir, BASIS_FILE, "it holds the basis vectors")
    artifact = _require(run_dir, artifact_name, f"an {official} run keeps its coefficients there")
    M = _field(info, "M", info_path, int, "the number of basis vectors")
    tasks = _task_names(info, info_path)

    vectors, layout = _read_basis(basis_path, load_torch_file(basis_path, trust_pickle), official)
    if len(vectors) != M:
        raise TvbasisError(f"{basis_path}: holds {len(vectors)} basis vectors, but field 'M' of {INFO_FILE} is {M}")
    labels = [f"{basis_path}: basis vector {m}" for m in range(M)]
    data = load_torch_file(artifact, trust_pickle)
    method: BasisMethod
    if official == "AutoencoderBasisMethod":
        method, report, notes = _read_autoencoder(artifact, data, info, info_path, tasks, M)
    else:
        method, mean, notes = _read_pca(artifact, data, info, info_path, tasks, layout, M)
        vectors = [*vectors, mean]
        labels.append(f"{artifact}: field 'mean_vector'")
        report = {}
    files = [INFO_FILE, BASIS_FILE, artifact_name]
    return OfficialRun(official, info, tasks, layout, vectors, labels, method, report, files, notes)


# -- writing --------------------------------------------------------------------------------
def import_official_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    trust_pickle: bool = False,
    overwrite: bool = False,
    dtype: str = "fp32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Store:
    """Convert the official run directory ``run_dir`` into a store at ``out`` (written whole or not at all).

    Keeps the method, M, the task order, the decoder (``W``, or PCA's coefficients plus the
    mean's row of ones) and the method's matrices (``A`` and the encoder ``B``; PCA's encoder
    and leading eigenvalues). What the run does not record is stored as NaN: see the module doc.
    """
    run_dir, out = Path(run_dir), Path(out)
    check_store_dtype(dtype)
    check_output_path(out, overwrite)
    if run_dir.is_dir() and out.resolve() == run_dir.resolve():
        raise TvbasisError(f"--out {out}: that is the run directory itself; choose another path")
    run = read_official_run(run_dir, trust_pickle=trust_pickle)
    check_scale_names({name: shape for name, shape, _ in run.layout}, dtype, BASIS_FILE)
    method = run.method
    names = vector_names(method.n_atoms, method.has_mean_)
    T, K = len(run.tasks), len(names)
    with atomic_output(out, overwrite=overwrite) as tmp:
        vectors, atom_gram = _write_vectors(tmp, names, run, dtype, max_shard_bytes, chunk_elements)
        assert method.decoder_ is not None and method.decoder_.shape == (K, T)
        arrays = {
            "decoder": method.decoder_,
            "gram": np.full((T, T), np.nan),
            "atom_gram": atom_gram,
            "atom_cross": np.full((K, T), np.nan),
        }
        arrays.update({f"state.{k}": v for k, v in method.state_arrays().items()})
        save_matrices(tmp / MATRICES, arrays)
        finalise_store(tmp, _manifest(run_dir, run, dtype, vectors))
    return open_store(out)


def _write_vectors(
    tmp: Path, names: list[str], run: OfficialRun, dtype: str, max_shard_bytes: int, chunk_elements: int
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Write the K vectors as the store's atom files; return their entries and ``S^T S`` as stored."""
    shapes = {name: shape for name, shape, _ in run.layout}
    writer = AtomWriter(tmp / ATOMS_DIR, names, shapes, dtype, max_shard_bytes)
    writer.create()
    infos = [TensorInfo(name, shape, dt, tmp) for name, shape, dt in run.layout]
    atom_gram = np.zeros((len(names), len(names)))
    try:
        for chunk in plan_chunks(infos, chunk_elements):
            cols = []
            for vec, label in zip(run.vectors, run.labels, strict=True):
                x = vec[chunk.tensor].detach()
                rows = x[chunk.start : chunk.stop] if x.dim() else x
                if not torch.isfinite(rows).all():
                    raise TvbasisError(f"{label}: tensor {chunk.tensor!r} has non-finite values")
                cols.append(rows.reshape(-1))
            stored = writer(chunk, torch.stack(cols, dim=1)).to(torch.float64)
            atom_gram += (stored.T @ stored).numpy()
    finally:
        writer.close()
    return writer.vectors(ATOMS_DIR), (atom_gram + atom_gram.T) / 2


def _manifest(run_dir: Path, run: OfficialRun, dtype: str, vectors: list[dict[str, Any]]) -> dict[str, Any]:
    method = run.method
    layout = [[name, list(shape), str(dt).removeprefix("torch.")] for name, shape, dt in run.layout]
    return {
        **manifest_header(method, len(run.tasks), sum(math.prod(shape) for _, shape, _ in run.layout), run.report),
        "tasks": [
            {
                "name": name,
                "source": UNKNOWN_TASK_SOURCE,
                "content_hash": "",
                "norm": None,
                "rel_error": None,
                "cosine": None,
            }
            for name in run.tasks
        ],
        "selection": {"include": [], "exclude": []},
        "layout": layout,
        "content_hash_algorithm": NO_CONTENT_HASH,
        # The tensors the basis edits are the best knowledge of the base's layout; its content is unknown.
        "base": {
            "source": UNKNOWN_BASE,
            "known": False,
            "tensors": layout,
            "layout_sha256": None,
            "content_hash": "",
            "fingerprint": "unknown",
        },
        "atoms": {"stored": True, "dtype": dtype, "vectors": vectors},
        "imported": {
            "from": "Task Vector Bases run directory (github.com/uiuctml/TaskVectorBasis)",
            "run_dir": str(run_dir.resolve()),
            "files": run.files,
            "method": run.official_method,
            "method_info": run.info,
            "unknown": ["gram", "atom_cross", "tasks' norms, relative errors and cosines", "content hashes", "base"],
            "notes": run.notes,
        },
    }
