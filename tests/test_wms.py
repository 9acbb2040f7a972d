"""WMS behaviour through the application: GetMap outputs against the tiles, axis orders, styles,
transparency, GetFeatureInfo against the stored pixels (and relayed to an external WMS), legends,
capabilities content, 1.1.1, storage failures and the render gate."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from urllib.parse import urlencode

import numpy as np
import pytest
import tifffile
from apputil import DATA, PYRAMIDS, app_client, free_port, layer_descriptor, make_settings
from lxml import etree
from PIL import Image
from test_render_pipeline import level_mosaic

from tileserver.publication.model import parse_layer
from tileserver.render.gate import gate_for

NS = {"wms": "http://www.opengis.net/wms", "xlink": "http://www.w3.org/1999/xlink", "ogc": "http://www.opengis.net/ogc"}
DEM_STYLES = ["normal", "estompage", "pente", "hypso", "montagne", "aspect", "terrainrgb"]
LAYERS = {  # layer id → (fixture pyramid, descriptor extras)
    "SCAN1000": ("SCAN1000", {
        "extra_crs": ["EPSG:32631"],
        "attribution": {"title": "IGN", "url": "https://www.ign.fr",
                        "logo": {"format": "image/png", "url": "https://www.ign.fr/logo.png", "width": 50, "height": 20}},
        "metadata": [{"format": "text/xml", "url": "https://example.org/md.xml", "type": "ISO19115:2003"}],
    }),
    "MONTAGNE": ("MONTAGNE", {}),
    "BDPARCELLAIRE": ("BDPARCELLAIRE", {"get_feature_info": {"type": "PYRAMID"}}),
    "RGEALTI": ("RGEALTI", {"styles": DEM_STYLES, "get_feature_info": {"type": "PYRAMID"}, "resampling": "linear"}),
    "HIDDEN": ("SCAN1000", {"wms": {"enabled": False}}),
}
MAP = {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "STYLES": ""}


async def publish(client, layers=LAYERS) -> None:
    runtime = client.app.state.runtime
    for layer_id, (name, extra) in layers.items():
        runtime.store.add_layer(parse_layer(layer_id, layer_descriptor(name, **extra)))
    await runtime.refresh()


@pytest.fixture(scope="module")
async def client(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("wms"), styles_directory=str(DATA / "styles"))
    async with app_client(settings) as c:
        await publish(c)
        yield c


async def get(client, **params):
    return await client.get("/wms?" + urlencode(params))


async def get_map(client, **params):
    return await get(client, **{**MAP, **params})


def png(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGBA"))


def native_box(client, layer_id: str, col0=0, row0=0, width=None, height=None):
    """BBOX string and size of a pixel window of the layer's bottom level (x/y order)."""
    published = client.app.state.runtime.catalog.layers[layer_id]
    m = published.matrix(published.bottom_level)
    x0, _, _, y1 = published.native_bbox
    lim = published.limits[published.bottom_level]
    width = width or (lim.max_col - lim.min_col + 1) * m.tile_width - col0
    height = height or (lim.max_row - lim.min_row + 1) * m.tile_height - row0
    box = (x0 + col0 * m.cell_size, y1 - (row0 + height) * m.cell_size, x0 + (col0 + width) * m.cell_size,
           y1 - row0 * m.cell_size)
    return ",".join(repr(v) for v in box), width, height


# --------------------------------------------------------------------------- GetMap, native grid


async def test_png_in_the_native_grid_is_the_tiles(client):
    published = client.app.state.runtime.catalog.layers["SCAN1000"]
    mosaic, _ = await level_mosaic(published, published.bottom_level)
    bbox, w, h = native_box(client, "SCAN1000")
    image = png(await get_map(client, LAYERS="SCAN1000", CRS="EPSG:3857", BBOX=bbox, WIDTH=w, HEIGHT=h,
                              FORMAT="image/png", TRANSPARENT="TRUE"))
    assert image.shape == (h, w, 4)
    opaque = mosaic[..., 3] > 0
    assert np.array_equal(image[opaque], mosaic[opaque])
    assert (image[..., 3] == mosaic[..., 3]).all()


