"""Compression frontier on 64 correlated synthetic task vectors, where a shared basis should win.

A small transformer-shaped base (4 layers, width 192: attention and MLP matrices, biases, norms)
and 64 fine-tunes whose task vectors share a low-rank structure: per tensor,
``tau_t = sum_r c_tr u_r + noise`` with 6 shared directions and noise of ``--noise`` times the
signal's energy (default 0.05). There is no accuracy to measure here, so every configuration is
judged by what the text suite showed to predict accuracy (docs/frontier.md): per task, the
relative squared error of the store's expectation (bias) and the variance of its random codes,
both from the planner's estimates, and the realised relative error of the built store.

Single codes (``-M 0 --residual CODE``), global pca bases (M = 2, 4, 6, 8, 16) and per-tensor
bases are compared with the planned mix (``build --budget``) at 0.4%, 0.8%, 1.6%, 3%, 6% and 12%,
planned for the mean task's loss and for the worst task's (``--objective worst``).

    .venv/bin/python benchmarks/synthetic_frontier.py --out runs/synthetic [--tasks 64] [--noise 0.05]
    .venv/bin/python benchmarks/synthetic_frontier.py --out runs/synthetic --report   # the table again
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tvbasis.build import build_store
from tvbasis.codes import parse_code
from tvbasis.methods import make_method
from tvbasis.planning.budget import build_for_budget, estimate_plan, stats_from_store
from tvbasis.store.residuals import CodePlan, TensorCode
from tvbasis.tasks import TaskSource

WIDTH, LAYERS, RANK = 192, 4, 6
BUDGETS = (0.004, 0.008, 0.016, 0.03, 0.06, 0.12)
#: (label, M, residual code or None, per-tensor atoms' code); M < 0: every tensor its own basis of -M atoms.
SINGLE: list[tuple[str, int, str | None, str]] = [
    ("int4", 0, "int4", "int8"),
    ("int2 (Lloyd-Max)", 0, "lloydmax2", "int8"),
    ("sign", 0, "sign", "int8"),
    ("keep 12.5% int4", 0, "keep:0.125:int4:seed=0", "int8"),
    ("keep 6.25% int4", 0, "keep:0.0625:int4:seed=0", "int8"),
    ("keep 1.25% int8", 0, "keep:0.0125:int8:seed=0", "int8"),
    ("keep 25% sr2", 0, "keep:0.25:sr2:seed=0", "int8"),
    ("keep 12.5% sr2", 0, "keep:0.125:sr2:seed=0", "int8"),
    ("topk 6.25%", 0, "topk:0.0625", "int8"),
    ("pca M=2", 2, None, "int8"),
    ("pca M=4", 4, None, "int8"),
    ("pca M=6", 6, None, "int8"),
    ("pca M=8", 8, None, "int8"),
    ("pca M=16", 16, None, "int8"),
    ("tensor pca M=6", -6, None, "int8"),
    ("tensor pca M=6, int4 atoms", -6, None, "int4"),
]


def shapes() -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"embed.weight": (512, WIDTH)}
    for i in range(LAYERS):
        for m in ("q", "k", "v", "o"):
            out[f"layer.{i}.attn.{m}.weight"] = (WIDTH, WIDTH)
            out[f"layer.{i}.attn.{m}.bias"] = (WIDTH,)
        out[f"layer.{i}.mlp.up.weight"] = (4 * WIDTH, WIDTH)
        out[f"layer.{i}.mlp.down.weight"] = (WIDTH, 4 * WIDTH)
        out[f"layer.{i}.norm.weight"] = (WIDTH,)
    return out


def write_collection(root: Path, n_tasks: int, noise: float, seed: int = 0) -> tuple[Path, list[TaskSource]]:
    """Base and ``n_tasks`` fine-tunes (safetensors), written once per settings."""
    marker = root / "collection.json"
    settings = {"tasks": n_tasks, "noise": noise, "seed": seed, "width": WIDTH, "layers": LAYERS, "rank": RANK}
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return root / "base.safetensors", [
            TaskSource(f"t{t:02d}", root / f"t{t:02d}.safetensors") for t in range(n_tasks)
        ]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    base = {n: 0.05 * torch.randn(s, generator=g) for n, s in shapes().items()}
    save_file(base, str(root / "base.safetensors"))
    directions = {n: [torch.randn(s, generator=g) for _ in range(RANK)] for n, s in shapes().items()}
    mix = torch.randn((n_tasks, RANK), generator=g) * torch.linspace(1.0, 0.3, RANK)
    sources = []
    for t in range(n_tasks):
        ft = {}
        for n, b in base.items():
            signal = sum(float(mix[t, r]) * directions[n][r] for r in range(RANK))
            scale = float(signal.square().mean().sqrt()) * noise**0.5
            ft[n] = b + 1e-3 * (signal + scale * torch.randn(b.shape, generator=g))
        path = root / f"t{t:02d}.safetensors"
        save_file(ft, str(path))
        sources.append(TaskSource(f"t{t:02d}", path))
    marker.write_text(json.dumps(settings))
    return root / "base.safetensors", sources


def single_plan(m: int, residual: str | None, atom_code: str) -> tuple[CodePlan | None, int]:
    spec = parse_code(residual or "none")
    if m < 0:
        return CodePlan(default=TensorCode(False, spec, -m, parse_code(atom_code))), 0
    if m == 0:
        return CodePlan(default=TensorCode(False, spec)), 0
    return (CodePlan(default=TensorCode(True, spec)) if residual else None), m


def markdown_table(rows: list[dict]) -> str:
    """The results as the table in docs/frontier.md."""
    lines = [
        "| configuration | bytes | M | est. bias (mean) | est. variance (mean) | est. loss, mean | "
        "est. loss, worst task | realised squared error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {100 * r['bytes_ratio']:.3g}% | {r['M']} | {r['est_bias_mean']:.4f} | "
            f"{r['est_variance_mean']:.3g} | {r['est_loss_mean']:.4f} | {r['est_loss_max']:.4f} | "
            f"{r['realised_sq_error_mean']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/synthetic"))
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--report", action="store_true", help="only print the table of the last run's results.json")
    args = ap.parse_args()
    if args.report:
        print(markdown_table(json.loads((args.out / "results.json").read_text())["rows"]))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    base, sources = write_collection(args.out / "collection", args.tasks, args.noise)
    stats = args.out / "stats"
    t0 = time.perf_counter()
    build_store(base, sources, make_method("pca", 1), stats, overwrite=True, tensor_stats=True)
    stats_seconds = time.perf_counter() - t0
    gram, grams, shape_of, names = stats_from_store(stats)
    rows = []

    def record(label: str, store, plan) -> None:
        realised = np.array([t["rel_error"] ** 2 for t in store.manifest["tasks"]])
        rows.append(
            {
                "label": label,
                "bytes_ratio": store.manifest["bytes"]["ratio"],
                "est_bias_mean": float(plan.task_bias().mean()),
                "est_bias_max": float(plan.task_bias().max()),
                "est_variance_mean": float(plan.task_variance().mean()),
                "est_loss_mean": float(plan.task_loss().mean()),
                "est_loss_max": float(plan.task_loss().max()),
                "realised_sq_error_mean": float(realised.mean()),
                "realised_sq_error_max": float(realised.max()),
                "M": store.n_atoms,
            }
        )
        r = rows[-1]
        print(
            f"{label:<22} bytes {100 * r['bytes_ratio']:7.3f}%  est. loss mean {r['est_loss_mean']:.4f} "
            f"max {r['est_loss_max']:.4f}  realised sq. error {r['realised_sq_error_mean']:.4f}",
            flush=True,
        )

    path = args.out / "store"
    for label, m, residual, atom_code in SINGLE:
        codes, n_atoms = single_plan(m, residual, atom_code)
        store = build_store(base, sources, make_method("pca", n_atoms), path, overwrite=True, codes=codes)
        plan = estimate_plan(gram, grams, shape_of, codes or CodePlan(), n_atoms, task_names=names)
        record(label, store, plan)
    timings = []
    for objective in ("mean", "worst"):  # the planner's objective: mean loss over tasks, or the worst task's
        for budget in BUDGETS:
            t0 = time.perf_counter()
            store = build_for_budget(
                base, sources, path, budget, stats_store=stats, overwrite=True, objective=objective
            )
            timings.append(time.perf_counter() - t0)
            codes = CodePlan(tensors={n: tc for n, tc in store.residuals.codes.items()} if store.residuals else {})
            plan = estimate_plan(gram, grams, shape_of, codes, store.n_atoms, task_names=names)
            record(f"planned {budget:.1%}" + (", worst task" if objective == "worst" else ""), store, plan)
            rows[-1]["plan"] = store.summary().get("codes")
    (args.out / "results.json").write_text(
        json.dumps(
            {"settings": vars(args) | {"out": str(args.out)}, "rows": rows, "stats_build_s": stats_seconds}, indent=2
        )
        + "\n"
    )
    shutil.rmtree(path, ignore_errors=True)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
