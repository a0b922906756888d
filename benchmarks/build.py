"""Benchmark of ``tvbasis build`` against the I/O floor and a dense in-memory baseline.

Writes a ~50M-parameter transformer-like base model and T fine-tunes of it as sharded
safetensors (Hugging Face layout), then measures, for each T in ``--sizes``:

- ``read floor``: a subprocess reading every tensor of the base and the T fine-tunes once
  through ``safe_open`` + ``get_tensor`` (the I/O floor);
- ``build pca`` / ``build autoencoder``: ``tvbasis build ... --quiet`` with M = T / 2;
- ``dense baseline``: a subprocess that holds the D x T float32 matrix in memory, as the
  reference implementation does, and computes the PCA atoms from it.

Every step runs in its own subprocess; its wall time, CPU time and peak RSS (``ru_maxrss``
from ``os.wait4``) are recorded, with the load other processes put on the machine
meanwhile. All inputs are read once before timing starts, so every step sees a warm page
cache. The synthetic models are kept in ``--data-dir`` and reused by later runs. Usage::

    python benchmarks/build.py                 # the full benchmark (T = 8 and 16, ~50M params)
    python benchmarks/build.py --quick         # a small model (~2M params) for a smoke run
    python benchmarks/build.py --settle 120    # on a shared machine: wait for idle before each step
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"
MARKER = "COMPLETE.json"
DATA_VERSION = 1

# Targets from the issue.
WALL_TARGET = 1.5  # build wall <= 1.5 x (2 x read floor): two passes over the inputs
RSS_VS_DENSE_TARGET = 0.25  # build peak RSS <= 1/4 of the dense baseline at the largest T
RSS_GROWTH_TARGET = 0.15  # build peak RSS within 15% between the smallest and largest T


@dataclass(frozen=True)
class ModelSpec:
    """A transformer-like layout: embedding, ``layers`` blocks (attention + MLP + norms), final norm."""

    vocab: int
    hidden: int
    layers: int
    mlp: int
    max_shard_bytes: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        d, f = self.hidden, self.mlp
        shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (self.vocab, d)}
        for i in range(self.layers):
            p = f"layers.{i}."
            for proj in ("q", "k", "v", "o"):
                shapes[f"{p}attn.{proj}_proj.weight"] = (d, d)
                shapes[f"{p}attn.{proj}_proj.bias"] = (d,)
            shapes[f"{p}attn_norm.weight"] = (d,)
            shapes[f"{p}attn_norm.bias"] = (d,)
            shapes[f"{p}mlp.up_proj.weight"] = (f, d)
            shapes[f"{p}mlp.up_proj.bias"] = (f,)
            shapes[f"{p}mlp.down_proj.weight"] = (d, f)
            shapes[f"{p}mlp.down_proj.bias"] = (d,)
            shapes[f"{p}mlp_norm.weight"] = (d,)
            shapes[f"{p}mlp_norm.bias"] = (d,)
        shapes["final_norm.weight"] = (d,)
        shapes["final_norm.bias"] = (d,)
        return shapes

    @property
    def n_params(self) -> int:
        total = 0
        for shape in self.shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    @property
    def label(self) -> str:
        return f"{self.n_params / 1e6:.0f}M"


FULL = ModelSpec(vocab=30522, hidden=512, layers=11, mlp=2048, max_shard_bytes=64 * 1024**2)
QUICK = ModelSpec(vocab=8192, hidden=128, layers=4, mlp=512, max_shard_bytes=2 * 1024**2)


# -- synthetic data -----------------------------------------------------------------------


def generate(spec: ModelSpec, root: Path, n_tasks: int, seed: int = 0, rank: int = 4) -> None:
    """Write the base and ``n_tasks`` fine-tunes, tensor by tensor (never a whole model in memory).

    Fine-tune t = base + 1e-3 * (sum_r mix[t, r] dir_r + 0.5 * noise_t): a shared rank-``rank``
    structure plus independent noise, so the task vectors are correlated but not low rank.
    """
    import torch

    from tvbasis.io.writer import ShardedWriter, TensorSpec, shard_plan

    shapes = spec.shapes()
    specs = [TensorSpec(n, s, torch.float32) for n, s in shapes.items()]
    specs.append(TensorSpec("position_ids", (512,), torch.int64))  # an integer buffer, ignored by tvbasis
    plan = shard_plan(specs, spec.max_shard_bytes, stem="model")
    if root.exists():
        shutil.rmtree(root)
    dirs = [root / "base"] + [root / f"ft-{t:02d}" for t in range(n_tasks)]
    writers = []
    for d in dirs:
        d.mkdir(parents=True)
        writers.append(ShardedWriter(d, plan, index_name=INDEX))
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn((n_tasks, rank), generator=gen)
    for i, (name, shape) in enumerate(shapes.items()):
        gen.manual_seed(seed * 100_003 + i + 1)
        n = 1
        for s in shape:
            n *= s
        if name.endswith("norm.weight"):
            base = 1.0 + 0.1 * torch.randn(n, generator=gen)
        elif len(shape) == 1:
            base = 0.02 * torch.randn(n, generator=gen)
        else:
            base = torch.randn(n, generator=gen) / shape[-1] ** 0.5
        directions = torch.randn((rank, n), generator=gen)
        writers[0].write(name, base.reshape(shape))
        for t in range(n_tasks):
            delta = mix[t] @ directions + 0.5 * torch.randn(n, generator=gen)
            writers[t + 1].write(name, (base + 1e-3 * delta).reshape(shape))
        del base, directions
    for w in writers:
        w.write("position_ids", torch.arange(512, dtype=torch.int64))
        w.close()


def ensure_data(spec: ModelSpec, data_dir: Path, n_tasks: int) -> Path:
    """The model family's directory, generated unless its marker says enough of it is already there."""
    root = data_dir / f"model-{spec.label}"
    want = {"version": DATA_VERSION, "spec": asdict(spec), "n_tasks": n_tasks}
    marker = root / MARKER
    if marker.is_file():
        have = json.loads(marker.read_text())
        if have.get("version") == DATA_VERSION and have.get("spec") == want["spec"] and have["n_tasks"] >= n_tasks:
            print(f"reusing synthetic models in {root}", flush=True)
            return root
    print(f"writing base + {n_tasks} fine-tunes ({spec.n_params:,} params each) to {root} ...", flush=True)
    t0 = time.perf_counter()
    generate(spec, root, n_tasks)
    marker.write_text(json.dumps(want, indent=2) + "\n")
    print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
    return root


