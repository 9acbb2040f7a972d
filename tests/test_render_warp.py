"""Resampling and reprojection: exactness, accuracy against pyproj point by point, nodata, seams."""

from __future__ import annotations

import numpy as np
import pytest

from tileserver.render.georef import Grid, get_transformer, reproject_bbox
from tileserver.render.warp import KERNELS, get_kernel, source_coordinates, source_validity, warp

INTERPOLATIONS = ["nn", "linear", "bicubic", "lanczos", "lanczos_2", "lanczos_4"]

# one source grid per CRS, over Paris, ~40 m pixels
SOURCES = {
    "EPSG:2154": Grid("EPSG:2154", (640000, 6850000, 660480, 6870480), 512, 512),
    "EPSG:3857": Grid("EPSG:3857", (260000, 6230000, 290720, 6260720), 512, 512),
    "EPSG:4326": Grid("EPSG:4326", (2.2, 48.6, 2.6, 48.9), 512, 512),
}


def smooth(col: np.ndarray, row: np.ndarray) -> np.ndarray:
    """A smooth field of source pixel coordinates (wavelengths 64 and 48 pixels, amplitude 40)."""
    return 100 + 40 * np.sin(2 * np.pi * col / 64) * np.cos(2 * np.pi * row / 48)


def smooth_raster(grid: Grid) -> np.ndarray:
    col, row = np.meshgrid(np.arange(grid.width), np.arange(grid.height))
    return smooth(col, row).astype(np.float32)


def inner_target(src: Grid, crs: str, size: int = 256, fraction: float = 0.8) -> Grid:
    """A target grid in `crs` well inside the source footprint, about the source's resolution."""
    bb = reproject_bbox(src.bbox, src.crs, crs)
    cx, cy = (bb[0] + bb[2]) / 2, (bb[1] + bb[3]) / 2
    hw, hh = (bb[2] - bb[0]) * fraction / 2, (bb[3] - bb[1]) * fraction / 2
    return Grid(crs, (cx - hw, cy - hh, cx + hw, cy + hh), size, size)


def exact_source_pixels(src: Grid, dst: Grid) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.meshgrid(dst.x_centres(), dst.y_centres())
    xs, ys = get_transformer(dst.crs, src.crs).transform(x, y)
    return src.to_pixel(xs, ys)


# ----------------------------------------------------------------------------- identity, crops


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_identity_is_exact(interpolation: str, dtype: type) -> None:
    grid = SOURCES["EPSG:2154"]
    rng = np.random.default_rng(1)
    src = (rng.random((grid.height, grid.width, 3)) * 255).astype(dtype)
    out, mask = warp(src, grid, grid, (0, 0, 0), interpolation, return_mask=True)
    assert out.dtype == src.dtype
    np.testing.assert_array_equal(out, src)
    assert mask.all() == (not (src == 0).all(axis=2).any())


def test_aligned_crop_pads_with_nodata() -> None:
    grid = Grid("EPSG:2154", (0, 0, 100, 100), 10, 10)
    src = np.arange(100, dtype=np.float32).reshape(10, 10, 1)
    dst = grid.subgrid(-2, 3, 5, 4)  # two columns left of the source
    out, mask = warp(src, grid, dst, -99999, "bicubic", return_mask=True)
    assert out.shape == (4, 5, 1)
    assert (out[:, :2] == -99999).all() and not mask[:, :2].any()
    np.testing.assert_array_equal(out[:, 2:, 0], src[3:7, 0:3, 0])


def test_two_dimensional_input_keeps_its_shape() -> None:
    grid = Grid("EPSG:2154", (0, 0, 100, 100), 10, 10)
    src = np.arange(100, dtype=np.float32).reshape(10, 10)
    out = warp(src, grid, Grid("EPSG:2154", (5, 5, 95, 95), 9, 9), None, "linear")
    assert out.shape == (9, 9)
    # a linear field is reproduced exactly by linear interpolation
    np.testing.assert_allclose(out, src[:9, :9] + 5.5, atol=1e-4)


def test_unknown_interpolation_is_rejected() -> None:
    grid = Grid("EPSG:2154", (0, 0, 10, 10), 10, 10)
    with pytest.raises(ValueError, match="interpolation"):
        warp(np.zeros((10, 10, 1), np.uint8), grid, grid, None, "sinc")
    assert get_kernel("LANCZOS_3") is KERNELS["lanczos"]
    assert get_kernel("lanczos_2").radius == 2


