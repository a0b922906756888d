"""Hugging Face model directories in and out: the edited model loads with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from tvbasis.arithmetic import edit_model, task_coefficients, task_weights  # noqa: E402
from tvbasis.build import build_store  # noqa: E402
from tvbasis.methods import make_method  # noqa: E402
from tvbasis.tasks import TaskSource  # noqa: E402

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog"]


def tiny_bert(
    directory: Path, seed: int, shard: str | None = None, delta_from: Path | None = None, scale: float = 0.0
) -> Path:
    """A 2-layer BERT saved with save_pretrained (optionally sharded) plus a real tokenizer."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = (
        transformers.BertModel(config)
        if delta_from is None
        else transformers.BertModel.from_pretrained(delta_from, use_safetensors=True)
    )
    if scale:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(directory, **kw)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_edited_hf_directory_loads_with_transformers(tmp_path: Path, shard: str | None) -> None:
    base = tiny_bert(tmp_path / "base", 0, shard)
    tasks = [TaskSource(f"t{i}", tiny_bert(tmp_path / f"ft{i}", 10 + i, shard, base, 0.01)) for i in range(3)]
    store = build_store(base, tasks, make_method("pca", 3), tmp_path / "store")
    a = task_weights(store.task_names, {"t0": 1.0, "t2": -0.5})
    out = edit_model(base, store, task_coefficients(store.decoder, a), tmp_path / "edited")

    base_files = sorted(p.name for p in base.iterdir())
    assert sorted(p.name for p in out.iterdir()) == base_files  # same shards, config and tokenizer
    if shard:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]

    edited = transformers.AutoModel.from_pretrained(out, use_safetensors=True)
    b = transformers.AutoModel.from_pretrained(base, use_safetensors=True).state_dict()
    f0 = transformers.AutoModel.from_pretrained(tasks[0].path, use_safetensors=True).state_dict()
    f2 = transformers.AutoModel.from_pretrained(tasks[2].path, use_safetensors=True).state_dict()
    for name, value in edited.state_dict().items():
        if value.is_floating_point():
            expected = b[name] + (f0[name] - b[name]) - 0.5 * (f2[name] - b[name])
            torch.testing.assert_close(value, expected, atol=1e-5, rtol=0)
        else:
            assert torch.equal(value, b[name])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        hidden = edited(**tok(["the cat sat"], return_tensors="pt")).last_hidden_state
    assert hidden.shape == (1, 5, 16) and torch.isfinite(hidden).all()


def test_bin_directory_base_gives_safetensors_output(tmp_path: Path) -> None:
    base = tiny_bert(tmp_path / "base", 0)
    tasks = [TaskSource(f"t{i}", tiny_bert(tmp_path / f"ft{i}", 10 + i, None, base, 0.01)) for i in range(2)]
    # the same base as an older-style directory with pytorch_model.bin
    bin_base = tmp_path / "bin-base"
    bin_base.mkdir()
    for p in base.iterdir():
        if p.suffix != ".safetensors":
            (bin_base / p.name).write_bytes(p.read_bytes())
    torch.save(load_file(str(base / "model.safetensors")), bin_base / "pytorch_model.bin")
    store = build_store(bin_base, tasks, make_method("sample", 2), tmp_path / "store")
    out = edit_model(bin_base, store, task_coefficients(store.decoder, np.array([1.0, 0.0])), tmp_path / "out")
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    edited = transformers.AutoModel.from_pretrained(out, use_safetensors=True).state_dict()
    f0 = transformers.AutoModel.from_pretrained(tasks[0].path, use_safetensors=True).state_dict()
    for name, value in edited.items():
        torch.testing.assert_close(value, f0[name], atol=1e-5, rtol=0)