def model_dirs(root: Path, n_tasks: int) -> tuple[Path, list[Path]]:
    return root / "base", [root / f"ft-{t:02d}" for t in range(n_tasks)]


def shard_files(model: Path) -> list[Path]:
    weight_map = json.loads((model / INDEX).read_text())["weight_map"]
    return [model / f for f in dict.fromkeys(weight_map.values())]


def warm_cache(paths: list[Path]) -> int:
    """Read every file once so all timed steps run against a warm page cache."""
    total = 0
    for path in paths:
        with path.open("rb") as f:
            while block := f.read(16 * 1024**2):
                total += len(block)
    return total


# -- workers (each runs in its own subprocess) --------------------------------------------


def worker_read(models: list[Path]) -> dict[str, float]:
    """Read every tensor of every model once through ``safe_open`` + ``get_tensor``.

    ``get_tensor`` returns a view of the memory-mapped file and reads nothing by itself, so
    each tensor's bytes are copied once into a reused buffer: every byte is read, and no
    time goes to faulting in fresh memory for each tensor.
    """
    import torch
    from safetensors import safe_open

    buffer = torch.empty(0, dtype=torch.uint8)
    t0 = time.perf_counter()
    nbytes = 0
    for model in models:
        for file in shard_files(model):
            with safe_open(str(file), framework="pt") as h:
                for key in h.keys():
                    data = h.get_tensor(key).reshape(-1).view(torch.uint8)
                    if data.numel() > buffer.numel():
                        buffer = torch.empty(data.numel(), dtype=torch.uint8)
                    buffer[: data.numel()].copy_(data)
                    nbytes += data.numel()
                    del data
    return {"seconds": time.perf_counter() - t0, "bytes": nbytes}


