"""The ``tvbasis`` command line: a thin layer over the Python API.

Errors caused by the input print one line naming the file, tensor or option at fault and
exit with status 2.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tvbasis.errors import TvbasisError
from tvbasis.progress import set_quiet

if TYPE_CHECKING:
    from collections.abc import Callable

    from tvbasis.engine.streaming import Engine

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compress many task vectors of one base model into a basis and do task arithmetic on it.",
)
err = Console(stderr=True)
out = Console()

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]

# Method options: None means "not given", so options that do not apply can be refused.
METHOD_OPTIONS: dict[str, set[str]] = {
    "autoencoder": {
        "steps",
        "lr",
        "temperature",
        "weight_decay",
        "anneal_factor",
        "anneal_every",
        "min_temperature",
        "linear",
    },
    "pca": {"center"},
    "random": set(),
    "sample": set(),
    "cluster": {"algorithm", "merge", "density"},
}


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: ``planning.budget.DEFAULT_NOISE_WEIGHT``, repeated so that ``--help`` does not import torch.
PLANNER_NOISE_WEIGHT = 1 / 256
PlanObjective = Annotated[
    str, typer.Option("--objective", help="[--budget] minimise the tasks' mean estimated loss, or the worst task's.")
]
PlanRowCodes = Annotated[
    bool,
    typer.Option(
        "--row-codes/--no-row-codes",
        help="[--budget] let tensors whose tasks leave rows untouched code only the nonzero rows (rows:CODE).",
    ),
]


PlanSensitivity = Annotated[
    Path | None,
    typer.Option(
        "--sensitivity",
        help="[--budget] weigh each tensor's error by its output sensitivity, from this file (tvbasis sensitivity).",
    ),
]


def _one_line(message: str) -> str:
    """``message`` as one line: terminal escape codes dropped, line breaks (from wrapped errors) as spaces."""
    return " ".join(line.strip() for line in _ANSI_ESCAPE.sub("", message).splitlines() if line.strip())


def _log(line: str) -> None:
    err.print(line, markup=False, highlight=False, soft_wrap=True)


def _say(line: str) -> None:
    """A result line on standard output, as plain text (paths may hold "[...]")."""
    out.print(line, markup=False, highlight=False, soft_wrap=True)


def _fail(exc: TvbasisError) -> None:
    # Escaped: paths and tensor names may contain "[...]", which rich would take for markup and drop.
    err.print(f"[bold red]error:[/] {escape(_one_line(str(exc)))}", highlight=False, soft_wrap=True, emoji=False)
    raise typer.Exit(2)


def _engine(name: str, scheduler: str | None, workers: int | None, trust_scheduler: bool = False) -> Engine:
    """The engine ``--engine`` names (a connected Dask client for dask)."""
    if name == "local":
        if scheduler is not None or workers is not None or trust_scheduler:
            raise TvbasisError("--scheduler, --trust-scheduler and --workers apply to --engine dask only")
        from tvbasis.engine.streaming import LocalEngine

        return LocalEngine()
    if name == "dask":
        from tvbasis.engine.distributed import DaskEngine

        if workers is not None and workers < 1:
            raise TvbasisError(f"--workers {workers}: must be at least 1")
        return DaskEngine(scheduler, n_workers=workers, trust_scheduler=trust_scheduler)
    raise TvbasisError(f"--engine {name!r}: choose local or dask")


@app.command()
def build(
    base: Annotated[
        str | None, typer.Option(help="Base checkpoint: .safetensors, HF model directory or torch file.")
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option(help="A fine-tune (or a PEFT LoRA adapter directory) as NAME=PATH; repeat for each task."),
    ] = None,
    method: Annotated[str | None, typer.Option(help="autoencoder, pca, random, sample or cluster.")] = None,
    n_atoms: Annotated[int | None, typer.Option("-M", "--n-atoms", help="Number of basis vectors M (1..T).")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", help="Store directory to create.")] = None,
    include: Annotated[list[str] | None, typer.Option(help="Only tensors whose name matches this glob.")] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Leave out tensors matching this glob (e.g. heads).")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Atom dtype: fp32, fp16, bf16 or int8 (per-row scales).")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe with base, tasks, method, M, settings.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every random choice the method makes.")] = None,
    steps: Annotated[int | None, typer.Option(help="[autoencoder] Adam steps (6000).")] = None,
    lr: Annotated[float | None, typer.Option(help="[autoencoder] learning rate (1e-2).")] = None,
    temperature: Annotated[float | None, typer.Option(help="[autoencoder] softmax temperature (5.0).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="[autoencoder] weight decay (1e-6).")] = None,
    anneal_factor: Annotated[
        float | None, typer.Option(help="[autoencoder] multiply the temperature by this...")
    ] = None,
    anneal_every: Annotated[int | None, typer.Option(help="[autoencoder] ...every this many steps (0: never).")] = None,
    min_temperature: Annotated[float | None, typer.Option(help="[autoencoder] temperature floor (0.1).")] = None,
    linear: Annotated[bool | None, typer.Option("--linear", help="[autoencoder] linear encoder, no softmax.")] = None,
    center: Annotated[bool | None, typer.Option("--center", help="[pca] centre first; the mean is stored.")] = None,
    algorithm: Annotated[
        str | None, typer.Option("--cluster-algorithm", help="[cluster] agglomerative or spectral.")
    ] = None,
    merge: Annotated[str | None, typer.Option("--cluster-merge", help="[cluster] mean or ties.")] = None,
    density: Annotated[
        float | None, typer.Option(help="[cluster ties] share of entries each task keeps (0.2).")
    ] = None,
    chunk_elements: Annotated[
        int, typer.Option(help="At most this many entries per task read at a time (also capped by T).")
    ] = 1 << 20,
    max_shard_bytes: Annotated[int, typer.Option(help="Shard atoms above this many bytes.")] = 2 * 1024**3,
    engine: Annotated[str, typer.Option(help="local (this process) or dask (map/reduce on a Dask cluster).")] = "local",
    scheduler: Annotated[
        str | None, typer.Option(help="[dask] scheduler address; without it a local cluster is started.")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="[dask] workers of the local cluster (one per core).")] = None,
    trust_scheduler: Annotated[
        bool,
        typer.Option(
            "--trust-scheduler", help="[dask] use --scheduler although Dask exchanges pickles with it (trusted only)."
        ),
    ] = False,
    tensor_stats: Annotated[
        bool,
        typer.Option(
            "--tensor-stats",
            help="Also keep each tensor's T x T Gram matrix (for tvbasis plan; T^2 x tensors x 8 bytes).",
        ),
    ] = False,
    residual: Annotated[
        str | None,
        typer.Option(
            help="Code each task's residual tau_t - S W[:, t] on every tensor with this code "
            "(int8, int4, keep:0.0625:int4:seed=0, rows:int4 ...; see docs/codes.md). -M 0 codes the task "
            "vectors alone.",
        ),
    ] = None,
    tensor_atoms: Annotated[
        int | None,
        typer.Option(help="[--residual, with -M 0] give every tensor its own PCA basis of this many atoms."),
    ] = None,
    tensor_atom_code: Annotated[
        str | None,
        typer.Option(help="[--tensor-atoms] code of the per-tensor atoms: int8 (default) or int4."),
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option(
            help="Plan every tensor's code (pca basis size, residual codes) for this budget and build it: a "
            "fraction of the fp32 task vectors, or bytes. Replaces --method/-M/--residual/--dtype.",
        ),
    ] = None,
    plan_from: Annotated[
        Path | None,
        typer.Option(help="[--budget] plan from this store's --tensor-stats (same inputs) instead of a Gram pass."),
    ] = None,
    noise_weight: Annotated[
        float, typer.Option(help="[--budget] weight of unbiased (random) error against biased error.")
    ] = PLANNER_NOISE_WEIGHT,
    objective: PlanObjective = "mean",
    row_codes: PlanRowCodes = True,
    sensitivity: PlanSensitivity = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Compress T fine-tunes of BASE into M basis vectors (plus coded residuals), written as a store."""
    from tvbasis.build import build_store
    from tvbasis.methods import make_method
    from tvbasis.recipe import Recipe, load_recipe
    from tvbasis.tasks import parse_task_arg

    set_quiet(quiet)
    try:
        rec, root = load_recipe(recipe) if recipe else (Recipe(), Path.cwd())
        sources = [parse_task_arg(t) for t in task] if task else rec.task_sources(root)
        base_path = base or (str(root / rec.base) if rec.base else None)
        method_name = method or rec.method
        m = n_atoms if n_atoms is not None else rec.n_atoms
        if base_path is None:
            raise TvbasisError("--base: missing (give --base or 'base:' in the recipe)")
        if budget is not None:
            store = _build_for_budget(
                base_path,
                sources,
                out_path,
                budget,
                plan_from,
                noise_weight,
                objective,
                row_codes,
                sensitivity,
                seed,
                include or rec.include,
                exclude or rec.exclude,
                chunk_elements,
                overwrite,
                given=[
                    (method, "--method"),
                    (n_atoms, "-M"),
                    (residual, "--residual"),
                    (dtype, "--dtype"),
                    (tensor_atoms, "--tensor-atoms"),
                    (tensor_atom_code, "--tensor-atom-code"),
                ],
            )
            if not quiet:
                _print_info(store.summary())
            return
        if plan_from is not None:
            raise TvbasisError("--plan-from applies to --budget only")
        if sensitivity is not None:
            raise TvbasisError("--sensitivity applies to --budget only")
        if method_name is None:
            raise TvbasisError("--method: missing (give --method or 'method:' in the recipe)")
        if m is None:
            raise TvbasisError("-M: missing (give -M or 'M:' in the recipe)")
        if out_path is None:
            raise TvbasisError("--out: missing")
        given = {
            "steps": steps,
            "lr": lr,
            "temperature": temperature,
            "weight_decay": weight_decay,
            "anneal_factor": anneal_factor,
            "anneal_every": anneal_every,
            "min_temperature": min_temperature,
            "linear": linear,
            "center": center,
            "algorithm": algorithm,
            "merge": merge,
            "density": density,
        }
        settings: dict[str, Any] = dict(rec.settings)
        settings.update({k: v for k, v in given.items() if v is not None})
        if seed is not None:
            settings["seed"] = seed
        allowed = METHOD_OPTIONS.get(method_name, set()) | {"seed"}
        wrong = sorted(set(settings) - allowed)
        if wrong and method_name in METHOD_OPTIONS:
            raise TvbasisError(f"option {wrong[0]!r} does not apply to --method {method_name}")
        est = make_method(method_name, m, **settings)
        code_plan = None
        if residual is not None:
            from tvbasis.codes import parse_code
            from tvbasis.store.residuals import CodePlan, TensorCode, check_atom_code

            try:
                spec = parse_code(residual)
            except TvbasisError as exc:
                raise TvbasisError(f"--residual: {exc}") from None
            if tensor_atoms is not None and (m != 0 or not 1 <= tensor_atoms < len(sources)):
                raise TvbasisError(
                    f"--tensor-atoms {tensor_atoms}: needs -M 0 (no global basis) and 1 <= atoms < T = {len(sources)}"
                )
            if tensor_atom_code is not None and tensor_atoms is None:
                raise TvbasisError("--tensor-atom-code applies with --tensor-atoms only")
            try:
                atom_code = check_atom_code(parse_code(tensor_atom_code or "int8"))
            except TvbasisError as exc:
                raise TvbasisError(f"--tensor-atom-code: {exc}") from None
            code_plan = CodePlan(default=TensorCode(tensor_atoms is None, spec, tensor_atoms or 0, atom_code))
        elif tensor_atoms is not None or tensor_atom_code is not None:
            raise TvbasisError("--tensor-atoms and --tensor-atom-code apply with --residual only")
        runner = _engine(engine, scheduler, workers, trust_scheduler)
        try:
            store = build_store(
                base_path,
                sources,
                est,
                out_path,
                include=include or rec.include,
                exclude=exclude or rec.exclude,
                dtype=dtype or rec.dtype or "fp32",
                chunk_elements=chunk_elements,
                max_shard_bytes=max_shard_bytes,
                overwrite=overwrite,
                engine=runner,
                tensor_stats=tensor_stats,
                codes=code_plan,
            )
        finally:
            runner.close()
    except TvbasisError as exc:
        _fail(exc)
    if not quiet:
        _print_info(store.summary())


