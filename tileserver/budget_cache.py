"""A least-recently-used cache bounded in bytes, for the per-process caches the settings size.

The decoded-tile cache of renders (`render.draw.DecodedTiles`) and the S3 tile bytes
(`hot_tiles.HotTiles`) keep different things under the same rules: a byte budget (0 keeps nothing),
the oldest use out first, no value larger than a share of the budget, one lock (renders run in
threads), hit and miss counts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class BudgetCache(Generic[V]):
    """Values within `budget` bytes (`size` of each), least recently used out."""

    def __init__(self, budget: int, size: Callable[[V], int], largest_share: int) -> None:
        self.budget = max(0, budget)
        self.held = 0
        self.hits = self.misses = 0
        self._size = size
        self._largest_share = largest_share  # a value above budget / largest_share is never kept
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.budget // self._largest_share

    def put(self, key: Hashable, value: V) -> None:
        """Keep `value` unless it is too large or `key` is already kept."""
        if not self.fits(self._size(value)):
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.held += self._size(value)
            self._trim()

    def resize(self, budget: int) -> None:
        """A new budget (from the settings, over the workers); 0 keeps nothing."""
        with self._lock:
            self.budget = max(0, budget)
            self._trim()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.held = 0

    def _trim(self) -> None:
        while self.held > self.budget and self._items:
            _, old = self._items.popitem(last=False)
            self.held -= self._size(old)
