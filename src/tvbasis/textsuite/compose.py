"""Few-shot composition on the text suite: learn how to combine a store's directions from k shots per class.

One composer serves all the suite's tasks at once: it is trained on the union of k labelled
training examples per class of every task (each example scored by its own task's frozen
zero-shot head) and evaluated on every task's test split. The directions are a store's task
vectors (``over="tasks"``; use a store with M = T for the exact ones) or its atoms. Per-sample
composers read features of the input from the frozen base: its mean-pooled output embedding
(``pooled``), or the mean of its input token embeddings (``tokens``, nearly free at inference).

Kinds (``tvbasis.composition.coefficients``): task arithmetic (one lam by grid search on the
shots), aTLAS (shared block-wise coefficients), per-sample (a network, no prior, no gate) and
variational (spike-and-slab posterior, gated inference); all get the same data and steps.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tvbasis.composition.blocks import parameter_blocks
from tvbasis.composition.coefficients import Composer, ComposerConfig
from tvbasis.composition.composed import ComposedModel
from tvbasis.composition.directions import Directions, load_directions, low_rank_factors
from tvbasis.composition.training import train_composer
from tvbasis.errors import TvbasisError
from tvbasis.store import open_store
from tvbasis.textsuite.data import TaskData
from tvbasis.textsuite.model import Evaluator, _load, _pad, _tokenize, mean_pool, param_names

FEATURES = ("pooled", "tokens")
LAMBDA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
DEFAULT_LR = {"task-arithmetic": 0.0, "atlas": 0.02, "per-sample": 3e-3, "variational": 3e-3}


def token_features(table: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unit mean of the base's input embeddings of a batch's real tokens: features for the price of a gather."""
    return F.normalize(mean_pool(F.embedding(ids, table), mask), dim=-1)


def few_shot(task: TaskData, shots: int, seed: int = 0) -> TaskData:
    """The task with its training split cut to ``shots`` examples per class (seeded choice)."""
    if shots < 1:
        raise TvbasisError(f"--shots {shots}: must be at least 1")
    rng = np.random.default_rng([seed, shots, len(task.train)])
    by_class: dict[int, list[int]] = {}
    for i, ex in enumerate(task.train):
        by_class.setdefault(ex.label, []).append(i)
    chosen: list[int] = []
    for label in sorted(by_class):
        idx = by_class[label]
        if len(idx) < shots:
            raise TvbasisError(f"task {task.name!r}: class {task.label_names[label]!r} has {len(idx)} < {shots} shots")
        chosen.extend(idx[j] for j in rng.permutation(len(idx))[:shots])
    return dataclasses.replace(task, train=[task.train[i] for i in sorted(chosen)])


@dataclass
class _Pool:
    """The few-shot training set of all tasks, tokenised once, with the base's features."""

    task: list[str]
    ids: list[list[int]]
    labels: torch.Tensor
    features: torch.Tensor


@dataclass
class CompositionResult:
    kind: str
    label: str
    test_accuracy: dict[str, float]
    sparsity: float | None = None
    lam: float | None = None
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    coefficients: list[list[float]] | None = None  # shared ones, [K][P]

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.test_accuracy.values())))


