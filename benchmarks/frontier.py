"""Compression frontier on the text suite: gain and per-task negation kept against bytes stored.

Every configuration is a store built from the 8 cached MiniLM fine-tunes of ``tvbasis demo``
(``--tensor-stats`` on, so ``tvbasis plan`` can read it): a basis alone, a code on every
tensor's task vector (``-M 0 --residual CODE``), or a planned mix (``build --budget``). Through
each store the suite's protocol runs task addition (lambda on validation, test once) and the
negation of **every** task (lambda minimising the target's validation accuracy with the control
at >= 95% of zero-shot). Reported per configuration: bytes (everything in the store, relative to
the 8 fp32 task vectors), gain retained per task and overall, negation effect retained per task,
and the store's measured relative error. Each finished configuration is appended to
``results.jsonl``, so a run can be resumed; ``--report`` writes ``report.md`` and ``frontier.png``.

    .venv/bin/python benchmarks/frontier.py --out runs/frontier [--configs single planned] [--report]
    .venv/bin/python benchmarks/frontier.py --out runs/frontier --configs planned --budgets 0.015625 0.00390625
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvbasis.build import build_store
from tvbasis.codes import parse_code
from tvbasis.codes.keep import sr2_clip
from tvbasis.evaluation import runner
from tvbasis.evaluation.protocol import effect_retained, gain_retained
from tvbasis.methods import make_method
from tvbasis.planning.budget import DEFAULT_CODES
from tvbasis.planning.sensitivity import load_sensitivity, row_sensitivity, save_sensitivity
from tvbasis.store import Store, open_store
from tvbasis.store.residuals import CodePlan, TensorCode, uniform_plan
from tvbasis.tasks import TaskSource, TaskVectorSet
from tvbasis.textsuite.data import TASK_NAMES, load_task
from tvbasis.textsuite.model import Evaluator, finetune_cached, minilm_path, text_encoder_forward
from tvbasis.textsuite.presets import default_cache
from tvbasis.textsuite.suite import SuiteConfig, task_vector

SEEDS = (0, 1, 2)
#: (label, M, residual code or None); ``{seed}`` is filled in for the random codes; M < 0: every
#: tensor its own pca basis of -M atoms (no global basis).
SINGLE: list[tuple[str, int, str | None]] = [
    ("pca M=1", 1, None),
    ("pca M=2", 2, None),
    ("pca M=4", 4, None),
    ("pca M=6", 6, None),
    ("int8", 0, "int8"),
    ("int4", 0, "int4"),
    ("int2", 0, "int2"),
    ("lloydmax2", 0, "lloydmax2"),
    ("sign", 0, "sign"),
    ("topk 6.25%", 0, "topk:0.0625"),
    ("lowrank 8", 0, "lowrank:8"),
    ("keep 50% int4", 0, "keep:0.5:int4:seed={seed}"),
    ("keep 12.5% int4", 0, "keep:0.125:int4:seed={seed}"),
    ("keep 6.25% int4", 0, "keep:0.0625:int4:seed={seed}"),
    ("keep 1.25% int8", 0, "keep:0.0125:int8:seed={seed}"),
    ("tensor pca M=1", -1, None),
    ("tensor pca M=2", -2, None),
    ("tensor pca M=4", -4, None),
]
BUDGETS = (0.004, 0.008, 0.016, 0.03, 0.06, 0.12)
#: The planner's weight of unbiased error for planned rows whose label names none (the weight the
#: first frontier was built with); other weights are labelled, e.g. ``--noise-weight 0.00390625``.
UNLABELLED_NOISE_WEIGHT = 1 / 64
#: Per-tensor atom codes the planner may use, for rows whose config names none (they were planned
#: before int4 atoms existed); ``--tensor-atom-codes`` records others in the config and label.
UNLABELLED_TENSOR_ATOM_CODES = ("int8",)
#: The sensitivity calibration (training texts per task x probes) the unlabelled rows were measured with.
REFERENCE_CALIBRATION = "32x8"
#: Residual codes the planner may use, for rows whose config names no sr2 clips (they were
#: planned before ``keep:...:sr2`` existed); ``--sr2-clips`` adds the default sr2 codes with those
#: clips (rows saying ``sr2_codes`` were planned with clip 2 only).
#: ``rsign:...`` codes likewise only where the config says ``rsign``.
UNLABELLED_CODES = tuple(c for c in DEFAULT_CODES if ":sr2" not in c and not c.startswith("rsign:"))


def planner_codes(cfg: dict[str, Any]) -> tuple[str, ...]:
    """The residual codes a planned configuration was (or is to be) planned with."""
    clips = [float(clip) for clip in cfg.get("sr2_clips", [2.0] if cfg.get("sr2_codes") else [])]

    def allowed(c: str) -> bool:
        if c.startswith("rsign:"):
            return bool(cfg.get("rsign"))
        return ":sr2" not in c or sr2_clip(parse_code(c.format(seed=0))) in clips

    return tuple(c for c in DEFAULT_CODES if allowed(c))


def configurations(
    kinds: list[str],
    seeds: tuple[int, ...],
    budgets: tuple[float, ...] = BUDGETS,
    noise_weight: float | None = None,
    tensor_atom_codes: tuple[str, ...] | None = None,
    row_codes: bool = False,
    sr2_clips: tuple[float, ...] = (),
    rsign: bool = False,
    sensitivity: bool = False,
    calibration: str | None = None,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if "single" in kinds:
        for label, m, code in SINGLE:
            for seed in seeds if code and "{seed}" in code else (0,):
                spec = code.format(seed=seed) if code else None
                cfg = {"label": label, "kind": "single", "M": max(m, 0), "residual": spec, "seed": seed}
                if m < 0:
                    cfg["tensor_atoms"] = -m
                out.append(cfg)
    if "planned" in kinds:
        for budget in budgets:
            label = f"planned {budget:.1%}" if round(budget, 3) == budget else f"planned {100 * budget:.4g}%"
            extra: dict[str, Any] = {}
            if noise_weight is not None:
                label += f", noise weight 1/{round(1 / noise_weight)}"
                extra["noise_weight"] = noise_weight
            if tensor_atom_codes is not None:
                label += f", {'/'.join(tensor_atom_codes)} tensor atoms"
                extra["tensor_atom_codes"] = list(tensor_atom_codes)
            if row_codes:
                label += ", rows codes"
                extra["row_codes"] = True
            if sr2_clips == (2.0,):  # the label and config such rows were first measured with
                label += ", sr2 keep"
                extra["sr2_codes"] = True
            elif sr2_clips:
                label += f", sr2 keep clips {'/'.join(f'{c:g}' for c in sr2_clips)}"
                extra["sr2_clips"] = list(sr2_clips)
            if rsign:
                label += ", rsign"
                extra["rsign"] = True
            if sensitivity:
                label += ", sensitivity"
                extra["sensitivity"] = True
                if calibration and calibration != REFERENCE_CALIBRATION:
                    label += f" {calibration}"
                    extra["sensitivity_calibration"] = calibration
            for seed in seeds:
                out.append({"label": label, "kind": "planned", "budget": budget, "seed": seed, **extra})
    return out


def add_planner_arguments(ap: argparse.ArgumentParser) -> None:
    """The planner's settings a run of planned configurations records (non-default ones are labelled)."""
    ap.add_argument("--noise-weight", type=float, default=None, help="planner's weight of unbiased error")
    ap.add_argument(
        "--tensor-atom-codes", nargs="+", default=None, help="codes the planner may give per-tensor atoms (int8 int4)"
    )
    ap.add_argument("--row-codes", action="store_true", help="let the planner use rows:... codes (labelled)")
    ap.add_argument(
        "--sr2-codes", action="store_true", help="let the planner use keep:...:sr2 codes clipped at 2 RMS (labelled)"
    )
    ap.add_argument(
        "--sr2-clips", nargs="+", type=float, default=None, help="sr2 clips the planner may use, e.g. 2 3 (labelled)"
    )
    ap.add_argument("--rsign", action="store_true", help="let the planner use rsign:... codes (labelled)")
    ap.add_argument(
        "--sensitivity",
        action="store_true",
        help="weigh each tensor's error by its output sensitivity (sensitivity.safetensors by the stats; labelled)",
    )
    ap.add_argument(
        "--sensitivity-calibration",
        default=REFERENCE_CALIBRATION,
        metavar="TEXTSxPROBES",
        help=f"--sensitivity measured on TEXTS training texts per task with PROBES probes "
        f"(default {REFERENCE_CALIBRATION}; others labelled and kept in their own file)",
    )


