"""The stored tiles a plan needs, read concurrently: the only I/O of a render.

Storage failures become `RenderStorageError` here (503 unavailable, 502 unreadable), so the
drawing never sees a storage exception.
"""

from __future__ import annotations

import asyncio

from tileserver.catalog import PublishedLayer
from tileserver.rok4.slab import NotASlabError
from tileserver.storage import StorageError

from .errors import RenderStorageError
from .levels import SourcePlan


async def fetch_tiles(published: PublishedLayer, plan: SourcePlan) -> dict[tuple[int, int], bytes]:
    """Stored bytes of every tile of the plan that has data, read concurrently."""
    if plan.tiles is None:
        return {}
    c0, r0, c1, r1 = plan.tiles
    keys = [(c, r) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
    try:
        blobs = await asyncio.gather(*(published.get_tile(plan.level, c, r) for c, r in keys))
    except NotASlabError as exc:
        raise RenderStorageError(f"layer {published.id}: stored data is unreadable ({exc})", 502) from exc
    except (StorageError, OSError) as exc:
        raise RenderStorageError(f"layer {published.id}: storage unavailable ({exc})", 503) from exc
    return {key: blob for key, blob in zip(keys, blobs, strict=True) if blob is not None}
