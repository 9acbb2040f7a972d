"""Which level of a pyramid to read for a target grid, and which of its tiles (`SourcePlan`).

The local resolution the target asks for is measured in the grid's CRS where the target
overlaps the data (a median of Jacobians on a small lattice, so a world-wide map in another CRS
is not judged by its degenerate corners); the coarsest published level at most `LEVEL_TOLERANCE`
coarser than that is used. The footprint is padded by the kernel's reach and clipped to the
published limits. Pure geometry: no I/O, no pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tileserver.catalog import PublishedLayer
from tileserver.rok4.tms import TileMatrix

from .georef import Grid, crs_equal, get_transformer, reproject_bbox
from .warp import get_kernel

LEVEL_TOLERANCE = 1.2  # accept a level up to 20 % coarser than asked (ROK4 accepts 25 %)


# Beyond this downsampling factor (a target far coarser than the layer's top level) a stretched
# kernel would need thousands of taps per pixel for data smaller than a pixel: nearest instead.
MAX_STRETCH = 8.0


@dataclass(frozen=True)
class SourcePlan:
    """What to read for one layer: a level, the inclusive tile range, and the mosaic grid."""

    level: str
    matrix: TileMatrix
    tiles: tuple[int, int, int, int] | None  # min_col, min_row, max_col, max_row; None = nothing to read
    grid: Grid | None
    kernel: str = "nn"  # the interpolation actually used (see MAX_STRETCH)
    overlap: tuple[float, float, float, float] | None = None  # the target's part with data (target CRS)
    pad: float = 0.0  # grid-CRS margin around the footprint: the kernel's reach and the style border

    @property
    def tile_count(self) -> int:
        if self.tiles is None:
            return 0
        c0, r0, c1, r1 = self.tiles
        return (c1 - c0 + 1) * (r1 - r0 + 1)


def _intersection(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float, float, float] | None:
    box = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box if box[0] < box[2] and box[1] < box[3] else None


def local_resolution(target: Grid, area: tuple[float, float, float, float], grid_crs: str, samples: int = 5) -> float:
    """Grid-CRS units per target pixel over `area` (target CRS): median of the local area scale.

    The square root of the Jacobian determinant at a lattice of points is what a pixel covers in
    the source; the median ignores points where the transform degenerates."""
    if crs_equal(target.crs, grid_crs):
        return math.sqrt(target.res_x * target.res_y)
    t = (np.arange(samples) + 0.5) / samples
    xs = area[0] + t * (area[2] - area[0])
    ys = area[1] + t * (area[3] - area[1])
    x, y = (a.ravel() for a in np.meshgrid(xs, ys))
    dx, dy = target.res_x, target.res_y
    transformer = get_transformer(target.crs, grid_crs)
    px, py = (np.asarray(v) for v in transformer.transform(np.concatenate([x, x + dx, x]),
                                                          np.concatenate([y, y, y + dy]), errcheck=False))
    n = x.size
    jx = (px[n:2 * n] - px[:n], py[n:2 * n] - py[:n])
    jy = (px[2 * n:] - px[:n], py[2 * n:] - py[:n])
    scale = np.sqrt(np.abs(jx[0] * jy[1] - jx[1] * jy[0]))
    scale = scale[np.isfinite(scale) & (scale > 0)]
    if scale.size == 0:
        src = reproject_bbox(area, target.crs, grid_crs)
        cols = target.width * (area[2] - area[0]) / (target.bbox[2] - target.bbox[0])
        rows = target.height * (area[3] - area[1]) / (target.bbox[3] - target.bbox[1])
        return math.sqrt((src[2] - src[0]) / max(cols, 1e-9) * (src[3] - src[1]) / max(rows, 1e-9))
    return float(np.median(scale))


def choose_level(published: PublishedLayer, resolution: float) -> str:
    """Coarsest published level no more than LEVEL_TOLERANCE coarser than asked; else the bottom."""
    tms = published.tms
    fine_enough = [lv for lv in published.level_ids if tms.get(lv).cell_size <= resolution * LEVEL_TOLERANCE]  # type: ignore[union-attr]
    return fine_enough[0] if fine_enough else published.bottom_level


def plan_source(published: PublishedLayer, target: Grid, kernel_name: str, border: int = 0) -> SourcePlan:
    """Level, tiles and mosaic grid for drawing `published` on `target` (extended by `border` pixels)."""
    tms = published.tms
    grid_crs = tms.crs
    bottom = published.matrix(published.bottom_level)
    try:
        data_in_target = reproject_bbox(published.native_bbox, grid_crs, target.crs)
    except ValueError:
        data_in_target = target.bbox
    overlap = _intersection(target.bbox, data_in_target)
    if overlap is None:
        return SourcePlan(published.bottom_level, bottom, None, None)
    resolution = local_resolution(target, overlap, grid_crs)
    level = choose_level(published, resolution)
    matrix = published.matrix(level)
    try:
        footprint = reproject_bbox(overlap, target.crs, grid_crs, densify=33)
    except ValueError:
        return SourcePlan(level, matrix, None, None)
    scale = max(1.0, resolution / matrix.cell_size)
    if scale > MAX_STRETCH:
        kernel_name = "nn"
    kernel = get_kernel(kernel_name)
    # reach of the kernel in source pixels (stretched when downsampling), plus the style border
    # and two pixels for the reprojection's curvature between densified edge points
    pad_px = math.ceil(kernel.radius * (scale if kernel.stretch else 1.0)) + 2 + math.ceil(border * scale)
    pad = pad_px * matrix.cell_size
    footprint = (footprint[0] - pad, footprint[1] - pad, footprint[2] + pad, footprint[3] + pad)
    tiles = matrix.bbox_to_tile_range(footprint)
    limits = published.limits.get(level)
    if tiles is None or limits is None:
        return SourcePlan(level, matrix, None, None)
    c0, r0 = max(tiles[0], limits.min_col), max(tiles[1], limits.min_row)
    c1, r1 = min(tiles[2], limits.max_col), min(tiles[3], limits.max_row)
    if c0 > c1 or r0 > r1:
        return SourcePlan(level, matrix, None, None)
    grid = Grid(grid_crs, matrix.range_bbox(c0, r0, c1, r1), (c1 - c0 + 1) * matrix.tile_width,
                (r1 - r0 + 1) * matrix.tile_height)
    return SourcePlan(level, matrix, (c0, r0, c1, r1), grid, kernel_name, overlap, pad)


def strip_plan(published: PublishedLayer, plan: SourcePlan, strip: Grid) -> SourcePlan:
    """The part of a map's plan one strip of the map reads: same level and kernel (a strip must
    not choose its own, or strips would not join), tiles under the strip's footprint only."""
    if plan.tiles is None or plan.overlap is None:
        return plan
    overlap = _intersection(strip.bbox, plan.overlap)
    if overlap is None:
        return SourcePlan(plan.level, plan.matrix, None, None, plan.kernel)
    try:
        footprint = reproject_bbox(overlap, strip.crs, published.tms.crs, densify=33)
    except ValueError:
        return plan
    pad = plan.pad
    tiles = plan.matrix.bbox_to_tile_range((footprint[0] - pad, footprint[1] - pad, footprint[2] + pad,
                                            footprint[3] + pad))
    if tiles is None:
        return SourcePlan(plan.level, plan.matrix, None, None, plan.kernel)
    c0, r0 = max(tiles[0], plan.tiles[0]), max(tiles[1], plan.tiles[1])
    c1, r1 = min(tiles[2], plan.tiles[2]), min(tiles[3], plan.tiles[3])
    if c0 > c1 or r0 > r1:
        return SourcePlan(plan.level, plan.matrix, None, None, plan.kernel)
    m = plan.matrix
    grid = Grid(plan.grid.crs if plan.grid else published.tms.crs, m.range_bbox(c0, r0, c1, r1),
                (c1 - c0 + 1) * m.tile_width, (r1 - r0 + 1) * m.tile_height)
    return SourcePlan(plan.level, m, (c0, r0, c1, r1), grid, plan.kernel, plan.overlap, pad)
