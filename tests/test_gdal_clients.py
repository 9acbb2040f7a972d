"""Real tile clients against the real server: GDAL's command-line tools (WMTS driver, WMS driver with
its TMS minidriver and TileMap reader) on uvicorn over loopback, every fixture layer published.

References are independent of the server: stored tiles are read from the slab files
(test_tms_service.stored_tile) and decoded here; extents come from the pyramid descriptors and the
tile matrix sets. Needs gdal-bin (Debian: `apt-get install gdal-bin`); skipped without it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from apputil import DATA, PYRAMIDS, live_server, make_settings
from lxml import etree
from PIL import Image
from test_tms_service import AUTH, TMS_DIR, descriptor_for, stored_tile

from tileserver.rok4.tms import load_tms

pytestmark = pytest.mark.skipif(
    shutil.which("gdal_translate") is None or shutil.which("gdalinfo") is None,
    reason="GDAL's command-line tools are not installed (Debian: apt-get install gdal-bin)",
)

NS = {"w": "http://www.opengis.net/wmts/1.0", "ows": "http://www.opengis.net/ows/1.1"}
LAYERS = ("SCAN1000", "MONTAGNE", "BDPARCELLAIRE", "RGEALTI")
CAPABILITIES = "/wmts/1.0.0/WMTSCapabilities.xml"


def bottom_extent(name: str) -> tuple[str, tuple[int, int, int, int], tuple[float, float, float, float], float]:
    """(bottom level, its limits (c0, r0, c1, r1), their extent, cell size) from the descriptor alone."""
    desc = json.loads((PYRAMIDS / f"{name}.json").read_text())
    tms = load_tms(desc["tile_matrix_set"], TMS_DIR)
    level = min(desc["levels"], key=lambda lv: tms.get(lv["id"]).cell_size)
    lim = level["tile_limits"]
    limits = (lim["min_col"], lim["min_row"], lim["max_col"], lim["max_row"])
    matrix = tms.get(level["id"])
    return level["id"], limits, matrix.range_bbox(*limits), matrix.cell_size


def run(*args: str) -> subprocess.CompletedProcess:
    """A GDAL tool run in a fresh directory: its WMS block cache (./gdalwmscache) starts empty and
    stays out of the source tree, so every run asks the server."""
    with tempfile.TemporaryDirectory(prefix="gdal-") as work:
        env = {**os.environ, "GDAL_DEFAULT_WMS_CACHE_PATH": f"{work}/cache", "GDAL_HTTP_TIMEOUT": "60"}
        return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=work, check=False)


def translate(source: str, out: Path, *options: str) -> np.ndarray:
    """gdal_translate to GeoTIFF; fails the test on any GDAL error. Returns (rows, cols, bands)."""
    done = run("gdal_translate", "-q", "-of", "GTiff", *options, source, str(out))
    assert done.returncode == 0 and "ERROR" not in done.stderr, done.stderr
    pixels = tifffile.imread(out)
    return pixels if pixels.ndim == 3 else pixels[..., None]


def geotransform(path: Path | str) -> tuple[list[float], list[int]]:
    done = run("gdalinfo", "-json", str(path))
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    return info["geoTransform"], info["size"]


def stored_pixels(name: str, level: str, col: int, row: int) -> np.ndarray:
    """A stored PNG tile decoded here, RGBA."""
    data = stored_tile(PYRAMIDS / f"{name}.json", level, col, row)
    assert data is not None
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A live server with the four fixtures; the DEM with the styles it is drawn in."""
    tmp = tmp_path_factory.mktemp("gdal")
    settings = make_settings(tmp, styles_directory=str(DATA / "styles"))
    with live_server(settings) as url:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            for name in LAYERS:
                desc = descriptor_for(PYRAMIDS / f"{name}.json", styles=["normal", "hypso", "estompage"])
                answer = http.post(f"/admin/layers/{name}", json=desc)
                assert answer.status_code == 204, answer.text
        yield url


# --- WMTS: GDAL's driver, no open option ----------------------------------------------------------


