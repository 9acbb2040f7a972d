"""Storage failures.

A missing object is *not* an error (reads return None): only failures the server must report as
502/503 are exceptions. Messages name the path, never credentials or signed headers.
"""

from __future__ import annotations


class StorageError(Exception):
    """The storage could not answer (refused, unreachable, corrupt link…): not the same as absent."""


class StorageTimeout(StorageError):
    """The storage did not answer in time, even after retries."""


class LinkLoopError(StorageError):
    """A chain of links (symlinks or SYMLINK# objects) loops or is longer than allowed."""


class InvalidPathError(StorageError, ValueError):
    """A path that names no storage this server can use (bad syntax, unknown scheme or cluster)."""
