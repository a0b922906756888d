"""The model-agnostic steps of a suite run (text or vision): denominators, stores, addition, negation.

A suite supplies an *evaluator* (``base_state`` / ``set_task_vector`` / ``accuracy`` / ``reset``,
as ``tvbasis.textsuite.model.Evaluator`` and ``tvbasis.vision.model.Evaluator``), its task names,
a reader of one task's full task vector, and its fine-tunes; these functions do the rest the same
way for both, following the papers' protocol (:mod:`tvbasis.evaluation.protocol`).

Full task vectors are never all held at once: the reference sum is accumulated task by task and a
single task's vector is read back from its fine-tune when a negation needs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from tvbasis.arithmetic import atoms_sum_coefficients, combination_state, task_combination, task_weights
from tvbasis.arithmetic.merge import MergeSpec, merged_state
from tvbasis.build import build_store
from tvbasis.evaluation.protocol import effect_retained, gain_retained, search_addition, search_negation
from tvbasis.methods import make_method
from tvbasis.store import Store
from tvbasis.tasks import TaskSource

Log = Callable[[str], None]
Delta = dict[str, torch.Tensor]
#: The full task vector of one task, by name.
ReadTaskVector = Callable[[str], Delta]

FULL = "full task vectors"


class SuiteEvaluator(Protocol):
    """What the runner needs of an evaluator: the base's tensors, edits by task vector, accuracy."""

    def base_state(self) -> dict[str, torch.Tensor]: ...

    def set_task_vector(self, delta: Mapping[str, torch.Tensor], coef: float = 1.0) -> None: ...

    def accuracy(self, task_name: str, split: str = "test", limit: int | None = None) -> float: ...

    def reset(self) -> None: ...


class SuiteSettings(Protocol):
    """The fields of a suite's config the runner reads (``SuiteConfig``, ``VisionSuiteConfig``)."""

    methods: tuple[str, ...]
    negation_methods: tuple[str, ...] | None
    control_threshold: float
    val_limit: int | None
    test_limit: int | None
    search: str

    def control_for(self, target: str) -> str: ...


@dataclass(frozen=True)
class Limits:
    """Examples per task evaluated on each split (None: all)."""

    val: int | None
    test: int | None

    def __getitem__(self, split: str) -> int | None:
        return {"val": self.val, "test": self.test}[split]

    @classmethod
    def of(cls, settings: SuiteSettings) -> Limits:
        return cls(val=settings.val_limit, test=settings.test_limit)


@dataclass
class Edit:
    """One way of editing the base: a label, and the delta for given task weights."""

    label: str
    method: str
    n_atoms: int | None
    bytes_ratio: float
    delta: Callable[[np.ndarray], Delta]


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the block takes as ``timings[key]``."""
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def accuracies(ev: SuiteEvaluator, names: Sequence[str], split: str, limits: Limits) -> dict[str, float]:
    """The current weights' accuracy on each of ``names``."""
    return {n: ev.accuracy(n, split, limits[split]) for n in names}


def zero_shot(ev: SuiteEvaluator, names: Sequence[str], limits: Limits) -> dict[str, dict[str, float]]:
    """The base's accuracy per split (val, test) and task: the lower denominators."""
    return {"val": accuracies(ev, names, "val", limits), "test": accuracies(ev, names, "test", limits)}


def finetuned(
    ev: SuiteEvaluator, names: Sequence[str], base: Mapping[str, torch.Tensor], read_tv: ReadTaskVector, limits: Limits
) -> tuple[dict[str, dict[str, float]], Delta]:
    """Each fine-tune's accuracy on its own task per split, and the sum of all task vectors (shaped as ``base``).

    Only one task vector is held at a time; the evaluator is back at the base afterwards.
    """
    ft: dict[str, dict[str, float]] = {"val": {}, "test": {}}
    full_sum: Delta = {k: torch.zeros_like(v) for k, v in base.items()}
    for n in names:
        tau = read_tv(n)
        ev.set_task_vector(tau)
        for split in ("val", "test"):
            ft[split][n] = ev.accuracy(n, split, limits[split])
        for k in full_sum:
            full_sum[k] += tau[k]
        del tau
    ev.reset()
    return ft, full_sum


