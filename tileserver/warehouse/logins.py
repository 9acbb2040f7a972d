"""The gate in front of password checks (`POST /api/token`): scrypt runs on its own small, bounded
executor, never on the default pool that rendering, SQLite and PROJ work share, and repeated
failures per login and per client address are answered 429 before any hashing.

scrypt costs ~50 ms of CPU and 16 MiB on purpose: without this gate a flood of wrong passwords
filled the default thread pool and made every GetMap wait behind it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from tileserver.settings import Settings

if TYPE_CHECKING:
    from .accounts import Accounts, User

MAX_TRACKED = 10000  # logins and addresses remembered at once (memory bound under a spray attack)


class TooManyAttempts(Exception):
    """Too many recent failures for this login or address; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int, what: str) -> None:
        super().__init__(f"too many failed attempts for this {what}")
        self.retry_after = retry_after
        self.what = what


class HashingBusy(Exception):
    """Every hashing thread is busy and the queue is full: come back in a second."""


class Failures:
    """Timestamps of recent failures per key, a sliding window of `window` seconds."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = max(1, limit)
        self.window = window
        self.seen: dict[str, deque[float]] = {}

    def retry_after(self, key: str, now: float) -> int:
        """Seconds until `key` may try again; 0 when it may now."""
        times = self.seen.get(key)
        if not times:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) < self.limit:
            return 0
        return max(1, math.ceil(times[0] + self.window - now))

    def add(self, key: str, now: float) -> None:
        if key not in self.seen and len(self.seen) >= MAX_TRACKED:
            self._prune(now)
        times = self.seen.setdefault(key, deque(maxlen=self.limit))
        times.append(now)

    def _prune(self, now: float) -> None:
        for key in [k for k, t in self.seen.items() if not t or t[-1] <= now - self.window]:
            del self.seen[key]
        if len(self.seen) >= MAX_TRACKED:  # still full: forget the oldest half
            for key in sorted(self.seen, key=lambda k: self.seen[k][-1])[: len(self.seen) // 2]:
                del self.seen[key]


class LoginGate:
    """One per server process (event-loop side only: no locking needed)."""

    def __init__(self, settings: Settings) -> None:
        threads = max(1, settings.warehouse_hash_threads)
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="password-hash")
        self.capacity = threads + max(0, settings.warehouse_hash_queue)
        self.pending = 0
        self.by_login = Failures(settings.warehouse_login_failures, settings.warehouse_login_window)
        self.by_address = Failures(settings.warehouse_address_failures, settings.warehouse_login_window)

    async def authenticate(self, accounts: Accounts, login: str, password: str, address: str) -> User | None:
        """The user, or None for wrong credentials (counted); raises TooManyAttempts or HashingBusy."""
        now = time.monotonic()
        for failures, key, what in ((self.by_address, address, "client address"), (self.by_login, login, "login")):
            wait = failures.retry_after(key, now)
            if wait:
                raise TooManyAttempts(wait, what)
        if self.pending >= self.capacity:
            raise HashingBusy()
        self.pending += 1
        try:
            user = await asyncio.get_running_loop().run_in_executor(self.executor, accounts.authenticate, login,
                                                                    password)
        finally:
            self.pending -= 1
        if user is None:
            now = time.monotonic()
            self.by_login.add(login, now)
            self.by_address.add(address, now)
        return user

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