def configurations_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The configurations ``--configs``, ``--seeds``, ``--budgets`` and the planner arguments ask for."""
    atom_codes = tuple(args.tensor_atom_codes) if args.tensor_atom_codes else None
    return configurations(
        args.configs,
        tuple(args.seeds),
        tuple(args.budgets),
        args.noise_weight,
        atom_codes,
        args.row_codes,
        tuple(args.sr2_clips) if args.sr2_clips else (2.0,) if args.sr2_codes else (),
        args.rsign,
        args.sensitivity,
        args.sensitivity_calibration,
    )


def key(cfg: dict[str, Any]) -> str:
    return json.dumps({k: cfg[k] for k in sorted(cfg)}, sort_keys=True)


def build_config(cfg: dict[str, Any], base: Path, sources: list[TaskSource], path: Path, plan_store: Path) -> Store:
    if cfg["kind"] == "single":
        codes = uniform_plan(cfg["residual"]) if cfg["residual"] else None
        if cfg.get("tensor_atoms"):
            codes = CodePlan(default=TensorCode(False, parse_code(cfg["residual"] or "none"), cfg["tensor_atoms"]))
        return build_store(base, sources, make_method("pca", cfg["M"]), path, overwrite=True, codes=codes)
    from tvbasis.planning.budget import build_for_budget

    return build_for_budget(
        base,
        sources,
        path,
        budget=cfg["budget"],
        stats_store=plan_store,
        seed=cfg["seed"],
        overwrite=True,
        noise_weight=cfg.get("noise_weight", UNLABELLED_NOISE_WEIGHT),
        tensor_atom_codes=tuple(cfg.get("tensor_atom_codes", UNLABELLED_TENSOR_ATOM_CODES)),
        row_codes=cfg.get("row_codes", False),
        codes=planner_codes(cfg),
        sensitivity=(
            load_sensitivity(sensitivity_path(plan_store, cfg.get("sensitivity_calibration", REFERENCE_CALIBRATION)))
            if cfg.get("sensitivity")
            else None
        ),
    )


def parse_calibration(calibration: str) -> tuple[int, int]:
    """``"TEXTSxPROBES"`` as (training texts per task, probes)."""
    texts, _, probes = calibration.partition("x")
    if not (texts.isdigit() and probes.isdigit() and int(texts) > 0 and int(probes) > 0):
        raise SystemExit(f"--sensitivity-calibration {calibration!r}: give TEXTSxPROBES, e.g. 16x1")
    return int(texts), int(probes)


def sensitivity_path(plan_store: Path, calibration: str = REFERENCE_CALIBRATION) -> Path:
    """Where the text suite's output sensitivity (row figures) is kept, beside the statistics store."""
    suffix = "" if calibration == REFERENCE_CALIBRATION else f"-{calibration}"
    return plan_store.parent / f"sensitivity{suffix}.safetensors"


