"""The streaming engine: one pass over chunks of all T task vectors at a time."""

from tvbasis.engine.streaming import AtomStats, GramStats, atom_pass, gram_pass

__all__ = ["AtomStats", "GramStats", "atom_pass", "gram_pass"]
