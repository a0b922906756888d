"""Composition (SPEC section 6) on tiny random models: the batched contraction is exact, the KL carries
gradient, gated inference is deterministic, composers learn, save, load and export."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common import read_flat, tiny_bert_config, write_family
from tvbasis.build import build_store
from tvbasis.composition import (
    ComposedModel,
    Composer,
    ComposerConfig,
    export_composition,
    load_composer,
    load_directions,
    low_rank_factors,
    parameter_blocks,
    save_composer,
    train_composer,
)
from tvbasis.composition.coefficients import bernoulli_kl, gaussian_kl, spike_slab_kl
from tvbasis.errors import TvbasisError
from tvbasis.methods import make_method

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

K = 3


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tiny_bert_config(vocab_size=40, hidden_size=16, intermediate_size=24, max_position_embeddings=16)
    return transformers.BertModel(cfg).eval()


def random_directions(model: torch.nn.Module, k: int = K, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: 0.2 * torch.randn((k, *p.shape), generator=g) for n, p in model.named_parameters()}


def merged(model: torch.nn.Module, dirs: dict[str, torch.Tensor], blocks: dict[str, int], z: torch.Tensor):
    """A copy of ``model`` with weights theta_0 + sum_k z[k, block] d_k: the dense reference."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in dirs:
                p.add_(torch.tensordot(z[:, blocks[n]], dirs[n], dims=1))
    return m


def inputs(n: int = 4, length: int = 7, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 4:] = 0  # padding must not change anything either
    return ids, mask


