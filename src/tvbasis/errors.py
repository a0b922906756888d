"""The one exception type users see.

Every failure caused by the user's input (a file, a tensor, an option) is raised as a
``TvbasisError`` whose message names the culprit; the CLI prints it on one line and exits
with status 2. Anything else escaping is a bug in tvbasis.
"""

from __future__ import annotations


class TvbasisError(Exception):
    """A problem with the user's input; the message says which file, tensor or option."""


class CheckpointError(TvbasisError):
    """A checkpoint cannot be read, or does not match the base."""


class StoreError(TvbasisError):
    """A store is missing, incomplete, corrupt or does not fit the request."""
