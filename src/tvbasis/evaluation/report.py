"""Report pieces both suites share: the addition, per-task and negation tables, and the plots.

They read a suite's ``results.json`` (``task_names``, ``zero_shot``, ``finetuned``, ``addition``,
``negation``, ``gram``, ``config``), which the text and vision suites write alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from tvbasis.evaluation.plots import plot_accuracy_vs_bytes, plot_cosine_heatmap, plot_per_task_bars, plot_spectrum

#: A negation keeping less than this share of the true vector's effect means the compression dropped the task.
DROPPED = 0.2


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _f(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _mean(values: Any) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def addition_table(results: dict[str, Any]) -> str:
    names = results["task_names"]
    zs, ft = results["zero_shot"]["test"], results["finetuned"]["test"]
    lines = [
        "| edit | bytes stored | lambda | mean acc | mean normalised acc | gain retained (mean) "
        "| gain retained (worst task) |",
        "|---|---|---|---|---|---|---|",
        f"| zero-shot base | 0 | - | {_f(_mean(zs.values()))} | {_f(_mean(zs[n] / ft[n] for n in names))} | 0 | - |",
        f"| fine-tuned, one model per task | - | - | {_f(_mean(ft.values()))} | 1.000 | - | - |",
    ]
    for label, row in results["addition"].items():
        gains = [row["gain_retained"][n] for n in names]
        worst = min((g for g in gains if not math.isnan(g)), default=float("nan"))
        lines.append(
            f"| {label} | {_pct(row['bytes_ratio'])} | {row['lam']:.2f} | {_f(_mean(row['test'].values()))} | "
            f"{_f(_mean(row['normalised'].values()))} | {_f(_mean(gains))} | {_f(worst)} |"
        )
    return "\n".join(lines)


def per_task_table(results: dict[str, Any]) -> str:
    names = results["task_names"]
    header = "| edit | " + " | ".join(names) + " |"
    lines = [header, "|---" * (len(names) + 1) + "|"]
    lines.append("| zero-shot | " + " | ".join(_f(results["zero_shot"]["test"][n]) for n in names) + " |")
    lines.append("| fine-tuned | " + " | ".join(_f(results["finetuned"]["test"][n]) for n in names) + " |")
    for label, row in results["addition"].items():
        lines.append(f"| {label} | " + " | ".join(_f(row["test"][n]) for n in names) + " |")
    return "\n".join(lines)


def negation_table(results: dict[str, Any]) -> tuple[str, list[str]]:
    zs = results["zero_shot"]["test"]
    lines = [
        "| target | edit | lambda | target acc (zero-shot -> edited) | control acc (zero-shot -> edited) "
        "| effect retained |",
        "|---|---|---|---|---|---|",
    ]
    dropped = []
    for target, rows in results["negation"].items():
        for label, row in rows.items():
            if row["lam"] is None:
                lines.append(f"| {target} | {label} | none | {row['reason']} | - | - |")
                continue
            eff = row.get("effect_retained")
            if eff is not None and label != "full task vectors" and eff < DROPPED:
                dropped.append(f"{label} drops {target} (effect retained {_f(eff)})")
            lines.append(
                f"| {target} | {label} | {row['lam']:.2f} | {_f(zs[target])} -> {_f(row['target_test'])} | "
                f"{row['control']} {_f(zs[row['control']])} -> {_f(row['control_test'])} | {_f(eff)} |"
            )
    return "\n".join(lines), dropped


def write_plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """The report's PNG plots under ``out_dir``, by file name (TvbasisError without matplotlib)."""
    names = results["task_names"]
    gram = np.asarray(results["gram"])
    return {
        "accuracy_vs_bytes.png": plot_accuracy_vs_bytes(
            [
                {
                    "method": r["method"],
                    "bytes_ratio": r["bytes_ratio"],
                    "normalised": _mean(r["normalised"].values()),
                    "label": f"M={r['n_atoms']}",
                }
                for r in results["addition"].values()
                if r["method"] != "full"
            ],
            {
                "full task vectors": _mean(results["addition"]["full task vectors"]["normalised"].values()),
                "zero-shot": _mean(results["zero_shot"]["test"][n] / results["finetuned"]["test"][n] for n in names),
            },
            out_dir / "accuracy_vs_bytes.png",
        ),
        "per_task.png": plot_per_task_bars(
            names,
            {
                "zero-shot": results["zero_shot"]["test"],
                "fine-tuned": results["finetuned"]["test"],
                **{k: v["test"] for k, v in results["addition"].items()},
            },
            out_dir / "per_task.png",
        ),
        "cosine.png": plot_cosine_heatmap(gram, names, out_dir / "cosine.png"),
        "spectrum.png": plot_spectrum(gram, list(results["config"]["n_atoms"]), out_dir / "spectrum.png"),
    }


__all__ = ["DROPPED", "addition_table", "negation_table", "per_task_table", "write_plots"]
