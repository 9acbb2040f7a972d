"""WMTS tiles the pyramid cannot pass through: a layer's extra grids (reprojected) and other formats."""

from __future__ import annotations

import io

import numpy as np
from apputil import app_client, layer_descriptor, make_settings
from lxml import etree
from PIL import Image
from test_wmts import CAPABILITIES_SCHEMA, assert_valid

from tileserver.publication.model import parse_layer
from tileserver.render.georef import Grid
from tileserver.rok4.tms import load_tms
from tileserver.settings import load_settings

NS = {"wmts": "http://www.opengis.net/wmts/1.0", "ows": "http://www.opengis.net/ows/1.1"}
TMS_DIR = load_settings(env={}).tms_directory


def get_tile(tms: str, level: str, row: int, col: int, fmt: str = "image/png") -> str:
    return ("/wmts?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=M&STYLE=normal"
            f"&TILEMATRIXSET={tms}&TILEMATRIX={level}&TILEROW={row}&TILECOL={col}&FORMAT={fmt}")


async def test_extra_grid_and_format_conversion(tmp_path):
    async with app_client(make_settings(tmp_path)) as client:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("M", layer_descriptor("MONTAGNE", extra_tilematrixsets=["4326"])))
        await runtime.refresh()
        published = runtime.catalog.layers["M"]
        caps = await client.get("/wmts?SERVICE=WMTS&REQUEST=GetCapabilities")
        root = assert_valid(CAPABILITIES_SCHEMA, caps.content)
        layer = root.find(".//wmts:Contents/wmts:Layer", NS)
        links = [e.text for e in layer.findall("wmts:TileMatrixSetLink/wmts:TileMatrixSet", NS)]
        assert "4326" in links
        assert {e.text for e in layer.findall("wmts:Format", NS)} == {"image/png", "image/jpeg"}
        assert root.find(".//wmts:Contents/wmts:TileMatrixSet[ows:Identifier='4326']", NS) is not None
        link = next(e for e in layer.findall("wmts:TileMatrixSetLink", NS)
                    if e.findtext("wmts:TileMatrixSet", namespaces=NS) == "4326")
        # the 4326 tile covering the layer's centre has data and the right size
        grid = load_tms("4326", TMS_DIR)
        west, south, east, north = published.wgs84_bbox
        levels = [e.findtext("wmts:TileMatrix", namespaces=NS)
                  for e in link.findall("wmts:TileMatrixSetLimits/wmts:TileMatrixLimits", NS)]
        finest = grid.get(levels[-1])
        col, row = finest.point_to_tile((west + east) / 2, (south + north) / 2)
        answer = await client.get(get_tile("4326", finest.id, row, col))
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        pixels = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGBA"))
        assert pixels.shape == (256, 256, 4) and pixels[..., 3].any()

        # independent check: the tile's centre pixel equals the stored PM pixel at the same place
        bbox = finest.tile_bbox(col, row)
        g = Grid("EPSG:4326", bbox, 256, 256)
        lon, lat = g.to_coords(128, 128)
        import pyproj

        x, y = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(lon, lat)
        pm_level = published.bottom_level
        tc, tr, i, j = published.matrix(pm_level).point_to_pixel(x, y)
        stored = await published.owners[pm_level].get_tile_array(pm_level, tc, tr)
        if stored is not None and stored[j, i, 3] == 255 and pixels[128, 128, 3] == 255:
            assert np.abs(pixels[128, 128, :3].astype(int) - stored[j, i, :3].astype(int)).max() <= 40

        # outside the extra grid's limits: TileOutOfRange; unknown grid: InvalidParameterValue
        far = await client.get(get_tile("4326", finest.id, 0, 0))
        assert far.status_code == 400 and b"TileOutOfRange" in far.content
        unknown = await client.get(get_tile("LAMB93", "5", 0, 0))
        assert unknown.status_code == 400 and b'locator="TileMatrixSet"' in unknown.content

        # a JPEG from the PNG pyramid, in its own grid
        pm = published.bottom_level
        lim = published.limits[pm]
        jpeg = await client.get(get_tile("PM", pm, lim.min_row, lim.min_col, "image/jpeg"))
        assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(jpeg.content)).size == (256, 256)
        bad = await client.get(get_tile("PM", pm, lim.min_row, lim.min_col, "image/gif"))
        assert bad.status_code == 400 and b'locator="format"' in bad.content
        assert etree.fromstring(bad.content) is not None