def build_stores(
    base_dir: Path,
    sources: Sequence[TaskSource],
    methods: Sequence[str],
    atoms: Sequence[int],
    method_settings: Mapping[str, Mapping[str, Any]],
    out_dir: Path,
) -> dict[tuple[str, int], Store]:
    """One store per (method, M) under ``out_dir/stores/<method>-M<M>``, replacing older ones."""
    stores: dict[tuple[str, int], Store] = {}
    (out_dir / "stores").mkdir(exist_ok=True)
    for method in methods:
        for m in atoms:
            est = make_method(method, m, **method_settings.get(method, {}))
            path = out_dir / "stores" / f"{method}-M{m}"
            stores[(method, m)] = build_store(base_dir, sources, est, path, overwrite=True)
    return stores


def full_delta(names: Sequence[str], full_sum: Delta, read_tv: ReadTaskVector) -> Callable[[np.ndarray], Delta]:
    """The full task vectors' combination: the running sum, or one task read back from its fine-tune."""
    tv_cache: dict[str, Delta] = {}

    def delta(a: np.ndarray) -> Delta:
        if np.allclose(a, 1.0):
            return full_sum
        nz = np.nonzero(a)[0]
        if len(nz) != 1:
            raise RuntimeError("full deltas are only needed for all-ones or single-task weights")
        n = names[int(nz[0])]
        if n not in tv_cache:
            tv_cache.clear()  # hold at most one task vector
            tv_cache[n] = read_tv(n)
        return {k: float(a[nz[0]]) * v for k, v in tv_cache[n].items()}

    return delta


def store_delta(store: Store, weights: np.ndarray) -> Delta:
    """Task-weighted addition through ``store`` (its coded residuals included) as a state dict."""
    coefs, residual_weights = task_combination(store.decoder, weights)
    return combination_state(store, coefs, residual_weights=residual_weights)


def store_edits(
    stores: Mapping[tuple[str, int], Store],
    full: Callable[[np.ndarray], Delta],
    atoms_mode_methods: Sequence[str],
    merges: Sequence[str] = (),
    merge_methods: Sequence[str] = (),
) -> list[Edit]:
    """The full task vectors, then for each store: its task coefficients, merges (where asked), atoms-sum mode."""
    edits: list[Edit] = [Edit(FULL, "full", None, 1.0, full)]
    for (method, m), store in stores.items():
        ratio = store.manifest["bytes"]["ratio"]
        edits.append(
            Edit(
                f"{method} M={m}",
                method,
                m,
                ratio,
                lambda a, s=store: store_delta(s, a),
            )
        )
        for merge in merges if method in merge_methods else ():
            edits.append(
                Edit(
                    f"{method} M={m} + {merge}",
                    f"{method} + {merge}",
                    m,
                    ratio,
                    lambda a, s=store, merge=merge: merged_state(s, MergeSpec(merge, a)),
                )
            )
        if method in atoms_mode_methods:
            edits.append(
                Edit(
                    f"{method} M={m} atoms-sum",
                    f"{method} (atoms-sum)",
                    m,
                    ratio,
                    lambda a, s=store: combination_state(s, atoms_sum_coefficients(s.n_atoms, s.has_mean)),
                )
            )
    return edits


def run_addition(
    ev: SuiteEvaluator,
    edits: Sequence[Edit],
    names: Sequence[str],
    zs: Mapping[str, Mapping[str, float]],
    ft: Mapping[str, Mapping[str, float]],
    limits: Limits,
    search: str,
    log: Log,
) -> dict[str, dict[str, Any]]:
    """Task addition through every edit: lambda chosen on validation, test once, gain retained vs the full vectors."""
    addition: dict[str, dict[str, Any]] = {}
    ones = np.ones(len(names))
    for edit in edits:
        delta = edit.delta(ones)

        def val_acc(lam: float, delta: Delta = delta) -> dict[str, float]:
            if lam == 0:
                return zs["val"]  # the base itself
            ev.set_task_vector(delta, lam)
            return accuracies(ev, names, "val", limits)

        res = search_addition(val_acc, ft["val"], search=search)
        ev.set_task_vector(delta, res.lam)
        test = accuracies(ev, names, "test", limits)
        addition[edit.label] = {
            "method": edit.method,
            "n_atoms": edit.n_atoms,
            "bytes_ratio": edit.bytes_ratio,
            "lam": res.lam,
            "val_curve": res.curve,
            "test": test,
            "normalised": {n: test[n] / ft["test"][n] if ft["test"][n] > 0 else float("nan") for n in names},
        }
        log(f"addition  {edit.label:<28} lambda={res.lam:.2f}  mean test acc {np.mean(list(test.values())):.3f}")
    if FULL in addition:  # gains are relative to the full vectors' (a caller may hold them already)
        full_test = addition[FULL]["test"]
        for row in addition.values():
            row["gain_retained"] = gain_retained(row["test"], zs["test"], full_test)
    return addition