def run(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


# -- the batched contraction ------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["model", "layer", "tensor"])
def test_per_sample_composition_equals_per_sample_weights(granularity: str) -> None:
    base = tiny_bert()
    dirs = random_directions(base)
    labels, blocks = parameter_blocks(list(dirs), granularity)
    composed = ComposedModel(copy.deepcopy(base), dirs, blocks, len(labels))
    ids, mask = inputs()
    z = torch.randn(len(ids), K, len(labels))
    with torch.no_grad(), composed.coefficients(z):
        got = run(composed, ids, mask)
    for n in range(len(ids)):
        want = run(merged(base, dirs, blocks, z[n]), ids[n : n + 1], mask[n : n + 1])
        torch.testing.assert_close(got[n : n + 1], want, atol=1e-5, rtol=1e-4)


def test_shared_coefficients_equal_merged_weights_and_weight_one_reproduces_a_task() -> None:
    base = tiny_bert()
    dirs = random_directions(base)
    labels, blocks = parameter_blocks(list(dirs), "layer")
    composed = ComposedModel(copy.deepcopy(base), dirs, blocks, len(labels))
    ids, mask = inputs()
    for z in (torch.randn(K, len(labels)), torch.zeros(K, len(labels))):
        with torch.no_grad(), composed.coefficients(z[None]):
            torch.testing.assert_close(run(composed, ids, mask), run(merged(base, dirs, blocks, z), ids, mask))
    # weight 1 on direction 1 is base + d_1; -1 is base - d_1; 0 is the base itself
    for w in (1.0, -1.0):
        one = torch.zeros(len(ids), K, len(labels))
        one[:, 1] = w
        single = {n: w * d[1:2] for n, d in dirs.items()}
        with torch.no_grad(), composed.coefficients(one):
            torch.testing.assert_close(
                run(composed, ids, mask), run(merged(base, single, blocks, torch.ones(1, len(labels))), ids, mask)
            )
    with torch.no_grad(), composed.coefficients(torch.zeros(len(ids), K, len(labels))):
        torch.testing.assert_close(run(composed, ids, mask), run(base, ids, mask))


def test_low_rank_path_is_exact_for_low_rank_directions_and_reports_the_loss() -> None:
    base = tiny_bert()
    g = torch.Generator().manual_seed(3)
    dirs = {}
    for n, p in base.named_parameters():
        if p.dim() == 2 and "embeddings" not in n:  # exactly rank 2
            dirs[n] = torch.randn(K, p.shape[0], 2, generator=g) @ torch.randn(K, 2, p.shape[1], generator=g) * 0.05
        else:
            dirs[n] = 0.1 * torch.randn((K, *p.shape), generator=g)
    skip = {n for n in dirs if "embeddings" in n}
    factors, lost = low_rank_factors(dirs, 2, skip=skip)
    assert lost < 1e-10 and factors and not (set(factors) & skip)
    labels, blocks = parameter_blocks(list(dirs), "layer")
    exact = ComposedModel(copy.deepcopy(base), dirs, blocks, len(labels))
    low = ComposedModel(copy.deepcopy(base), dirs, blocks, len(labels), low_rank=factors)
    ids, mask = inputs()
    for z in (torch.randn(len(ids), K, len(labels)), torch.randn(1, K, len(labels))):
        with torch.no_grad(), exact.coefficients(z), low.coefficients(z):
            torch.testing.assert_close(run(low, ids, mask), run(exact, ids, mask), atol=1e-5, rtol=1e-4)
    _, lost1 = low_rank_factors(dirs, 1, skip=skip)
    assert 0 < lost1 < 1


def test_gradient_reaches_the_coefficients_only() -> None:
    base = tiny_bert()
    dirs = random_directions(base)
    labels, blocks = parameter_blocks(list(dirs), "layer")
    composed = ComposedModel(copy.deepcopy(base), dirs, blocks, len(labels))
    ids, mask = inputs()
    z = torch.randn(len(ids), K, len(labels), requires_grad=True)
    with composed.coefficients(z):
        run(composed, ids, mask).square().mean().backward()
    assert z.grad is not None and bool((z.grad.abs().sum((1, 2)) > 0).all())
    assert not any(p.requires_grad for p in composed.parameters())


def test_composed_model_rejects_bad_directions_and_coefficients() -> None:
    base = tiny_bert()
    dirs = random_directions(base)
    labels, blocks = parameter_blocks(list(dirs), "model")
    with pytest.raises(TvbasisError, match="does not have"):
        ComposedModel(copy.deepcopy(base), {**dirs, "nope.weight": torch.zeros(K, 2)}, {**blocks, "nope.weight": 0}, 1)
    name = "encoder.layer.0.attention.self.query.weight"
    with pytest.raises(TvbasisError, match=name):
        ComposedModel(copy.deepcopy(base), {**dirs, name: torch.zeros(K, 3, 3)}, blocks, 1)
    with pytest.raises(TvbasisError, match="no block"):
        ComposedModel(copy.deepcopy(base), dirs, {**blocks, name: 5}, 1)
    conv = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(TvbasisError, match="Conv1d"):
        ComposedModel(conv, {"0.weight": torch.zeros(K, 2, 2, 1)}, {"0.weight": 0}, 1)
    composed = ComposedModel(copy.deepcopy(base), dirs, blocks, len(labels))
    with pytest.raises(TvbasisError, match="shape"), composed.coefficients(torch.zeros(2, K + 1, 1)):
        pass
    with pytest.raises(TvbasisError, match="coefficients"):
        run(composed, *inputs())


def test_parameter_blocks() -> None:
    names = ["embeddings.word.weight", "encoder.layer.0.a.weight", "encoder.layer.0.a.bias", "encoder.layer.1.b"]
    names.append("pool")
    assert parameter_blocks(names, "model") == (["all"], dict.fromkeys(names, 0))
    labels, index = parameter_blocks(names, "layer")
    assert labels == ["embeddings", "layer.0", "layer.1", "other"]
    assert [index[n] for n in names] == [0, 1, 1, 2, 3]
    labels, index = parameter_blocks(names, "tensor")
    assert labels == names and [index[n] for n in names] == list(range(5))
    with pytest.raises(TvbasisError, match="--blocks"):
        parameter_blocks(names, "row")


# -- the variational composer -----------------------------------------------------------------
def test_kl_terms_match_closed_forms() -> None:
    pi = torch.tensor([0.1, 0.5, 0.9])
    want = pi * torch.log(pi / 0.3) + (1 - pi) * torch.log((1 - pi) / 0.7)
    torch.testing.assert_close(bernoulli_kl(pi, 0.3), want)
    mu, logvar = torch.tensor([0.0, 0.5, -1.0]), torch.tensor([0.0, -2.0, 1.0])
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 0.7)
    )
    torch.testing.assert_close(gaussian_kl(mu, logvar, 0.7), ref)
    torch.testing.assert_close(spike_slab_kl(mu, logvar, pi, 0.3, 0.7), want + pi * ref)
    assert float(bernoulli_kl(torch.tensor(0.3), 0.3)) == pytest.approx(0.0, abs=1e-6)


