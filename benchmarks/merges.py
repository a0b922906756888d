"""TIES and DARE merges against plain addition on the text suite (not a test).

Builds pca stores at M = 4 and M = 8 (= T: exact reconstructions, so ``pca M=8 + ties`` is TIES
on the true task vectors) from the cached MiniLM fine-tunes of ``tvbasis demo``, and runs task
addition (full 21-point lambda grid on validation, then test) for plain addition and for
``edit --merge ties`` (density 0.2) and ``--merge dare`` (drop rate 0.9, seed 0) over each store.

    .venv/bin/python benchmarks/merges.py [--out runs/merges] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from tvbasis.textsuite.data import TASK_NAMES
from tvbasis.textsuite.presets import default_cache
from tvbasis.textsuite.report import addition_table
from tvbasis.textsuite.suite import SuiteConfig, run_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/merges"))
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = SuiteConfig(
        out_dir=args.out,
        cache_dir=args.cache or default_cache(),
        tasks=TASK_NAMES,
        model="minilm",
        methods=("pca",),
        n_atoms=(4, 8),
        atoms_mode_methods=(),
        merges=("ties", "dare"),
        merge_methods=("pca",),
        negation_targets=(),
        val_limit=64,
        search="full",
    )
    start = time.perf_counter()
    results = run_suite(config, log=lambda line: print(line, flush=True))
    print()
    print(addition_table(results))
    print(f"\nwall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
