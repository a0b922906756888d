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
figures are cached in ``resampled-reference.json``. ``frontier.py --report`` adds their table;
``--report`` here prints each store against the targets and plots ``targets.png`` from these
files alone.
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

from frontier import (
    BUDGETS,
    CONTROL_FOR,
    SEEDS,
    SUITE,
    DeltaFor,
    TextSuite,
    add_planner_arguments,
    build_config,
    configurations_of,
    ensure_sensitivity,
    ensure_stats_store,
    key,
    last_delta,
)
from frontier_report import write_resampled_report
from tvbasis.arithmetic import task_weights
from tvbasis.evaluation import resampling, runner
from tvbasis.evaluation.protocol import LAMBDA_GRID
from tvbasis.textsuite.model import Evaluator
from tvbasis.textsuite.suite import task_vector

GRID = LAMBDA_GRID
THRESHOLD = 0.95


class Draws:
    """The validation draws every edit is run on, and the base's (lambda 0) correctness per example."""

    def __init__(self, ev: Evaluator, names: list[str], n_draws: int, size: int, seed: int) -> None:
        ev.reset()
        self.base = {n: ev.correct(n, "val").numpy() for n in names}
        self.base_test = {n: ev.correct(n, "test").numpy() for n in names}
        self.index = resampling.validation_draws({n: len(c) for n, c in self.base.items()}, size, n_draws, seed)
        # "test": per-example test correctness is kept (earlier runs kept only accuracies)
        self.settings = {"draws": n_draws, "size": size, "seed": seed, "test": "per-example"}


