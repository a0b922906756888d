"""PEFT LoRA adapters as task-vector inputs: real adapters made by peft on tiny random models.

An adapter's task vector must be what PEFT's ``merge_and_unload`` adds to the base; the Gram
entries between adapters come from the factors; a store built from adapters matches one built
from the merged checkpoints; and whatever is not plain LoRA is refused with one clear line.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from typer.testing import CliRunner  # noqa: E402

from common import tiny_bert_config, tree_digest  # noqa: E402
from tvbasis.arithmetic import combination_state  # noqa: E402
from tvbasis.build import build_store  # noqa: E402
from tvbasis.cli import app  # noqa: E402
from tvbasis.engine import streaming  # noqa: E402
from tvbasis.engine.streaming import LocalEngine, gram_pass, low_rank_gram  # noqa: E402
from tvbasis.errors import TvbasisError  # noqa: E402
from tvbasis.io.lora import LowRank  # noqa: E402
from tvbasis.methods import make_method  # noqa: E402
from tvbasis.store.format import Store  # noqa: E402
from tvbasis.tasks import TaskSource, TaskVectorSet  # noqa: E402
from tvbasis.tasks.taskvectors import plan_chunks  # noqa: E402
from tvbasis.update import add_task, refit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


#: Adapters of the BERT family: name -> (model class, LoraConfig settings, save as .bin).
ADAPTERS: dict[str, tuple[str, dict, bool]] = {
    "plain": ("BertModel", {"target_modules": ["query", "value"], "r": 4, "lora_alpha": 8}, False),
    "rslora": ("BertModel", {"target_modules": ["query", "dense"], "r": 3, "lora_alpha": 5, "use_rslora": True}, False),
    "pattern": (
        "BertModel",
        {
            "target_modules": ["key", "query"],
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": {"layer.1.attention.self.query": 2},
            "alpha_pattern": {"key": 3},
        },
        False,
    ),
    "embed": ("BertModel", {"target_modules": ["word_embeddings", "value"], "r": 2, "lora_alpha": 0.5}, False),
    "bin": ("BertModel", {"target_modules": ["value", "intermediate.dense"], "r": 5, "lora_alpha": 7}, True),
    # PEFT names this one's modules bert.encoder...; the base checkpoint (a BertModel) lacks the prefix.
    "prefixed": ("BertForSequenceClassification", {"target_modules": ["query"], "r": 2, "lora_alpha": 4}, False),
}


@dataclass
class Env:
    root: Path
    base: Path
    dense: Path  # a full fine-tune
    adapters: dict[str, Path]
    merged: dict[str, Path]  # each adapter merged by PEFT into a full checkpoint (BertModel naming)
    deltas: dict[str, dict[str, torch.Tensor]]  # merged minus base, float64
    names: list[str]  # the base's floating-point tensors, in order

    def vector(self, name: str) -> np.ndarray:
        d = self.deltas[name]
        return np.concatenate([d[n].reshape(-1).numpy() for n in self.names])


def make_adapter(base: Path, out: Path, cls_name: str, settings: dict, bin_file: bool, seed: int) -> Path:
    """Save a LoRA adapter with random (nonzero) A and B; return the merged model's directory."""
    cls = getattr(transformers, cls_name)
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        cls.from_pretrained(base, use_safetensors=True), peft.LoraConfig(init_lora_weights=False, **settings)
    )
    with torch.no_grad():  # A and B both random: a delta of full rank r
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.3)
    model.save_pretrained(out, safe_serialization=not bin_file)
    merged = model.merge_and_unload()
    merged_dir = out.parent / f"{out.name}-merged"
    if cls_name == "BertForSequenceClassification":
        merged = merged.bert
    merged.save_pretrained(merged_dir)
    return merged_dir


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    transformers.BertModel(tiny_bert_config()).save_pretrained(root / "base")
    base = root / "base"
    ft = transformers.BertModel.from_pretrained(base, use_safetensors=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    ft.save_pretrained(root / "dense")
    adapters, merged = {}, {}
    for i, (name, (cls_name, settings, bin_file)) in enumerate(ADAPTERS.items()):
        adapters[name] = root / name
        merged[name] = make_adapter(base, root / name, cls_name, settings, bin_file, 100 + i)
    assert (root / "bin" / "adapter_model.bin").is_file() and not (root / "bin" / "adapter_model.safetensors").exists()
    base_state = load_file(str(base / "model.safetensors"))
    names = [n for n, t in base_state.items() if t.is_floating_point()]
    deltas = {}
    for name, path in [*merged.items(), ("dense", root / "dense")]:
        state = load_file(str(path / "model.safetensors"))
        deltas[name] = {n: state[n].double() - base_state[n].double() for n in names}
    return Env(root, base, root / "dense", adapters, merged, deltas, names)


def dense_rows(tvs: TaskVectorSet, chunk_elements: int = 100) -> np.ndarray:
    """The D x T matrix V, materialised chunk by chunk by ``task_rows`` (float64)."""
    return np.concatenate([tvs.task_rows(tvs.read_rows(c)).numpy() for c in plan_chunks(tvs.tensors, chunk_elements)])


# -- the task vector of an adapter --------------------------------------------------------------


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_task_vector_is_the_merged_delta(env: Env, name: str) -> None:
    tvs = TaskVectorSet(env.base, [TaskSource(name, env.adapters[name])])
    assert tvs.lora_tasks == [0] and [i.name for i in tvs.tensors] == env.names
    got = dense_rows(tvs)[:, 0]
    want = env.vector(name)
    # PEFT merges in float32: agreement to float32 rounding of the merged weights
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    assert np.abs(want).max() > 0.01  # the adapter does change the model
    # zero exactly where the adapter leaves the model alone
    assert np.all(got[want == 0] == 0)


def test_scale_rules(env: Env) -> None:
    """rsLoRA divides by sqrt(r); rank_pattern/alpha_pattern act per module as PEFT matches them."""
    tvs = TaskVectorSet(env.base, [TaskSource(n, env.adapters[n]) for n in ("rslora", "pattern")])
    rs, pat = tvs.adapters
    assert rs is not None and pat is not None
    q = "encoder.layer.0.attention.self.query"
    assert rs.modules[q].scale == pytest.approx(5 / np.sqrt(3))
    assert pat.modules["encoder.layer.1.attention.self.query"].rank == 2
    assert pat.modules["encoder.layer.1.attention.self.query"].scale == pytest.approx(8 / 2)
    assert pat.modules["encoder.layer.0.attention.self.key"].scale == pytest.approx(3 / 4)
    assert pat.modules[q].scale == pytest.approx(8 / 4)


def test_gram_from_factors_equals_the_dense_gram(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    names = list(ADAPTERS)
    tvs = TaskVectorSet(env.base, [TaskSource(n, env.adapters[n]) for n in names])
    V = dense_rows(tvs)

    def no_rows(*args: object, **kw: object) -> None:
        raise AssertionError("the Gram pass materialised LoRA rows")

    monkeypatch.setattr(TaskVectorSet, "task_rows", no_rows)
    G = gram_pass(tvs, chunk_elements=100).gram
    np.testing.assert_allclose(G, V.T @ V, rtol=1e-12, atol=1e-12 * np.abs(G).max())
    # and against PEFT's merged deltas, to their float32 rounding
    W = np.stack([env.vector(n) for n in names], axis=1)
    np.testing.assert_allclose(G, W.T @ W, rtol=1e-5, atol=1e-6 * np.abs(G).max())


def test_low_rank_gram_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Factors stacked in several blocks (and absent ones) give the dense inner products."""
    g = torch.Generator().manual_seed(0)
    parts: list[LowRank | None] = []
    for r in (3, 1, 5, 2, 4):
        left, right = (
            torch.randn((7, r), generator=g, dtype=torch.float64),
            torch.randn((r, 6), generator=g, dtype=torch.float64),
        )
        parts.append(LowRank(left, right, ()))
    parts.insert(2, None)
    dense = np.stack([np.zeros(42) if p is None else (p.left @ p.right).reshape(-1).numpy() for p in parts], 1)
    for block in (1024, 6, 1):
        monkeypatch.setattr(streaming, "LOW_RANK_BLOCK", block)
        np.testing.assert_allclose(low_rank_gram(parts), dense.T @ dense, rtol=1e-12, atol=1e-12)


def test_mixed_collection_gram_and_chunk_size_invariance(env: Env) -> None:
    sources = [TaskSource("ft", env.dense), *(TaskSource(n, env.adapters[n]) for n in ("plain", "embed", "pattern"))]
    tvs = TaskVectorSet(env.base, sources)
    assert tvs.dense_tasks == [0] and tvs.lora_tasks == [1, 2, 3]
    V = dense_rows(tvs)
    grams = [gram_pass(tvs, chunk_elements=c) for c in (1, 37, 1 << 20)]
    for stats in grams:
        np.testing.assert_allclose(stats.gram, V.T @ V, rtol=1e-12, atol=1e-12 * np.abs(V.T @ V).max())
        assert stats.task_hashes == grams[0].task_hashes and stats.base_hash == grams[0].base_hash
    assert len(set(grams[0].task_hashes)) == 4


# -- stores ---------------------------------------------------------------------------------------


def reconstructions(store: Store) -> np.ndarray:
    cols = []
    for t in range(store.n_tasks):
        state = combination_state(store, store.decoder[:, t], torch.float64)
        cols.append(np.concatenate([state[i.name].reshape(-1).numpy() for i in store.tensors]))
    return np.stack(cols, axis=1)


def test_store_from_adapters_matches_store_from_merged_checkpoints(env: Env, tmp_path: Path) -> None:
    names = ["plain", "rslora", "pattern", "embed", "bin"]
    lora = build_store(
        env.base, [TaskSource(n, env.adapters[n]) for n in names], make_method("pca", 3), tmp_path / "lora"
    )
    merged = build_store(
        env.base, [TaskSource(n, env.merged[n]) for n in names], make_method("pca", 3), tmp_path / "merged"
    )
    np.testing.assert_allclose(lora.gram, merged.gram, rtol=1e-5, atol=1e-6 * np.abs(merged.gram).max())
    a, b = reconstructions(lora), reconstructions(merged)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    for x, y in zip(lora.manifest["tasks"], merged.manifest["tasks"], strict=True):
        assert x["rel_error"] == pytest.approx(y["rel_error"], rel=1e-4, abs=1e-7)
        assert x["input"] == "lora-adapter" and "input" not in y


@pytest.mark.parametrize("method,kw", [("pca", {}), ("random", {}), ("cluster", {"merge": "ties"})])
def test_mixed_store_does_not_depend_on_chunk_size(env: Env, tmp_path: Path, method: str, kw: dict) -> None:
    """Methods that observe the Gram pass (random, TIES) see materialised LoRA rows."""
    sources = [TaskSource("ft", env.dense), *(TaskSource(n, env.adapters[n]) for n in ("plain", "rslora", "embed"))]
    small = build_store(env.base, sources, make_method(method, 2, **kw), tmp_path / "small", chunk_elements=50)
    big = build_store(env.base, sources, make_method(method, 2, **kw), tmp_path / "big")
    np.testing.assert_allclose(small.gram, big.gram, rtol=1e-12)
    np.testing.assert_allclose(small.decoder, big.decoder, rtol=1e-8, atol=1e-10)
    a, b = reconstructions(small), reconstructions(big)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max())
    assert [t["content_hash"] for t in small.manifest["tasks"]] == [t["content_hash"] for t in big.manifest["tasks"]]


def test_add_task_and_refit_with_adapters(env: Env, tmp_path: Path) -> None:
    sources = [TaskSource("ft", env.dense), TaskSource("plain", env.adapters["plain"])]
    store = build_store(env.base, sources, make_method("pca", 2), tmp_path / "store")
    updated, added = add_task(store, TaskSource("rslora", env.adapters["rslora"]), out=tmp_path / "added")
    assert added.gram_row_known and added.rel_error > 0
    full = build_store(
        env.base, [*sources, TaskSource("rslora", env.adapters["rslora"])], make_method("pca", 2), tmp_path / "full"
    )
    np.testing.assert_allclose(updated.gram, full.gram, rtol=1e-10, atol=1e-12 * np.abs(full.gram).max())
    assert updated.manifest["tasks"][2]["content_hash"] == full.manifest["tasks"][2]["content_hash"]
    assert updated.manifest["tasks"][2]["input"] == "lora-adapter"
    refitted = refit(updated, out=tmp_path / "refit")  # one pass: the stored G is complete
    np.testing.assert_allclose(refitted.decoder, full.decoder, rtol=1e-8, atol=1e-10)


def test_a_changed_adapter_is_detected(env: Env, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(env.adapters["plain"], adapter)
    store = build_store(
        env.base, [TaskSource("ft", env.dense), TaskSource("a", adapter)], make_method("pca", 2), tmp_path / "s"
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = 9  # same factors, another scale: another task vector
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(TvbasisError, match="changed"):
        add_task(store, TaskSource("b", env.adapters["rslora"]), out=tmp_path / "added")
    with pytest.raises(TvbasisError, match="changed since"):
        refit(store, out=tmp_path / "refit")


def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    """GPT-2's Conv1D weights are (in, out): PEFT's delta is (B @ A).T, also for a square c_proj."""
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    transformers.GPT2Model(config).save_pretrained(tmp_path / "base")
    cfg = {"target_modules": ["c_attn", "c_proj"], "r": 3, "lora_alpha": 6, "fan_in_fan_out": True}
    make_adapter(tmp_path / "base", tmp_path / "gpt-lora", "GPT2Model", cfg, False, 1)
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    merged = load_file(str(tmp_path / "gpt-lora-merged" / "model.safetensors"))
    tvs = TaskVectorSet(tmp_path / "base", [TaskSource("g", tmp_path / "gpt-lora")])
    want = np.concatenate([(merged[i.name].double() - base[i.name].double()).reshape(-1).numpy() for i in tvs.tensors])
    assert "h.0.attn.c_proj.weight" in tvs.adapters[0].tensors  # type: ignore[union-attr]
    np.testing.assert_allclose(dense_rows(tvs)[:, 0], want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_dask_engine_with_adapters_is_bit_identical(env: Env, tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    from tvbasis.engine.distributed import DaskEngine

    sources = [TaskSource("ft", env.dense), *(TaskSource(n, env.adapters[n]) for n in ("plain", "embed", "bin"))]
    local = build_store(
        env.base,
        sources,
        make_method("pca", 2),
        tmp_path / "local",
        chunk_elements=300,
        engine=LocalEngine(partition_elements=5000),  # the same partitions: the same summation order
    )
    with DaskEngine(n_workers=1, partition_elements=5000) as engine:
        dask = build_store(
            env.base, sources, make_method("pca", 2), tmp_path / "dask", chunk_elements=300, engine=engine
        )
    assert np.array_equal(local.gram, dask.gram)
    da, db = tree_digest(local.path), tree_digest(dask.path)
    assert {f: d for f, d in da.items() if f not in ("tvbasis.json", "README.md")} == {
        f: d for f, d in db.items() if f not in ("tvbasis.json", "README.md")
    }


# -- the CLI and bad inputs ---------------------------------------------------------------------


def test_cli_build_mixed_and_info(env: Env, tmp_path: Path) -> None:
    out = tmp_path / "store"
    args = ["build", "--base", env.base, "--task", f"ft={env.dense}", "--task", f"lo={env.adapters['plain']}"]
    result = runner.invoke(app, [str(a) for a in [*args, "--method", "pca", "-M", "1", "--out", out, "--quiet"]])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0 and "lo (LoRA)" in result.output and "ft (LoRA)" not in result.output
    tasks = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)["tasks"]
    assert [t.get("input") for t in tasks] == [None, "lora-adapter"]
    result = runner.invoke(app, ["add-task", str(out), "--task", f"emb={env.adapters['embed']}", "--quiet"])
    assert result.exit_code == 0, result.output


def broken(env: Env, tmp_path: Path, how: str) -> Path:
    """A copy of the 'plain' adapter, broken in one way."""
    path = tmp_path / f"bad-{how}"
    shutil.copytree(env.adapters["plain"], path)
    weights = path / "adapter_model.safetensors"
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    state = load_file(str(weights))
    if how == "missing-module":
        state = {k.replace("layer.1.", "layer.7."): v for k, v in state.items()}
    elif how == "shape":
        key = next(k for k in state if k.endswith("lora_B.weight"))
        state[key] = torch.randn(31, state[key].shape[1])
    elif how == "rank":
        config["r"] = 5
    elif how == "dora":
        config["use_dora"] = True
    elif how == "no-weights":
        weights.unlink()
    elif how == "bad-json":
        config_file.write_text("{not json")
    elif how == "bad-r":
        config["r"] = "eight"
    elif how == "conv":
        key = next(k for k in state if k.endswith("lora_A.weight"))
        state[key] = state[key][:, :, None, None]
    elif how == "full-tensor":
        state["base_model.model.pooler.dense.weight"] = torch.zeros(32, 32)
    elif how == "pissa":
        config["init_lora_weights"] = "pissa"
    if how not in ("no-weights", "bad-json"):
        save_file(state, str(weights))
        config_file.write_text(json.dumps(config))
    return path


BAD = {
    "missing-module": "module 'encoder.layer.7.attention.self.query': the base .* has no tensor",
    "shape": "module 'encoder.layer.0.attention.self.(query|value)': B @ A is \\[31, 32\\] but base tensor",
    "rank": "adapter_config.json gives rank 5",
    "dora": "use_dora=True",
    "no-weights": "has no adapter_model.safetensors or adapter_model.bin",
    "bad-json": "adapter_config.json: cannot read the adapter config",
    "bad-r": "r='eight': must be a positive integer",
    "conv": "convolution LoRA is not supported",
    "full-tensor": "is a full copy of a module",
    "pissa": "init_lora_weights='pissa' changes the base weights",
}


@pytest.mark.parametrize("how", list(BAD))
def test_bad_adapters_are_clear_errors(env: Env, tmp_path: Path, how: str) -> None:
    path = broken(env, tmp_path, how)
    with pytest.raises(TvbasisError, match=BAD[how]) as info:
        TaskVectorSet(env.base, [TaskSource("bad", path)])
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    out = tmp_path / "store"
    before = tree_digest(tmp_path)
    args = ["build", "--base", env.base, "--task", f"ft={env.dense}", "--task", f"bad={path}"]
    result = runner.invoke(app, [str(a) for a in [*args, "--method", "pca", "-M", "1", "--out", out]])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not out.exists() and tree_digest(tmp_path) == before


def test_full_tensor_of_an_excluded_module_is_ignored(env: Env, tmp_path: Path) -> None:
    path = broken(env, tmp_path, "full-tensor")
    tvs = TaskVectorSet(env.base, [TaskSource("a", path)], exclude=["pooler.*"])
    assert tvs.lora_tasks == [0]


def test_adapter_outside_the_selection_is_an_error(env: Env) -> None:
    with pytest.raises(TvbasisError, match="changes none of the selected tensors"):
        TaskVectorSet(env.base, [TaskSource("a", env.adapters["plain"])], include=["pooler.*"])


def test_real_dora_and_modules_to_save_adapters(env: Env, tmp_path: Path) -> None:
    """Adapters as PEFT saves them: DoRA is refused; a modules_to_save head is refused unless excluded."""
    make_adapter(env.base, tmp_path / "dora", "BertModel", {"target_modules": ["query"], "use_dora": True}, False, 3)
    with pytest.raises(TvbasisError, match="use_dora=True"):
        TaskVectorSet(env.base, [TaskSource("d", tmp_path / "dora")])
    settings = {"target_modules": ["query"], "r": 2, "modules_to_save": ["classifier"]}
    make_adapter(env.base, tmp_path / "head", "BertForSequenceClassification", settings, False, 4)
    with pytest.raises(
        TvbasisError, match=r"'base_model\.model\.classifier\.(weight|bias)' is a full copy of a module"
    ):
        TaskVectorSet(env.base, [TaskSource("h", tmp_path / "head")])
    tvs = TaskVectorSet(env.base, [TaskSource("h", tmp_path / "head")], exclude=["classifier.*"])
    want = load_file(str(tmp_path / "head-merged" / "model.safetensors"))
    base = load_file(str(env.base / "model.safetensors"))
    got = dense_rows(tvs)[:, 0]
    ref = np.concatenate([(want[n].double() - base[n].double()).reshape(-1).numpy() for n in env.names])
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_an_exported_adapter_reads_back_as_its_delta(env: Env, tmp_path: Path) -> None:
    """``edit --as-lora`` output (full rank, alpha = r, rank_pattern) is a task vector equal to the edit's delta
    on the tensors it holds."""
    from tvbasis.interop.peft import write_lora_adapter

    sources = [TaskSource("ft", env.dense), TaskSource("plain", env.adapters["plain"])]
    store = build_store(env.base, sources, make_method("pca", 2), tmp_path / "store")
    coefs = store.decoder @ np.array([1.0, -0.5])
    report = write_lora_adapter(store, coefs, tmp_path / "exported", base=env.base, energy=1.0)
    tvs = TaskVectorSet(env.base, [TaskSource("x", tmp_path / "exported")])
    delta = combination_state(store, coefs, torch.float64)
    lora = {t.name for t in report.tensors}
    want = np.concatenate(
        [(delta[i.name] if i.name in lora else torch.zeros(i.shape)).reshape(-1).numpy() for i in tvs.tensors]
    )
    np.testing.assert_allclose(dense_rows(tvs)[:, 0], want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_adapter_given_as_a_url(env: Env, tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("upath")
    mem = fsspec.filesystem("memory")
    url = f"memory:///lora-{tmp_path.name}"
    for f in env.adapters["plain"].iterdir():
        mem.pipe(f"/lora-{tmp_path.name}/{f.name}", f.read_bytes())
    local = gram_pass(TaskVectorSet(env.base, [TaskSource("a", env.adapters["plain"])]))
    remote = gram_pass(TaskVectorSet(env.base, [TaskSource("a", url)]))  # type: ignore[arg-type]
    assert np.array_equal(local.gram, remote.gram) and local.task_hashes == remote.task_hashes


def test_rows_codes_need_rows_the_gram_pass_has_read(env: Env, tmp_path: Path) -> None:
    """Adapters alone: the Gram comes from the factors and no row is read, so no row counts and
    ``rows:`` codes are refused; with a full fine-tune beside them the rows are read and counted."""
    from tvbasis.store.residuals import uniform_plan

    lora_only = [TaskSource(n, env.adapters[n]) for n in ("plain", "rslora")]
    assert gram_pass(TaskVectorSet(env.base, lora_only), tensor_stats=True).nonzero_rows is None
    with pytest.raises(TvbasisError, match=r"count of nonzero rows.*LoRA"):
        build_store(env.base, lora_only, make_method("pca", 0), tmp_path / "s", codes=uniform_plan("rows:int8"))
    assert not (tmp_path / "s").exists()
    mixed = [*lora_only, TaskSource("dense", env.dense)]
    tvs = TaskVectorSet(env.base, mixed)
    counts = gram_pass(tvs, tensor_stats=True).nonzero_rows
    assert counts is not None
    for name, t in (("plain", 0), ("dense", 2)):
        for n in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight"):
            delta = env.deltas[name][n]
            assert counts[n][t] == int(delta.reshape(delta.shape[0], -1).ne(0).any(dim=1).sum())
    store = build_store(env.base, mixed, make_method("pca", 0), tmp_path / "m", codes=uniform_plan("rows:fp32"))
    assert all(t["rel_error"] < 1e-6 for t in store.manifest["tasks"])