def load_model(model: Path) -> dict:
    """Every tensor of a sharded model, in memory."""
    from safetensors.torch import load_file

    state = {}
    for file in shard_files(model):
        state.update(load_file(str(file)))
    return state


def worker_dense(base_dir: Path, tasks: list[Path], n_atoms: int, out: Path) -> dict[str, float]:
    """The reference implementation's way: hold all T task vectors as one D x T float32 matrix.

    Each fine-tune is loaded whole, flattened minus the base into one column; then PCA atoms
    ``S = V Q_M`` from the eigenvectors of ``V^T V``, saved to ``out``. The matrix is filled
    in place rather than stacked from a list of columns, which spares the baseline the second
    copy that stacking makes, so its peak RSS is if anything an underestimate.
    """
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    base = load_model(base_dir)
    names = [k for k, v in base.items() if v.is_floating_point()]
    dim = sum(base[k].numel() for k in names)
    rows = torch.empty((len(tasks), dim), dtype=torch.float32)  # rows.T is V, D x T
    for t, path in enumerate(tasks):
        ft = load_model(path)
        torch.cat([(ft[k] - base[k]).reshape(-1) for k in names], out=rows[t])
        del ft
    V = rows.T
    gram = (V.T @ V).double()
    lam, Q = torch.linalg.eigh(gram)
    Q_M = Q[:, torch.argsort(lam, descending=True)[:n_atoms]].float()
    atoms = V @ Q_M  # D x M
    save_file({"atoms": atoms.contiguous()}, str(out))
    return {"seconds": time.perf_counter() - t0, "dim": dim}


def worker_main(argv: list[str]) -> None:
    kind, args = argv[0], json.loads(argv[1])
    if kind == "_read":
        result = worker_read([Path(p) for p in args["models"]])
    elif kind == "_dense":
        result = worker_dense(Path(args["base"]), [Path(p) for p in args["tasks"]], args["n_atoms"], Path(args["out"]))
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    print(json.dumps(result))


# -- measurement --------------------------------------------------------------------------


@dataclass
class Result:
    n_tasks: int
    step: str
    wall_s: float
    peak_rss_mb: float
    cpu_s: float
    others: float | None  # cores other processes (or the hypervisor) took during the step, on average
    inner_s: float | None = None  # time measured inside the worker (no interpreter start-up)


def busy_seconds() -> float | None:
    """CPU seconds all processes have spent so far, plus those the hypervisor took from this
    machine (steal), from Linux's ``/proc/stat``; None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Measurement:
    wall_s: float
    peak_rss_mb: float
    cpu_s: float  # the step's own CPU time (user + system)
    others: float | None  # cores other processes (or the hypervisor) took meanwhile, on average
    stdout: str


def wait_idle(limit_s: float, window_s: float = 3.0, max_busy: float = 0.2) -> None:
    """Wait (at most ``limit_s``) until other processes keep fewer than ``max_busy`` cores busy
    over ``window_s``: on a shared machine, their load would disturb the timings."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = busy_seconds()
        if before is None:
            return
        time.sleep(window_s)
        after = busy_seconds()
        if after is not None and (after - before) / window_s < max_busy:
            return
    print(f"  (the machine stayed busy for {limit_s:.0f} s; measuring anyway)", flush=True)