@pytest.mark.parametrize("fmt", ["image/tiff", "image/geotiff", "image/x-bil;bits=32", "text/asc"])
async def test_float_formats_carry_the_stored_heights(client, fmt):
    published = client.app.state.runtime.catalog.layers["RGEALTI"]
    mosaic, _ = await level_mosaic(published, published.bottom_level)
    bbox, w, h = native_box(client, "RGEALTI", 40, 100, 150, 200)
    window = mosaic[100:300, 40:190, 0]
    answer = await get_map(client, LAYERS="RGEALTI", CRS="EPSG:2154", BBOX=bbox, WIDTH=w, HEIGHT=h, FORMAT=fmt)
    assert answer.status_code == 200 and answer.headers["content-type"] == fmt
    if fmt in ("image/tiff", "image/geotiff"):
        with tifffile.TiffFile(io.BytesIO(answer.content)) as tif:
            data = tif.pages[0].asarray()
            tags = tif.pages[0].tags
            if fmt == "image/geotiff":
                x0, y1 = float(bbox.split(",")[0]), float(bbox.split(",")[3])
                assert tags["ModelTiepointTag"].value[3:5] == (x0, y1)
                assert tags["ModelPixelScaleTag"].value[:2] == (1.0, 1.0)
                assert tags["GDAL_NODATA"].value == "-99999"
        assert data.dtype == np.float32
    elif fmt == "text/asc":
        lines = answer.text.splitlines()
        header = dict(line.split() for line in lines[:6])
        assert header["ncols"] == str(w) and header["nrows"] == str(h) and header["NODATA_value"] == "-99999"
        data = np.loadtxt(lines[6:], dtype=np.float64)
    else:
        data = np.frombuffer(answer.content, "<f4").reshape(h, w)
    assert np.allclose(data, window, atol=1e-6 if fmt != "text/asc" else 1e-3)


# --------------------------------------------------------------------------- axis order and CRS


async def test_axis_order_follows_the_crs_definition(client):
    lon0, lat0, lon1, lat1 = 1.5, 46.1, 2.0, 46.3
    common = {"LAYERS": "SCAN1000", "WIDTH": 200, "HEIGHT": 100, "FORMAT": "image/png", "TRANSPARENT": "TRUE"}
    lat_lon = png(await get_map(client, CRS="EPSG:4326", BBOX=f"{lat0},{lon0},{lat1},{lon1}", **common))
    lon_lat = png(await get_map(client, CRS="CRS:84", BBOX=f"{lon0},{lat0},{lon1},{lat1}", **common))
    v111 = png(await get_map(client, VERSION="1.1.1", SRS="EPSG:4326", BBOX=f"{lon0},{lat0},{lon1},{lat1}", **common))
    assert np.array_equal(lat_lon, lon_lat) and np.array_equal(lat_lon, v111)
    assert (lat_lon[..., 3] > 0).mean() > 0.3
    # the same numbers read as lon/lat are somewhere else (no data there)
    swapped = png(await get_map(client, CRS="EPSG:4326", BBOX=f"{lon0},{lat0},{lon1},{lat1}", **common))
    assert (swapped[..., 3] == 0).all()


@pytest.mark.parametrize("aliases", [("EPSG:2154", "IGNF:LAMB93", "epsg:2154", "urn:ogc:def:crs:EPSG::2154")])
async def test_equivalent_crs_give_the_same_map(client, aliases):
    bbox = "573900,6274500,574300,6275100"
    images = [png(await get_map(client, LAYERS="RGEALTI", CRS=crs, BBOX=bbox, WIDTH=100, HEIGHT=150,
                                FORMAT="image/png", STYLES="hypso")) for crs in aliases]
    assert all(np.array_equal(images[0], other) for other in images[1:])
    assert (images[0][..., 3] > 0).any()


