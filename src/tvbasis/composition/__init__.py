"""Composition of task vectors or basis atoms with learned, possibly per-sample, coefficients (SPEC section 6).

- ``blocks``: which coefficient moves which tensor (model, layer or tensor granularity);
- ``directions``: the K directions, read from a store (its task vectors or its atoms);
- ``composed``: a frozen model run with per-sample coefficients, no per-sample weights;
- ``coefficients``: task arithmetic, aTLAS, per-sample and variational (spike-and-slab) composers;
- ``training``: the ELBO / task-loss fit; ``persist``: save and load; ``export``: edited models.
"""

from tvbasis.composition.blocks import GRANULARITIES, parameter_blocks
from tvbasis.composition.coefficients import KINDS, Coefficients, Composer, ComposerConfig
from tvbasis.composition.composed import ComposedModel
from tvbasis.composition.directions import Directions, load_directions, low_rank_factors
from tvbasis.composition.export import export_composition, vector_coefficients
from tvbasis.composition.persist import load_composer, save_composer
from tvbasis.composition.training import train_composer

__all__ = [
    "GRANULARITIES",
    "KINDS",
    "Coefficients",
    "ComposedModel",
    "Composer",
    "ComposerConfig",
    "Directions",
    "export_composition",
    "load_composer",
    "load_directions",
    "low_rank_factors",
    "parameter_blocks",
    "save_composer",
    "train_composer",
    "vector_coefficients",
]
