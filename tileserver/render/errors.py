"""The errors of a render, each carrying the HTTP status it deserves.

Their own module because every step raises them (gate, fetch, drawing) and the services map
them to their protocol's error without knowing which step failed.
"""

from __future__ import annotations


class RenderError(Exception):
    """A render that cannot be done; `status` is the HTTP status it deserves."""

    status = 500
    retry_after: int | None = None  # seconds, for the Retry-After of a 503 worth retrying

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class RenderBusy(RenderError):
    """No render slot: the queue was full, or every slot stayed busy for the whole wait. Try again later."""

    status = 503
    retry_after = 2


class RenderTimeout(RenderBusy):
    """The render ran past its deadline (or its caller left): stopped at the next strip, 503."""


class RenderTooLarge(RenderError):
    """The request needs more source tiles or memory than one render may use: a client mistake."""

    status = 400


class RenderStorageError(RenderError):
    """Storage unavailable (503) or holding unreadable tiles (502)."""
