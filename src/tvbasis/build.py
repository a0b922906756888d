"""The build pipeline: checkpoints -> task vectors -> Gram pass -> fit -> atom pass -> store."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy

from tvbasis import __version__
from tvbasis.engine.residual_pass import residual_pass
from tvbasis.engine.streaming import DEFAULT_CHUNK_ELEMENTS, AtomStats, Engine, GramStats, LocalEngine
from tvbasis.errors import TvbasisError
from tvbasis.io.checkpoint import Checkpoint
from tvbasis.io.hashing import CONTENT_HASH, ContentHash
from tvbasis.io.outputs import atomic_output, check_output_path
from tvbasis.methods import PCA, BasisMethod
from tvbasis.methods.base import least_squares_decoder
from tvbasis.store.atoms import AtomWriter
from tvbasis.store.format import (
    ATOMS_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    MATRICES,
    TENSOR_GRAM,
    TENSOR_ROW_ENERGY,
    TENSOR_ROWS,
    Store,
    file_sizes,
    open_store,
    save_matrices,
    vector_names,
)
from tvbasis.store.metrics import reconstruction_metrics
from tvbasis.store.quantize import check_scale_names, check_store_dtype
from tvbasis.store.residuals import RESIDUALS_DIR, CodePlan, ResidualWriter, TensorCode
from tvbasis.tasks.taskvectors import TaskSource, TaskVectorSet

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def base_fingerprint(base: Checkpoint, content_hash: str) -> dict[str, Any]:
    """Names, shapes and dtypes of every base tensor plus a hash of the task-vector tensors' bytes."""
    tensors = [[i.name, list(i.shape), str(i.dtype).removeprefix("torch.")] for i in base.infos()]
    layout_hash = hashlib.sha256(json.dumps(tensors).encode()).hexdigest()
    return {
        "source": str(base.path),
        "tensors": tensors,
        "layout_sha256": layout_hash,
        "content_hash": content_hash,
        "fingerprint": hashlib.sha256((layout_hash + content_hash).encode()).hexdigest()[:16],
    }


def _model_card(manifest: dict[str, Any]) -> str:
    def num(x: float | None) -> str:
        return "unknown" if x is None else f"{x:.4f}"

    rows = "\n".join(f"| {t['name']} | {num(t['rel_error'])} | {num(t['cosine'])} |" for t in manifest["tasks"])
    b = manifest["bytes"]
    return (
        f"---\nlibrary_name: tvbasis\ntags: [task-vectors, task-arithmetic]\n---\n\n"
        f"# Task vector basis ({manifest['method']['name']}, M = {manifest['n_atoms']}, "
        f"T = {manifest['n_tasks']})\n\n"
        f"Built by tvbasis {manifest['tvbasis_version']} from base `{manifest['base']['source']}`.\n"
        f"Stored bytes: {b['total']:,} ({100 * b['ratio']:.1f}% of the {manifest['n_tasks']} fp32 task vectors).\n\n"
        f"| task | relative error | cosine |\n|---|---|---|\n{rows}\n\n"
        f"Use: `tvbasis info STORE`, `tvbasis reconstruct STORE --task NAME --out FILE`, "
        f"`tvbasis edit --base BASE --store STORE --add NAME=1 --out OUT`.\n"
    )