# ----------------------------------------------------------------------------- accuracy

# (max |error| bound, mean bound) against the field evaluated at exact pyproj coordinates; nn is
# bounded by the field's slope (3.9 per pixel) times half a pixel diagonal, the others by their
# interpolation error on a 48-64 pixel wavelength (Lanczos windows attenuate slightly)
BOUNDS = {"nn": (2.8, 1.0), "linear": (0.2, 0.05), "bicubic": (0.02, 0.005), "lanczos": (0.15, 0.05)}


@pytest.mark.parametrize(("src_crs", "dst_crs"), [
    ("EPSG:2154", "EPSG:3857"), ("EPSG:3857", "EPSG:2154"), ("EPSG:2154", "EPSG:4326"),
    ("EPSG:4326", "EPSG:2154"), ("EPSG:3857", "EPSG:4326"), ("EPSG:4326", "EPSG:3857"),
])
def test_reprojection_matches_pointwise_reference(src_crs: str, dst_crs: str) -> None:
    src_grid = SOURCES[src_crs]
    dst = inner_target(src_grid, dst_crs, size=400)  # about the source resolution
    col, row = exact_source_pixels(src_grid, dst)
    reference = smooth(col, row)
    src = smooth_raster(src_grid)
    for interpolation, (max_bound, mean_bound) in BOUNDS.items():
        out, mask = warp(src, src_grid, dst, -99999, interpolation, return_mask=True)
        assert mask.all()
        error = np.abs(out[..., 0] - reference) if out.ndim == 3 else np.abs(out - reference)
        assert error.max() < max_bound, (interpolation, error.max())
        assert error.mean() < mean_bound, (interpolation, error.mean())


@pytest.mark.parametrize(("src", "dst"), [
    # Europe in geographic → Lambert-93, world → Web Mercator (strongly non-linear in y)
    (Grid("EPSG:4326", (-10, 35, 30, 70), 4000, 3500), Grid("EPSG:2154", (-500000, 5500000, 2500000, 8500000), 700, 700)),
    (Grid("EPSG:4326", (-180, -85, 180, 85), 3600, 1700),
     Grid("EPSG:3857", (-20037508.34, -20037508.34, 20037508.34, 20037508.34), 600, 600)),
    (Grid("EPSG:2154", (640000, 6850000, 660480, 6870480), 512, 512),
     Grid("EPSG:3857", (260000, 6230000, 290720, 6260720), 700, 300)),
])
def test_coordinate_approximation_error(src: Grid, dst: Grid) -> None:
    """The lattice interpolation stays within max_error (in the coarser of source and target
    pixels) of the exact per-pixel transformation."""
    sx, sy = source_coordinates(src, dst, max_error=0.125)
    ex, ey = exact_source_pixels(src, dst)
    scale_x = max(1.0, np.median(np.abs(np.diff(ex, axis=1))))
    scale_y = max(1.0, np.median(np.abs(np.diff(ey, axis=0))))
    error = np.hypot((sx - ex) / scale_x, (sy - ey) / scale_y)
    assert np.isfinite(error).all()
    assert error.max() < 0.25  # checked at cell centres and edge midpoints with 0.125
    assert error.mean() < 0.1


# ----------------------------------------------------------------------------- nodata


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("dst", [
    Grid("EPSG:2154", (640123.4, 6850321.0, 659876.5, 6869901.2), 300, 280),  # same CRS, off-lattice
    Grid("EPSG:2154", (640000, 6850000, 660480, 6870480), 64, 64),  # downsampling x8
    inner_target(SOURCES["EPSG:2154"], "EPSG:3857", 300, 0.9),  # reprojected
    inner_target(SOURCES["EPSG:2154"], "EPSG:3857", 40, 0.9),  # reprojected and downsampled
])
def test_nodata_never_bleeds(interpolation: str, dst: Grid) -> None:
    grid = SOURCES["EPSG:2154"]
    rng = np.random.default_rng(7)
    valid = rng.random((grid.height, grid.width)) > 0.3
    valid[100:200, 150:300] = False  # a large hole too
    src = np.where(valid, 1234.5, -99999).astype(np.float32)[..., None]
    out, mask = warp(src, grid, dst, -99999, interpolation, return_mask=True)
    assert mask.any() and not mask.all()
    np.testing.assert_allclose(out[mask], 1234.5, rtol=1e-5)
    assert (out[~mask] == -99999).all()

    rgb = np.where(valid[..., None], np.array([200, 100, 50], np.uint8), np.uint8(0))
    out8, mask8 = warp(rgb, grid, dst, (0, 0, 0), interpolation, return_mask=True)
    assert out8.dtype == np.uint8
    assert (out8[mask8] == [200, 100, 50]).all()
    assert (out8[~mask8] == 0).all()


