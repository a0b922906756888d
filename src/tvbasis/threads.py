"""Thread settings for small tensor work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch on one thread inside the block, then restore its thread count.

    Per-chunk products and the autoencoder's T x T steps are small: waking a thread pool for
    each costs more than it saves, and far more when other processes hold the cores.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
