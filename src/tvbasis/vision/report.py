"""The vision-suite report: markdown tables (the text suite's) and plots when matplotlib is installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tvbasis.errors import TvbasisError
from tvbasis.evaluation.report import addition_table, negation_table, per_task_table, write_plots
from tvbasis.io.cache_dirs import write_text_atomic


def negation_rows(results: dict[str, Any]) -> tuple[str, list[str]]:
    """The negation table and the targets dropped by compression (control zero-shot from its own entry)."""
    zs_test = {**results["zero_shot"]["test"], **{c: v["test"] for c, v in results["control_zero_shot"].items()}}
    return negation_table({**results, "zero_shot": {**results["zero_shot"], "test": zs_test}})


def _plots(results: dict[str, Any], out_dir: Path) -> list[str]:
    """PNG plots beside the report; none (and a note) without matplotlib."""
    try:
        write_plots(results, out_dir)
    except TvbasisError as exc:  # matplotlib missing: the tables carry the results
        return [f"(no plots: {exc})"]
    return [
        "![accuracy vs bytes](accuracy_vs_bytes.png) ![per task](per_task.png)",
        "![cosine](cosine.png) ![spectrum](spectrum.png)",
    ]


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    """Write report.md (and its plots) under ``out_dir``; return the report's path."""
    names = results["task_names"]
    cfg = results["config"]
    gram = np.asarray(results["gram"])
    lam = np.clip(np.linalg.eigvalsh(gram)[::-1], 0, None)
    share = lam / lam.sum() if lam.sum() > 0 else lam
    neg, dropped = negation_rows(results) if results["negation"] else ("(no negation run)", [])
    t = results["timings_s"]
    plots = _plots(results, out_dir)
    tasks = "\n".join(
        f"| {n} | {v['classes']} | {v['train']} | {v['val']} | {v['test']} | "
        f"{'imported' if v['imported'] else 'fine-tuned here'} |"
        for n, v in results["tasks"].items()
    )
    controls = ", ".join(
        f"{c} (zero-shot val {v['val']:.3f}, test {v['test']:.3f})" for c, v in results["control_zero_shot"].items()
    )
    text = f"""# tvbasis vision suite report

Base model: `{results["base_model"]}` (image encoder `{results["base_image_encoder"]}`), device {results["device"]};
{len(names)} datasets under `{cfg["data_root"]}`. Lambda chosen on {cfg["val_limit"] or "all"} validation images per
dataset by a {cfg["search"]} search over 0, 0.05, ..., 1.0; test accuracy measured once
({cfg["test_limit"] or "all"} test images per dataset). Negation: lambda minimises the target's validation accuracy
while the control keeps at least {cfg["control_threshold"]:.0%} of its zero-shot accuracy;
controls: {controls or "none"}.
Bytes stored count every file of a store, relative to the {len(names)} task vectors in fp32.

| dataset | classes | train | val | test | fine-tune |
|---|---|---|---|---|---|
{tasks}

## Task addition (test)

{addition_table(results)}

Gain retained = (acc_edit - acc_zero_shot) / (acc_full - acc_zero_shot), per dataset then averaged.

### Per dataset (test accuracy)

{per_task_table(results)}

## Negation through the store (test)

{neg}

{"**Dropped by compression:** " + "; ".join(dropped) + "." if dropped else "No target was dropped by compression."}

## Task vectors

Gram eigenvalue shares: {", ".join(f"{x:.3f}" for x in share)}.

{chr(10).join(plots)}

Timings (s): fine-tuning {t["finetune"]:.0f}, denominators {t["denominators"]:.0f}, builds {t["build"]:.0f},
addition {t["addition"]:.0f}, negation {t["negation"]:.0f}, total {t["total"]:.0f}.
"""
    path = out_dir / "report.md"
    write_text_atomic(path, text)
    return path