async def test_ogcapi_serves_the_extra_grid(tmp_path):
    async with app_client(make_settings(tmp_path)) as client:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("M", layer_descriptor("MONTAGNE", extra_tilematrixsets=["4326"])))
        await runtime.refresh()
        base = "/ogcapi/collections/M/map/tiles"
        tilesets = (await client.get(base)).json()["tilesets"]
        assert "4326" in [t["links"][0]["href"].rsplit("/", 1)[-1].split("?")[0] for t in tilesets]
        tileset = (await client.get(f"{base}/4326")).json()
        assert tileset["crs"] == "http://www.opengis.net/def/crs/EPSG/0/4326"
        finest = tileset["tileMatrixSetLimits"][-1]
        west, south, east, north = runtime.catalog.layers["M"].wgs84_bbox
        m = load_tms("4326", TMS_DIR).get(finest["tileMatrix"])
        col, row = m.point_to_tile((west + east) / 2, (south + north) / 2)
        assert finest["minTileRow"] <= row <= finest["maxTileRow"]
        answer = await client.get(f"{base}/4326/{m.id}/{row}/{col}")
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        assert np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGBA"))[..., 3].any()
        outside = await client.get(f"{base}/4326/{m.id}/{finest['maxTileRow'] + 1}/{col}")
        assert outside.status_code == 404
        tms_doc = (await client.get("/ogcapi/tileMatrixSets/4326")).json()
        assert tms_doc["tileMatrices"][0]["id"] == "0"
        assert (await client.get(f"{base}/LAMB93")).status_code == 404


async def test_tms_offers_the_extra_grid_as_its_own_tilemap(tmp_path):
    async with app_client(make_settings(tmp_path)) as client:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("M", layer_descriptor("MONTAGNE", extra_tilematrixsets=["4326"])))
        await runtime.refresh()
        service = etree.fromstring((await client.get("/tms/1.0.0")).content)
        hrefs = {t.get("href").rsplit("/", 1)[-1]: t.get("srs") for t in service.iter("TileMap")}
        assert hrefs == {"M": "EPSG:3857", "M@4326": "EPSG:4326"}
        tilemap = etree.fromstring((await client.get("/tms/1.0.0/M@4326")).content)
        assert tilemap.findtext("SRS") == "EPSG:4326"
        tileset = list(tilemap.iter("TileSet"))[-1]
        level = tileset.get("href").rsplit("/", 1)[-1]
        west, south, east, north = runtime.catalog.layers["M"].wgs84_bbox
        m = load_tms("4326", TMS_DIR).get(level)
        col, row = m.point_to_tile((west + east) / 2, (south + north) / 2)
        assert int(tileset.get("mincol")) <= col <= int(tileset.get("maxcol"))
        answer = await client.get(f"/tms/1.0.0/M@4326/{level}/{col}/{row}.png")
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        assert np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGBA"))[..., 3].any()
        assert (await client.get(f"/tms/1.0.0/M@4326/{level}/0/0.png")).status_code == 404
        assert (await client.get("/tms/1.0.0/M@LAMB93")).status_code == 400
        assert (await client.get("/tms/1.0.0/M@4326/gdal.xml")).status_code == 404


async def test_styled_tiles_of_a_dem(tmp_path):
    from apputil import DATA

    settings = make_settings(tmp_path, styles_directory=str(DATA / "styles"))
    async with app_client(settings) as client:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("DEM", layer_descriptor("RGEALTI", styles=["normal", "hypso"])))
        await runtime.refresh()
        caps = await client.get("/wmts?SERVICE=WMTS&REQUEST=GetCapabilities")
        root = assert_valid(CAPABILITIES_SCHEMA, caps.content)
        layer = root.find(".//wmts:Contents/wmts:Layer", NS)
        styles = [e.findtext("ows:Identifier", namespaces=NS) for e in layer.findall("wmts:Style", NS)]
        assert styles[0] == "normal" and "hypso" in styles
        published = runtime.catalog.layers["DEM"]
        level = published.bottom_level
        lim = published.limits[level]
        base = (f"/wmts?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=DEM&TILEMATRIXSET=LAMB93_1M_MNT"
                f"&TILEMATRIX={level}&TILEROW={lim.min_row}&TILECOL={lim.min_col}")
        styled = await client.get(base + "&STYLE=hypso&FORMAT=image/png")
        assert styled.status_code == 200 and styled.headers["content-type"] == "image/png"
        pixels = np.asarray(Image.open(io.BytesIO(styled.content)).convert("RGBA"))
        assert pixels.shape == (256, 256, 4) and len(np.unique(pixels.reshape(-1, 4), axis=0)) > 10
        raw = await client.get(base + "&STYLE=normal&FORMAT=image/x-bil;bits=32")
        assert raw.status_code == 200 and raw.headers["content-type"] == "image/x-bil;bits=32"
        # every (style, format) pair the capabilities advertise is served: a style draws pictures,
        # BIL carries the stored values whatever the style; `normal` as a picture is the first style
        formats = [e.text for e in layer.findall("wmts:Format", NS)]
        assert formats[0] == "image/png" and "image/x-bil;bits=32" in formats  # GDAL takes the first
        for style in styles:
            for fmt in formats:
                answer = await client.get(base + f"&STYLE={style}&FORMAT={fmt}")
                assert answer.status_code == 200, (style, fmt, answer.text)
                assert answer.headers["content-type"] == fmt
        valued = await client.get(base + "&STYLE=hypso&FORMAT=image/x-bil;bits=32")
        assert valued.content == raw.content
        drawn = await client.get(base + "&STYLE=normal&FORMAT=image/png")
        assert drawn.content == styled.content
        unknown = await client.get(base + "&STYLE=nope&FORMAT=image/png")
        assert unknown.status_code == 400 and b'locator="style"' in unknown.content
