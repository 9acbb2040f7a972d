"""The render pipeline against independent references.

* Native grid at native resolution: the map is the tiles' pixels, exactly.
* Reprojection of a synthetic pyramid holding a linear field f(X, Y) of the grid's coordinates:
  the reference is f at the target pixel centres transformed point by point with a fresh pyproj
  Transformer — no interpolation code shared with the pipeline — so each kernel's error is measured
  against the analytic truth (mean and max bounds per interpolation).
* Reprojection of the real fixture tiles: nearest neighbour against a point-by-point lookup, linear
  against a bilinear interpolation written here.
* Neighbouring maps join without seams; styles (hillshade, slope, palettes) on the FLOAT32 DEM
  are sane; level choice, composition, tile budget, concurrency gate and storage failures.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import numpy as np
import pytest
from apputil import layer_descriptor
from pyproj import Transformer

from tileserver.catalog import PublishedLayer, PyramidPool, publish_layer
from tileserver.publication.model import Layer, LayerPyramid, parse_layer
from tileserver.pyramid import SlabIndexCache
from tileserver.render.draw import alpha_over, composite, ground_resolution
from tileserver.render.errors import RenderBusy, RenderStorageError, RenderTooLarge
from tileserver.render.gate import RenderGate
from tileserver.render.georef import Grid, reproject_bbox
from tileserver.render.levels import choose_level
from tileserver.render.model import MapLayer, Raster
from tileserver.render.pipeline import render_map
from tileserver.render.styles import load_styles_directory
from tileserver.rok4.descriptor import TileLimits
from tileserver.rok4.formats import get_format
from tileserver.rok4.tms import load_tms
from tileserver.settings import load_settings
from tileserver.storage import Storage, StorageError

SETTINGS = load_settings(env={})
FIXTURES = ("SCAN1000", "MONTAGNE", "BDPARCELLAIRE", "RGEALTI")
STYLES = load_styles_directory("tests/data/styles")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
async def fixture_layers():
    async with Storage(SETTINGS) as storage:
        pool = PyramidPool(storage, SlabIndexCache(), SETTINGS.tms_directory)
        yield {n: await publish_layer(parse_layer(n, layer_descriptor(n)), pool) for n in FIXTURES}


class FakePyramid:
    """Tiles computed from a function of the grid's coordinates (pixel centres), stored as raw bytes."""

    def __init__(self, tms, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], dtype: str, channels: int,
                 fail: Exception | None = None) -> None:
        self.tms, self.fn, self.dtype, self.channels, self.fail = tms, fn, np.dtype(dtype), channels, fail
        self.reads = 0

    def pixels(self, level: str, col: int, row: int) -> np.ndarray:
        m = self.tms.get(level)
        xs = m.origin_x + (col * m.tile_width + np.arange(m.tile_width) + 0.5) * m.cell_size
        ys = m.origin_y - (row * m.tile_height + np.arange(m.tile_height) + 0.5) * m.cell_size
        x, y = np.meshgrid(xs, ys)
        return np.asarray(self.fn(x, y), dtype=self.dtype).reshape(m.tile_height, m.tile_width, self.channels)

    async def get_tile(self, level: str, col: int, row: int) -> bytes | None:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        return self.pixels(level, col, row).tobytes()

    def decode(self, level: str, data: bytes) -> np.ndarray:
        m = self.tms.get(level)
        return np.frombuffer(data, self.dtype).reshape(m.tile_height, m.tile_width, self.channels).copy()


def synthetic_layer(tms_id: str, level: str, tiles: tuple[int, int, int, int], fn, *, fmt: str = "TIFF_ZIP_FLOAT32",
                    channels: int = 1, nodata: tuple[float, ...] = (-99999.0,), resampling: str = "linear",
                    fail: Exception | None = None, layer_id: str = "SYNTH") -> PublishedLayer:
    """A PublishedLayer of one level whose tiles are `fn` of the coordinates; `tiles` = c0, r0, c1, r1."""
    tms = load_tms(tms_id, SETTINGS.tms_directory)
    fmt_obj = get_format(fmt)
    owner = FakePyramid(tms, fn, fmt_obj.dtype, channels, fail)
    c0, r0, c1, r1 = tiles
    native = tms.get(level).range_bbox(c0, r0, c1, r1)
    layer = Layer(id=layer_id, title=layer_id, abstract="", pyramids=(LayerPyramid(f"/{layer_id}.json", level, level),),
                  resampling=resampling)
    return PublishedLayer(layer=layer, tms=tms, format=fmt_obj, channels=channels, nodata=nodata, level_ids=(level,),
                          owners={level: owner}, limits={level: TileLimits(c0, c1, r0, r1)},
                          wgs84_bbox=reproject_bbox(native, tms.crs, "EPSG:4326"), native_bbox=native)