def measure(cmd: list[str], settle_s: float = 0.0, output: Path | None = None) -> Measurement:
    """Run ``cmd``; return its wall seconds, peak RSS (``ru_maxrss`` via ``wait4``), CPU time and stdout.

    ``output``, the step's output, is removed first, so no step pays for deleting an earlier
    run's output. With ``settle_s``, first wait up to that long for the machine to be idle.
    """
    if output is not None:
        shutil.rmtree(output, ignore_errors=True) if output.is_dir() else output.unlink(missing_ok=True)
    os.sync()  # no writeback of an earlier step's output during this one
    if settle_s > 0:
        wait_idle(settle_s)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy0 = busy_seconds()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        wall = time.perf_counter() - t0
        busy1 = busy_seconds()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{stderr[-4000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - cpu) / wall)
    return Measurement(wall, usage.ru_maxrss / 1024, cpu, others, stdout)


def run_step(cmd: list[str], repeat: int, settle_s: float, output: Path | None = None) -> Measurement:
    """The run with the best wall time of ``repeat`` (timings on a shared machine are noisy),
    with the largest peak RSS of them all."""
    runs = [measure(cmd, settle_s, output) for _ in range(repeat)]
    best = min(runs, key=lambda m: m.wall_s)
    best.peak_rss_mb = max(m.peak_rss_mb for m in runs)
    return best


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


