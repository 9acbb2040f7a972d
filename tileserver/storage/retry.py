"""Retries with exponential back-off, shared by every backend and every S3 call.

Backends say *whether* a failure is worth another attempt by raising `TransientError`; this module
alone decides how many attempts, how long to wait, and which final exception the caller sees.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import StorageError, StorageTimeout

T = TypeVar("T")
log = logging.getLogger(__name__)


class TransientError(Exception):
    """One attempt failed in a way another attempt may fix (5xx, throttling, reset, timeout)."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int = 3  # attempts after the first
    backoff: float = 0.05  # seconds before the first retry, doubled each time (with jitter)
    timeout: float = 10.0  # per attempt; only quoted in messages, enforced by the transport

    def delay(self, attempt: int) -> float:
        """Back-off before retry number `attempt` (0-based): "equal jitter" around backoff * 2**n."""
        base = self.backoff * (2**attempt)
        return base / 2 + random.random() * base / 2

    async def run(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Await `attempt()` until it succeeds, raises a final error, or retries run out.

        `what` (e.g. ``"GET s3://bucket/key"``) heads the error message; it must not hold secrets.
        """
        last: TransientError | None = None
        for n in range(self.retries + 1):
            if n:
                await asyncio.sleep(self.delay(n - 1))
            try:
                return await attempt()
            except TransientError as exc:
                last = exc
                log.debug("%s: attempt %d failed: %s", what, n + 1, exc)
        assert last is not None
        attempts = self.retries + 1
        if last.timeout:
            raise StorageTimeout(
                f"{what}: no answer within {self.timeout:g} s ({attempts} attempt{'s' * (attempts > 1)})"
            ) from last
        raise StorageError(f"{what}: {last} ({attempts} attempt{'s' * (attempts > 1)})") from last