def test_nodata_boundary_stays_in_place() -> None:
    """Coverage >= 0.5: the valid area neither grows nor shrinks by the kernel radius."""
    grid = Grid("EPSG:2154", (0, 0, 100, 100), 100, 100)
    src = np.full((100, 100, 1), 10.0, np.float32)
    src[:, 50:] = -1
    dst = Grid("EPSG:2154", (0.25, 0, 100.25, 100), 100, 100)  # quarter-pixel shift
    for interpolation in INTERPOLATIONS:
        out, mask = warp(src, grid, dst, -1, interpolation, return_mask=True)
        # target centre c + 0.25 lies in source pixel round(c + 0.25): valid while c <= 49
        assert mask[:, :50].all() and not mask[:, 50:].any(), interpolation


def test_all_nodata_and_outside_source_give_nodata() -> None:
    grid = Grid("EPSG:2154", (0, 0, 100, 100), 10, 10)
    empty = np.full((10, 10, 1), -5, np.float32)
    out, mask = warp(empty, grid, Grid("EPSG:2154", (3, 3, 93, 93), 7, 7), -5, "lanczos", return_mask=True)
    assert not mask.any() and (out == -5).all()
    far = Grid("EPSG:3857", (0, 0, 1000, 1000), 16, 16)  # nowhere near the source
    out, mask = warp(np.ones((10, 10, 1), np.float32), grid, far, None, "linear", return_mask=True)
    assert not mask.any() and np.isnan(out).all()


def test_nan_is_nodata_for_floats() -> None:
    grid = Grid("EPSG:2154", (0, 0, 100, 100), 10, 10)
    src = np.full((10, 10), 3.0, np.float32)
    src[4:6, 4:6] = np.nan
    out, mask = warp(src, grid, Grid("EPSG:2154", (1, 1, 91, 91), 12, 12), None, "bicubic", return_mask=True)
    np.testing.assert_allclose(out[mask], 3.0, rtol=1e-6)
    assert np.isnan(out[~mask]).all() and (~mask).any()


# ----------------------------------------------------------------------------- seams, aliasing


@pytest.mark.parametrize("interpolation", ["nn", "linear", "lanczos"])
def test_adjacent_tiles_are_seamless(interpolation: str) -> None:
    """Two adjacent pixel-aligned target grids give exactly the union's pixels along their edge."""
    src_grid = SOURCES["EPSG:2154"]
    src = smooth_raster(src_grid)
    res = 30.0
    bb = reproject_bbox(src_grid.bbox, src_grid.crs, "EPSG:3857")
    x0 = np.floor((bb[0] + bb[2]) / 2 / res) * res - 256 * res  # on the 30 m lattice
    y1 = np.floor((bb[1] + bb[3]) / 2 / res) * res + 128 * res
    union = Grid("EPSG:3857", (x0, y1 - 256 * res, x0 + 512 * res, y1), 512, 256)
    left, right = union.subgrid(0, 0, 256, 256), union.subgrid(256, 0, 256, 256)
    top, bottom = union.subgrid(0, 0, 512, 128), union.subgrid(0, 128, 512, 128)
    whole = warp(src, src_grid, union, -99999, interpolation)
    np.testing.assert_allclose(np.concatenate([warp(src, src_grid, left, -99999, interpolation),
                                               warp(src, src_grid, right, -99999, interpolation)], axis=1),
                               whole, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([warp(src, src_grid, top, -99999, interpolation),
                                               warp(src, src_grid, bottom, -99999, interpolation)], axis=0),
                               whole, atol=1e-4)