def bench_size(
    root: Path, n_tasks: int, methods: list[str], steps: int | None, repeat: int, settle_s: float, work: Path
) -> list[Result]:
    """Every step for the first ``n_tasks`` fine-tunes, M = T / 2."""
    base, tasks = model_dirs(root, n_tasks)
    n_atoms = max(1, n_tasks // 2)
    results: list[Result] = []

    def note(step: str, m: Measurement, inner: bool = False) -> None:
        r = Result(n_tasks, step, m.wall_s, m.peak_rss_mb, m.cpu_s, m.others)
        if inner:
            r.inner_s = json.loads(m.stdout)["seconds"]
        results.append(r)
        print(f"  T={n_tasks:<3d} {step:<20s} {r.wall_s:8.2f} s {r.peak_rss_mb:9.0f} MB", flush=True)

    args = json.dumps({"models": [str(p) for p in [base, *tasks]]})
    note("read floor", run_step(python_cmd(__file__, "_read", args), repeat, settle_s), inner=True)

    for method in methods:
        store = work / f"T{n_tasks}-{method}"
        cmd = python_cmd("-m", "tvbasis.cli", "build", "--base", str(base))
        for t, path in enumerate(tasks):
            cmd += ["--task", f"t{t:02d}={path}"]
        cmd += ["--method", method, "-M", str(n_atoms), "--out", str(store), "--quiet"]
        if method == "autoencoder" and steps is not None:
            cmd += ["--steps", str(steps)]
        note(f"build {method}", run_step(cmd, repeat, settle_s, output=store))
        shutil.rmtree(store, ignore_errors=True)

    dense_out = work / f"T{n_tasks}-dense.safetensors"
    args = json.dumps({"base": str(base), "tasks": [str(p) for p in tasks], "n_atoms": n_atoms, "out": str(dense_out)})
    note("dense baseline", run_step(python_cmd(__file__, "_dense", args), repeat, settle_s, dense_out), inner=True)
    dense_out.unlink(missing_ok=True)
    return results


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(results: list[Result], sizes: list[int], methods: list[str]) -> list[str]:
    """The table and the three ratios against their targets."""
    lines = [
        f"{'T':>3}  {'step':<20} {'wall s':>8} {'inner s':>8} {'CPU s':>8} {'peak RSS MB':>12} {'others':>7}",
        f"{'-' * 3}  {'-' * 20} {'-' * 8} {'-' * 8} {'-' * 8} {'-' * 12} {'-' * 7}",
    ]
    for r in results:
        inner = f"{r.inner_s:8.2f}" if r.inner_s is not None else f"{'':8}"
        others = f"{r.others:7.2f}" if r.others is not None else f"{'n/a':>7}"
        lines.append(
            f"{r.n_tasks:>3}  {r.step:<20} {r.wall_s:8.2f} {inner} {r.cpu_s:8.2f} {r.peak_rss_mb:12.0f} {others}"
        )
    lines += [
        "",
        "wall: the subprocess, interpreter start-up included; inner: the worker's own timing of its work;",
        f"CPU: the step's user + system time; others: cores other processes or the hypervisor took meanwhile "
        f"(of {os.cpu_count()}).",
    ]
    get = {(r.n_tasks, r.step): r for r in results}
    lo, hi = min(sizes), max(sizes)
    lines += ["", f"(a) build wall / (2 x read floor), target <= {WALL_TARGET}:"]
    for T in sizes:
        floor = get[(T, "read floor")].wall_s
        for m in methods:
            ratio = get[(T, f"build {m}")].wall_s / (2 * floor)
            lines.append(f"    T={T:<3d} {m:<12} {ratio:6.2f}  {verdict(ratio <= WALL_TARGET)}")
    lines.append(f"(b) build peak RSS / dense baseline peak RSS at T={hi}, target <= {RSS_VS_DENSE_TARGET}:")
    dense = get[(hi, "dense baseline")].peak_rss_mb
    for m in methods:
        ratio = get[(hi, f"build {m}")].peak_rss_mb / dense
        lines.append(f"    T={hi:<3d} {m:<12} {ratio:6.3f}  {verdict(ratio <= RSS_VS_DENSE_TARGET)}")
    if lo != hi:
        lines.append(f"(c) build peak RSS at T={hi} / at T={lo}, target within {RSS_GROWTH_TARGET:.0%}:")
        for m in methods:
            ratio = get[(hi, f"build {m}")].peak_rss_mb / get[(lo, f"build {m}")].peak_rss_mb
            ok = abs(ratio - 1) <= RSS_GROWTH_TARGET
            lines.append(f"          {m:<12} {ratio:6.3f}  {verdict(ok)}")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        worker_main(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "bench-data", help="where models and outputs go")
    parser.add_argument("--sizes", default="8,16", help="comma-separated numbers of fine-tunes T")
    parser.add_argument("--methods", default="pca,autoencoder", help="comma-separated tvbasis build methods")
    parser.add_argument("--quick", action="store_true", help="a ~2M-parameter model for a smoke run")
    parser.add_argument("--steps", type=int, default=None, help="autoencoder steps (default: the method's 6000)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per step; the best wall time is kept")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--settle", type=float, default=0.0, help="before each step, wait up to this many seconds for an idle machine"
    )
    opts = parser.parse_args()

    sizes = sorted({int(s) for s in opts.sizes.split(",")})
    methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
    spec = QUICK if opts.quick else FULL
    root = ensure_data(spec, opts.data_dir, max(sizes))
    work = opts.data_dir / "runs"
    work.mkdir(parents=True, exist_ok=True)

    base, tasks = model_dirs(root, max(sizes))
    files = [f for m in [base, *tasks] for f in shard_files(m)]
    print(f"warming the page cache ({warm_cache(files) / 1e9:.2f} GB) and the interpreter ...", flush=True)
    subprocess.run(python_cmd("-c", "import torch, safetensors.torch, tvbasis.cli, tvbasis.build"), check=True)

    print(
        f"model: {spec.n_params:,} float32 params ({spec.n_params * 4 / 1e6:.0f} MB) per checkpoint, "
        f"{len(shard_files(base))} shards; M = T/2\n"
        f"machine: {os.cpu_count()} cpus, {platform.machine()}; python {platform.python_version()}, "
        f"torch {version('torch')}, safetensors {version('safetensors')}, numpy {version('numpy')}",
        flush=True,
    )
    results: list[Result] = []
    for T in sizes:
        results += bench_size(root, T, methods, opts.steps, opts.repeat, opts.settle, work)
    print()
    print("\n".join(report(results, sizes, methods)))
    if opts.json:
        opts.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
