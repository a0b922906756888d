"""Changing a store's tasks without rebuilding it: add a task, remove one, refit the basis.

- ``add_task`` projects a new task vector onto the stored atoms: its coefficients are the
  least-squares ``w = (S^T S)^+ S^T tau``, from inner products gathered in one pass over
  the base, the new fine-tune and the atoms. When the earlier tasks' fine-tunes are still
  where the manifest says (and unchanged), the same pass also gives the new task's Gram
  row, so the store keeps a complete ``G`` and a later refit needs one pass, not two.
- ``remove_task`` drops a task's coefficients and statistics; the atoms stay.
- A store built with per-tensor Gram matrices (``--tensor-stats``) keeps them up to date
  exactly as it keeps ``G``: ``add_task`` gathers the new task's entries in its one pass
  (NaN where the earlier tasks' inputs are missing, as in ``G``), ``remove_task`` drops a
  row and column, ``refit`` carries them over (or gathers them again with ``G``).
- ``refit`` builds the basis again over the store's current tasks, with the same method and
  settings, from the stored ``G`` plus the one pass over the inputs that writing atoms needs
  (two passes when ``G`` is incomplete, or for methods that learn from the data itself).

The atoms of an updated store are those of the last fit; ``fitted_tasks`` in the manifest
names the tasks that fit used, and the method's fitted state (such as the encoder) is over
those tasks. Updates are written like builds: to a temporary directory (the atom files
hard-linked, not copied, where the file system allows) that replaces the store only when
complete.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.arithmetic.export import check_base_layout
from tvbasis.build import finalise_store, save_tensor_grams
from tvbasis.engine.streaming import DEFAULT_CHUNK_ELEMENTS, GramStats, gram_pass
from tvbasis.errors import TvbasisError
from tvbasis.io.outputs import atomic_output, check_output_path
from tvbasis.io.paths import as_input_path
from tvbasis.methods import METHODS
from tvbasis.methods.base import least_squares_decoder
from tvbasis.store.format import ATOMS_DIR, MATRICES, Store, open_store, save_matrices
from tvbasis.store.metrics import reconstruction_metrics
from tvbasis.tasks.taskvectors import Chunk, TaskSource, TaskVectorSet, check_task_name

Log = Callable[[str], None]


def _open(store: Store | str | Path) -> Store:
    store = store if isinstance(store, Store) else open_store(store)
    if store.residuals is not None:
        # every task's residual is coded against the atoms: new atoms or tasks need a new residual pass
        raise TvbasisError(
            f"{store.path}: the store codes residuals per task, which updates cannot keep; "
            f"build it again with the changed tasks (tvbasis build ... --residual/--budget)"
        )
    return store


def _sources(store: Store) -> list[TaskSource]:
    return [TaskSource(t["name"], as_input_path(t["source"])) for t in store.manifest["tasks"]]


def _base_path(store: Store, base: str | Path | None) -> Path:
    return as_input_path(base if base is not None else store.manifest["base"]["source"])


def _check_same_tensors(store: Store, tvs: TaskVectorSet, new: TaskSource) -> None:
    """The new task vector must have exactly the store's tensors (names, shapes), in its selection."""
    have = {i.name: tuple(i.shape) for i in tvs.tensors}
    want = {name: tuple(shape) for name, shape, _ in store.manifest["layout"]}
    for name, shape in want.items():
        if name not in have:
            raise TvbasisError(f"{new.path}: task {new.name!r} lacks tensor {name!r} that the store's tasks have")
        if have[name] != shape:
            raise TvbasisError(
                f"{new.path}: tensor {name!r} of task {new.name!r} has shape {list(have[name])}, "
                f"the store's is {list(shape)}"
            )
    extra = sorted(set(have) - set(want))
    if extra:
        raise TvbasisError(f"{new.path}: task {new.name!r} has tensor {extra[0]!r} that the store does not")


