"""Tile bytes read from object storage, kept in memory within a byte budget (least recently used out).

A tile on S3 costs a ranged GET per read: against nginx on loopback ~130 µs of server CPU, where
a page-cached FILE tile costs ~2 µs (benchmarks/bench_s3.py); on a real object store, tens of
milliseconds and a billed request. Tiles are read far more often than slabs change, and the upper
levels of a pyramid are read by every map. FILE pyramids are not kept here: the kernel's page cache
already holds their bytes.

One lives beside each slab-index cache (`pyramid.SlabIndexCache.tiles`, sized by
`app.share_caches` from the setting `object_tile_cache_bytes` over the workers; off elsewhere), and
its entries belong to the index entry they were read through (`pyramid.CachedIndex`): when that
index expires and is read again, its tiles are read again too, so a rewritten slab is never served
stale for longer than its index already was (`index_cache_ttl`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class HotTiles:
    """LRU of tile bytes keyed by (slab index entry, tile number), within `budget` bytes."""

    def __init__(self, budget: int = 0) -> None:
        self.budget = max(0, budget)
        self.held = 0
        self.hits = 0
        self.misses = 0
        # the entry is kept in the value: its id cannot be reused while the tile is held
        self._items: OrderedDict[tuple[int, int], tuple[Any, bytes]] = OrderedDict()
        self._lock = threading.Lock()  # writers and harvests read tiles from their own threads' loops

    def __len__(self) -> int:
        return len(self._items)

    def get(self, entry: Any, n: int) -> bytes | None:
        if not self.budget:
            return None
        key = (id(entry), n)
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[1]

    def put(self, entry: Any, n: int, data: bytes) -> None:
        if len(data) > self.budget // 16:  # one tile never takes more than a sixteenth of the budget
            return
        key = (id(entry), n)
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (entry, data)
            self.held += len(data)
            self._trim()

    def resize(self, budget: int) -> None:
        """A new budget (the setting `object_tile_cache_bytes` over the workers); 0 keeps nothing."""
        with self._lock:
            self.budget = max(0, budget)
            self._trim()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.held = 0

    def _trim(self) -> None:
        while self.held > self.budget and self._items:
            _, (_, old) = self._items.popitem(last=False)
            self.held -= len(old)


def held_on_object_storage(path: str) -> bool:
    """Whether tiles of this slab path are kept (object storage; FILE has the page cache)."""
    return path.startswith("s3://")
