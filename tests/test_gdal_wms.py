"""GDAL's WMS driver and OWSLib against the real server, layer by layer (issue 12 item 1).

GDAL is opened on the bare GetMap URL (`WMS:http://…/wms?SERVICE=WMS&…&LAYERS=…&CRS=…&BBOX=…`), with no
open option: it builds its own GDAL_WMS description (image/jpeg, TRANSPARENT=FALSE, 1024-pixel blocks,
20 overviews) and asks for maps the way it always does. The references are independent of GDAL: our
GetMap over the same box and size, and the stored tiles read from the slab files. Needs gdal-bin
(Debian: `apt-get install gdal-bin`); the GDAL tests are skipped without it.
"""

from __future__ import annotations

import io
import json
import shutil

import httpx
import numpy as np
import pytest
from apputil import DATA, PYRAMIDS, live_server, make_settings
from PIL import Image
from test_gdal_clients import LAYERS, bottom_extent, geotransform, run, stored_pixels, translate
from test_tms_service import AUTH, TMS_DIR, descriptor_for, stored_tile

from tileserver.rok4.tms import load_tms

gdal = pytest.mark.skipif(
    shutil.which("gdal_translate") is None or shutil.which("gdalinfo") is None,
    reason="GDAL's command-line tools are not installed (Debian: apt-get install gdal-bin)",
)
STYLES = ["normal", "hypso", "estompage"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A live server with the four fixtures; the DEM with the styles it is drawn in."""
    tmp = tmp_path_factory.mktemp("gdalwms")
    settings = make_settings(tmp, styles_directory=str(DATA / "styles"))
    with live_server(settings) as url:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            for name in LAYERS:
                desc = descriptor_for(PYRAMIDS / f"{name}.json", styles=STYLES, get_feature_info={"type": "PYRAMID"})
                answer = http.post(f"/admin/layers/{name}", json=desc)
                assert answer.status_code == 204, answer.text
        yield url


def native(name: str) -> tuple[str, tuple[float, float, float, float], float]:
    """(CRS code, extent of the bottom level's limits easting first, cell size) from the descriptor.

    The extent is rounded to 8 decimals, as GDAL prints a BBOX (`%.8f`): the maps GDAL asks for and
    the references asked here then cover the very same doubles. (A map is not invariant under a shift
    of a billionth of a pixel: a nodata-coverage weight sitting on the threshold may flip.)"""
    desc = json.loads((PYRAMIDS / f"{name}.json").read_text())
    crs = load_tms(desc["tile_matrix_set"], TMS_DIR).crs
    _, _, extent, cell = bottom_extent(name)
    return crs, tuple(round(v, 8) for v in extent), cell  # type: ignore[return-value]


def wms_box(crs: str, extent: tuple[float, float, float, float]) -> str:
    """BBOX in WMS 1.3.0's axis order: EPSG:4326 is latitude first."""
    x0, y0, x1, y1 = extent
    values = (y0, x0, y1, x1) if crs == "EPSG:4326" else extent
    return ",".join(repr(v) for v in values)


def getmap(http: httpx.Client, name: str, crs: str, box: str, width: int, height: int, fmt: str,
           transparent: bool = False) -> np.ndarray:
    answer = http.get("/wms", params={"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": name,
                                      "STYLES": "", "CRS": crs, "BBOX": box, "WIDTH": width, "HEIGHT": height,
                                      "FORMAT": fmt, "TRANSPARENT": str(transparent).upper()})
    assert answer.status_code == 200 and answer.headers["content-type"] == fmt, answer.text
    return np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGBA" if transparent else "RGB"))


def smallest_overview(source: str) -> tuple[int, int]:
    """The coarsest overview GDAL offers for a source: reading the whole raster at that size costs GDAL
    exactly one GetMap of that size over the whole box (one block, requests clamped to the raster)."""
    done = run("gdalinfo", "-json", source)
    assert done.returncode == 0 and "ERROR" not in done.stderr, done.stderr
    overviews = json.loads(done.stdout)["bands"][0]["overviews"]
    return tuple(min((o["size"] for o in overviews), key=lambda s: s[0]))  # type: ignore[return-value]


@gdal
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("fmt", [None, "image/png"])
def test_gdal_wms_getmap_url_reads_every_layer(base, tmp_path, name, fmt):
    """No FORMAT: GDAL asks for JPEG (its default); FORMAT=image/png: lossless, compared exactly."""
    crs, extent, _ = native(name)
    box = wms_box(crs, extent)
    url = f"{base}/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetMap&LAYERS={name}&CRS={crs}&BBOX={box}"
    if fmt:
        url += f"&FORMAT={fmt}"
    source = f"WMS:{url}"
    (ox, _, _, oy, _, _), _ = geotransform(source)
    assert abs(ox - extent[0]) < 1e-6 * max(abs(ox), 1) and abs(oy - extent[3]) < 1e-6 * max(abs(oy), 1)
    width, height = smallest_overview(source)
    pixels = translate(source, tmp_path / "out.tif", "-outsize", str(width), str(height))[..., :3]
    with httpx.Client(base_url=base, timeout=60) as http:
        expected = getmap(http, name, crs, box, width, height, fmt or "image/jpeg")
    assert pixels.shape == expected.shape
    assert len(np.unique(expected.reshape(-1, 3), axis=0)) > 10  # a map, not a blank
    difference = np.abs(pixels.astype(int) - expected.astype(int))
    if fmt == "image/png":
        assert difference.max() == 0
    else:  # the same JPEG decoded by GDAL's libjpeg and Pillow's
        assert difference.mean() < 1 and difference.max() <= 8


@gdal
@pytest.mark.parametrize("name", ["SCAN1000", "MONTAGNE", "BDPARCELLAIRE"])
def test_gdal_wms_at_the_bottom_resolution_shows_the_stored_tiles(base, tmp_path, name):
    """A GDAL_WMS description with the WMS service, sized to the bottom level's pixels over its first
    tile: GDAL's pixels are the stored tile's where it has data (WMS resamples nothing at its own grid)."""
    crs, _, _ = native(name)
    level, (c0, r0, c1, r1), _, _ = bottom_extent(name)
    # the bottom tile with the most data
    c0, r0 = max(((c, r) for c in range(c0, c1 + 1) for r in range(r0, r1 + 1)),
                 key=lambda t: (stored_pixels(name, level, *t)[..., :3] < 255).any(axis=-1).sum())
    desc = json.loads((PYRAMIDS / f"{name}.json").read_text())
    x0, y0, x1, y1 = load_tms(desc["tile_matrix_set"], TMS_DIR).get(level).tile_bbox(c0, r0)
    order = "<BBoxOrder>yxYX</BBoxOrder>" if crs == "EPSG:4326" else ""  # GDAL does not swap by itself here
    xml = tmp_path / "wms.xml"
    xml.write_text(f"""<GDAL_WMS>
  <Service name="WMS"><Version>1.3.0</Version><ServerUrl>{base}/wms?</ServerUrl><Layers>{name}</Layers>
    <CRS>{crs}</CRS><ImageFormat>image/png</ImageFormat><Transparent>TRUE</Transparent>{order}</Service>
  <DataWindow><UpperLeftX>{x0!r}</UpperLeftX><UpperLeftY>{y1!r}</UpperLeftY><LowerRightX>{x1!r}</LowerRightX>
    <LowerRightY>{y0!r}</LowerRightY><SizeX>256</SizeX><SizeY>256</SizeY></DataWindow>
  <BandsCount>4</BandsCount><BlockSizeX>256</BlockSizeX><BlockSizeY>256</BlockSizeY>
</GDAL_WMS>""")
    pixels = translate(str(xml), tmp_path / "out.tif")
    expected = stored_pixels(name, level, c0, r0)
    # data: opaque, and not white (BDPARCELLAIRE is grey with white as nodata, transparent in a map)
    visible = (expected[..., 3] == 255) & (expected[..., :3] < 255).any(axis=-1)
    assert visible.mean() > 0.02
    assert (pixels[..., 3][visible] == 255).all()
    assert (pixels[..., :3][visible] == expected[..., :3][visible]).all()


# --- OWSLib: what the other tests do not cover yet --------------------------------------------------
# (test_wms_conformance: getmap of RGEALTI and SCAN1000; test_wmts_conformance: gettile of SCAN1000 and
#  BDPARCELLAIRE; test_tms_service: TileMapService)


@pytest.mark.parametrize("name", LAYERS)
def test_owslib_wms_getmap_per_layer(base, name):
    from owslib.wms import WebMapService

    service = WebMapService(f"{base}/wms", version="1.3.0")
    layer = service[name]
    crs, extent, _ = native(name)
    assert crs in layer.crsOptions
    width, height = 256, 256
    image = service.getmap(layers=[name], styles=[""], srs=crs, bbox=extent, size=(width, height),
                           format="image/png", transparent=True)
    pixels = np.asarray(Image.open(io.BytesIO(image.read())).convert("RGBA"))
    with httpx.Client(base_url=base, timeout=60) as http:
        expected = getmap(http, name, crs, wms_box(crs, extent), width, height, "image/png", transparent=True)
    assert len(np.unique(expected.reshape(-1, 4), axis=0)) > 10
    assert (pixels == expected).all()  # OWSLib orders the box for the CRS as we do


@pytest.mark.parametrize("name", LAYERS)
def test_owslib_wmts_gettile_per_layer(base, name):
    from owslib.wmts import WebMapTileService

    service = WebMapTileService(f"{base}/wmts/1.0.0/WMTSCapabilities.xml")
    layer = service.contents[name]
    desc = json.loads((PYRAMIDS / f"{name}.json").read_text())
    grid = desc["tile_matrix_set"]
    level, (c0, r0, _, _), _, _ = bottom_extent(name)
    limits = layer.tilematrixsetlinks[grid].tilematrixlimits[level]
    assert limits.mintilecol <= c0 <= limits.maxtilecol and limits.mintilerow <= r0 <= limits.maxtilerow
    stored_format = {"SCAN1000": "image/png", "MONTAGNE": "image/png", "BDPARCELLAIRE": "image/png",
                     "RGEALTI": "image/x-bil;bits=32"}[name]
    assert stored_format in layer.formats
    tile = service.gettile(layer=name, tilematrixset=grid, tilematrix=level, row=r0, column=c0,
                           format=stored_format, style="normal")
    body = tile.read()
    stored = stored_tile(PYRAMIDS / f"{name}.json", level, c0, r0)
    if name == "RGEALTI":  # stored deflated; OWSLib (requests) accepts deflate and inflates it
        import zlib

        assert body == zlib.decompress(stored)
        for style in ("hypso", "estompage"):  # the DEM's pictures
            picture = service.gettile(layer=name, tilematrixset=grid, tilematrix=level, row=r0, column=c0,
                                      format="image/png", style=style).read()
            assert len(np.unique(np.asarray(Image.open(io.BytesIO(picture))).reshape(-1, 4), axis=0)) > 10
    else:
        assert body == stored