@dataclass
class AddedTask:
    """What ``add_task`` learnt about the new task."""

    name: str
    rel_error: float
    cosine: float
    coefficients: np.ndarray  # (K,) over the stored vectors
    gram_row_known: bool  # whether its inner products with the earlier tasks were computed
    missing_inputs: list[str]  # earlier tasks' inputs that were not found (their Gram entries are unknown)


def add_task(
    store: Store | str | Path,
    task: TaskSource,
    *,
    base: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Store, AddedTask]:
    """Add ``task`` to the store (in place, or as a new store at ``out``) without refitting the atoms."""
    store = _open(store)
    if store.manifest["base"].get("known") is False:
        raise TvbasisError(
            f"{store.path}: the store records no base and no Gram statistics (it was imported), so a task "
            f"cannot be added; build a store from the fine-tunes instead"
        )
    check_task_name(task.name)
    if task.name in store.task_names:
        raise TvbasisError(f"--task {task.name}: the store already has a task of that name")
    out_path = _out_path(store, out, overwrite)
    old = _sources(store)
    missing = [f"{s.name} ({s.path})" for s in old if not s.path.exists()]
    sources = [task] if missing else [task, *old]
    sel = store.manifest["selection"]
    tvs = TaskVectorSet(_base_path(store, base), sources, sel["include"], sel["exclude"])
    check_base_layout(store, tvs.base)
    _check_same_tensors(store, tvs, task)

    K = store.decoder.shape[0]
    cross = np.zeros((K, len(sources)))
    atom_gram = np.zeros((K, K))  # of the stored atoms, measured with S^T tau: see below

    def observe(chunk: Chunk, X: torch.Tensor) -> None:
        nonlocal cross, atom_gram
        S = store.vector_rows(chunk)
        cross += (S.T @ X).numpy()
        atom_gram += (S.T @ S).numpy()

    stats = gram_pass(tvs, chunk_elements, observe=observe, tensor_stats=store.has_tensor_grams)
    if stats.base_hash != store.manifest["base"]["content_hash"]:
        raise TvbasisError(
            f"{tvs.base.path}: base does not match the store: its weights differ from those the store was built on"
        )
    for t, src in enumerate(old if not missing else []):
        if stats.task_hashes[t + 1] != store.manifest["tasks"][t]["content_hash"]:
            raise TvbasisError(
                f"{src.path}: the input of task {src.name!r} changed since the store was built, so its "
                f"inner products with {task.name!r} cannot be recorded (restore it, or move it away "
                f"to add the task without them)"
            )

    T = store.n_tasks
    gram = _grown(store.gram, stats.gram, known=not missing)
    tensor_grams = None
    if store.tensor_grams is not None:
        assert stats.tensor_grams is not None
        tensor_grams = {
            n: _grown(old_n, stats.tensor_grams[n], known=not missing) for n, old_n in store.tensor_grams.items()
        }
    counts = store.tensor_nonzero_rows
    if counts is not None and stats.nonzero_rows is not None:  # the new task is the pass's first
        counts = {n: np.append(c, stats.nonzero_rows[n][0]) for n, c in counts.items()}
    else:
        counts = None
    energy = _grown_row_energy(store.tensor_row_energy, stats.row_energy, T, known=not missing)
    # The projection and its error use inner products of the very same atom bytes: the stored
    # atom_gram may be exact (from G) while the atoms on disk are rounded, and for a task that
    # lies in their span the error formula would magnify that mismatch.
    atom_gram = (atom_gram + atom_gram.T) / 2
    w = least_squares_decoder(atom_gram, cross[:, :1])
    metrics = reconstruction_metrics(gram[T:, T:], atom_gram, cross[:, :1], w)
    matrices = dict(store.matrices)
    matrices["gram"] = gram
    matrices["decoder"] = np.hstack([store.decoder, w])
    matrices["atom_cross"] = np.hstack([store.matrices["atom_cross"], cross[:, :1]])
    entry = {
        "name": task.name,
        "source": str(task.path),
        "content_hash": stats.task_hashes[0],
        "norm": float(np.sqrt(metrics["sq_norm"][0])),
        "rel_error": float(metrics["rel_error"][0]),
        "cosine": float(metrics["cosine"][0]),
        **({"input": "lora-adapter"} if tvs.is_lora(0) else {}),
        "added": True,
    }
    manifest = _updated_manifest(store, [*store.manifest["tasks"], entry], f"add-task {task.name}")
    result = AddedTask(task.name, entry["rel_error"], entry["cosine"], w[:, 0], not missing, missing)
    return _write(store, out_path, manifest, matrices, tensor_grams, counts, energy), result


