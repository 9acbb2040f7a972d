"""Map encoders: round trips through independent decoders (Pillow, tifffile), GeoTIFF tags, ASC."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from tileserver.render.encode import (
    FORMATS,
    blank_image,
    encode_image,
    exception_in_image,
    normalise_format,
)
from tileserver.render.georef import Grid

GRID = Grid("EPSG:2154", (650000.0, 6860000.0, 650400.0, 6860300.0), 80, 60)  # 5 m pixels
RNG = np.random.default_rng(11)


def decode(data: bytes) -> np.ndarray:
    """Pixels as the viewer sees them (palette PNGs expanded to RGB or RGBA)."""
    image = Image.open(io.BytesIO(data))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    return np.asarray(image)


def smooth_rgb(h: int = 60, w: int = 80) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 3, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)


# ----------------------------------------------------------------------------- PNG


@pytest.mark.parametrize("bands", [1, 2, 3, 4])
def test_png_round_trip(bands: int) -> None:
    image = (RNG.random((60, 80, bands)) * 255).astype(np.uint8)
    data, content_type = encode_image(image, "image/png")
    assert content_type == "image/png"
    decoded = decode(data)
    np.testing.assert_array_equal(decoded.reshape(image.shape), image)


def test_png_with_few_colours_is_a_palette_image() -> None:
    colours = np.array([[255, 132, 0, 255], [255, 255, 255, 0], [10, 20, 30, 128]], np.uint8)
    image = colours[RNG.integers(0, 3, (60, 80))]
    data, _ = encode_image(image, "image/png")
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P"
    np.testing.assert_array_equal(np.asarray(opened.convert("RGBA")), image)
    rgb, _ = encode_image(image[..., :3], "image/png")
    assert Image.open(io.BytesIO(rgb)).mode == "P"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rgb)).convert("RGB")), image[..., :3])
    assert len(data) < len(encode_image(image, "image/tiff")[0]) / 10


def test_png_transparency_from_nodata_and_flattening() -> None:
    image = smooth_rgb()
    image[10:20, 10:20] = 255
    data, _ = encode_image(image, "image/png", nodata=(255, 255, 255), transparent=True)
    rgba = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
    assert (rgba[10:20, 10:20, 3] == 0).all()
    assert (rgba[..., 3] == 255).sum() == 60 * 80 - 100
    # transparent=False: nodata painted with BGCOLOR, alpha composited onto it
    data, _ = encode_image(image, "image/png", nodata=(255, 255, 255), transparent=False, bgcolor=(0, 0, 255))
    flat = decode(data)
    assert flat.shape == (60, 80, 3) and (flat[10:20, 10:20] == [0, 0, 255]).all()
    half = np.zeros((4, 4, 4), np.uint8)
    half[..., 0], half[..., 3] = 200, 128
    flat = decode(encode_image(half, "image/png", transparent=False, bgcolor=(0, 0, 100))[0])
    np.testing.assert_array_equal(flat[0, 0], [100, 0, 50])
    # transparent=None (ROK4): the data's own alpha is kept
    assert decode(encode_image(half, "image/png")[0]).shape == (4, 4, 4)


def test_grey_nodata_on_colour_background_becomes_rgb() -> None:
    grey = np.full((4, 4, 1), 80, np.uint8)
    grey[0, 0] = 0
    flat = decode(encode_image(grey, "image/png", nodata=0, transparent=False, bgcolor=(255, 0, 0))[0])
    assert flat.shape == (4, 4, 3)
    np.testing.assert_array_equal(flat[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(flat[1, 1], [80, 80, 80])


# ----------------------------------------------------------------------------- JPEG


def test_jpeg_round_trip_and_alpha_dropped_onto_background() -> None:
    image = smooth_rgb()
    data, content_type = encode_image(image, "image/jpeg", quality=95)
    assert content_type == "image/jpeg" and data[:2] == b"\xff\xd8"
    assert np.abs(decode(data).astype(int) - image).mean() < 3
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent
    decoded = decode(encode_image(rgba, "image/jpeg", bgcolor=(0, 128, 255))[0])
    assert decoded.shape == (32, 32, 3)
    assert np.abs(decoded.astype(int) - [0, 128, 255]).max() <= 3
    grey = decode(encode_image(image[..., :1], "image/jpeg")[0])
    assert grey.ndim == 2


def test_jpeg_quality_changes_size() -> None:
    image = (RNG.random((64, 64, 3)) * 255).astype(np.uint8)
    small = encode_image(image, "image/jpeg", quality=20)[0]
    large = encode_image(image, "image/jpeg", quality=95)[0]
    assert len(small) < len(large)
    with pytest.raises(ValueError, match="quality"):
        encode_image(image, "image/jpeg", quality=0)


@pytest.mark.parametrize("fmt", ["image/png", "image/jpeg"])
def test_float_data_cannot_be_png_or_jpeg(fmt: str) -> None:
    with pytest.raises(ValueError, match="8-bit"):
        encode_image(np.zeros((4, 4), np.float32), fmt)


# ----------------------------------------------------------------------------- TIFF, GeoTIFF


@pytest.mark.parametrize("compression", [None, "raw", "lzw", "deflate", "packbits"])
@pytest.mark.parametrize(("dtype", "bands"), [(np.uint8, 1), (np.uint8, 3), (np.uint8, 4), (np.float32, 1), (np.float32, 2)])
def test_tiff_round_trip(compression: str | None, dtype: type, bands: int) -> None:
    image = (RNG.random((60, 80, bands)) * 250).astype(dtype)
    data, content_type = encode_image(image, "image/tiff", tiff_compression=compression)
    assert content_type == "image/tiff"
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        decoded = page.asarray()
        assert page.dtype == dtype
        assert not tif.is_geotiff
    np.testing.assert_array_equal(decoded.reshape(image.shape), image)


def test_unknown_tiff_compression() -> None:
    with pytest.raises(ValueError, match="compression"):
        encode_image(np.zeros((4, 4), np.uint8), "image/tiff", tiff_compression="jpeg2000")


@pytest.mark.parametrize(("crs", "key", "code"), [
    ("EPSG:2154", "ProjectedCSTypeGeoKey", 2154),
    ("IGNF:LAMB93", "ProjectedCSTypeGeoKey", 2154),
    ("EPSG:3857", "ProjectedCSTypeGeoKey", 3857),
    ("EPSG:4326", "GeographicTypeGeoKey", 4326),
])
def test_geotiff_georeferencing(crs: str, key: str, code: int) -> None:
    grid = Grid(crs, (2.25, 48.75, 2.35, 48.8), 80, 60) if code == 4326 else Grid(crs, GRID.bbox, 80, 60)
    dem = RNG.normal(100, 10, (60, 80)).astype(np.float32)
    data, content_type = encode_image(dem, "image/geotiff", grid=grid, nodata=-99999)
    assert content_type == "image/geotiff"
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert tif.is_geotiff
        page = tif.pages[0]
        np.testing.assert_array_equal(page.asarray(), dem)
        geo = page.geotiff_tags
        assert int(geo[key]) == code
        assert int(geo["GTModelTypeGeoKey"]) == (2 if code == 4326 else 1)
        assert int(geo["GTRasterTypeGeoKey"]) == 1  # PixelIsArea
        np.testing.assert_allclose(geo["ModelPixelScale"][:2], [grid.res_x, grid.res_y])
        np.testing.assert_allclose(geo["ModelTiepoint"], [0, 0, 0, grid.bbox[0], grid.bbox[3], 0])
        assert page.tags[42113].value == "-99999"  # GDAL_NODATA


def test_geotiff_without_epsg_code_carries_wkt() -> None:
    grid = Grid("+proj=lcc +lat_1=45 +lat_2=50 +lat_0=47 +lon_0=3 +x_0=700000 +y_0=6600000 +ellps=GRS80",
                GRID.bbox, 80, 60)
    data, _ = encode_image(smooth_rgb(), "image/geotiff", grid=grid)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        geo = tif.pages[0].geotiff_tags
        assert int(geo["ProjectedCSTypeGeoKey"]) == 32767
        assert "Lambert_Conformal_Conic" in geo["GTCitationGeoKey"]
        assert 42113 not in tif.pages[0].tags


def test_geotiff_needs_a_grid() -> None:
    with pytest.raises(ValueError, match="grid"):
        encode_image(np.zeros((4, 4), np.uint8), "image/geotiff")
    with pytest.raises(ValueError, match="grid"):
        encode_image(np.zeros((4, 4), np.uint8), "image/geotiff", grid=GRID)  # wrong size


# ----------------------------------------------------------------------------- BIL, ASC


def test_bil_is_raw_little_endian_float32_by_line() -> None:
    dem = RNG.normal(100, 10, (60, 80)).astype(np.float32)
    data, content_type = encode_image(dem, "image/x-bil;bits=32")
    assert content_type == "image/x-bil;bits=32" and len(data) == 60 * 80 * 4
    np.testing.assert_array_equal(np.frombuffer(data, "<f4").reshape(60, 80), dem)
    two = np.stack([dem, dem * 2], axis=-1)
    lines = np.frombuffer(encode_image(two, "image/x-bil;bits=32")[0], "<f4").reshape(60, 2, 80)
    np.testing.assert_array_equal(lines[:, 1], dem * 2)


def parse_asc(text: str) -> tuple[dict[str, float], np.ndarray]:
    lines = text.splitlines()
    header: dict[str, float] = {}
    while lines and lines[0].split()[0].isalpha() or lines[0].split()[0].lower() == "nodata_value":
        key, value = lines.pop(0).split()
        header[key.lower()] = float(value)
    return header, np.array([[float(v) for v in line.split()] for line in lines])


def test_ascii_grid() -> None:
    dem = np.round(RNG.normal(100, 10, (60, 80)), 2).astype(np.float32)
    dem[0, 0] = np.nan
    data, content_type = encode_image(dem, "text/asc", grid=GRID, nodata=-99999)
    assert content_type == "text/asc"
    header, values = parse_asc(data.decode("ascii"))
    assert header == {"ncols": 80, "nrows": 60, "xllcorner": 650000, "yllcorner": 6860000, "cellsize": 5,
                      "nodata_value": -99999}
    assert values.shape == (60, 80) and values[0, 0] == -99999
    np.testing.assert_allclose(values.ravel()[1:], dem.ravel()[1:], rtol=1e-6)
    rect = Grid("EPSG:4326", (2.0, 48.0, 2.8, 48.3), 80, 60)
    header, _ = parse_asc(encode_image(dem, "text/asc", grid=rect)[0].decode())
    assert header["dx"] == pytest.approx(0.01) and header["dy"] == pytest.approx(0.005)
    assert header["nodata_value"] == -99999  # NaN present: a nodata value is written anyway
    with pytest.raises(ValueError, match="one band"):
        encode_image(np.zeros((60, 80, 3), np.float32), "text/asc", grid=GRID)


# ----------------------------------------------------------------------------- formats, exceptions


def test_format_names() -> None:
    assert normalise_format(" IMAGE/PNG ") == "image/png"
    assert normalise_format("image/png; mode=8bit") == "image/png"
    assert normalise_format("image/x-bil; bits=32") == "image/x-bil;bits=32"
    assert normalise_format("image/jpg") == "image/jpeg"
    for bad in ("image/gif", "image/x-bil;bits=16", "application/json", ""):
        with pytest.raises(ValueError, match="format"):
            encode_image(np.zeros((4, 4), np.uint8), bad)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_blank_image(fmt: str) -> None:
    data, content_type = blank_image(40, 30, fmt, transparent=True, bgcolor=(10, 20, 30), nodata=-99999,
                                     grid=Grid("EPSG:2154", (0, 0, 40, 30), 40, 30))
    assert content_type == fmt
    if fmt in ("image/png", "image/jpeg"):
        pixels = decode(data)
        assert pixels.shape[:2] == (30, 40)
        if fmt == "image/png":
            assert (pixels == [10, 20, 30, 0]).all()
    elif fmt == "image/x-bil;bits=32":
        assert (np.frombuffer(data, "<f4") == -99999).all()


@pytest.mark.parametrize("fmt", ["image/png", "image/jpeg", "image/tiff", "text/asc"])
def test_exception_in_image(fmt: str) -> None:
    message = "Layer ORTHO is not defined: LayerNotDefined " * 3
    data, content_type = exception_in_image(message, 200, 100, fmt)
    assert content_type == (fmt if fmt != "text/asc" else "image/png")
    if content_type == "image/tiff":
        pixels = tifffile.imread(io.BytesIO(data))
    else:
        pixels = decode(data)
    assert pixels.shape[:2] == (100, 200)
    dark = pixels[..., :3].min(axis=-1) < 100
    assert dark.sum() > 100  # the text is drawn
    assert dark[40:].sum() > 0  # and wrapped over several lines


@pytest.mark.parametrize("bgcolor", [(255, 255, 255), (0, 0, 0), (12, 200, 77)])
def test_flattening_a_validity_alpha_equals_the_formula(bgcolor: tuple[int, int, int]) -> None:
    """Alphas of 0 and 255 only (a validity mask) are flattened band by band with bit masks; the
    result is the blending formula's, computed here in floats."""
    from tileserver.render.encode import _over_background

    rng = np.random.default_rng(11)
    colour = rng.integers(0, 256, (257, 301, 4), dtype=np.uint8)[..., :3]  # a strided view, as maps give it
    alpha = np.where(rng.random((257, 301)) < 0.4, 0, 255).astype(np.uint8)
    a = alpha[..., None].astype(np.float64) / 255
    expected = np.rint(colour * a + np.asarray(bgcolor) * (1 - a)).astype(np.uint8)
    assert np.array_equal(_over_background(colour, alpha, bgcolor), expected)