async def test_northing_first_projected_crs(client):
    """EPSG:3035 (LAEA Europe) is northing/easting: its 1.3.0 BBOX is y,x."""
    caps = etree.fromstring((await get(client, SERVICE="WMS", REQUEST="GetCapabilities")).content)
    box = caps.find(".//wms:Layer[wms:Name='SCAN1000']/wms:BoundingBox[@CRS='EPSG:3035']", NS)
    miny, minx, maxy, maxx = (float(box.get(k)) for k in ("minx", "miny", "maxx", "maxy"))
    assert 3e6 < minx < 4e6 and 2e6 < miny < 3e6  # easting ≈ 3.6e6, northing ≈ 2.6e6 over France
    image = png(await get_map(client, LAYERS="SCAN1000", CRS="EPSG:3035", BBOX=f"{miny},{minx},{maxy},{maxx}",
                              WIDTH=64, HEIGHT=64, FORMAT="image/png"))
    assert (image[..., 3] > 0).mean() > 0.5


async def test_extra_crs_only_for_its_layer(client):
    ok = await get_map(client, LAYERS="SCAN1000", CRS="EPSG:32631", BBOX="350000,5100000,400000,5150000",
                       WIDTH=32, HEIGHT=32, FORMAT="image/png")
    assert ok.status_code == 200
    refused = await get_map(client, LAYERS="MONTAGNE", CRS="EPSG:32631", BBOX="350000,5100000,400000,5150000",
                            WIDTH=32, HEIGHT=32, FORMAT="image/png")
    assert refused.status_code == 400 and 'code="InvalidCRS"' in refused.text


# --------------------------------------------------------------------------- layers, styles, transparency


async def test_layers_are_composited_in_order(client):
    bbox = "160200,5397670,160830,5398300"  # RGEALTI and MONTAGNE overlap here
    common = {"CRS": "EPSG:3857", "BBOX": bbox, "WIDTH": 128, "HEIGHT": 128, "FORMAT": "image/png", "TRANSPARENT": "TRUE"}
    dem = png(await get_map(client, LAYERS="RGEALTI", STYLES="hypso", **common))
    mont = png(await get_map(client, LAYERS="MONTAGNE", **common))
    both = png(await get_map(client, LAYERS="RGEALTI,MONTAGNE", STYLES="hypso,", **common))
    reverse = png(await get_map(client, LAYERS="MONTAGNE,RGEALTI", STYLES=",hypso", **common))
    mont_opaque, dem_opaque = mont[..., 3] == 255, dem[..., 3] == 255
    assert (mont_opaque & dem_opaque).any()
    assert np.array_equal(both[mont_opaque], mont[mont_opaque])
    assert np.array_equal(reverse[dem_opaque], dem[dem_opaque])
    only_dem = dem_opaque & (mont[..., 3] == 0)
    assert np.array_equal(both[only_dem], dem[only_dem])


@pytest.mark.parametrize(("styles", "expected"), [
    ("", "normal"), ("default", "normal"), ("normal", "normal"), ("hypso", "hypso"), ("pente", "pente"),
])
async def test_style_variants(client, styles, expected):
    bbox, w, h = native_box(client, "RGEALTI", 0, 0, 128, 128)
    common = {"LAYERS": "RGEALTI", "CRS": "EPSG:2154", "BBOX": bbox, "WIDTH": w, "HEIGHT": h, "FORMAT": "image/png"}
    got = await get_map(client, STYLES=styles, **common)
    want = await get_map(client, STYLES=expected, **common)
    assert got.status_code == 200 and got.content == want.content


