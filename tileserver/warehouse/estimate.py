"""What a processing execution will write, judged before it runs: the slab shape and the bottom
level it may ask for, and the size of its output, estimated from the area it covers (the input
uploads' extent, or the harvest area) and the levels it builds.

The estimate is what the datastore's pyramid quota is checked (and reserved) against at creation
and launch; the worker still measures the real output while it runs and stops past the quota,
so an estimate that falls short cannot overrun it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tileserver.rok4.tms import TileMatrix, TileMatrixSet

MAX_SLAB_TILES = 64  # `width`/`height`: tiles per slab side (the platform's default is 16)
MAX_OVERSAMPLING = 8  # a bottom level's cell may be at most this many times finer than the images
# bytes stored per raw byte, by compression (tiles of real imagery; raw is exact)
RATIO = {"raw": 1.0, "none": 1.0, "zip": 0.6, "lzw": 0.6, "pkb": 0.8, "png": 0.6, "jpg": 0.15, "jpg90": 0.25}

BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class Source:
    """Where the inputs are: a lon/lat bbox, and the images' resolution in the CRS `srs` (if known)."""

    bbox: BBox
    srs: str | None = None
    resolution: float | None = None


def slab_problems(parameters: dict[str, Any]) -> list[str]:
    problems = []
    for key in ("width", "height"):
        value = parameters.get(key)
        if isinstance(value, int | str) and not isinstance(value, bool) and str(value).isdigit() \
                and int(value) > MAX_SLAB_TILES:
            problems.append(f"parameters.{key}: at most {MAX_SLAB_TILES} tiles per slab side (got {value})")
    return problems


def source_of_uploads(uploads: list[dict[str, Any]]) -> Source | None:
    """The union of the checked uploads' extents, and their finest resolution (their own CRS)."""
    boxes, resolutions, srs = [], [], None
    for body in uploads:
        ring = ((body.get("extent") or {}).get("coordinates") or [[]])[0]
        if len(ring) < 3:
            return None
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        boxes.append((min(xs), min(ys), max(xs), max(ys)))
        resolution = (body.get("type_infos") or {}).get("resolution")
        if isinstance(resolution, int | float) and resolution > 0:
            resolutions.append(float(resolution))
        srs = srs or body.get("srs")
    if not boxes:
        return None
    bbox = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    return Source(bbox, srs, min(resolutions) if resolutions else None)


def source_of_area(wkt: str) -> Source | None:
    from tileserver.writer.harvest import parse_wkt_polygons

    try:
        rings = parse_wkt_polygons(wkt)
    except Exception:  # already reported by the parameter checks
        return None
    xs = [float(x) for ring in rings for x in ring[:, 0]]
    ys = [float(y) for ring in rings for y in ring[:, 1]]
    return Source((min(xs), min(ys), max(xs), max(ys)))


def _grid_bbox(tms: TileMatrixSet, bbox: BBox) -> BBox:
    from tileserver.render.georef import reproject_bbox

    return reproject_bbox(bbox, "EPSG:4326", tms.crs)


def resolution_in_grid(tms: TileMatrixSet, source: Source) -> float | None:
    """The images' resolution in the grid's units (scaled by how the extent stretches between CRSs)."""
    if source.resolution is None or not source.srs:
        return None
    from tileserver.render.georef import reproject_bbox

    native = reproject_bbox(source.bbox, "EPSG:4326", source.srs)
    grid = _grid_bbox(tms, source.bbox)
    if native[2] <= native[0] or grid[2] <= grid[0]:
        return None
    return source.resolution * (grid[2] - grid[0]) / (native[2] - native[0])


def bottom_problems(tms: TileMatrixSet, bottom: TileMatrix | None, source: Source | None) -> list[str]:
    """A bottom level much finer than the images only multiplies the output (oversampling)."""
    if bottom is None or source is None:
        return []
    native = resolution_in_grid(tms, source)
    if native is None or bottom.cell_size * MAX_OVERSAMPLING >= native:
        return []
    advised = tms.level_for_resolution(native)
    return [f"parameters.bottom: level {bottom.id} (cell {bottom.cell_size:g}) is more than {MAX_OVERSAMPLING} times"
            f" finer than the delivered images ({native:g} in {tms.id} units): choose level {advised.id} or one"
            f" near it"]


def levels_built(tms: TileMatrixSet, bottom: TileMatrix | None, top: TileMatrix | None,
                 source: Source | None) -> list[TileMatrix]:
    """The levels a build writes: from the top (default: the coarsest) down to the bottom (default:
    the level nearest the images' resolution, as the writer picks it)."""
    if bottom is None and source is not None:
        native = resolution_in_grid(tms, source)
        bottom = tms.level_for_resolution(native) if native else None
    if bottom is None:
        return []
    upper = top.cell_size if top is not None else math.inf
    return [m for m in tms.matrices if bottom.cell_size * (1 - 1e-9) <= m.cell_size <= upper * (1 + 1e-9)]


def output_bytes(tms: TileMatrixSet, levels: list[TileMatrix], source: Source | None, channels: int,
                 sample_bytes: int, compression: str) -> int:
    """Tiles covering the area at each level × their size once compressed."""
    if source is None or not levels:
        return 0
    bbox = _grid_bbox(tms, source.bbox)
    ratio = RATIO.get(str(compression).lower(), 1.0)
    total = 0.0
    for matrix in levels:
        tiles = matrix.bbox_to_tile_range(bbox)
        if tiles is None:
            continue
        count = (tiles[2] - tiles[0] + 1) * (tiles[3] - tiles[1] + 1)
        total += count * matrix.tile_width * matrix.tile_height * channels * sample_bytes * ratio
    return int(total)
