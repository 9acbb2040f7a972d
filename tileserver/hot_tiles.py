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

from typing import Any

from tileserver.budget_cache import BudgetCache


class HotTiles:
    """Tile bytes keyed by (slab index entry, tile number), within `budget` bytes."""

    def __init__(self, budget: int = 0) -> None:
        # the entry is kept in the value: its id cannot be reused while the tile is held
        self._cache: BudgetCache[tuple[Any, bytes]] = BudgetCache(budget, lambda item: len(item[1]),
                                                                   largest_share=16)

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def budget(self) -> int:
        return self._cache.budget

    @property
    def held(self) -> int:
        return self._cache.held

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    def get(self, entry: Any, n: int) -> bytes | None:
        if not self._cache.budget:
            return None
        item = self._cache.get((id(entry), n))
        return None if item is None else item[1]

    def put(self, entry: Any, n: int, data: bytes) -> None:
        self._cache.put((id(entry), n), (entry, data))

    def resize(self, budget: int) -> None:
        """A new budget (the setting `object_tile_cache_bytes` over the workers); 0 keeps nothing."""
        self._cache.resize(budget)

    def clear(self) -> None:
        self._cache.clear()


def held_on_object_storage(path: str) -> bool:
    """Whether tiles of this slab path are kept (object storage; FILE has the page cache)."""
    return path.startswith("s3://")