async def test_dem_styles_differ_and_are_opaque_where_data(client):
    bbox = "573960,6274570,574200,6275060"
    bodies = {}
    for style in DEM_STYLES:
        answer = await get_map(client, LAYERS="RGEALTI", STYLES=style, CRS="EPSG:2154", BBOX=bbox, WIDTH=120,
                               HEIGHT=245, FORMAT="image/png", TRANSPARENT="TRUE")
        bodies[style] = png(answer)
    assert len({b.tobytes() for b in bodies.values()}) == len(DEM_STYLES)


async def test_transparent_and_bgcolor(client):
    bbox = "160000,5397500,161000,5398500"  # MONTAGNE's data covers part of it
    common = {"LAYERS": "MONTAGNE", "CRS": "EPSG:3857", "BBOX": bbox, "WIDTH": 100, "HEIGHT": 100,
              "FORMAT": "image/png"}
    opaque = png(await get_map(client, **common))
    assert (opaque[..., 3] == 255).all()
    see_through = png(await get_map(client, TRANSPARENT="TRUE", **common))
    assert (see_through[..., 3] == 0).any() and (see_through[..., 3] == 255).any()
    red = png(await get_map(client, TRANSPARENT="FALSE", BGCOLOR="0xFF0000", **common))
    empty = see_through[..., 3] == 0
    assert (red[empty][:, :3] == [255, 0, 0]).all()
    jpeg = await get_map(client, FORMAT="image/jpeg", BGCOLOR="0x00FF00", **{k: v for k, v in common.items() if k != "FORMAT"})
    assert jpeg.headers["content-type"] == "image/jpeg"
    green = np.asarray(Image.open(io.BytesIO(jpeg.content)))
    assert np.abs(green[empty].astype(int) - [0, 255, 0]).mean() < 4  # JPEG rings near the data's edge


@pytest.mark.parametrize(("width", "height"), [(8, 5), (1024, 768), (1, 1), (4096, 3)])
async def test_exact_size(client, width, height):
    image = png(await get_map(client, LAYERS="SCAN1000", CRS="EPSG:3857", BBOX="156000,5790000,235000,5832000",
                              WIDTH=width, HEIGHT=height, FORMAT="image/png"))
    assert image.shape[:2] == (height, width)


async def test_bbox_without_data_is_an_empty_image(client):
    for crs, bbox in (("EPSG:4326", "-10,-10,-5,-5"), ("EPSG:3857", "-2e7,-2e7,-1.9e7,-1.9e7"),
                      ("EPSG:2154", "-1e9,-1e9,1e9,1e9"), ("CRS:84", "-180,-90,180,90")):
        image = png(await get_map(client, LAYERS="RGEALTI", CRS=crs, BBOX=bbox, WIDTH=50, HEIGHT=40,
                                  FORMAT="image/png", TRANSPARENT="TRUE"))
        assert image.shape == (40, 50, 4)


async def test_format_options(client):
    common = {"LAYERS": "SCAN1000", "CRS": "EPSG:3857", "BBOX": "156000,5790000,235000,5832000", "WIDTH": 256,
              "HEIGHT": 128}
    low = await get_map(client, FORMAT="image/jpeg", FORMAT_OPTIONS="quality:20", **common)
    high = await get_map(client, FORMAT="image/jpeg", FORMAT_OPTIONS="quality:95", **common)
    assert len(low.content) < len(high.content)
    raw = await get_map(client, FORMAT="image/tiff", **common)
    packed = await get_map(client, FORMAT="image/tiff", FORMAT_OPTIONS="compression:deflate", **common)
    assert len(packed.content) < len(raw.content)
    with tifffile.TiffFile(io.BytesIO(packed.content)) as tif:
        assert tif.pages[0].compression.name in ("ADOBE_DEFLATE", "DEFLATE")
        assert np.array_equal(tif.pages[0].asarray(), tifffile.imread(io.BytesIO(raw.content)))


# --------------------------------------------------------------------------- GetFeatureInfo