class FewShotComposition:
    """The frozen encoder, the heads, a store's directions and the few-shot data: everything a run needs."""

    def __init__(
        self,
        base_dir: str | Path,
        tasks: Sequence[TaskData],
        store_path: str | Path,
        *,
        over: str = "tasks",
        blocks: str = "model",
        rank: int | None = None,
        test_limit: int | None = None,
        seed: int = 0,
        shots: int | None = None,
        features: str = "pooled",
    ) -> None:
        if features not in FEATURES:
            raise TvbasisError(f"--features {features!r}: choose one of {', '.join(FEATURES)}")
        self.base_dir = Path(base_dir)
        self.shots = shots
        self.feature_kind = features
        self.tasks = list(tasks)
        self.test_limit = test_limit
        self.seed = seed
        self.store = open_store(store_path)
        self.directions: Directions = load_directions(self.store, over)
        self.block_labels, self.block_of = parameter_blocks(list(self.directions.tensors), blocks)
        self.blocks = blocks
        self.ev = Evaluator(self.base_dir, self.tasks)
        known = set(self.ev.names())
        missing = [n for n in self.directions.tensors if n not in known]
        if missing:
            raise TvbasisError(f"{store_path}: tensors {missing[:3]} are not parameters of {self.base_dir}")
        self.features = {(t.name, s): self._features(t.name, s) for t in self.tasks for s in ("train", "test")}
        _, model = _load(self.base_dir)
        model.eval()
        to_param = param_names(model, self.ev.names())
        directions = {to_param[n]: d for n, d in self.directions.tensors.items()}
        blocks_by_param = {to_param[n]: b for n, b in self.block_of.items()}
        self.rank, self.rank_energy_lost = rank, 0.0
        factors = None
        if rank is not None:
            embeddings = {n for n in directions if "embeddings" in n}
            factors, self.rank_energy_lost = low_rank_factors(directions, rank, skip=embeddings)
        self.composed = ComposedModel(model, directions, blocks_by_param, len(self.block_labels), low_rank=factors)
        # The composed model keeps what it needs (stacked deltas or factors): drop the K-model copy here.
        del directions, factors
        self.directions.tensors = {}
        self.pool = self._pool()

    @torch.no_grad()
    def _features(self, task: str, split: str) -> torch.Tensor:
        """What per-sample composers read, in split order: the base's mean-pooled output embedding
        (``pooled``: one base forward per input) or its mean input token embedding (``tokens``: a gather)."""
        if self.feature_kind == "pooled":
            return self.ev.embeddings(task, split, self._limit(split))
        prep = self.ev.prepared(task, split, self._limit(split))
        table = self.ev.model.get_input_embeddings().weight
        emb = torch.cat([token_features(table, ids, mask) for ids, mask in prep.batches])
        out = torch.empty_like(emb)
        out[prep.order] = emb
        return out

    def _limit(self, split: str) -> int | None:
        return self.test_limit if split == "test" else None

    def _pool(self) -> _Pool:
        task, ids, labels, feats = [], [], [], []
        for t in self.tasks:
            toks = _tokenize(self.ev.tokenizer, [ex.text for ex in t.train], self.ev.max_length)
            task += [t.name] * len(toks)
            ids += toks
            labels += [ex.label for ex in t.train]
            feats.append(self.features[(t.name, "train")])
        return _Pool(task, ids, torch.tensor(labels), torch.cat(feats))

    @property
    def n_features(self) -> int:
        return int(self.pool.features.shape[1])

    # -- running the composed model ----------------------------------------------------------
    def _embed(self, ids: torch.Tensor, mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with self.composed.coefficients(z):
            hidden = self.composed(input_ids=ids, attention_mask=mask).last_hidden_state
        return F.normalize(mean_pool(hidden, mask), dim=-1)

    def _nll(self, batch: tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        ids, mask, names, labels = batch
        emb = self._embed(ids, mask, z)
        out = emb.new_zeros(len(names))
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name])
            logits = self.ev.logit_scale * emb[rows] @ self.ev.heads[name].T
            out = out.index_put((rows,), F.cross_entropy(logits, labels[rows], reduction="none"))
        return out

    def _batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, Any]]:
        """Endless batches: each slot draws a task uniformly, then one of its shots (tasks weigh equally)."""
        g = torch.Generator().manual_seed(seed)
        by_task: dict[str, list[int]] = {}
        for i, name in enumerate(self.pool.task):
            by_task.setdefault(name, []).append(i)
        groups = list(by_task.values())
        while True:
            picks = torch.randint(len(groups), (batch_size,), generator=g).tolist()
            idx = [groups[t][int(torch.randint(len(groups[t]), (1,), generator=g))] for t in picks]
            ids, mask = _pad([self.pool.ids[i] for i in idx], self.ev.tokenizer.pad_token_id or 0)
            batch = (ids, mask, [self.pool.task[i] for i in idx], self.pool.labels[idx])
            yield self.pool.features[idx], batch

    # -- evaluation: one batched forward per batch; shared coefficients merge once per layer ------
    @torch.no_grad()
    def accuracy(
        self, composer: Composer, split: str, only: Sequence[str] | None = None
    ) -> tuple[dict[str, float], float | None]:
        """Per-task accuracy of the model composed by ``composer`` on ``split`` (of the tasks in ``only``,
        default all), and the share of coefficients the gate dropped (None when nothing is gated)."""
        acc: dict[str, float] = {}
        kept = total = 0
        limit = self._limit(split)
        for t in self.tasks:
            if only is not None and t.name not in only:
                continue
            prep = self.ev.prepared(t.name, split, limit)
            feats = self.features[(t.name, split)][prep.order]
            correct, start = 0, 0
            for ids, mask in prep.batches:
                coef = composer(feats[start : start + len(ids)])
                emb = self._embed(ids, mask, coef.z)
                pred = (emb @ self.ev.heads[t.name].T).argmax(-1)
                correct += int((pred == prep.labels[start : start + len(ids)]).sum())
                if coef.kept is not None:
                    kept += int(coef.kept.sum())
                    total += coef.kept.numel()
                start += len(ids)
            acc[t.name] = correct / len(prep.labels)
        return acc, (1.0 - kept / total) if total else None

    # -- the kinds -----------------------------------------------------------------------------
    def make_composer(self, config: ComposerConfig) -> Composer:
        return Composer(config, self.directions.k, len(self.block_labels), self.n_features)

    def run(
        self,
        config: ComposerConfig,
        *,
        steps: int = 150,
        batch_size: int = 32,
        lr: float | None = None,
        label: str | None = None,
    ) -> tuple[CompositionResult, Composer]:
        """Train (or search) one composer on the shots and evaluate it on the test splits."""
        torch.manual_seed(self.seed)
        composer = self.make_composer(config)
        t0 = time.perf_counter()
        history: list[dict[str, float]] = []
        lam = None
        if config.kind == "task-arithmetic":
            lam = self.search_lambda(composer)
        else:
            history = train_composer(
                composer,
                self._batches(batch_size, self.seed),
                self._nll,
                steps=steps,
                lr=DEFAULT_LR[config.kind] if lr is None else lr,
                description=f"Training {label or config.kind}",
            )
        t1 = time.perf_counter()
        acc, sparsity = self.accuracy(composer, "test")
        shared = None if composer.per_sample else composer.shared.detach()
        result = CompositionResult(
            kind=config.kind,
            label=label or config.kind,
            test_accuracy=acc,
            sparsity=sparsity,
            lam=lam,
            train_seconds=t1 - t0,
            eval_seconds=time.perf_counter() - t1,
            history=history,
            coefficients=None if shared is None else shared.tolist(),
        )
        return result, composer

    def search_lambda(self, composer: Composer) -> float:
        """Task arithmetic: the grid's lam with the best mean accuracy on the shots, coarse to fine
        (0, 0.2, ..., 1, then the 0.05 steps around the best; first of ties)."""
        scores: dict[float, float] = {}

        def score(lam: float) -> float:
            if lam not in scores:
                composer.set_lambda(lam)
                scores[lam] = float(np.mean(list(self.accuracy(composer, "train")[0].values())))
            return scores[lam]

        coarse = max(LAMBDA_GRID[::4], key=lambda lam: (score(lam), -lam))
        fine = [lam for lam in LAMBDA_GRID if abs(lam - coarse) <= 0.1 + 1e-9]
        best = max(fine, key=lambda lam: (score(lam), -lam))
        composer.set_lambda(best)
        return best

    def meta(self) -> dict[str, Any]:
        """What a saved composer needs to be used again: the store, the directions, the blocks, the base."""
        return {
            "store": str(self.store.path),
            "store_content_hash": self.store.manifest.get("base", {}).get("content_hash"),
            "over": self.directions.over,
            "directions": self.directions.labels,
            "blocks": self.blocks,
            "block_labels": self.block_labels,
            "block_of": self.block_of,
            "base": str(self.base_dir),
            "features": self.feature_kind,
            "tasks": [t.name for t in self.tasks],
            "shots": self.shots,
            "seed": self.seed,
            "test_limit": self.test_limit,
            "rank": self.rank,
        }

    @torch.no_grad()
    def task_coefficients(self, composer: Composer, task: str | None = None) -> torch.Tensor:
        """One ``[K, P]`` table: a shared composer's own, or the mean of a per-sample composer's
        (deterministic, gated) coefficients over the shots of ``task`` (of every task if None)."""
        if not composer.per_sample:
            return composer.shared.detach().clone()
        names = [t.name for t in self.tasks]
        if task is not None and task not in names:
            raise TvbasisError(f"--task {task!r}: the composer was trained on {', '.join(names)}")
        feats = torch.cat([self.features[(n, "train")] for n in names if task is None or n == task])
        composer.eval()
        return composer(feats).z.mean(0)


def composition_from_meta(meta: dict[str, Any], test_limit: int | None = None) -> FewShotComposition:
    """The few-shot setting a composer was trained in, rebuilt from what it saved (``composer.json``)."""
    from tvbasis.textsuite.data import load_task

    seed = int(meta.get("seed") or 0)
    shots = meta.get("shots")
    tasks = [load_task(n, seed=seed) for n in meta["tasks"]]
    if shots:
        tasks = [few_shot(t, int(shots), seed) for t in tasks]
    return FewShotComposition(
        Path(meta["base"]),
        tasks,
        meta["store"],
        over=meta["over"],
        blocks=meta["blocks"],
        rank=meta.get("rank"),
        test_limit=test_limit if test_limit is not None else meta.get("test_limit"),
        seed=seed,
        shots=shots,
        features=meta.get("features", "pooled"),
    )
