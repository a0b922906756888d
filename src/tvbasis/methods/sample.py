"""RandomSample basis: M task vectors chosen at random (seeded) serve as the atoms.

Unlike the reference code, every task is reconstructed: ``W = G_SS^+ G_S,:`` is the least
squares fit of all tasks on the chosen ones (refitted on the atoms as stored).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tvbasis.methods.base import BasisMethod, least_squares_decoder


class Sample(BasisMethod):
    name = "sample"
    decoder_from_atoms = True

    def fit(self, gram: np.ndarray) -> Sample:
        T = gram.shape[0]
        self.check_n_tasks(T)
        rng = np.random.default_rng(self.seed)
        self.indices_ = np.sort(rng.choice(T, size=self.n_atoms, replace=False))
        self.encoder_ = np.eye(T)[:, self.indices_]
        idx = self.indices_
        self.decoder_ = least_squares_decoder(gram[np.ix_(idx, idx)], gram[idx, :])
        return self

    def state_scalars(self) -> dict[str, Any]:
        return {**super().state_scalars(), "indices": [int(i) for i in self.indices_]}

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any], decoder: np.ndarray) -> None:
        super().load_state(arrays, scalars, decoder)
        self.indices_ = np.asarray(scalars.get("indices", []), dtype=np.int64)
