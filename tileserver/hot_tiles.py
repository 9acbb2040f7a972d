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


class HotTiles(BudgetCache[tuple[Any, bytes]]):
    """Tile bytes keyed by (slab index entry, tile number), within `budget` bytes."""

    def __init__(self, budget: int = 0) -> None:
        super().__init__(budget, lambda item: len(item[1]), largest_share=16)

    def tile(self, entry: Any, n: int) -> bytes | None:
        if not self.budget:
            return None
        item = self.get((id(entry), n))
        return None if item is None else item[1]

    def keep(self, entry: Any, n: int, data: bytes) -> None:
        # the entry is kept in the value: its id cannot be reused while the tile is held
        self.put((id(entry), n), (entry, data))


def held_on_object_storage(path: str) -> bool:
    """Whether tiles of this slab path are kept (object storage; FILE has the page cache)."""
    return path.startswith("s3://")
