"""Where a trained per-sample composer sends each task: mean coefficient per (task, direction), as a heatmap.

Reads a composer saved by ``tvbasis compose train`` and, for every task it was trained on, the
coefficients it gives that task's test items (deterministic, gated), averaged over blocks and
items; with a gate, also the share of coefficients it drops per task. Writes ``routing.png`` and
``routing.json`` under ``--out`` and prints the table.

    .venv/bin/tvbasis compose train --store STORE --kind variational --shots 16 --rank 16 --out C
    .venv/bin/python benchmarks/compose_routing.py C --out docs/composition
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tvbasis.composition import load_composer
from tvbasis.textsuite.compose import composition_from_meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("composer", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--test-limit", type=int, default=400)
    args = ap.parse_args()
    composer, meta = load_composer(args.composer)
    if not composer.per_sample:
        raise SystemExit(f"{args.composer}: a {composer.config.kind} composer gives every input the same coefficients")
    setting = composition_from_meta(meta, args.test_limit)
    tasks, labels = [t.name for t in setting.tasks], setting.directions.labels
    mean = np.zeros((len(tasks), len(labels)))
    dropped = np.zeros(len(tasks))
    with torch.no_grad():
        for i, name in enumerate(tasks):
            coef = composer(setting.features[(name, "test")])
            mean[i] = coef.z.mean((0, 2)).numpy()
            if coef.kept is not None:
                dropped[i] = 1.0 - float(coef.kept.float().mean())
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "composer": str(args.composer),
        "tasks": tasks,
        "directions": labels,
        "mean": mean.tolist(),
        "dropped": dropped.tolist(),
    }
    (args.out / "routing.json").write_text(json.dumps(doc, indent=2) + "\n")
    print("| task | " + " | ".join(labels) + " | dropped |")
    print("|---|" + "---|" * (len(labels) + 1))
    for i, name in enumerate(tasks):
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in mean[i]) + f" | {dropped[i]:.0%} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(labels), 0.8 + 0.45 * len(tasks)))
    lim = float(np.abs(mean).max()) or 1.0
    im = ax.imshow(mean, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), [f"{t} ({d:.0%} off)" for t, d in zip(tasks, dropped, strict=True)])
    ax.set_xlabel(f"direction ({meta['over']})")
    ax.set_title(f"{composer.config.kind} composer: mean coefficient per test item")
    for i in range(len(tasks)):
        for j in range(len(labels)):
            ax.text(j, i, f"{mean[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(args.out / "routing.png", dpi=120)
    print(f"wrote {args.out / 'routing.png'}")


if __name__ == "__main__":
    main()
