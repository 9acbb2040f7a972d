"""`render_tile`: tiles of another grid (a layer's extra_tilematrixsets) or another format, through the
render pipeline — what WMTS/TMS/OGC API Tiles answer when a tile cannot be passed through."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
import tifffile
from PIL import Image
from test_render_pipeline import SETTINGS, STYLES, fixture_layers  # noqa: F401 - fixture

from tileserver.render.errors import RenderError
from tileserver.render.georef import Grid
from tileserver.render.model import MapLayer
from tileserver.render.pipeline import render_map, render_tile
from tileserver.rok4.tms import load_tms


def _decode_png(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))


def _tiles_over(published, tms_id: str) -> tuple:
    """A grid, a level about as fine as the layer's bottom level, and the tiles covering the layer there."""
    tms = load_tms(tms_id, SETTINGS.tms_directory)
    from tileserver.render.georef import reproject_bbox

    box = reproject_bbox(published.native_bbox, published.tms.crs, tms.crs)
    cell = published.matrix(published.bottom_level).cell_size
    if tms.is_geographic != published.tms.is_geographic:
        cell = cell / 111319.49 if tms.is_geographic else cell * 111319.49
    matrix = tms.level_for_resolution(cell)
    return tms, matrix, matrix.bbox_to_tile_range(box)


async def test_native_tile_re_encoded_is_the_stored_tile(fixture_layers):  # noqa: F811
    published = fixture_layers["SCAN1000"]
    level = published.bottom_level
    lim = published.limits[level]
    body, mime = await render_tile(published, published.tms, level, lim.min_col, lim.min_row, None, "image/png")
    stored = published.owners[level].decode(level, await published.get_tile(level, lim.min_col, lim.min_row))
    assert mime == "image/png" and np.array_equal(_decode_png(body), stored)


async def test_tile_of_another_grid_is_the_map_of_its_extent(fixture_layers):  # noqa: F811
    published = fixture_layers["SCAN1000"]
    tms, matrix, (c0, r0, c1, r1) = _tiles_over(published, "4326")
    body, mime = await render_tile(published, tms, matrix.id, c0, r0, None, "image/png")
    tile = _decode_png(body)
    assert tile.shape == (matrix.tile_height, matrix.tile_width, 4)
    target = Grid(tms.crs, matrix.tile_bbox(c0, r0), matrix.tile_width, matrix.tile_height)
    expected = await render_map([MapLayer(published)], target)
    assert np.array_equal(tile, expected.data)
    # neighbouring tiles of the other grid join like one map
    if c1 > c0:
        right = _decode_png((await render_tile(published, tms, matrix.id, c0 + 1, r0, None, "image/png"))[0])
        both = await render_map([MapLayer(published)], Grid(tms.crs, matrix.range_bbox(c0, r0, c0 + 1, r0),
                                                            2 * matrix.tile_width, matrix.tile_height))
        assert np.abs(np.concatenate([tile, right], axis=1).astype(int) - both.data.astype(int)).max() <= 1


@pytest.mark.parametrize(("layer", "style", "fmt", "check"), [
    ("SCAN1000", None, "image/jpeg", lambda a: a.shape == (256, 256, 3)),  # JPEG from a PNG pyramid
    ("RGEALTI", "hypso", "image/png", lambda a: a.shape == (256, 256, 4) and (a[..., 3] > 0).any()),
    ("RGEALTI", "estompage", "image/jpeg", lambda a: a.shape == (256, 256, 3)),
    ("RGEALTI", "pente", "image/tiff", lambda a: a.dtype == np.float32 and (a[a != 91] <= 90).all()  # 91: nodata
     and (a != 91).any()),
    ("RGEALTI", None, "image/tiff", lambda a: a.dtype == np.float32 and (a > 50).any()),
    ("RGEALTI", None, "image/x-bil;bits=32", lambda a: a.size == 256 * 256),
])
async def test_format_conversions(fixture_layers, layer, style, fmt, check):  # noqa: F811
    published = fixture_layers[layer]
    level = published.bottom_level
    lim = published.limits[level]
    body, mime = await render_tile(published, published.tms, level, lim.min_col, lim.max_row,
                                   STYLES[style] if style else None, fmt)
    assert mime == fmt
    if fmt == "image/jpeg":
        array = simplejpeg.decode_jpeg(body)
    elif fmt == "image/png":
        array = _decode_png(body)
    elif fmt == "image/tiff":
        array = tifffile.imread(io.BytesIO(body))
    else:
        array = np.frombuffer(body, "<f4")
    assert check(array)


async def test_float_tiff_tile_holds_the_stored_heights(fixture_layers):  # noqa: F811
    published = fixture_layers["RGEALTI"]
    level = published.bottom_level
    lim = published.limits[level]
    body, _ = await render_tile(published, published.tms, level, lim.min_col, lim.max_row, None, "image/tiff")
    stored = published.owners[level].decode(level, await published.get_tile(level, lim.min_col, lim.max_row))
    assert np.array_equal(tifffile.imread(io.BytesIO(body)), stored[..., 0])


async def test_unknown_level_or_format_is_refused(fixture_layers):  # noqa: F811
    published = fixture_layers["SCAN1000"]
    with pytest.raises(RenderError):
        await render_tile(published, published.tms, "99", 0, 0, None, "image/png")
    with pytest.raises(RenderError):
        await render_tile(published, published.tms, "10", 0, 0, None, "image/gif")
