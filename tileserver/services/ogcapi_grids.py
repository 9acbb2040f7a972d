"""OGC API Tiles grids: the registered TileMatrixSets (WebMercatorQuad, WorldCRS84Quad) a pyramid's grid may match, and the grids each collection is offered in."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import pyproj

from tileserver.catalog import PublishedLayer
from tileserver.rok4.tms import TileMatrixSet, crs_uri
from tileserver.services.grids import extra_grids
from tileserver.services.ogcapi_common import REGISTERED

# --- registered grids -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def registered_definition(name: str) -> dict[str, Any]:
    """The OGC 2D-TMS 2.0 definition of a registered grid, as morecantile ships it."""
    text = (resources.files("morecantile") / "data" / f"{name}.json").read_text()
    return json.loads(text)


def _same(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance


def _matches(tms: TileMatrixSet, name: str) -> bool:
    """Same CRS (axis order aside) and, level by level, same cell size, origin, tile and matrix sizes."""
    definition = registered_definition(name)
    try:
        if not tms.pyproj_crs.equals(pyproj.CRS.from_user_input(definition["crs"]), ignore_axis_order=True):
            return False
    except pyproj.exceptions.CRSError:
        return False
    lat_first = [a.lower() for a in definition.get("orderedAxes", ["x", "y"])][0] in ("lat", "y_lat", "n")
    matrices = {m["id"]: m for m in definition["tileMatrices"]}
    for mine in tms.matrices:
        theirs = matrices.get(mine.id)
        if theirs is None:
            return False
        ox, oy = theirs["pointOfOrigin"][::-1] if lat_first else theirs["pointOfOrigin"]
        pixel = mine.cell_size * 1e-3  # a thousandth of a pixel: ROK4 files carry fewer digits
        if not (
            _same(mine.cell_size, theirs["cellSize"], mine.cell_size * 1e-9)
            and _same(mine.origin_x, ox, pixel)
            and _same(mine.origin_y, oy, pixel)
            and (mine.tile_width, mine.tile_height) == (theirs["tileWidth"], theirs["tileHeight"])
            and (mine.matrix_width, mine.matrix_height) == (theirs["matrixWidth"], theirs["matrixHeight"])
        ):
            return False
    return True


@functools.lru_cache(maxsize=64)
def registered_alias(tms: TileMatrixSet) -> str | None:
    """The registered grid this ROK4 grid is numerically identical to, if any."""
    return next((name for name in REGISTERED if _matches(tms, name)), None)


def native_grid_ids(published: PublishedLayer) -> tuple[str, ...]:
    """Ids of the pyramid's own grid: the ROK4 id, then the registered alias."""
    alias = registered_alias(published.tms)
    return (published.tms.id, alias) if alias and alias != published.tms.id else (published.tms.id,)


def grid_ids(published: PublishedLayer) -> tuple[str, ...]:
    """Ids a layer's tiles answer under: its own grid's, then its extra (reprojected) grids."""
    native = native_grid_ids(published)
    return native + tuple(g for g in extra_grids(published) if g not in native)


def extra_grid(published: PublishedLayer, grid_id: str) -> Any:
    """The extra grid a tileset id names, or None for the pyramid's own grid."""
    return None if grid_id in native_grid_ids(published) else extra_grids(published).get(grid_id)


def grid_crs(published: PublishedLayer, grid_id: str) -> str:
    extra = extra_grid(published, grid_id)
    if extra is not None:
        return crs_uri(extra.tms.crs)
    if grid_id in REGISTERED and grid_id != published.tms.id:
        return registered_definition(grid_id)["crs"]
    return crs_uri(published.tms.crs)