@pytest.mark.parametrize("bgcolor", [(255, 255, 255), (0, 0, 0), (12, 200, 77), (90, 90, 90)])
@pytest.mark.parametrize("bands", [4, 2])
def test_the_compiled_flattening_equals_the_formula_for_every_colour_and_alpha(bgcolor: tuple[int, int, int],
                                                                                 bands: int) -> None:
    """encode._flatten with render/_pixels.c: every colour × every alpha (65,536 pixels), RGBA and LA
    (grey onto a colour background repeats the grey), equals the float formula and numpy's path."""
    from tileserver.render import encode

    assert encode._pixels is not None  # the install builds it (README)
    grid = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), axis=-1).astype(np.uint8)
    colour, alpha = grid[..., 0], grid[..., 1]
    array = np.empty((256, 256, bands), dtype=np.uint8)
    for band in range(bands - 1):
        array[..., band] = colour
    array[..., -1] = alpha
    opts = encode._Options(nodata=None, transparent=None, bgcolor=bgcolor, quality=None, grid=None, tiff_compression=None)
    flat = encode._flatten(array, opts)
    grey_bg = len(set(bgcolor)) == 1
    out_bands = 1 if bands == 2 and grey_bg else 3
    a = alpha[..., None].astype(np.float64) / 255
    expected = np.rint(colour[..., None] * a + np.asarray(bgcolor[:out_bands]) * (1 - a)).astype(np.uint8)
    assert flat.shape == (256, 256, out_bands) and np.array_equal(flat, expected)
    view = array[..., : bands - 1] if out_bands == bands - 1 else np.repeat(array[..., :1], 3, axis=2)
    assert np.array_equal(encode._over_background(view, array[..., -1], bgcolor[:out_bands]), flat)


