"""Async access to one ROK4 pyramid: descriptor + grid + storage + a shared slab-index cache.

A tile costs one storage read when its slab index is cached, two otherwise; concurrent requests
for tiles of one cold slab share a single index read (single-flight).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tileserver import transformers
from tileserver.hot_tiles import HotTiles, held_on_object_storage
from tileserver.rok4.codecs import decode_tile
from tileserver.rok4.descriptor import Descriptor, DescriptorError, Level, check_against_tms, parse_descriptor
from tileserver.rok4.slab import SlabIndex, index_size, parse_index
from tileserver.rok4.tms import TileMatrix, TileMatrixSet, load_tms
from tileserver.settings import load_settings
from tileserver.storage import Storage

_SLAB_PATHS = 4096  # slab names remembered per pyramid


class PyramidError(ValueError):
    """A pyramid that cannot be opened or a request it cannot answer (unknown level)."""


@dataclass(frozen=True)
class _Absent:
    """Cached marker: the slab does not exist (no data), remembered for the cache TTL."""


ABSENT = _Absent()


@dataclass(frozen=True)
class CachedIndex:
    path: str  # where the tiles really are (after following links)
    index: SlabIndex


class SlabIndexCache:
    """Size- and TTL-bounded cache of slab indexes, shared by every pyramid of a process.

    A plain dict of (expiry, entry): a hit costs a lookup and a clock read, where cachetools'
    TTLCache took ~3 µs a tile. When full, expired entries go first, else the oldest stored.
    """

    def __init__(self, maxsize: int = 10000, ttl: float = 300.0) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self._entries: dict[str, tuple[float, CachedIndex | _Absent]] = {}
        self._inflight: dict[str, asyncio.Future[CachedIndex | _Absent]] = {}
        self.hits = 0
        self.misses = 0
        self.tiles = HotTiles()  # object-storage tile bytes read through these entries (off: 0 bytes)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def peek(self, key: str) -> CachedIndex | _Absent | None:
        """The cached entry, or None when absent or expired (then `get` loads it)."""
        item = self._entries.get(key)
        if item is not None and item[0] > time.monotonic():
            self.hits += 1
            return item[1]
        return None

    def _store(self, key: str, entry: CachedIndex | _Absent) -> None:
        if self.maxsize <= 0:
            return
        now = time.monotonic()
        self._entries.pop(key, None)
        if len(self._entries) >= self.maxsize:
            expired = [k for k, (expires, _) in self._entries.items() if expires <= now]
            for k in expired or [next(iter(self._entries))]:
                del self._entries[k]
        self._entries[key] = (now + self.ttl, entry)

    async def get(self, key: str, load: Callable[[], Awaitable[CachedIndex | _Absent]]) -> CachedIndex | _Absent:
        entry = self.peek(key)
        if entry is not None:
            return entry
        pending = self._inflight.get(key)
        if pending is not None:
            self.hits += 1
            return await asyncio.shield(pending)
        self.misses += 1
        future: asyncio.Future[CachedIndex | _Absent] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            entry = await load()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        else:
            self._store(key, entry)
            future.set_result(entry)
            return entry
        finally:
            del self._inflight[key]


def split_descriptor_url(url: str) -> tuple[str, str]:
    """(root, name) of `<root>/<name>.json`; the root keeps the scheme and the S3 cluster."""
    if not url.endswith(".json"):
        raise PyramidError(f"{url}: a pyramid descriptor path must end with .json")
    root, _, file_name = url.rpartition("/")
    return root, file_name[: -len(".json")]


class Pyramid:
    """One opened pyramid. Build with `await Pyramid.open(url, storage, ...)`."""

    def __init__(
        self, url: str, descriptor: Descriptor, tms: TileMatrixSet, storage: Storage, cache: SlabIndexCache
    ) -> None:
        self.url = url
        self.descriptor = descriptor
        self.tms = tms
        self.storage = storage
        self.cache = cache
        self.root, self.name = split_descriptor_url(url)
        self.format = descriptor.format
        self._slab_base = self._compute_slab_base()
        # slab names cost ~8 µs to build (base 36, joins) and every tile of a slab needs the same one
        self._slab_paths: dict[tuple[str, int, int, bool], str] = {}
        self.tms_directory = ""
        self._levels = {level.id: level for level in descriptor.levels}

    @classmethod
    async def open(
        cls, url: str, storage: Storage, cache: SlabIndexCache | None = None, tms_directory: str | None = None
    ) -> Pyramid:
        url = normalise_url(url)
        split_descriptor_url(url)
        raw = await storage.read_all(url)
        if raw is None:
            raise PyramidError(f"{url}: no such pyramid descriptor")
        try:
            descriptor = parse_descriptor(raw)
            tms = load_tms(descriptor.tile_matrix_set, tms_directory)
            check_against_tms(descriptor, tms)
        except (DescriptorError, ValueError) as exc:
            raise PyramidError(f"{url}: {exc}") from None
        pyramid = cls(url, descriptor, tms, storage, cache if cache is not None else SlabIndexCache())
        pyramid.tms_directory = tms_directory or load_settings().tms_directory  # where its extra grids are looked up
        return pyramid

    # --- naming ---------------------------------------------------------------------------------

    def _compute_slab_base(self) -> str:
        """Prefix that a level's slab name is appended to."""
        if self.descriptor.storage_type == "FILE":
            return self.root + "/"
        scheme, _, rest = self.root.partition("://")
        container = rest.split("/", 1)[0]
        cluster = container.partition("@")[2]
        return f"{scheme}://{{container}}{'@' + cluster if cluster else ''}/"

    def slab_path(self, level: Level, slab_col: int, slab_row: int, mask: bool = False) -> str:
        key = (level.id, slab_col, slab_row, mask)
        path = self._slab_paths.get(key)
        if path is None:
            if len(self._slab_paths) >= _SLAB_PATHS:
                self._slab_paths.clear()  # rebuilt on demand: only names, cheap to make again
            path = self._slab_paths[key] = self._build_slab_path(level, slab_col, slab_row, mask)
        return path

    def _build_slab_path(self, level: Level, slab_col: int, slab_row: int, mask: bool) -> str:
        name = level.storage.slab_name(slab_col, slab_row, mask)
        if level.storage.type == "FILE":
            if name.startswith("/"):
                return ("file://" if self.root.startswith("file://") else "") + name
            return self._slab_base + name.removeprefix("./")
        return self._slab_base.format(container=level.storage.container) + name

    # --- grid -----------------------------------------------------------------------------------

    def level(self, level_id: str) -> Level:
        level = self.descriptor.level(str(level_id))
        if level is None:
            raise PyramidError(f"{self.url}: no level {level_id!r}")
        return level

    def matrix(self, level_id: str) -> TileMatrix:
        matrix = self.tms.get(str(level_id))
        assert matrix is not None  # checked at open
        return matrix

    @property
    def bottom_level(self) -> Level:
        return min(self.descriptor.levels, key=lambda lv: self.matrix(lv.id).cell_size)

    @property
    def top_level(self) -> Level:
        return max(self.descriptor.levels, key=lambda lv: self.matrix(lv.id).cell_size)

    def level_bbox(self, level_id: str) -> tuple[float, float, float, float]:
        """Extent of a level's tile limits in the grid's CRS, easting first."""
        lim = self.level(level_id).tile_limits
        return self.matrix(level_id).range_bbox(lim.min_col, lim.min_row, lim.max_col, lim.max_row)

    def wgs84_bbox(self, level_id: str | None = None) -> tuple[float, float, float, float]:
        """(west, south, east, north) in degrees of a level (default: the bottom level)."""
        bbox = self.level_bbox(level_id or self.bottom_level.id)
        transformer = transformers.transformer(self.tms.pyproj_crs, "EPSG:4326")
        west, south, east, north = transformer.transform_bounds(*bbox, densify_pts=21)
        if not all(math.isfinite(v) for v in (west, south, east, north)):
            return (-180.0, -90.0, 180.0, 90.0)
        return (max(west, -180.0), max(south, -90.0), min(east, 180.0), min(north, 90.0))

    # --- tiles ----------------------------------------------------------------------------------

    async def _load_index(self, path: str, n_tiles: int) -> CachedIndex | _Absent:
        real_path, data = await self.storage.read_resolving_links(path, 0, index_size(n_tiles))
        if data is None:
            return ABSENT
        return CachedIndex(real_path, parse_index(data, n_tiles, name=path))

    async def slab_index(self, level: Level, slab_col: int, slab_row: int) -> CachedIndex | None:
        path = self.slab_path(level, slab_col, slab_row)
        entry = self.cache.peek(path) or await self.cache.get(path, lambda: self._load_index(path, level.tiles_per_slab))
        return None if entry is ABSENT else entry  # type: ignore[return-value]

    async def get_tile(self, level_id: str, col: int, row: int) -> bytes | None:
        """Encoded tile as stored, or None (outside the limits, slab absent, empty tile)."""
        level = self._levels.get(level_id) or self.level(level_id)
        if not level.tile_limits.contains(col, row):
            return None
        slab_col, slab_row, n = level.slab_of(col, row)
        cached = await self.slab_index(level, slab_col, slab_row)
        if cached is None:
            return None
        size = cached.index.sizes[n]
        if size == 0:
            return None
        if not held_on_object_storage(cached.path):
            return await self.storage.read(cached.path, cached.index.offsets[n], size)
        data = self.cache.tiles.tile(cached, n)
        if data is None:
            data = await self.storage.read(cached.path, cached.index.offsets[n], size)
            if data is not None and len(data) == size:  # a whole tile; a cut one is read again next time
                self.cache.tiles.keep(cached, n, data)
        return data

    def decode(self, level_id: str, data: bytes) -> np.ndarray:
        matrix = self.matrix(level_id)
        return decode_tile(
            data,
            self.format.compression,
            matrix.tile_width,
            matrix.tile_height,
            self.descriptor.channels,
            np.dtype(self.format.dtype),
        )

    async def get_tile_array(self, level_id: str, col: int, row: int) -> np.ndarray | None:
        """Tile pixels (H, W, channels) in the pyramid's sample type, or None."""
        if self.format.is_vector:
            raise PyramidError(f"{self.url}: a vector pyramid has no pixels")
        data = await self.get_tile(level_id, col, row)
        if data is None:
            return None
        return self.decode(level_id, data)

    def nodata_array(self, level_id: str) -> np.ndarray:
        matrix = self.matrix(level_id)
        nodata = np.asarray(self.descriptor.nodata, dtype=self.format.dtype)
        return np.broadcast_to(nodata, (matrix.tile_height, matrix.tile_width, len(nodata))).copy()

    def summary(self) -> dict[str, Any]:
        """What `pyramid info` prints and what a stored data shows."""
        levels = []
        for level in sorted(self.descriptor.levels, key=lambda lv: -self.matrix(lv.id).cell_size):
            lim = level.tile_limits
            levels.append(
                {
                    "id": level.id,
                    "resolution": self.matrix(level.id).cell_size,
                    "tile_limits": lim.to_dict(),
                    "tiles_per_slab": [level.tiles_per_width, level.tiles_per_height],
                    "bbox": list(self.level_bbox(level.id)),
                }
            )
        return {
            "url": self.url,
            "name": self.name,
            "format": self.format.code,
            "tile_matrix_set": self.tms.id,
            "crs": self.tms.crs,
            "channels": self.descriptor.channels,
            "nodata": list(self.descriptor.nodata),
            "top_level": self.top_level.id,
            "bottom_level": self.bottom_level.id,
            "bbox": list(self.level_bbox(self.bottom_level.id)),
            "wgs84_bbox": list(self.wgs84_bbox()),
            "levels": levels,
        }


def normalise_url(url: str) -> str:
    """Plain relative paths become absolute so slab paths resolve the same from any cwd."""
    if "://" in url:
        return url
    import os

    return os.path.abspath(url)
