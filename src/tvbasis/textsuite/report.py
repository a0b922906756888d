"""The text-suite report: a markdown table and plots, from ``results.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tvbasis.evaluation.report import DROPPED, addition_table, negation_table, per_task_table, write_plots


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    """Write report.md and the plots beside it; return the report's path."""
    names = results["task_names"]
    gram = np.asarray(results["gram"])
    cfg = results["config"]
    plots = write_plots(results, out_dir)
    neg, dropped = negation_table(results)
    lam = np.clip(np.linalg.eigvalsh(gram)[::-1], 0, None)
    share = lam / lam.sum()
    t = results["timings_s"]
    text = f"""# tvbasis text suite report

Base model: `{results["base_model"]}`; {len(names)} tasks; lambda chosen on {cfg["val_limit"] or "all"} validation
examples per task by a {cfg["search"]} search over 0, 0.05, ..., 1.0; test accuracy measured once.
Negation: lambda minimises the target's validation accuracy while the control ({cfg["control"]}) keeps at least
{cfg["control_threshold"]:.0%} of its zero-shot accuracy. Bytes stored count every file of a store, relative to the
{len(names)} task vectors in fp32.

## Task addition (test)

{addition_table(results)}

Gain retained = (acc_edit - acc_zero_shot) / (acc_full - acc_zero_shot), per task then averaged; it shows what
normalised accuracy hides when the base already scores well.

![accuracy vs bytes](accuracy_vs_bytes.png)

### Per task (test accuracy)

{per_task_table(results)}

![per task](per_task.png)

## Negation through the store (test)

{neg}

{"**Dropped by compression:** " + "; ".join(dropped) + "." if dropped else "No target was dropped by compression."}

## Task vectors

Gram eigenvalue shares: {", ".join(f"{x:.3f}" for x in share)}.

![cosine](cosine.png) ![spectrum](spectrum.png)

Timings (s): fine-tuning {t["finetune"]:.0f}, denominators {t["denominators"]:.0f}, builds {t["build"]:.0f},
addition {t["addition"]:.0f}, negation {t["negation"]:.0f}, total {t["total"]:.0f}.
"""
    path = out_dir / "report.md"
    path.write_text(text)
    assert all(p.exists() for p in plots.values())
    return path


__all__ = ["DROPPED", "addition_table", "negation_table", "per_task_table", "write_report"]
