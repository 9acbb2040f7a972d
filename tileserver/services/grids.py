"""The grids each layer is offered in: its own grid twice (the full TileMatrixSet and ROK4's published
range `<TMS>_<top>_<bottom>`), then its extra grids (`extra_tilematrixsets`, tiles reprojected on the
fly), each with the tile limits advertised per matrix. WMTS, TMS and OGC API Tiles offer these."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

from tileserver import transformers
from tileserver.catalog import Catalog, PublishedLayer
from tileserver.rok4.descriptor import TileLimits
from tileserver.rok4.tms import TileMatrix, TileMatrixSet, TMSError, load_tms


@dataclass(frozen=True)
class GridSet:
    """One advertised TileMatrixSet: an id, the grid it comes from, and which of its matrices."""

    id: str
    tms: TileMatrixSet
    matrices: tuple[TileMatrix, ...]
    limits: Mapping[str, TileLimits]  # advertised limits per matrix id
    native: bool = True  # False: an extra grid, tiles rendered (reprojected) on the fly
    extent: tuple[float, float, float, float] | None = None  # the layer's extent in this grid's CRS

    def matrix(self, matrix_id: str) -> TileMatrix | None:
        return next((m for m in self.matrices if m.id == matrix_id), None)


def _grid_sets(published: PublishedLayer) -> tuple[GridSet, ...]:
    """ROK4's `<TMS>_<top>_<bottom>` (matrices between the published extremes) first, then the full grid."""
    tms = published.tms
    top, bottom = published.matrix(published.top_level), published.matrix(published.bottom_level)
    ordered = tuple(sorted(tms.matrices, key=lambda m: -m.cell_size))
    tolerance = 1e-9
    subset = tuple(
        m
        for m in ordered
        if bottom.cell_size * (1 - tolerance) <= m.cell_size <= top.cell_size * (1 + tolerance)
    )
    limits = advertised_limits(published)
    extent = published.native_bbox
    native = (
        GridSet(f"{tms.id}_{published.top_level}_{published.bottom_level}", tms, subset, limits, extent=extent),
        GridSet(tms.id, tms, ordered, limits, extent=extent),
    )
    return native + tuple(extra_grids(published).values())


def tile_range(matrix: TileMatrix, bbox: tuple[float, float, float, float]) -> TileLimits | None:
    """Tiles of a matrix with a positive-area overlap with bbox, within the matrix; None if none.
    The tolerance is a fraction of a tile (not of a CRS unit): a bbox edge on a tile edge stays out."""
    xmin, ymin, xmax, ymax = bbox
    eps = 1e-9
    min_col = max(math.floor((xmin - matrix.origin_x) / matrix.tile_span_x + eps), 0)
    max_col = min(math.ceil((xmax - matrix.origin_x) / matrix.tile_span_x - eps) - 1, matrix.matrix_width - 1)
    min_row = max(math.floor((matrix.origin_y - ymax) / matrix.tile_span_y + eps), 0)
    max_row = min(math.ceil((matrix.origin_y - ymin) / matrix.tile_span_y - eps) - 1, matrix.matrix_height - 1)
    if min_col > max_col or min_row > max_row:
        return None
    return TileLimits(min_col, max_col, min_row, max_row)


def advertised_limits(published: PublishedLayer) -> dict[str, TileLimits]:
    """Each published level's limits widened to every tile touching the layer's extent (the bottom
    level's limits). A client such as GDAL reads the extent from the layer's BoundingBox and asks,
    at every level, for the tiles covering it: those must be inside the limits (else 400
    TileOutOfRange, which GDAL takes as a failure). A pyramid whose upper levels were cut tighter
    than its bottom one (RGEALTI level 7) gets nodata tiles there, as any tile without a slab."""
    out: dict[str, TileLimits] = {}
    for level, lim in published.limits.items():
        cover = tile_range(published.matrix(level), published.native_bbox)
        out[level] = lim if cover is None else lim.union(cover)
    return out


def _extra_grid(published: PublishedLayer, tms_id: str) -> GridSet | None:
    """An extra grid (`extra_tilematrixsets`): every matrix of the grid, as the native full grid has
    (a TileMatrixSet element is shared by every layer linking to its id, so each of its matrices must
    be served), with limits wherever the layer's extent falls. Tiles finer than the bottom level are
    the bottom level's data magnified, coarser than the top one its data reduced (render pipeline)."""
    directory = published.owners[published.bottom_level].tms_directory
    return _extra_grid_cached(tms_id, directory, tuple(published.wgs84_bbox))


@functools.lru_cache(maxsize=256)
def _extra_grid_cached(tms_id: str, directory: str, wgs84_bbox: tuple[float, ...]) -> GridSet | None:
    try:
        extra = load_tms(tms_id, directory)
    except TMSError:
        return None
    to_grid = transformers.transformer("EPSG:4326", extra.pyproj_crs)
    west, south, east, north = wgs84_bbox
    xmin, ymin, xmax, ymax = (float(v) for v in to_grid.transform_bounds(west, south, east, north, densify_pts=21))
    bbox = (xmin, ymin, xmax, ymax)
    if not all(math.isfinite(v) for v in bbox):
        return None
    matrices = tuple(sorted(extra.matrices, key=lambda m: -m.cell_size))
    limits = {m.id: tiles for m in matrices if (tiles := tile_range(m, bbox)) is not None}
    if not limits:
        return None
    return GridSet(extra.id, extra, matrices, limits, native=False, extent=bbox)


def extra_grids(published: PublishedLayer) -> dict[str, GridSet]:
    """A layer's extra grids that can be served (known grid, overlapping the layer), by id."""
    if published.format.is_vector:
        return {}
    found = (_extra_grid(published, t) for t in published.layer.extra_tilematrixsets if t != published.tms.id)
    return {g.id: g for g in found if g is not None}


def converted_formats(published: PublishedLayer) -> tuple[str, ...]:
    """Formats offered besides the native one, produced by the render pipeline."""
    if published.format.sample_format == "FLOAT32":
        return ()  # a DEM becomes a picture only through a style, not offered on plain tiles
    return tuple(f for f in ("image/png", "image/jpeg") if f != published.format.mime)


def grid_sets(catalog: Catalog, published: PublishedLayer) -> dict[str, GridSet]:
    """The sets a layer is offered in, by id; computed once per catalog snapshot."""
    return catalog.document(("wmts-grids", published.id), lambda: {g.id: g for g in _grid_sets(published)})
