"""Every tile a document advertises is served (issue 12 item 4; ets-wmts10 and ets-ogcapi-tiles10 probe
tiles the same way): the WMTS capabilities and the OGC API tilesets are read as a client reads them,
and the corner tiles (first and last row and column) of every advertised level of every tile matrix
set of every layer, in every style and format offered, are asked for over real HTTP. Each must be an
image (200, an image content type), the extra (reprojected) grids and the registered aliases
(`WebMercatorQuad`, `WorldCRS84Quad`) included.
"""

from __future__ import annotations

import httpx
import pytest
from apputil import DATA, PYRAMIDS, live_server, make_settings
from lxml import etree
from test_gdal_clients import LAYERS
from test_tms_service import AUTH, descriptor_for

NS = {"w": "http://www.opengis.net/wmts/1.0", "ows": "http://www.opengis.net/ows/1.1"}
EXTRA = ["PM", "4326", "LAMB93", "WGS84G"]  # besides each layer's own grid
STYLES = ["normal", "hypso", "estompage"]  # hypso and estompage draw only the DEM


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("every")
    settings = make_settings(tmp, styles_directory=str(DATA / "styles"))
    with live_server(settings) as url:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            for name in LAYERS:
                desc = descriptor_for(PYRAMIDS / f"{name}.json", styles=STYLES, extra_tilematrixsets=EXTRA)
                answer = http.post(f"/admin/layers/{name}", json=desc)
                assert answer.status_code == 204, answer.text
        yield url


def corners(min_row: int, max_row: int, min_col: int, max_col: int) -> set[tuple[int, int]]:
    return {(r, c) for r in (min_row, max_row) for c in (min_col, max_col)}


def failures(http: httpx.Client, urls: list[tuple[str, str]]) -> list[str]:
    """(what, URL) pairs whose answer is not a 200 image."""
    bad = []
    for what, url in urls:
        answer = http.get(url)
        kind = answer.headers.get("content-type", "")
        if answer.status_code != 200 or not kind.startswith(("image/", "application/x-protobuf")):
            bad.append(f"{what}: {answer.status_code} {kind} {answer.text[:200]!r}")
    return bad


def test_every_wmts_tile_limit_is_served(base):
    with httpx.Client(base_url=base, timeout=60) as http:
        root = etree.fromstring(http.get("/wmts/1.0.0/WMTSCapabilities.xml").content)
        sets = {s.findtext("ows:Identifier", namespaces=NS): s for s in root.iterfind("w:Contents/w:TileMatrixSet", NS)}
        urls: list[tuple[str, str]] = []
        for layer in root.iterfind("w:Contents/w:Layer", NS):
            name = layer.findtext("ows:Identifier", namespaces=NS)
            styles = [s.findtext("ows:Identifier", namespaces=NS) for s in layer.iterfind("w:Style", NS)]
            templates = [(u.get("format"), u.get("template")) for u in layer.iterfind("w:ResourceURL[@resourceType='tile']", NS)]
            for link in layer.iterfind("w:TileMatrixSetLink", NS):
                set_id = link.findtext("w:TileMatrixSet", namespaces=NS)
                limited = {}
                for lim in link.iterfind("w:TileMatrixSetLimits/w:TileMatrixLimits", NS):
                    limited[lim.findtext("w:TileMatrix", namespaces=NS)] = [
                        int(lim.findtext(f"w:{tag}", namespaces=NS))
                        for tag in ("MinTileRow", "MaxTileRow", "MinTileCol", "MaxTileCol")]
                assert limited, f"{name} {set_id}: no limits"
                for matrix in sets[set_id].iterfind("w:TileMatrix", NS):
                    level = matrix.findtext("ows:Identifier", namespaces=NS)
                    # a matrix listed without limits is the whole matrix (WMTS 07-057r7 §7.1.1.1)
                    width, height = (int(matrix.findtext(f"w:{t}", namespaces=NS)) for t in ("MatrixWidth", "MatrixHeight"))
                    bounds = limited.get(level, [0, height - 1, 0, width - 1])
                    pairs = [(style, t) for style in styles for t in templates]
                    for i, (row, col) in enumerate(sorted(corners(*bounds))):
                        # every corner in the first (style, format); the others at one corner each
                        for style, (fmt, template) in pairs if i == 0 else pairs[:1]:
                            url = (template.replace("{Style}", style).replace("{TileMatrixSet}", set_id)
                                   .replace("{TileMatrix}", level).replace("{TileRow}", str(row))
                                   .replace("{TileCol}", str(col)))
                            urls.append((f"WMTS {name} {style} {fmt} {set_id} {level} {row} {col}", url))
        assert {"PM", "4326", "LAMB93", "WGS84G", "LAMB93_1M_MNT"} <= set(sets)
        bad = failures(http, urls)
        assert not bad, f"{len(bad)} of {len(urls)} advertised tiles not served:\n" + "\n".join(bad[:30])