@pytest.mark.parametrize("interpolation", ["linear", "bicubic", "lanczos"])
@pytest.mark.parametrize("dst_crs", ["EPSG:2154", "EPSG:3857"])
def test_downsampling_does_not_alias(interpolation: str, dst_crs: str) -> None:
    """A one-pixel checkerboard shrunk 8x is uniform grey, not a moiré of black and white."""
    grid = SOURCES["EPSG:2154"]
    board = ((np.indices((grid.height, grid.width)).sum(axis=0) % 2) * 255).astype(np.uint8)
    dst = inner_target(grid, dst_crs, 48, 0.9)
    out = warp(board, grid, dst, None, interpolation).astype(float)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 6, (out.mean(), out.std())
    nearest = warp(board, grid, dst, None, "nn").astype(float)
    assert nearest.std() > 60  # nearest neighbour does alias, as it should


def test_upsampling_linear_field_is_exact() -> None:
    grid = Grid("EPSG:2154", (0, 0, 100, 100), 10, 10)
    col, row = np.meshgrid(np.arange(10), np.arange(10))
    src = (3 * col + 2 * row).astype(np.float32)
    dst = Grid("EPSG:2154", (10, 10, 90, 90), 32, 32)
    out = warp(src, grid, dst, None, "linear")
    cc, rr = grid.to_pixel(*np.meshgrid(dst.x_centres(), dst.y_centres()))
    np.testing.assert_allclose(out, 3 * cc + 2 * rr, atol=1e-4)


# ----------------------------------------------------------------------------- grids, CRS helpers


def test_grid_geometry() -> None:
    grid = Grid("EPSG:2154", (100, 200, 140, 230), 4, 3)
    assert (grid.res_x, grid.res_y, grid.shape) == (10, 10, (3, 4))
    np.testing.assert_array_equal(grid.x_centres(), [105, 115, 125, 135])
    np.testing.assert_array_equal(grid.y_centres(), [225, 215, 205])  # top to bottom
    col, row = grid.to_pixel(np.array([100.0, 105.0, 140.0]), np.array([230.0, 225.0, 200.0]))
    np.testing.assert_array_equal(col, [-0.5, 0, 3.5])
    np.testing.assert_array_equal(row, [-0.5, 0, 2.5])
    np.testing.assert_array_equal(grid.to_coords(col, row)[0], [100, 105, 140])
    assert grid.subgrid(-1, 1, 2, 2).bbox == (90, 200, 110, 220)
    assert grid.pixel_window((112, 201, 121, 219), pad=1) == (0, 0, 4, 4)
    assert grid.geotransform == (100, 10, 0, 230, 0, -10)
    with pytest.raises(ValueError):
        Grid("EPSG:2154", (0, 0, 0, 10), 1, 1)
    with pytest.raises(ValueError):
        Grid("EPSG:2154", (0, 0, 10, 10), 0, 1)


def test_crs_helpers() -> None:
    from tileserver.render.georef import crs_epsg, crs_equal, is_geographic

    assert crs_equal("IGNF:LAMB93", "EPSG:2154") and crs_equal("CRS:84", "EPSG:4326")
    assert not crs_equal("EPSG:2154", "EPSG:3857")
    assert crs_epsg("IGNF:LAMB93") == 2154 and crs_epsg("CRS:84") == 4326
    assert is_geographic("EPSG:4326") and not is_geographic("EPSG:3857")
    bbox = reproject_bbox((2.0, 48.0, 3.0, 49.0), "EPSG:4326", "EPSG:3857")
    assert bbox[0] == pytest.approx(222638.98, abs=0.1) and bbox[3] == pytest.approx(6274861.39, abs=0.1)


def test_equivalent_crs_take_the_fast_path() -> None:
    """IGNF:LAMB93 and EPSG:2154 are one system: no reprojection, so identity stays exact."""
    grid = SOURCES["EPSG:2154"]
    src = smooth_raster(grid)
    alias = Grid("IGNF:LAMB93", grid.bbox, grid.width, grid.height)
    np.testing.assert_array_equal(warp(src, grid, alias, None, "bicubic"), src)