@pytest.mark.parametrize("name", LAYERS)
def test_gdal_wmts_reads_every_layer(base, tmp_path, name):
    level, (c0, r0, c1, r1), (x0, y0, x1, y1), cell = bottom_extent(name)
    source = f"WMTS:{base}{CAPABILITIES},layer={name}"
    pixels = translate(source, tmp_path / "out.tif")
    # the raster is the layer's extent at the bottom level's resolution: no tile outside the limits asked
    (ox, px, _, oy, _, py), (width, height) = geotransform(tmp_path / "out.tif")
    assert (width, height) == ((c1 - c0 + 1) * 256, (r1 - r0 + 1) * 256)
    assert abs(ox - x0) < cell / 100 and abs(oy - y1) < cell / 100 and abs(px / cell - 1) < 1e-6
    top_left = pixels[:256, :256]
    if name == "RGEALTI":  # a DEM: GDAL takes the first Format, a PNG drawn in the layer's first style
        with httpx.Client(base_url=base) as http:
            tile = http.get(f"/wmts/1.0.0/{name}/hypso/LAMB93_1M_MNT/{level}/{r0}/{c0}.png")
        assert tile.status_code == 200
        expected = np.asarray(Image.open(io.BytesIO(tile.content)).convert("RGBA"))
        assert len(np.unique(expected.reshape(-1, 4), axis=0)) > 10
    else:
        expected = stored_pixels(name, level, c0, r0)
    visible = expected[..., 3] > 0
    assert visible.any()
    assert (top_left[..., 3][visible] == 255).all()
    assert (top_left[..., :3][visible] == expected[..., :3][visible]).all()


def test_wmts_layers_carry_their_extent_in_their_crs(base):
    with httpx.Client(base_url=base) as http:
        root = etree.fromstring(http.get(CAPABILITIES).content)
    for name in LAYERS:
        layer = root.find(f"w:Contents/w:Layer[ows:Identifier='{name}']", NS)
        link = layer.findtext("w:TileMatrixSetLink/w:TileMatrixSet", namespaces=NS)
        crs = root.findtext(f"w:Contents/w:TileMatrixSet[ows:Identifier='{link}']/ows:SupportedCRS", namespaces=NS)
        (bbox,) = [b for b in layer.findall("ows:BoundingBox", NS) if b.get("crs") == crs]
        lower = [float(v) for v in bbox.findtext("ows:LowerCorner", namespaces=NS).split()]
        upper = [float(v) for v in bbox.findtext("ows:UpperCorner", namespaces=NS).split()]
        if name == "BDPARCELLAIRE":  # EPSG:4326 is latitude first
            lower, upper = lower[::-1], upper[::-1]
        _, _, extent, cell = bottom_extent(name)
        for got, want in zip(lower + upper, extent, strict=True):
            assert abs(got - want) < cell / 100  # the extent, inset by a sliver of a pixel
        assert lower[0] > extent[0] and upper[1] < extent[3]


def test_zooming_past_the_bottom_level_shows_the_data(base, tmp_path):
    """The full grid PM goes to level 21 where MONTAGNE stops at 17: GDAL reads level 21 there."""
    source = f"WMTS:{base}{CAPABILITIES},layer=MONTAGNE,tilematrixset=PM"
    (_, px, _, _, _, _), (width, height) = geotransform(source)
    level, (c0, r0, c1, r1), _, cell = bottom_extent("MONTAGNE")
    assert abs(px * 16 / cell - 1) < 1e-6 and (width, height) == (512 * 16, 512 * 16)
    bottom = np.concatenate([np.concatenate([stored_pixels("MONTAGNE", level, c, r) for c in range(c0, c1 + 1)], axis=1)
                             for r in range(r0, r1 + 1)], axis=0)
    # a 16 × 16 block of opaque bottom pixels, read at level 21 where each of them is 16 × 16 pixels
    by, bx = next((y, x) for y in range(16, 480, 16) for x in range(16, 480, 16)
                  if (bottom[y - 2:y + 18, x - 2:x + 18, 3] == 255).all())
    deep = translate(source, tmp_path / "deep.tif", "-srcwin", str(bx * 16), str(by * 16), "256", "256")
    assert (deep[..., 3] > 200).all()  # opaque (a kernel reaching transparent pixels may shave a little)
    centres = deep[8::16, 8::16, :3].astype(int)  # the centres of the bottom pixels, magnified
    assert np.abs(centres - bottom[by:by + 16, bx:bx + 16, :3].astype(int)).max() <= 24


