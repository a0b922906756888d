"""Tables, the frontier plot and the proxy check of ``benchmarks/frontier.py``'s results.

``write_report(out)`` reads ``reference.json`` and ``results.jsonl`` under ``out`` and writes
``report.md`` and ``frontier.png``. Seeds of a random code are summarised as their mean and their
worst value. The proxy check compares, over the single codes, the planner's estimated loss
(``planning.budget.estimate_plan``, from the statistics store) with the measured gain and
negation: Spearman rank correlation, for several weights of unbiased error.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from frontier import sensitivity_path
from tvbasis.codes import parse_code
from tvbasis.evaluation.protocol import LAMBDA_GRID
from tvbasis.planning.budget import DEFAULT_NOISE_WEIGHT, estimate_plan, sensitivity_for_store, stats_from_store
from tvbasis.planning.sensitivity import load_sensitivity
from tvbasis.store.residuals import CodePlan, TensorCode

NOISE_WEIGHTS = (0.0, 1 / 1024, 1 / 256, 1 / 64, 1 / 16, 1 / 4, 1.0)


def load(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    ref = json.loads((out / "reference.json").read_text())
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return ref, rows


def group(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by label, in first-seen order (seeds of one code together)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[r["config"]["label"]].append(r)
    return dict(out)


def rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rank(np.asarray(a, float)), rank(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def single_code_plan(cfg: dict[str, Any]) -> tuple[CodePlan, int]:
    """The code plan and global basis size of a single-code configuration."""
    residual = parse_code(cfg.get("residual") or "none")
    own = int(cfg.get("tensor_atoms", 0))
    if cfg["M"] > 0:
        return CodePlan(default=TensorCode(True, residual)), cfg["M"]
    return CodePlan(default=TensorCode(False, residual, own)), 0


def proxy_check(out: Path, groups: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Per noise weight, the rank correlation of -estimated loss with measured gain and negation."""
    stats = out / "stores" / "stats"
    if not (stats / "tvbasis.json").exists():
        return ["(no statistics store: run with `--configs planned` first)"], []
    gram, grams, shapes, names = stats_from_store(stats)
    singles = {k: v for k, v in groups.items() if v[0]["config"]["kind"] == "single"}
    labels = list(singles)
    gain = np.array([np.mean([r["gain_mean"] for r in singles[k]]) for k in labels])
    neg_min = np.array([np.mean([r["effect_min"] for r in singles[k]]) for k in labels])
    gain_min = np.array([np.mean([np.nanmin(list(r["gain"].values())) for r in singles[k]]) for k in labels])
    neg_mean = np.array([np.mean([np.nanmean(list(r["effect"].values())) for r in singles[k]]) for k in labels])
    matched = all("effect_matched" in r for k in labels for r in singles[k])
    if matched:  # the same, at the full vectors' lambdas (no lambda search)
        neg_min_matched = np.array([np.mean([r["effect_matched_min"] for r in singles[k]]) for k in labels])
        neg_mean_matched = np.array(
            [np.mean([np.nanmean(list(r["effect_matched"].values())) for r in singles[k]]) for k in labels]
        )
    lines, table = [], []
    estimates = {}
    for k in labels:
        plan, m = single_code_plan(singles[k][0]["config"])
        estimates[k] = estimate_plan(gram, grams, shapes, plan, m, task_names=names)
    # the same estimates with each tensor weighted by its output sensitivity, where it was measured
    weighted = {}
    if sensitivity_path(stats).exists():
        sensitivity = sensitivity_for_store(stats, load_sensitivity(sensitivity_path(stats)))
        for k in labels:
            plan, m = single_code_plan(singles[k][0]["config"])
            weighted[k] = estimate_plan(gram, grams, shapes, plan, m, task_names=names, sensitivity=sensitivity)
    variants = [(nu, estimates, False) for nu in NOISE_WEIGHTS]
    variants += [(nu, weighted, True) for nu in NOISE_WEIGHTS if weighted and nu <= DEFAULT_NOISE_WEIGHT]
    for nu, chosen, is_weighted in variants:
        loss = np.array([float((e.task_bias() + nu * e.task_variance()).mean()) for e in chosen.values()])
        worst = np.array([float((e.task_bias() + nu * e.task_variance()).max()) for e in chosen.values()])
        row = {
            "sensitivity": is_weighted,
            "noise_weight": nu,
            "gain": spearman(-loss, gain),
            "gain_min": spearman(-worst, gain_min),
            "negation_min": spearman(-worst, neg_min),
            "negation_mean": spearman(-loss, neg_mean),
        }
        if matched:
            row["negation_min_matched"] = spearman(-worst, neg_min_matched)
            row["negation_mean_matched"] = spearman(-loss, neg_mean_matched)
        table.append(row)
    lines.append(f"{len(labels)} single codes: " + ", ".join(labels))
    lines.append("")
    extra = " rho(worst negation, matched lambda) | rho(mean negation, matched lambda) |" if matched else ""
    lines.append(
        "| weight of unbiased error | rho(gain) | rho(worst task's gain) | rho(worst task's negation) "
        "| rho(mean negation) |" + extra
    )
    lines.append("|---|---|---|---|---|" + ("---|---|" if matched else ""))
    for row in table:
        nu = row["noise_weight"]
        name = "0" if nu == 0 else ("1 (plain squared error)" if nu == 1 else f"1/{round(1 / nu)}")
        name += ", sensitivity-weighted" if row["sensitivity"] else ""
        lines.append(
            f"| {name} | {row['gain']:.2f} | {row['gain_min']:.2f} | {row['negation_min']:.2f} "
            f"| {row['negation_mean']:.2f} |"
            + (f" {row['negation_min_matched']:.2f} | {row['negation_mean_matched']:.2f} |" if matched else "")
        )
    nu = DEFAULT_NOISE_WEIGHT
    lines.append("")
    lines.append(
        f"| code | est. bias | est. variance | est. loss (1/{round(1 / nu)}) | measured gain | min negation effect |"
    )
    lines.append("|---|---|---|---|---|---|")
    for i, (k, e) in enumerate(estimates.items()):
        lines.append(
            f"| {k} | {e.task_bias().mean():.4f} | {e.task_variance().mean():.3g} | "
            f"{(e.task_bias() + nu * e.task_variance()).mean():.4f} | {gain[i]:.3f} | {neg_min[i]:.3f} |"
        )
    return lines, table


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def frontier_table(
    ref: dict[str, Any], groups: dict[str, list[dict[str, Any]]], gain: str = "gain_mean", effect: str = "effect"
) -> list[str]:
    """One row per configuration; ``gain``/``effect`` pick the searched-lambda or matched-lambda figures."""
    names = list(ref["zs"]["test"])
    per_task_gain = gain == "gain_mean"
    head = (
        "| configuration | seeds | bytes | gain (mean, worst seed) | "
        + ("min task gain | " if per_task_gain else "")
        + " | ".join(f"neg. {n}" for n in names)
        + " | min negation |"
    )
    lines = [head, "|" + "---|" * (5 + per_task_gain + len(names))]
    for label, rs in groups.items():
        rs = [r for r in rs if effect in r]
        if not rs:
            continue
        gains = [r[gain] for r in rs]
        effects = {n: min(r[effect][n] for r in rs) for n in names}
        task_gain = ""
        if per_task_gain:
            task_gain = f"{min(min(v for v in r['gain'].values() if not math.isnan(v)) for r in rs):.3f} | "
        lines.append(
            f"| {label} | {len(rs)} | {100 * np.mean([r['bytes_ratio'] for r in rs]):.3g}% | "
            f"{np.mean(gains):.3f}, {min(gains):.3f} | {task_gain}"
            + " | ".join(_fmt(effects[n]) for n in names)
            + f" | {min(effects.values()):.3f} |"
        )
    return lines


