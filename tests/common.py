"""Tiny random models built on the fly, and dense references to check the streaming code against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tvbasis.tasks import TaskSource

# A small model with the tensor kinds real checkpoints have: 2-D weights, 1-D biases and
# norms, a 0-d scalar, an integer buffer, and a per-task head.
SHAPES: dict[str, tuple[int, ...]] = {
    "embed.weight": (37, 8),
    "layer.0.attn.weight": (8, 8),
    "layer.0.attn.bias": (8,),
    "layer.0.norm.weight": (8,),
    "layer.1.mlp.weight": (19, 8),
    "layer.1.mlp.bias": (19,),
    "logit_scale": (),
    "head.weight": (3, 8),
}


def base_state(seed: int = 0, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) for k, s in (shapes or SHAPES).items()}
    state["position_ids"] = torch.arange(12, dtype=torch.int64)
    return state


def task_deltas(
    T: int, seed: int = 1, rank: int | None = None, shapes: dict[str, tuple[int, ...]] | None = None, scale: float = 0.1
) -> list[dict[str, torch.Tensor]]:
    """T random task vectors; with ``rank`` they share a rank-``rank`` structure plus noise."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: s for k, s in (shapes or SHAPES).items() if k != "head.weight"}
    if rank is None:
        return [{k: scale * torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(T)]
    dirs = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(rank)]
    mix = torch.randn((T, rank), generator=g)
    out = []
    for t in range(T):
        d = {k: sum(mix[t, r] * dirs[r][k] for r in range(rank)) for k in shapes}
        out.append({k: scale * (v + 0.05 * torch.randn(v.shape, generator=g)) for k, v in d.items()})
    return out


@dataclass
class Family:
    base: Path
    tasks: list[TaskSource]
    base_state: dict[str, torch.Tensor]
    deltas: list[dict[str, torch.Tensor]]
    names: list[str]  # task-vector tensors, in order

    def dense(self) -> np.ndarray:
        """The D x T matrix V, as the reference implementation would hold it."""
        cols = [np.concatenate([d[n].double().reshape(-1).numpy() for n in self.names]) for d in self.deltas]
        return np.stack(cols, axis=1)


def write_family(
    root: Path,
    T: int = 5,
    rank: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    untouched_rows: float = 0.0,
) -> Family:
    """Base and T fine-tunes as single safetensors files; heads differ per task (exclude them).

    ``untouched_rows``: the share of ``embed.weight``'s rows each task leaves exactly as in the
    base (a random set per task), as fine-tuning does with the embeddings of unseen tokens."""
    root.mkdir(parents=True, exist_ok=True)
    base = base_state(seed)
    deltas = task_deltas(T, seed + 1, rank)
    if untouched_rows:
        g = torch.Generator().manual_seed(seed + 7)
        for d in deltas:
            rows = d["embed.weight"].shape[0]
            d["embed.weight"][torch.randperm(rows, generator=g)[: round(untouched_rows * rows)]] = 0.0
    save_file(
        {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in base.items()}, str(root / "base.safetensors")
    )
    tasks = []
    exact = []  # the task vectors exactly as the files hold them
    g = torch.Generator().manual_seed(seed + 99)
    for t, d in enumerate(deltas):
        ft = {k: (v + d[k]).to(dtype) if k in d else v.clone() for k, v in base.items()}
        ft["head.weight"] = torch.randn(SHAPES["head.weight"], generator=g).to(dtype)  # task-specific
        p = root / f"task{t}.safetensors"
        save_file(ft, str(p))
        tasks.append(TaskSource(f"task{t}", p))
        exact.append({k: ft[k].double() - base[k].to(dtype).double() for k in d})
    deltas = exact
    names = [k for k in base if k not in ("position_ids", "head.weight")]
    return Family(root / "base.safetensors", tasks, base, deltas, names)


#: Larger matrices than SHAPES, so payloads outweigh headers as in real models (budget planning).
LARGE_SHAPES = {**SHAPES, "big.weight": (256, 128), "big2.weight": (192, 160)}


def write_large_family(root: Path, T: int = 6, rank: int | None = None, seed: int = 0) -> Family:
    """``write_family`` with the two large matrices of ``LARGE_SHAPES`` added."""
    old = dict(SHAPES)
    SHAPES.update(LARGE_SHAPES)
    try:
        return write_family(root, T=T, rank=rank, seed=seed)
    finally:
        SHAPES.clear()
        SHAPES.update(old)


def flat(state: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    """Concatenate the named tensors of a state dict into one float64 vector."""
    return np.concatenate([state[n].double().reshape(-1).numpy() for n in names])


def read_flat(path: Path, names: list[str]) -> np.ndarray:
    """A safetensors file (or HF directory) flattened over ``names``."""
    from tvbasis.io import open_checkpoint

    ckpt = open_checkpoint(path)
    return np.concatenate([ckpt.read(n).double().reshape(-1).numpy() for n in names])


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: relative path -> sha256 of its bytes ("<dir>" for a folder).

    Equal digests before and after a command mean it changed no input and left nothing behind.
    """
    import hashlib

    return {
        p.relative_to(root).as_posix(): "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def save_hf_sharded(state: dict[str, torch.Tensor], directory: Path, n_shards: int = 2) -> Path:
    """``state`` as a Hugging Face sharded safetensors directory (index + ``n_shards`` shard files)."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    per = -(-len(names) // n_shards)
    weight_map: dict[str, str] = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[i * per : (i + 1) * per]}
        save_file(part, str(directory / fname))
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def tiny_bert_config(**overrides: int):
    """A 2-layer, 32-wide BERT configuration for tests that need a real transformers model."""
    import transformers

    settings = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "vocab_size": 100,
        "max_position_embeddings": 24,
        **overrides,
    }
    return transformers.BertConfig(**settings)