def _grown_row_energy(
    old: dict[str, np.ndarray] | None, new: dict[str, np.ndarray] | None, T: int, known: bool
) -> dict[str, np.ndarray] | None:
    """The tasks' mean row energy with one task added: the pass's own mean when it read every
    task (``known``), else the old mean and the new task's rows weighed T : 1."""
    if old is None or new is None:
        return None
    return new if known else {n: (T * e + new[n]) / (T + 1) for n, e in old.items()}


def _grown(old: np.ndarray, new: np.ndarray, known: bool) -> np.ndarray:
    """``old`` (T, T) with the new task appended last: ``new`` is the pass's Gram matrix over
    [new task, *earlier tasks] (or over the new task alone, when ``known`` is False: NaN then)."""
    T = old.shape[0]
    gram = np.full((T + 1, T + 1), np.nan)
    gram[:T, :T] = old
    gram[T, T] = new[0, 0]
    if known:
        gram[T, :T] = gram[:T, T] = new[0, 1:]
    return gram


def remove_task(
    store: Store | str | Path, name: str, *, out: str | Path | None = None, overwrite: bool = False
) -> Store:
    """Drop task ``name``'s coefficients and statistics (in place, or as a new store at ``out``)."""
    store = _open(store)
    t = store.task_index(name)
    if store.n_tasks == 1:
        raise TvbasisError(f"--task {name}: it is the store's only task; a store needs at least one")
    out_path = _out_path(store, out, overwrite)
    keep = [i for i in range(store.n_tasks) if i != t]
    matrices = dict(store.matrices)
    matrices["gram"] = store.gram[np.ix_(keep, keep)]
    matrices["decoder"] = store.decoder[:, keep]
    matrices["atom_cross"] = store.matrices["atom_cross"][:, keep]
    tasks = [task for i, task in enumerate(store.manifest["tasks"]) if i != t]
    grams = store.tensor_grams
    tensor_grams = None if grams is None else {n: g[np.ix_(keep, keep)] for n, g in grams.items()}
    counts = store.tensor_nonzero_rows
    counts = None if counts is None else {n: c[keep] for n, c in counts.items()}
    manifest = _updated_manifest(store, tasks, f"remove-task {name}")
    # the tasks' mean row energy cannot lose one task's share (it is not kept per task); a refit
    # or a new --tensor-stats build gathers it again
    return _write(store, out_path, manifest, matrices, tensor_grams, counts)


@dataclass
class RefitPlan:
    """What ``refit`` will read, and why."""

    base: Path
    tasks: list[TaskSource]
    passes: int  # over all inputs: 1 when the stored G is complete and enough, else 2
    reason: str

    def describe(self) -> str:
        inputs = ", ".join(f"{s.name}={s.path}" for s in self.tasks)
        return (
            f"refit reads the base {self.base} and {len(self.tasks)} tasks ({inputs}) "
            f"in {self.passes} pass(es): {self.reason}"
        )


