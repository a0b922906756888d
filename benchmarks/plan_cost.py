"""What planning costs against the build it plans (the 8 MiniLM fine-tunes of the text suite).

Times, in one run: the Gram pass that gathers the planner's statistics (per-tensor Gram matrices,
row counts and row energies); ``plan_budget`` from them in a new process on a machine that never
planned (the codes' calibration on Gaussian rows measured), in a new process once that
calibration is cached on disk, and warm; ``build --budget`` from those statistics (atom and
residual passes); and the output sensitivity a ``--sensitivity`` plan reads (``tvbasis
sensitivity``: random probes on training texts, per row of every tensor, measured once per base
model and calibration texts and reused for every set of fine-tunes), then a plan weighted by it
(the store's row energies shape it). The sensitivity is measured twice: with the default
calibration (16 texts per task, one probe) and with the one the frontier benchmarks use (32 texts
per task, eight probes); the default's plans at 1/64 and 1/256 of the bytes are then judged by the
reference's figures against the reference's own plans. Prints each time as a ratio to the build's.

    .venv/bin/python benchmarks/plan_cost.py [--budget 0.0156] [--out runs/plan-cost]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from frontier import REFERENCE_CALIBRATION, parse_calibration
from tvbasis.build import build_store
from tvbasis.methods import make_method
from tvbasis.planning import budget as planner
from tvbasis.planning.calibration import forget_calibration
from tvbasis.planning.sensitivity import DEFAULT_PROBES, DEFAULT_TEXTS, row_sensitivity
from tvbasis.tasks import TaskSource, TaskVectorSet
from tvbasis.textsuite.data import TASK_NAMES, load_task
from tvbasis.textsuite.model import DEFAULT_MAX_LENGTH, finetune_cached, minilm_path, text_encoder_forward
from tvbasis.textsuite.presets import default_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=0.0156)
    ap.add_argument("--out", type=Path, default=Path("runs/plan-cost"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    base = minilm_path()
    tasks = [load_task(n) for n in TASK_NAMES]
    sources = [TaskSource(t.name, finetune_cached(base, t, default_cache() / "finetunes")) for t in tasks]
    stats = args.out / "stats"
    t0 = time.perf_counter()
    build_store(base, sources, make_method("pca", 1), stats, overwrite=True, tensor_stats=True)
    stats_s = time.perf_counter() - t0
    gram, grams, shapes, names = planner.stats_from_store(stats)
    counts = planner.nonzero_rows_from_store(stats)  # rows:... candidates where rows are zero

    def plan(budget: float = args.budget, sensitivity: dict[str, float] | None = None) -> planner.BudgetPlan:
        return planner.plan_budget(
            gram, grams, shapes, budget, task_names=names, nonzero_rows=counts, sensitivity=sensitivity
        )

    def new_process() -> None:
        """Forget what this process holds, as a new one would start (not the calibration file)."""
        forget_calibration()
        planner._cached_parts.cache_clear()
        planner._residual_bytes.cache_clear()

    timings = {}
    cache = os.environ.get("TVBASIS_CACHE")
    with tempfile.TemporaryDirectory() as empty:
        os.environ["TVBASIS_CACHE"] = empty  # a machine that never planned: no calibration on disk
        try:
            for label in ("first", "cached"):
                new_process()
                t0 = time.perf_counter()
                plan()
                timings[label] = time.perf_counter() - t0
        finally:
            if cache is None:
                os.environ.pop("TVBASIS_CACHE")
            else:
                os.environ["TVBASIS_CACHE"] = cache
    t0 = time.perf_counter()
    planned = plan()
    warm = time.perf_counter() - t0
    tvs = TaskVectorSet(base, sources)
    shapes_of = {i.name: tuple(i.shape) for i in tvs.tensors}

    def measure(per_task: int, probes: int) -> tuple[dict[str, torch.Tensor], float]:
        t0 = time.perf_counter()
        texts = [e.text for t in tasks for e in t.train[:per_task]]
        forward = text_encoder_forward(base, texts, DEFAULT_MAX_LENGTH)
        return row_sensitivity(forward, shapes_of, probes=probes), time.perf_counter() - t0

    default_texts = DEFAULT_TEXTS // len(tasks)
    rows, sensitivity_s = measure(default_texts, DEFAULT_PROBES)
    reference_texts, reference_probes = parse_calibration(REFERENCE_CALIBRATION)
    reference_rows, reference_s = measure(reference_texts, reference_probes)
    t0 = time.perf_counter()
    sensitivity = planner.sensitivity_for_store(stats, rows)  # shaped by the statistics' row energies
    plan(sensitivity=sensitivity)
    weighted = time.perf_counter() - t0
    reference = planner.sensitivity_for_store(stats, reference_rows)
    agreement = []
    for budget in (1 / 64, 1 / 256):
        own, ref = plan(budget, sensitivity), plan(budget, reference)
        judged = planner.estimate_plan(
            gram, grams, shapes, own.codes, own.n_atoms, task_names=names, nonzero_rows=counts, sensitivity=reference
        )
        differ = sum(a.code != b.code for a, b in zip(own.choices, ref.choices, strict=True))
        agreement.append(
            f"  1/{round(1 / budget)}: {differ} of {len(own.choices)} tensors coded differently; estimated loss by the "
            f"reference's figures {judged.loss:.5f} (worst task {judged.worst_loss:.5f}) against its own plan's "
            f"{ref.loss:.5f} ({ref.worst_loss:.5f}); bytes {own.nbytes:,} and {ref.nbytes:,}"
        )
    t0 = time.perf_counter()
    store = planner.build_for_budget(base, sources, args.out / "built", args.budget, stats_store=stats, overwrite=True)
    build_s = time.perf_counter() - t0
    print(
        f"plan for {args.budget:.2%}: M = {planned.n_atoms}, {planned.nbytes:,} bytes estimated, "
        f"store {store.manifest['bytes']['total']:,}"
    )
    print(f"build --budget (atom + residual passes, plan included): {build_s:.1f} s  = 1.00")
    print(f"Gram pass with per-tensor statistics (+ a pca M=1 store): {stats_s:.1f} s = {stats_s / build_s:.3f}")
    for label, what in (
        ("first", "new process, codes' calibration measured"),
        ("cached", "new process, calibration cached"),
    ):
        print(f"planning, {what}: {timings[label]:.2f} s = {timings[label] / build_s:.3f}")
    print(f"planning, warm: {warm:.2f} s = {warm / build_s:.3f}")
    print(
        f"output sensitivity, default ({default_texts * len(tasks)} texts, {DEFAULT_PROBES} probe; once per base "
        f"model, for every set of its fine-tunes): {sensitivity_s:.1f} s = {sensitivity_s / build_s:.3f}"
    )
    print(
        f"output sensitivity, reference ({reference_texts * len(tasks)} texts, {reference_probes} probes): "
        f"{reference_s:.1f} s = {reference_s / build_s:.3f}"
    )
    print(f"planning with it, warm (row energies from the statistics): {weighted:.2f} s = {weighted / build_s:.3f}")
    print("the default calibration's plans, judged by the reference's figures:")
    print("\n".join(agreement))
    shutil.rmtree(args.out / "built", ignore_errors=True)


if __name__ == "__main__":
    main()