@pytest.mark.parametrize("name", ["linear", "bicubic", "lanczos_3"])
@pytest.mark.parametrize("scale", [0.5, 0.85, 1.0, 1.5, 2.0])
def test_pillow_s_separable_pass_equals_the_numpy_taps(name: str, scale: float) -> None:
    """Where warp hands a same-CRS pass to Pillow (upsampling, scale 1, downsampling beyond the
    stretch threshold), the sums are numpy's to float rounding: a few thousandths of a grey level."""
    from tileserver.render import warp as w

    planes = np.random.default_rng(7).random((300, 280, 3), dtype=np.float32) * 255
    kernel = w.get_kernel(name)
    n = int(200 / max(scale, 1.0))
    cols, rows = 20.3 + np.arange(n) * scale, 15.7 + np.arange(n) * scale
    fast = w._pillow_separable(planes, cols, rows, kernel, scale, scale)
    assert fast is not None
    ci, cw = w._taps(cols, 280, kernel, scale)
    ri, rw = w._taps(rows, 300, kernel, scale)
    reference = w._resample_axis(w._resample_axis(planes, ci, cw, 1), ri, rw, 0)
    assert float(np.abs(fast - reference).max()) < 0.005


def test_maps_resample_with_lanczos_3_in_their_own_crs_as_rok4() -> None:
    """ROK4 resamples a same-CRS map with Lanczos-3 whatever Lanczos the layer names; a reprojected
    map keeps the layer's kernel, and other kernels are never changed."""
    from tileserver.render.draw import resampling_kernel

    pm = Grid("EPSG:3857", (0.0, 0.0, 100.0, 100.0), 10, 10)
    other = Grid("EPSG:3857", (0.0, 0.0, 100.0, 100.0), 7, 7)
    lamb = Grid("EPSG:2154", (700000.0, 6600000.0, 700100.0, 6600100.0), 10, 10)
    assert resampling_kernel("lanczos_2", pm, other) == "lanczos_3"
    assert resampling_kernel("lanczos_4", pm, other) == "lanczos_3"
    assert resampling_kernel("lanczos_2", pm, lamb) == "lanczos_2"
    assert resampling_kernel("bicubic", pm, other) == "bicubic"


@pytest.mark.parametrize("interpolation", ["lanczos_3", "lanczos_2", "bicubic", "linear"])
@pytest.mark.parametrize("nodata", [(0, 0, 0, 0), None])
def test_banded_planes_give_the_gathered_result(interpolation: str, nodata: tuple[int, ...] | None) -> None:
    """Same-CRS warps keep their planes row-planar and resample them with BLAS (render.banded);
    numpy's gathers over interleaved planes, with the same taps, are the reference: the sums agree
    to float32 rounding, so the rounded pixels differ by at most one level, on a few pixels, and
    validity never."""
    from tileserver.render import warp as w

    rng = np.random.default_rng(7)
    src = rng.integers(0, 256, (120, 130, 4), dtype=np.uint8)
    src[20:50, 30:70] = 0
    valid = w.source_validity(src, nodata)
    grid = Grid("EPSG:3857", (0, 0, 130, 120), 130, 120)
    fill = np.zeros(4)
    for target in (Grid("EPSG:3857", (3.3, 5.1, 120.7, 110.2), 150, 131),  # upsampling
                   Grid("EPSG:3857", (-10.5, 5.1, 125.7, 130.2), 40, 37)):  # downsampling, off the edges
        cols, _ = grid.to_pixel(target.x_centres(), 0.0)
        _, rows = grid.to_pixel(0.0, target.y_centres())
        kernel = w.get_kernel(interpolation)
        inside = w._inside(rows, 120)[:, None] & w._inside(cols, 130)[None, :]
        planes = w._planes(src, valid, planar=True)
        assert w._row_planar(planes) and not w._row_planar(w._planes(src, valid))
        banded_planes = w._resample_separable(planes, cols, rows, kernel, target.res_x, target.res_y)
        assert w._row_planar(banded_planes)
        ci, cw = w._taps(cols, 130, kernel, target.res_x)
        ri, rw = w._taps(rows, 120, kernel, target.res_y)
        gathered = w._resample_axis(w._resample_axis(w._planes(src, valid), ci, cw, 1), ri, rw, 0)
        assert np.abs(banded_planes - gathered).max() < 1e-3
        out, out_valid = w._finish(banded_planes, inside, valid is not None, 4, np.dtype(np.uint8), fill, 0.5)
        ref, ref_valid = w._finish(gathered, inside, valid is not None, 4, np.dtype(np.uint8), fill, 0.5)
        assert out.flags.c_contiguous and out.dtype == np.uint8
        assert np.array_equal(out_valid, ref_valid)
        differ = out != ref
        assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1 and differ.mean() < 0.005