def ensure_sensitivity(plan_store: Path, suite: TextSuite, calibration: str = REFERENCE_CALIBRATION) -> None:
    """The text suite's output sensitivity per row (``planning.sensitivity``), measured once: the
    encoder's embeddings of the first TEXTS training examples of each task under PROBES random
    probes (``calibration``); the plans shape it by the statistics store's row energies."""
    per_task, probes = parse_calibration(calibration)
    path = sensitivity_path(plan_store, calibration)
    if path.exists():
        return
    t0 = time.perf_counter()
    tasks = TaskVectorSet(suite.base, suite.sources)
    texts = [e.text for n in suite.names for e in suite.ev.tasks[n].train[:per_task]]
    forward = text_encoder_forward(suite.base, texts, suite.ev.max_length)
    shapes = {i.name: tuple(i.shape) for i in tasks.tensors}
    figures = row_sensitivity(forward, shapes, probes=probes)
    meta = {
        "calibration": f"{per_task} training examples per task, {probes} probes",
        "seconds": time.perf_counter() - t0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_sensitivity(path, figures, meta)
    print(f"sensitivity of {len(figures)} tensors measured in {meta['seconds']:.1f} s -> {path}", flush=True)


def ensure_stats_store(plan_store: Path, base: Path, sources: list[TaskSource]) -> None:
    """The planner's statistics store (per-tensor Gram matrices, row counts and row energies),
    built if missing or older than the row energies."""
    if (plan_store / "tvbasis.json").exists() and open_store(plan_store).tensor_row_energy is not None:
        return
    plan_store.parent.mkdir(parents=True, exist_ok=True)
    build_store(base, sources, make_method("pca", 1), plan_store, overwrite=True, tensor_stats=True)


#: A store's delta for task weights.
DeltaFor = Callable[[np.ndarray], runner.Delta]


def last_delta(store: Store) -> DeltaFor:
    """``store``'s task-weighted delta, decoded once per weight vector: the runner's search and the
    matched-lambda measurement ask for the same weights in turn, and only the last is kept."""
    last: dict[bytes, runner.Delta] = {}

    def delta(weights: np.ndarray) -> runner.Delta:
        key = np.asarray(weights, dtype=np.float64).tobytes()
        if key not in last:
            last.clear()
            last[key] = runner.store_delta(store, weights)
        return last[key]

    return delta


def evaluate(
    store: Store, ev: Evaluator, names: list[str], ref: dict[str, Any], limits: runner.Limits, log: runner.Log
) -> dict[str, Any]:
    """Addition and the negation of every task through ``store``, searched and at the full vectors'
    lambdas; shares kept against the full vectors."""
    delta = last_delta(store)
    edit = runner.Edit("store", "store", store.n_atoms, store.manifest["bytes"]["ratio"], delta)
    add = runner.run_addition(ev, [edit], names, ref["zs"], ref["ft"], limits, "coarse-to-fine", log)["store"]
    gain = gain_retained(add["test"], ref["zs"]["test"], ref["full_addition"]["test"])
    matched_gain = matched_addition(delta, ev, names, ref, limits)
    neg: dict[str, dict[str, Any]] = {}
    matched_effects: dict[str, float] = {}
    for t in names:  # each target's delta serves its search, then its matched-lambda measurement
        neg.update(
            runner.run_negation(
                ev,
                [edit],
                names,
                [t],
                CONTROL_FOR,
                ref["zs"]["val"],
                ref["zs"]["test"],
                limits,
                0.95,
                "coarse-to-fine",
                log,
            )
        )
        matched_effects[t] = matched_negation(delta, ev, names, t, ref, limits)
    ev.reset()
    effects = {}
    for t in names:
        row = neg[t]["store"]
        effects[t] = (
            effect_retained(row["target_test"], ref["zs"]["test"][t], ref["full_negation"][t]["target_test"])
            if "target_test" in row
            else float("nan")
        )
    return {
        "bytes_ratio": store.manifest["bytes"]["ratio"],
        "bytes_total": store.manifest["bytes"]["total"],
        "rel_error": {t["name"]: t["rel_error"] for t in store.manifest["tasks"]},
        "addition": add,
        "gain_mean": mean_gain(add["test"], ref),
        "gain": gain,
        "negation": {t: neg[t]["store"] for t in names},
        "effect": effects,
        "effect_min": float(np.nanmin(list(effects.values()))),
        **matched_figures(matched_gain, matched_effects),
    }


def mean_gain(test: dict[str, float], ref: dict[str, Any]) -> float:
    """The share of full task addition's gain in mean test accuracy that ``test`` keeps."""
    zs_mean = np.mean(list(ref["zs"]["test"].values()))
    full_mean = np.mean(list(ref["full_addition"]["test"].values()))
    return float((np.mean(list(test.values())) - zs_mean) / (full_mean - zs_mean))


# Matched lambda: addition and each negation at the lambda the full vectors chose. A paired
# comparison on the same test examples: it leaves out the lambda search, whose 64 validation
# examples and 95% control floor move a near-lossless store's figures by about 0.1, and measures
# only how far the store's edit differs from the true vectors' edit.


def matched_addition(
    delta: DeltaFor, ev: Evaluator, names: list[str], ref: dict[str, Any], limits: runner.Limits
) -> float:
    ev.set_task_vector(delta(np.ones(len(names))), ref["full_addition"]["lam"])
    return mean_gain(runner.accuracies(ev, names, "test", limits), ref)


def matched_negation(
    delta: DeltaFor, ev: Evaluator, names: list[str], target: str, ref: dict[str, Any], limits: runner.Limits
) -> float:
    full_row = ref["full_negation"][target]
    if full_row.get("lam") is None:
        return float("nan")
    ev.set_task_vector(delta(runner.task_weights(names, negate=[target])), full_row["lam"])
    acc = ev.accuracy(target, "test", limits.test)
    return effect_retained(acc, ref["zs"]["test"][target], full_row["target_test"])


def matched_figures(gain: float, effects: dict[str, float]) -> dict[str, Any]:
    return {
        "gain_matched": gain,
        "effect_matched": effects,
        "effect_matched_min": float(np.nanmin(list(effects.values()))),
    }


@dataclass
class TextSuite:
    """The 8 cached MiniLM fine-tunes of ``tvbasis demo`` and one evaluator on their tasks."""

    base: Path
    names: list[str]
    ft_dirs: dict[str, Path]
    sources: list[TaskSource]
    ev: Evaluator

    @classmethod
    def load(cls) -> TextSuite:
        torch.manual_seed(0)
        base = minilm_path()
        tasks = [load_task(n) for n in TASK_NAMES]
        ft_dirs = {t.name: finetune_cached(base, t, default_cache() / "finetunes") for t in tasks}
        names = [t.name for t in tasks]
        return cls(base, names, ft_dirs, [TaskSource(n, ft_dirs[n]) for n in names], Evaluator(base, tasks))


SUITE = SuiteConfig(out_dir=Path("."), cache_dir=Path("."))
CONTROL_FOR = SUITE.control_for


def reference(ev: Evaluator, names: list[str], base_state, read_tv, limits: runner.Limits, log) -> dict[str, Any]:
    """Zero-shot, fine-tuned, and addition and negation through the full task vectors."""
    zs = runner.zero_shot(ev, names, limits)
    ft, full_sum = runner.finetuned(ev, names, base_state, read_tv, limits)
    full = runner.Edit(runner.FULL, "full", None, 1.0, runner.full_delta(names, full_sum, read_tv))
    add = runner.run_addition(ev, [full], names, zs, ft, limits, "coarse-to-fine", log)[runner.FULL]
    neg = runner.run_negation(
        ev, [full], names, names, CONTROL_FOR, zs["val"], zs["test"], limits, 0.95, "coarse-to-fine", log
    )
    return {
        "zs": zs,
        "ft": ft,
        "full_addition": add,
        "full_negation": {t: neg[t][runner.FULL] for t in names},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/frontier"))
    ap.add_argument("--configs", nargs="+", default=["single", "planned"], choices=["single", "planned"])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="planned budgets (fractions)")
    add_planner_arguments(ap)
    ap.add_argument(
        "--full-val", action="store_true", help="choose lambdas on the whole validation splits (use its own --out)"
    )
    ap.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    ap.add_argument(
        "--backfill-matched",
        action="store_true",
        help="rebuild each finished configuration lacking them and add the matched-lambda figures",
    )
    ap.add_argument("--report", action="store_true", help="only write report.md and frontier.png from results.jsonl")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        from frontier_report import write_report

        write_report(args.out)
        return
    suite = TextSuite.load()
    base, names, ft_dirs, sources, ev = suite.base, suite.names, suite.ft_dirs, suite.sources, suite.ev
    limits = runner.Limits(val=None if args.full_val else SUITE.val_limit, test=SUITE.test_limit)
    base_state = ev.base_state()

    def read_tv(n: str) -> dict[str, torch.Tensor]:
        return task_vector(base_state, ft_dirs[n])

    def log(line: str) -> None:
        print(line, flush=True)

    ref_path = args.out / "reference.json"
    if ref_path.exists():
        ref = json.loads(ref_path.read_text())
    else:
        t0 = time.perf_counter()
        ref = reference(ev, names, base_state, read_tv, limits, log)
        ref["seconds"] = time.perf_counter() - t0
        ref_path.write_text(json.dumps(ref, indent=2) + "\n")
    results_path = args.out / "results.jsonl"
    done = set()
    if results_path.exists():
        done = {key(json.loads(line)["config"]) for line in results_path.read_text().splitlines() if line.strip()}
    (args.out / "stores").mkdir(exist_ok=True)
    plan_store = args.out / "stores" / "stats"
    if "planned" in args.configs:
        ensure_stats_store(plan_store, base, sources)
        if args.sensitivity:
            ensure_sensitivity(plan_store, suite, args.sensitivity_calibration)
    if args.backfill_matched:
        backfill_matched(results_path, args, base, sources, plan_store, ev, names, ref, limits, log)
        return
    for cfg in configurations_of(args):
        if key(cfg) in done or (args.only and cfg["label"] not in args.only):
            continue
        path = args.out / "stores" / "current"
        t0 = time.perf_counter()
        store = build_config(cfg, base, sources, path, plan_store)
        t_build = time.perf_counter() - t0
        res = evaluate(store, ev, names, ref, limits, log)
        res["seconds"] = {"build": t_build, "evaluate": time.perf_counter() - t0 - t_build}
        if cfg["kind"] == "planned":
            res["plan"] = store.summary().get("codes")
        with results_path.open("a") as f:
            f.write(json.dumps({"config": cfg, **res}) + "\n")
        log(
            f"== {cfg['label']} seed {cfg['seed']}: bytes {res['bytes_ratio']:.4%}, gain {res['gain_mean']:.3f}, "
            f"min negation effect {res['effect_min']:.3f} ({res['seconds']['build']:.0f} + "
            f"{res['seconds']['evaluate']:.0f} s)"
        )
        shutil.rmtree(path, ignore_errors=True)


def backfill_matched(
    results_path: Path,
    args: argparse.Namespace,
    base: Path,
    sources: list[TaskSource],
    plan_store: Path,
    ev: Evaluator,
    names: list[str],
    ref: dict[str, Any],
    limits: runner.Limits,
    log: runner.Log,
) -> None:
    """Add the matched-lambda figures to finished results (``--only`` picks labels), rewriting the file."""
    rows = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
    for row in rows:
        cfg = row["config"]
        if "effect_matched" in row or (args.only and cfg["label"] not in args.only):
            continue
        path = args.out / "stores" / "current"
        store = build_config(cfg, base, sources, path, plan_store)
        if abs(store.manifest["bytes"]["total"] - row["bytes_total"]) > 0.01 * row["bytes_total"]:
            raise SystemExit(f"{cfg['label']} seed {cfg['seed']}: rebuilt store's bytes differ from the result's")
        delta = last_delta(store)
        gain = matched_addition(delta, ev, names, ref, limits)
        row.update(matched_figures(gain, {t: matched_negation(delta, ev, names, t, ref, limits) for t in names}))
        ev.reset()
        shutil.rmtree(path, ignore_errors=True)
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(results_path)
        log(
            f"== {cfg['label']} seed {cfg['seed']}: matched lambda gain {row['gain_matched']:.3f}, "
            f"min negation effect {row['effect_matched_min']:.3f}"
        )


if __name__ == "__main__":
    main()
