"""Storage failures.

A missing object is *not* an error (reads return None): only failures the server must report as
502/503 are exceptions. Messages name the path and the cause in one line, never credentials or
signed headers: callers log them as they are, without a traceback.
"""

from __future__ import annotations


class StorageError(Exception):
    """The storage could not answer (refused, unreachable, corrupt link…): not the same as absent."""


class StorageUnavailable(StorageError):
    """The storage is failing for now (retries exhausted, or its circuit is open): ask again later.

    `retry_after` (seconds) is what an HTTP answer puts in ``Retry-After``.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageTimeout(StorageUnavailable):
    """The storage did not answer within the deadline, retries included."""


class LinkLoopError(StorageError):
    """A chain of links (symlinks or SYMLINK# objects) loops or is longer than allowed."""


class InvalidPathError(StorageError, ValueError):
    """A path that names no storage this server can use (bad syntax, unknown scheme or cluster)."""