GFI = {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetFeatureInfo", "STYLES": ""}


async def test_feature_info_reads_the_stored_value(client):
    published = client.app.state.runtime.catalog.layers["RGEALTI"]
    mosaic, _ = await level_mosaic(published, published.bottom_level)
    valid = np.argwhere(mosaic[..., 0] != -99999)
    row, col = (int(v) for v in valid[len(valid) // 2])
    bbox, w, h = native_box(client, "RGEALTI")
    params = {**GFI, "LAYERS": "RGEALTI", "QUERY_LAYERS": "RGEALTI", "CRS": "EPSG:2154", "BBOX": bbox, "WIDTH": w,
              "HEIGHT": h, "I": col, "J": row}
    answer = await get(client, **params, INFO_FORMAT="application/json")
    assert answer.headers["content-type"].startswith("application/json")
    feature = answer.json()["features"][0]
    assert feature["properties"]["pixel"] == [pytest.approx(float(mosaic[row, col, 0]))]
    assert feature["geometry"]["type"] == "Point"
    stored = float(mosaic[row, col, 0])
    value = str(int(stored)) if stored.is_integer() else repr(stored)
    for fmt, marker in (("text/plain", value), ("text/html", f"<li>{value}</li>"), ("text/xml", "<Band>")):
        other = await get(client, **params, INFO_FORMAT=fmt)
        assert other.status_code == 200 and other.headers["content-type"].startswith(fmt) and marker in other.text
    nodata = np.argwhere(mosaic[..., 0] == -99999)[0]
    empty = await get(client, **{**params, "I": int(nodata[1]), "J": int(nodata[0])}, INFO_FORMAT="text/plain")
    assert empty.text == ""
    # 1.1.1 names the pixel X/Y
    v111 = await get(client, **{**params, "VERSION": "1.1.1", "SRS": "EPSG:2154", "X": col, "Y": row},
                     INFO_FORMAT="text/plain")
    assert v111.text == value  # ROK4's text/plain: the bare values


async def test_feature_info_at_a_coarse_scale_reads_a_coarser_level(client):
    bbox = "560000,6260000,590000,6290000"
    answer = await get(client, **GFI, LAYERS="RGEALTI", QUERY_LAYERS="RGEALTI", CRS="EPSG:2154", BBOX=bbox,
                       WIDTH=120, HEIGHT=120, I=56, J=56, INFO_FORMAT="application/json")
    level = answer.json()["features"][0]["properties"]["level"]
    assert level not in ("8", None)


async def test_several_query_layers(client):
    answer = await get(client, **GFI, LAYERS="BDPARCELLAIRE,RGEALTI", QUERY_LAYERS="BDPARCELLAIRE,RGEALTI",
                       CRS="CRS:84", BBOX="1.4,43.5,6.9,47.7", WIDTH=10, HEIGHT=10, I=1, J=1, INFO_FORMAT="text/plain")
    as_json = await get(client, **GFI, LAYERS="BDPARCELLAIRE,RGEALTI", QUERY_LAYERS="BDPARCELLAIRE,RGEALTI",
                        CRS="CRS:84", BBOX="1.4,43.5,6.9,47.7", WIDTH=10, HEIGHT=10, I=1, J=1,
                        INFO_FORMAT="application/json")
    features = as_json.json()["features"]
    assert [f["id"] for f in features] == ["BDPARCELLAIRE", "RGEALTI"]
    # one line per queried layer, in QUERY_LAYERS order, of its bare values (empty: no data)
    expected = [",".join(f"{v:g}" for v in f["properties"]["pixel"] or ()) for f in features]
    assert answer.text.split("\n") == expected


async def test_external_wms_feature_info_is_relayed(tmp_path):
    from aiohttp import web

    seen: list[dict] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append(dict(request.query))
        return web.Response(body=b"<b>remote</b>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/wms", upstream)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with app_client(make_settings(tmp_path)) as client:
            gfi = {"type": "EXTERNALWMS", "url": f"http://127.0.0.1:{port}/wms?map=x", "layers": "remote_layer",
                   "query_layers": "remote_q", "extra_query_params": {"TOKEN": "abc"}}
            down = {"type": "EXTERNALWMS", "url": f"http://127.0.0.1:{free_port()}/wms", "layers": "x"}
            await publish(client, {"EXT": ("SCAN1000", {"get_feature_info": gfi}),
                                   "DOWN": ("SCAN1000", {"get_feature_info": down})})
            params = {**GFI, "LAYERS": "EXT", "QUERY_LAYERS": "EXT", "WIDTH": 100, "HEIGHT": 50, "I": 10, "J": 20,
                      "INFO_FORMAT": "text/html", "FEATURE_COUNT": 3}
            answer = await get(client, **params, CRS="EPSG:4326", BBOX="46,1.4,46.4,2.2")
            assert answer.status_code == 200 and answer.text == "<b>remote</b>"
            assert answer.headers["content-type"].startswith("text/html")
            query = seen[-1]
            assert query["map"] == "x" and query["LAYERS"] == "remote_layer" and query["QUERY_LAYERS"] == "remote_q"
            assert query["BBOX"] == "46,1.4,46.4,2.2" and query["CRS"] == "EPSG:4326" and query["TOKEN"] == "abc"
            assert (query["I"], query["J"], query["FEATURE_COUNT"], query["VERSION"]) == ("10", "20", "3", "1.3.0")
            # a 1.1.1 client's lon/lat box is forwarded in 1.3.0 order
            await get(client, **{**params, "VERSION": "1.1.1", "SRS": "EPSG:4326", "X": 10, "Y": 20},
                      BBOX="1.4,46,2.2,46.4")
            assert [float(v) for v in seen[-1]["BBOX"].split(",")] == [46, 1.4, 46.4, 2.2]
            failed = await get(client, **{**params, "LAYERS": "DOWN", "QUERY_LAYERS": "DOWN"}, CRS="EPSG:4326",
                               BBOX="46,1.4,46.4,2.2")
            assert failed.status_code == 502 and "ServiceException" in failed.text
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- legends and capabilities


async def test_legend_urls_answer_their_advertised_image(client):
    caps = etree.fromstring((await get(client, SERVICE="WMS", REQUEST="GetCapabilities")).content)
    legends = caps.findall(".//wms:Layer[wms:Name='RGEALTI']/wms:Style/wms:LegendURL", NS)
    ours = [lg for lg in legends if "GetLegendGraphic" in lg.find("wms:OnlineResource", NS).get(f"{{{NS['xlink']}}}href")]
    assert len(ours) >= 3
    for legend in ours:
        href = legend.find("wms:OnlineResource", NS).get(f"{{{NS['xlink']}}}href")
        answer = await client.get(href.replace("http://testserver", ""))
        image = Image.open(io.BytesIO(answer.content))
        assert answer.headers["content-type"] == legend.find("wms:Format", NS).text == "image/png"
        assert image.size == (int(legend.get("width")), int(legend.get("height")))


async def test_capabilities_content(client):
    answer = await get(client, SERVICE="WMS", REQUEST="GetCapabilities")
    assert answer.headers["content-type"].startswith("text/xml")
    caps = etree.fromstring(answer.content)
    names = [n.text for n in caps.findall(".//wms:Layer/wms:Layer/wms:Name", NS)]
    assert names == ["BDPARCELLAIRE", "MONTAGNE", "RGEALTI", "SCAN1000"]  # HIDDEN has wms disabled

    def layer(name):
        return caps.find(f".//wms:Layer[wms:Name='{name}']", NS)

    assert layer("RGEALTI").get("queryable") == "1" and layer("SCAN1000").get("queryable") == "0"
    assert [c.text for c in layer("SCAN1000").findall("wms:CRS", NS)] == ["EPSG:32631"]
    assert [s.text for s in layer("RGEALTI").findall("wms:Style/wms:Name", NS)] == DEM_STYLES
    assert layer("SCAN1000").find("wms:Attribution/wms:LogoURL", NS).get("width") == "50"
    assert layer("SCAN1000").find("wms:MetadataURL", NS).get("type") == "ISO19115:2003"
    # scale denominators: cell size × metres per unit / 0.28 mm, degrees at 111 319.49 m
    bdp = layer("BDPARCELLAIRE")
    assert float(bdp.find("wms:MinScaleDenominator", NS).text) == pytest.approx(1.34110450744629e-06 * 111319.49079 / 0.00028, rel=1e-6)
    assert float(bdp.find("wms:MaxScaleDenominator", NS).text) == pytest.approx(0.703125 * 111319.49079 / 0.00028, rel=1e-6)
    scan = layer("SCAN1000")
    assert float(scan.find("wms:MinScaleDenominator", NS).text) == pytest.approx(152.874056570353 / 0.00028, rel=1e-6)
    # EPSG:4326 boxes are lat/lon, CRS:84 lon/lat
    geo = scan.find("wms:BoundingBox[@CRS='EPSG:4326']", NS)
    lonlat = scan.find("wms:BoundingBox[@CRS='CRS:84']", NS)
    assert geo.get("minx") == lonlat.get("miny") and geo.get("maxy") == lonlat.get("maxx")
    native = scan.find("wms:BoundingBox[@CRS='EPSG:3857']", NS)
    published = client.app.state.runtime.catalog.layers["SCAN1000"]
    assert float(native.get("minx")) == pytest.approx(published.native_bbox[0])


async def test_capabilities_list_store_styles_and_follow_the_store(tmp_path):
    style = json.loads((DATA / "styles" / "hypso.json").read_text())
    style["identifier"] = "hypso_store"
    async with app_client(make_settings(tmp_path)) as client:
        client.app.state.runtime.store.put_style("hypso2", style)
        await publish(client, {"DEM": ("RGEALTI", {"styles": ["hypso2", "estompage", "normal"]})})
        caps = etree.fromstring((await get(client, SERVICE="WMS", REQUEST="GetCapabilities")).content)
        # estompage is not in the store and no styles directory is set: left out
        assert [s.text for s in caps.findall(".//wms:Style/wms:Name", NS)] == ["hypso_store", "normal"]
        bbox, w, h = native_box(client, "DEM", 0, 0, 64, 64)
        ok = await get_map(client, LAYERS="DEM", STYLES="hypso_store", CRS="EPSG:2154", BBOX=bbox, WIDTH=w, HEIGHT=h,
                           FORMAT="image/png")
        assert ok.status_code == 200


async def test_capabilities_1_1_1(client):
    answer = await get(client, SERVICE="WMS", REQUEST="GetCapabilities", VERSION="1.1.1")
    assert answer.headers["content-type"].startswith("application/vnd.ogc.wms_xml")
    caps = etree.fromstring(answer.content)
    assert caps.tag == "WMT_MS_Capabilities" and caps.get("version") == "1.1.1"
    dtd = etree.DTD(str(DATA.parent / "schemas" / "wms" / "1.1.1" / "WMS_MS_Capabilities.dtd"))
    assert dtd.validate(caps), dtd.error_log.filter_from_errors()
    box = caps.find(".//Layer[Name='SCAN1000']/BoundingBox[@SRS='EPSG:4326']")
    ll = caps.find(".//Layer[Name='SCAN1000']/LatLonBoundingBox")
    assert box.get("minx") == ll.get("minx")  # 1.1.1: lon/lat


async def test_restricted_layers_need_their_key(tmp_path):
    async with app_client(make_settings(tmp_path)) as client:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("SECRET", layer_descriptor("SCAN1000")), restricted=True)
        _, secret = runtime.store.create_key("k", ["SECRET"])
        await runtime.refresh()
        anonymous = (await get(client, SERVICE="WMS", REQUEST="GetCapabilities")).text
        assert "SECRET" not in anonymous
        keyed = await get(client, SERVICE="WMS", REQUEST="GetCapabilities", apikey=secret)
        assert "<Name>SECRET</Name>" in keyed.text and f"apikey={secret}" in keyed.text
        params = {"LAYERS": "SECRET", "CRS": "EPSG:3857", "BBOX": "156000,5790000,235000,5832000", "WIDTH": 64,
                  "HEIGHT": 32, "FORMAT": "image/png"}
        assert 'code="LayerNotDefined"' in (await get_map(client, **params)).text
        assert (await get_map(client, apikey=secret, **params)).status_code == 200


# --------------------------------------------------------------------------- failures and limits


async def test_storage_failures_are_502(tmp_path):
    shutil.copytree(PYRAMIDS / "SCAN1000", tmp_path / "p" / "SCAN1000")
    shutil.copy(PYRAMIDS / "SCAN1000.json", tmp_path / "p" / "SCAN1000.json")
    async with app_client(make_settings(tmp_path)) as client:
        await publish(client, {"S": ("SCAN1000", {})})
        runtime = client.app.state.runtime
        runtime.store.put_layer(parse_layer("S", layer_descriptor("SCAN1000", root=f"file://{tmp_path}/p")))
        await runtime.refresh()
        for slab in (tmp_path / "p" / "SCAN1000" / "DATA" / "10").rglob("*.tif"):
            slab.write_bytes(b"II*\x00" + b"\xff" * 3000)  # header intact, index and tiles garbage
        runtime.index_cache.clear()
        answer = await get_map(client, LAYERS="S", CRS="EPSG:3857", BBOX="156543,5792092,234814,5831228", WIDTH=512,
                               HEIGHT=256, FORMAT="image/png", EXCEPTIONS="INIMAGE")
        assert answer.status_code == 502 and 'code="NoApplicableCode"' in answer.text


async def test_busy_renderer_answers_503(tmp_path):
    async with app_client(make_settings(tmp_path, render_concurrency=1)) as client:
        await publish(client, {"SCAN1000": LAYERS["SCAN1000"]})
        gate = gate_for(client.app.state.runtime)
        gate.wait = 0.05
        await gate.acquire()
        try:
            answer = await get_map(client, LAYERS="SCAN1000", CRS="EPSG:3857", BBOX="156000,5790000,235000,5832000",
                                   WIDTH=64, HEIGHT=32, FORMAT="image/png")
            assert answer.status_code == 503 and answer.headers["retry-after"]
        finally:
            gate.release()
        again = await get_map(client, LAYERS="SCAN1000", CRS="EPSG:3857", BBOX="156000,5790000,235000,5832000",
                              WIDTH=64, HEIGHT=32, FORMAT="image/png")
        assert again.status_code == 200


async def test_too_many_tiles_is_a_client_error(client, monkeypatch):
    from dataclasses import replace

    runtime = client.app.state.runtime
    monkeypatch.setattr(runtime, "settings", replace(runtime.settings, render_max_tiles=3))
    answer = await get_map(client, LAYERS="BDPARCELLAIRE", CRS="EPSG:4326", WIDTH=1600, HEIGHT=1200,
                           BBOX="47.6511383057,6.8376159668,47.6525115967,6.8396759033", FORMAT="image/png")
    assert answer.status_code == 400 and "source tiles" in answer.text


async def test_renders_run_concurrently_with_tile_passthrough(client):
    """Several maps at once all succeed (the gate queues them) and the event loop stays responsive."""
    params = {"LAYERS": "SCAN1000", "CRS": "EPSG:4326", "BBOX": "46,1.4,46.4,2.2", "WIDTH": 512, "HEIGHT": 512,
              "FORMAT": "image/png", "STYLES": ""}
    answers = await asyncio.gather(*(get_map(client, **params) for _ in range(12)),
                                   client.get("/healthcheck"))
    assert all(a.status_code == 200 for a in answers)
