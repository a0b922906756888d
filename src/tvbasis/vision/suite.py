"""The vision suites (8 / 14 / 20 datasets): fine-tune CLIP's image encoder, compress, edit through the store.

The same steps and protocol as the text suite (``tvbasis.textsuite.suite``):

1. read every dataset (and the negation control) under the data root, check user-supplied
   fine-tunes against the base's architecture, then fine-tune the rest (cached by content);
2. zero-shot and fine-tuned accuracy per dataset (the denominators);
3. task addition with the full task vectors (the reference) and through every basis store,
   lambda chosen on validation, test once; the paper's atoms-sum mode where asked;
4. negation of target datasets through the same stores under a control constraint (ImageNet
   in the paper; any dataset under the root otherwise);
5. ``results.json`` and ``report.md`` (with plots when matplotlib is installed).

Everything that can be checked is checked before the first fine-tune, so bad input fails fast
with one line, and the results files are written under temporary names and renamed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.errors import TvbasisError
from tvbasis.evaluation import runner
from tvbasis.evaluation.protocol import SEARCHES
from tvbasis.io.cache_dirs import write_json_atomic
from tvbasis.methods import make_method
from tvbasis.tasks import TaskSource
from tvbasis.tasks.taskvectors import check_task_name
from tvbasis.vision.convert import vision_task_vector
from tvbasis.vision.data import SUITES, VisionTask, load_task
from tvbasis.vision.model import (
    Evaluator,
    FinetuneConfig,
    check_base,
    encoder_dir,
    finetune_cached,
    import_finetune,
)

Log = Callable[[str], None]


@dataclass
class VisionSuiteConfig:
    """Everything one vision-suite run depends on."""

    out_dir: Path
    cache_dir: Path
    data_root: Path
    base: Path  # a Hugging Face CLIPModel directory (both towers, tokenizer)
    datasets: tuple[str, ...] = SUITES[8]
    #: User-supplied fine-tunes (open_clip state dicts or HF CLIP checkpoints), used instead of training.
    finetuned: dict[str, Path] = field(default_factory=dict)
    methods: tuple[str, ...] = ("autoencoder", "pca", "sample")
    n_atoms: tuple[int, ...] = ()  # empty: T/2 and T/4, as the paper
    atoms_mode_methods: tuple[str, ...] = ("autoencoder",)
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    negation_targets: tuple[str, ...] | None = None  # None: every dataset; (): no negation
    negation_methods: tuple[str, ...] | None = None  # None: every method in ``methods``
    control: str | None = "ImageNet"
    control_alt: str | None = None  # the control when the target is ``control`` itself
    control_threshold: float = 0.95
    val_limit: int | None = 1000  # validation images per dataset used to choose lambda
    test_limit: int | None = None
    train_limit: int | None = None
    val_fraction: float = 0.1
    search: str = "coarse-to-fine"
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig overrides
    device: str = "auto"
    batch_size: int = 128
    workers: int | None = None
    seed: int = 0

    def targets(self) -> tuple[str, ...]:
        return self.datasets if self.negation_targets is None else self.negation_targets

    def control_for(self, target: str) -> str:
        if target == self.control:
            if self.control_alt is None:
                raise TvbasisError(f"negation target {target!r} is the control: give another control for it")
            return self.control_alt
        if self.control is None:
            raise TvbasisError("negation needs a control dataset (--control; the paper uses ImageNet)")
        return self.control

    def atoms(self) -> tuple[int, ...]:
        t = len(self.datasets)
        return self.n_atoms or tuple(sorted({max(1, t // 2), max(1, t // 4)}, reverse=True))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("out_dir", "cache_dir", "data_root", "base"):
            d[k] = str(d[k])
        d["finetuned"] = {k: str(v) for k, v in self.finetuned.items()}
        d["n_atoms"] = list(self.atoms())
        return d


def suite_config(suite: int, **kw: Any) -> VisionSuiteConfig:
    """The paper's 8-, 14- or 20-dataset suite with M = T/2 and T/4."""
    if suite not in SUITES:
        raise TvbasisError(f"--suite {suite}: choose 8, 14 or 20")
    return VisionSuiteConfig(datasets=SUITES[suite], **kw)


def _check_config(config: VisionSuiteConfig) -> None:
    if not config.datasets:
        raise TvbasisError("no datasets: give --suite or --dataset")
    if len(set(config.datasets)) != len(config.datasets):
        raise TvbasisError(f"datasets given twice: {sorted(config.datasets)}")
    for name in config.datasets:
        check_task_name(name)
    unknown = sorted(set(config.finetuned) - set(config.datasets))
    if unknown:
        raise TvbasisError(f"--finetuned {unknown[0]}: not one of the suite's datasets")
    for t in config.targets():
        if t not in config.datasets:
            raise TvbasisError(f"negation target {t!r} is not one of the suite's datasets")
        config.control_for(t)
    if config.search not in SEARCHES:
        raise TvbasisError(f"--search {config.search!r}: choose one of {', '.join(SEARCHES)}")
    if not 0 < config.control_threshold <= 1:
        raise TvbasisError(f"control threshold {config.control_threshold}: must be in (0, 1]")
    bad = [m for m in config.atoms() if not 1 <= m <= len(config.datasets)]
    if bad:
        raise TvbasisError(f"-M {bad[0]}: must be between 1 and the number of datasets ({len(config.datasets)})")
    for limit, name in ((config.val_limit, "val"), (config.test_limit, "test"), (config.train_limit, "train")):
        if limit is not None and limit < 1:
            raise TvbasisError(f"--{name}-limit {limit}: must be at least 1")
    for method in config.methods:  # construct each once so a bad name or setting fails now
        make_method(method, 1, **config.method_settings.get(method, {}))