def test_below_the_bottom_level_outside_the_data_is_the_nodata_tile(base):
    with httpx.Client(base_url=base) as http:
        far = http.get("/wmts/1.0.0/MONTAGNE/normal/PM/19/0/0.png")
        assert far.status_code == 200
        assert not np.asarray(Image.open(io.BytesIO(far.content)).convert("RGBA"))[..., 3].any()


# --- TMS: gdal.xml and a TileMap GDAL reads ---------------------------------------------------------


@pytest.mark.parametrize("name", ["SCAN1000", "MONTAGNE", "BDPARCELLAIRE"])
def test_gdal_xml_and_the_osgeo_tilemap_read_the_stored_tiles(base, tmp_path, name):
    with httpx.Client(base_url=base) as http:
        assert http.get(f"/tms/1.0.0/{name}/gdal.xml").content.startswith(b"<GDAL_WMS>")
    level, (c0, r0, _, _), (x0, y0, x1, y1), cell = bottom_extent(name)
    window = ("-projwin", repr(x0), repr(y1), repr(x1), repr(y0))
    expected = stored_pixels(name, level, c0, r0)
    visible = expected[..., 3] > 0
    for i, source in enumerate((f"{base}/tms/1.0.0/{name}/gdal.xml", f"{base}/tms/osgeo/1.0.0/{name}")):
        info = run("gdalinfo", source)
        assert info.returncode == 0 and "ERROR" not in info.stderr, info.stderr
        pixels = translate(source, tmp_path / f"{i}.tif", *window)
        (ox, _, _, oy, _, _), _ = geotransform(tmp_path / f"{i}.tif")
        assert abs(ox - x0) < cell / 100 and abs(oy - y1) < cell / 100
        # GDAL's TileMap reader makes 3 bands whatever the tiles hold: compare colours where there is data
        assert (pixels[:256, :256, :3][visible] == expected[..., :3][visible]).all()


@pytest.mark.parametrize("view", ["RGEALTI", "RGEALTI:hypso"])
def test_gdal_xml_of_a_dem_in_a_grid_gdal_cannot_describe_is_a_clear_400(base, view):
    """RGEALTI (BIL, LAMB93_1M_MNT) has no gdal.xml: GDAL's TMS minidriver needs a quad tree numbered
    by zoom, which LAMB93_1M_MNT is not, so any description would put tiles in the wrong place. The
    server answers 400 with a TileMapServerError naming the reason (its own style or the raw data
    alike), and GDAL, asked to open it, fails reporting the 400 rather than reading a wrong raster.
    GDAL reads the DEM through WMTS instead (test_gdal_wmts_reads_every_layer)."""
    with httpx.Client(base_url=base) as http:
        answer = http.get(f"/tms/1.0.0/{view}/gdal.xml")
        assert answer.status_code == 400 and answer.headers["content-type"].startswith("text/xml")
        message = etree.fromstring(answer.content).findtext("Message")
        assert "LAMB93_1M_MNT" in message and "RGEALTI" in message and "not a quad tree" in message
        assert http.get(f"/tms/1.0.0/{view}").status_code == 200  # the layer itself is served
    opened = run("gdalinfo", f"{base}/tms/1.0.0/{view}/gdal.xml")
    assert opened.returncode != 0 and "400" in opened.stderr, opened.stderr