def _build_for_budget(
    base: str,
    sources: list[Any],
    out_path: Path | None,
    budget: float,
    plan_from: Path | None,
    noise_weight: float,
    objective: str,
    row_codes: bool,
    sensitivity: Path | None,
    seed: int | None,
    include: list[str],
    exclude: list[str],
    chunk_elements: int,
    overwrite: bool,
    given: list[tuple[object, str]],
) -> Any:
    from tvbasis.planning.budget import build_for_budget
    from tvbasis.planning.sensitivity import load_sensitivity

    for value, option in given:
        if value is not None:
            raise TvbasisError(f"{option} does not apply with --budget (the plan chooses it)")
    if out_path is None:
        raise TvbasisError("--out: missing")
    if sensitivity is not None and plan_from is not None:
        _note_even_rows(plan_from)
    return build_for_budget(
        base,
        sources,
        out_path,
        budget,
        include=include,
        exclude=exclude,
        stats_store=plan_from,
        seed=seed or 0,
        noise_weight=noise_weight,
        objective=objective,
        chunk_elements=chunk_elements,
        overwrite=overwrite,
        row_codes=row_codes,
        sensitivity=None if sensitivity is None else load_sensitivity(sensitivity),
    )


def _note_even_rows(stats_store: Path) -> None:
    """Say when a sensitivity-weighted plan cannot shape the error by the tasks' row energies."""
    from tvbasis.store import open_store

    if open_store(stats_store).tensor_row_energy is None:
        _log(
            f"warning: {stats_store} keeps no row energies (built before they were kept, or from LoRA "
            "adapters only): --sensitivity weighs each tensor's rows evenly"
        )


