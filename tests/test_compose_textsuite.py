"""Few-shot composition on a 3-layer MiniLM with two hand-written tasks: every kind trains, evaluates,
saves, loads and exports, through the Python API and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tvbasis.build import build_store
from tvbasis.cli import app
from tvbasis.composition import ComposerConfig, load_composer, load_directions, parameter_blocks
from tvbasis.errors import TvbasisError
from tvbasis.io import open_checkpoint
from tvbasis.methods import make_method
from tvbasis.store import open_store
from tvbasis.tasks import TaskSource
from tvbasis.textsuite import model as M
from tvbasis.textsuite.compose import LAMBDA_GRID, FewShotComposition, few_shot
from tvbasis.textsuite.data import Example, TaskData

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # about a minute: fine-tunes, stores and every kind on a 3-layer MiniLM

TOPICS = {
    0: ["the striker scored a late goal", "the coach praised the team", "a tense playoff match", "the referee blew"],
    1: ["simmer the garlic in butter", "bake the dough for an hour", "a pinch of spice", "roast the vegetables"],
}
MOODS = {
    0: ["what a lovely sunny day", "i adore this song", "a wonderful kind gesture", "the best meal ever"],
    1: ["a dreadful rainy mess", "i hate this noise", "a cruel rude remark", "the worst trip ever"],
}


def toy(name: str, texts: dict[int, list[str]], labels: list[str]) -> TaskData:
    examples = [Example(t, c) for c, ts in texts.items() for t in ts]
    return TaskData(name, labels, [f"a sentence about {x}" for x in labels], examples, examples[::2], examples, "toy")


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict:
    try:
        src = M.minilm_path()
    except TvbasisError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("compose")
    small = M.derive_small_model(src, root / "minilm-l3", n_layers=3)
    tasks = [toy("topic", TOPICS, ["sports", "cooking"]), toy("mood", MOODS, ["joy", "anger"])]
    hp = {"max_steps": 3, "batch_size": 4, "max_length": 16, "lr": 1e-3}
    sources = [TaskSource(t.name, M.finetune(small, t, root / "ft" / t.name, **hp)) for t in tasks]
    store = build_store(small, sources, make_method("pca", 2), root / "store")
    # The CLI reads the suite's real tasks by name: the same directions, named after two of them.
    named = [TaskSource(n, s.path) for n, s in zip(("lang_id", "word_sent"), sources, strict=True)]
    suite_store = build_store(small, named, make_method("pca", 2), root / "suite-store")
    return {"root": root, "base": small, "tasks": tasks, "store": store.path, "suite_store": suite_store.path}


def test_few_shot_keeps_k_per_class_deterministically(setting: dict) -> None:
    task = setting["tasks"][0]
    a, b = few_shot(task, 2, seed=1), few_shot(task, 2, seed=1)
    assert [e.text for e in a.train] == [e.text for e in b.train]
    assert sorted(e.label for e in a.train) == [0, 0, 1, 1] and a.test == task.test
    with pytest.raises(TvbasisError, match="shots"):
        few_shot(task, 9)


def test_every_kind_trains_and_evaluates(setting: dict) -> None:
    tasks = [few_shot(t, 2) for t in setting["tasks"]]
    fs = FewShotComposition(setting["base"], tasks, setting["store"], over="tasks", blocks="layer", shots=2)
    assert fs.directions.labels == ["topic", "mood"] and fs.block_labels[0] == "embeddings"
    zero = fs.make_composer(ComposerConfig(kind="task-arithmetic", init=0.0))
    base_acc, _ = fs.accuracy(zero, "test")
    ev = M.Evaluator(setting["base"], setting["tasks"])
    assert base_acc == {t.name: ev.accuracy(t.name, "test") for t in setting["tasks"]}  # z = 0 is the base
    for kind in ("task-arithmetic", "atlas", "per-sample", "variational"):
        res, composer = fs.run(ComposerConfig(kind=kind), steps=3, batch_size=4)
        assert set(res.test_accuracy) == {"topic", "mood"}
        assert all(0.0 <= a <= 1.0 for a in res.test_accuracy.values())
        assert (res.lam in LAMBDA_GRID) == (kind == "task-arithmetic")
        assert (res.sparsity is not None) == (kind == "variational")
        assert len(res.history) == (0 if kind == "task-arithmetic" else 3)
        z = fs.task_coefficients(composer, "mood" if composer.per_sample else None)
        assert z.shape == (2, len(fs.block_labels))


def test_atoms_and_low_rank_settings(setting: dict) -> None:
    tasks = [few_shot(t, 2) for t in setting["tasks"]]
    fs = FewShotComposition(
        setting["base"], tasks, setting["store"], over="atoms", blocks="model", rank=2, features="tokens"
    )
    assert fs.directions.labels == ["atom0", "atom1"] and 0.0 < fs.rank_energy_lost < 1.0
    feats = fs.features[("topic", "test")]  # mean input embedding of each text, in split order
    ids = fs.ev.tokenizer(setting["tasks"][0].test[3].text, truncation=True, max_length=fs.ev.max_length)["input_ids"]
    table = fs.ev.model.get_input_embeddings().weight
    torch.testing.assert_close(feats[3], torch.nn.functional.normalize(table[ids].mean(0), dim=-1))
    with pytest.raises(TvbasisError, match="--features"):
        FewShotComposition(setting["base"], tasks, setting["store"], features="logits")
    res, _ = fs.run(ComposerConfig(kind="variational"), steps=2, batch_size=4)
    assert res.sparsity is not None


def test_cli_train_eval_export(setting: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    composer = tmp_path / "composer"
    common = ["--store", str(setting["suite_store"]), "--model", str(setting["base"])]
    args = ["compose", "train", *common, "--out", str(composer), "--kind", "atlas", "--shots", "2"]
    args += ["--steps", "3", "--batch-size", "4", "--test-limit", "24", "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "mean" in r.output
    comp, doc = load_composer(composer)
    assert doc["tasks"] == ["lang_id", "word_sent"] and doc["shots"] == 2 and doc["config"]["kind"] == "atlas"

    r = runner.invoke(app, ["compose", "eval", str(composer), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(doc["test_accuracy"])

    edited = tmp_path / "edited"
    r = runner.invoke(app, ["compose", "export", str(composer), "--out", str(edited), "--quiet"])
    assert r.exit_code == 0, r.output
    z = comp.shared.detach().double()
    base = open_checkpoint(setting["base"])
    directions = load_directions(open_store(setting["suite_store"]), "tasks")
    _, block_of = parameter_blocks(list(directions.tensors), "layer")
    out = open_checkpoint(edited)
    for name, d in list(directions.tensors.items())[:6]:
        b = block_of[name]
        want = base.read(name).double() + torch.tensordot(z[:, b], d.double(), dims=1)
        torch.testing.assert_close(out.read(name).double(), want, atol=1e-5, rtol=1e-5)
    assert (edited / "config.json").is_file()


def test_cli_bad_input_exits_2_and_writes_nothing(setting: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    common = ["--store", str(setting["suite_store"]), "--model", str(setting["base"]), "--steps", "1"]
    for extra, needle in (
        (["--kind", "magic"], "--kind"),
        (["--blocks", "rows"], "--blocks"),
        (["--over", "both"], "--over"),
        (["--task", "nonsense"], "nonsense"),
        (["--shots", "500"], "shots"),
    ):
        out = tmp_path / "c"
        r = runner.invoke(app, ["compose", "train", *common, "--out", str(out), *extra])
        assert r.exit_code == 2, (extra, r.output)
        assert needle in r.output and not out.exists()
    r = runner.invoke(app, ["compose", "eval", str(tmp_path)])
    assert r.exit_code == 2 and "not a composer" in r.output
