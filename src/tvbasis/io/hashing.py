"""Content hashes of tensor bytes.

The content hash of a sequence of tensors is the xxh3-128 of their own xxh3-128 digests in
order, so tensors can be hashed apart (on different workers) and combined in the end.

A store records a hash of each input's task-vector tensors so that ``edit`` can tell whether
it was given the base the store was built on. That hash sees every input byte of a build
(T + 1 models), so its speed matters: xxh3-128 runs at memory speed (over 10 GB/s on one
core) where sha256 manages 1 to 2 GB/s and would be the slowest stage of a build. It
identifies content against accident, not against an adversary; small metadata (the tensor
layout) keeps sha256.

A PEFT LoRA adapter given as a task is hashed per tensor of the task-vector layout as well:
for each tensor it changes, the bytes of its ``lora_A`` and ``lora_B`` factors as stored and
the scale and orientation they are combined with (``LowRank.digest_parts`` in
``tvbasis.io.lora``), nothing for the others. So a changed factor, ``lora_alpha``, ``r`` or
pattern changes the hash, while the config's other fields (paths, comments) do not.
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

#: The name the manifest records beside every content hash.
CONTENT_HASH = "xxh3-128"


class ContentHash:
    """The content hash of tensors fed in order: ``update`` with bytes, ``end_tensor`` after each."""

    def __init__(self) -> None:
        self._tensor = xxhash.xxh3_128()
        self.digests: list[bytes] = []  # one per completed tensor

    def update(self, data: object) -> None:
        self._tensor.update(data)  # type: ignore[arg-type]

    def end_tensor(self) -> None:
        self.digests.append(self._tensor.digest())
        self._tensor.reset()

    def hexdigest(self) -> str:
        return combine_digests(self.digests)


def combine_digests(digests: Iterable[bytes]) -> str:
    """The content hash of tensors from their digests, in order."""
    return xxhash.xxh3_128(b"".join(digests)).hexdigest()