@app.command()
def info(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Describe a store: method, settings, tasks and their reconstruction quality, bytes."""
    from tvbasis.store import open_store

    try:
        summary = open_store(store).summary()
    except TvbasisError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        _print_info(summary)


def _num(x: float | None, fmt: str) -> str:
    return "unknown" if x is None else format(x, fmt)


def _print_info(s: dict[str, Any]) -> None:
    b = s["bytes"]
    out.print(
        f"[bold]{escape(s['path'])}[/]: {s['method']} basis, M = {s['M']} of T = {s['T']} tasks"
        f"{' (+ stored mean)' if s['has_mean'] else ''}, atoms {s['atom_dtype']}, D = {s['dim']:,}"
    )
    out.print("settings: " + ", ".join(f"{k}={v}" for k, v in s["settings"].items()), highlight=False)
    if s["fit"]:
        out.print(
            "fit: " + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["fit"].items()),
            highlight=False,
        )
    rounded = any("rel_error_unrounded" in t for t in s["tasks"])
    coded = any("rel_error_basis" in t for t in s["tasks"])
    columns = [
        "task",
        "relative error",
        *([f"of which {s['atom_dtype']} adds"] if rounded else []),
        *(["basis alone"] if coded else []),
        "cosine",
        "norm",
    ]
    table = Table(*columns)
    for t in s["tasks"]:
        extra = [f"{t['rel_error'] - t['rel_error_unrounded']:+.2e}"] if rounded else []
        extra += [_num(t.get("rel_error_basis"), ".4f")] if coded else []
        name = f"{t['name']} (LoRA)" if t.get("input") == "lora-adapter" else t["name"]
        table.add_row(name, _num(t["rel_error"], ".4f"), *extra, _num(t["cosine"], ".4f"), _num(t["norm"], ".4g"))
    out.print(table)
    if "codes" in s:
        codes = Table("per-tensor code (residual of every task)", "tensors", "parameters")
        for name, row in s["codes"].items():
            codes.add_row(escape(name), str(row["tensors"]), f"{row['params']:,}")
        out.print(codes)
    residuals = f", residuals {b['residuals']:,}" if "residuals" in b else ""
    out.print(
        f"stored {b['total']:,} bytes (atoms {b['atoms']:,}, matrices {b['matrices']:,}{residuals}, other "
        f"{b['other'] + b['manifest']:,}) = {100 * b['ratio']:.2f}% of the {s['T']} fp32 task vectors "
        f"({b['original_fp32']:,} bytes)",
        highlight=False,
    )


@app.command()
def reconstruct(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    task: Annotated[str, typer.Option(help="Task to reconstruct.")],
    out_path: Annotated[Path, typer.Option("--out", help="Output .safetensors file.")],
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16.")] = "fp32",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write one task's reconstructed task vector, reading only the M stored atoms."""
    from tvbasis.arithmetic import reconstruct_task
    from tvbasis.store import open_store

    set_quiet(quiet)
    try:
        s = open_store(store)
        reconstruct_task(s, task, out_path, dtype=dtype, overwrite=overwrite)
    except TvbasisError as exc:
        _fail(exc)
    if not quiet:
        _say(f"wrote {out_path}")


StoreArg = Annotated[Path, typer.Argument(help="Store directory.")]
RecordedBase = Annotated[str | None, typer.Option(help="Base checkpoint or URL (default: the one the store records).")]
UpdateOut = Annotated[
    Path | None, typer.Option("--out", help="Write the updated store here instead of updating STORE in place.")
]


@app.command("add-task")
def add_task_command(
    store: StoreArg,
    task: Annotated[str, typer.Option(help="The new fine-tune (or PEFT LoRA adapter directory) as NAME=PATH.")],
    base: RecordedBase = None,
    out_path: UpdateOut = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Add a task without refitting: its coefficients are its least-squares projection onto the atoms."""
    from tvbasis.tasks import parse_task_arg
    from tvbasis.update import add_task

    set_quiet(quiet)
    try:
        updated, added = add_task(store, parse_task_arg(task), base=base, out=out_path, overwrite=overwrite)
    except TvbasisError as exc:
        _fail(exc)
    if added.missing_inputs:
        _log(
            "warning: the inputs of " + ", ".join(added.missing_inputs) + " were not found, so the store lacks "
            f"their inner products with {added.name!r}; a refit will read everything twice"
        )
    _say(
        f"added {added.name} to {updated.path}: relative error {added.rel_error:.4f}, cosine {added.cosine:.4f} "
        f"({updated.n_tasks} tasks, M = {updated.n_atoms})"
    )


@app.command("remove-task")
def remove_task_command(
    store: StoreArg,
    task: Annotated[str, typer.Option(help="Name of the task to remove.")],
    out_path: UpdateOut = None,
    overwrite: Overwrite = False,
) -> None:
    """Remove a task's coefficients and statistics; the atoms stay as they are."""
    from tvbasis.update import remove_task

    try:
        updated = remove_task(store, task, out=out_path, overwrite=overwrite)
    except TvbasisError as exc:
        _fail(exc)
    _say(f"removed {task} from {updated.path} ({updated.n_tasks} tasks left)")


@app.command("refit")
def refit_command(
    store: StoreArg,
    base: RecordedBase = None,
    out_path: UpdateOut = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Fit the basis again over the store's current tasks, reading their recorded inputs."""
    from tvbasis.update import plan_refit, refit

    set_quiet(quiet)
    try:
        _log(plan_refit(store, base=base).describe())
        updated = refit(store, base=base, out=out_path, overwrite=overwrite)
    except TvbasisError as exc:
        _fail(exc)
    _say(f"refitted {updated.path}: {updated.n_tasks} tasks, M = {updated.n_atoms}")


def _parse_add(items: list[str]) -> dict[str, float]:
    adds: dict[str, float] = {}
    for item in items:
        name, sep, coef = item.partition("=")
        if not name:
            raise TvbasisError(f"--add {item!r}: expected NAME=COEF")
        try:
            value = float(coef) if sep else 1.0
        except ValueError:
            raise TvbasisError(f"--add {item!r}: {coef!r} is not a number") from None
        if name in adds:
            raise TvbasisError(f"--add {name}: given twice")
        adds[name] = value
    return adds


def _weights_from_options(
    task_names: list[str], add: list[str] | None, add_all: float | None, negate: list[str] | None
) -> np.ndarray:
    """The task weights a of --add NAME=COEF, --add-all COEF and --negate NAME."""
    from tvbasis.arithmetic import task_weights

    adds = _parse_add(add or [])
    if add_all is not None:
        adds = {n: adds.get(n, 0.0) + add_all for n in task_names}
    if not adds and not negate:
        raise TvbasisError("nothing to do: give --add NAME=COEF, --add-all COEF or --negate NAME")
    return task_weights(task_names, adds, negate or [])


@app.command()
def edit(
    base: Annotated[str, typer.Option(help="Base checkpoint the store was built on.")],
    store: Annotated[Path, typer.Option(help="Store directory.")],
    out_path: Annotated[
        Path, typer.Option("--out", help="Edited model: a directory, or .safetensors for a file base.")
    ],
    add: Annotated[list[str] | None, typer.Option(help="NAME=COEF: add this task with this weight; repeat.")] = None,
    add_all: Annotated[float | None, typer.Option(help="Add every task with this weight.")] = None,
    negate: Annotated[list[str] | None, typer.Option(help="Subtract this task (weight -1); repeat.")] = None,
    scale: Annotated[float, typer.Option("--scale", help="Overall coefficient lambda.")] = 1.0,
    mode: Annotated[
        str, typer.Option(help="tasks: S (W a) (default); atoms: the paper's unit sum of atoms.")
    ] = "tasks",
    merge: Annotated[
        str,
        typer.Option(
            help="none: plain sum; ties: trim, elect sign, disjoint mean; dare: drop, rescale, sum; dare-ties."
        ),
    ] = "none",
    density: Annotated[float, typer.Option(help="[ties] share of each task's entries kept, in (0, 1].")] = 0.2,
    drop_rate: Annotated[float, typer.Option(help="[dare] probability an entry is dropped, in [0, 1).")] = 0.9,
    seed: Annotated[int, typer.Option(help="[dare] seed of the drop masks.")] = 0,
    ignore_base_mismatch: Annotated[bool, typer.Option(help="Edit a base other than the store's.")] = False,
    as_lora: Annotated[
        bool, typer.Option("--as-lora", help="Write a PEFT LoRA adapter directory (truncated SVD) instead.")
    ] = False,
    rank: Annotated[int | None, typer.Option(help="[--as-lora] LoRA rank of every weight matrix.")] = None,
    energy: Annotated[
        float | None,
        typer.Option(help="[--as-lora] per matrix, the least rank keeping this share (0, 1] of sum sigma^2."),
    ] = None,
    lora_model_class: Annotated[
        str | None,
        typer.Option(help="[--as-lora] transformers class the adapter is for (default: the base's config)."),
    ] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write BASE + scale * (combination of tasks) using only the store and the base (or, --as-lora, an adapter)."""
    from tvbasis.arithmetic import atoms_sum_coefficients, edit_model, task_combination
    from tvbasis.store import open_store

    set_quiet(quiet)
    report = None
    residual_weights = None
    try:
        if as_lora:
            from tvbasis.interop.peft import check_rank_options

            check_rank_options(rank, energy)
        elif rank is not None or energy is not None or lora_model_class is not None:
            raise TvbasisError("--rank, --energy and --lora-model-class apply to --as-lora only")
        from tvbasis.arithmetic.merge import MERGES, MergeSpec, check_merge_options

        check_merge_options(density, drop_rate, seed)
        if merge not in ("none", *MERGES):
            raise TvbasisError(f"--merge {merge!r}: choose none, {', '.join(MERGES)}")
        if merge != "none" and (mode == "atoms" or as_lora):
            raise TvbasisError(f"--merge {merge} applies to --mode tasks only, and not with --as-lora")
        s = open_store(store)
        if mode == "atoms":
            if add or negate or add_all is not None:
                raise TvbasisError("--mode atoms sums the atoms with unit weights; drop --add/--negate/--add-all")
            coefs = atoms_sum_coefficients(s.n_atoms, s.has_mean, scale)
        elif mode == "tasks":
            a = _weights_from_options(s.task_names, add, add_all, negate)
            coefs, residual_weights = task_combination(s.decoder, a, scale)
        else:
            raise TvbasisError(f"--mode {mode!r}: choose tasks or atoms")
        spec = MergeSpec(merge, a, scale, density, drop_rate, seed) if merge != "none" else None
        if as_lora:
            from tvbasis.interop.peft import write_lora_adapter

            report = write_lora_adapter(
                s,
                coefs,
                out_path,
                base=base,
                rank=rank,
                energy=energy,
                model_class=lora_model_class,
                overwrite=overwrite,
                ignore_base_mismatch=ignore_base_mismatch,
                residual_weights=residual_weights,
            )
        else:
            edit_model(
                base,
                s,
                coefs,
                out_path,
                overwrite=overwrite,
                ignore_base_mismatch=ignore_base_mismatch,
                merge=spec,
                residual_weights=residual_weights,
            )
    except TvbasisError as exc:
        _fail(exc)
    if not quiet:
        _say(f"wrote {out_path}")
        if report is not None:
            _say(report.summary())


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the report, stores and results go.")] = Path(
        "runs/demo"
    ),
    cache: Annotated[
        Path | None, typer.Option(help="Fine-tune cache (default $TVBASIS_CACHE or ~/.cache/tvbasis).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="3 tasks, the 3-layer model, few examples.")] = False,
    quiet: Quiet = False,
) -> None:
    """The text suite end to end: fine-tune 8 tasks on MiniLM, build bases, edit through them, evaluate, report."""
    from tvbasis.textsuite.presets import default_cache, demo_config, quick_config
    from tvbasis.textsuite.report import addition_table, negation_table
    from tvbasis.textsuite.suite import run_suite

    set_quiet(quiet)
    make = quick_config if quick else demo_config
    try:
        results = run_suite(make(out_dir, cache or default_cache()), log=(lambda _: None) if quiet else _log)
    except TvbasisError as exc:
        _fail(exc)
    neg, dropped = negation_table(results)
    out.print(addition_table(results), highlight=False, soft_wrap=True)
    out.print("")
    out.print(neg, highlight=False, soft_wrap=True)
    for line in dropped:
        out.print(f"dropped by compression: {line}", highlight=False, soft_wrap=True)
    out.print(
        f"\nreport: {out_dir / 'report.md'} (plots beside it); took {results['timings_s']['total']:.0f} s",
        highlight=False,
    )


@app.command()
def finetune(
    task: Annotated[list[str], typer.Option(help="Text-suite task to fine-tune on; repeat.")],
    model: Annotated[str, typer.Option(help="minilm, small (3 layers) or an HF model directory.")] = "minilm",
    cache: Annotated[
        Path | None, typer.Option(help="Cache directory (default $TVBASIS_CACHE or ~/.cache/tvbasis).")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Cap on optimiser steps.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data splits and of training.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Fine-tune the encoder on text-suite tasks (head frozen); one HF model directory per task, cached."""
    from tvbasis.textsuite.data import load_task
    from tvbasis.textsuite.model import finetune_cached
    from tvbasis.textsuite.presets import default_cache
    from tvbasis.textsuite.suite import resolve_model

    set_quiet(quiet)
    root = cache or default_cache()
    hp = {"seed": seed} | ({"max_steps": max_steps} if max_steps is not None else {})
    try:
        base = resolve_model(model, root)
        for name in task:
            path = finetune_cached(base, load_task(name, seed=seed), root / "finetunes", **hp)
            out.print(f"{name}: {path}", highlight=False)
    except TvbasisError as exc:
        _fail(exc)


# The edit options of the text and vision ``evaluate`` commands.
EditStore = Annotated[Path | None, typer.Option(help="Evaluate base + an edit through this store.")]
EditAdd = Annotated[list[str] | None, typer.Option(help="With --store: NAME=COEF; repeat.")]
EditAddAll = Annotated[float | None, typer.Option(help="With --store: add every task with this weight.")]
EditNegate = Annotated[list[str] | None, typer.Option(help="With --store: subtract this task; repeat.")]
EditScale = Annotated[float, typer.Option(help="With --store: lambda.")]
EvalSplit = Annotated[str, typer.Option(help="train, val or test.")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@app.command()
def evaluate(
    task: Annotated[list[str], typer.Option(help="Text-suite task to evaluate on; repeat.")],
    model: Annotated[str, typer.Option(help="Base: minilm, small or an HF model directory.")] = "minilm",
    weights: Annotated[
        Path | None, typer.Option(help="Evaluate this fine-tune (HF directory) instead of the base.")
    ] = None,
    store: EditStore = None,
    add: EditAdd = None,
    add_all: EditAddAll = None,
    negate: EditNegate = None,
    scale: EditScale = 1.0,
    split: EvalSplit = "test",
    cache: Annotated[Path | None, typer.Option(help="Cache directory for derived models.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data splits.")] = 0,
    as_json: AsJson = False,
) -> None:
    """Accuracy of the base, a fine-tune, or the base edited through a store, on text-suite tasks."""
    from tvbasis.textsuite.data import load_task
    from tvbasis.textsuite.model import Evaluator
    from tvbasis.textsuite.presets import default_cache
    from tvbasis.textsuite.suite import resolve_model, task_vector

    try:
        _one_edit_source(weights, store)
        base = resolve_model(model, cache or default_cache())
        ev = Evaluator(base, [load_task(n, seed=seed) for n in task])
        _apply_edit(ev, weights, task_vector, store, add, add_all, negate, scale)
        accs = {n: ev.accuracy(n, split) for n in task}
    except TvbasisError as exc:
        _fail(exc)
    _print_accuracies(accs, "task", split, as_json)


def _one_edit_source(weights: Path | None, store: Path | None) -> None:
    if weights is not None and store is not None:
        raise TvbasisError("--weights and --store: give one of them")


def _apply_edit(
    ev: Any,
    weights: Path | None,
    task_vector: Callable[[dict[str, Any], Path], dict[str, Any]],
    store: Path | None,
    add: list[str] | None,
    add_all: float | None,
    negate: list[str] | None,
    scale: float,
) -> None:
    """Set a suite evaluator to the fine-tune ``weights`` (its task vector) or to the base edited through ``store``."""
    from tvbasis.arithmetic import combination_state, task_combination
    from tvbasis.store import open_store

    if weights is not None:
        ev.set_task_vector(task_vector(ev.base_state(), weights))
    elif store is not None:
        s = open_store(store)
        a = _weights_from_options(s.task_names, add, add_all, negate)
        coefs, residual_weights = task_combination(s.decoder, a, scale)
        ev.set_task_vector(combination_state(s, coefs, residual_weights=residual_weights))


def _print_accuracies(accs: dict[str, float], what: str, split: str, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(accs, indent=2) + "\n")
        return
    table = Table(what, f"{split} accuracy")
    for n, acc in accs.items():
        table.add_row(n, f"{acc:.4f}")
    out.print(table)


@app.command("import-tvb")
def import_tvb(
    run_dir: Annotated[
        Path, typer.Argument(help="Run directory of the official Task Vector Bases code (one release folder).")
    ],
    out_path: Annotated[Path, typer.Option("--out", help="Store directory to create.")],
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Load .pt files that need code execution (trusted sources only).")
    ] = False,
    dtype: Annotated[str, typer.Option(help="Atom dtype: fp32, fp16, bf16 or int8 (per-row scales).")] = "fp32",
    overwrite: Overwrite = False,
) -> None:
    """Convert an official Task Vector Bases run (basis_vectors.pt, method_info.json, AWB.pt or pca_components.pt)."""
    import warnings

    from tvbasis.interop import UnsafeLoadWarning, import_official_run

    def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
        _log(f"warning: {_one_line(str(message))}")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", UnsafeLoadWarning)
            warnings.showwarning = show  # restored on leaving the block
            store = import_official_run(run_dir, out_path, trust_pickle=trust_pickle, overwrite=overwrite, dtype=dtype)
    except TvbasisError as exc:
        _fail(exc)
    _print_info(store.summary())
    out.print(
        "not in the run directory: the Gram matrix and the tasks' norms and errors (shown as nan), and the base "
        "(edit needs --ignore-base-mismatch)",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def plan(
    store: Annotated[Path, typer.Argument(help="Store directory (built with --tensor-stats).")],
    atoms: Annotated[
        list[int] | None,
        typer.Option("--atoms", "-M", help="Atoms of a per-tensor PCA basis to price; repeat (default: M)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    budget: Annotated[
        float | None,
        typer.Option(help="Choose every tensor's code for this budget: a fraction of the fp32 task vectors, or bytes."),
    ] = None,
    noise_weight: Annotated[
        float, typer.Option(help="[--budget] weight of unbiased (random) error against biased error.")
    ] = PLANNER_NOISE_WEIGHT,
    objective: PlanObjective = "mean",
    seed: Annotated[int, typer.Option(help="[--budget] seed of the random keep codes.")] = 0,
    row_codes: PlanRowCodes = True,
    sensitivity: PlanSensitivity = None,
) -> None:
    """Per tensor, from the stored matrices only: energy share, the store basis's error, and a per-tensor PCA's.

    With --budget: the code of every tensor that loses least within the budget (see docs/codes.md)."""
    from tvbasis.planning import estimate_store
    from tvbasis.store import open_store

    if budget is not None:
        _print_budget_plan(store, budget, atoms, noise_weight, objective, seed, as_json, row_codes, sensitivity)
        return
    if sensitivity is not None:
        _fail(TvbasisError("--sensitivity applies to --budget only"))
    try:
        est = estimate_store(open_store(store), atoms or ())
    except TvbasisError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(est.to_dict(), indent=2) + "\n")
        return
    out.print(
        f"[bold]{escape(est.store)}[/]: {est.method} basis, K = {est.n_vectors} stored vectors, "
        f"T = {est.n_tasks}, atoms {est.dtype}"
    )
    # the share of rows each task changes (mean over tasks), where the store counted them and some are untouched
    rows = any(t.rows_changed is not None and t.rows_changed < 1 for t in est.tensors)
    caption = f"basis: the store's own {est.method} basis on each tensor; M=m: a per-tensor PCA basis"
    if rows:
        caption += "; rows: share of its rows a task changes (mean over tasks)"
    table = Table(caption=caption)
    table.add_column("tensor", overflow="fold")  # long tensor names wrap in narrow terminals, whole
    headers = ["energy", *(["rows"] if rows else []), "basis err", "bytes"]
    for header in headers + [h for m in est.atoms for h in (f"M={m} err", "bytes")]:
        table.add_column(header, justify="right", no_wrap=True)
    for t in est.tensors:
        changed = [f"{100 * t.rows_changed:.1f}%" if t.rows_changed is not None else ""] if rows else []
        cells = [f"{100 * t.energy_share:.2f}%", *changed, f"{t.basis_rel_error:.4f}", f"{t.basis_bytes:,}"]
        for m in est.atoms:
            cells += [f"{t.pca_rel_error[m]:.4f}", f"{t.pca_bytes[m]:,}"]
        table.add_row(escape(t.name), *cells)
    total = ["100.00%", *([""] if rows else []), f"{est.total_basis_rel_error:.4f}", f"{est.total_basis_bytes:,}"]
    for m in est.atoms:
        total += [f"{est.total_pca_rel_error[m]:.4f}", f"{est.total_pca_bytes[m]:,}"]
    table.add_row("[bold]total[/]", *total)
    out.print(table)
    out.print(
        f"errors: relative squared error over all tasks; bytes: payload (atoms in {est.dtype}, float64 "
        f"coefficients; the store basis's K x T coefficients are in its total) of {est.original_fp32:,} "
        f"fp32 bytes" + ("; store-basis errors are of its atoms before rounding" if est.dtype != "fp32" else ""),
        highlight=False,
        soft_wrap=True,
    )


@app.command("sensitivity")
def sensitivity_command(
    base: Annotated[str, typer.Option(help="Base model: a Hugging Face model directory with its tokenizer.")],
    texts: Annotated[Path, typer.Option(help="Calibration inputs: a text file, one text per line.")],
    out_path: Annotated[Path, typer.Option("--out", help="Sensitivity file (safetensors) to write.")],
    include: Annotated[list[str] | None, typer.Option(help="Only tensors whose name matches this glob.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Leave out tensors matching this glob.")] = None,
    limit: Annotated[int, typer.Option(help="Use at most this many texts.")] = 128,  # sensitivity.DEFAULT_TEXTS
    max_length: Annotated[int, typer.Option(help="Tokens per text at most.")] = 128,
    probes: Annotated[
        int, typer.Option(help="Random output directions averaged over (one backward pass each).")
    ] = 1,  # sensitivity.DEFAULT_PROBES
    seed: Annotated[int, typer.Option(help="Seed of the random directions.")] = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Measure how far a unit of weight error in each row of each tensor moves the model's outputs
    (mean-pooled embeddings of the calibration texts), for plan/build --budget --sensitivity: once
    per base model, for every set of its fine-tunes (the plan shapes it by their row energies)."""
    import time

    from tvbasis.io.checkpoint import open_checkpoint
    from tvbasis.io.outputs import check_output_path
    from tvbasis.planning.sensitivity import row_sensitivity, save_sensitivity
    from tvbasis.tasks.taskvectors import select_tensors
    from tvbasis.textsuite.model import text_encoder_forward

    set_quiet(quiet)
    try:
        check_output_path(out_path, overwrite)
        if limit < 1:
            raise TvbasisError(f"--limit {limit}: must be at least 1")
        try:
            lines = texts.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise TvbasisError(f"--texts {texts}: cannot read it ({exc})") from None
        lines = [t for t in lines if t.strip()][:limit]
        forward = text_encoder_forward(base, lines, max_length)
        with open_checkpoint(base) as ckpt:
            shapes = {i.name: tuple(i.shape) for i in select_tensors(ckpt.infos(), include or [], exclude or [])}
        t0 = time.perf_counter()
        figures = row_sensitivity(forward, shapes, probes=probes, seed=seed)
        meta = {
            "base": str(base),
            "texts": len(lines),
            "probes": probes,
            "seed": seed,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        save_sensitivity(out_path, figures, meta, overwrite)
    except TvbasisError as exc:
        _fail(exc)
    if not quiet:
        _say(f"{out_path}: sensitivity of {len(figures)} tensors from {len(lines)} texts ({meta['seconds']} s)")


def _print_budget_plan(
    store: Path,
    budget: float,
    atoms: list[int] | None,
    noise_weight: float,
    objective: str,
    seed: int,
    as_json: bool,
    row_codes: bool = True,
    sensitivity: Path | None = None,
) -> None:
    from tvbasis.planning.budget import nonzero_rows_from_store, plan_budget, sensitivity_for_store, stats_from_store
    from tvbasis.planning.sensitivity import load_sensitivity

    try:
        gram, grams, shapes, names = stats_from_store(store)
        if sensitivity is not None:
            _note_even_rows(store)
        p = plan_budget(
            gram,
            grams,
            shapes,
            budget,
            task_names=names,
            atoms=atoms or None,
            seed=seed,
            noise_weight=noise_weight,
            objective=objective,
            nonzero_rows=nonzero_rows_from_store(store) if row_codes else None,
            sensitivity=None if sensitivity is None else sensitivity_for_store(store, load_sensitivity(sensitivity)),
        )
    except TvbasisError as exc:
        _fail(exc)
    summary = p.summary()
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    out.print(
        f"[bold]{escape(str(store))}[/]: plan for {summary['budget_bytes']:,} bytes "
        f"({100 * summary['budget_bytes'] / p.original_bytes:.3g}% of the {len(names)} fp32 task vectors): "
        f"pca basis M = {p.n_atoms} (int8 atoms), estimated {summary['estimated_bytes']:,} bytes"
    )
    table = Table(
        "code (per tensor)",
        "tensors",
        "bytes",
        "est. loss",
        caption="loss: bias + noise_weight x variance, relative to each task's energy, mean over tasks"
        + (", each tensor's weighted by its output sensitivity" if p.weighted else ""),
    )
    for code, g in sorted(summary["codes"].items(), key=lambda kv: -kv[1]["bytes"]):
        table.add_row(escape(code), str(g["tensors"]), f"{int(g['bytes']):,}", f"{g['loss']:.4f}")
    table.add_row("[bold]headers, matrices, manifest[/]", "", f"{p.overhead_bytes:,}", "")
    out.print(table)
    tasks = Table(
        "task",
        "est. bias",
        "est. variance",
        "est. loss",
        caption=f"minimised: the {'worst task' if objective == 'worst' else 'mean over tasks'} "
        f"(mean {p.loss:.4f}, worst {p.worst_loss:.4f})",
    )
    for n, t in summary["tasks"].items():
        tasks.add_row(escape(str(n)), f"{t['bias']:.4f}", f"{t['variance']:.3g}", f"{t['loss']:.4f}")
    out.print(tasks)


# --------------------------------------------------------------------------------------------
# tvbasis vision: the paper's CLIP path (docs/vision.md)
# --------------------------------------------------------------------------------------------
vision_app = typer.Typer(
    no_args_is_help=True,
    help="CLIP image encoders: convert checkpoints, fine-tune and evaluate on image folders, run the 8/14/20 suites.",
)
app.add_typer(vision_app, name="vision")

DataRoot = Annotated[
    Path, typer.Option("--data-root", help="Folder with one ImageFolder dataset per subfolder (docs/vision.md).")
]
ClipDir = Annotated[Path, typer.Option("--base", help="Hugging Face CLIPModel directory (both towers, tokenizer).")]
VisionCache = Annotated[
    Path | None, typer.Option("--cache", help="Encoders and fine-tunes (default $TVBASIS_CACHE/vision).")
]
Device = Annotated[str, typer.Option(help="auto (cuda when available), cpu, cuda or cuda:N.")]
Workers = Annotated[
    int | None, typer.Option("--workers", help="Image-decoding processes (default: 0 on CPU, up to 8 on a GPU).")
]
Steps = Annotated[int | None, typer.Option(help="Fine-tuning steps (2000).")]
BatchSize = Annotated[int | None, typer.Option(help="Fine-tuning batch size (128).")]
LearningRate = Annotated[float | None, typer.Option("--lr", help="Fine-tuning learning rate (1e-5).")]
WeightDecay = Annotated[float | None, typer.Option(help="Fine-tuning AdamW weight decay (0.1).")]
WarmupSteps = Annotated[int | None, typer.Option(help="Fine-tuning warmup steps (500).")]
TrainLimit = Annotated[int | None, typer.Option(help="Train on at most this many images per dataset.")]


def _vision_cache(cache: Path | None) -> Path:
    from tvbasis.textsuite.presets import default_cache

    return cache if cache is not None else default_cache() / "vision"


def _finetune_overrides(**given: Any) -> dict[str, Any]:
    return {k: v for k, v in given.items() if v is not None}


@vision_app.command("datasets")
def vision_datasets(
    data_root: DataRoot,
    suite: Annotated[int, typer.Option(help="8, 14 or 20.")] = 20,
    dataset: Annotated[list[str] | None, typer.Option(help="Only this dataset; repeat.")] = None,
) -> None:
    """What DATA_ROOT holds for each dataset of a suite (classes, images per split), or why it is unusable."""
    from tvbasis.vision.data import REGISTRY, describe_root, suite_datasets

    try:
        if not data_root.is_dir():
            raise TvbasisError(f"--data-root {data_root}: no such directory")
        names = list(dataset) if dataset else [*suite_datasets(suite), "ImageNet"]
        rows = describe_root(data_root, names)
    except TvbasisError as exc:
        _fail(exc)
    table = Table("dataset", "suites", "found")
    for name, what in rows.items():
        spec = REGISTRY.get(name)
        suites = ", ".join(map(str, spec.suites)) if spec and spec.suites else ("control" if spec else "-")
        table.add_row(name, suites, escape(what))
    out.print(table)


@vision_app.command("convert")
def vision_convert(
    source: Annotated[Path, typer.Argument(help="open_clip state dict (.pt/.bin/.safetensors) or HF CLIP checkpoint.")],
    out_path: Annotated[Path, typer.Option("--out", help="Hugging Face directory to create.")],
    like: Annotated[
        Path | None, typer.Option(help="HF CLIP directory the checkpoint must match; its config is reused.")
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Directory whose tokenizer files to copy.")] = None,
    image_encoder: Annotated[
        bool, typer.Option("--image-encoder", help="Write only the image encoder (CLIPVisionModelWithProjection).")
    ] = False,
    act: Annotated[str, typer.Option(help="Without --like: quick_gelu (OpenAI models) or gelu.")] = "quick_gelu",
    head_width: Annotated[int, typer.Option(help="Without --like: attention head width (64 in open_clip).")] = 64,
    overwrite: Overwrite = False,
) -> None:
    """Convert a CLIP checkpoint to a Hugging Face directory (a CLIPModel, or the image encoder alone)."""
    from tvbasis.vision.convert import convert_checkpoint

    try:
        kind, notes = convert_checkpoint(
            source,
            out_path,
            like=like,
            tokenizer=tokenizer,
            image_encoder_only=image_encoder,
            hidden_act=act,
            head_width=head_width,
            overwrite=overwrite,
        )
    except TvbasisError as exc:
        _fail(exc)
    for note in notes:
        _log(f"note: {note}")
    _say(f"wrote {out_path} ({kind})")


@vision_app.command("finetune")
def vision_finetune(
    base: ClipDir,
    data_root: DataRoot,
    dataset: Annotated[list[str], typer.Option(help="Dataset folder under --data-root; repeat.")],
    cache: VisionCache = None,
    steps: Steps = None,
    batch_size: BatchSize = None,
    lr: LearningRate = None,
    weight_decay: WeightDecay = None,
    warmup_steps: WarmupSteps = None,
    train_limit: TrainLimit = None,
    seed: Annotated[int, typer.Option(help="Seed of the validation carve and of training.")] = 0,
    device: Device = "auto",
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """Fine-tune the image encoder on each dataset (zero-shot head frozen); one HF directory each, cached."""
    from tvbasis.vision.data import load_task
    from tvbasis.vision.model import FinetuneConfig, check_base, encoder_dir, finetune_cached

    set_quiet(quiet)
    root = _vision_cache(cache)
    try:
        hp = _finetune_overrides(
            steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps
        )
        cfg = FinetuneConfig(seed=seed, **hp)
        check_base(base)
        tasks = [load_task(data_root, n, seed=seed, train_limit=train_limit) for n in dataset]
        _say(f"base image encoder: {encoder_dir(base, root)}")
        for task in tasks:
            path = finetune_cached(
                base, task, root / "finetunes", cfg, device=device, workers=workers, log_fn=None if quiet else _log
            )
            _say(f"{task.name}: {path}")
    except TvbasisError as exc:
        _fail(exc)


@vision_app.command("evaluate")
def vision_evaluate(
    base: ClipDir,
    data_root: DataRoot,
    dataset: Annotated[list[str], typer.Option(help="Dataset folder under --data-root; repeat.")],
    weights: Annotated[
        Path | None, typer.Option(help="Evaluate this fine-tune (HF CLIP directory or open_clip state dict).")
    ] = None,
    store: EditStore = None,
    add: EditAdd = None,
    add_all: EditAddAll = None,
    negate: EditNegate = None,
    scale: EditScale = 1.0,
    split: EvalSplit = "test",
    limit: Annotated[int | None, typer.Option(help="Only the first N images of the split (a seeded shuffle).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the validation carve and split order.")] = 0,
    device: Device = "auto",
    workers: Workers = None,
    as_json: AsJson = False,
) -> None:
    """Accuracy of the base, a fine-tune, or the base edited through a store, on image-folder datasets."""
    from functools import partial

    from tvbasis.vision.convert import vision_task_vector
    from tvbasis.vision.data import load_task
    from tvbasis.vision.model import Evaluator, check_base

    try:
        _one_edit_source(weights, store)
        if split not in ("train", "val", "test"):
            raise TvbasisError(f"--split {split!r}: choose train, val or test")
        check_base(base)
        tasks = [load_task(data_root, n, seed=seed, need_train=split == "train") for n in dataset]
        ev = Evaluator(base, tasks, device=device, workers=workers)
        tv = partial(vision_task_vector, base_source=base)
        _apply_edit(ev, weights, tv, store, add, add_all, negate, scale)
        accs = {t.name: ev.accuracy(t.name, split, limit) for t in tasks}
    except TvbasisError as exc:
        _fail(exc)
    _print_accuracies(accs, "dataset", split, as_json)


@vision_app.command("suite")
def vision_suite(
    data_root: DataRoot,
    base: ClipDir,
    suite: Annotated[int, typer.Option(help="The paper's 8-, 14- or 20-dataset suite.")] = 8,
    dataset: Annotated[
        list[str] | None, typer.Option(help="Use these dataset folders instead of --suite; repeat.")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where results, report and stores go.")] = Path(
        "runs/vision-suite"
    ),
    cache: VisionCache = None,
    method: Annotated[
        list[str] | None, typer.Option(help="Basis method; repeat (default autoencoder, pca, sample).")
    ] = None,
    n_atoms: Annotated[list[int] | None, typer.Option("-M", "--n-atoms", help="M; repeat (default T/2, T/4).")] = None,
    autoencoder_steps: Annotated[int | None, typer.Option(help="Autoencoder Adam steps (6000).")] = None,
    control: Annotated[
        str | None, typer.Option(help="Negation control dataset (default ImageNet, as the paper).")
    ] = None,
    control_alt: Annotated[str | None, typer.Option(help="The control when the target is --control itself.")] = None,
    negate: Annotated[list[str] | None, typer.Option(help="Negation target; repeat (default every dataset).")] = None,
    no_negation: Annotated[bool, typer.Option("--no-negation", help="Skip negation (no control needed).")] = False,
    finetuned: Annotated[
        list[str] | None, typer.Option(help="NAME=PATH: use this fine-tune instead of training; repeat.")
    ] = None,
    steps: Steps = None,
    batch_size: BatchSize = None,
    lr: LearningRate = None,
    weight_decay: WeightDecay = None,
    warmup_steps: WarmupSteps = None,
    train_limit: TrainLimit = None,
    val_limit: Annotated[int, typer.Option(help="Validation images per dataset for choosing lambda (0: all).")] = 1000,
    test_limit: Annotated[int, typer.Option(help="Test images per dataset (0: all).")] = 0,
    search: Annotated[str, typer.Option(help="coarse-to-fine or full lambda search.")] = "coarse-to-fine",
    seed: Annotated[int, typer.Option(help="Seed of the validation carve, split order and training.")] = 0,
    device: Device = "auto",
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """The vision suite end to end: fine-tune, build bases, add and negate through them, evaluate, report."""
    from tvbasis.tasks import parse_task_arg
    from tvbasis.vision.data import suite_datasets
    from tvbasis.vision.suite import VisionSuiteConfig, run_suite

    set_quiet(quiet)
    try:
        if no_negation and (negate or control or control_alt):
            raise TvbasisError("--no-negation: drop --negate, --control and --control-alt")
        names = tuple(dataset) if dataset else suite_datasets(suite)
        user_ft = {s.name: Path(s.path) for s in map(parse_task_arg, finetuned or [])}
        config = VisionSuiteConfig(
            out_dir=out_dir,
            cache_dir=_vision_cache(cache),
            data_root=data_root,
            base=base,
            datasets=names,
            finetuned=user_ft,
            methods=tuple(method) if method else ("autoencoder", "pca", "sample"),
            n_atoms=tuple(n_atoms or ()),
            method_settings={"autoencoder": {"steps": autoencoder_steps}} if autoencoder_steps else {},
            negation_targets=() if no_negation else (tuple(negate) if negate else None),
            control=control or "ImageNet",
            control_alt=control_alt,
            val_limit=val_limit or None,
            test_limit=test_limit or None,
            train_limit=train_limit,
            search=search,
            finetune=_finetune_overrides(
                steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps
            ),
            device=device,
            workers=workers,
            seed=seed,
        )
        results = run_suite(config, log=(lambda _: None) if quiet else _log)
    except TvbasisError as exc:
        _fail(exc)
    from tvbasis.evaluation.report import addition_table
    from tvbasis.vision.report import negation_rows

    out.print(addition_table(results), highlight=False, soft_wrap=True)
    if results["negation"]:
        neg, dropped = negation_rows(results)
        out.print("")
        out.print(neg, highlight=False, soft_wrap=True)
        for line in dropped:
            out.print(f"dropped by compression: {line}", highlight=False, soft_wrap=True)
    out.print(
        f"\nreport: {out_dir / 'report.md'}; took {results['timings_s']['total']:.0f} s",
        highlight=False,
        soft_wrap=True,
    )


# --------------------------------------------------------------------------------------------
# tvbasis compose: learned and per-sample composition on the text suite (docs/composition.md)
# --------------------------------------------------------------------------------------------
compose_app = typer.Typer(
    no_args_is_help=True,
    help="Compose a store's task vectors or atoms with learned (aTLAS) or per-sample (variational) coefficients.",
)
app.add_typer(compose_app, name="compose")


@compose_app.command("train")
def compose_train(
    store: Annotated[Path, typer.Option(help="Store whose task vectors or atoms are composed (built on --model).")],
    out: Annotated[Path, typer.Option(help="Composer directory to write.")],
    kind: Annotated[str, typer.Option(help="task-arithmetic, atlas, per-sample or variational.")] = "variational",
    over: Annotated[str, typer.Option(help="tasks (the store's task vectors) or atoms.")] = "tasks",
    blocks: Annotated[str, typer.Option(help="Coefficient granularity: model, layer or tensor.")] = "layer",
    shots: Annotated[int, typer.Option(help="Labelled training examples per class and task.")] = 16,
    task: Annotated[
        list[str] | None, typer.Option(help="Text-suite task (default: the store's tasks); repeat.")
    ] = None,
    model: Annotated[str, typer.Option(help="Base: minilm, small or an HF model directory.")] = "minilm",
    steps: Annotated[int, typer.Option(help="Optimiser steps (every kind gets the same).")] = 150,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 32,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default per kind).")] = None,
    rank: Annotated[
        int | None, typer.Option(help="Run 2-D directions through rank-R factors (cheaper per-sample forwards).")
    ] = None,
    features: Annotated[
        str, typer.Option(help="Per-sample features: pooled (a base forward) or tokens (mean input embedding).")
    ] = "pooled",
    prior: Annotated[bool, typer.Option(help="Variational: pay the KL to the spike-and-slab prior.")] = True,
    gate: Annotated[bool, typer.Option(help="Variational: inclusion gates and gated inference.")] = True,
    beta: Annotated[float, typer.Option(help="Variational: weight of the KL per coefficient.")] = 0.01,
    test_limit: Annotated[int | None, typer.Option(help="Evaluate on at most this many test items per task.")] = None,
    cache: Annotated[Path | None, typer.Option(help="Cache directory for derived models.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the shots, the splits and training.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    quiet: Quiet = False,
) -> None:
    """Train a composer on k shots per class of text-suite tasks, evaluate it on their test splits, save it."""
    from tvbasis.composition import ComposerConfig, save_composer
    from tvbasis.io.outputs import check_output_path
    from tvbasis.store import open_store
    from tvbasis.textsuite.compose import composition_from_meta
    from tvbasis.textsuite.presets import default_cache
    from tvbasis.textsuite.suite import resolve_model

    set_quiet(quiet)
    try:
        check_output_path(out, overwrite)
        config = ComposerConfig(kind=kind, prior=prior, gate=gate, beta=beta)
        base = resolve_model(model, cache or default_cache())
        names = task or open_store(store).task_names
        meta = {
            "base": str(base),
            "store": str(store),
            "over": over,
            "blocks": blocks,
            "rank": rank,
            "tasks": names,
            "shots": shots,
            "seed": seed,
            "test_limit": test_limit,
            "features": features,
        }
        setting = composition_from_meta(meta)
        result, composer = setting.run(config, steps=steps, batch_size=batch_size, lr=lr)
        save_composer(
            composer,
            out,
            {**setting.meta(), "test_accuracy": result.test_accuracy, "sparsity": result.sparsity, "lam": result.lam},
            overwrite=overwrite,
        )
    except TvbasisError as exc:
        _fail(exc)
    _print_composition(result.test_accuracy, result.sparsity)
    _say(f"wrote {out}")


def _print_composition(accs: dict[str, float], sparsity: float | None) -> None:
    table = Table("task", "test accuracy")
    for n, acc in accs.items():
        table.add_row(n, f"{acc:.4f}")
    table.add_row("mean", f"{sum(accs.values()) / len(accs):.4f}")
    out.print(table)
    if sparsity is not None:
        out.print(f"coefficients dropped by the gate: {sparsity:.1%}", highlight=False)


@compose_app.command("eval")
def compose_eval(
    composer: Annotated[Path, typer.Argument(help="Composer directory (from compose train).")],
    split: Annotated[str, typer.Option(help="test or train (the shots).")] = "test",
    test_limit: Annotated[int | None, typer.Option(help="At most this many test items per task.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Accuracy of a saved composer on its tasks, with the share of coefficients its gate drops."""
    from tvbasis.composition import load_composer
    from tvbasis.textsuite.compose import composition_from_meta

    try:
        if split not in ("test", "train"):
            raise TvbasisError(f"--split {split!r}: test or train")
        comp, meta = load_composer(composer)
        setting = composition_from_meta(meta, test_limit)
        accs, sparsity = setting.accuracy(comp, split)
    except TvbasisError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps({"accuracy": accs, "sparsity": sparsity}, indent=2) + "\n")
        return
    _print_composition(accs, sparsity)


@compose_app.command("export")
def compose_export(
    composer: Annotated[Path, typer.Argument(help="Composer directory (from compose train).")],
    out: Annotated[Path, typer.Option(help="Edited model to write (the base's layout).")],
    task: Annotated[
        str | None, typer.Option(help="Per-sample composers: average the coefficients over this task's shots.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    quiet: Quiet = False,
) -> None:
    """Write base + the composition as a model: shared coefficients as learned, per-sample ones averaged."""
    from tvbasis.composition import export_composition, load_composer
    from tvbasis.io.outputs import check_output_path
    from tvbasis.textsuite.compose import composition_from_meta

    set_quiet(quiet)
    try:
        check_output_path(out, overwrite)
        comp, meta = load_composer(composer)
        setting = composition_from_meta(meta)
        z = setting.task_coefficients(comp, task).numpy()
        export_composition(
            meta["base"], setting.store, setting.directions.to_vectors, setting.block_of, z, out, overwrite=overwrite
        )
    except TvbasisError as exc:
        _fail(exc)
    _say(f"wrote {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
