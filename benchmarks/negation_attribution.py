"""Which tensors' coding error costs one task's negation, over validation draws.

A planned store can keep less of one task's negation effect on one mask seed than on another,
with the same plan and nearly the same squared error (docs/frontier.md, Targets). Here the
store's error on that task's negated vector, ``delta_store - delta_true``, is split into groups
of tensors (the embeddings, the 1-D tensors, the attention and the feed-forward matrices of each
pair of layers), and the protocol's expected negation effect (as in ``frontier_resampled.py``:
the same 2,000 validation draws, paired with the true vector) is measured for the true vector
plus all of the error, and plus each group's error alone.

    .venv/bin/python benchmarks/negation_attribution.py --out runs/frontier --target wn_noun \\
        --budget 0.015625 --seeds 0 1 --noise-weight 0.00390625 --row-codes --sr2-clips 2 3 --rsign

Rows go to ``attribution.jsonl`` (resumable); each prints as it finishes, with the group's share
of the true vector's energy and its error relative to that energy.

``--shift LAMBDA`` runs no protocol: per seed and group it prints how far the group's error alone
moves the target's and its control's validation embeddings (mean squared distance of the unit
embeddings from the true vector's edit at ``LAMBDA``), and that shift per unit of the group's
error relative to the whole vector's energy: how much a unit of weight error in each group
costs at the output, which the planner's proxy takes to be the same everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from frontier import (
    CONTROL_FOR,
    TextSuite,
    add_planner_arguments,
    build_config,
    configurations_of,
    ensure_sensitivity,
    ensure_stats_store,
    key,
)
from frontier_resampled import GRID, THRESHOLD, Curves, Draws
from tvbasis.arithmetic import task_weights
from tvbasis.evaluation import resampling, runner
from tvbasis.store import Store, open_store
from tvbasis.textsuite.model import Evaluator
from tvbasis.textsuite.suite import task_vector

ALL = "all tensors"


def tensor_group(name: str) -> str:
    """The group a BERT-style parameter is attributed to: embeddings, 1-D, or a pair of layers' matrices."""
    if "embeddings" in name:
        return "embeddings"
    if name.endswith(".bias") or "LayerNorm" in name:
        return "1-D"
    parts = name.split(".")
    if "layer" not in parts:
        return "other"
    first = int(parts[parts.index("layer") + 1]) // 2 * 2
    return f"layers {first}-{first + 1} {'attention' if 'attention' in parts else 'feed-forward'}"


def negated_accuracy(
    ev: Evaluator, delta: runner.Delta, target: str, draws: Draws, curves: Curves, edit: str
) -> tuple[float, np.ndarray]:
    """The target's expected test accuracy under the protocol's negation, and each draw's chosen lambda."""
    control = CONTROL_FOR(target)
    correct = curves.correct(ev, edit, delta, [target, control], draws)
    acc = {k: resampling.draw_accuracies(c, draws.index[k]) for k, c in correct.items()}
    choices = resampling.negation_choices(acc[target], acc[control], GRID, THRESHOLD)
    expected = curves.expected_test(ev, edit, delta, [target], choices, draws)[target]
    return float(expected.mean()), choices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/frontier"))
    ap.add_argument("--target", default="wn_noun", help="the task whose negation is attributed")
    ap.add_argument("--budget", type=float, default=1 / 64, help="the planned store's budget (fraction)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--groups", nargs="*", default=None, help="groups to measure alone (default: every group)")
    ap.add_argument("--shift", type=float, default=None, help="only print each group's output shift at this lambda")
    add_planner_arguments(ap)
    args = ap.parse_args()
    args.configs, args.budgets = ["planned"], [args.budget]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    suite = TextSuite.load()
    names, ev = suite.names, suite.ev
    if args.target not in names:
        raise SystemExit(f"--target {args.target!r}: not a text-suite task ({', '.join(names)})")
    true_delta = {k: -v for k, v in task_vector(ev.base_state(), suite.ft_dirs[args.target]).items()}
    if args.shift is not None:
        print_shifts(ev, suite, args, true_delta, names)
        return
    draws = Draws(ev, names, 2000, 64, 0)  # frontier_resampled.py's defaults: the same draws
    groups = sorted({tensor_group(k) for k in true_delta})
    total = sum(float(v.square().sum()) for v in true_delta.values())
    zero_shot = float(draws.base_test[args.target].mean())
    # The true vector's curves are frontier_resampled.py's (same edit name), cached on disk.
    full_curves = Curves(args.out / "resampled-full-curves")
    full_acc, full_choices = negated_accuracy(ev, true_delta, args.target, draws, full_curves, f"negate {args.target}")
    full_curves.save()
    results_path = args.out / "attribution.jsonl"
    done = set()
    if results_path.exists():
        done = {line_key(json.loads(line)) for line in results_path.read_text().splitlines() if line.strip()}
    plan_store = args.out / "stores" / "stats"
    ensure_stats_store(plan_store, suite.base, suite.sources)
    if args.sensitivity:
        ensure_sensitivity(plan_store, suite, args.sensitivity_calibration)
    for cfg in configurations_of(args):
        t0 = time.perf_counter()
        store = open_or_build(cfg, suite, args.out, plan_store)
        delta = runner.store_delta(store, task_weights(names, negate=[args.target]))
        error = {k: delta[k] - true_delta[k] for k in true_delta}
        for group in [ALL, *(args.groups or groups)]:
            row: dict[str, Any] = {"config": cfg, "target": args.target, "group": group}
            if line_key(row) in done:
                continue
            members = [k for k in true_delta if group in (ALL, tensor_group(k))]
            if not members:
                raise SystemExit(f"--groups: no tensor is in group {group!r} (groups: {', '.join(groups)})")
            edit = {k: true_delta[k] + error[k] if k in members else true_delta[k] for k in true_delta}
            acc, choices = negated_accuracy(ev, edit, args.target, draws, Curves(), f"{group} seed {cfg['seed']}")
            group_energy = sum(float(true_delta[k].square().sum()) for k in members)
            row.update(
                energy_share=group_energy / total,
                error_ratio=sum(float(error[k].square().sum()) for k in members) / max(group_energy, 1e-30),
                effect_kept=(zero_shot - acc) / (zero_shot - full_acc),
                same_lambda=float(np.mean(choices == full_choices)),
                seconds=time.perf_counter() - t0,
            )
            with results_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"seed {cfg['seed']} {group:32s} energy {row['energy_share']:6.1%}  error/energy "
                f"{row['error_ratio']:.3f}  negation kept {row['effect_kept']:.3f}  "
                f"same lambda {row['same_lambda']:.2f}",
                flush=True,
            )
            t0 = time.perf_counter()
        ev.reset()


def print_shifts(
    ev: Evaluator, suite: TextSuite, args: argparse.Namespace, true_delta: runner.Delta, names: list[str]
) -> None:
    """Per seed and group: the validation embeddings' shift from the group's error alone, at ``--shift``."""
    tasks = [args.target, CONTROL_FOR(args.target)]
    ev.set_task_vector(true_delta, args.shift)
    reference = {t: ev.embeddings(t, "val") for t in tasks}
    total = sum(float(v.square().sum()) for v in true_delta.values())
    groups = args.groups or sorted({tensor_group(k) for k in true_delta})
    plan_store = args.out / "stores" / "stats"
    ensure_stats_store(plan_store, suite.base, suite.sources)
    if args.sensitivity:
        ensure_sensitivity(plan_store, suite, args.sensitivity_calibration)
    for cfg in configurations_of(args):
        store = open_or_build(cfg, suite, args.out, plan_store)
        delta = runner.store_delta(store, task_weights(names, negate=[args.target]))
        for group in groups:
            members = [k for k in true_delta if tensor_group(k) == group]
            error = sum(float((delta[k] - true_delta[k]).square().sum()) for k in members) / total
            if error == 0:
                continue
            ev.set_task_vector({k: delta[k] if k in members else v for k, v in true_delta.items()}, args.shift)
            shift = {t: float((ev.embeddings(t, "val") - reference[t]).square().sum(dim=1).mean()) for t in tasks}
            print(
                f"seed {cfg['seed']} {group:32s} error / vector's energy {error:.4f}  shift "
                + "  ".join(f"{t} {v:.2e}" for t, v in shift.items())
                + f"  target's shift per unit error {shift[args.target] / error:.2e}",
                flush=True,
            )
    ev.reset()


def open_or_build(cfg: dict[str, Any], suite: TextSuite, out: Path, plan_store: Path) -> Store:
    """The configuration's store under ``out/stores``, built unless one built for the same config is there."""
    path = out / "stores" / f"attribution-{cfg['seed']}"
    marker = path / "config.json"
    if marker.exists() and json.loads(marker.read_text()) == cfg:
        return open_store(path)
    store = build_config(cfg, suite.base, suite.sources, path, plan_store)
    marker.write_text(json.dumps(cfg))
    return store


def line_key(row: dict[str, Any]) -> str:
    return json.dumps([key(row["config"]), row["target"], row["group"]])


if __name__ == "__main__":
    main()
