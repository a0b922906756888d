"""Plots for reports: where a picture says more than a table. Needs matplotlib (extra ``plots``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tvbasis.errors import TvbasisError


def _plt():  # imported lazily: plotting is optional and slow to import
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TvbasisError("plots need matplotlib: pip install 'tvbasis[plots]'") from None
    return plt


def _save(plt: object, fig: object, out: Path) -> Path:
    """Lay out, write the PNG and free the figure."""
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(out, dpi=120)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[attr-defined]
    return out


def plot_accuracy_vs_bytes(points: Sequence[Mapping[str, object]], reference: Mapping[str, float], out: Path) -> Path:
    """Mean normalised accuracy against stored bytes (share of the T fp32 task vectors), one marker per method.

    ``points``: dicts with ``method``, ``bytes_ratio`` and ``normalised``; ``reference``: label -> level
    drawn as horizontal lines (e.g. zero-shot and full task arithmetic).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = sorted({str(p["method"]) for p in points})
    markers = "osD^vP*X"
    for i, m in enumerate(methods):
        pts = sorted(
            (float(p["bytes_ratio"]), float(p["normalised"]), str(p.get("label", "")))
            for p in points
            if p["method"] == m
        )
        ax.plot([100 * x for x, _, _ in pts], [y for _, y, _ in pts], marker=markers[i % len(markers)], label=m)
        for x, y, lab in pts:
            if lab:
                ax.annotate(lab, (100 * x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for j, (label, level) in enumerate(reference.items()):
        ax.axhline(level, linestyle="--", color=f"C{len(methods) + j}", linewidth=1, label=label)
    ax.set_xlabel("bytes stored (% of the T fp32 task vectors)")
    ax.set_ylabel("mean normalised test accuracy")
    ax.set_title("Task addition: accuracy vs storage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out)


def plot_per_task_bars(
    tasks: Sequence[str], series: Mapping[str, Mapping[str, float]], out: Path, ylabel: str = "test accuracy"
) -> Path:
    """Grouped bars: one group per task, one bar per series (zero-shot, fine-tuned, each edit)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(tasks) + 2), 4.2))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(tasks))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, [values.get(t, np.nan) for t in tasks], width, label=label)
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, out)


def plot_cosine_heatmap(gram: np.ndarray, names: Sequence[str], out: Path) -> Path:
    """Pairwise cosine similarity of the task vectors, from the Gram matrix."""
    plt = _plt()
    norms = np.sqrt(np.clip(np.diag(gram), 1e-300, None))
    cos = gram / np.outer(norms, norms)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(names), 0.6 + 0.6 * len(names)))
    lim = max(float(np.abs(cos - np.eye(len(names))).max()), 1e-6)
    im = ax.imshow(cos, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="cosine (diagonal = 1, colour scale off-diagonal)")
    ax.set_title("Task vector cosine similarity")
    return _save(plt, fig, out)


def plot_spectrum(gram: np.ndarray, marks: Sequence[int], out: Path) -> Path:
    """Eigenvalue shares of ``G`` and the cumulative energy, with the chosen M marked."""
    plt = _plt()
    lam = np.clip(np.linalg.eigvalsh(gram)[::-1], 0, None)
    share = lam / lam.sum()
    k = np.arange(1, len(lam) + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.bar(k, share, color="C0", label="eigenvalue share")
    ax.plot(k, np.cumsum(share), "o-", color="C1", label="cumulative energy")
    for m in marks:
        ax.axvline(m + 0.5, color="C3", linestyle="--", linewidth=1)
        ax.annotate(f"M = {m}", (m + 0.5, 0.95), rotation=90, fontsize=8, ha="right", va="top")
    ax.set_xlabel("component")
    ax.set_ylabel("share of sum of eigenvalues of G")
    ax.set_xticks(k)
    ax.set_ylim(0, 1.02)
    ax.set_title("Gram spectrum: what a rank-M basis can keep")
    ax.legend(fontsize=8)
    return _save(plt, fig, out)