def build_store(
    base: str | Path,
    tasks: Sequence[TaskSource],
    method: BasisMethod,
    out: str | Path,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dtype: str = "fp32",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    known: GramStats | None = None,
    engine: Engine | None = None,
    tensor_stats: bool = False,
    codes: CodePlan | None = None,
    plan_report: dict[str, Any] | None = None,
) -> Store:
    """Compress the task vectors of ``tasks`` (relative to ``base``) into a store at ``out``.

    Two streaming passes over the inputs (one for the random basis): the Gram pass, then
    the atom pass, which writes the atoms chunk by chunk. Nothing is written under ``out``
    until the store is complete.

    ``known``: the Gram pass's results from an earlier pass over the same inputs (a refit).
    The Gram pass is then skipped where the method needs nothing else from it, and the
    inputs' content hashes are checked against ``known``'s during the atom pass instead.

    ``engine`` runs the passes: the local engine by default, or a
    :class:`~tvbasis.engine.distributed.DaskEngine`; both give the same store.

    ``tensor_stats``: also gather every tensor's own Gram matrix ``G_n`` in the Gram pass
    and save them (``tensor_gram.safetensors``) for ``tvbasis plan``. Opt-in because they
    take ``T^2 x n_tensors x 8`` bytes, in memory during the pass and in the store.

    ``codes``: per tensor, whether the basis covers it and how each task's residual is coded
    (``store.residuals``; ``planning.plan_budget`` chooses one for a byte budget). A third pass,
    run locally whatever the engine, codes the residuals against the atoms as stored.
    ``plan_report``: the planner's summary (budget, estimates), kept in the manifest as ``budget_plan``.
    """
    engine = engine or LocalEngine()
    out = Path(out)
    check_store_dtype(dtype)
    check_output_path(out, overwrite)
    tvs = TaskVectorSet(base, tasks, include, exclude)
    method.check_n_tasks(tvs.n_tasks)
    tensor_codes = _tensor_codes(codes, method, [i.name for i in tvs.tensors])
    covered = None if tensor_codes is None else {n for n, tc in tensor_codes.items() if tc.basis}
    check_scale_names(
        {i.name: i.shape for i in tvs.tensors}, dtype, tvs.base.path, "exclude one of them or choose another --dtype"
    )

    hashers = None
    # Known statistics replace the Gram pass only if they hold all that this build saves.
    # Per-tensor bases are fitted on the per-tensor Gram matrices, so the pass gathers them too.
    # Codes that skip zero rows need every task's count of them (gathered with the same pass).
    need_counts = tensor_codes is not None and any(tc.residual.name == "rows" for tc in tensor_codes.values())
    need_grams = tensor_stats or (codes is not None and codes.tensor_bases) or need_counts
    known_enough = (
        known is not None
        and (not need_grams or known.tensor_grams is not None)
        and (not need_counts or known.nonzero_rows is not None)
    )
    if known is not None and known_enough and not method.observes and method.stores_atoms:
        if known.gram.shape != (tvs.n_tasks, tvs.n_tasks):
            raise TvbasisError(f"known Gram matrix is {known.gram.shape}, there are {tvs.n_tasks} tasks")
        stats = known
        hashers = [ContentHash() for _ in range(tvs.n_tasks + 1)]
    else:
        observe = method.observe if method.observes else None
        # the keyword only when asked: engines written before it keep working
        extra = {"tensor_stats": True} if need_grams else {}
        stats = engine.gram_pass(tvs, chunk_elements, observe=observe, **extra)
    method.fit(stats.gram)

    # Linear atoms have exact statistics from G. Rounding to fp32 changes them negligibly;
    # rounding to fp16/bf16/int8 does not, so those stores measure the atoms as stored, and
    # report beside it the error the same atoms would have unrounded.
    exact_stats = method.atom_stats(stats.gram)
    if covered is not None and len(covered) < len(tvs.tensors):
        exact_stats = None  # the atoms are zero on the tensors the basis leaves out: measure them
    rounded = dtype != "fp32"
    unrounded_metrics = None
    with atomic_output(out, overwrite=overwrite) as tmp:
        names = vector_names(method.n_atoms, method.has_mean_)
        vectors: list[dict[str, Any]] = []
        if method.stores_atoms:
            measured = _write_atoms(
                tvs,
                method,
                tmp,
                names,
                dtype,
                chunk_elements,
                max_shard_bytes,
                vectors,
                measure=exact_stats is None or rounded,
                measure_unrounded=rounded and exact_stats is None,
                hashers=hashers,
                engine=engine,
                covered=covered,
            )
            if hashers is not None:
                _check_hashes(tvs, stats, [h.hexdigest() for h in hashers])
            if measured is not None:
                atom_gram, atom_cross = measured.atom_gram, measured.atom_cross
            else:
                assert exact_stats is not None
                atom_gram, atom_cross = exact_stats
            if rounded:
                unrounded = exact_stats if exact_stats is not None else measured.unrounded  # type: ignore[union-attr]
                assert unrounded is not None
                decoder = least_squares_decoder(*unrounded) if method.decoder_from_atoms else method.decoder_
                assert decoder is not None
                unrounded_metrics = reconstruction_metrics(stats.gram, *unrounded, decoder)
            if method.decoder_from_atoms:
                method.fit_decoder(atom_gram, atom_cross)
        else:
            assert exact_stats is not None, f"{method.name}: atoms neither stored nor known from G"
            atom_gram, atom_cross = exact_stats
        assert method.decoder_ is not None
        metrics = reconstruction_metrics(stats.gram, atom_gram, atom_cross, method.decoder_)

        arrays = {"decoder": method.decoder_, "gram": stats.gram, "atom_gram": atom_gram, "atom_cross": atom_cross}
        arrays.update({f"state.{k}": v for k, v in method.state_arrays().items()})
        save_matrices(tmp / MATRICES, arrays)

        manifest = _manifest(tvs, method, stats.base_hash, stats.task_hashes, metrics, dtype, vectors)
        if tensor_stats:
            assert stats.tensor_grams is not None
            save_tensor_grams(
                tmp, manifest, stats.tensor_grams, [i.name for i in tvs.tensors], stats.nonzero_rows, stats.row_energy
            )
        if unrounded_metrics is not None:
            for t, task in enumerate(manifest["tasks"]):
                task["rel_error_unrounded"] = float(unrounded_metrics["rel_error"][t])
        if plan_report is not None:
            manifest["budget_plan"] = plan_report
        if tensor_codes is not None:
            _write_residuals(tvs, tmp, manifest, arrays, method, tensor_codes, chunk_elements, stats)
        finalise_store(tmp, manifest)
    return open_store(out)