async def level_mosaic(published: PublishedLayer, level: str) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Every tile of a level's limits, decoded and placed, absent ones as nodata; and its extent."""
    lim = published.limits[level]
    m = published.matrix(level)
    owner = published.owners[level]
    out = np.empty(((lim.max_row - lim.min_row + 1) * m.tile_height, (lim.max_col - lim.min_col + 1) * m.tile_width,
                    published.channels), dtype=published.format.dtype)
    out[...] = np.asarray(published.nodata, dtype=out.dtype)
    for row in range(lim.min_row, lim.max_row + 1):
        for col in range(lim.min_col, lim.max_col + 1):
            data = await published.get_tile(level, col, row)
            if data is not None:
                y, x = (row - lim.min_row) * m.tile_height, (col - lim.min_col) * m.tile_width
                out[y:y + m.tile_height, x:x + m.tile_width] = owner.decode(level, data)
    return out, m.range_bbox(lim.min_col, lim.min_row, lim.max_col, lim.max_row)


def source_points(target: Grid, source_crs: str) -> tuple[np.ndarray, np.ndarray]:
    """Target pixel centres transformed one by one into the source CRS (fresh transformer, no lattice)."""
    transformer = Transformer.from_crs(target.crs, source_crs, always_xy=True)
    x, y = np.meshgrid(target.x_centres(), target.y_centres())
    sx, sy = transformer.transform(x.ravel(), y.ravel())
    return np.asarray(sx).reshape(x.shape), np.asarray(sy).reshape(x.shape)


def matched_target(published: PublishedLayer, crs: str, shrink: float = 0.25) -> Grid:
    """A target in `crs` over the inner part of the data, with about one target pixel per source pixel."""
    x0, y0, x1, y1 = published.native_bbox
    dx, dy = (x1 - x0) * shrink, (y1 - y0) * shrink
    inner = (x0 + dx, y0 + dy, x1 - dx, y1 - dy)
    cell = published.matrix(published.bottom_level).cell_size
    n_x, n_y = round((inner[2] - inner[0]) / cell), round((inner[3] - inner[1]) / cell)
    box = reproject_bbox(inner, published.tms.crs, crs)
    return Grid(crs, box, n_x, n_y)


# --------------------------------------------------------------------------- native grid


@pytest.mark.parametrize("name", FIXTURES)
async def test_native_grid_at_native_resolution_is_the_tiles(fixture_layers, name):
    published = fixture_layers[name]
    level = published.bottom_level
    expected, extent = await level_mosaic(published, level)
    cell = published.matrix(level).cell_size
    # whole published extent, then a window shifted by whole pixels (not tile-aligned)
    windows = [(0, 0, expected.shape[1], expected.shape[0]), (37, 11, 101, 150)]
    for col0, row0, width, height in windows:
        height = min(height, expected.shape[0] - row0)
        box = (extent[0] + col0 * cell, extent[3] - (row0 + height) * cell, extent[0] + (col0 + width) * cell,
               extent[3] - row0 * cell)
        for picture in (False, True):
            raster = await render_map([MapLayer(published)], Grid(published.tms.crs, box, width, height), picture=picture)
            assert raster.levels[name] == level
            window = expected[row0:row0 + height, col0:col0 + width]
            if picture and published.channels == 4:
                assert np.array_equal(raster.data, window)
            elif not picture:
                assert np.array_equal(raster.data, window)
            elif published.format.dtype == "uint8":  # picture without alpha: colours as stored, alpha from nodata
                assert np.array_equal(raster.data[..., :published.channels], window)
                assert np.array_equal(raster.data[..., -1] == 0, np.all(window == published.nodata, axis=-1))


@pytest.mark.parametrize("offset", [0.3, -0.45, 0.7])
async def test_pictures_at_native_resolution_snap_to_the_tiles_pixels(fixture_layers, offset):
    """PNG/JPEG at the pyramid's resolution but off its grid: its pixels, shifted by under half a pixel
    (no softening resampling); data output stays exactly resampled."""
    published = fixture_layers["SCAN1000"]
    expected, extent = await level_mosaic(published, published.bottom_level)
    cell = published.matrix(published.bottom_level).cell_size
    col0, row0, width, height = 230, 20, 150, 120  # inside the scanned map
    x0, y1 = extent[0] + (col0 + offset) * cell, extent[3] - (row0 + offset) * cell
    target = Grid(published.tms.crs, (x0, y1 - height * cell, x0 + width * cell, y1), width, height)
    picture = await render_map([MapLayer(published)], target)
    snapped = round(offset)
    window = expected[row0 + snapped:row0 + snapped + height, col0 + snapped:col0 + snapped + width]
    assert (window[..., 3] > 0).mean() > 0.9 and np.array_equal(picture.data, window)
    data = await render_map([MapLayer(published, None, "linear")], target, picture=False)
    assert not np.array_equal(data.data, window)


# --------------------------------------------------------------------------- reprojection, analytic


