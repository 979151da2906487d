"""The one error type of the data stage."""

from __future__ import annotations


class DataError(ValueError):
    """A data problem the user can fix (bad path, empty corpus, stale shards); the message
    names the path and the fix, and the CLI prints it as one line."""
