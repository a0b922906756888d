"""Bytes and reconstruction error of fp32, bf16 and int8 atoms on the text suite's task vectors.

Builds stores from the eight cached MiniLM-L6 fine-tunes of ``tvbasis demo`` (fine-tuning them
first if the cache is empty) for each method and store dtype, and prints, per store: the bytes
stored relative to the eight fp32 task vectors, the mean and worst relative reconstruction
error, and how much of it the rounding to the store dtype adds. Usage::

    python benchmarks/atom_dtypes.py [--out runs/atom-dtypes] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from tvbasis.build import build_store
from tvbasis.methods import make_method
from tvbasis.progress import set_quiet
from tvbasis.tasks import TaskSource
from tvbasis.textsuite.data import TASK_NAMES, load_task
from tvbasis.textsuite.model import finetune_cached, minilm_path
from tvbasis.textsuite.presets import default_cache

SETTINGS = [("pca", 4), ("autoencoder", 4), ("pca", 8)]
DTYPES = ["fp32", "bf16", "int8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/atom-dtypes"))
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_quiet(True)
    cache = args.cache or default_cache()
    base = minilm_path()
    sources = [TaskSource(name, finetune_cached(base, load_task(name), cache / "finetunes")) for name in TASK_NAMES]
    args.out.mkdir(parents=True, exist_ok=True)
    print("| method | M | atoms | bytes stored | mean rel. error | worst rel. error | added by rounding (mean) |")
    print("|---|---|---|---|---|---|---|")
    for method, m in SETTINGS:
        for dtype in DTYPES:
            store = build_store(
                base, sources, make_method(method, m), args.out / f"{method}-M{m}-{dtype}", dtype=dtype, overwrite=True
            )
            tasks = store.manifest["tasks"]
            err = np.array([t["rel_error"] for t in tasks])
            added = np.array([t["rel_error"] - t.get("rel_error_unrounded", t["rel_error"]) for t in tasks])
            print(
                f"| {method} | {m} | {dtype} | {100 * store.manifest['bytes']['ratio']:.1f}% | {err.mean():.4f} "
                f"| {err.max():.4f} | {added.mean():+.2e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
