"""Parameter blocks: which coefficient of a direction moves which tensor.

A composition has one coefficient per direction and block (``z`` is ``K x P``). ``model`` is one
block for the whole model (plain task arithmetic's granularity); ``layer`` groups tensors by
transformer layer (embeddings, layer 0, 1, ..., everything else); ``tensor`` gives every tensor
its own block (aTLAS's granularity).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tvbasis.errors import TvbasisError

GRANULARITIES = ("model", "layer", "tensor")
_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|resblocks)\.(\d+)\.")


def _layer_label(name: str) -> str:
    m = _LAYER.search(name)
    if m is not None:
        return f"layer.{int(m.group(1))}"
    return "embeddings" if "embed" in name else "other"


def parameter_blocks(names: Sequence[str], granularity: str) -> tuple[list[str], dict[str, int]]:
    """Block labels in first-seen order, and each tensor name's block index."""
    if granularity not in GRANULARITIES:
        raise TvbasisError(f"--blocks {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    labels: list[str] = []
    index: dict[str, int] = {}
    for name in names:
        label = "all" if granularity == "model" else name if granularity == "tensor" else _layer_label(name)
        if label not in labels:
            labels.append(label)
        index[name] = labels.index(label)
    return labels, index
