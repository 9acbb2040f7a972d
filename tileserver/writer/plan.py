"""Which levels a pyramid gets and which slabs of each level have to be computed.

Levels run bottom (finest) → top (coarsest). The bottom level's slabs are those touching a
source's footprint reprojected into the grid; each upper level's are those covering a slab
written in the level below. Shards take a deterministic share of a level's slabs, by blocks of
neighbouring slabs so a shard's upper-level parents stay few.

The footprint and the tiles it claims follow ROK4's be4 (`ROK4::Core::ProxyGDAL::convertBBox`,
`ROK4::Core::TileMatrix::bboxToIndices`, `ROK4::Core::LevelRaster::updateLimitsFromBbox`), so the
same sources give the same tile limits as a be4 pyramid, which an update may be built upon.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from tileserver.render.georef import crs_equal, get_transformer, reproject_bbox
from tileserver.rok4.tms import TileMatrix, TileMatrixSet

from .errors import WriterError
from .sources import SourceInfo

BBox = tuple[float, float, float, float]
Slab = tuple[int, int]
_SHARD_BLOCK = 8  # slabs per side of a shard block
_BE4_EDGE_CUTS = 10  # be4 (ProxyGDAL.geometryFromBbox) cuts each edge of the image in 10 to reproject it
_BE4_X_MARGIN = 0.02  # be4 (ProxyGDAL.convertBBox) widens a reprojected envelope by 2 % of its width
_EDGE_TOLERANCE = 1e-9  # relative: a float this close to a tile edge is on it (be4 computes in decimals)


def source_resolution(source: SourceInfo, crs: str) -> float:
    """Pixel size of `source` measured in `crs` at the image's centre (geometric mean of x and y)."""
    cx, cy = source.x0 + source.width * source.res_x / 2, source.y0 - source.height * source.res_y / 2
    dx, dy = source.res_x / 2, source.res_y / 2
    transformer = get_transformer(source.crs, crs)
    xs, ys = transformer.transform([cx - dx, cx + dx, cx, cx], [cy, cy, cy - dy, cy + dy], errcheck=False)
    rx = math.hypot(xs[1] - xs[0], ys[1] - ys[0])
    ry = math.hypot(xs[3] - xs[2], ys[3] - ys[2])
    if not (math.isfinite(rx) and math.isfinite(ry)) or rx <= 0 or ry <= 0:
        raise WriterError(f"{source.path}: its resolution cannot be measured in {crs}")
    return math.sqrt(rx * ry)


def select_levels(tms: TileMatrixSet, bottom: str | None, top: str | None,
                  sources: Sequence[SourceInfo] = ()) -> list[TileMatrix]:
    """Matrices from bottom to top. Default bottom: the level nearest the finest source resolution
    in the grid's CRS (ROK4's AUTO); default top: the grid's coarsest level."""
    ordered = sorted(tms.matrices, key=lambda m: m.cell_size)
    if bottom is None:
        if not sources:
            raise WriterError("--bottom is required without sources")
        resolution = min(source_resolution(s, tms.crs) for s in sources)
        bottom_m = tms.level_for_resolution(resolution)
    else:
        bottom_m = _matrix(tms, bottom, "--bottom")
    top_m = ordered[-1] if top is None else _matrix(tms, top, "--top")
    if top_m.cell_size < bottom_m.cell_size:
        raise WriterError(f"bottom level {bottom_m.id} is above top level {top_m.id} in {tms.id}")
    return [m for m in ordered if bottom_m.cell_size <= m.cell_size <= top_m.cell_size]


def _matrix(tms: TileMatrixSet, level: str, option: str) -> TileMatrix:
    matrix = tms.get(str(level))
    if matrix is None:
        ids = ", ".join(m.id for m in tms.matrices)
        raise WriterError(f"{option} {level!r}: no such level in tile matrix set {tms.id} ({ids})")
    return matrix


def source_footprint(source: SourceInfo, crs: str) -> BBox:
    """The source's extent in the grid's `crs`, as be4 computes it (`convertBBox`).

    In its own CRS: the image's corners, unchanged. Reprojected: the envelope of the rectangle
    with each edge cut in 10, widened west and east by 2 % of its width, which covers edges that
    bend between the cuts. Not north and south: be4 computes that margin as `ymax - ymax`, zero,
    and its limits depend on it. be4 compares the two CRS names as strings; equivalent CRSs
    (EPSG:2154 and IGNF:LAMB93) count as one here, so no margin where nothing is reprojected.
    """
    if crs_equal(source.crs, crs):
        return tuple(float(v) for v in source.bbox)  # type: ignore[return-value]
    try:
        xmin, ymin, xmax, ymax = reproject_bbox(source.bbox, source.crs, crs, densify=_BE4_EDGE_CUTS + 1)
    except ValueError:
        raise WriterError(f"{source.path}: its extent cannot be expressed in {crs}") from None
    margin = (xmax - xmin) * _BE4_X_MARGIN
    return xmin - margin, ymin, xmax + margin, ymax