def plot(groups: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("gain_mean", "gain of full task addition kept"),
        ("effect_min", "negation effect kept, worst task"),
    ]
    if any("effect_matched_min" in r for rs in groups.values() for r in rs):
        panels.append(("effect_matched_min", "worst task's negation, at the full vectors' lambdas"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), sharex=True)
    planned = {k: v for k, v in groups.items() if v[0]["config"]["kind"] == "planned"}
    by_weight: dict[tuple[float, str], list[list[dict[str, Any]]]] = {}
    for rs in planned.values():  # one line per noise weight (and atom codes) the plans were made with
        # rows without them were planned with 1/64 and int8 atoms (frontier.UNLABELLED_*)
        cfg = rs[0]["config"]
        atoms = "/".join(cfg.get("tensor_atom_codes", ["int8"]))
        by_weight.setdefault((cfg.get("noise_weight", 1 / 64), atoms), []).append(rs)
    for ax, (metric, title) in zip(axes, panels, strict=True):
        for label, rs in groups.items():
            rs = [r for r in rs if metric in r]
            if label in planned or not rs:
                continue
            x = [100 * r["bytes_ratio"] for r in rs]
            y = [r[metric] for r in rs]
            ax.scatter(x, y, s=14, color="tab:blue", alpha=0.6)
            ax.annotate(label, (np.mean(x), np.mean(y)), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for i, ((nu, atoms), runs) in enumerate(sorted(by_weight.items())):
            color = ("k", "tab:purple", "tab:red", "tab:orange")[i % 4]
            measured = [[r for r in rs if metric in r] for rs in runs]
            ordered = sorted((rs for rs in measured if rs), key=lambda rs: rs[0]["bytes_ratio"])
            xs = [np.mean([100 * r["bytes_ratio"] for r in rs]) for rs in ordered]
            ys = [np.mean([r[metric] for r in rs]) for rs in ordered]
            lo = [min(r[metric] for r in rs) for rs in ordered]
            name = f"planned, noise weight 1/{round(1 / nu)}" + (f", {atoms} tensor atoms" if atoms != "int8" else "")
            ax.plot(xs, ys, "-o", color=color, markersize=4, label=f"{name}: mean of seeds")
            ax.plot(xs, lo, "--", color=color, linewidth=0.8, label=f"{name}: worst seed")
        ax.set_xscale("log")
        ax.set_xlabel("bytes stored, % of the 8 fp32 task vectors")
        ax.set_title(title, fontsize=10)
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_ylim(-0.05, 1.15)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12 if handles else 0, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def budget_comparison(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each planned mix against every single code whose store fits in the planned store's bytes:
    which of them keeps more of the gain or of the worst task's negation (means over seeds), by one
    run of the protocol and at the full vectors' lambdas."""
    figures = (("gain_mean", "gain"), ("effect_min", "worst negation"))
    matched = (("gain_matched", "gain"), ("effect_matched_min", "worst negation"))

    def mean(rs: list[dict[str, Any]], k: str) -> float:
        return float(np.mean([r[k] for r in rs])) if all(k in r for r in rs) else float("nan")

    singles = {k: v for k, v in groups.items() if v[0]["config"]["kind"] == "single"}
    lines = [
        "| planned | bytes | single codes that fit | gain, worst negation (one run) | at matched lambdas "
        "| single codes keeping more (one run) | (matched lambdas) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rs in groups.items():
        if rs[0]["config"]["kind"] != "planned":
            continue
        size = max(r["bytes_ratio"] for r in rs)
        fit = {k: v for k, v in singles.items() if max(r["bytes_ratio"] for r in v) <= size}
        better = []
        for keys in (figures, matched):
            better.append(
                ", ".join(
                    f"{k} ({what} {mean(v, f):.3f} vs {mean(rs, f):.3f})"
                    for k, v in fit.items()
                    for f, what in keys
                    if round(mean(v, f), 3) > round(mean(rs, f), 3)  # as printed
                )
                or "none"
            )
        lines.append(
            f"| {label} | {100 * np.mean([r['bytes_ratio'] for r in rs]):.3g}% | {len(fit)} | "
            f"{mean(rs, 'gain_mean'):.3f}, {mean(rs, 'effect_min'):.3f} | "
            f"{mean(rs, 'gain_matched'):.3f}, {mean(rs, 'effect_matched_min'):.3f} | {better[0]} | {better[1]} |"
        )
    return lines


#: The issue's targets per budget: (gain kept, every task's negation kept), over validation draws.
TARGETS = {1 / 64: (0.99, 0.95), 1 / 256: (0.97, 0.90)}


def _target_of(budget: float | None) -> tuple[float, float] | None:
    return next((t for b, t in TARGETS.items() if budget is not None and math.isclose(budget, b, rel_tol=1e-3)), None)


def resampled_rows(out: Path) -> list[dict[str, Any]]:
    """``frontier_resampled.py``'s rows measured on the reference's draws (empty if it has not run)."""
    ref_path, rows_path = out / "resampled-reference.json", out / "resampled.jsonl"
    if not (ref_path.exists() and rows_path.exists()):
        return []
    settings = json.loads(ref_path.read_text())["settings"]
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["settings"] == settings]


def targets_table(rows: list[dict[str, Any]], labels: list[str] | None = None) -> list[str]:
    """Per store over the draws: bytes, gain and the worst task's negation with 95% intervals, and
    whether the budget's target is met (point estimates, as in docs/frontier.md)."""
    lines = [
        "| configuration | seed | bytes | gain kept [95%] | worst task's negation kept [95%] | met? |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if labels and r["config"]["label"] not in labels:
            continue
        worst = min(r["effect_resampled"], key=lambda t: r["effect_resampled"][t])
        lo, hi = r["gain_resampled_ci"]
        elo, ehi = r["effect_resampled_ci"][worst]
        target = _target_of(r["config"].get("budget"))
        met = "-"
        if target is not None:
            gain_ok, neg_ok = r["gain_resampled"] >= target[0], r["effect_resampled_min"] >= target[1]
            met = "**yes**" if gain_ok and neg_ok else "gain only" if gain_ok else "negation only" if neg_ok else "no"
        lines.append(
            f"| {r['config']['label']} | {r['config']['seed']} | {r['bytes_ratio']:.3%} | "
            f"{r['gain_resampled']:.3f} [{lo:.3f}, {hi:.3f}] | {r['effect_resampled_min']:.3f} ({worst}) "
            f"[{elo:.3f}, {ehi:.3f}] | {met} |"
        )
    return lines


def resampled_section(out: Path, ref: dict[str, Any]) -> list[str]:
    """The tables of ``frontier_resampled.py``'s figures, and how much the true vectors' own lambda moves."""
    rows = resampled_rows(out)
    if not rows:
        return []
    full = json.loads((out / "resampled-reference.json").read_text())
    st = full["settings"]
    lines = [
        "",
        f"## Averaged over {st['draws']} validation draws of {st['size']} examples per task (paired)",
        "",
        *frontier_table(ref, group(rows), gain="gain_resampled", effect="effect_resampled"),
        "",
        "Per store, with 95% intervals from resampling the test examples (paired):",
        "",
        *targets_table(rows),
    ]
    lines += [
        "",
        "The true vectors' own lambda over the draws (share of draws choosing the single run's lambda; "
        "expected test accuracy of the target at the chosen lambda, single run in brackets):",
        "",
        "| edit | single run's lambda | share of draws choosing it | most chosen | expected test acc |",
        "|---|---|---|---|---|",
    ]
    grid = list(LAMBDA_GRID)
    for t, row in full["negation"].items():
        single = ref["full_negation"][t]["lam"]
        choices = np.asarray(row["choices"])
        share = float(np.mean(choices == grid.index(single))) if single is not None else float("nan")
        top = np.bincount(choices, minlength=len(grid)).argmax()
        lines.append(
            f"| negate {t} | {single} | {share:.2f} | {grid[top]} | "
            f"{full['expected_test'][f'negate {t}'][t]:.3f} ({ref['full_negation'][t]['target_test']:.3f}) |"
        )
    return lines


def plot_resampled(out: Path, ref: dict[str, Any], groups: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """The true vectors' lambda over the draws (a heat map), and per task the negation kept by each
    resampled configuration as one run, at matched lambdas and over the draws (worst seed)."""
    full = json.loads((out / "resampled-reference.json").read_text())
    resampled = group(resampled_rows(out))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(full["negation"])
    grid = list(LAMBDA_GRID)
    fig, axes = plt.subplots(1, 1 + len(resampled), figsize=(6 + 5 * len(resampled), 4.5))
    axes = np.atleast_1d(axes)
    shares = np.array([np.bincount(full["negation"][t]["choices"], minlength=len(grid)) for t in names], float)
    shares /= shares.sum(axis=1, keepdims=True)
    im = axes[0].imshow(shares, aspect="auto", cmap="Blues", vmin=0, vmax=max(0.5, shares.max()))
    for i, t in enumerate(names):
        lam = ref["full_negation"][t]["lam"]
        if lam is not None:
            axes[0].plot(grid.index(lam), i, "x", color="tab:red")
    axes[0].set_yticks(range(len(names)), [f"negate {t}" for t in names], fontsize=8)
    axes[0].set_xticks(range(0, len(grid), 4), [f"{grid[i]:.1f}" for i in range(0, len(grid), 4)])
    axes[0].set_xlabel("lambda chosen (x: the single run on the first 64 examples)")
    axes[0].set_title(f"true vectors: lambda over {full['settings']['draws']} validation draws", fontsize=10)
    fig.colorbar(im, ax=axes[0], fraction=0.04, label="share of draws")
    x = np.arange(len(names))
    for ax, (label, rs) in zip(axes[1:], resampled.items(), strict=True):
        single = groups.get(label, [])
        bars = [
            ("one run", [min(r["effect"][t] for r in single) if single else np.nan for t in names]),
            (
                "matched lambda",
                [
                    min(r["effect_matched"][t] for r in single if "effect_matched" in r) if single else np.nan
                    for t in names
                ],
            ),
            ("over the draws", [min(r["effect_resampled"][t] for r in rs) for t in names]),
        ]
        for j, (name, ys) in enumerate(bars):
            ax.bar(x + (j - 1) * 0.27, ys, width=0.27, label=name)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_ylim(0, 1.2)
        ax.set_title(f"{label}\nnegation kept, worst of {len(rs)} seeds", fontsize=10)
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_targets(rows: list[dict[str, Any]], path: Path, labels: list[str] | None = None) -> None:
    """Per configuration (a panel each): every task's negation kept over the draws, a bar per seed
    with its 95% interval, the gain kept in the legend, and the budget's targets as lines."""
    groups = group([r for r in rows if not labels or r["config"]["label"] in labels])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (label, rs) in zip(axes[0], groups.items(), strict=True):
        names = list(rs[0]["effect_resampled"])
        x = np.arange(len(names))
        width = 0.8 / len(rs)
        for j, r in enumerate(rs):
            ys = np.array([r["effect_resampled"][t] for t in names])
            ci = np.array([r["effect_resampled_ci"][t] for t in names]).T
            ax.bar(
                x + (j - (len(rs) - 1) / 2) * width,
                ys,
                width=width,
                yerr=np.abs(ci - ys),
                capsize=2,
                label=f"seed {r['config']['seed']}: gain {r['gain_resampled']:.3f}",
            )
        target = _target_of(rs[0]["config"].get("budget"))
        if target is not None:
            ax.axhline(target[1], color="tab:red", linewidth=1, linestyle="--", label=f"target {target[1]:.2f}")
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0.6, 1.15)
        ax.set_ylabel("negation effect kept (over the draws)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_resampled_report(out: Path, labels: list[str] | None = None) -> list[str]:
    """``frontier_resampled.py --report``: the targets table and ``targets.png`` from its own files
    (no single-run results needed)."""
    rows = resampled_rows(out)
    if not rows:
        return [f"{out}: no resampled results yet (run benchmarks/frontier_resampled.py first)"]
    lines = targets_table(rows, labels)
    plot_targets(rows, out / "targets.png", labels)
    return [*lines, "", f"plot: {out / 'targets.png'}"]


def write_report(out: Path) -> None:
    ref, rows = load(out)
    groups = group(rows)
    lines = ["# Compression frontier on the text suite", ""]
    lines += frontier_table(ref, groups)
    matched = frontier_table(ref, groups, gain="gain_matched", effect="effect_matched")
    if len(matched) > 2:
        lines += ["", "## At the full vectors' lambdas (no lambda search)", "", *matched]
    lines += ["", "## Planned mixes against the single codes that fit in their bytes", "", *budget_comparison(groups)]
    lines += resampled_section(out, ref)
    lines += ["", "## Proxy check", ""]
    proxy_lines, table = proxy_check(out, groups)
    lines += proxy_lines
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "proxy.json").write_text(json.dumps(table, indent=2) + "\n")
    plot(groups, out / "frontier.png")
    if (out / "resampled.jsonl").exists() and (out / "resampled-reference.json").exists():
        plot_resampled(out, ref, groups, out / "resampled.png")
    print("\n".join(lines))
