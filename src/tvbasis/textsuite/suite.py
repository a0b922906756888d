"""The text-suite experiment: fine-tune, compress, edit through the store, evaluate as the papers do.

One run, given a :class:`SuiteConfig`:

1. load the tasks (real labels, deterministic splits) and fine-tune the encoder on each
   (cached by the content of its inputs);
2. measure zero-shot and fine-tuned accuracy per task (the denominators);
3. task addition with the full task vectors (the reference) and through every basis store,
   lambda chosen on validation, test once; the paper's atoms-sum mode where asked;
4. negation of target tasks through the same stores (no fine-tune needed) under a control
   constraint;
5. a report: ``results.json``, ``report.md`` and PNG plots.

Full task vectors are never all held at once: the reference sum is accumulated task by task.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.arithmetic import atoms_sum_coefficients, combination_state, task_coefficients, task_weights
from tvbasis.arithmetic.merge import MergeSpec, merged_state
from tvbasis.build import build_store
from tvbasis.errors import TvbasisError
from tvbasis.evaluation import (
    effect_retained,
    gain_retained,
    search_addition,
    search_negation,
)
from tvbasis.io import open_checkpoint
from tvbasis.methods import make_method
from tvbasis.progress import progress
from tvbasis.store import Store
from tvbasis.tasks import TaskSource
from tvbasis.textsuite.data import TASK_NAMES, TaskData, load_task
from tvbasis.textsuite.model import Evaluator, derive_small_model, finetune_cached, minilm_path

Log = Callable[[str], None]


@dataclass
class SuiteConfig:
    """Everything one text-suite run depends on."""

    out_dir: Path
    cache_dir: Path
    tasks: tuple[str, ...] = TASK_NAMES
    model: str = "minilm"  # "minilm", "small" (first 3 layers) or a path to an HF model directory
    methods: tuple[str, ...] = ("autoencoder", "pca", "sample")
    n_atoms: tuple[int, ...] = (2, 4)
    atoms_mode_methods: tuple[str, ...] = ("autoencoder",)
    merges: tuple[str, ...] = ()  # also add with TIES / DARE merges over these methods' reconstructions
    merge_methods: tuple[str, ...] = ()
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    negation_targets: tuple[str, ...] = ("word_sent", "lang_id", "name_gender")
    negation_methods: tuple[str, ...] | None = None  # None: every method in ``methods``
    control: str = "wn_noun"
    control_alt: str = "wn_verb"  # the control when the target is ``control`` itself
    control_threshold: float = 0.95
    val_limit: int | None = 64  # validation examples per task used to choose lambda
    test_limit: int | None = None
    search: str = "coarse-to-fine"
    data: dict[str, Any] = field(default_factory=dict)  # load_task overrides (train_per_class, ...)
    finetune: dict[str, Any] = field(default_factory=dict)  # finetune hyperparameter overrides
    seed: int = 0

    def control_for(self, target: str) -> str:
        return self.control_alt if target == self.control else self.control

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"], d["cache_dir"] = str(self.out_dir), str(self.cache_dir)
        return d


def resolve_model(model: str, cache_dir: Path) -> Path:
    """The base model directory for ``model``: the packaged MiniLM, its 3-layer cut, or a path."""
    if model == "minilm":
        return minilm_path()
    if model == "small":
        return derive_small_model(minilm_path(), cache_dir / "models" / "minilm-3layer", n_layers=3)
    path = Path(model)
    if not path.is_dir():
        raise TvbasisError(f"--model {model!r}: not 'minilm', 'small' or a model directory")
    return path


def task_vector(base: Mapping[str, torch.Tensor], finetuned_dir: Path) -> dict[str, torch.Tensor]:
    """``theta_t - theta_0`` over the base's float tensors, read from the fine-tune's checkpoint."""
    ckpt = open_checkpoint(finetuned_dir)
    return {name: ckpt.read(name).to(torch.float32) - value for name, value in base.items()}


@dataclass
class _Edit:
    """One way of editing the base: a label, and the delta for given task weights."""

    label: str
    method: str
    n_atoms: int | None
    bytes_ratio: float
    delta: Callable[[np.ndarray], dict[str, torch.Tensor]]


def run_suite(config: SuiteConfig, log: Log = print) -> dict[str, Any]:
    """Run the whole experiment; write results.json, report.md and plots under ``config.out_dir``."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    config.out_dir.mkdir(parents=True, exist_ok=True)
    for name in (*config.negation_targets, *(config.control_for(t) for t in config.negation_targets)):
        if name not in config.tasks:
            raise TvbasisError(f"task {name!r} (negation target or control) is not in the suite's tasks")

    base_dir = resolve_model(config.model, config.cache_dir)
    tasks = [load_task(name, seed=config.seed, **config.data) for name in config.tasks]
    names = [t.name for t in tasks]

    # 1. fine-tunes (cached)
    t0 = time.perf_counter()
    ft_dirs: dict[str, Path] = {}
    with progress(len(tasks), "Fine-tuning", unit="task") as bar:
        for task in tasks:
            ft_dirs[task.name] = finetune_cached(
                base_dir, task, config.cache_dir / "finetunes", seed=config.seed, **config.finetune
            )
            bar.update(1)
    timings["finetune"] = time.perf_counter() - t0
    log(f"fine-tunes ready ({timings['finetune']:.0f} s): {config.cache_dir / 'finetunes'}")

    # 2. denominators
    t0 = time.perf_counter()
    ev = Evaluator(base_dir, tasks)
    base = ev.base_state()
    split_limit = {"val": config.val_limit, "test": config.test_limit}

    def accuracies(split: str, subset: Sequence[str] = names) -> dict[str, float]:
        return {n: ev.accuracy(n, split, split_limit[split]) for n in subset}

    zs = {"val": accuracies("val"), "test": accuracies("test")}
    ft: dict[str, dict[str, float]] = {"val": {}, "test": {}}
    full_sum: dict[str, torch.Tensor] = {k: torch.zeros_like(v) for k, v in base.items()}
    for n in names:
        tau = task_vector(base, ft_dirs[n])
        ev.set_task_vector(tau)
        for split in ("val", "test"):
            ft[split][n] = ev.accuracy(n, split, split_limit[split])
        for k in full_sum:
            full_sum[k] += tau[k]
        del tau
    ev.reset()
    timings["denominators"] = time.perf_counter() - t0
    zs_mean, ft_mean = np.mean(list(zs["test"].values())), np.mean(list(ft["test"].values()))
    log(f"zero-shot mean test acc {zs_mean:.3f}, fine-tuned {ft_mean:.3f}")

    # 3. stores
    t0 = time.perf_counter()
    sources = [TaskSource(n, ft_dirs[n]) for n in names]
    stores: dict[tuple[str, int], Store] = {}
    (config.out_dir / "stores").mkdir(exist_ok=True)
    for method in config.methods:
        for m in config.n_atoms:
            if m > len(names):
                continue
            path = config.out_dir / "stores" / f"{method}-M{m}"
            est = make_method(method, m, **config.method_settings.get(method, {}))
            stores[(method, m)] = build_store(base_dir, sources, est, path, overwrite=True)
    timings["build"] = time.perf_counter() - t0
    gram = next(iter(stores.values())).gram if stores else None
    if gram is None:
        raise TvbasisError("no store was built: check --methods and --atoms against the number of tasks")

    tv_cache: dict[str, dict[str, torch.Tensor]] = {}

    def full_delta(a: np.ndarray) -> dict[str, torch.Tensor]:
        """The full task vectors' combination: the running sum, or one task read back from its fine-tune."""
        if np.allclose(a, 1.0):
            return full_sum
        nz = np.nonzero(a)[0]
        if len(nz) != 1:
            raise RuntimeError("full deltas are only needed for all-ones or single-task weights")
        n = names[int(nz[0])]
        if n not in tv_cache:
            tv_cache.clear()  # hold at most one task vector
            tv_cache[n] = task_vector(base, ft_dirs[n])
        return {k: float(a[nz[0]]) * v for k, v in tv_cache[n].items()}

    edits: list[_Edit] = [_Edit("full task vectors", "full", None, 1.0, full_delta)]
    for (method, m), store in stores.items():
        ratio = store.manifest["bytes"]["ratio"]
        edits.append(
            _Edit(
                f"{method} M={m}",
                method,
                m,
                ratio,
                lambda a, s=store: combination_state(s, task_coefficients(s.decoder, a)),
            )
        )
        for merge in config.merges if method in config.merge_methods else ():
            edits.append(
                _Edit(
                    f"{method} M={m} + {merge}",
                    f"{method} + {merge}",
                    m,
                    ratio,
                    lambda a, s=store, merge=merge: merged_state(s, MergeSpec(merge, a)),
                )
            )
        if method in config.atoms_mode_methods:
            edits.append(
                _Edit(
                    f"{method} M={m} atoms-sum",
                    f"{method} (atoms-sum)",
                    m,
                    ratio,
                    lambda a, s=store: combination_state(s, atoms_sum_coefficients(s.n_atoms, s.has_mean)),
                )
            )

    # 4. addition
    t0 = time.perf_counter()
    addition: dict[str, dict[str, Any]] = {}
    ones = np.ones(len(names))
    for edit in edits:
        delta = edit.delta(ones)

        def val_acc(lam: float, delta: dict[str, torch.Tensor] = delta) -> dict[str, float]:
            if lam == 0:
                return zs["val"]  # the base itself
            ev.set_task_vector(delta, lam)
            return accuracies("val")

        res = search_addition(val_acc, ft["val"], search=config.search)
        ev.set_task_vector(delta, res.lam)
        test = accuracies("test")
        addition[edit.label] = {
            "method": edit.method,
            "n_atoms": edit.n_atoms,
            "bytes_ratio": edit.bytes_ratio,
            "lam": res.lam,
            "val_curve": res.curve,
            "test": test,
            "normalised": {n: test[n] / ft["test"][n] for n in names},
        }
        log(f"addition  {edit.label:<28} lambda={res.lam:.2f}  mean test acc {np.mean(list(test.values())):.3f}")
    full_test = addition["full task vectors"]["test"]
    for row in addition.values():
        row["gain_retained"] = gain_retained(row["test"], zs["test"], full_test)
    timings["addition"] = time.perf_counter() - t0

    # 5. negation
    t0 = time.perf_counter()
    negation: dict[str, dict[str, Any]] = {}
    neg_methods = set(config.methods if config.negation_methods is None else config.negation_methods)
    neg_edits = [e for e in edits if e.method == "full" or (e.method in neg_methods and "atoms-sum" not in e.label)]
    for target in config.negation_targets:
        control = config.control_for(target)
        weights = task_weights(names, negate=[target])
        rows: dict[str, Any] = {}
        for edit in neg_edits:
            delta = edit.delta(weights)

            applied: list[float] = []  # the lambda the evaluator's weights are at, if any

            def val_at(lam: float, task: str, delta: dict[str, torch.Tensor] = delta, applied=applied) -> float:
                if lam == 0:
                    return zs["val"][task]  # the base itself
                if applied != [lam]:
                    ev.set_task_vector(delta, lam)
                    applied[:] = [lam]
                return ev.accuracy(task, "val", config.val_limit)

            res = search_negation(
                lambda lam, t=target: val_at(lam, t),
                lambda lam, c=control: val_at(lam, c),
                zs["val"][control],
                config.control_threshold,
                search=config.search,
            )
            row: dict[str, Any] = {
                "control": control,
                "method": edit.method,
                "n_atoms": edit.n_atoms,
                "bytes_ratio": edit.bytes_ratio,
                "lam": res.lam,
                "reason": res.reason,
            }
            if res.lam is not None:
                ev.set_task_vector(delta, res.lam)
                row["target_test"] = ev.accuracy(target, "test", config.test_limit)
                row["control_test"] = ev.accuracy(control, "test", config.test_limit)
            rows[edit.label] = row
        full_row = rows["full task vectors"]
        for row in rows.values():
            if "target_test" in row and "target_test" in full_row:
                row["effect_retained"] = effect_retained(
                    row["target_test"], zs["test"][target], full_row["target_test"]
                )
        negation[target] = rows
        log(
            f"negation  {target}: "
            + ", ".join(f"{k} -> {v.get('target_test', float('nan')):.3f}" for k, v in rows.items())
        )
    ev.reset()
    timings["negation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    results = {
        "config": config.to_json(),
        "base_model": str(base_dir),
        "tasks": {
            t.name: {
                "classes": len(t.label_names),
                "train": len(t.train),
                "val": len(t.val),
                "test": len(t.test),
                "source": t.source,
            }
            for t in tasks
        },
        "zero_shot": zs,
        "finetuned": ft,
        "addition": addition,
        "negation": negation,
        "stores": {f"{k[0]}-M{k[1]}": str(s.path) for k, s in stores.items()},
        "gram": gram.tolist(),
        "task_names": names,
        "timings_s": timings,
    }
    (config.out_dir / "results.json").write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
    from tvbasis.textsuite.report import write_report

    write_report(results, config.out_dir)
    return results


def _jsonable(x: object) -> object:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


__all__ = ["SuiteConfig", "TaskData", "resolve_model", "run_suite", "task_vector"]
