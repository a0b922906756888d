"""Write task vectors and edited models from a store, one tensor chunk at a time."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from tvbasis.arithmetic.merge import MergeSpec, TaskMerger
from tvbasis.engine.streaming import DEFAULT_CHUNK_ELEMENTS
from tvbasis.errors import CheckpointError, TvbasisError
from tvbasis.io.checkpoint import BIN_INDEX, SAFETENSORS_INDEX, Checkpoint, open_checkpoint
from tvbasis.io.hashing import CONTENT_HASH, ContentHash
from tvbasis.io.outputs import atomic_output, check_output_path
from tvbasis.io.paths import is_remote
from tvbasis.io.writer import SafetensorsStreamWriter, ShardedWriter, TensorSpec, shard_plan, tensor_bytes
from tvbasis.progress import progress
from tvbasis.store.format import Store
from tvbasis.tasks.taskvectors import plan_chunks

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _row_shape(store: Store, name: str, start: int, stop: int) -> tuple[int, ...]:
    shape = store.shape_of(name)
    return (stop - start, *shape[1:]) if shape else ()


def iter_combination(
    store: Store,
    coefficients: np.ndarray,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    residual_weights: np.ndarray | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(tensor name, rows)`` of ``sum_k c_k s_k`` (plus ``sum_t r_t R_hat_t`` of a store's coded
    residuals, ``r = residual_weights``) chunk by chunk, float64, shaped like the tensor's rows."""
    for chunk in plan_chunks(store.tensors, chunk_elements):
        rows = store.combination_rows(chunk, coefficients, residual_weights)
        yield chunk.tensor, rows.reshape(_row_shape(store, chunk.tensor, chunk.start, chunk.stop))


