"""Saving and loading a trained composer: ``composer.json`` (what it is) + ``composer.safetensors`` (its weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from tvbasis.composition.coefficients import Composer, ComposerConfig
from tvbasis.errors import TvbasisError
from tvbasis.io.outputs import atomic_output

CONFIG_FILE = "composer.json"
WEIGHTS_FILE = "composer.safetensors"
FORMAT = "tvbasis-composer/1"


def save_composer(composer: Composer, out: str | Path, meta: dict[str, Any], overwrite: bool = False) -> Path:
    """Write a composer directory atomically; ``meta`` says what it composes (store, directions, blocks, data)."""
    out = Path(out)
    state = {k: v.detach().contiguous() for k, v in composer.state_dict().items()}
    doc = {
        "format": FORMAT,
        "config": composer.config.to_json(),
        "n_directions": composer.k,
        "n_blocks": composer.p,
        "n_features": composer.n_features,
        **meta,
    }
    with atomic_output(out, overwrite=overwrite, directory=True) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return out


def load_composer(path: str | Path) -> tuple[Composer, dict[str, Any]]:
    """The composer saved at ``path`` (in eval mode) and its JSON document."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise TvbasisError(f"{path}: not a composer directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        doc = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise TvbasisError(f"{cfg_file}: not valid JSON ({exc})") from None
    if doc.get("format") != FORMAT:
        raise TvbasisError(f"{cfg_file}: format {doc.get('format')!r}, this tvbasis reads {FORMAT}")
    config = ComposerConfig(**{**doc["config"], "temperature": tuple(doc["config"]["temperature"])})
    composer = Composer(config, int(doc["n_directions"]), int(doc["n_blocks"]), int(doc["n_features"]))
    state = load_file(str(weights))
    expected = set(composer.state_dict())
    if set(state) != expected:
        raise TvbasisError(
            f"{weights}: tensors {sorted(set(state) ^ expected)[:3]} do not fit a {config.kind} composer"
        )
    composer.load_state_dict(state)
    composer.eval()
    return composer, doc