class Curves:
    """One edit's validation correctness at every grid lambda and its test correctness at the lambdas
    asked for, per example; with a ``path`` they are kept on disk, so other draws of the same edit
    cost no new pass (the true vectors' are reused by every run)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.arrays: dict[str, dict[str, np.ndarray]] = {"val": {}, "test": {}}
        for split in self.arrays:
            f = self._file(split)
            if f is not None and f.exists():
                with np.load(f, allow_pickle=False) as z:
                    self.arrays[split] = {k: z[k] for k in z.files}

    def _file(self, split: str) -> Path | None:
        return None if self.path is None else self.path.with_name(f"{self.path.name}-{split}.npz")

    def save(self) -> None:
        for split, arrays in self.arrays.items():
            f = self._file(split)
            if f is None:
                continue
            tmp = f.with_suffix(".tmp")
            with tmp.open("wb") as out:
                np.savez_compressed(out, **arrays)
            tmp.replace(f)

    def correct(
        self, ev: Evaluator, edit: str, delta: runner.Delta, tasks: list[str], draws: Draws
    ) -> dict[str, np.ndarray]:
        """Per task ``[lambdas, examples]``: correctness of ``base + lam * delta`` on its validation pool."""
        val = self.arrays["val"]
        keys = {t: f"{edit}/{t}" for t in tasks}
        if all(k in val for k in keys.values()):
            return {t: val[k] for t, k in keys.items()}
        correct = {t: np.empty((len(GRID), len(draws.base[t])), dtype=bool) for t in tasks}
        for i, lam in enumerate(GRID):
            if lam == 0:
                for t in tasks:
                    correct[t][i] = draws.base[t]
                continue
            ev.set_task_vector(delta, lam)
            for t in tasks:
                correct[t][i] = ev.correct(t, "val").numpy()
        val.update({keys[t]: c for t, c in correct.items()})
        return correct

    def expected_test(
        self, ev: Evaluator, edit: str, delta: runner.Delta, tasks: list[str], choices: np.ndarray, draws: Draws
    ) -> dict[str, np.ndarray]:
        """Per task and test example, the share of draws whose chosen lambda gets it right."""
        test = self.arrays["test"]

        def correct_at(i: int) -> dict[str, np.ndarray]:
            keys = {t: f"{edit}/{GRID[i]}/{t}" for t in tasks}
            if not all(k in test for k in keys.values()):
                if GRID[i] == 0:
                    test.update({keys[t]: draws.base_test[t] for t in tasks})
                else:
                    ev.set_task_vector(delta, GRID[i])
                    test.update({keys[t]: ev.correct(t, "test").numpy() for t in tasks})
            return {t: test[k] for t, k in keys.items()}

        return resampling.expected_correctness(choices, correct_at)


def resampled(
    ev: Evaluator,
    delta_for: DeltaFor,
    names: list[str],
    draws: Draws,
    ft_val: dict[str, float],
    log: runner.Log,
    curves: Curves | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """The lambdas chosen on each draw, for addition and each negation, and per test example the
    share of draws that get it right (``"addition"``: every task; ``"negate T"``: the target)."""
    t0 = time.perf_counter()
    curves = curves or Curves()
    delta = delta_for(np.ones(len(names)))
    correct = curves.correct(ev, "addition", delta, names, draws)
    acc = {t: resampling.draw_accuracies(c, draws.index[t]) for t, c in correct.items()}
    choices = resampling.addition_choices(acc, ft_val, GRID)
    expected = {"addition": curves.expected_test(ev, "addition", delta, names, choices, draws)}
    out: dict[str, Any] = {"addition": {"choices": choices.tolist()}, "negation": {}}
    curves.save()
    for t in names:
        control = CONTROL_FOR(t)
        delta = delta_for(task_weights(names, negate=[t]))
        correct = curves.correct(ev, f"negate {t}", delta, [t, control], draws)
        acc = {k: resampling.draw_accuracies(c, draws.index[k]) for k, c in correct.items()}
        choices = resampling.negation_choices(acc[t], acc[control], GRID, THRESHOLD)
        expected[f"negate {t}"] = curves.expected_test(ev, f"negate {t}", delta, [t], choices, draws)
        out["negation"][t] = {"control": control, "choices": choices.tolist()}
        curves.save()
    ev.reset()
    log(f"   resampled protocol: {time.perf_counter() - t0:.0f} s")
    return out, expected


def figures(
    res: dict[str, Any],
    expected: dict[str, dict[str, np.ndarray]],
    full: dict[str, Any],
    full_expected: dict[str, dict[str, np.ndarray]],
    base_test: dict[str, np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Shares of the true vectors' expected gain and negation effects kept, each with a 95% interval
    from resampling the test examples (the same resample for the edit, the true vectors and the
    base), and how often the edit chose the true vectors' lambda on the same draw."""
    names = list(base_test)
    rng = np.random.default_rng(seed)
    boot = {t: rng.integers(0, len(base_test[t]), size=(n_boot, len(base_test[t]))) for t in names}

    def per_task(vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per task ``[1 + n_boot]``: the mean on the test set, then on each resample."""
        return {t: np.concatenate([[v.mean()], v[boot[t]].mean(axis=1)]) for t, v in vectors.items()}

    zs = per_task(base_test)

    def interval(x: np.ndarray) -> dict[str, float]:
        lo, hi = np.percentile(x[1:], [2.5, 97.5])
        return {"value": float(x[0]), "lo": float(lo), "hi": float(hi)}

    zs_mean = np.mean([zs[t] for t in names], axis=0)
    edit_mean = np.mean(list(per_task(expected["addition"]).values()), axis=0)
    full_mean = np.mean(list(per_task(full_expected["addition"]).values()), axis=0)
    gain = interval((edit_mean - zs_mean) / (full_mean - zs_mean))
    effects, same = {}, {}
    for t in names:
        [edit_t] = per_task(expected[f"negate {t}"]).values()
        [full_t] = per_task(full_expected[f"negate {t}"]).values()
        effects[t] = interval((zs[t] - edit_t) / (zs[t] - full_t))
        same[t] = float(
            np.mean(np.asarray(res["negation"][t]["choices"]) == np.asarray(full["negation"][t]["choices"]))
        )
    worst = min(effects, key=lambda t: effects[t]["value"])
    return {
        "gain_resampled": gain["value"],
        "gain_resampled_ci": [gain["lo"], gain["hi"]],
        "effect_resampled": {t: e["value"] for t, e in effects.items()},
        "effect_resampled_ci": {t: [e["lo"], e["hi"]] for t, e in effects.items()},
        "effect_resampled_min": effects[worst]["value"],
        "same_lambda": same,
        "same_lambda_addition": float(
            np.mean(np.asarray(res["addition"]["choices"]) == np.asarray(full["addition"]["choices"]))
        ),
        "lambda_shares": {
            "addition": resampling.choice_shares(np.asarray(res["addition"]["choices"]), GRID),
            **{t: resampling.choice_shares(np.asarray(r["choices"]), GRID) for t, r in res["negation"].items()},
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/frontier"))
    ap.add_argument("--configs", nargs="+", default=["single"], choices=["single", "planned"])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="planned budgets (fractions)")
    add_planner_arguments(ap)
    ap.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    ap.add_argument("--draws", type=int, default=2000, help="validation draws per task")
    ap.add_argument("--draw-size", type=int, default=SUITE.val_limit, help="validation examples per draw")
    ap.add_argument("--draw-seed", type=int, default=0)
    ap.add_argument(
        "--report", action="store_true", help="print the targets table and plot targets.png (of --only labels)"
    )
    args = ap.parse_args()
    if args.report:
        print("\n".join(write_resampled_report(args.out, args.only)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    suite = TextSuite.load()
    base, names, ft_dirs, sources, ev = suite.base, suite.names, suite.ft_dirs, suite.sources, suite.ev
    base_state = ev.base_state()
    draws = Draws(ev, names, args.draws, args.draw_size, args.draw_seed)

    def log(line: str) -> None:
        print(line, flush=True)

    def read_tv(n: str) -> dict[str, torch.Tensor]:
        return task_vector(base_state, ft_dirs[n])

    # The true vectors: their per-example correctness is cached, so this costs a pass only once.
    ft_val = {}
    full_sum = {k: torch.zeros_like(v) for k, v in base_state.items()}
    for n in names:  # each fine-tune on its whole validation pool: the normalisers
        tau = read_tv(n)
        ev.set_task_vector(tau)
        ft_val[n] = ev.accuracy(n, "val")
        for k in full_sum:
            full_sum[k] += tau[k]
    t0 = time.perf_counter()
    curves = Curves(args.out / "resampled-full-curves")
    full, full_expected = resampled(ev, runner.full_delta(names, full_sum, read_tv), names, draws, ft_val, log, curves)
    full.update(settings=draws.settings, ft_val=ft_val, seconds=time.perf_counter() - t0)
    full["expected_test"] = {k: {t: float(v.mean()) for t, v in e.items()} for k, e in full_expected.items()}
    tmp = args.out / "resampled-reference.tmp"
    tmp.write_text(json.dumps(full) + "\n")
    tmp.replace(args.out / "resampled-reference.json")
    del full_sum
    results_path = args.out / "resampled.jsonl"
    done = set()
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            if row["settings"] == draws.settings:
                done.add(key(row["config"]))
    plan_store = args.out / "stores" / "stats"
    if "planned" in args.configs:
        ensure_stats_store(plan_store, base, sources)
        if args.sensitivity:
            ensure_sensitivity(plan_store, suite, args.sensitivity_calibration)
    for cfg in configurations_of(args):
        if key(cfg) in done or (args.only and cfg["label"] not in args.only):
            continue
        path = args.out / "stores" / "resampled-current"
        store = build_config(cfg, base, sources, path, plan_store)
        res, expected = resampled(ev, last_delta(store), names, draws, ft_val, log)
        row = {"config": cfg, "settings": draws.settings, "bytes_ratio": store.manifest["bytes"]["ratio"], **res}
        row["expected_test"] = {k: {t: float(v.mean()) for t, v in e.items()} for k, e in expected.items()}
        row.update(figures(res, expected, full, full_expected, draws.base_test))
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
