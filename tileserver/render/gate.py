"""Admission of renders: how many run at once, how much memory they hold together, how long each may take.

A per-process gate (`RenderGate`) admits a render by count *and* by its estimated memory against
a byte budget shared by all renders in flight; both are held until the worker thread finishes,
even when the request is cancelled. Renders that cannot start at once wait in a queue of bounded
depth (`queue_depth`): beyond it a render is refused at once (RenderBusy, 503 with Retry-After)
rather than after the wait, so an overload sheds its excess immediately and the renders admitted
to the queue keep a short latency. `Deadline` is the time one admitted render has, checked by
the worker thread between strips and layers. One place for the policy, so WMS and the tile
services share one budget (`gate_for`).
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import RenderBusy, RenderTimeout, RenderTooLarge

T = TypeVar("T")

DEFAULT_GATE_WAIT = 5.0  # seconds a render waits for a free slot before 503
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes all renders in flight in one process may use together
DEFAULT_RENDER_TIMEOUT = 20.0  # seconds one admitted render may take (fetch, draw, encode)
DEFAULT_QUEUE_DEPTH = 4  # renders that may wait for a slot; beyond it 503 at once


class RenderGate:
    """Admits renders by count and by estimated memory; both are held until the worker thread ends.

    `memory_budget` bytes are shared by every render in flight in this process: a render waits
    (FIFO, so a large map is not starved by small ones) until its estimate fits, at most `wait`
    seconds in all, then RenderBusy (503). A map whose estimate alone exceeds the budget can never
    run: RenderTooLarge (400). `timeout` is each admitted render's deadline (see `Deadline`).
    `queue_depth` renders at most may wait (for a slot or for memory); one more is refused at
    once (RenderBusy); None: no bound, only the wait."""

    def __init__(self, concurrency: int, wait: float = DEFAULT_GATE_WAIT, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 timeout: float | None = DEFAULT_RENDER_TIMEOUT, queue_depth: int | None = DEFAULT_QUEUE_DEPTH) -> None:
        self.concurrency = max(1, int(concurrency))
        self.wait = wait
        self.memory_budget = max(1, int(memory_budget))
        self.timeout = timeout if timeout and timeout > 0 else None
        self.queue_depth = None if queue_depth is None or queue_depth < 0 else int(queue_depth)
        self.waiting = 0  # renders in acquire that could not start at once
        self.shed = 0  # renders refused at once because the queue was full
        self._semaphore = asyncio.Semaphore(self.concurrency)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.bytes_in_use = 0
        self.busy_refusals = 0

    @property
    def in_use(self) -> int:
        return self.concurrency - self._semaphore._value  # noqa: SLF001 - read-only gauge

    async def acquire(self, nbytes: int = 0) -> None:
        """A slot and `nbytes` of the memory budget, within `wait` seconds."""
        if nbytes > self.memory_budget:
            raise RenderTooLarge(f"the map needs about {_mib(nbytes)} MiB to render, more than the "
                                 f"{_mib(self.memory_budget)} MiB a render may use; ask fewer pixels or fewer layers")
        if not self._waiters and not self._semaphore.locked() and self.bytes_in_use + nbytes <= self.memory_budget:
            self.bytes_in_use += nbytes  # the common case: room now, nothing to wait for
            await self._semaphore.acquire()  # a free slot and no waiter: returns without yielding
            return
        if self.queue_depth is not None and self.waiting >= self.queue_depth:
            self.busy_refusals += 1
            self.shed += 1
            raise RenderBusy(f"all {self.concurrency} render slots busy and {self.waiting} renders waiting; "
                             f"retry later")
        self.waiting += 1
        try:
            await self._queue(nbytes)
        finally:
            self.waiting -= 1

    async def _queue(self, nbytes: int) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.wait
        await self._take_bytes(nbytes, end)
        try:
            await asyncio.wait_for(self._semaphore.acquire(), max(0.0, end - loop.time()))
        except TimeoutError:
            self.release_bytes(nbytes)
            self.busy_refusals += 1
            raise RenderBusy(f"all {self.concurrency} render slots busy for {self.wait:g} s; retry later") from None
        except BaseException:
            self.release_bytes(nbytes)
            raise

    async def _take_bytes(self, nbytes: int, end: float) -> None:
        if not self._waiters and self.bytes_in_use + nbytes <= self.memory_budget:
            self.bytes_in_use += nbytes
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, granted)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), max(0.0, end - asyncio.get_running_loop().time()))
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                self.release_bytes(nbytes)  # granted just as we gave up: give it back
            else:
                granted.cancel()
                self._waiters.remove(entry)
                self._wake()  # the head may have been us, blocking smaller renders behind
            if isinstance(exc, TimeoutError):
                self.busy_refusals += 1
                raise RenderBusy(f"renders in flight hold {_mib(self.bytes_in_use)} of the {_mib(self.memory_budget)} "
                                 f"MiB render memory for {self.wait:g} s; retry later") from None
            raise

    def _wake(self) -> None:
        while self._waiters and self.bytes_in_use + self._waiters[0][0] <= self.memory_budget:
            nbytes, granted = self._waiters.popleft()
            self.bytes_in_use += nbytes
            granted.set_result(None)

    def release_bytes(self, nbytes: int) -> None:
        """Give back part of the memory budget (a render that needs less than it reserved, or ended)."""
        if nbytes:
            self.bytes_in_use -= nbytes
            self._wake()

    def release(self, nbytes: int = 0) -> None:
        self._semaphore.release()
        self.release_bytes(nbytes)

    async def run_in_thread(self, func: Callable[[], T], nbytes: int = 0, deadline: Deadline | None = None) -> T:
        """Run CPU work in the default executor; the caller holds a slot and `nbytes`, released
        when the thread ends (not when the request does). A cancelled caller cancels `deadline`,
        so the thread stops at its next check instead of finishing for nobody."""
        future = asyncio.get_running_loop().run_in_executor(None, func)
        future.add_done_callback(lambda _f: self.release(nbytes))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if deadline is not None:
                deadline.cancel()
            raise


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.0f}"


class Deadline:
    """When a render must stop. The work runs in a thread, which cannot be interrupted: it calls
    `check` between strips and layers, and stops there once the time is up or the caller left."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds if seconds else math.inf
        self.cancelled = False

    def remaining(self) -> float | None:
        return None if self.end == math.inf else max(0.0, self.end - time.monotonic())

    def cancel(self) -> None:
        self.cancelled = True

    def check(self) -> None:
        if self.cancelled:
            raise RenderTimeout("the render was abandoned")
        if time.monotonic() > self.end:
            raise RenderTimeout(f"the map took longer than {self.seconds:g} s to render; "
                                f"ask fewer pixels, fewer layers or a smaller area")


_GATES: weakref.WeakKeyDictionary[Any, RenderGate] = weakref.WeakKeyDictionary()


def gate_for(owner: Any, concurrency: int | None = None, wait: float | None = None) -> RenderGate:
    """The gate of an application (key: its Runtime); built on first use from its settings."""
    gate = _GATES.get(owner)
    if gate is None:
        settings = getattr(owner, "settings", None)
        configured: int = getattr(settings, "render_concurrency", 8)
        gate = RenderGate(
            concurrency or configured,
            wait if wait is not None else getattr(settings, "render_queue_wait", DEFAULT_GATE_WAIT),
            getattr(settings, "render_memory_budget", DEFAULT_MEMORY_BUDGET),
            getattr(settings, "render_timeout", DEFAULT_RENDER_TIMEOUT),
            getattr(settings, "render_queue_depth", DEFAULT_QUEUE_DEPTH),
        )
        _GATES[owner] = gate
    return gate
