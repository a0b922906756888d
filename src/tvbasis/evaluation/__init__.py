"""The papers' evaluation protocol: lambda selection, normalised accuracy, gain and effect retained."""

from tvbasis.evaluation.protocol import (
    LAMBDA_GRID,
    AdditionResult,
    NegationResult,
    effect_retained,
    gain_retained,
    search_addition,
    search_negation,
)

__all__ = [
    "LAMBDA_GRID",
    "AdditionResult",
    "NegationResult",
    "effect_retained",
    "gain_retained",
    "search_addition",
    "search_negation",
]