def _tensor_codes(codes: CodePlan | None, method: BasisMethod, names: list[str]) -> dict[str, TensorCode] | None:
    """Every tensor's code, or None for a basis-only store; refuses a store that would hold nothing."""
    if codes is None or codes.trivial:
        if method.n_atoms == 0:
            raise TvbasisError("-M 0 stores no basis: give residual codes (--residual or --budget)")
        return None
    tensor_codes = codes.for_names(names)
    if method.n_atoms == 0 or not method.stores_atoms:
        if not method.stores_atoms:
            raise TvbasisError(
                f"--method {method.name}: its atoms are not stored, so residual codes cannot follow them"
            )
        tensor_codes = {n: dataclasses.replace(tc, basis=False) for n, tc in tensor_codes.items()}
    for n, tc in tensor_codes.items():
        if tc.residual.name == "rows" and (tc.basis or tc.tensor_atoms):
            raise TvbasisError(
                f"tensor {n!r}: code {tc.residual} skips rows that are zero in every task's own vector, so it "
                f"codes what no basis covers; build with -M 0, or leave the tensor out of the basis"
            )
    return tensor_codes


def _write_residuals(
    tvs: TaskVectorSet,
    tmp: Path,
    manifest: dict[str, Any],
    matrices: dict[str, np.ndarray],
    method: BasisMethod,
    tensor_codes: dict[str, TensorCode],
    chunk_elements: int,
    stats: GramStats,
) -> None:
    """The residual pass: code every task's residual against the atoms in ``tmp``, record the
    codes in ``manifest`` and replace the tasks' errors with those of basis and residual together."""
    writer = ResidualWriter(
        tmp, tensor_codes, {i.name: i.shape for i in tvs.tensors}, tvs.task_names, stats.nonzero_rows
    )
    writer.create()
    manifest["residuals"] = writer.manifest_entry()
    # The store as written so far reads the atoms back as stored (rounded, zero where not covered).
    partial = Store(path=tmp, manifest=manifest, matrices=matrices, method=method)
    decoder = torch.from_numpy(np.ascontiguousarray(matrices["decoder"]))
    hashers = [ContentHash() for _ in range(tvs.n_tasks + 1)] if stats.task_hashes else None
    bases = {}
    for name, tc in tensor_codes.items():
        if tc.tensor_atoms:
            assert stats.tensor_grams is not None
            bases[name] = PCA(tc.tensor_atoms).fit(stats.tensor_grams[name]).encoder_
    try:
        errors = residual_pass(
            tvs, lambda chunk: partial.vector_rows(chunk) @ decoder, writer, chunk_elements, hashers, bases
        )
    finally:
        writer.close()
    if hashers is not None:
        _check_hashes(tvs, stats, [h.hexdigest() for h in hashers])
    metrics = errors.metrics()
    for t, task in enumerate(manifest["tasks"]):
        task.pop("rel_error_unrounded", None)  # the residuals correct the atoms' rounding too
        task["rel_error_basis"] = task["rel_error"]
        task["rel_error"] = float(metrics["rel_error"][t])
        task["cosine"] = float(metrics["cosine"][t])