def test_osgeo_tiles_count_rows_from_the_bottom(base):
    level, (c0, r0, _, _), _, _ = bottom_extent("SCAN1000")
    height = load_tms("PM", TMS_DIR).get(level).matrix_height
    with httpx.Client(base_url=base) as http:
        rok4 = http.get(f"/tms/1.0.0/SCAN1000/{level}/{c0}/{r0}.png")
        osgeo = http.get(f"/tms/osgeo/1.0.0/SCAN1000/{level}/{c0}/{height - 1 - r0}.png")
        assert rok4.status_code == osgeo.status_code == 200 and rok4.content == osgeo.content
        assert rok4.content == stored_tile(PYRAMIDS / "SCAN1000.json", level, c0, r0)
        root = etree.fromstring(http.get("/tms/osgeo/1.0.0/SCAN1000").content)
        assert root.find("TileSets").get("profile") == "global-mercator"
        assert [t.get("order") for t in root.iterfind("TileSets/TileSet")] == [str(z) for z in range(11)]
        not_quad = http.get("/tms/osgeo/1.0.0/RGEALTI")  # LAMB93_1M_MNT is not a quad tree
        assert not_quad.status_code == 400 and b"TileMapServerError" in not_quad.content


# --- DEM: every advertised pair, BIL for clients without deflate ------------------------------------


def test_every_advertised_style_and_format_is_served(base):
    with httpx.Client(base_url=base) as http:
        root = etree.fromstring(http.get(CAPABILITIES).content)
        for layer in root.iterfind("w:Contents/w:Layer", NS):
            name = layer.findtext("ows:Identifier", namespaces=NS)
            level, (c0, r0, _, _), _, _ = bottom_extent(name)
            link = layer.findtext("w:TileMatrixSetLink/w:TileMatrixSet", namespaces=NS)
            styles = [s.findtext("ows:Identifier", namespaces=NS) for s in layer.iterfind("w:Style", NS)]
            for url in layer.iterfind("w:ResourceURL[@resourceType='tile']", NS):
                for style in styles:
                    path = (url.get("template").replace(base, "").replace("{Style}", style)
                            .replace("{TileMatrixSet}", link).replace("{TileMatrix}", level)
                            .replace("{TileRow}", str(r0)).replace("{TileCol}", str(c0)))
                    answer = http.get(path)
                    assert answer.status_code == 200, (name, style, url.get("format"), answer.text)
                    assert answer.headers["content-type"] == url.get("format")
        dem = root.find("w:Contents/w:Layer[ows:Identifier='RGEALTI']", NS)
        assert dem.find("w:ResourceURL", NS).get("format") == "image/png"  # GDAL reads the first one


@pytest.mark.parametrize("kvp", [False, True])
def test_bil_is_inflated_for_a_client_without_deflate(base, kvp):
    level, (c0, r0, _, _), _, _ = bottom_extent("RGEALTI")
    stored = stored_tile(PYRAMIDS / "RGEALTI.json", level, c0, r0)
    if kvp:
        path = ("/wmts?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=RGEALTI&STYLE=normal"
                f"&FORMAT=image/x-bil;bits=32&TILEMATRIXSET=LAMB93_1M_MNT&TILEMATRIX={level}"
                f"&TILEROW={r0}&TILECOL={c0}")
    else:  # the fast path's shape
        path = f"/wmts/1.0.0/RGEALTI/normal/LAMB93_1M_MNT/{level}/{r0}/{c0}.bil"
    with httpx.Client(base_url=base) as http:
        for accept, deflated in (("gzip, deflate", True), ("identity", False), ("gzip", False),
                                 ("deflate;q=0", False), ("*", True)):
            for _ in range(2):  # the first request settles the fast path's route, the second takes it
                with http.stream("GET", path, headers={"Accept-Encoding": accept}) as answer:
                    raw = b"".join(answer.iter_raw())
                assert answer.status_code == 200
                assert "Accept-Encoding" in answer.headers["vary"]
                if deflated:
                    assert answer.headers["content-encoding"] == "deflate" and raw == stored
                else:
                    assert "content-encoding" not in answer.headers
                    assert raw == zlib.decompress(stored) and len(raw) == 256 * 256 * 4
        # no Accept-Encoding at all (curl without --compressed): inflated too
        bare = subprocess.run(["curl", "-s", "-H", "Accept-Encoding:", f"{base}{path}"],
                              capture_output=True, timeout=60, check=False) if shutil.which("curl") else None
        if bare is not None:
            assert bare.stdout == zlib.decompress(stored)
