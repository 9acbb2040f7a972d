"""The decoded-tile cache shared by renders: bounded in bytes, keyed by content, read-only."""

from __future__ import annotations

import numpy as np
import pytest

from tileserver.render.draw import DecodedTiles


def test_decoded_tiles_stay_within_their_budget_and_evict_the_least_recent():
    cache = DecodedTiles(budget=10_000)
    tiles = {i: np.full((10, 100), i, dtype=np.uint8) for i in range(12)}  # 1,000 bytes each
    for i, pixels in tiles.items():
        cache.keep(("k", i), pixels)
        if i == 3:
            assert cache.get(("k", 0)) is not None  # 0 becomes the most recent
    assert cache.held <= 10_000
    assert cache.get(("k", 0)) is not None and cache.get(("k", 1)) is None  # 1 was the least recent
    assert cache.get(("k", 11))[0, 0] == 11
    with pytest.raises(ValueError):
        cache.get(("k", 11))[0, 0] = 1  # shared between renders: read-only
    big = np.zeros(5_000, dtype=np.uint8)
    assert cache.keep(("big",), big) is big and cache.get(("big",)) is None  # over 1/8 of the budget: not kept
