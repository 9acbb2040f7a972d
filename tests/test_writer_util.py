"""Helpers for the writer tests: an independent reference resampler and pyramid read-back.

The reference reads the source with tifffile and its georeferencing straight from the GeoTIFF
tags, and maps every tile pixel centre through pyproj point by point: it shares no code with
the writer or the render warp.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyproj
import pytest
import tifffile

from tileserver.pyramid import Pyramid
from tileserver.rok4.tms import TileMatrix
from tileserver.settings import Settings

SOURCES = Path(__file__).parent / "data" / "sources"
FIXTURES = Path(__file__).parent / "data" / "pyramids"
SETTINGS = Settings()  # FILE storage only, default TMS directory


class Reference:
    """A source image held whole, with its corner and pixel size from the GeoTIFF tags."""

    def __init__(self, name: str, crs: str) -> None:
        with tifffile.TiffFile(SOURCES / name) as tif:
            page = tif.pages.first
            pixels = page.asarray()
            scale = page.tags.get("ModelPixelScaleTag")
            tie = page.tags.get("ModelTiepointTag")
            scale, tie = (scale.value if scale else None), (tie.value if tie else None)
            nodata_tag = page.tags.get("GDAL_NODATA")
            nodata_tag = nodata_tag.value if nodata_tag else None
        if pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
        self.pixels = pixels[..., None] if pixels.ndim == 2 else pixels
        if scale is not None and tie is not None:
            sc, tp = scale, tie
            self.x0, self.y0 = tp[3] - tp[0] * sc[0], tp[4] + tp[1] * sc[1]
            self.rx, self.ry = sc[0], sc[1]
        else:  # world file: pixel sizes, then the centre of the top-left pixel
            a, _, _, e, c, f = (float(v) for v in (SOURCES / name).with_suffix(".tfw").read_text().split())
            self.rx, self.ry = a, -e
            self.x0, self.y0 = c - a / 2, f + self.ry / 2
        self.crs = crs
        self.nodata = float(nodata_tag) if nodata_tag is not None else None

    def _source_coords(self, matrix: TileMatrix, grid_crs: str, col: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        xmin, _, _, ymax = matrix.tile_bbox(col, row)
        xs = xmin + (np.arange(matrix.tile_width) + 0.5) * matrix.cell_size
        ys = ymax - (np.arange(matrix.tile_height) + 0.5) * matrix.cell_size
        gx, gy = np.meshgrid(xs, ys)
        transformer = pyproj.Transformer.from_crs(grid_crs, self.crs, always_xy=True)
        sx, sy = transformer.transform(gx, gy)
        return (np.asarray(sx) - self.x0) / self.rx, (self.y0 - np.asarray(sy)) / self.ry

    def nearest(self, matrix: TileMatrix, grid_crs: str, col: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(pixels, inside) of a tile by nearest neighbour."""
        u, v = self._source_coords(matrix, grid_crs, col, row)
        ci, ri = np.floor(u).astype(int), np.floor(v).astype(int)
        h, w = self.pixels.shape[:2]
        inside = (ci >= 0) & (ci < w) & (ri >= 0) & (ri < h)
        out = self.pixels[np.clip(ri, 0, h - 1), np.clip(ci, 0, w - 1)]
        return out, inside

    def bilinear(self, matrix: TileMatrix, grid_crs: str, col: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(float pixels, fully-inside) of a tile by bilinear interpolation of pixel centres."""
        u, v = self._source_coords(matrix, grid_crs, col, row)
        u, v = u - 0.5, v - 0.5
        i0, j0 = np.floor(u).astype(int), np.floor(v).astype(int)
        fu, fv = (u - i0)[..., None], (v - j0)[..., None]
        h, w = self.pixels.shape[:2]
        inside = (i0 >= 0) & (i0 + 1 < w) & (j0 >= 0) & (j0 + 1 < h)
        i0, j0 = np.clip(i0, 0, w - 2), np.clip(j0, 0, h - 2)
        p = self.pixels.astype(np.float64)
        out = (p[j0, i0] * (1 - fu) * (1 - fv) + p[j0, i0 + 1] * fu * (1 - fv)
               + p[j0 + 1, i0] * (1 - fu) * fv + p[j0 + 1, i0 + 1] * fu * fv)
        return out, inside


async def level_tiles(pyramid: Pyramid, level: str) -> dict[tuple[int, int], np.ndarray]:
    """Every tile the reader finds inside a level's limits."""
    lim = pyramid.level(level).tile_limits
    out = {}
    for row in range(lim.min_row, lim.max_row + 1):
        for col in range(lim.min_col, lim.max_col + 1):
            tile = await pyramid.get_tile_array(level, col, row)
            if tile is not None:
                out[(col, row)] = tile
    return out


def data_mask(tile: np.ndarray, nodata: tuple[float, ...]) -> np.ndarray:
    return ~np.all(tile == np.asarray(nodata, dtype=tile.dtype), axis=2)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.mark.parametrize("status", ["DE", "EL", "", "X"])
def test_journal_refuses_unknown_slab_statuses(status):
    """A journal line is trusted on resume: only D(ata), E(mpty) and L(ink) are statuses."""
    from tileserver.writer.journal import SlabRecord

    line = f"{status} 12 3 4 100 0 0 15 15"
    with pytest.raises(ValueError):
        SlabRecord.parse(line)
    assert SlabRecord.parse("D 12 3 4 100 0 0 15 15").status == "D"