def _linear_field(origin: tuple[float, float], cell: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """f = 0.7 px + 0.3 px' in source pixels from an origin: gradient ≈ 0.76 per source pixel."""
    ox, oy = origin

    def fn(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return 0.7 * (x - ox) / cell + 0.3 * (oy - y) / cell

    return fn


# source grid, level, tile range (c0, r0, c1, r1) → target CRSs
ANALYTIC_CASES = [
    ("PM", "15", (16596, 11268, 16599, 11271), ("EPSG:4326", "EPSG:2154", "IGNF:LAMB93")),
    ("LAMB93_1M_MNT", "7", (129, 4460, 132, 4463), ("EPSG:3857", "EPSG:4326")),
]
# interpolation → (mean, max) absolute error bounds, in field units (f grows 0.7 per source column)
KERNEL_BOUNDS = {
    "nn": (0.2, 0.51),  # half a pixel along each axis: 0.5·0.7 + 0.5·0.3
    "linear": (0.001, 0.002),  # exact on a linear field, up to float32 and the lattice error
    "bicubic": (0.001, 0.002),
    "lanczos_2": (0.02, 0.04),  # Lanczos does not reproduce a linear ramp exactly
    "lanczos_3": (0.012, 0.025),
}


@pytest.mark.parametrize(("tms_id", "level", "tiles", "targets"), ANALYTIC_CASES)
@pytest.mark.parametrize("interpolation", list(KERNEL_BOUNDS))
async def test_reprojection_matches_analytic_reference(tms_id, level, tiles, targets, interpolation):
    tms = load_tms(tms_id, SETTINGS.tms_directory)
    m = tms.get(level)
    origin = m.tile_bbox(tiles[0], tiles[1])
    fn = _linear_field((origin[0], origin[3]), m.cell_size)
    published = synthetic_layer(tms_id, level, tiles, fn, resampling=interpolation)
    mean_bound, max_bound = KERNEL_BOUNDS[interpolation]
    for crs in targets:
        target = matched_target(published, crs)
        raster = await render_map([MapLayer(published)], target, picture=False)
        sx, sy = source_points(target, tms.crs)
        reference = fn(sx, sy)
        assert raster.valid.all(), crs
        error = np.abs(raster.data[..., 0].astype(np.float64) - reference)
        assert error.mean() < mean_bound and error.max() < max_bound, (crs, interpolation, error.mean(), error.max())


async def test_downsampled_reprojection_averages_instead_of_aliasing():
    """A checkerboard of 1-pixel squares read at 1/4 resolution must come out near its mean."""
    tms = load_tms("PM", SETTINGS.tms_directory)
    m = tms.get("15")

    def checker(x, y):
        return 100.0 * ((np.floor((x - m.origin_x) / m.cell_size) + np.floor((m.origin_y - y) / m.cell_size)) % 2)

    published = synthetic_layer("PM", "15", (16596, 11268, 16599, 11271), checker, resampling="lanczos_3")
    target = matched_target(published, "EPSG:4326")
    target = Grid(target.crs, target.bbox, target.width // 4, target.height // 4)
    raster = await render_map([MapLayer(published)], target, picture=False)
    assert abs(float(raster.data.mean()) - 50.0) < 2.0 and float(raster.data.std()) < 8.0


def _smooth_rgb(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Colours varying over a few hundred metres, never the nodata white."""
    return np.stack([120 + 80 * np.sin(x / 300.0), 120 + 80 * np.cos(y / 250.0),
                     120 + 60 * np.sin((x + y) / 400.0)], axis=-1)


def _smooth_rgb_with_holes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The same with nodata (white) discs: the picture path then carries an alpha band."""
    rgb = _smooth_rgb(x, y)
    rgb[np.hypot((x % 1500) - 750, (y % 1500) - 750) < 200] = 255
    return rgb


@pytest.mark.parametrize("interpolation", ["nn", "bicubic", "lanczos_2"])
@pytest.mark.parametrize(("crs", "shift", "zoom"), [
    ("EPSG:4326", 0.0, 1.0), ("EPSG:2154", 0.0, 1.0), ("EPSG:2154", 0.0, 2.5),  # reprojected, then downsampled
    ("EPSG:3857", 0.37, 1.0),  # snapped to the source's pixels ("EPSG:3857", 0.37, 0.6), ("EPSG:3857", 0.37, 3.0),  # same CRS, off the pixel grid
])
@pytest.mark.parametrize("field", [_smooth_rgb, _smooth_rgb_with_holes])
async def test_picture_fast_path_agrees_with_warp(interpolation, crs, shift, zoom, field):
    """PNG/JPEG maps go through Pillow (C): they must agree with warp.py, the accurate path."""
    published = synthetic_layer("PM", "15", (16596, 11268, 16599, 11271), field, fmt="TIFF_RAW_UINT8",
                                channels=3, nodata=(255.0, 255.0, 255.0), resampling=interpolation)
    base = matched_target(published, crs)
    dx = shift * (base.bbox[2] - base.bbox[0]) / base.width
    target = Grid(crs, (base.bbox[0] + dx, base.bbox[1] + dx, base.bbox[2] + dx, base.bbox[3] + dx),
                  round(base.width / zoom), round(base.height / zoom))
    picture = await render_map([MapLayer(published)], target, picture=True)
    data = await render_map([MapLayer(published)], target, picture=False)
    holes = field is _smooth_rgb_with_holes
    assert picture.data.shape[2] == (4 if holes else 3)  # opaque data stays opaque: no alpha band
    opaque = picture.data[..., 3] == 255 if holes else picture.valid
    both = opaque & data.valid
    for _ in range(3 if holes else 0):  # leave out the kernel's reach around holes (Lanczos lobes clip alpha)
        both[1:] &= both[:-1].copy()
        both[:-1] &= both[1:].copy()
        both[:, 1:] &= both[:, :-1].copy()
        both[:, :-1] &= both[:, 1:].copy()
    assert both.mean() > (0.5 if holes else 0.95)
    assert (picture.valid == data.valid).mean() > 0.97  # nodata edges agree within the kernel's reach
    diff = np.abs(picture.data[..., :3].astype(np.int16) - data.data.astype(np.int16))[both]
    assert diff.mean() < 0.6 and np.percentile(diff, 99.9) <= 3, (diff.mean(), diff.max())


# --------------------------------------------------------------------------- reprojection, real tiles


def _lookup(mosaic: np.ndarray, extent, cell: float, sx: np.ndarray, sy: np.ndarray):
    """Nearest pixel of the mosaic under each point; (values, inside)."""
    col = np.floor((sx - extent[0]) / cell).astype(np.int64)
    row = np.floor((extent[3] - sy) / cell).astype(np.int64)
    inside = (col >= 0) & (col < mosaic.shape[1]) & (row >= 0) & (row < mosaic.shape[0])
    return mosaic[np.clip(row, 0, mosaic.shape[0] - 1), np.clip(col, 0, mosaic.shape[1] - 1)], inside


def _bilinear(mosaic: np.ndarray, extent, cell: float, sx: np.ndarray, sy: np.ndarray):
    """Bilinear interpolation between pixel centres; (values, usable) where all four taps are inside."""
    fc = (sx - extent[0]) / cell - 0.5
    fr = (extent[3] - sy) / cell - 0.5
    c0, r0 = np.floor(fc).astype(np.int64), np.floor(fr).astype(np.int64)
    usable = (c0 >= 0) & (c0 + 1 < mosaic.shape[1]) & (r0 >= 0) & (r0 + 1 < mosaic.shape[0])
    c0, r0 = np.clip(c0, 0, mosaic.shape[1] - 2), np.clip(r0, 0, mosaic.shape[0] - 2)
    wx, wy = (fc - c0)[..., None], (fr - r0)[..., None]
    img = mosaic.astype(np.float64)
    top = img[r0, c0] * (1 - wx) + img[r0, c0 + 1] * wx
    bottom = img[r0 + 1, c0] * (1 - wx) + img[r0 + 1, c0 + 1] * wx
    return top * (1 - wy) + bottom * wy, usable


# (layer, target CRS)
REAL_CASES = [("SCAN1000", "EPSG:4326"), ("SCAN1000", "IGNF:LAMB93"), ("MONTAGNE", "EPSG:2154"),
              ("BDPARCELLAIRE", "EPSG:3857"), ("RGEALTI", "EPSG:3857"), ("RGEALTI", "EPSG:4326")]


@pytest.mark.parametrize(("name", "crs"), REAL_CASES)
async def test_reprojected_tiles_match_point_by_point_reference(fixture_layers, name, crs):
    published = fixture_layers[name]
    level = published.bottom_level
    mosaic, extent = await level_mosaic(published, level)
    cell = published.matrix(level).cell_size
    target = matched_target(published, crs, shrink=0.05)
    sx, sy = source_points(target, published.tms.crs)
    nodata = np.asarray(published.nodata, dtype=mosaic.dtype)

    nearest = await render_map([MapLayer(published, None, "nn")], target, picture=False)
    assert nearest.levels[name] == level
    expected, inside = _lookup(mosaic, extent, cell, sx, sy)
    same = np.all(nearest.data == expected, axis=-1)
    # pixel centres within the lattice error (≤ 1/8 source pixel) of a source pixel edge may pick the neighbour
    assert same[inside].mean() > 0.97, same[inside].mean()

    linear = await render_map([MapLayer(published, None, "linear")], target, picture=False)
    reference, usable = _bilinear(mosaic, extent, cell, sx, sy)
    # compare where the four taps hold data (nodata is excluded, not blended, by the pipeline)
    with_data, _ = _bilinear((~np.all(mosaic == nodata, axis=-1)).astype(np.float64)[..., None], extent, cell, sx, sy)
    usable &= with_data[..., 0] > 0.999
    assert usable.mean() > 0.02
    error = np.abs(linear.data.astype(np.float64) - reference)[usable]
    scale = 255.0 if mosaic.dtype == np.uint8 else float(np.ptp(mosaic[~np.all(mosaic == nodata, axis=-1)]))
    assert error.mean() < 0.01 * scale and np.percentile(error, 99) < 0.15 * scale, (error.mean(), error.max(), scale)


# --------------------------------------------------------------------------- seams


@pytest.mark.parametrize(("name", "crs", "interpolation", "style"), [
    ("SCAN1000", "EPSG:4326", "bicubic", None),
    ("SCAN1000", "EPSG:2154", "lanczos_2", None),
    ("RGEALTI", "EPSG:3857", "linear", "estompage"),
    ("RGEALTI", "EPSG:3857", "linear", "pente"),
])
async def test_neighbouring_maps_join_without_seams(fixture_layers, name, crs, interpolation, style):
    published = fixture_layers[name]
    whole = matched_target(published, crs, shrink=0.1)
    width = whole.width - whole.width % 2
    whole = Grid(crs, (whole.bbox[0], whole.bbox[1], whole.bbox[0] + width * whole.res_x, whole.bbox[3]), width,
                 whole.height)
    left, right = whole.subgrid(0, 0, width // 2, whole.height), whole.subgrid(width // 2, 0, width // 2, whole.height)
    layer = MapLayer(published, STYLES[style] if style else None, interpolation)
    rasters = [await render_map([layer], g, picture=False) for g in (whole, left, right)]
    joined = np.concatenate([rasters[1].data, rasters[2].data], axis=1)
    diff = np.abs(joined.astype(np.float64) - rasters[0].data.astype(np.float64))
    assert diff.max() <= 1.0, diff.max()
    assert np.array_equal(np.concatenate([rasters[1].valid, rasters[2].valid], axis=1), rasters[0].valid)


# --------------------------------------------------------------------------- styles on FLOAT32


async def test_styles_on_the_dem_give_sane_images(fixture_layers):
    published = fixture_layers["RGEALTI"]
    target = matched_target(published, "EPSG:2154", shrink=0.0)
    plain = await render_map([MapLayer(published)], target, picture=False)
    heights = plain.data[..., 0][plain.valid]
    assert plain.data.dtype == np.float32 and 50 < heights.mean() < 1000

    shade = await render_map([MapLayer(published, STYLES["estompage"])], target, picture=False)
    # this estompage ends in a grey ramp with alpha 64 (an overlay): grey = illumination
    assert shade.data.dtype == np.uint8 and shade.data.shape[2] == 4
    assert (shade.data[..., 3][shade.valid] == 64).all()
    lit = shade.data[..., 0][shade.valid]
    # gentle relief lit from 45° above the horizon: around 255·sin(45°) ≈ 180, with some texture
    assert 150 < lit.mean() < 215 and lit.std() > 1
    # one pixel of data border is needed around each valid pixel: valid area shrinks, never grows
    assert shade.valid.sum() <= plain.valid.sum() and (shade.valid & ~plain.valid).sum() == 0

    slope = await render_map([MapLayer(published, STYLES["pente"])], target, picture=False)
    degrees = slope.data[..., 0][slope.valid]
    assert slope.data.dtype == np.float32 and 0 <= degrees.min() and degrees.max() <= 90 and degrees.mean() < 45

    hypso = await render_map([MapLayer(published, STYLES["hypso"])], target, picture=True)
    assert hypso.data.shape[2] == 4 and hypso.picture
    assert (hypso.data[..., 3][~plain.valid] == 0).all()  # nodata → the palette's transparent first colour
    assert (hypso.data[..., 3][plain.valid] > 0).mean() > 0.99

    # montagne: the same slope through a stepped ramp, transparent under 29°, opaque from 30° to 90°
    montagne = await render_map([MapLayer(published, STYLES["montagne"])], target, picture=True)
    alpha = montagne.data[..., 3]
    assert montagne.data.shape[2] == 4
    assert (alpha[slope.valid & (slope.data[..., 0] <= 29)] == 0).all()
    assert (alpha[slope.valid & (slope.data[..., 0] >= 30)] == 255).all()


async def test_hillshade_of_a_synthetic_slope_matches_the_analytic_value():
    """A plane rising 1 m per metre to the east, lit from the west (azimuth 270°) 45° up: cos(0°) → 255."""
    from dataclasses import replace

    tms = load_tms("LAMB93_1M_MNT", SETTINGS.tms_directory)
    m = tms.get("7")

    def plane(x, y):
        return (x - m.origin_x) * -1.0 + 1e6  # descending eastwards: faces east

    published = synthetic_layer("LAMB93_1M_MNT", "7", (129, 4460, 130, 4461), plane)
    style = replace(STYLES["estompage"], palette=None, estompage=replace(STYLES["estompage"].estompage, azimuth=90.0, zenith=45.0,
                                                           z_factor=1.0))
    target = matched_target(published, "EPSG:2154", shrink=0.1)
    raster = await render_map([MapLayer(published, style)], target, picture=False)
    assert raster.valid.all() and raster.data.shape[2] == 1
    assert np.abs(raster.data.astype(np.float64) - 255).max() <= 1
    # lit from the north instead: half the light, cos(60°)
    side = replace(style, estompage=replace(style.estompage, azimuth=0.0))
    raster = await render_map([MapLayer(published, side)], target, picture=False)
    assert np.abs(raster.data.astype(np.float64) - 255 * 0.5).max() <= 2


# --------------------------------------------------------------------------- level choice and composition


LEVEL_CASES = [  # SCAN1000 (PM, levels 0..10): request resolution (m) → level
    (152.87, "10"), (100.0, "10"), (180.0, "10"), (183.0, "10"), (300.0, "9"), (370.0, "9"),
    (10_000.0, "4"), (1.0, "10"), (1e9, "0"),
]


@pytest.mark.parametrize(("resolution", "level"), LEVEL_CASES)
async def test_level_choice_is_clamped_and_never_much_coarser(fixture_layers, resolution, level):
    assert choose_level(fixture_layers["SCAN1000"], resolution) == level


async def test_geographic_target_reads_the_level_matching_its_ground_resolution(fixture_layers):
    published = fixture_layers["SCAN1000"]
    # ~305 m PM pixels ≈ 0.00275° of longitude: level 9
    target = Grid("EPSG:4326", (1.5, 46.1, 1.5 + 256 * 0.00275, 46.1 + 256 * 0.00275 * 0.7), 256, 256)
    raster = await render_map([MapLayer(published)], target)
    assert raster.levels["SCAN1000"] == "9"


def test_alpha_over_is_porter_duff():
    below = np.array([[[255, 0, 0, 255], [0, 0, 255, 128], [10, 10, 10, 0]]], np.uint8)
    above = np.array([[[0, 255, 0, 128], [0, 0, 0, 0], [200, 100, 0, 255]]], np.uint8)
    out = alpha_over(below, above)
    assert out[0, 0].tolist() == [127, 128, 0, 255]
    assert out[0, 1].tolist() == [0, 0, 255, 128]
    assert out[0, 2].tolist() == [200, 100, 0, 255]


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("picture", [True, False])
def test_rgba_of_a_layer_is_the_same_compiled_or_not(monkeypatch: pytest.MonkeyPatch, channels: int,
                                                     picture: bool) -> None:
    """draw.to_rgba in one compiled pass gives numpy's band copies: grey replicated, alpha from the
    alpha band, the validity, or both; float data rounded and clipped first."""
    from tileserver.render import draw

    assert draw._pixels is not None  # the install builds render/_pixels.c (README)
    rng = np.random.default_rng(channels + 10 * picture)
    grid = Grid("EPSG:3857", (0, 0, 23, 17), 23, 17)
    valid = rng.random((17, 23)) > 0.3
    for data in (rng.integers(0, 256, (17, 23, channels), dtype=np.uint8),
                 rng.uniform(-20, 280, (17, 23, channels)).astype(np.float32)):
        if channels in (2, 4):
            data[::3, ::2, -1] = 0  # transparent pixels of an alpha band
        raster = Raster(data, valid, None, grid, picture=picture)
        compiled = draw.to_rgba(raster)
        with monkeypatch.context() as patch:
            patch.setattr(draw, "_pixels", None)
            slow = draw.to_rgba(raster)
        assert compiled.shape == (17, 23, 4) and np.array_equal(compiled, slow)
        assert 0 < int((compiled[..., 3] == 0).sum()) < 17 * 23
    if channels in (1, 3):  # and on a background colour, RGB
        data = rng.integers(0, 256, (17, 23, channels), dtype=np.uint8)
        laid = draw._on_background(data, valid, (12, 200, 7))
        with monkeypatch.context() as patch:
            patch.setattr(draw, "_pixels", None)
            assert np.array_equal(laid, draw._on_background(data, valid, (12, 200, 7)))
        assert (laid[~valid] == (12, 200, 7)).all() and (laid[valid] == data[valid]).all()


def test_data_composition_keeps_the_last_valid_value():
    grid = Grid("EPSG:3857", (0, 0, 2, 1), 2, 1)
    a = Raster(np.array([[[1.0], [2.0]]], np.float32), np.array([[True, True]]), (-1.0,), grid)
    b = Raster(np.array([[[9.0], [-1.0]]], np.float32), np.array([[True, False]]), (-1.0,), grid)
    out = composite([a, b], grid, picture=False)
    assert out.data[..., 0].tolist() == [[9.0, 2.0]]


async def test_several_layers_composite_in_order(fixture_layers):
    scan, montagne = fixture_layers["SCAN1000"], fixture_layers["MONTAGNE"]
    target = matched_target(montagne, "EPSG:3857", shrink=0.0)
    target = Grid(target.crs, target.bbox, 128, 128)
    under = await render_map([MapLayer(scan)], target)
    over = await render_map([MapLayer(montagne)], target)
    both = await render_map([MapLayer(scan), MapLayer(montagne)], target)
    expected = alpha_over(under.data, over.data)
    assert np.array_equal(both.data, expected)


@pytest.mark.parametrize(("name", "style"), [("RGEALTI", "estompage"), ("SCAN1000", "torgb")])
@pytest.mark.parametrize("fmt", ["image/jpeg", "image/png"])
async def test_a_data_layer_drawn_on_the_background_encodes_the_same(fixture_layers, name, style, fmt):
    """A map its encoder flattens (JPEG, PNG with TRANSPARENT=FALSE) drawn straight onto the
    background colour (one 8-bit data layer: RGB at once, no RGBA copy) gives the bytes of the
    RGBA composite flattened by the encoder, over the data and off its edge."""
    from dataclasses import replace

    from tileserver.render.encode import encode_image
    from tileserver.render.styles import Colorize

    published = fixture_layers[name]
    rule = replace(STYLES["estompage"], palette=None) if style == "estompage" else replace(
        STYLES["colorize"], colorize=Colorize((0, 0, 0), (255, 255, 255), 0))  # torgb: RGBA → RGB
    layer = MapLayer(published, rule)
    full = matched_target(published, "EPSG:3857", shrink=-0.1)  # beyond the data on every side
    target = Grid(full.crs, full.bbox, 200, 150)
    colour = (12, 200, 7)
    drawn = await render_map([layer], target, background=colour)
    rgba = await render_map([layer], target)
    assert drawn.data.shape == (150, 200, 3) and rgba.data.shape == (150, 200, 4)
    assert np.array_equal(drawn.valid, rgba.valid) and drawn.valid.any() and not drawn.valid.all()
    assert (encode_image(drawn.data, fmt, transparent=False, bgcolor=colour)
            == encode_image(rgba.data, fmt, transparent=False, bgcolor=colour))


async def test_outside_the_data_is_empty_without_reading(fixture_layers):
    published = synthetic_layer("PM", "15", (16596, 11268, 16599, 11271), lambda x, y: x * 0)
    raster = await render_map([MapLayer(published)], Grid("EPSG:4326", (-60, -40, -50, -30), 64, 32), picture=False)
    assert raster.empty and raster.data.shape == (32, 64, 1) and published.owners["15"].reads == 0
    assert (raster.data == -99999).all()


# --------------------------------------------------------------------------- guards


async def test_too_many_tiles_is_refused(fixture_layers):
    published = synthetic_layer("PM", "15", (16590, 11260, 16609, 11279), lambda x, y: x * 0)
    with pytest.raises(RenderTooLarge) as info:
        await render_map([MapLayer(published)], Grid("EPSG:3857", published.native_bbox, 1024, 1024), max_tiles=16)
    assert info.value.status == 400 and "400" in info.value.message  # 20×20 tiles asked


async def test_busy_gate_refuses_after_a_short_wait_and_frees_its_slot():
    published = synthetic_layer("PM", "15", (16596, 11268, 16599, 11271), lambda x, y: x * 0)
    gate = RenderGate(1, wait=0.05)
    target = Grid("EPSG:3857", published.native_bbox, 64, 64)
    await gate.acquire()
    with pytest.raises(RenderBusy):
        await render_map([MapLayer(published)], target, gate=gate)
    assert gate.busy_refusals == 1
    gate.release()
    gate.wait = 10.0  # queued renders now wait their turn: one slot, three renders, one at a time
    results = await asyncio.gather(*(render_map([MapLayer(published)], target, gate=gate) for _ in range(3)))
    assert all(r.data.shape == (64, 64, 4) for r in results) and gate.in_use == 0


@pytest.mark.parametrize(("failure", "status"), [
    (StorageError("connection reset"), 503),
])
async def test_storage_failures_carry_their_status(failure, status):
    published = synthetic_layer("PM", "15", (16596, 11268, 16599, 11271), lambda x, y: x * 0, fail=failure)
    gate = RenderGate(2)
    with pytest.raises(RenderStorageError) as info:
        await render_map([MapLayer(published)], Grid("EPSG:3857", published.native_bbox, 64, 64), gate=gate)
    assert info.value.status == status and gate.in_use == 0


async def test_unreadable_tile_is_a_502():
    published = synthetic_layer("PM", "15", (16596, 11268, 16599, 11271), lambda x, y: x * 0)
    owner = published.owners["15"]

    async def garbage(level, col, row):
        return b"not a tile"

    owner.get_tile = garbage
    with pytest.raises(RenderStorageError) as info:
        await render_map([MapLayer(published)], Grid("EPSG:3857", published.native_bbox, 64, 64))
    assert info.value.status == 502


def test_metres_per_pixel_are_geodesic():
    # Web Mercator stretches by 1/cos(lat): at 60° a 10 m pixel covers 5 m on the ground
    y60 = 6378137.0 * math.log(math.tan(math.pi / 4 + math.radians(60) / 2))
    rx, ry = ground_resolution(Grid("EPSG:3857", (0, y60 - 50, 100, y60 + 50), 10, 10))
    assert rx == pytest.approx(5.0, rel=0.01) and ry == pytest.approx(5.0, rel=0.01)


@pytest.mark.parametrize("field", [_smooth_rgb, _smooth_rgb_with_holes])
async def test_tiles_known_clear_of_nodata_give_the_scanned_picture(field):
    """Whether a tile holds nodata is kept per decoded tile (draw.known_clear), so warm maps skip
    scanning their mosaic; the pictures equal those of a render that scans (cache off), holes
    transparent in both, also when the same tiles serve a second, overlapping map."""
    from tileserver.render import draw

    published = synthetic_layer("PM", "15", (16596, 11268, 16599, 11271), field, fmt="TIFF_RAW_UINT8",
                                channels=3, nodata=(255.0, 255.0, 255.0), resampling="lanczos_3",
                                layer_id=f"CLEAR{field.__name__}")
    native = matched_target(published, "EPSG:3857")
    x0, y0, x1, y1 = native.bbox
    inset = 0.1 * (x1 - x0)
    base = Grid("EPSG:3857", (x0 + inset, y0 + inset, x1 - inset, y1 - inset), round(native.width * 0.8 / 0.85),
                round(native.height * 0.8 / 0.85))  # upsampled inside the data, as the benchmarks' maps
    shifted = Grid("EPSG:3857", (x0 + 1.3 * inset, y0 + 0.7 * inset, x1 - 0.7 * inset, y1 - 1.3 * inset),
                   round(native.width * 0.8 / 1.4), round(native.height * 0.8 / 1.4))  # downsampled
    budget = draw.DECODED_TILES.budget
    try:
        warm = [await render_map([MapLayer(published)], t, picture=True) for t in (base, shifted, base)]
        draw.DECODED_TILES.resize(0)
        cold = [await render_map([MapLayer(published)], t, picture=True) for t in (base, shifted)]
    finally:
        draw.DECODED_TILES.resize(budget)
    holes = field is _smooth_rgb_with_holes
    for hot in warm:
        assert hot.data.shape[2] == (4 if holes else 3)  # opaque when clear of nodata
    for hot, scanned in zip(warm, cold + [cold[0]], strict=True):
        assert np.array_equal(hot.data, scanned.data) and np.array_equal(hot.valid, scanned.valid)
    if holes:
        assert (warm[2].data[..., 3] == 0).any()


@pytest.mark.parametrize("mode", ["RGBA", "RGB", "L", "LA"])
@pytest.mark.parametrize("resample", [3, 2, 0])  # Pillow's BICUBIC, BILINEAR, NEAREST
@pytest.mark.parametrize("compiled", [True, False])
def test_mesh_transform_gives_pillow_s_mesh_bytes(monkeypatch: pytest.MonkeyPatch, mode: str, resample: int,
                                                  compiled: bool) -> None:
    """draw.mesh_transform (bicubic in render/_mesh.c; else one core call per quad, coefficients for
    all quads in numpy) gives Image.transform(MESH)'s bytes, alpha premultiplied around it
    included, on quads that shear, stretch and leave the source."""
    from PIL import Image

    from tileserver.render import draw
    from tileserver.render.draw import mesh_transform

    assert draw._mesh is not None  # the install builds it (README)
    if not compiled:
        monkeypatch.setattr(draw, "_mesh", None)

    rng = np.random.default_rng(len(mode) * 10 + resample)
    bands = len(mode)
    pixels = rng.integers(0, 256, (300, 260, bands), dtype=np.uint8)
    image = Image.fromarray(pixels if bands > 1 else pixels[..., 0], mode)
    xs = np.array([0, 32, 64, 96, 128, 160, 200], dtype=np.float64)
    ys = np.array([0, 32, 64, 100], dtype=np.float64)
    gx, gy = np.meshgrid(xs, ys)
    sx = gx * 1.3 + gy * 0.1 + rng.random(gx.shape) * 2 - 5  # some corners off the source
    sy = gy * 1.1 - gx * 0.05 + rng.random(gx.shape) * 2
    quads = [((int(xs[i]), int(ys[j]), int(xs[i + 1]), int(ys[j + 1])),
              (sx[j, i], sy[j, i], sx[j + 1, i], sy[j + 1, i], sx[j + 1, i + 1], sy[j + 1, i + 1], sx[j, i + 1], sy[j, i + 1]))
             for j in range(len(ys) - 1) for i in range(len(xs) - 1)]
    expected = np.asarray(image.transform((200, 100), Image.Transform.MESH, quads, resample=resample))
    got = mesh_transform(image, (200, 100), xs, ys, sx, sy, resample)
    got = got[..., 0] if bands == 1 else got
    assert got.shape == expected.shape and np.array_equal(got, expected)
    assert got.any()
