"""Edits written as PEFT LoRA adapters: PEFT loads them, and merged they are base + the truncated delta."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from typer.testing import CliRunner  # noqa: E402

from common import tiny_bert_config  # noqa: E402
from tvbasis.arithmetic import combination_state, task_coefficients, task_weights  # noqa: E402
from tvbasis.build import build_store  # noqa: E402
from tvbasis.cli import app  # noqa: E402
from tvbasis.interop.peft import LoraReport, choose_rank, write_lora_adapter  # noqa: E402
from tvbasis.methods import make_method  # noqa: E402
from tvbasis.store.format import Store  # noqa: E402
from tvbasis.tasks import TaskSource  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
WEIGHTS = {"t0": 1.0, "t2": -0.5}


def save_model(directory: Path, cls: type, seed: int, base: Path | None = None) -> Path:
    """A tiny BERT of class ``cls``: random (``base`` None) or ``base`` plus a full-rank perturbation."""
    torch.manual_seed(seed)
    model = cls(tiny_bert_config()) if base is None else cls.from_pretrained(base, use_safetensors=True)
    if base is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(directory)
    return directory


@dataclass
class Setup:
    base: Path
    store: Store
    coefs: np.ndarray
    delta: dict[str, torch.Tensor]  # the combination, float64, checkpoint names


def make_setup(root: Path, cls: type) -> Setup:
    base = save_model(root / "base", cls, 0)
    tasks = [TaskSource(f"t{i}", save_model(root / f"ft{i}", cls, 10 + i, base)) for i in range(3)]
    store = build_store(base, tasks, make_method("pca", 3), root / "store")  # T atoms: exact reconstructions
    coefs = task_coefficients(store.decoder, task_weights(store.task_names, WEIGHTS))
    return Setup(base, store, coefs, combination_state(store, coefs, torch.float64))


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return make_setup(tmp_path_factory.mktemp("bert"), transformers.BertModel)


@pytest.fixture(scope="module")
def bert_cls(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """A checkpoint saved from BertForSequenceClassification: tensor names carry ``bert.``."""
    return make_setup(tmp_path_factory.mktemp("bert_cls"), transformers.BertForSequenceClassification)


def merged_state(cls: type, base: Path, adapter: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base state, state of base + adapter merged by PEFT)."""
    reference = cls.from_pretrained(base, use_safetensors=True).state_dict()
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(base, use_safetensors=True), adapter)
    return reference, model.merge_and_unload().state_dict()


def check_merged(
    setup: Setup, report: LoraReport, cls: type, rename: dict[str, str] | None = None, atol: float = 1e-5
) -> None:
    """Every LoRA tensor merges to base + (truncated) delta; every other tensor is the base's."""
    reference, merged = merged_state(cls, setup.base, report.out)
    lora = {t.name for t in report.tensors}
    seen = set()
    for name, delta in setup.delta.items():
        key = (rename or {}).get(name, name)
        if key not in merged:
            continue
        seen.add(key)
        got = merged[key].double() - reference[key].double()
        if name in lora and report.ranks[next(t.module for t in report.tensors if t.name == name)] == min(delta.shape):
            torch.testing.assert_close(got, delta, atol=atol, rtol=0)
        elif name not in lora:
            assert torch.equal(merged[key], reference[key]), name
    assert {(rename or {}).get(t.name, t.name) for t in report.tensors} <= seen


