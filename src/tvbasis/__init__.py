"""tvbasis: compress many task vectors of one base model into a small basis and do task arithmetic on it."""

__version__ = "0.1.0"