def footprint_tiles(matrix: TileMatrix, bbox: BBox) -> tuple[int, int, int, int] | None:
    """Inclusive (min_col, min_row, max_col, max_row) of the tiles a footprint claims (clipped to
    the matrix), by be4's rule (`bboxToIndices`, `updateLimitsFromBbox`): each edge of the
    footprint falls in the tile whose span holds it, a coordinate on a tile edge in the tile after
    it, so a footprint ending exactly on an edge also claims the next column or row."""
    xmin, ymin, xmax, ymax = bbox
    min_col = _tile_index(xmin - matrix.origin_x, matrix.tile_span_x)
    max_col = _tile_index(xmax - matrix.origin_x, matrix.tile_span_x)
    min_row = _tile_index(matrix.origin_y - ymax, matrix.tile_span_y)
    max_row = _tile_index(matrix.origin_y - ymin, matrix.tile_span_y)
    min_col, min_row = max(min_col, 0), max(min_row, 0)
    max_col, max_row = min(max_col, matrix.matrix_width - 1), min(max_row, matrix.matrix_height - 1)
    if min_col > max_col or min_row > max_row:
        return None
    return min_col, min_row, max_col, max_row


def _tile_index(offset: float, span: float) -> int:
    position = offset / span
    nearest = round(position)
    if abs(position - nearest) <= _EDGE_TOLERANCE * max(1.0, abs(position)):
        return nearest
    return math.floor(position)


def slabs_for_bbox(matrix: TileMatrix, bbox: BBox, tpw: int, tph: int) -> set[Slab]:
    """Slabs of a level touching a bbox (clipped to the matrix)."""
    tiles = matrix.bbox_to_tile_range(bbox)
    if tiles is None:
        return set()
    min_col, min_row, max_col, max_row = tiles
    return {(c, r) for r in range(min_row // tph, max_row // tph + 1) for c in range(min_col // tpw, max_col // tpw + 1)}


def slab_bbox(matrix: TileMatrix, col: int, row: int, tpw: int, tph: int) -> BBox:
    return matrix.range_bbox(col * tpw, row * tph, (col + 1) * tpw - 1, (row + 1) * tph - 1)


def parent_slabs(child: TileMatrix, parent: TileMatrix, slabs: Iterable[Slab], tpw: int, tph: int) -> set[Slab]:
    """Slabs of the level above that cover any of `slabs` (a slight inset avoids edge contacts)."""
    out: set[Slab] = set()
    inset = 1e-6 * child.cell_size
    for col, row in slabs:
        x0, y0, x1, y1 = slab_bbox(child, col, row, tpw, tph)
        out |= slabs_for_bbox(parent, (x0 + inset, y0 + inset, x1 - inset, y1 - inset), tpw, tph)
    return out


def polygon_slabs(matrix: TileMatrix, polygon: np.ndarray, tpw: int, tph: int) -> set[Slab]:
    """Slabs of a level that a polygon (N, 2 grid coordinates, closed or not) touches."""
    bbox = (float(polygon[:, 0].min()), float(polygon[:, 1].min()), float(polygon[:, 0].max()), float(polygon[:, 1].max()))
    return {s for s in slabs_for_bbox(matrix, bbox, tpw, tph)
            if rectangle_meets_polygon(slab_bbox(matrix, *s, tpw, tph), polygon)}


def rectangle_meets_polygon(rect: BBox, polygon: np.ndarray) -> bool:
    """Whether an axis-aligned rectangle and a simple polygon overlap (share some area or edge)."""
    x0, y0, x1, y1 = rect
    px, py = polygon[:, 0], polygon[:, 1]
    if np.any((px >= x0) & (px <= x1) & (py >= y0) & (py <= y1)):
        return True
    if point_in_polygon((x0 + x1) / 2, (y0 + y1) / 2, polygon):
        return True
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if any(point_in_polygon(x, y, polygon) for x, y in corners):
        return True
    edges = list(zip(corners, corners[1:] + corners[:1], strict=True))
    n = len(polygon)
    for i in range(n):
        a, b = polygon[i], polygon[(i + 1) % n]
        for c, d in edges:
            if _segments_cross((a[0], a[1]), (b[0], b[1]), c, d):
                return True
    return False


def point_in_polygon(x: float, y: float, polygon: np.ndarray) -> bool:
    """Even-odd rule."""
    px, py = polygon[:, 0], polygon[:, 1]
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        crosses = ((py > y) != (qy > y)) & (x < (qx - px) * (y - py) / (qy - py) + px)
    return bool(np.count_nonzero(crosses) % 2)


def _segments_cross(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float],
                    d: tuple[float, float]) -> bool:
    def orient(p: tuple[float, float], q: tuple[float, float], r: tuple[float, float]) -> float:
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    d1, d2, d3, d4 = orient(c, d, a), orient(c, d, b), orient(a, b, c), orient(a, b, d)
    return (d1 * d2 < 0) and (d3 * d4 < 0)


def shard_share(slabs: Iterable[Slab], shard: int, count: int) -> list[Slab]:
    """Shard `shard` of `count`: blocks of neighbouring slabs dealt round-robin, in a fixed order.

    Blocks are squares of 2^k slabs aligned on multiples of their side, up to 8×8: in a quadtree
    their parents then lie in one block of the level above, so a shard can build those too
    (`build.compute_shard_upper_levels`) and fewer parents straddle shards. Smaller when there
    are too few slabs for every shard to get at least two blocks.
    """
    ordered = sorted(set(slabs), key=lambda s: (s[1], s[0]))
    side = 1
    while side < _SHARD_BLOCK and len(ordered) / (2 * side) ** 2 >= 2 * count:
        side *= 2
    blocks: dict[Slab, list[Slab]] = {}
    for col, row in ordered:
        blocks.setdefault((col // side, row // side), []).append((col, row))
    ordered = sorted(blocks, key=lambda b: (b[1], b[0]))
    return [s for i, block in enumerate(ordered) if i % count == shard for s in blocks[block]]