def save_tensor_grams(
    tmp: Path,
    manifest: dict[str, Any],
    grams: dict[str, np.ndarray],
    names: list[str],
    nonzero_rows: dict[str, np.ndarray] | None = None,
    row_energy: dict[str, np.ndarray] | None = None,
) -> None:
    """Write the per-tensor Gram matrices (one (T, T) float64 tensor per tensor name) and, if
    known, the per-tensor counts of nonzero rows ((T,) int64) and row energies ((rows,)
    float64), and record them in ``manifest``; the tensor order is the layout's."""
    T = manifest["n_tasks"]
    for name in names:
        if grams[name].shape != (T, T):
            raise TvbasisError(f"per-tensor Gram matrix of {name!r} is {grams[name].shape}, there are {T} tasks")
    save_matrices(tmp / TENSOR_GRAM, {name: grams[name] for name in names})
    manifest["tensor_stats"] = {"gram": TENSOR_GRAM}
    if nonzero_rows is not None:
        for name in names:
            if nonzero_rows[name].shape != (T,):
                raise TvbasisError(f"row counts of {name!r} are {nonzero_rows[name].shape}, there are {T} tasks")
        counts = {name: np.ascontiguousarray(nonzero_rows[name], dtype=np.int64) for name in names}
        save_numpy(counts, str(tmp / TENSOR_ROWS))
        manifest["tensor_stats"]["nonzero_rows"] = TENSOR_ROWS
    if row_energy is not None:
        save_matrices(tmp / TENSOR_ROW_ENERGY, {name: row_energy[name] for name in names})
        manifest["tensor_stats"]["row_energy"] = TENSOR_ROW_ENERGY


def _check_hashes(tvs: TaskVectorSet, known: GramStats, hashes: list[str]) -> None:
    """Refuse to finish a store whose inputs differ from those the known Gram matrix came from."""
    for path, was, now in zip(
        [tvs.base.path, *(s.path for s in tvs.sources)], [known.base_hash, *known.task_hashes], hashes, strict=True
    ):
        if was != now:
            raise TvbasisError(f"{path}: its weights changed since the store's Gram matrix was computed")


def finalise_store(tmp: Path, manifest: dict[str, Any]) -> None:
    """Write the model card and, last, the manifest; byte counts include both of them.

    ``manifest`` needs everything but ``files`` and ``bytes``, which are filled in here.
    """
    sizes = file_sizes(tmp)
    card_len = man_len = 0
    # The counts appear in the texts they count. Plain iteration can oscillate (a length that
    # changes the ratio's digits changes the length back), so the lengths only grow, and each
    # text is then padded with trailing spaces to exactly the length it states.
    for _ in range(20):
        manifest["files"] = {**sizes, "README.md": card_len}
        manifest["bytes"] = _byte_counts(manifest["files"], man_len, manifest["dim"], manifest["n_tasks"])
        card = _model_card(manifest).encode()
        text = (json.dumps(manifest, indent=2) + "\n").encode()
        if len(card) <= card_len and len(text) <= man_len:
            break
        card_len, man_len = max(card_len, len(card)), max(man_len, len(text))
    else:
        raise RuntimeError("manifest byte counts did not converge")
    card = card[:-1] + b" " * (card_len - len(card)) + b"\n"
    text = text[:-1] + b" " * (man_len - len(text)) + b"\n"
    (tmp / "README.md").write_bytes(card)
    (tmp / MANIFEST).write_bytes(text)  # last: its presence marks the store complete


