"""Basis methods, one module each, behind the small interface in ``base``."""

from __future__ import annotations

from typing import Any

from tvbasis.errors import TvbasisError
from tvbasis.methods.autoencoder import Autoencoder
from tvbasis.methods.base import BasisMethod, least_squares_decoder, spectral_floor
from tvbasis.methods.cluster import Cluster
from tvbasis.methods.pca import PCA
from tvbasis.methods.random import RandomBasis
from tvbasis.methods.sample import Sample

METHODS: dict[str, type[BasisMethod]] = {cls.name: cls for cls in (Autoencoder, PCA, RandomBasis, Sample, Cluster)}


def make_method(name: str, n_atoms: int, **settings: Any) -> BasisMethod:
    """Instantiate a method by name with its settings; unknown names or settings are errors."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise TvbasisError(f"--method {name!r}: choose one of {', '.join(METHODS)}") from None
    try:
        return cls(n_atoms, **settings)
    except TypeError as exc:
        raise TvbasisError(f"--method {name}: {exc}") from None


__all__ = [
    "METHODS",
    "PCA",
    "Autoencoder",
    "BasisMethod",
    "Cluster",
    "RandomBasis",
    "Sample",
    "least_squares_decoder",
    "make_method",
    "spectral_floor",
]