def test_kl_carries_gradient_to_every_part_of_the_network() -> None:
    composer = Composer(ComposerConfig(kind="variational"), n_directions=K, n_blocks=2, n_features=5)
    composer.train()
    coef = composer(torch.randn(6, 5))
    coef.kl.mean().backward()
    for name, p in composer.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_gated_inference_is_deterministic_and_keeps_only_reliable_included_coefficients() -> None:
    cfg = ComposerConfig(kind="variational", min_inclusion=0.5, max_uncertainty=1.0)
    composer = Composer(cfg, n_directions=4, n_blocks=1, n_features=3)
    with torch.no_grad():
        for layer in (composer.mu, composer.logvar, composer.gamma):
            layer.weight.zero_()
        composer.mu.bias.copy_(torch.tensor([0.5, 0.5, 0.5, 0.01]))
        composer.logvar.bias.copy_(2 * torch.log(torch.tensor([0.1, 0.1, 2.0, 0.1])))
        composer.gamma.bias.copy_(torch.tensor([3.0, -3.0, 3.0, 3.0]))
    composer.eval()
    x = torch.randn(5, 3)
    a, b = composer(x), composer(x)
    torch.testing.assert_close(a.z, b.z)
    # kept: included and sigma <= |mu|; dropped: low inclusion, too uncertain, mean too small for its sigma
    assert a.kept[:, :, 0].tolist() == [[True, False, False, False]] * 5
    torch.testing.assert_close(a.z[:, :, 0], torch.tensor([[0.5, 0.0, 0.0, 0.0]]).expand(5, -1))
    composer.train()
    s1, s2 = composer(x).z, composer(x).z
    assert not torch.equal(s1, s2)  # training samples


def test_ablations_change_the_posterior() -> None:
    x = torch.randn(4, 3)
    no_gate = Composer(ComposerConfig(kind="variational", gate=False), 2, 1, 3).eval()
    with torch.no_grad():
        out = no_gate(x)
    assert not hasattr(no_gate, "gamma") and bool(out.kept.all()) and float(out.kl.mean()) > 0
    no_prior = Composer(ComposerConfig(kind="variational", prior=False), 2, 1, 3).eval()
    assert float(no_prior(x).kl) == 0.0
    plain = Composer(ComposerConfig(kind="per-sample"), 2, 1, 3)
    assert plain(x).kept is None and float(plain(x).kl) == 0.0
    with pytest.raises(TvbasisError, match="--kind"):
        ComposerConfig(kind="magic")