def plan_refit(store: Store | str | Path, *, base: str | Path | None = None) -> RefitPlan:
    """The inputs a refit needs; an error naming every one that is missing."""
    store = _open(store)
    base_path = _base_path(store, base)
    sources = _sources(store)
    missing = ([f"base ({base_path})"] if not base_path.exists() else []) + [
        f"{s.name} ({s.path})" for s in sources if not s.path.exists()
    ]
    if missing:
        raise TvbasisError(
            "refit needs the base and every task's fine-tune (the atoms are combinations of them); missing: "
            + ", ".join(missing)
        )
    method = METHODS[store.manifest["method"]["name"]]
    if not np.isfinite(store.gram).all():
        return RefitPlan(
            base_path, sources, 2, "the store lacks some Gram entries (tasks added without the others' inputs)"
        )
    if method.observes or not method.stores_atoms:
        return RefitPlan(
            base_path, sources, 2, f"the {method.name} method learns from the data itself, not only from G"
        )
    return RefitPlan(base_path, sources, 1, "the fit uses the stored Gram matrix; the pass writes the atoms")


def refit(
    store: Store | str | Path,
    *,
    base: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Store:
    """Fit the basis again over the store's current tasks (same method and settings)."""
    from tvbasis.build import build_store

    store = _open(store)
    plan = plan_refit(store, base=base)
    out_path = _out_path(store, out, overwrite)
    m = store.manifest
    method = METHODS[m["method"]["name"]](**m["method"]["params"])
    known = None
    if plan.passes == 1:
        hashes = [t["content_hash"] for t in m["tasks"]]
        known = GramStats(
            store.gram,
            m["base"]["content_hash"],
            hashes,
            store.tensor_grams,
            store.tensor_nonzero_rows,
            store.tensor_row_energy,
        )
    return build_store(
        plan.base,
        plan.tasks,
        method,
        out_path,
        include=m["selection"]["include"],
        exclude=m["selection"]["exclude"],
        dtype=m["atoms"]["dtype"],
        chunk_elements=chunk_elements,
        overwrite=True,
        known=known,
        tensor_stats=store.has_tensor_grams,
    )


# -- writing ------------------------------------------------------------------------------
def _out_path(store: Store, out: str | Path | None, overwrite: bool) -> Path:
    if out is None:
        return store.path
    out_path = Path(out)
    if out_path.resolve() != store.path.resolve():
        check_output_path(out_path, overwrite)
    return out_path


def _updated_manifest(store: Store, tasks: list[dict[str, Any]], operation: str) -> dict[str, Any]:
    m = {k: v for k, v in store.manifest.items() if k not in ("files", "bytes")}
    m.setdefault("fitted_tasks", store.task_names)
    m["tasks"] = tasks
    m["n_tasks"] = len(tasks)
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    m["history"] = [*m.get("history", []), {"operation": operation, "time": when}]
    return m


def _write(
    store: Store,
    out: Path,
    manifest: dict[str, Any],
    matrices: dict[str, np.ndarray],
    tensor_grams: dict[str, np.ndarray] | None = None,
    nonzero_rows: dict[str, np.ndarray] | None = None,
    row_energy: dict[str, np.ndarray] | None = None,
) -> Store:
    """Write the updated store at ``out`` (replacing ``store`` itself when ``out`` is its path)."""
    manifest.pop("tensor_stats", None)  # set again below when the per-tensor Gram matrices are written
    with atomic_output(out, overwrite=True) as tmp:
        src_atoms = store.path / ATOMS_DIR
        if src_atoms.is_dir():
            for f in sorted(src_atoms.rglob("*")):
                dst = tmp / ATOMS_DIR / f.relative_to(src_atoms)
                if f.is_dir():
                    dst.mkdir(parents=True, exist_ok=True)
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(f, dst)  # atoms do not change; the old store's directory goes away
                except OSError:
                    shutil.copy2(f, dst)
        save_matrices(tmp / MATRICES, matrices)
        if tensor_grams is not None:
            save_tensor_grams(tmp, manifest, tensor_grams, list(tensor_grams), nonzero_rows, row_energy)
        finalise_store(tmp, manifest)
    return open_store(out)
