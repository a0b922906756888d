"""Benchmark of the distributed engine: speedup with 1 vs 2 Dask workers, and per-entry costs.

Uses the synthetic ~50M-parameter model and fine-tunes of ``benchmarks/build.py`` (generated
there if missing). For T fine-tunes and M = T / 2 it times, in this process:

- ``local``: ``build_store`` with the local engine (threads in one process);
- ``dask 1`` / ``dask 2``: the same build on a local Dask cluster of 1 and 2 single-threaded
  worker processes (cluster start-up excluded, timed apart);

checks that all three stores are identical, and prints the speedup of 2 workers over 1.
It also measures the per-entry costs a cost model needs (``docs/scaling.md``): the seconds
per input byte a worker spends reading and converting, and the float64 GEMM rate at the
shape a T = 1,000 Gram pass uses. Usage::

    python benchmarks/dask_engine.py               # T = 8, the ~50M-parameter model
    python benchmarks/dask_engine.py --quick       # the ~2M-parameter model, seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import FULL, QUICK, ensure_data
from tvbasis.build import build_store
from tvbasis.engine.distributed import DaskEngine
from tvbasis.engine.streaming import LocalEngine, pass_chunk_elements
from tvbasis.methods import make_method
from tvbasis.progress import set_quiet
from tvbasis.tasks import TaskSource

REPO = Path(__file__).resolve().parents[1]


def timed_build(data: Path, T: int, out: Path, engine) -> tuple[float, Path]:
    tasks = [TaskSource(f"t{i:02d}", data / f"ft-{i:02d}") for i in range(T)]
    start = time.perf_counter()
    store = build_store(data / "base", tasks, make_method("pca", T // 2), out, overwrite=True, engine=engine)
    return time.perf_counter() - start, store.path


def same_store(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in ("tvbasis.json",))
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in files if f.name != "README.md")


def gemm_rate(T: int, per_task: int, reps: int = 3) -> float:
    """float64 multiply-adds per second of one ``X^T X`` update at a T-task chunk, one thread."""
    torch.set_num_threads(1)
    X = torch.randn(T, per_task, dtype=torch.float64)
    X @ X.T
    start = time.perf_counter()
    for _ in range(reps):
        X @ X.T
    return reps * T * T * per_task / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "bench-data")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=2, help="runs per engine; the fastest is kept")
    args = parser.parse_args()
    set_quiet(True)
    data = ensure_data(QUICK if args.quick else FULL, args.data_dir, args.tasks)
    out = args.data_dir / "runs" / "distributed"
    out.mkdir(parents=True, exist_ok=True)
    T = args.tasks
    print(f"model {data.name}, T = {T}, M = {T // 2}, pca; {os.cpu_count()} cpus", flush=True)

    results: dict[str, float] = {}
    paths: dict[str, Path] = {}
    # "pinned": each worker process held to its own core, so 1 vs 2 workers compares one core
    # with two; unpinned, one worker's pipeline threads already use both cores of this machine.
    runs = [
        ("local", None, False),
        ("dask 1", 1, False),
        ("dask 2", 2, False),
        ("dask 1 pinned", 1, True),
        ("dask 2 pinned", 2, True),
    ]
    for label, workers, pinned in runs:
        if workers is None:
            engine = LocalEngine()
            startup = 0.0
        else:
            t0 = time.perf_counter()
            engine = DaskEngine(n_workers=workers)
            startup = time.perf_counter() - t0
            if pinned:
                for i, address in enumerate(engine.client.scheduler_info()["workers"]):
                    engine.client.run(os.sched_setaffinity, 0, {i % (os.cpu_count() or 1)}, workers=[address])
        try:
            best = min(timed_build(data, T, out / label.replace(" ", "-"), engine)[0] for _ in range(args.repeat))
        finally:
            engine.close()
        results[label] = best
        paths[label] = out / label.replace(" ", "-")
        extra = f" (cluster start-up {startup:.1f} s, not included)" if workers else ""
        print(f"  {label:<8} build {best:7.2f} s{extra}", flush=True)

    identical = all(same_store(paths["local"], paths[k]) for k in results if k != "local")
    print(f"stores identical across engines: {identical}")
    print(
        f"speedup, 2 workers over 1: {results['dask 1'] / results['dask 2']:.2f}x unpinned, "
        f"{results['dask 1 pinned'] / results['dask 2 pinned']:.2f}x with one core per worker"
    )
    print(f"dask 2 workers vs the local engine: {results['local'] / results['dask 2']:.2f}x")

    # per-entry costs for the cost model
    in_bytes = sum(
        f.stat().st_size
        for d in [data / "base", *(data / f"ft-{i:02d}" for i in range(T))]
        for f in d.glob("*.safetensors")
    )
    per_byte = results["dask 1 pinned"] / (2 * in_bytes)  # two passes over the inputs on one worker
    rate = gemm_rate(1000, pass_chunk_elements(1 << 20, 1000))
    print(
        f"one worker on one core: {per_byte * 1e9:.3f} s per GB of input per pass (read, convert, products at T = {T})"
    )
    print(
        f"float64 Gram update at T = 1000 ({pass_chunk_elements(1 << 20, 1000)} entries per task per chunk): "
        f"{rate / 1e9:.1f} G multiply-adds/s on one thread"
    )
    atom_rate = gemm_rate_atoms(1000, 100, pass_chunk_elements(1 << 20, 1000))
    print(f"float32 atom product at T = 1000, K = 100: {atom_rate / 1e9:.1f} G multiply-adds/s on one thread")
    cost_model(per_byte, rate, atom_rate)
    shutil.rmtree(out, ignore_errors=True)


def gemm_rate_atoms(T: int, K: int, per_task: int, reps: int = 3) -> float:
    """float32 multiply-adds per second of one atom product ``B^T X^T`` at a T-task chunk, one thread."""
    torch.set_num_threads(1)
    X = torch.randn(T, per_task)
    B = torch.randn(K, T)
    B @ X
    start = time.perf_counter()
    for _ in range(reps):
        B @ X
    return reps * K * T * per_task / (time.perf_counter() - start)


def cost_model(
    per_byte: float, gram_rate: float, atom_rate: float, T: int = 1000, D: float = 7e9, K: int = 100, itemsize: int = 2
) -> None:
    """A build of T task vectors of a D-parameter model (bf16 inputs) into K fp32 atoms, on N workers.

    Per worker (one core): reading and converting costs ``per_byte`` seconds per input byte
    per pass (measured above at small T, where products are cheap); the products cost their
    multiply-adds at the measured rates. Stages are added, not overlapped (one core each).
    """
    c = pass_chunk_elements(1 << 20, T)
    read = 2 * (T + 1) * D * itemsize  # two passes over base + T fine-tunes
    written = K * D * 4
    gram_macs, atom_macs = D * T * T, D * T * K
    io_s = read * per_byte
    compute_s = gram_macs / gram_rate + atom_macs / atom_rate
    mem_gram = (T + 1) * c * itemsize + 2 * T * c * 8 + 2 * T * T * 8
    mem_atom = (T + 1) * c * itemsize + 3 * T * c * 4 + 2 * K * c * 4
    print(f"\ncost model: T = {T} task vectors of a {D / 1e9:.0f}B-parameter bf16 model, K = {K} fp32 atoms")
    print(f"  bytes read:    {read / 1e12:.1f} TB (two passes); atoms written {written / 1e12:.2f} TB")
    print(f"  multiply-adds: Gram {gram_macs:.2e} (D T^2), atoms {atom_macs:.2e} (D T K)")
    print(
        f"  memory per worker: {max(mem_gram, mem_atom) / 2**20:.0f} MiB of buffers "
        f"({c} entries per task per chunk) + the interpreter (~260 MiB)"
    )
    print(f"  one worker, one core: {io_s / 3600:.0f} h reading and converting + {compute_s / 3600:.0f} h products")
    for n in (1, 8, 64, 256, 1024):
        seconds = (io_s + compute_s) / n
        print(
            f"  N = {n:>4} workers: {seconds / 3600:8.2f} h wall; storage must deliver {read / seconds / 1e9:6.1f} GB/s"
        )


if __name__ == "__main__":
    main()