@pytest.mark.parametrize(("dtype", "nodata"), [(np.int32, 2**31 - 1), (np.int16, -32768), (np.uint16, 0),
                                               (np.float32, np.nan), (np.float32, -99999.0), (np.uint8, 255)])
def test_banded_warp_fills_nodata_exactly(dtype: type, nodata: float) -> None:
    """Invalid pixels of a banded warp get the nodata value itself, also one float32 cannot hold
    (int32's maximum) and NaN; valid pixels stay within a level of the gathered reference."""
    rng = np.random.default_rng(4)
    src = rng.integers(0, 1000, (50, 60, 2)).astype(dtype)
    src[10:20, 10:30] = nodata
    grid = Grid("EPSG:3857", (0, 0, 60, 50), 60, 50)
    target = Grid("EPSG:3857", (-5.3, 2.1, 70.7, 48.2), 90, 70)
    out, mask = warp(src, grid, target, nodata, "lanczos_3", return_mask=True)
    assert (~mask).any() and mask.any()
    expected = np.full(((~mask).sum(), 2), nodata, dtype=dtype)
    assert np.array_equal(out[~mask], expected, equal_nan=True)
    reference = warp(src, grid, target, nodata, "nn", return_mask=True)[0]  # exact values, for the range check
    assert np.nanmax(np.abs(out[mask].astype(float))) <= np.nanmax(np.abs(reference[mask].astype(float))) * 1.5 + 1


@pytest.mark.parametrize("interpolation", ["lanczos_3", "bicubic", "linear"])
@pytest.mark.parametrize("bands", [1, 3])
def test_picture_resize_equals_warp(interpolation: str, bands: int) -> None:
    """The picture path's opaque resize (render.warp.resize_picture, banded through BLAS) gives
    warp's pixels to one level, up- and downsampling, and Pillow's to a level or two on a smooth
    picture (Pillow clips its first pass to 0..255: on noise it departs further)."""
    from PIL import Image

    from tileserver.render.warp import resize_picture

    yy, xx = np.mgrid[0:140, 0:150]
    smooth = np.stack([(127 + 100 * np.sin(xx / 9 + k) * np.cos(yy / 13)) for k in range(bands)], axis=2)
    src = np.clip(smooth, 0, 255).astype(np.uint8)
    grid = Grid("EPSG:3857", (0, 0, 150, 140), 150, 140)
    for width, height, box in ((200, 170, (5.25, 7.5, 140.75, 131.0)), (60, 50, (0.0, 0.0, 150.0, 140.0))):
        out = resize_picture(src, box, width, height, interpolation)
        assert out.shape == (height, width, bands) and out.dtype == np.uint8
        target = Grid("EPSG:3857", (box[0], 140 - box[3], box[2], 140 - box[1]), width, height)
        reference = warp(src, grid, target, None, interpolation)
        assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1
        pillow = {"lanczos_3": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
                  "linear": Image.Resampling.BILINEAR}[interpolation]
        image = Image.fromarray(src if bands == 3 else src[..., 0])
        theirs = np.asarray(image.resize((width, height), pillow, box=box, reducing_gap=None)).reshape(out.shape)
        assert np.abs(out.astype(int) - theirs.astype(int)).max() <= 2