def run_suite(config: VisionSuiteConfig, log: Log = print) -> dict[str, Any]:
    """Run the whole experiment; write results.json and report.md under ``config.out_dir``."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    _check_config(config)
    ft_cfg = FinetuneConfig(**{"seed": config.seed, **config.finetune})
    load = {"seed": config.seed, "val_fraction": config.val_fraction}
    tasks = [load_task(config.data_root, n, train_limit=config.train_limit, **load) for n in config.datasets]
    names = [t.name for t in tasks]
    targets = config.targets()
    control_names = sorted({config.control_for(t) for t in targets})
    controls: list[VisionTask] = []
    for c in control_names:
        if c not in names:
            try:
                controls.append(load_task(config.data_root, c, need_train=False, **load))
            except TvbasisError as exc:
                raise TvbasisError(
                    f"negation control {c!r}: {exc} (name another dataset with --control, or give --no-negation)"
                ) from None
    check_base(config.base)  # a CLIPModel directory with its tokenizer, before anything is trained
    base_enc = encoder_dir(config.base, config.cache_dir)
    ft_dirs: dict[str, Path] = {
        n: import_finetune(config.base, p, n, config.cache_dir) for n, p in config.finetuned.items()
    }
    config.out_dir.mkdir(parents=True, exist_ok=True)

    # 1. fine-tunes (cached)
    with runner.timed(timings, "finetune"):
        for task in tasks:
            if task.name not in ft_dirs:
                ft_dirs[task.name] = finetune_cached(
                    config.base,
                    task,
                    config.cache_dir / "finetunes",
                    ft_cfg,
                    device=config.device,
                    workers=config.workers,
                    log_fn=log,
                )
    log(f"fine-tunes ready ({timings['finetune']:.0f} s) under {config.cache_dir}")

    # 2. denominators
    limits = runner.Limits.of(config)
    with runner.timed(timings, "denominators"):
        ev = Evaluator(
            config.base, [*tasks, *controls], device=config.device, batch_size=config.batch_size, workers=config.workers
        )
        base = ev.base_state()

        def read_tv(n: str) -> dict[str, torch.Tensor]:
            return vision_task_vector(base, ft_dirs[n], base_enc)

        zs = runner.zero_shot(ev, names, limits)
        control_zs = {c: {s: ev.accuracy(c, s, limits[s]) for s in ("val", "test")} for c in control_names}
        ft, full_sum = runner.finetuned(ev, names, base, read_tv, limits)
    log(
        f"zero-shot mean test acc {np.mean(list(zs['test'].values())):.3f}, "
        f"fine-tuned {np.mean(list(ft['test'].values())):.3f}"
    )

    # 3. stores
    with runner.timed(timings, "build"):
        sources = [TaskSource(n, ft_dirs[n]) for n in names]
        stores = runner.build_stores(
            base_enc, sources, config.methods, config.atoms(), config.method_settings, config.out_dir
        )
    if not stores:
        raise TvbasisError("no store was built: give at least one method")
    gram = next(iter(stores.values())).gram
    edits = runner.store_edits(stores, runner.full_delta(names, full_sum, read_tv), config.atoms_mode_methods)

    # 4. addition, 5. negation
    val_zs = {**zs["val"], **{c: v["val"] for c, v in control_zs.items()}}
    addition, negation = runner.add_and_negate(ev, config, edits, names, zs, ft, targets, val_zs, timings, log)
    timings["total"] = time.perf_counter() - t_start

    results: dict[str, Any] = {
        "config": config.to_json(),
        "base_model": str(config.base),
        "base_image_encoder": str(base_enc),
        "device": str(ev.device),
        "tasks": {
            t.name: {
                "classes": len(t.classnames),
                "train": len(t.train),
                "val": len(t.val),
                "test": len(t.test),
                "source": t.source,
                "finetune": str(ft_dirs[t.name]),
                "imported": t.name in config.finetuned,
            }
            for t in tasks
        },
        "zero_shot": zs,
        "control_zero_shot": control_zs,
        "finetuned": ft,
        "finetune_hyperparameters": asdict(ft_cfg),
        **runner.protocol_results(addition, negation, stores, gram, names, timings),
    }
    write_json_atomic(config.out_dir / "results.json", results)
    from tvbasis.vision.report import write_report

    write_report(results, config.out_dir)
    return results


def zero_shot_of(results: Mapping[str, Any], name: str, split: str = "test") -> float:
    """A dataset's or a control's zero-shot accuracy from ``results``."""
    if name in results["zero_shot"][split]:
        return results["zero_shot"][split][name]
    return results["control_zero_shot"][name][split]


__all__ = ["VisionSuiteConfig", "VisionTask", "run_suite", "suite_config", "zero_shot_of"]