def negation_edits(edits: Sequence[Edit], methods: Sequence[str]) -> list[Edit]:
    """The edits negation runs through: the full task vectors and ``methods``' task coefficients (no atoms-sum)."""
    keep = set(methods)
    return [e for e in edits if e.method == "full" or (e.method in keep and "atoms-sum" not in e.label)]


def run_negation(
    ev: SuiteEvaluator,
    edits: Sequence[Edit],
    names: Sequence[str],
    targets: Sequence[str],
    control_for: Callable[[str], str],
    val_zs: Mapping[str, float],
    test_zs: Mapping[str, float],
    limits: Limits,
    control_threshold: float,
    search: str,
    log: Log,
) -> dict[str, dict[str, Any]]:
    """Negate each target through each edit, keeping its control at ``control_threshold`` of zero-shot.

    ``val_zs`` holds the zero-shot validation accuracy of every task and control, ``test_zs`` of every
    target. The evaluator is back at the base afterwards.
    """
    negation: dict[str, dict[str, Any]] = {}
    for target in targets:
        control = control_for(target)
        weights = task_weights(list(names), negate=[target])
        rows: dict[str, Any] = {}
        for edit in edits:
            delta = edit.delta(weights)
            applied: list[float] = []  # the lambda the evaluator's weights are at, if any

            def val_at(lam: float, task: str, delta: Delta = delta, applied: list[float] = applied) -> float:
                if lam == 0:
                    return val_zs[task]  # the base itself
                if applied != [lam]:
                    ev.set_task_vector(delta, lam)
                    applied[:] = [lam]
                return ev.accuracy(task, "val", limits.val)

            res = search_negation(
                lambda lam, t=target: val_at(lam, t),
                lambda lam, c=control: val_at(lam, c),
                val_zs[control],
                control_threshold,
                search=search,
            )
            row: dict[str, Any] = {
                "control": control,
                "method": edit.method,
                "n_atoms": edit.n_atoms,
                "bytes_ratio": edit.bytes_ratio,
                "lam": res.lam,
                "reason": res.reason,
            }
            if res.lam is not None:
                ev.set_task_vector(delta, res.lam)
                row["target_test"] = ev.accuracy(target, "test", limits.test)
                row["control_test"] = ev.accuracy(control, "test", limits.test)
            rows[edit.label] = row
        full_row = rows.get(FULL, {})
        for row in rows.values():
            if "target_test" in row and "target_test" in full_row:
                row["effect_retained"] = effect_retained(row["target_test"], test_zs[target], full_row["target_test"])
        negation[target] = rows
        log(
            f"negation  {target}: "
            + ", ".join(f"{k} -> {v.get('target_test', float('nan')):.3f}" for k, v in rows.items())
        )
    ev.reset()
    return negation


def add_and_negate(
    ev: SuiteEvaluator,
    settings: SuiteSettings,
    edits: Sequence[Edit],
    names: Sequence[str],
    zs: Mapping[str, Mapping[str, float]],
    ft: Mapping[str, Mapping[str, float]],
    targets: Sequence[str],
    val_zs: Mapping[str, float],
    timings: dict[str, float],
    log: Log,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Steps 4 and 5 of a suite: :func:`run_addition` through every edit, then :func:`run_negation` of
    ``targets`` through the full vectors and ``settings.negation_methods``' stores; timed as "addition"
    and "negation". ``val_zs``: zero-shot validation accuracy of every task and control."""
    limits = Limits.of(settings)
    with timed(timings, "addition"):
        addition = run_addition(ev, edits, names, zs, ft, limits, settings.search, log)
    neg_methods = settings.methods if settings.negation_methods is None else settings.negation_methods
    with timed(timings, "negation"):
        negation = run_negation(
            ev,
            negation_edits(edits, neg_methods),
            names,
            targets,
            settings.control_for,
            val_zs,
            zs["test"],
            limits,
            settings.control_threshold,
            settings.search,
            log,
        )
    return addition, negation


def protocol_results(
    addition: Mapping[str, Any],
    negation: Mapping[str, Any],
    stores: Mapping[tuple[str, int], Store],
    gram: np.ndarray,
    names: Sequence[str],
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """The tail of a suite's ``results.json``, in the order both suites write it."""
    return {
        "addition": addition,
        "negation": negation,
        "stores": {f"{k[0]}-M{k[1]}": str(s.path) for k, s in stores.items()},
        "gram": gram.tolist(),
        "task_names": names,
        "timings_s": timings,
    }
