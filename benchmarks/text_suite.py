"""The full text-suite matrix (not a test): every method at M = 2, 4, 6, both addition modes,
negation of every task under the control constraint, the full 21-point lambda grid.

    .venv/bin/python benchmarks/text_suite.py [--out runs/text-suite] [--cache DIR]

Reuses the fine-tunes cached by ``tvbasis demo`` (same data, model and hyperparameters). Writes
results.json, report.md and plots under ``--out`` and prints the report's tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from tvbasis.textsuite.presets import default_cache, full_config
from tvbasis.textsuite.report import addition_table, negation_table
from tvbasis.textsuite.suite import run_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/text-suite"))
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--search", choices=["full", "coarse-to-fine"], default="full")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = full_config(args.out, args.cache or default_cache())
    cfg.search = args.search
    start = time.perf_counter()
    results = run_suite(cfg, log=lambda line: print(line, flush=True))
    neg, dropped = negation_table(results)
    print()
    print(addition_table(results))
    print()
    print(neg)
    for line in dropped:
        print(f"dropped by compression: {line}")
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); wall {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