def _write_atoms(
    tvs: TaskVectorSet,
    method: BasisMethod,
    tmp: Path,
    names: list[str],
    dtype: str,
    chunk_elements: int,
    max_shard_bytes: int,
    vectors: list[dict[str, Any]],
    measure: bool,
    measure_unrounded: bool = False,
    hashers: list[ContentHash] | None = None,
    engine: Engine | None = None,
    covered: set[str] | None = None,
) -> AtomStats | None:
    """Write the atoms; with ``measure``, also return the inner products of the atoms as stored
    (and with ``measure_unrounded``, of the atoms before rounding to the store dtype).
    ``covered``: the tensors the atoms cover (all if None); they are zero on the others."""
    shapes = {i.name: i.shape for i in tvs.tensors if covered is None or i.name in covered}
    writer = AtomWriter(tmp / ATOMS_DIR, names, shapes, dtype, max_shard_bytes)
    writer.create()
    vectors.extend(writer.vectors(ATOMS_DIR))
    try:
        return (engine or LocalEngine()).atom_pass(
            tvs,
            method.atom_rows,
            writer,
            chunk_elements,
            measure=measure,
            measure_unrounded=measure_unrounded,
            hashers=hashers,
        )
    finally:
        writer.close()


def _manifest(
    tvs: TaskVectorSet,
    method: BasisMethod,
    base_hash: str,
    task_hashes: list[str],
    metrics: dict[str, np.ndarray],
    dtype: str,
    vectors: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        **manifest_header(method, tvs.n_tasks, tvs.dim),
        "tasks": [
            {
                "name": src.name,
                "source": str(src.path),
                "content_hash": task_hashes[t] if task_hashes else "",
                "norm": float(np.sqrt(metrics["sq_norm"][t])),
                "rel_error": float(metrics["rel_error"][t]),
                "cosine": float(metrics["cosine"][t]),
                **({"input": "lora-adapter"} if tvs.is_lora(t) else {}),
            }
            for t, src in enumerate(tvs.sources)
        ],
        "selection": {"include": tvs.include, "exclude": tvs.exclude},
        "layout": [[i.name, list(i.shape), str(i.dtype).removeprefix("torch.")] for i in tvs.tensors],
        "content_hash_algorithm": CONTENT_HASH,
        "base": base_fingerprint(tvs.base, base_hash),
        "atoms": {"stored": method.stores_atoms, "dtype": dtype, "vectors": vectors},
    }


def manifest_header(
    method: BasisMethod, n_tasks: int, dim: int, report: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The manifest's format, version, method (settings, fitted state, ``report``) and sizes."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tvbasis_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": {
            "name": method.name,
            "params": method.get_params(),
            "state": method.state_scalars(),
            "report": method.report() if report is None else report,
        },
        "n_atoms": method.n_atoms,
        "n_tasks": n_tasks,
        "n_vectors": method.n_vectors,
        "has_mean": method.has_mean_,
        "dim": dim,
    }


def _byte_counts(files: dict[str, int], manifest_bytes: int, dim: int, n_tasks: int) -> dict[str, Any]:
    atoms = sum(s for f, s in files.items() if f.startswith(f"{ATOMS_DIR}/"))
    total = sum(files.values()) + manifest_bytes
    original = dim * n_tasks * 4
    # The per-tensor statistics (Gram matrices, row counts and energies) count as matrices (also shown apart).
    stats_bytes = sum(files.get(f, 0) for f in (TENSOR_GRAM, TENSOR_ROWS, TENSOR_ROW_ENERGY))
    tensor_gram = {"tensor_gram": stats_bytes} if TENSOR_GRAM in files else {}
    matrices = files.get(MATRICES, 0) + stats_bytes
    residuals = sum(s for f, s in files.items() if f.startswith(f"{RESIDUALS_DIR}/"))
    return {
        "atoms": atoms,
        "matrices": matrices,
        **tensor_gram,
        **({"residuals": residuals} if residuals else {}),
        "other": total - atoms - matrices - residuals - manifest_bytes,
        "total": total,
        "original_fp32": original,
        "ratio": total / original if original else 0.0,
        "manifest": manifest_bytes,
    }
