"""Features of a synchronous vector base read in one worker thread and handed to the event loop in
batches, so an answer streams a whole collection without holding it.

One dedicated thread per stream rather than `asyncio.to_thread` per batch: a database cursor (SQLite's
above all) must stay in the thread that opened it. The queue is bounded, so a slow client slows the
reader down instead of letting batches pile up; closing the stream (client gone) stops the reader.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from itertools import islice
from typing import Any

from tileserver.vector.base import Feature, Query, VectorBase

BATCH = 200  # features per hand-over: large enough to amortise a thread switch, small in memory
_END = object()


class FeatureStream:
    """`await first()` reads the first batch (errors surface there, before any byte is sent);
    `async for batch in stream` yields it and the rest."""

    def __init__(self, base: VectorBase, query: Query, batch: int = BATCH) -> None:
        self.base = base
        self.query = query
        self.batch = batch
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feature-stream", daemon=True)
        self._head: list[Feature] | None = None
        self._started = False

    def _put(self, item: Any) -> bool:
        """Hand an item over, waiting for room; False when the consumer has gone."""
        if self._stop.is_set():
            return False
        future = asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop)
        try:
            future.result()
        except Exception:  # the loop is closing
            return False
        return not self._stop.is_set()

    def _run(self) -> None:
        iterator: Iterator[Feature] | None = None
        try:
            iterator = iter(self.base.features(self.query))
            while not self._stop.is_set():
                chunk = list(islice(iterator, self.batch))
                if not chunk:
                    break
                if not self._put(chunk):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    async def _next(self) -> list[Feature] | None:
        if not self._started:
            self._started = True
            self._thread.start()
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    async def first(self) -> list[Feature]:
        """The first batch (empty at the end); raises what the base raises."""
        self._head = await self._next() or []
        return self._head

    async def __aiter__(self) -> AsyncIterator[list[Feature]]:
        try:
            if self._head is None:
                await self.first()
            assert self._head is not None
            if self._head:
                yield self._head
                while (chunk := await self._next()) is not None:
                    yield chunk
        finally:
            self.close()

    def close(self) -> None:
        """Stop the reader; drain so a reader blocked on a full queue wakes and sees the stop."""
        self._stop.set()
        while not self._queue.empty():
            self._queue.get_nowait()
