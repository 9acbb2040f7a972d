"""A circuit breaker per storage endpoint: a failing storage is not asked again for a while.

Without it a stalled S3 holds every tile for the whole retry budget, and each waiting request holds
a connection, a slot and a client. After `threshold` consecutive failed attempts (5xx, throttling,
connection failures, timeouts) the circuit opens: calls fail at once with `StorageUnavailable` for
`cooldown` seconds. Then one call goes through as a probe (half-open): its success closes the
circuit, its failure opens it for another cool-down. Any answer from the storage, even 403 or 404,
counts as a success: the storage is there.
"""

from __future__ import annotations

import logging
import math
import time

from .errors import StorageUnavailable

log = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(self, name: str, threshold: int = 5, cooldown: float = 5.0) -> None:
        self.name = name
        self.threshold = threshold  # 0 or less: never opens
        self.cooldown = cooldown
        self.failures = 0  # consecutive
        self.reason = ""
        self._open_until = 0.0  # 0: closed
        self._probe_until = 0.0  # a probe is out until then (half-open)

    @property
    def is_open(self) -> bool:
        return self._open_until != 0.0

    def before(self, what: str) -> bool:
        """Raise StorageUnavailable while open; True when this call is the half-open probe."""
        if self._open_until == 0.0:
            return False
        now = time.monotonic()
        if now < self._open_until:
            self._refuse(what, self._open_until - now)
        if now < self._probe_until:  # another call is probing: wait for its outcome
            self._refuse(what, 1.0)
        self._probe_until = now + self.cooldown  # a probe lost (cancelled) frees the way after this
        return True

    def _refuse(self, what: str, wait: float) -> None:
        raise StorageUnavailable(
            f"{what}: {self.name} is failing ({self.reason}); not asked again for {math.ceil(wait)} s",
            retry_after=max(1.0, math.ceil(wait)),
        )

    def success(self) -> None:
        if self._open_until != 0.0:
            log.warning("storage %s answers again: circuit closed", self.name)
        self.failures = 0
        self._open_until = self._probe_until = 0.0

    def failure(self, reason: str) -> None:
        self.failures += 1
        self.reason = reason
        if self.threshold <= 0:
            return
        if self._open_until != 0.0 or self.failures >= self.threshold:
            if self._open_until == 0.0:
                log.warning("storage %s: %d failures in a row (last: %s); failing fast for %g s",
                            self.name, self.failures, reason, self.cooldown)
            self._open_until = time.monotonic() + self.cooldown
            self._probe_until = 0.0

    def release_probe(self) -> None:
        """The probe ended without an answer either way (cancelled): let the next call probe."""
        self._probe_until = 0.0
