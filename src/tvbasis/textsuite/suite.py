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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.errors import TvbasisError
from tvbasis.evaluation import runner
from tvbasis.io import open_checkpoint
from tvbasis.progress import progress
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
    ft_dirs: dict[str, Path] = {}
    with runner.timed(timings, "finetune"), progress(len(tasks), "Fine-tuning", unit="task") as bar:
        for task in tasks:
            ft_dirs[task.name] = finetune_cached(
                base_dir, task, config.cache_dir / "finetunes", seed=config.seed, **config.finetune
            )
            bar.update(1)
    log(f"fine-tunes ready ({timings['finetune']:.0f} s): {config.cache_dir / 'finetunes'}")

    # 2. denominators
    limits = runner.Limits.of(config)
    with runner.timed(timings, "denominators"):
        ev = Evaluator(base_dir, tasks)
        base = ev.base_state()

        def read_tv(n: str) -> dict[str, torch.Tensor]:
            return task_vector(base, ft_dirs[n])

        zs = runner.zero_shot(ev, names, limits)
        ft, full_sum = runner.finetuned(ev, names, base, read_tv, limits)
    zs_mean, ft_mean = np.mean(list(zs["test"].values())), np.mean(list(ft["test"].values()))
    log(f"zero-shot mean test acc {zs_mean:.3f}, fine-tuned {ft_mean:.3f}")

    # 3. stores
    with runner.timed(timings, "build"):
        sources = [TaskSource(n, ft_dirs[n]) for n in names]
        atoms = [m for m in config.n_atoms if m <= len(names)]
        stores = runner.build_stores(base_dir, sources, config.methods, atoms, config.method_settings, config.out_dir)
    gram = next(iter(stores.values())).gram if stores else None
    if gram is None:
        raise TvbasisError("no store was built: check --methods and --atoms against the number of tasks")
    edits = runner.store_edits(
        stores,
        runner.full_delta(names, full_sum, read_tv),
        config.atoms_mode_methods,
        config.merges,
        config.merge_methods,
    )

    # 4. addition, 5. negation
    addition, negation = runner.add_and_negate(
        ev, config, edits, names, zs, ft, config.negation_targets, zs["val"], timings, log
    )
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
        **runner.protocol_results(addition, negation, stores, gram, names, timings),
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