def svals(delta: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    return torch.linalg.svdvals(delta.T if transpose else delta)


# -- the adapter ------------------------------------------------------------------------------


def test_full_rank_adapter_loads_with_peft_and_merges_to_base_plus_delta(bert: Setup, tmp_path: Path) -> None:
    report = write_lora_adapter(bert.store, bert.coefs, tmp_path / "adapter", base=bert.base, rank=64)
    assert sorted(p.name for p in report.out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tvbasis_lora.json",
    ]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    # Every 2-D weight is LoRA (Linear and Embedding); everything left out is 1-D.
    two_d = {n for n, d in bert.delta.items() if d.dim() == 2}
    assert {t.name for t in report.tensors} == two_d
    assert all(len(x.shape) == 1 for x in report.left_out)
    kinds = {t.name: t.kind for t in report.tensors}
    assert kinds["embeddings.word_embeddings.weight"] == "embedding"
    assert kinds["encoder.layer.0.attention.self.query.weight"] == "linear"
    assert report.truncation_error < 1e-7
    total = sum(float((d**2).sum()) for d in bert.delta.values())
    left = sum(float((bert.delta[x.name] ** 2).sum()) for x in report.left_out)
    assert report.left_out_share == pytest.approx(left / total, rel=1e-9)
    assert report.total_error == pytest.approx(math.sqrt(left / total), rel=1e-6)

    # PEFT's own key names and config.
    keys = set(load_file(report.out / "adapter_model.safetensors"))
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight" in keys
    assert "base_model.model.embeddings.word_embeddings.lora_embedding_A" in keys
    cfg = json.loads((report.out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["bias"] == "none" and cfg["lora_alpha"] == cfg["r"] == 32
    assert cfg["rank_pattern"] == cfg["alpha_pattern"]  # scale 1 everywhere
    assert cfg["rank_pattern"]["embeddings.token_type_embeddings"] == 2  # capped at min(2, 32)
    assert sorted(cfg["target_modules"]) == sorted(t.module for t in report.tensors)

    check_merged(bert, report, transformers.BertModel)


def test_low_rank_error_is_the_dense_truncation_error(bert: Setup, tmp_path: Path) -> None:
    report = write_lora_adapter(bert.store, bert.coefs, tmp_path / "adapter", base=bert.base, rank=2)
    assert set(report.ranks.values()) == {2}
    cfg = json.loads((report.out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 2 and cfg["rank_pattern"] == {}

    reference, merged = merged_state(transformers.BertModel, bert.base, report.out)
    tail = norm = 0.0
    for t in report.tensors:
        delta = bert.delta[t.name]
        residual = delta - (merged[t.name].double() - reference[t.name].double())
        dense = float(residual.norm() / delta.norm())
        assert t.rel_error == pytest.approx(dense, abs=1e-5), t.name
        s = svals(delta)
        assert t.rel_error == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-9)  # Eckart-Young
        tail += float((residual**2).sum())
        norm += float((delta**2).sum())
    assert report.truncation_error > 0.1
    assert report.truncation_error == pytest.approx(math.sqrt(tail / norm), abs=1e-5)
    saved = json.loads((report.out / "tvbasis_lora.json").read_text())
    assert saved["truncation_error"] == pytest.approx(report.truncation_error)


def test_energy_threshold_picks_the_least_rank_keeping_that_share(bert: Setup, tmp_path: Path) -> None:
    energy = 0.8
    report = write_lora_adapter(bert.store, bert.coefs, tmp_path / "adapter", base=bert.base, energy=energy)
    for t in report.tensors:
        sq = svals(bert.delta[t.name]) ** 2
        share = torch.cumsum(sq, 0) / sq.sum()
        expected = int((share < energy).sum()) + 1
        assert t.rank == expected, t.name
        assert t.rel_error <= math.sqrt(1 - energy) + 1e-12
    assert len(set(report.ranks.values())) > 1  # differing ranks go through rank_pattern

    model = peft.PeftModel.from_pretrained(
        transformers.BertModel.from_pretrained(bert.base, use_safetensors=True), report.out
    )
    loaded = {
        name.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight"): p.shape[0]
        for name, p in model.named_parameters()
        if name.endswith(".lora_A.default.weight")
    }
    assert loaded == {m: r for m, r in report.ranks.items() if "embeddings" not in m}
    check_merged(bert, report, transformers.BertModel)  # untruncated ones exact, the rest untouched


def test_choose_rank() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    assert choose_rank(s, 2, None) == 2
    assert choose_rank(s, 99, None) == 4  # capped at the matrix's size
    assert choose_rank(s, None, 1.0) == 3  # full numerical rank, not the zero
    assert choose_rank(s, None, 9 / 14) == 1
    assert choose_rank(s, None, 9 / 14 + 1e-6) == 2
    assert choose_rank(torch.zeros(3, dtype=torch.float64), None, 0.5) == 0


# -- checkpoints whose names carry the base model's prefix ------------------------------------


def test_prefixed_checkpoint_gives_an_adapter_for_its_own_class(bert_cls: Setup, tmp_path: Path) -> None:
    report = write_lora_adapter(bert_cls.store, bert_cls.coefs, tmp_path / "adapter", base=bert_cls.base, rank=64)
    keys = set(load_file(report.out / "adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.1.output.dense.lora_A.weight" in keys
    assert "base_model.model.classifier.lora_A.weight" in keys
    check_merged(bert_cls, report, transformers.BertForSequenceClassification)


def test_prefixed_checkpoint_to_headless_model_drops_the_prefix(bert_cls: Setup, tmp_path: Path) -> None:
    report = write_lora_adapter(
        bert_cls.store, bert_cls.coefs, tmp_path / "adapter", base=bert_cls.base, rank=64, model_class="BertModel"
    )
    keys = set(load_file(report.out / "adapter_model.safetensors"))
    assert "base_model.model.encoder.layer.1.output.dense.lora_A.weight" in keys
    assert not [k for k in keys if ".bert." in k or "classifier" in k]
    assert [x.reason for x in report.left_out if x.name == "classifier.weight"] == ["no such module in the model"]
    rename = {n: n.removeprefix("bert.") for n in bert_cls.delta}
    check_merged(bert_cls, report, transformers.BertModel, rename)


def test_target_modules_limits_the_adapter(bert: Setup, tmp_path: Path) -> None:
    report = write_lora_adapter(
        bert.store, bert.coefs, tmp_path / "adapter", base=bert.base, rank=3, target_modules=["query", "value"]
    )
    assert sorted(report.ranks) == sorted(
        f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")
    )
    assert "not in target_modules" in {x.reason for x in report.left_out}
    check_merged(bert, report, transformers.BertModel)


def test_gpt2_conv1d_and_tied_embedding(tmp_path: Path) -> None:
    """GPT-2's Conv1D weights are (in, out): PEFT's fan_in_fan_out layout; wte is tied to lm_head."""
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=12)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    tasks = []
    for i in range(2):
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", use_safetensors=True)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape))
        model.save_pretrained(tmp_path / f"ft{i}")
        tasks.append(TaskSource(f"t{i}", tmp_path / f"ft{i}"))
    store = build_store(tmp_path / "base", tasks, make_method("pca", 2), tmp_path / "store")
    coefs = task_coefficients(store.decoder, task_weights(store.task_names, {"t0": 1.0, "t1": 0.5}))
    setup = Setup(tmp_path / "base", store, coefs, combination_state(store, coefs, torch.float64))
    report = write_lora_adapter(store, coefs, tmp_path / "adapter", base=setup.base, rank=64)
    kinds = {t.module: t.kind for t in report.tensors}
    assert kinds["transformer.h.0.attn.c_attn"] == "conv1d" and kinds["transformer.wte"] == "embedding"
    assert json.loads((report.out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    check_merged(setup, report, transformers.GPT2LMHeadModel)


# -- the command line -------------------------------------------------------------------------


def edit_args(setup: Setup, out: Path, *extra: str) -> list[str]:
    return [
        "edit",
        "--base",
        str(setup.base),
        "--store",
        str(setup.store.path),
        "--add",
        "t0=1",
        "--add",
        "t2=-0.5",
        "--out",
        str(out),
        *extra,
    ]


def test_cli_as_lora(bert: Setup, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    result = runner.invoke(app, edit_args(bert, out, "--as-lora", "--rank", "4", "--quiet"))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    result = runner.invoke(app, edit_args(bert, out, "--as-lora", "--energy", "0.9", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    assert "truncation error" in result.stdout and "of the delta's squared norm" in result.stdout
    report = json.loads((out / "tvbasis_lora.json").read_text())
    assert f"{report['truncation_error']:.4g}" in result.stdout
    assert (
        peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(bert.base, use_safetensors=True), out)
        is not None
    )


@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        (["--as-lora", "--rank", "0"], "--rank 0"),
        (["--as-lora", "--energy", "1.5"], "--energy 1.5"),
        (["--as-lora", "--energy", "0"], "--energy 0.0"),
        (["--as-lora", "--rank", "2", "--energy", "0.5"], "--rank and --energy"),
        (["--as-lora"], "--as-lora needs --rank"),
        (["--rank", "2"], "apply to --as-lora only"),
        (["--as-lora", "--rank", "2", "--lora-model-class", "NoSuchModel"], "NoSuchModel"),
    ],
)
def test_cli_bad_lora_options(bert: Setup, tmp_path: Path, extra: Sequence[str], culprit: str) -> None:
    out = tmp_path / "adapter"
    result = runner.invoke(app, edit_args(bert, out, *extra))
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []
