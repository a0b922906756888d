"""The frontier's protocol averaged over validation draws: gain and negation kept, paired with the true vectors.

``benchmarks/frontier.py`` runs the protocol once, on each task's first 64 validation examples.
Its lambda choice is itself random (a 95% control threshold where one example is 1.6 points, a
target accuracy nearly flat near its minimum), so a near-lossless store can lose 0.1-0.8 of a
task's negation to the search alone (docs/frontier.md). Here every validation example's
correctness is computed once at every grid lambda (0, 0.05, ..., 1.0) on the whole validation
pool, for the true task vectors and for each store; the protocol then runs on ``--draws`` draws
of 64 examples per task (with replacement, the same draws for every edit), and test accuracy is
measured at each lambda any draw chose. Reported per configuration:

- gain kept: ``(E[mean test acc] - zero-shot) / (E_full[mean test acc] - zero-shot)``;
- negation effect kept per task: ``(zs - E[target test acc]) / (zs - E_full[target test acc])``;
- how often the store chose the lambda the true vectors chose on the same draw.

``E`` is the mean over draws of the test accuracy at the lambda chosen on that draw.

    .venv/bin/python benchmarks/frontier_resampled.py --out runs/frontier --configs planned \\
        --budgets 0.015625 0.00390625 --noise-weight 0.00390625
    .venv/bin/python benchmarks/frontier_resampled.py --out runs/frontier --only int8 int4

Finished configurations are appended to ``resampled.jsonl`` (resumable); the true vectors'
figures are cached in ``resampled-reference.json``. ``frontier.py --report`` adds their table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frontier import BUDGETS, CONTROL_FOR, SEEDS, SUITE, DeltaFor, build_config, configurations, key, last_delta
from tvbasis.arithmetic import task_weights
from tvbasis.evaluation import runner
from tvbasis.evaluation.protocol import LAMBDA_GRID
from tvbasis.evaluation.resampling import (
    addition_choices,
    choice_shares,
    draw_accuracies,
    expected_accuracy,
    negation_choices,
    validation_draws,
)
from tvbasis.tasks import TaskSource
from tvbasis.textsuite.data import TASK_NAMES, load_task
from tvbasis.textsuite.model import Evaluator, finetune_cached, minilm_path
from tvbasis.textsuite.presets import default_cache
from tvbasis.textsuite.suite import task_vector

GRID = LAMBDA_GRID
THRESHOLD = 0.95


class Draws:
    """The validation draws every edit is run on, and the base's (lambda 0) correctness on each pool."""

    def __init__(self, ev: Evaluator, names: list[str], n_draws: int, size: int, seed: int) -> None:
        ev.reset()
        self.base = {n: ev.correct(n, "val").numpy() for n in names}
        self.index = validation_draws({n: len(c) for n, c in self.base.items()}, size, n_draws, seed)
        self.settings = {"draws": n_draws, "size": size, "seed": seed}


class Curves:
    """One edit's validation correctness at every grid lambda and its test accuracies at the lambdas
    asked for; with a ``path`` they are kept on disk, so other draws of the same edit cost no new
    validation pass (the true vectors' are reused by every run)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.val: dict[str, np.ndarray] = {}
        self.test: dict[str, float] = {}
        if path is not None and path.with_suffix(".npz").exists():
            with np.load(path.with_suffix(".npz")) as z:
                self.val = {k: z[k] for k in z.files}
            self.test = json.loads(path.with_suffix(".json").read_text())

    def save(self) -> None:
        if self.path is None:
            return
        for suffix, write in (
            (".npz", lambda f: np.savez_compressed(f, **self.val)),
            (".json", lambda f: f.write(json.dumps(self.test).encode())),
        ):
            tmp = self.path.with_suffix(suffix + ".tmp")
            with tmp.open("wb") as f:
                write(f)
            tmp.replace(self.path.with_suffix(suffix))

    def correct(
        self, ev: Evaluator, edit: str, delta: runner.Delta, tasks: list[str], draws: Draws
    ) -> dict[str, np.ndarray]:
        """Per task ``[lambdas, examples]``: correctness of ``base + lam * delta`` on its validation pool."""
        keys = {t: f"{edit}/{t}" for t in tasks}
        if all(k in self.val for k in keys.values()):
            return {t: self.val[k] for t, k in keys.items()}
        correct = {t: np.empty((len(GRID), len(draws.base[t])), dtype=bool) for t in tasks}
        for i, lam in enumerate(GRID):
            if lam == 0:
                for t in tasks:
                    correct[t][i] = draws.base[t]
                continue
            ev.set_task_vector(delta, lam)
            for t in tasks:
                correct[t][i] = ev.correct(t, "val").numpy()
        self.val.update({keys[t]: c for t, c in correct.items()})
        return correct

    def test_accuracy_at(
        self, ev: Evaluator, edit: str, delta: runner.Delta, tasks: list[str], zs_test: dict[str, float]
    ):
        """``f(grid index)`` -> mean test accuracy over ``tasks`` of ``base + lam * delta``."""

        def at(i: int) -> float:
            k = f"{edit}/{GRID[i]}"
            if k not in self.test:
                if GRID[i] == 0:
                    self.test[k] = float(np.mean([zs_test[t] for t in tasks]))
                else:
                    ev.set_task_vector(delta, GRID[i])
                    self.test[k] = float(np.mean([ev.accuracy(t, "test") for t in tasks]))
            return self.test[k]

        return at


def resampled(
    ev: Evaluator,
    delta_for: DeltaFor,
    names: list[str],
    draws: Draws,
    ft_val: dict[str, float],
    zs_test: dict[str, float],
    log: runner.Log,
    curves: Curves | None = None,
) -> dict[str, Any]:
    """Expected test accuracies at the lambdas chosen on each draw: addition (mean over tasks) and each negation."""
    t0 = time.perf_counter()
    curves = curves or Curves()
    delta = delta_for(np.ones(len(names)))
    correct = curves.correct(ev, "addition", delta, names, draws)
    acc = {t: draw_accuracies(c, draws.index[t]) for t, c in correct.items()}
    choices = addition_choices(acc, ft_val, GRID)
    out: dict[str, Any] = {
        "addition": {
            "expected_test": expected_accuracy(choices, curves.test_accuracy_at(ev, "addition", delta, names, zs_test)),
            "choices": choices.tolist(),
        },
        "negation": {},
    }
    curves.save()
    for t in names:
        control = CONTROL_FOR(t)
        delta = delta_for(task_weights(names, negate=[t]))
        correct = curves.correct(ev, f"negate {t}", delta, [t, control], draws)
        acc = {k: draw_accuracies(c, draws.index[k]) for k, c in correct.items()}
        choices = negation_choices(acc[t], acc[control], GRID, THRESHOLD)
        at = curves.test_accuracy_at(ev, f"negate {t}", delta, [t], zs_test)
        out["negation"][t] = {
            "control": control,
            "expected_test": expected_accuracy(choices, at),
            "choices": choices.tolist(),
        }
        curves.save()
    ev.reset()
    log(f"   resampled protocol: {time.perf_counter() - t0:.0f} s")
    return out


def figures(res: dict[str, Any], full: dict[str, Any], zs_test: dict[str, float]) -> dict[str, Any]:
    """Shares of the true vectors' expected gain and negation effects kept, and lambda agreement per draw."""
    zs_mean = float(np.mean(list(zs_test.values())))
    gain = (res["addition"]["expected_test"] - zs_mean) / (full["addition"]["expected_test"] - zs_mean)
    effects, same = {}, {}
    for t, row in res["negation"].items():
        ref = full["negation"][t]
        effects[t] = (zs_test[t] - row["expected_test"]) / (zs_test[t] - ref["expected_test"])
        same[t] = float(np.mean(np.asarray(row["choices"]) == np.asarray(ref["choices"])))
    return {
        "gain_resampled": float(gain),
        "effect_resampled": effects,
        "effect_resampled_min": float(min(effects.values())),
        "same_lambda": same,
        "same_lambda_addition": float(
            np.mean(np.asarray(res["addition"]["choices"]) == np.asarray(full["addition"]["choices"]))
        ),
        "lambda_shares": {
            "addition": choice_shares(np.asarray(res["addition"]["choices"]), GRID),
            **{t: choice_shares(np.asarray(r["choices"]), GRID) for t, r in res["negation"].items()},
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/frontier"))
    ap.add_argument("--configs", nargs="+", default=["single"], choices=["single", "planned"])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="planned budgets (fractions)")
    ap.add_argument("--noise-weight", type=float, default=None, help="planner's weight of unbiased error")
    ap.add_argument("--tensor-atom-codes", nargs="+", default=None)
    ap.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    ap.add_argument("--draws", type=int, default=2000, help="validation draws per task")
    ap.add_argument("--draw-size", type=int, default=SUITE.val_limit, help="validation examples per draw")
    ap.add_argument("--draw-seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = minilm_path()
    tasks = [load_task(n) for n in TASK_NAMES]
    names = [t.name for t in tasks]
    ft_dirs = {t.name: finetune_cached(base, t, default_cache() / "finetunes") for t in tasks}
    sources = [TaskSource(n, ft_dirs[n]) for n in names]
    ev = Evaluator(base, tasks)
    base_state = ev.base_state()
    zs_test = {n: ev.accuracy(n, "test") for n in names}
    draws = Draws(ev, names, args.draws, args.draw_size, args.draw_seed)

    def log(line: str) -> None:
        print(line, flush=True)

    def read_tv(n: str) -> dict[str, torch.Tensor]:
        return task_vector(base_state, ft_dirs[n])

    ref_path = args.out / "resampled-reference.json"
    full = json.loads(ref_path.read_text()) if ref_path.exists() else None
    if full is None or full["settings"] != draws.settings:
        t0 = time.perf_counter()
        ft_val = {}
        full_sum = {k: torch.zeros_like(v) for k, v in base_state.items()}
        for n in names:  # each fine-tune on its whole validation pool: the normalisers
            tau = read_tv(n)
            ev.set_task_vector(tau)
            ft_val[n] = ev.accuracy(n, "val")
            for k in full_sum:
                full_sum[k] += tau[k]
        curves = Curves(args.out / "resampled-full-curves")
        full = resampled(ev, runner.full_delta(names, full_sum, read_tv), names, draws, ft_val, zs_test, log, curves)
        full.update(settings=draws.settings, ft_val=ft_val, zs_test=zs_test, seconds=time.perf_counter() - t0)
        tmp = ref_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(full) + "\n")
        tmp.replace(ref_path)
        del full_sum
    results_path = args.out / "resampled.jsonl"
    done = set()
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            if row["settings"] == draws.settings:
                done.add(key(row["config"]))
    plan_store = args.out / "stores" / "stats"
    atom_codes = tuple(args.tensor_atom_codes) if args.tensor_atom_codes else None
    for cfg in configurations(args.configs, tuple(args.seeds), tuple(args.budgets), args.noise_weight, atom_codes):
        if key(cfg) in done or (args.only and cfg["label"] not in args.only):
            continue
        path = args.out / "stores" / "resampled-current"
        store = build_config(cfg, base, sources, path, plan_store)
        res = resampled(ev, last_delta(store), names, draws, full["ft_val"], zs_test, log)
        row = {"config": cfg, "settings": draws.settings, "bytes_ratio": store.manifest["bytes"]["ratio"], **res}
        row.update(figures(res, full, zs_test))
        with results_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log(
            f"== {cfg['label']} seed {cfg['seed']}: bytes {row['bytes_ratio']:.4%}, gain {row['gain_resampled']:.3f}, "
            f"min negation effect {row['effect_resampled_min']:.3f} "
            + " ".join(f"{t}={v:.3f}" for t, v in row["effect_resampled"].items())
        )
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
