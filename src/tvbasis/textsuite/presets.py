"""The built-in text-suite runs: ``tvbasis demo``, its ``--quick`` form, and the full benchmark matrix."""

from __future__ import annotations

from pathlib import Path

from tvbasis.io.cache_dirs import default_cache_dir
from tvbasis.textsuite.data import TASK_NAMES
from tvbasis.textsuite.suite import SuiteConfig


def default_cache() -> Path:
    """Where fine-tunes and derived models are cached: $TVBASIS_CACHE or ~/.cache/tvbasis."""
    return default_cache_dir()


def demo_config(out_dir: Path, cache_dir: Path) -> SuiteConfig:
    """The README's main job: 8 tasks on MiniLM-L6, autoencoder/pca/sample at M = 2 and 4."""
    return SuiteConfig(
        out_dir=out_dir,
        cache_dir=cache_dir,
        tasks=TASK_NAMES,
        model="minilm",
        methods=("autoencoder", "pca", "sample"),
        n_atoms=(2, 4),
        atoms_mode_methods=("autoencoder",),
        negation_targets=("word_sent", "lang_id", "name_gender"),
        negation_methods=("autoencoder", "pca"),
        control="wn_noun",
        val_limit=64,
        search="coarse-to-fine",
    )


def quick_config(out_dir: Path, cache_dir: Path) -> SuiteConfig:
    """Three tasks, the 3-layer model, few examples: a few minutes on 2 cores; used by the tests."""
    return SuiteConfig(
        out_dir=out_dir,
        cache_dir=cache_dir,
        tasks=("lang_id", "wn_noun", "word_sent"),
        model="small",
        methods=("autoencoder", "pca"),
        n_atoms=(2,),
        atoms_mode_methods=("autoencoder",),
        method_settings={"autoencoder": {"steps": 1000}},
        negation_targets=("wn_noun",),
        control="word_sent",
        val_limit=32,
        test_limit=96,
        data={"train_per_class": 16, "val_per_class": 8, "test_per_class": 16, "max_classes": 8},
        finetune={"max_steps": 20},
    )


def full_config(out_dir: Path, cache_dir: Path) -> SuiteConfig:
    """benchmarks/text_suite.py: every method, M = 2, 4, 6, both modes, every negation target, full grid."""
    return SuiteConfig(
        out_dir=out_dir,
        cache_dir=cache_dir,
        tasks=TASK_NAMES,
        model="minilm",
        methods=("autoencoder", "pca", "random", "sample", "cluster"),
        n_atoms=(2, 4, 6),
        atoms_mode_methods=("autoencoder", "pca", "random", "sample", "cluster"),
        negation_targets=TASK_NAMES,  # wn_noun, the control, is negated with wn_verb as its control
        control="wn_noun",
        val_limit=64,
        search="full",
    )
