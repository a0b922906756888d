"""Few-shot composition on the text suite: task arithmetic, aTLAS, per-sample and variational composers.

For each shot count and each set of directions (the 8 task vectors through an exact M = 8 store,
or the 4 atoms of an autoencoder store), every kind is trained on the union of k examples per
class of the 8 tasks (same data, same steps) and evaluated on every task's test split; then the
variational composer's ablation (prior on/off x gate on/off). Writes ``results.json`` and
``report.md`` under ``--out``.

    .venv/bin/python benchmarks/compose.py --out runs/compose [--shots 4 16] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tvbasis.build import build_store
from tvbasis.composition.coefficients import ComposerConfig
from tvbasis.methods import make_method
from tvbasis.tasks import TaskSource
from tvbasis.textsuite.compose import CompositionResult, FewShotComposition, few_shot
from tvbasis.textsuite.data import TASK_NAMES, load_task
from tvbasis.textsuite.model import finetune_cached, minilm_path
from tvbasis.textsuite.presets import default_cache

KINDS = {
    "task arithmetic": {"kind": "task-arithmetic"},
    "aTLAS (block-wise, shared)": {"kind": "atlas"},
    "per-sample (no prior, no gate)": {"kind": "per-sample"},
    "variational (prior + gate)": {"kind": "variational"},
}
ABLATION = {
    "prior on, gate on": {"prior": True, "gate": True},
    "prior off, gate on": {"prior": False, "gate": True},
    "prior on, gate off": {"prior": True, "gate": False},
    "prior off, gate off": {"prior": False, "gate": False},
}


def stores(out: Path, base: Path, ft_dirs: dict[str, Path]) -> dict[str, Path]:
    """The exact M = T store (its reconstructed tasks are the task vectors) and the autoencoder M = 4 store."""
    sources = [TaskSource(n, d) for n, d in ft_dirs.items()]
    paths = {"tasks": out / "stores" / "pca-M8", "atoms": out / "stores" / "autoencoder-M4"}
    (out / "stores").mkdir(parents=True, exist_ok=True)
    specs = {"tasks": ("pca", len(sources), {}), "atoms": ("autoencoder", 4, {})}
    for key, path in paths.items():
        if not (path / "manifest.json").is_file():
            method, m, settings = specs[key]
            build_store(base, sources, make_method(method, m, **settings), path, overwrite=True)
    return paths


def oracle(setting: FewShotComposition) -> CompositionResult:
    """Each task's test items through base + its own task vector (z = e_t): what perfect routing reaches."""
    composer = setting.make_composer(ComposerConfig(kind="atlas", init=0.0))
    acc = {}
    for t, task in enumerate(setting.tasks):
        with torch.no_grad():
            composer.shared.zero_()
            composer.shared[t] = 1.0
        acc[task.name] = setting.accuracy(composer, "test", only=[task.name])[0][task.name]
    return CompositionResult("oracle", "oracle routing", acc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/compose"))
    ap.add_argument("--shots", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--over", nargs="+", default=["tasks", "atoms"], choices=["tasks", "atoms"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--blocks", default="layer")
    ap.add_argument("--rank", type=int, default=16, help="rank of the 2-D directions for per-sample kinds")
    ap.add_argument("--test-limit", type=int, default=400)
    ap.add_argument("--ablation-shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oracle-only", action="store_true", help="only the zero-shot and oracle-routing references")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    base = minilm_path()
    tasks = [load_task(n) for n in TASK_NAMES]
    ft_dirs = {t.name: finetune_cached(base, t, default_cache() / "finetunes") for t in tasks}
    store_paths = stores(args.out, base, ft_dirs)
    results: list[dict] = []
    t_all = time.perf_counter()

    def record(setting: FewShotComposition, shots: int, over: str, label: str, res: CompositionResult) -> None:
        exact = setting.rank is None
        row = {
            "shots": shots,
            "over": over,
            "directions": "exact" if exact else f"rank {setting.rank}",
            "rank_energy_lost": setting.rank_energy_lost,
            "label": label,
            "kind": res.kind,
            "mean_test_accuracy": res.mean,
            "test_accuracy": res.test_accuracy,
            "sparsity": res.sparsity,
            "lam": res.lam,
            "train_seconds": res.train_seconds,
            "eval_seconds": res.eval_seconds,
            "final_nll": res.history[-1]["nll"] if res.history else None,
        }
        results.append(row)
        sparsity = "-" if res.sparsity is None else f"{res.sparsity:.2f}"
        print(
            f"k={shots} over={over} {row['directions']} {label}: mean {res.mean:.3f} sparsity {sparsity} "
            f"train {res.train_seconds:.0f}s eval {res.eval_seconds:.0f}s",
            flush=True,
        )
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    if args.oracle_only:  # the references alone: zero-shot and perfect routing through the exact task vectors
        setting = FewShotComposition(
            base,
            [few_shot(t, args.shots[0], args.seed) for t in tasks],
            store_paths["tasks"],
            over="tasks",
            blocks=args.blocks,
            test_limit=args.test_limit,
            seed=args.seed,
        )
        zero = setting.make_composer(ComposerConfig(kind="task-arithmetic", init=0.0))
        record(
            setting,
            0,
            "-",
            "zero-shot base",
            CompositionResult("zero-shot", "zero-shot", setting.accuracy(zero, "test")[0]),
        )
        record(setting, 0, "tasks", "oracle routing", oracle(setting))
        args.shots = []
    for shots in args.shots:
        shot_tasks = [few_shot(t, shots, args.seed) for t in tasks]
        for over in args.over:
            for rank in (None, args.rank):
                setting = FewShotComposition(
                    base,
                    shot_tasks,
                    store_paths[over],
                    over=over,
                    blocks=args.blocks,
                    rank=rank,
                    test_limit=args.test_limit,
                    seed=args.seed,
                )
                if rank is None and over == "tasks" and not any(r["label"] == "oracle routing" for r in results):
                    record(setting, 0, over, "oracle routing", oracle(setting))
                if rank is None:  # the reference: task arithmetic on the exact directions
                    if not results:
                        zero = setting.make_composer(ComposerConfig(kind="task-arithmetic", init=0.0))
                        acc, _ = setting.accuracy(zero, "test")
                        record(setting, 0, "-", "zero-shot base", CompositionResult("zero-shot", "zero-shot", acc))
                    runs = {"task arithmetic": KINDS["task arithmetic"]}
                else:
                    runs = dict(KINDS)
                    if shots == args.ablation_shots and over == "tasks":
                        runs.update(
                            {
                                f"ablation: {k}": {"kind": "variational", **v}
                                for k, v in ABLATION.items()
                                if k != "prior on, gate on"
                            }
                        )
                for label, spec in runs.items():
                    res, _ = setting.run(ComposerConfig(**spec), steps=args.steps, batch_size=args.batch, label=label)
                    record(setting, shots, over, label, res)
                del setting
    zero_shot = {t.name: None for t in tasks}
    report = render(results, zero_shot, args, time.perf_counter() - t_all)
    (args.out / "report.md").write_text(report)
    print(report)


def render(results: list[dict], _zs: dict, args: argparse.Namespace, wall: float) -> str:
    lines = [f"Command: `.venv/bin/python benchmarks/compose.py --out {args.out}` (wall {wall / 60:.1f} min)", ""]
    lines += [
        "| shots | over | directions | composer | mean test acc | sparsity | lam | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sp = "-" if r["sparsity"] is None else f"{r['sparsity']:.2f}"
        lam = "-" if r["lam"] is None else f"{r['lam']:.2f}"
        lines.append(
            f"| {r['shots']} | {r['over']} | {r['directions']} | {r['label']} | {r['mean_test_accuracy']:.3f} | "
            f"{sp} | {lam} | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |"
        )
    names = list(results[0]["test_accuracy"]) if results else []
    lines += ["", "Per task (test accuracy):", "", "| shots | over | composer | " + " | ".join(names) + " |"]
    lines.append("|---|---|---|" + "---|" * len(names))
    for r in results:
        accs = " | ".join(f"{r['test_accuracy'][n]:.3f}" for n in names)
        lines.append(f"| {r['shots']} | {r['over']} | {r['label']} ({r['directions'].split(' (')[0]}) | {accs} |")
    lines.append("")
    lines.append(f"Mean over all rows: {np.mean([r['mean_test_accuracy'] for r in results]):.3f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
