"""TMS offers every drawing style of a layer as a TileMap of its own (issue 12 item 8 over TMS): a DEM
(RGEALTI, float32 BIL) is also `RGEALTI:hypso` and `RGEALTI:estompage`, PNG tiles drawn by the render
pipeline, listed in the TileMapService with a TileMap, a TileJSON and, on a quad-tree grid, a gdal.xml.
Real HTTP against uvicorn; GDAL's command-line tools where installed.
"""

from __future__ import annotations

import io
import json
import shutil

import httpx
import numpy as np
import pytest
from apputil import DATA, PYRAMIDS, live_server, make_settings
from lxml import etree
from PIL import Image
from test_gdal_clients import LAYERS, bottom_extent, run, stored_pixels
from test_tms_service import AUTH, descriptor_for

STYLES = ["normal", "hypso", "estompage"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tmsstyles")
    settings = make_settings(tmp, styles_directory=str(DATA / "styles"))
    with live_server(settings) as url:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            for name in LAYERS:
                answer = http.post(f"/admin/layers/{name}", json=descriptor_for(PYRAMIDS / f"{name}.json", styles=STYLES))
                assert answer.status_code == 204, answer.text
        yield url


def picture(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))


def test_every_style_tilemap_is_listed_and_served(base):
    with httpx.Client(base_url=base, timeout=60) as http:
        root = etree.fromstring(http.get("/tms/1.0.0").content)
        tilemaps = {t.get("href").rsplit("/", 1)[1]: t for t in root.iterfind("TileMaps/TileMap")}
        # the DEM's pictures; an RGB picture takes no palette or hillshade, so it has no such TileMap
        assert {"RGEALTI", "RGEALTI:hypso", "RGEALTI:estompage"} <= set(tilemaps)
        assert "SCAN1000:hypso" not in tilemaps and "SCAN1000:normal" not in tilemaps
        styled = [name for name in tilemaps if ":" in name]
        for name in styled:
            layer, style = name.split(":")
            assert tilemaps[name].get("extension") == "png"
            tilemap = etree.fromstring(http.get(f"/tms/1.0.0/{name}").content)
            assert tilemap.find("TileFormat").get("mime-type") == "image/png"
            for tileset in tilemap.iterfind("TileSets/TileSet"):
                level = tileset.get("href").rsplit("/", 1)[1]
                rows = (int(tileset.get("minrow")), int(tileset.get("maxrow")))
                cols = (int(tileset.get("mincol")), int(tileset.get("maxcol")))
                for row in rows:
                    for col in cols:
                        tile = http.get(f"/tms/1.0.0/{name}/{level}/{col}/{row}.png")
                        assert tile.status_code == 200 and tile.headers["content-type"] == "image/png", (
                            name, level, tile.text)
            # the bottom tile is the one WMTS draws in that style
            level, (c0, r0, _, _), _, _ = bottom_extent(layer)
            tile = http.get(f"/tms/1.0.0/{name}/{level}/{c0}/{r0}.png")
            caps_grid = json.loads((PYRAMIDS / f"{layer}.json").read_text())["tile_matrix_set"]
            wmts = http.get(f"/wmts/1.0.0/{layer}/{style}/{caps_grid}/{level}/{r0}/{c0}.png")
            assert wmts.status_code == 200 and tile.content == wmts.content
            if layer == "RGEALTI":
                assert len(np.unique(picture(tile.content).reshape(-1, 4), axis=0)) > 10
        # not a style of the layer, or a style on an extra grid: TMS's own 400
        for bad in ("RGEALTI:nothing", "RGEALTI:normal", "SCAN1000:hypso"):
            answer = http.get(f"/tms/1.0.0/{bad}")
            assert answer.status_code == 400 and b"TileMapServerError" in answer.content
        assert http.get(f"/tms/1.0.0/RGEALTI:hypso/{level}/{c0}/{r0}.bil").status_code == 400


def test_tilejson_of_a_style_names_png_tiles(base):
    with httpx.Client(base_url=base, timeout=60) as http:
        doc = http.get("/tms/1.0.0/RGEALTI:hypso/metadata.json").json()
        assert doc["format"] == "png" and doc["tiles"][0].endswith("/tms/1.0.0/RGEALTI:hypso/{z}/{x}/{y}.png")
        level, (c0, r0, _, _), _, _ = bottom_extent("RGEALTI")
        url = doc["tiles"][0].replace("{z}", level).replace("{x}", str(c0)).replace("{y}", str(r0))
        tile = http.get(url)
        assert tile.status_code == 200 and tile.headers["content-type"] == "image/png"


@pytest.mark.skipif(shutil.which("gdal_translate") is None, reason="GDAL's command-line tools are not installed")
def test_gdal_reads_a_style_tilemap(base, tmp_path):
    """gdal.xml of a style TileMap on a quad-tree grid (BDPARCELLAIRE, grey, in 4326) drawn in hypso:
    GDAL's pixels over the bottom tile are the TMS tile's."""
    import tifffile

    with httpx.Client(base_url=base, timeout=60) as http:
        assert "BDPARCELLAIRE:hypso" in http.get("/tms/1.0.0").text
        description = http.get("/tms/1.0.0/BDPARCELLAIRE:hypso/gdal.xml")
        assert description.status_code == 200 and b"<BandsCount>4</BandsCount>" in description.content
        level, (c0, r0, c1, r1), _, _ = bottom_extent("BDPARCELLAIRE")
        c0, r0 = max(((c, r) for c in range(c0, c1 + 1) for r in range(r0, r1 + 1)),  # the most data
                     key=lambda t: (stored_pixels("BDPARCELLAIRE", level, *t)[..., :3] < 255).any(axis=-1).sum())
        expected = picture(http.get(f"/tms/1.0.0/BDPARCELLAIRE:hypso/{level}/{c0}/{r0}.png").content)
    from tileserver.rok4.tms import load_tms

    x0, y0, x1, y1 = load_tms("4326").get(level).tile_bbox(c0, r0)
    out = tmp_path / "out.tif"
    done = run("gdal_translate", "-q", "-projwin", repr(x0), repr(y1), repr(x1), repr(y0),
               f"{base}/tms/1.0.0/BDPARCELLAIRE:hypso/gdal.xml", str(out))
    assert done.returncode == 0 and "ERROR" not in done.stderr, done.stderr
    pixels = tifffile.imread(out)
    assert pixels.shape == (256, 256, 4)
    assert (pixels == expected).all()
    assert (expected[..., 3] == 255).mean() > 0.02  # the parcels drawn in the palette