def test_every_ogcapi_tile_limit_is_served(base):
    with httpx.Client(base_url=base, timeout=60) as http:
        collections = http.get("/ogcapi/collections", params={"f": "json"}).json()["collections"]
        urls: list[tuple[str, str]] = []
        seen_sets: set[str] = set()
        documents = [http.get("/ogcapi", params={"f": "json"}).json()]  # the dataset's tilesets
        documents += [http.get(f"/ogcapi/collections/{c['id']}", params={"f": "json"}).json() for c in collections]
        for doc in documents:
            for tilesets_link in (li for li in doc["links"] if li["rel"].endswith(("tilesets-map", "tilesets-vector"))):
                tilesets = http.get(tilesets_link["href"])
                if tilesets_link["href"].split("?")[0].endswith("/ogcapi/tiles"):  # no vector layer here
                    assert tilesets.status_code == 200 and not tilesets.json()["tilesets"], tilesets.text
                    continue
                assert tilesets.status_code == 200, tilesets.text
                for tileset_link in tilesets.json()["tilesets"]:
                    self_link = next(li for li in tileset_link["links"] if li["rel"] == "self")
                    answer = http.get(self_link["href"])
                    assert answer.status_code == 200, (self_link["href"], answer.text)
                    tileset = answer.json()
                    seen_sets.add(self_link["href"].split("?")[0].rsplit("/", 1)[1])
                    template = next(li for li in tileset["links"] if li["rel"] == "item")["href"]
                    for lim in tileset["tileMatrixSetLimits"]:
                        bounds = (lim["minTileRow"], lim["maxTileRow"], lim["minTileCol"], lim["maxTileCol"])
                        for row, col in corners(*bounds):
                            url = (template.replace("{tileMatrix}", lim["tileMatrix"])
                                   .replace("{tileRow}", str(row)).replace("{tileCol}", str(col)))
                            urls.append((f"OGC API {tilesets_link['href']} {lim['tileMatrix']} {row} {col}", url))
        assert {"WebMercatorQuad", "WorldCRS84Quad", "PM", "4326", "LAMB93"} <= seen_sets
        bad = failures(http, urls)
        assert not bad, f"{len(bad)} of {len(urls)} advertised tiles not served:\n" + "\n".join(bad[:30])


def test_extra_grids_go_below_the_bottom_level(base):
    """Item 7 in extra grids: LAMB93 level 20 (10 cm) is far below MONTAGNE's bottom level (PM 17, about
    1.2 m); inside the data its WMTS and OGC API tiles are the bottom level magnified, as WMS draws the
    same box, not nodata."""
    import io

    import numpy as np
    from PIL import Image
    from pyproj import Transformer
    from test_gdal_clients import bottom_extent, stored_pixels

    from tileserver.rok4.tms import load_tms

    level, (c0, r0, c1, r1), _, _ = bottom_extent("MONTAGNE")
    pm = load_tms("PM").get(level)
    # the centre of an opaque 9 × 9 block of bottom pixels
    col, row, i, j = next((c, r, i, j) for c in range(c0, c1 + 1) for r in range(r0, r1 + 1)
                          for j in range(8, 248, 8) for i in range(8, 248, 8)
                          if (stored_pixels("MONTAGNE", level, c, r)[j - 4:j + 5, i - 4:i + 5, 3] == 255).all())
    x0, _, _, y1 = pm.tile_bbox(col, row)
    x, y = x0 + (i + 0.5) * pm.cell_size, y1 - (j + 0.5) * pm.cell_size
    lamb93 = load_tms("LAMB93")
    deep = lamb93.get("20")
    assert deep.cell_size < pm.cell_size / 8
    lx, ly = Transformer.from_crs("EPSG:3857", lamb93.crs, always_xy=True).transform(x, y)
    tcol, trow = deep.point_to_tile(lx, ly)
    bx0, by0, bx1, by1 = deep.tile_bbox(tcol, trow)
    with httpx.Client(base_url=base, timeout=60) as http:
        caps = etree.fromstring(http.get("/wmts/1.0.0/WMTSCapabilities.xml").content)
        link = caps.find("w:Contents/w:Layer[ows:Identifier='MONTAGNE']/w:TileMatrixSetLink[w:TileMatrixSet='LAMB93']", NS)
        limits = link.find("w:TileMatrixSetLimits/w:TileMatrixLimits[w:TileMatrix='20']", NS)
        assert limits is not None  # advertised
        tileset = http.get("/ogcapi/collections/MONTAGNE/map/tiles/LAMB93", params={"f": "json"}).json()
        assert "20" in [lim["tileMatrix"] for lim in tileset["tileMatrixSetLimits"]]
        reference = http.get("/wms", params={"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap",
                                             "LAYERS": "MONTAGNE", "STYLES": "", "CRS": lamb93.crs,
                                             "BBOX": f"{bx0!r},{by0!r},{bx1!r},{by1!r}", "WIDTH": 256,
                                             "HEIGHT": 256, "FORMAT": "image/png", "TRANSPARENT": "TRUE"})
        assert reference.status_code == 200, reference.text
        expected = np.asarray(Image.open(io.BytesIO(reference.content)).convert("RGBA")).astype(int)
        pi, pj = int((lx - bx0) / deep.cell_size), int((by1 - ly) / deep.cell_size)  # the point in the tile
        assert expected[pj, pi, 3] == 255 and (expected[..., 3] == 255).mean() > 0.1
        for url in (f"/wmts/1.0.0/MONTAGNE/normal/LAMB93/20/{trow}/{tcol}.png",
                    f"/ogcapi/collections/MONTAGNE/map/tiles/LAMB93/20/{trow}/{tcol}"):
            answer = http.get(url)
            assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", (url, answer.text)
            pixels = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGBA")).astype(int)
            assert pixels[pj, pi, 3] == 255 and (pixels[..., 3] == 255).mean() > 0.1  # data, not nodata
            assert np.abs(pixels - expected).mean() < 2  # what WMS draws there