def combination_state(
    store: Store,
    coefficients: np.ndarray,
    dtype: torch.dtype = torch.float32,
    residual_weights: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """``sum_k c_k s_k`` (+ ``sum_t r_t R_hat_t``) as an in-memory state dict (one model's worth of tensors)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for name, rows in iter_combination(store, coefficients, residual_weights=residual_weights):
        parts.setdefault(name, []).append(rows.to(dtype))
    return {n: torch.cat(p) if p[0].dim() else p[0] for n, p in parts.items()}


def write_task_vector(
    store: Store,
    coefficients: np.ndarray,
    out: str | Path,
    *,
    dtype: str = "fp32",
    overwrite: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    residual_weights: np.ndarray | None = None,
) -> Path:
    """Write ``sum_k c_k s_k`` (+ ``sum_t r_t R_hat_t``) as one safetensors file keyed by the base's tensor names."""
    out = Path(out)
    if dtype not in DTYPES:
        raise TvbasisError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tensors = store.tensors
    specs = [TensorSpec(i.name, i.shape, DTYPES[dtype]) for i in tensors]
    with atomic_output(out, overwrite=overwrite, directory=False) as tmp:
        with (
            SafetensorsStreamWriter(tmp, specs, metadata={"tvbasis_store": str(store.path)}) as w,
            progress(sum(i.numel for i in tensors), "Writing", unit="param") as bar,
        ):
            for name, rows in iter_combination(store, coefficients, chunk_elements, residual_weights):
                w.write(name, rows)
                bar.update(rows.numel())
    return out


def reconstruct_task(store: Store, task: str, out: str | Path, **kwargs: object) -> Path:
    """Write task ``task``'s reconstructed task vector (basis and coded residual), reading only the store."""
    t = store.task_index(task)
    return write_task_vector(store, store.decoder[:, t], out, residual_weights=np.eye(store.n_tasks)[t], **kwargs)  # type: ignore[arg-type]


def check_base_layout(store: Store, base: Checkpoint) -> None:
    """Refuse a base whose tensor names, shapes or dtypes differ from the store's base."""
    if store.manifest["base"].get("known") is False:
        raise CheckpointError(
            f"{store.path}: the store records no base (it was imported from a run that keeps none), so "
            f"{base.path} cannot be checked; pass --ignore-base-mismatch if it is the right base"
        )
    expected = {name: (tuple(shape), dtype) for name, shape, dtype in store.manifest["base"]["tensors"]}
    actual = {i.name: (i.shape, str(i.dtype).removeprefix("torch.")) for i in base.infos()}
    for name, (shape, dtype) in expected.items():
        if name not in actual:
            raise CheckpointError(
                f"{base.path}: base does not match the store: tensor {name!r} is missing "
                f"(pass --ignore-base-mismatch to override)"
            )
        if actual[name] != (shape, dtype):
            raise CheckpointError(
                f"{base.path}: base does not match the store: tensor {name!r} is "
                f"{actual[name][1]} {list(actual[name][0])}, the store's base had {dtype} {list(shape)} "
                f"(pass --ignore-base-mismatch to override)"
            )
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise CheckpointError(
            f"{base.path}: base does not match the store: it has tensor {extra[0]!r} "
            f"that the store's base had not (pass --ignore-base-mismatch to override)"
        )


def _output_plan(base: Checkpoint, out: Path, max_shard_bytes: int) -> tuple[bool, list[tuple[str, list[TensorSpec]]]]:
    """Whether the output is a directory, and its files: the base's own layout where it is safetensors."""
    specs = {i.name: TensorSpec(i.name, i.shape, i.dtype) for i in base.infos()}
    if base.kind in ("hf-safetensors", "hf-sharded-safetensors"):
        plan = [(f.name, [specs[n] for n in base.names_in(f)]) for f in base.weight_files()]
        return True, plan
    if base.kind in ("hf-bin", "hf-sharded-bin"):
        return True, shard_plan(list(specs.values()), max_shard_bytes, stem="model")
    if out.suffix != ".safetensors":
        raise TvbasisError(
            f"--out {out}: the base is a single file, so the edited model is one "
            f"safetensors file; name it *.safetensors"
        )
    return False, [(out.name, list(specs.values()))]


def _copy_side_files(base: Checkpoint, dest: Path) -> None:
    """Copy config, tokenizer and every other non-weight file of an HF model directory."""
    weights = {f.resolve() for f in base.weight_files()}
    skip = {SAFETENSORS_INDEX, BIN_INDEX}
    for src in sorted(base.path.iterdir()):
        if src.resolve() in weights or src.name in skip or src.name.startswith("."):
            continue
        if src.is_dir():
            shutil.copytree(src, dest / src.name)
        else:
            shutil.copy2(src, dest / src.name)


def edit_model(
    base: str | Path,
    store: Store,
    coefficients: np.ndarray,
    out: str | Path,
    *,
    overwrite: bool = False,
    ignore_base_mismatch: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    max_shard_bytes: int = 5 * 1024**3,
    merge: MergeSpec | None = None,
    tensor_coefficients: Mapping[str, np.ndarray] | None = None,
    residual_weights: np.ndarray | None = None,
) -> Path:
    """Write ``theta_0 + sum_k c_k s_k`` with the base's layout, streaming tensor chunk by chunk.

    Needs only the base and the store. The base must match the store's fingerprint: names,
    shapes and dtypes are checked first; the content hash is computed while streaming and
    checked before the output is given its final name.

    With ``merge``, the delta is ``scale * merge(a_t tau_hat_t)`` (TIES or DARE, see
    ``arithmetic.merge``) instead, and ``coefficients`` is not used. ``tensor_coefficients`` gives
    some tensors their own ``c`` (block-wise compositions); the others use ``coefficients``.
    ``residual_weights`` ``r`` adds ``sum_t r_t R_hat_t`` of a store's coded residuals (task
    arithmetic with weights ``a``: ``c = W a``, ``r = a``; see ``arithmetic.task_combination``).
    """
    if tensor_coefficients is not None and store.residuals is not None:
        raise TvbasisError(
            f"{store.path}: the store codes residuals per task, so block-wise coefficients over its vectors "
            f"cannot express a composition; build the store without residual codes"
        )
    out = Path(out)
    check_output_path(out, overwrite)
    ckpt = open_checkpoint(base)
    if is_remote(ckpt.path):
        raise TvbasisError(f"{ckpt.path}: edit reads a local base only (it copies its layout and side files)")
    if not ignore_base_mismatch:
        check_base_layout(store, ckpt)
        algorithm = store.manifest.get("content_hash_algorithm")
        if algorithm != CONTENT_HASH:
            raise TvbasisError(
                f"{store.path}: its base hash is {algorithm or 'of an unknown kind'}, this tvbasis checks "
                f"{CONTENT_HASH} (pass --ignore-base-mismatch to edit without the content check)"
            )
    is_dir, plan = _output_plan(ckpt, out, max_shard_bytes)
    layout = {i.name: i for i in store.tensors}
    for name in layout:
        if name not in ckpt:
            raise CheckpointError(f"{ckpt.path}: base lacks tensor {name!r} that the store edits")
        if ckpt.info(name).shape != layout[name].shape:
            raise CheckpointError(
                f"{ckpt.path}: tensor {name!r} has shape {list(ckpt.info(name).shape)}, "
                f"the store's is {list(layout[name].shape)}"
            )
    merger = TaskMerger(store, merge, chunk_elements) if merge is not None else None
    hasher = ContentHash()
    total = sum(i.numel for i in ckpt.infos())
    with atomic_output(out, overwrite=overwrite, directory=is_dir) as tmp:
        target_dir = tmp if is_dir else tmp.parent
        plan = plan if is_dir else [(tmp.name, plan[0][1])]
        with (
            ShardedWriter(
                target_dir, plan, index_name=SAFETENSORS_INDEX if is_dir else None, metadata={"format": "pt"}
            ) as writer,
            progress(total, "Editing", unit="param") as bar,
        ):
            # Tensors go in layout order so the content hash matches the build's.
            order = [i.name for i in ckpt.infos()]
            for name in order:
                info = ckpt.info(name)
                if name not in layout:
                    writer.write(name, ckpt.read(name))
                    bar.update(info.numel)
                    continue
                for chunk in plan_chunks([info], chunk_elements):
                    rows = ckpt.read(name) if not info.shape else ckpt.read(name, chunk.start, chunk.stop)
                    hasher.update(tensor_bytes(rows))
                    if merger is not None:
                        flat = merger.rows(chunk)
                    else:
                        c = coefficients if tensor_coefficients is None else tensor_coefficients.get(name, coefficients)
                        flat = store.combination_rows(chunk, c, residual_weights)
                    delta = flat.reshape(rows.shape)
                    writer.write(name, (rows.to(torch.float64) + delta).to(info.dtype))
                    bar.update(chunk.numel)
                hasher.end_tensor()
        if not ignore_base_mismatch and hasher.hexdigest() != store.manifest["base"]["content_hash"]:
            raise CheckpointError(
                f"{ckpt.path}: base does not match the store: its weights differ from "
                f"those the store was built on (pass --ignore-base-mismatch to override)"
            )
        if is_dir and ckpt.path.is_dir():
            _copy_side_files(ckpt, tmp)
    return out