@pytest.mark.parametrize("fmt", ["image/jpeg", "image/png", "image/tiff", "image/geotiff", "image/x-bil;bits=32",
                                 "image/nonsense"])
@pytest.mark.parametrize("transparent", [None, True, False])
def test_flattened_onto_names_what_the_encoder_does(fmt: str, transparent: bool | None) -> None:
    """`flattened_onto` (what the renderer draws a data layer onto, draw.composite) says exactly when
    the encoder lays alpha on the background: there an RGBA picture with 0/255 alpha and the RGB it
    would give encode alike; elsewhere the alpha is kept (or the format takes no picture)."""
    from tileserver.render.draw import _on_background
    from tileserver.render.encode import flattened_onto

    colour = (12, 200, 7)
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    valid = rng.random((24, 32)) > 0.3
    rgba = np.concatenate([rgb, (valid * 255).astype(np.uint8)[..., None]], axis=2)
    grid = Grid("EPSG:3857", (0, 0, 32, 24), 32, 24)
    onto = flattened_onto(fmt, transparent, colour)

    def encoded(image: np.ndarray) -> bytes | None:
        try:
            return encode_image(image, fmt, transparent=transparent, bgcolor=colour, grid=grid)[0]
        except ValueError:  # float-only or unknown format
            return None

    whole = encoded(rgba)
    if onto is not None:
        assert onto == colour and whole is not None
        assert encoded(_on_background(rgb, valid, colour)) == whole
    else:
        assert whole is None or whole != encoded(_on_background(rgb, valid, colour))
