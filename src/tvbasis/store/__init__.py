"""The store: a directory of safetensors atoms, small matrices and a JSON manifest."""

from tvbasis.store.format import MANIFEST, Store, open_store
from tvbasis.store.metrics import reconstruction_metrics

__all__ = ["MANIFEST", "Store", "open_store", "reconstruction_metrics"]