@pytest.mark.parametrize("interpolation", ["lanczos_3", "bicubic", "linear", "nn"])
def test_same_crs_warp_of_a_large_mosaic_reads_only_what_taps_reach(interpolation: str) -> None:
    """A map inside a mosaic of whole tiles is resampled from the part its taps reach; the result
    is the gathered sums over the whole mosaic (to a level), with the same validity."""
    from tileserver.render import warp as w

    rng = np.random.default_rng(9)
    src = rng.integers(0, 256, (300, 320, 3), dtype=np.uint8)
    src[140:170, 100:200] = 255  # nodata inside the map's footprint
    grid = Grid("EPSG:3857", (0, 0, 320, 300), 320, 300)
    for target in (Grid("EPSG:3857", (100.4, 90.2, 220.6, 200.9), 141, 130),
                   Grid("EPSG:3857", (60.4, 50.2, 260.6, 250.9), 90, 88)):
        out, mask = warp(src, grid, target, 255, interpolation, return_mask=True)
        cols, _ = grid.to_pixel(target.x_centres(), 0.0)
        _, rows = grid.to_pixel(0.0, target.y_centres())
        kernel = w.get_kernel(interpolation)
        valid = w.source_validity(src, 255)
        ci, cw = w._taps(cols, 320, kernel, target.res_x)
        ri, rw = w._taps(rows, 300, kernel, target.res_y)
        sums = w._resample_axis(w._resample_axis(w._planes(src, valid), ci, cw, 1), ri, rw, 0)
        ref, ref_mask = w._finish(sums, np.ones(target.shape, bool), True, 3, np.dtype(np.uint8), np.full(3, 255.0), 0.5)
        assert np.array_equal(mask, ref_mask) and (~mask).any()
        assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_source_validity_matches_the_per_band_rule(channels: int) -> None:
    """2- and 4-band uint8 pixels are compared packed into one integer (`_packed_pixels`); the
    answer is the per-band rule's on contiguous, cropped and strided mosaics, for nodata values that
    occur, that do not, and that no uint8 can hold."""
    rng = np.random.default_rng(channels)
    for nodata in ((0,) * channels, (7,) * channels, tuple(range(channels)), (300,) * channels, (1.5,) * channels):
        src = rng.integers(0, 3, (60, 70, channels)).astype(np.uint8)
        if max(nodata) < 256 and float(nodata[0]).is_integer():
            src[:10, :10] = nodata
            src[20, 30] = nodata
        for part in (src, src[5:50, 3:60], src[::2, ::3]):
            invalid = np.all(part == np.asarray(nodata, dtype=np.float64), axis=2)
            got = source_validity(part, nodata)
            if not invalid.any():
                assert got is None
            else:
                assert got is not None and np.array_equal(got, ~invalid)


@pytest.mark.parametrize("target", [
    Grid("EPSG:3857", (260000, 6230000, 290720, 6260720), 512, 512),  # the source grid: aligned crop
    Grid("EPSG:3857", (261234, 6231234, 289000, 6259000), 300, 333),  # same CRS, resampled
    Grid("EPSG:2154", (648000, 6855000, 660000, 6867000), 200, 200),  # reprojected
])
@pytest.mark.parametrize("interpolation", ["nearest", "linear", "lanczos_3"])
def test_warp_of_leading_bands_is_the_leading_bands_of_the_warp(target: Grid, interpolation: str) -> None:
    """`bands=3` of an RGBA mosaic (a style that never reads alpha) gives the first three bands
    of the whole warp and the same validity: nodata is still decided on all four bands."""
    source = Grid("EPSG:3857", (260000, 6230000, 290720, 6260720), 512, 512)
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, (512, 512, 4)).astype(np.uint8)
    src[:100, :150] = 0  # nodata hole
    src[300:320, 200:260, 3] = 0  # transparent but not nodata: colour kept, valid
    src[400:410, :, :3] = 0  # black but opaque: valid
    whole, whole_mask = warp(src, source, target, (0, 0, 0, 0), interpolation, return_mask=True)
    first, first_mask = warp(src, source, target, (0, 0, 0, 0), interpolation, return_mask=True, bands=3)
    assert first.shape == whole.shape[:2] + (3,)
    np.testing.assert_array_equal(first_mask, whole_mask)
    np.testing.assert_array_equal(first, whole[..., :3])
    assert not whole_mask.all()


@pytest.mark.parametrize("interpolation", ["nn", "linear", "bicubic", "lanczos_2", "lanczos_3"])
@pytest.mark.parametrize("scale", [0.37, 1.0, 1.05, 1.3, 3.7])
def test_tap_span_is_the_range_of_the_taps_indices(interpolation: str, scale: float) -> None:
    """warp crops the source to what the taps reach from `_tap_span`'s integer arithmetic alone;
    it must be the first and last index `_taps` gives, inside the source and past its edges."""
    from tileserver.render.warp import _tap_span, _taps, get_kernel

    kernel = get_kernel(interpolation)
    for start, count, size in ((-3.2, 40, 30), (0.0, 50, 200), (12.6, 30, 60), (-0.5, 1, 1)):
        coord = start + np.arange(count) * scale
        idx = _taps(coord, size, kernel, scale)[0]
        assert _tap_span(coord, size, kernel, scale) == (int(idx.min()), int(idx.max()) + 1)
