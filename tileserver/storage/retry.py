"""Retries with exponential back-off, shared by every backend and every S3 call.

Backends say *whether* a failure is worth another attempt by raising `TransientError`; this module
alone decides how many attempts, how long each may take, when to stop (the deadline bounds the
whole operation, retries included; an open circuit stops it at once), and which final exception
the caller sees.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .breaker import CircuitBreaker
from .errors import StorageTimeout, StorageUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)

# failures of this process's storage calls, read by tileserver/observability.py (plain ints: free
# on the hot path): attempts that failed and were retried or not, operations that failed after
# their retries, calls refused at once by an open circuit
STATS = {"attempt": 0, "operation": 0, "circuit_open": 0}


class TransientError(Exception):
    """One attempt failed in a way another attempt may fix (5xx, throttling, reset, timeout)."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int = 3  # attempts after the first
    backoff: float = 0.05  # seconds before the first retry, doubled each time (with jitter)
    timeout: float = 2.0  # one attempt of a read; enforced by the transport with the budget given
    deadline: float = 6.0  # the whole operation: no attempt starts, and no read attempt runs, past it

    def delay(self, attempt: int) -> float:
        """Back-off before retry number `attempt` (0-based): "equal jitter" around backoff * 2**n."""
        base = self.backoff * (2**attempt)
        return base / 2 + random.random() * base / 2

    async def run(self, what: str, attempt: Callable[[float], Awaitable[T]],
                  breaker: CircuitBreaker | None = None) -> T:
        """Await `attempt(budget)` until it succeeds, raises a final error, or retries run out.

        `budget` is the seconds this attempt may take (the attempt timeout, less near the deadline).
        `what` (e.g. ``"GET s3://bucket/key"``) heads the error message; it must not hold secrets.
        """
        started = time.monotonic()
        last: TransientError | None = None
        attempts = 0
        for n in range(self.retries + 1):
            if n:
                pause = self.delay(n - 1)
                if time.monotonic() + pause - started >= self.deadline:
                    break
                await asyncio.sleep(pause)
            budget = min(self.timeout, self.deadline - (time.monotonic() - started))
            probe = False
            if breaker is not None:
                try:
                    probe = breaker.before(what)
                except StorageUnavailable as exc:
                    STATS["circuit_open"] += 1
                    if last is not None:  # say what this operation itself met first
                        exc.args = (f"{what}: {last} ({attempts} attempt{'s' * (attempts > 1)}); "
                                    f"{exc.args[0].removeprefix(what + ': ')}",)
                    raise
            attempts += 1
            try:
                result = await attempt(budget)
            except TransientError as exc:
                last = exc
                STATS["attempt"] += 1
                if breaker is not None:
                    breaker.failure(str(exc))
                log.debug("%s: attempt %d failed: %s", what, n + 1, exc)
                continue
            except Exception:  # a final error (403, a bad link…) is still an answer from the storage
                if breaker is not None:
                    breaker.success()
                raise
            except BaseException:  # cancelled: no answer either way
                if breaker is not None and probe:
                    breaker.release_probe()
                raise
            if breaker is not None:
                breaker.success()
            return result
        assert last is not None
        STATS["operation"] += 1
        plural = "s" * (attempts > 1)
        if last.timeout:
            raise StorageTimeout(f"{what}: no answer within {self.timeout:g} s ({attempts} attempt{plural})") from last
        raise StorageUnavailable(f"{what}: {last} ({attempts} attempt{plural})") from last
