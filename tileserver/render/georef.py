"""Georeferenced pixel grids and the cached CRS helpers every render step shares.

A `Grid` is the only georeferencing object the render package knows: a CRS, a bounding box in
that CRS's *x/y* order (easting/longitude first, always — axis-order quirks of WMS 1.3.0 are the
WMS layer's business), and a pixel size. Pixel (col, row) covers
``[xmin + col*res_x, xmin + (col+1)*res_x] x [ymax - (row+1)*res_y, ymax - row*res_y]``; its
centre has the *fractional pixel index* (col, row) — the convention every sampler here uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pyproj import CRS, Transformer

from tileserver import transformers

BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class Grid:
    """A north-up raster grid: CRS, bbox (xmin, ymin, xmax, ymax) in x/y order, size in pixels."""

    crs: str
    bbox: BBox
    width: int
    height: int

    def __post_init__(self) -> None:
        bbox = tuple(float(v) for v in self.bbox)
        if len(bbox) != 4:
            raise ValueError(f"bbox needs 4 numbers, got {self.bbox!r}")
        object.__setattr__(self, "bbox", bbox)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"grid size must be positive, got {self.width}x{self.height}")
        if not (bbox[2] > bbox[0] and bbox[3] > bbox[1]) or not all(map(math.isfinite, bbox)):
            raise ValueError(f"bbox must be finite with xmin < xmax and ymin < ymax, got {bbox}")

    @property
    def res_x(self) -> float:
        return (self.bbox[2] - self.bbox[0]) / self.width

    @property
    def res_y(self) -> float:
        return (self.bbox[3] - self.bbox[1]) / self.height

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width), numpy order."""
        return self.height, self.width

    @property
    def geotransform(self) -> tuple[float, float, float, float, float, float]:
        """GDAL-style affine transform (x0, res_x, 0, y0, 0, -res_y) of the top-left corner."""
        return self.bbox[0], self.res_x, 0.0, self.bbox[3], 0.0, -self.res_y

    def x_centres(self) -> np.ndarray:
        """x of every column's pixel centre, left to right (float64, shape (width,))."""
        return self.bbox[0] + (np.arange(self.width, dtype=np.float64) + 0.5) * self.res_x

    def y_centres(self) -> np.ndarray:
        """y of every row's pixel centre, top to bottom (float64, shape (height,))."""
        return self.bbox[3] - (np.arange(self.height, dtype=np.float64) + 0.5) * self.res_y

    def to_pixel(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Map coordinates to fractional pixel indices (centre of pixel (c, r) is (c, r))."""
        col = (np.asarray(x, dtype=np.float64) - self.bbox[0]) / self.res_x - 0.5
        row = (self.bbox[3] - np.asarray(y, dtype=np.float64)) / self.res_y - 0.5
        return col, row

    def to_coords(self, col: np.ndarray | float, row: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of `to_pixel`."""
        x = self.bbox[0] + (np.asarray(col, dtype=np.float64) + 0.5) * self.res_x
        y = self.bbox[3] - (np.asarray(row, dtype=np.float64) + 0.5) * self.res_y
        return x, y

    def subgrid(self, col0: int, row0: int, width: int, height: int) -> Grid:
        """The grid of a pixel window (may reach outside this grid), same CRS and resolution."""
        xmin = self.bbox[0] + col0 * self.res_x
        ymax = self.bbox[3] - row0 * self.res_y
        return Grid(self.crs, (xmin, ymax - height * self.res_y, xmin + width * self.res_x, ymax), width, height)

    def pixel_window(self, bbox: BBox, pad: int = 0) -> tuple[int, int, int, int]:
        """Smallest pixel window (col0, row0, col1, row1), end-exclusive, covering `bbox`, padded.

        Not clipped to the grid: the caller decides what lies outside (nodata, other tiles).
        """
        eps = 1e-9
        col0 = math.floor((bbox[0] - self.bbox[0]) / self.res_x + eps) - pad
        col1 = math.ceil((bbox[2] - self.bbox[0]) / self.res_x - eps) + pad
        row0 = math.floor((self.bbox[3] - bbox[3]) / self.res_y + eps) - pad
        row1 = math.ceil((self.bbox[3] - bbox[1]) / self.res_y - eps) + pad
        return col0, row0, max(col1, col0 + 1), max(row1, row0 + 1)


# WMS's "CRS:nn" identifiers, which PROJ only knows under the OGC authority
_WMS_AUTHORITY = {"CRS:84": "OGC:CRS84", "CRS:83": "OGC:CRS83", "CRS:27": "OGC:CRS27"}


@lru_cache(maxsize=256)
def get_crs(crs: str) -> CRS:
    """Parsed CRS, cached: parsing an EPSG/IGNF code costs ~1 ms, far more than a small warp step."""
    return CRS.from_user_input(_WMS_AUTHORITY.get(crs.strip().upper(), crs))


@lru_cache(maxsize=1024)
def crs_equal(a: str, b: str) -> bool:
    """Whether two CRS strings denote the same x/y system (axis order ignored: grids are x-first)."""
    if a.strip().upper() == b.strip().upper():
        return True
    return get_crs(a).equals(get_crs(b), ignore_axis_order=True)


def get_transformer(src: str, dst: str) -> Transformer:
    """x/y-ordered transformer, cached per thread (`tileserver.transformers`: creating one costs
    milliseconds, and sharing one between threads can hang PROJ)."""
    return transformers.transformer(get_crs(src), get_crs(dst))


@lru_cache(maxsize=256)
def crs_epsg(crs: str) -> int | None:
    """The EPSG code of a CRS if PROJ can identify one (IGNF:LAMB93 -> 2154, CRS:84 -> 4326)."""
    code = get_crs(crs).to_epsg()
    if code is None and crs_equal(crs, "EPSG:4326"):  # OGC:CRS84 is only lon/lat-ordered EPSG:4326
        code = 4326
    return code


@lru_cache(maxsize=256)
def is_geographic(crs: str) -> bool:
    return bool(get_crs(crs).is_geographic)


def reproject_bbox(bbox: BBox, src_crs: str, dst_crs: str, densify: int = 21) -> BBox:
    """Bounding box in `dst_crs` of a bbox in `src_crs`, its edges densified (curved images of
    straight edges); points that fail to transform are ignored. Raises ValueError if none do."""
    if crs_equal(src_crs, dst_crs):
        return tuple(float(v) for v in bbox)  # type: ignore[return-value]
    t = np.linspace(0.0, 1.0, densify)
    xs = np.concatenate([bbox[0] + t * (bbox[2] - bbox[0]), np.full(densify, bbox[2]),
                         bbox[2] - t * (bbox[2] - bbox[0]), np.full(densify, bbox[0])])
    ys = np.concatenate([np.full(densify, bbox[1]), bbox[1] + t * (bbox[3] - bbox[1]),
                         np.full(densify, bbox[3]), bbox[3] - t * (bbox[3] - bbox[1])])
    x, y = get_transformer(src_crs, dst_crs).transform(xs, ys, errcheck=False)
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        raise ValueError(f"bbox {bbox} cannot be expressed in {dst_crs}")
    return float(x[ok].min()), float(y[ok].min()), float(x[ok].max()), float(y[ok].max())