@pytest.mark.parametrize("kind", ["atlas", "per-sample", "variational"])
def test_composers_learn_to_recover_a_task_direction(kind: str) -> None:
    """Target: inputs whose first token is even come from base + d_0, odd ones from base + d_1.
    Per-sample composers can route; a shared one can only average. Every kind must lower the loss."""
    base = tiny_bert()
    dirs = random_directions(base, k=2)
    _, blocks = parameter_blocks(list(dirs), "model")
    composed = ComposedModel(copy.deepcopy(base), dirs, blocks, 1)
    ids, mask = inputs(n=16, seed=5)
    route = (ids[:, 0] % 2).long()
    with torch.no_grad():
        targets = torch.stack(
            [
                run(merged(base, dirs, blocks, torch.eye(2)[int(r)][:, None]), ids[i : i + 1], mask[i : i + 1])[0]
                for i, r in enumerate(route)
            ]
        )
    features = torch.nn.functional.one_hot(route, 2).float()

    def batches():
        while True:
            yield features, (ids, mask, targets)

    def nll(batch, z):
        i, m, t = batch
        with composed.coefficients(z):
            return (run(composed, i, m) - t).square().mean((1, 2))

    cfg = ComposerConfig(kind=kind, init=0.0, beta=1e-4)
    composer = Composer(cfg, 2, 1, 2)
    composer.eval()
    with torch.no_grad():
        before = float(nll((ids, mask, targets), composer(features).z).mean())
    history = train_composer(composer, batches(), nll, steps=60, lr=0.05)
    with torch.no_grad():
        after = float(nll((ids, mask, targets), composer(features).z).mean())
    assert len(history) == 60 and after < 0.5 * before
    if kind != "atlas":  # routing: each sample's largest coefficient is its own direction
        with torch.no_grad():
            z = composer(features).z[:, :, 0]
        assert bool((z.argmax(1) == route).all())


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    x = torch.randn(3, 4)
    for kind in ("task-arithmetic", "atlas", "per-sample", "variational"):
        composer = Composer(ComposerConfig(kind=kind), 3, 2, 4)
        composer.anneal(1.0)
        path = save_composer(composer, tmp_path / kind, {"store": "s"})
        loaded, doc = load_composer(path)
        assert doc["store"] == "s" and doc["config"]["kind"] == kind
        torch.testing.assert_close(loaded(x).z, composer.eval()(x).z)
        assert float(loaded.temperature) == pytest.approx(composer.config.temperature[1])
    with pytest.raises(TvbasisError, match="exists"):
        save_composer(composer, tmp_path / "variational", {})
    with pytest.raises(TvbasisError, match="not a composer"):
        load_composer(tmp_path)
    (tmp_path / "atlas" / "composer.json").write_text("{")
    with pytest.raises(TvbasisError, match="JSON"):
        load_composer(tmp_path / "atlas")


# -- directions from a store, and export --------------------------------------------------------
def test_directions_from_a_store_and_blockwise_export(tmp_path: Path) -> None:
    fam = write_family(tmp_path / "fam", T=3)
    store = build_store(fam.base, fam.tasks, make_method("pca", 3), tmp_path / "store", exclude=["head.*"])
    tasks = load_directions(store, "tasks")
    assert tasks.labels == ["task0", "task1", "task2"]
    for t in range(3):  # M = T: the store's task vectors are the task vectors
        for n in fam.names:
            torch.testing.assert_close(tasks.tensors[n][t].double(), fam.deltas[t][n], atol=1e-5, rtol=1e-5)
    atoms = load_directions(store, "atoms")
    assert atoms.k == 3 and np.allclose(atoms.to_vectors, np.eye(3))
    with pytest.raises(TvbasisError, match="tasks or atoms"):
        load_directions(store, "rows")

    labels, block_of = parameter_blocks(list(tasks.tensors), "layer")
    z = np.random.default_rng(0).normal(size=(3, len(labels)))
    out = export_composition(fam.base, store, tasks.to_vectors, block_of, z, tmp_path / "edited.safetensors")
    got = load_file(str(out))
    for n in fam.names:
        want = fam.base_state[n].double() + sum(z[t, block_of[n]] * fam.deltas[t][n] for t in range(3))
        torch.testing.assert_close(got[n].double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got["head.weight"], fam.base_state["head.weight"])  # untouched tensors copied
    np.testing.assert_array_equal(read_flat(fam.base, ["position_ids"]), read_flat(out, ["position_ids"]))
    with pytest.raises(TvbasisError, match="coefficients"):
        export_composition(fam.base, store, tasks.to_vectors, block_of, z[:2], tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
