"""WMS-vector layers in /wms, in process: a layer record drawing two tables of a GeoPackage (the first on
top), GetMap in 1.3.0 and 1.1.1, exceptions in the image, GetFeatureInfo's FEATURE_COUNT and order,
legends, and what a vector layer is not (no data formats)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import numpy as np
import pyogrio.raw
import pytest
import shapely
from apputil import app_client, make_settings
from PIL import Image

from tileserver.publication.model import parse_layer

RED, GREEN = (255, 0, 0), (0, 160, 0)
BBOX = (0.0, 0.0, 100.0, 100.0)  # EPSG:3857 metres, 1 m per pixel at 100×100


def _sld(table: str, colour: str) -> str:
    return f"""<StyledLayerDescriptor version="1.0.0" xmlns="http://www.opengis.net/sld">
  <NamedLayer><Name>{table}</Name><UserStyle><FeatureTypeStyle><Rule>
    <PolygonSymbolizer><Fill><CssParameter name="fill">{colour}</CssParameter></Fill></PolygonSymbolizer>
  </Rule></FeatureTypeStyle></UserStyle></NamedLayer></StyledLayerDescriptor>"""


def _table(path: Path, name: str, box: tuple[float, ...], label: str, crs: str = "EPSG:3857") -> None:
    geometry = np.array([shapely.to_wkb(shapely.MultiPolygon([shapely.box(*box)]))], dtype=object)
    pyogrio.raw.write(path, geometry, [np.array([label], dtype=object)], ["nom"], layer=name, driver="GPKG",
                      geometry_type="MultiPolygon", crs=crs, append=path.exists())


def _record(base: Path, order: tuple[str, str], restricted: bool = False) -> dict:
    colours = {"dessus": "#ff0000", "dessous": "#00a000"}
    return {"title": "zones", "abstract": "two tables", "restricted": restricted,
            "vector_map": {"base": str(base), "relations": [{"name": n, "sld": _sld(n, colours[n])} for n in order]},
            **{s: {"enabled": s == "wms"} for s in ("wms", "wmts", "tms", "ogcapi")}}


@pytest.fixture(scope="module")
async def client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wmsv")
    base = folder / "zones.gpkg"
    _table(base, "dessus", (20.0, 20.0, 60.0, 60.0), "haut")
    _table(base, "dessous", (40.0, 40.0, 90.0, 90.0), "bas")
    async with app_client(make_settings(folder)) as c:
        runtime = c.app.state.runtime
        runtime.store.add_layer(parse_layer("top_first", _record(base, ("dessus", "dessous"))))
        runtime.store.add_layer(parse_layer("bottom_first", _record(base, ("dessous", "dessus"))))
        other = folder / "paris.gpkg"  # a table in a CRS the server does not list: the layer offers it
        _table(other, "dessus", (600000.0, 2420000.0, 610000.0, 2430000.0), "paris", crs="EPSG:27572")
        record = _record(other, ("dessus",))
        record["title"] = "Lambert II"
        runtime.store.add_layer(parse_layer("lambert2", record))
        await runtime.refresh()
        yield c


async def _get(client, **params):
    query = {"SERVICE": "WMS", "VERSION": "1.3.0", "STYLES": "", "CRS": "EPSG:3857",
             "BBOX": ",".join(map(str, BBOX)), "WIDTH": "100", "HEIGHT": "100", **params}
    return await client.get("/wms?" + urlencode(query))


def _rgba(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGBA"))


async def test_the_first_relation_is_drawn_on_top(client):
    top = _rgba(await _get(client, REQUEST="GetMap", LAYERS="top_first", FORMAT="image/png", TRANSPARENT="TRUE"))
    bottom = _rgba(await _get(client, REQUEST="GetMap", LAYERS="bottom_first", FORMAT="image/png", TRANSPARENT="TRUE"))
    overlap, only_red, empty = (50, 50), (70, 30), (5, 95)  # (row, col)
    assert tuple(top[overlap]) == (*RED, 255) and tuple(bottom[overlap]) == (*GREEN, 255)
    assert tuple(top[only_red]) == tuple(bottom[only_red]) == (*RED, 255)
    assert top[empty][3] == 0


async def test_1_1_1_and_exceptions_in_the_image(client):
    v111 = _rgba(await _get(client, VERSION="1.1.1", REQUEST="GetMap", LAYERS="top_first", SRS="EPSG:3857",
                            FORMAT="image/png", TRANSPARENT="TRUE"))
    v130 = _rgba(await _get(client, REQUEST="GetMap", LAYERS="top_first", FORMAT="image/png", TRANSPARENT="TRUE"))
    assert (v111 == v130).all()
    bad = await _get(client, REQUEST="GetMap", LAYERS="top_first", FORMAT="image/png", STYLES="nope",
                     EXCEPTIONS="INIMAGE")
    assert bad.status_code == 200 and bad.headers["content-type"] == "image/png"  # the error drawn in the image
    bil = await _get(client, REQUEST="GetMap", LAYERS="top_first", FORMAT="image/x-bil;bits=32")
    assert bil.status_code == 400 and "InvalidFormat" in bil.text


async def test_legend_of_a_vector_layer_draws_each_relation_s_rules_in_drawing_order(client):
    legend = await client.get("/wms?SERVICE=WMS&REQUEST=GetLegendGraphic&VERSION=1.3.0&FORMAT=image/png&LAYER=top_first")
    picture = _rgba(legend)
    assert legend.headers["content-type"] == "image/png"
    # one 20-pixel swatch row per relation (one rule each), the first relation's on top
    rows = [tuple(picture[y, 10]) for y in range(picture.shape[0])]
    first_red = rows.index((*RED, 255))
    first_green = rows.index((*GREEN, 255))
    assert first_red < first_green and picture.shape[0] >= 40
    assert (await client.get("/wms?SERVICE=WMS&REQUEST=GetLegendGraphic&VERSION=1.3.0&FORMAT=image/jpeg"
                             "&LAYER=top_first")).status_code == 400
    missing = await client.get("/wms?SERVICE=WMS&REQUEST=GetLegendGraphic&VERSION=1.3.0&LAYER=top_first&RULE=nope")
    assert missing.status_code == 400 and "InvalidParameterValue" in missing.text


async def test_feature_count_and_order(client):
    async def info(count: str, i: int, j: int):
        answer = await _get(client, REQUEST="GetFeatureInfo", LAYERS="top_first", QUERY_LAYERS="top_first", I=str(i),
                            J=str(j), INFO_FORMAT="application/json", FEATURE_COUNT=count)
        assert answer.status_code == 200, answer.text
        return [f["properties"]["nom"] for f in json.loads(answer.content)["features"]]

    assert await info("5", 50, 50) == ["haut", "bas"]  # top relation first
    assert await info("1", 50, 50) == ["haut"]
    assert await info("5", 30, 70) == ["haut"]
    assert await info("5", 5, 5) == []
    assert await info("5", 62, 70) == ["haut"]  # 2 px right of its edge: within the 3 px tolerance
    bad = await _get(client, REQUEST="GetFeatureInfo", LAYERS="top_first", QUERY_LAYERS="top_first", I="1", J="1",
                     INFO_FORMAT="application/json", FEATURE_COUNT="many")
    assert bad.status_code == 400 and "feature_count" in bad.text
    plain = await _get(client, REQUEST="GetFeatureInfo", LAYERS="top_first", QUERY_LAYERS="top_first", I="50", J="50",
                       INFO_FORMAT="text/plain", FEATURE_COUNT="2")
    assert "nom = haut" in plain.text and plain.text.index("haut") < plain.text.index("bas")


async def test_capabilities_in_both_versions_are_valid(client):
    from lxml import etree

    schemas = Path(__file__).parent / "schemas" / "wms"
    v130 = await client.get("/wms?SERVICE=WMS&REQUEST=GetCapabilities&VERSION=1.3.0")
    root = etree.fromstring(v130.content)
    etree.XMLSchema(etree.parse(str(schemas / "1.3.0" / "capabilities_1_3_0.xsd"))).assertValid(root)
    ns = {"w": "http://www.opengis.net/wms"}
    names = [n.text for n in root.findall("w:Capability/w:Layer/w:Layer/w:Name", ns)]
    assert names == ["bottom_first", "lambert2", "top_first"]
    [own] = [n for n in root.findall("w:Capability/w:Layer/w:Layer", ns) if n.findtext("w:Name", namespaces=ns) == "lambert2"]
    assert [c.text for c in own.findall("w:CRS", ns)] == ["EPSG:27572"]
    box = {b.get("CRS"): b for b in own.findall("w:BoundingBox", ns)}["EPSG:27572"]
    assert [float(box.get(k)) for k in ("minx", "miny", "maxx", "maxy")] == pytest.approx(
        [600000.0, 2420000.0, 610000.0, 2430000.0], abs=300)  # through CRS84 and back
    drawn = _rgba(await client.get("/wms?" + urlencode({
        "SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": "lambert2", "STYLES": "",
        "CRS": "EPSG:27572", "BBOX": "595000,2415000,615000,2435000", "WIDTH": "20", "HEIGHT": "20",
        "FORMAT": "image/png", "TRANSPARENT": "TRUE"})))
    assert tuple(drawn[10, 10]) == (*RED, 255) and drawn[1, 1][3] == 0
    v111 = await client.get("/wms?SERVICE=WMS&REQUEST=GetCapabilities&VERSION=1.1.1")
    dtd = etree.DTD(str(schemas / "1.1.1" / "capabilities_1_1_1.dtd"))
    document = etree.fromstring(v111.content)
    assert dtd.validate(document), dtd.error_log
    from pyproj import Transformer

    expected = Transformer.from_crs("EPSG:3857", "OGC:CRS84", always_xy=True).transform_bounds(20.0, 20.0, 90.0, 90.0)
    boxes = {n.findtext("Name"): n.find("LatLonBoundingBox") for n in document.findall("Capability/Layer/Layer")}
    assert [float(boxes["top_first"].get(k)) for k in ("minx", "miny", "maxx", "maxy")] == pytest.approx(expected, rel=1e-5)


async def test_vector_maps_take_a_render_slot(client):
    """The same gate as raster maps: with every slot taken, a vector GetMap is refused (503), then served."""
    from tileserver.render.gate import gate_for

    gate = gate_for(client.app.state.runtime)
    wait, gate.wait = gate.wait, 0.05
    held = 0
    try:
        for _ in range(gate.concurrency):
            await gate.acquire()
            held += 1
        busy = await _get(client, REQUEST="GetMap", LAYERS="top_first", FORMAT="image/png")
        assert busy.status_code == 503 and busy.headers["retry-after"] and "NoApplicableCode" in busy.text
    finally:
        for _ in range(held):
            gate.release()
        gate.wait = wait
    assert (await _get(client, REQUEST="GetMap", LAYERS="top_first", FORMAT="image/png")).status_code == 200


async def test_capabilities_style_of_a_vector_layer_links_its_legend(client):
    from lxml import etree

    caps = await client.get("/wms?SERVICE=WMS&REQUEST=GetCapabilities&VERSION=1.3.0")
    ns = {"w": "http://www.opengis.net/wms", "x": "http://www.w3.org/1999/xlink"}
    [layer] = etree.fromstring(caps.content).xpath("//w:Layer[w:Name='top_first']", namespaces=ns)
    [legend] = layer.xpath("w:Style/w:LegendURL", namespaces=ns)
    href = legend.xpath("w:OnlineResource/@x:href", namespaces=ns)[0]
    link = urlsplit(href)
    picture = _rgba(await client.get(f"{link.path}?{link.query}"))
    assert (picture.shape[1], picture.shape[0]) == (int(legend.get("width")), int(legend.get("height")))
