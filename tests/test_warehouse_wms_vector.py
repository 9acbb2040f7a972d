"""WMS-vector over real HTTP: GEOSERVER-STYLE / GEOSERVER-FTL statics, WMS-VECTOR configurations and
offerings (open and private), and the layer served by /wms beside raster layers.

IGN's SDK runs its own `generic_vecteur` steps `configuration-wms-bdd` and `publication-wms-bdd`
unmodified, with its own `CANTON_style.sld` uploaded (by the SDK's `delivery` of a static descriptor)
as `style_canton`, on a valid polygon set named as the SDK's CANTON (the SDK's shapefile is
truncated). The map is checked against an independent rendering: the source features, filtered by
the SLD's rules in Python, filled with Pillow's polygon rasteriser; pixels more than 2 px from any
polygon edge (the 1 px stroke and antialiasing) must match exactly (±1 level), every one of them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import shapely
from lxml import etree
from PIL import Image, ImageDraw
from test_warehouse_support import LAST_NAME, api_client, egpf, wait_for, warehouse_server, write_ini
from test_warehouse_vector import _ok, endpoint_id, integrate, read_source, upload, write_layer

BASE = "/api/datastores/default"
SDK_DATA = "_data/datasets/1_dataset_vector"
SCHEMAS = Path(__file__).parent / "schemas"
# the SDK's CANTON_style.sld: insee_dep → fill colour (the "" rule matches no canton here)
SLD_FILLS = {"75": (0xE9, 0x4A, 0x4C), "92": (0xC6, 0x53, 0xE6), "93": (0x75, 0xE5, 0xA0), "94": (0x6A, 0x94, 0xCE)}
DEPARTMENTS = ("75", "92", "93", "94", "77", "75")  # 77 has no rule: not drawn
MAP_BBOX = (639000.0, 6853000.0, 659000.0, 6859000.0)  # EPSG:2154, 40 m per pixel at 500×150
SIZE = (500, 150)


def sdk_root() -> Path:
    sdk = pytest.importorskip("sdk_entrepot_gpf")
    return Path(sdk.__file__).parent


def canton_set() -> tuple[list[Any], dict[str, np.ndarray]]:
    """Six cantons around Paris in Lambert 93, one per department of the SDK's SLD and one without rule."""
    geoms, rows = [], []
    for i, dep in enumerate(DEPARTMENTS):
        x, y = 640000.0 + i * 3000.0, 6854000.0 + (i % 2) * 1000.0
        ring = shapely.Polygon([(x, y), (x + 2400.0, y), (x + 2400.0, y + 2000.0), (x + 1200.0, y + 3000.0), (x, y + 2000.0)])
        geoms.append(shapely.MultiPolygon([ring]))
        rows.append((f"{dep}{i:02d}", dep, "11", f"Canton n°{i}", 1000 + i * 37))
    names = ("insee_can", "insee_dep", "insee_reg", "nom", "population")
    columns = list(zip(*rows, strict=True))
    fields = {n: np.array(c, dtype=object if isinstance(c[0], str) else None) for n, c in zip(names, columns, strict=True)}
    return geoms, fields


def canton_shapefile(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    geoms, fields = canton_set()
    write_layer(folder / "CANTON.shp", geoms, fields, driver="ESRI Shapefile")
    return sorted(folder.glob("CANTON.*"))


def expected_map(source: list[dict[str, Any]], bbox: tuple[float, ...], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(RGBA picture, mask of pixels far from every edge) of the SLD's fills, drawn by Pillow."""
    width, height = size
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    edges = Image.new("L", size, 0)
    draw, draw_edges = ImageDraw.Draw(image), ImageDraw.Draw(edges)
    sx, sy = width / (bbox[2] - bbox[0]), height / (bbox[3] - bbox[1])
    for row in source:
        fill = SLD_FILLS.get(row["insee_dep"])
        for polygon in getattr(row["geometry"], "geoms", [row["geometry"]]):
            points = [((x - bbox[0]) * sx, (bbox[3] - y) * sy) for x, y in polygon.exterior.coords]
            if fill is not None:
                draw.polygon(points, fill=(*fill, 255))
            draw_edges.line(points, fill=255, width=5, joint="curve")  # 2 px either side of the edge
    return np.asarray(image), np.asarray(edges) == 0


def get_map(client: httpx.Client, layers: str, bbox: tuple[float, ...] = MAP_BBOX, size: tuple[int, int] = SIZE,
            crs: str = "EPSG:2154", **extra: str) -> httpx.Response:
    return client.get("/wms", params={"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": layers,
                                      "STYLES": "", "CRS": crs, "BBOX": ",".join(repr(v) for v in bbox),
                                      "WIDTH": str(size[0]), "HEIGHT": str(size[1]), "FORMAT": "image/png",
                                      "TRANSPARENT": "TRUE", **extra})


def picture(answer: httpx.Response) -> np.ndarray:
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("image/"), answer.text[:2000]
    return np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGBA"))


def feature_info(client: httpx.Client, layers: str, i: int, j: int, info_format: str = "application/json",
                 **extra: str) -> httpx.Response:
    return client.get("/wms", params={"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetFeatureInfo",
                                      "LAYERS": layers, "QUERY_LAYERS": layers, "STYLES": "", "CRS": "EPSG:2154",
                                      "BBOX": ",".join(repr(v) for v in MAP_BBOX), "WIDTH": str(SIZE[0]),
                                      "HEIGHT": str(SIZE[1]), "I": str(i), "J": str(j), "INFO_FORMAT": info_format,
                                      **extra})


def pixel_of(x: float, y: float) -> tuple[int, int]:
    return (int((x - MAP_BBOX[0]) / (MAP_BBOX[2] - MAP_BBOX[0]) * SIZE[0]),
            int((MAP_BBOX[3] - y) / (MAP_BBOX[3] - MAP_BBOX[1]) * SIZE[1]))


def capabilities_schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(SCHEMAS / "wms" / "1.3.0" / "capabilities_1_3_0.xsd")))


# --- the SDK's own workflow ------------------------------------------------------------------------------------


def test_sdk_configuration_and_publication_wms_bdd(tmp_path: Path, vector_backend: str) -> None:
    from owslib.wms import WebMapService

    root = sdk_root()
    dataset = tmp_path / "1_dataset_vector"
    files = canton_shapefile(dataset / "CANTON")
    descriptor = json.loads((root / SDK_DATA / "upload_descriptor.json").read_text())
    (dataset / "upload_descriptor.json").write_text(json.dumps(descriptor))
    style_file = root / SDK_DATA / "CANTON_style.sld"
    statics = tmp_path / "static_descriptor.json"
    statics.write_text(json.dumps({"static": [{"file": str(style_file), "name": "style_canton",
                                               "type": "GEOSERVER-STYLE", "description": "Style des cantons"}]}))
    workflow = root / "_data/workflows/generic_vecteur.jsonc"
    with warehouse_server(tmp_path) as (url, _settings):
        ini = write_ini(tmp_path / "config.ini", url)
        for args in (("delivery", str(dataset / "upload_descriptor.json")),
                     ("workflow", "-f", str(workflow), "-s", "mise-en-base"),
                     ("delivery", str(statics)),
                     ("workflow", "-f", str(workflow), "-s", "configuration-wms-bdd"),
                     ("workflow", "-f", str(workflow), "-s", "publication-wms-bdd")):
            result = egpf(ini, *args, cwd=tmp_path)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

        client = api_client(url)
        [static] = client.get(f"{BASE}/statics").json()
        assert static["name"] == "style_canton" and static["type"] == "GEOSERVER-STYLE"
        assert static["type_infos"]["used_attributes"] == ["insee_dep"]
        [offering] = client.get(f"{BASE}/offerings").json()
        assert offering["status"] == "PUBLISHED" and offering["type"] == "WMS-VECTOR"
        assert offering["endpoint"]["technical_name"] == "gpf-geoserver-wms-v"
        capabilities_url = next(u["url"] for u in offering["urls"] if u["type"] == "WMS")
        layer = f"{LAST_NAME}__vecteur_wms_bdd"

        # the map against an independent rendering of the same features and rules
        source = read_source(files[[f.suffix for f in files].index(".shp")])
        expected, far = expected_map(source, MAP_BBOX, SIZE)
        anonymous = httpx.Client(base_url=url, timeout=30)
        drawn = picture(get_map(anonymous, layer))
        difference = np.abs(drawn.astype(int) - expected.astype(int)).max(axis=2)
        assert far.sum() > 0.8 * far.size
        assert (difference[far] <= 1).all(), f"{(difference[far] > 1).sum()} of {far.sum()} pixels differ"
        inside = far & (expected[..., 3] == 255)
        assert inside.sum() > 4 * 1500  # five drawn cantons of ~2000 px each, minus their rims
        canton_77 = source[DEPARTMENTS.index("77")]["geometry"].centroid
        assert drawn[pixel_of(canton_77.x, canton_77.y)[::-1]][3] == 0  # no rule: not drawn

        # GetFeatureInfo on the 92 canton: its attributes
        centre = source[1]["geometry"].centroid
        i, j = pixel_of(centre.x, centre.y)
        answer = feature_info(anonymous, layer, i, j)
        assert answer.status_code == 200, answer.text
        [feature] = answer.json()["features"]
        assert {k: feature["properties"][k] for k in ("insee_can", "insee_dep", "nom", "population")} == {
            k: source[1][k] for k in ("insee_can", "insee_dep", "nom", "population")}
        plain = feature_info(anonymous, layer, i, j, "text/plain")
        assert plain.status_code == 200 and f"insee_can = {source[1]['insee_can']}" in plain.text
        html = feature_info(anonymous, layer, i, j, "text/html")
        assert html.status_code == 200 and f"<td>{source[1]['nom']}</td>" in html.text
        gml = feature_info(anonymous, layer, i, j, "text/xml")
        assert gml.status_code == 200 and source[1]["insee_can"] in gml.text
        etree.fromstring(gml.content)  # well-formed
        between = pixel_of(640000.0 + 2700.0, 6856000.0)  # between two cantons, beyond the 3 px tolerance
        assert feature_info(anonymous, layer, *between).json()["features"] == []
        undrawn = pixel_of(canton_77.x, canton_77.y)  # as GeoServer: only features a rule draws
        assert feature_info(anonymous, layer, *undrawn).json()["features"] == []

        # capabilities: schema-valid, read by OWSLib
        document = anonymous.get(capabilities_url)
        assert document.status_code == 200
        capabilities_schema().assertValid(etree.fromstring(document.content))
        wms = WebMapService(capabilities_url.split("?")[0], version="1.3.0")
        assert layer in wms.contents and wms.contents[layer].queryable == 1
        west, south, east, north = wms.contents[layer].boundingBoxWGS84
        assert 2.0 < west < east < 2.6 and 48.6 < south < north < 48.9
        mercator = _mercator(MAP_BBOX)
        image = wms.getmap(layers=[layer], styles=[""], srs="EPSG:3857", format="image/jpeg", bbox=mercator, size=SIZE)
        decoded = np.asarray(Image.open(io.BytesIO(image.read())).convert("RGB"))
        from pyproj import Transformer

        mx, my = Transformer.from_crs("EPSG:2154", "EPSG:3857", always_xy=True).transform(centre.x, centre.y)
        i3857 = int((mx - mercator[0]) / (mercator[2] - mercator[0]) * SIZE[0])
        j3857 = int((mercator[3] - my) / (mercator[3] - mercator[1]) * SIZE[1])
        assert np.abs(decoded[j3857, i3857].astype(int) - np.array(SLD_FILLS["92"])).max() < 24  # JPEG, reprojected


def _mercator(bbox: tuple[float, ...]) -> tuple[float, ...]:
    from pyproj import Transformer

    return Transformer.from_crs("EPSG:2154", "EPSG:3857", always_xy=True).transform_bounds(*bbox)


# --- statics and configurations, validated as the platform does ---------------------------------------------


def sld_document(table: str, attribute: str = "insee_dep", fill: str = "#e94a4c", value: str = "75") -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<StyledLayerDescriptor version="1.0.0" xmlns="http://www.opengis.net/sld" xmlns:ogc="http://www.opengis.net/ogc">
  <NamedLayer><Name>{table}</Name><UserStyle><Name>s</Name><FeatureTypeStyle><Rule>
    <ogc:Filter><ogc:PropertyIsEqualTo><ogc:PropertyName>{attribute}</ogc:PropertyName>
      <ogc:Literal>{value}</ogc:Literal></ogc:PropertyIsEqualTo></ogc:Filter>
    <PolygonSymbolizer><Fill><CssParameter name="fill">{fill}</CssParameter></Fill></PolygonSymbolizer>
  </Rule></FeatureTypeStyle></UserStyle></NamedLayer>
</StyledLayerDescriptor>""".encode()


SE_STYLE = b"""<?xml version="1.0" encoding="UTF-8"?>
<StyledLayerDescriptor xmlns="http://www.opengis.net/sld" xmlns:ogc="http://www.opengis.net/ogc"
  xmlns:se="http://www.opengis.net/se" version="1.1.0">
  <NamedLayer><se:Name>canton</se:Name><UserStyle><se:Name>peuples</se:Name><se:FeatureTypeStyle><se:Rule>
    <ogc:Filter><ogc:PropertyIsGreaterThan><ogc:PropertyName>population</ogc:PropertyName>
      <ogc:Literal>1100</ogc:Literal></ogc:PropertyIsGreaterThan></ogc:Filter>
    <se:PolygonSymbolizer><se:Fill><se:SvgParameter name="fill">#ff8800</se:SvgParameter></se:Fill></se:PolygonSymbolizer>
    <se:TextSymbolizer><se:Label><ogc:PropertyName>nom</ogc:PropertyName></se:Label></se:TextSymbolizer>
  </se:Rule></se:FeatureTypeStyle></UserStyle></NamedLayer>
</StyledLayerDescriptor>"""

FTL = b"""<#list features as feature>
<p class="canton">${feature.nom.value} (${feature.insee_can.value})</p>
</#list>"""


def add_static(client: httpx.Client, name: str, kind: str, content: bytes, status: int = 201) -> dict[str, Any]:
    answer = client.post(f"{BASE}/statics", params={"name": name, "type": kind, "description": "d"},
                         files={"file": (f"{name}.txt", content)})
    assert answer.status_code == status, answer.text
    return answer.json()


def wmsv_configuration(stored_id: str, layer_name: str, relations: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "WMS-VECTOR", "name": layer_name, "layer_name": layer_name,
            "type_infos": {"title": f"{layer_name} title", "abstract": "Cantons", "keywords": ["Vecteur"],
                           "used_data": [{"stored_data": stored_id, "relations": relations}]}}


def canton_base(client: httpx.Client, tmp_path: Path, table: str = "canton") -> dict[str, Any]:
    geoms, fields = canton_set()
    gpkg = tmp_path / f"{table}.gpkg"
    write_layer(gpkg, geoms, fields, layer=table)
    return integrate(client, upload(client, {f"{table}.gpkg": gpkg})["_id"])


def errors(answer: httpx.Response) -> str:
    return "\n".join(answer.json()["error_description"])


def test_statics_configuration_validation_and_a_private_layer(tmp_path: Path, vector_backend: str) -> None:
    root = sdk_root()
    with warehouse_server(tmp_path) as (url, _settings):
        client = api_client(url)
        stored = canton_base(client, tmp_path)

        # statics: what is wrong is said
        refused = add_static(client, "broken", "GEOSERVER-STYLE", b"<StyledLayerDescriptor", 400)
        assert "not well-formed" in "\n".join(refused["error_description"])
        refused = add_static(client, "json", "GEOSERVER-STYLE", b'{"a": 1}', 400)
        assert "not a valid SLD style" in "\n".join(refused["error_description"])
        refused = add_static(client, "ftl", "GEOSERVER-FTL", b"<#list features as f>${f.nom.value}", 400)
        assert "never closed" in "\n".join(refused["error_description"])
        style = add_static(client, "style_canton", "GEOSERVER-STYLE", (root / SDK_DATA / "CANTON_style.sld").read_bytes())
        assert style["type_infos"] == {"used_attributes": ["insee_dep"]}
        missing = add_static(client, "altitude", "GEOSERVER-STYLE", sld_document("canton", "altitude"))
        assert missing["type_infos"]["used_attributes"] == ["altitude"]
        other_table = add_static(client, "communes", "GEOSERVER-STYLE", sld_document("communes"))
        template = add_static(client, "ftl_canton", "GEOSERVER-FTL", FTL)
        assert template["type_infos"]["used_attributes"] == ["insee_can", "nom"]
        bad_template = add_static(client, "ftl_bad", "GEOSERVER-FTL", b"${feature.surface.value}")
        se_style = add_static(client, "qgis", "GEOSERVER-STYLE", SE_STYLE)  # SE / SLD 1.1.0, as QGIS writes
        assert se_style["type_infos"]["used_attributes"] == ["nom", "population"]
        file = client.get(f"{BASE}/statics/{style['_id']}/file")
        assert file.status_code == 200 and file.content == (root / SDK_DATA / "CANTON_style.sld").read_bytes()

        # configurations: the platform's refusals
        def refusal(relations: list[dict[str, Any]]) -> str:
            answer = client.post(f"{BASE}/configurations", json=wmsv_configuration(stored["_id"], "bad", relations))
            assert answer.status_code == 400, answer.text
            return errors(answer)

        assert "uses attribute(s) altitude which table 'canton' lacks" in refusal([{"name": "canton", "style": missing["_id"]}])
        assert "NamedLayer/Name is 'communes', not the table's name 'canton'" in refusal(
            [{"name": "canton", "style": other_table["_id"]}])
        assert "the stored data has no table nope" in refusal([{"name": "nope", "style": style["_id"]}])
        assert "template uses attribute(s) surface" in refusal(
            [{"name": "canton", "style": style["_id"], "ftl": bad_template["_id"]}])
        assert "no GEOSERVER-STYLE static" in refusal([{"name": "canton", "style": template["_id"]}])

        configuration = client.post(f"{BASE}/configurations", json=wmsv_configuration(
            stored["_id"], "cantons_prives", [{"name": "canton", "style": style["_id"], "ftl": template["_id"]}]))
        assert configuration.status_code == 201, configuration.text
        private = endpoint_id(client, "gpf-geoserver-wms-v-private")
        assert "private endpoint" in errors(client.post(f"{BASE}/configurations/{configuration.json()['_id']}/offerings",
                                                        json={"endpoint": private, "open": True}))
        offering = _ok(client.post(f"{BASE}/configurations/{configuration.json()['_id']}/offerings",
                                   json={"endpoint": private, "open": False}), 201)
        assert offering["status"] == "PUBLISHED" and offering["open"] is False
        assert [u["type"] for u in offering["urls"]] == ["WMS"]

        # statics in use: not deleted; renamed; re-uploaded only if the new file still fits
        assert client.delete(f"{BASE}/statics/{style['_id']}").status_code == 409
        renamed = client.patch(f"{BASE}/statics/{style['_id']}", json={"name": "config_x_style_wmsv_canton"})
        assert renamed.status_code == 200 and renamed.json()["name"] == "config_x_style_wmsv_canton"
        put = client.put(f"{BASE}/statics/{style['_id']}", files={"file": ("s.sld", sld_document("canton", "altitude"))})
        assert put.status_code == 400 and "altitude" in errors(put)

        # the private layer: invisible and refused without a key, served with one
        anonymous = httpx.Client(base_url=url, timeout=30)
        caps = {"SERVICE": "WMS", "REQUEST": "GetCapabilities"}
        assert "cantons_prives" not in anonymous.get("/wms", params=caps).text
        denied = get_map(anonymous, "cantons_prives")
        assert denied.status_code == 400 and "LayerNotDefined" in denied.text
        key = _ok(client.post("/api/users/me/keys", json={"name": "k", "type": "HASH",
                                                          "type_infos": {"hash": "a-key-for-the-wmsv-layer"}}), 201)
        assert client.post(f"/api/users/me/keys/{key['_id']}/accesses",
                           json={"offerings": [offering["_id"]]}).status_code in (200, 201)
        drawn = picture(wait_for(lambda: (a := get_map(anonymous, "cantons_prives", apikey="a-key-for-the-wmsv-layer"))
                                 .status_code == 200 and a))
        geoms, fields = canton_set()
        centre = geoms[0].centroid
        assert tuple(drawn[pixel_of(centre.x, centre.y)[::-1]]) == (*SLD_FILLS["75"], 255)
        assert "private" in get_map(anonymous, "cantons_prives", apikey="a-key-for-the-wmsv-layer").headers["cache-control"]
        listed = anonymous.get("/wms", params={**caps, "apikey": "a-key-for-the-wmsv-layer"})
        assert "<Name>cantons_prives</Name>" in listed.text

        # GetFeatureInfo as HTML: the table, or the relation's FreeMarker template when the engine is here
        i, j = pixel_of(centre.x, centre.y)
        html = feature_info(anonymous, "cantons_prives", i, j, "text/html", apikey="a-key-for-the-wmsv-layer")
        assert html.status_code == 200 and fields["nom"][0] in html.text
        two = feature_info(anonymous, "cantons_prives", i, j, FEATURE_COUNT="5", apikey="a-key-for-the-wmsv-layer")
        assert [f["properties"]["insee_can"] for f in two.json()["features"]] == [fields["insee_can"][0]]

        # a re-uploaded style is drawn at once
        put = client.put(f"{BASE}/statics/{style['_id']}", files={"file": ("s.sld", sld_document("canton", fill="#00ff00"))})
        assert put.status_code == 200, put.text
        redrawn = wait_for(lambda: tuple(picture(get_map(anonymous, "cantons_prives", apikey="a-key-for-the-wmsv-layer"))
                                         [pixel_of(centre.x, centre.y)[::-1]]) == (0, 255, 0, 255))
        assert redrawn

        # SE 1.1 styles draw too, and a published configuration takes a new body at once (PUT)
        se_body = wmsv_configuration(stored["_id"], "cantons_bleus", [{"name": "canton", "style": se_style["_id"]}])
        se_configuration = client.post(f"{BASE}/configurations", json=se_body)
        assert se_configuration.status_code == 201, se_configuration.text
        assert client.delete(f"{BASE}/configurations/{se_configuration.json()['_id']}").status_code == 204

        # a relation without style: the platform's default blue
        plain = client.post(f"{BASE}/configurations", json=wmsv_configuration(stored["_id"], "cantons_bleus",
                                                                               [{"name": "canton"}]))
        assert plain.status_code == 201, plain.text
        _ok(client.post(f"{BASE}/configurations/{plain.json()['_id']}/offerings",
                        json={"endpoint": endpoint_id(client, "gpf-geoserver-wms-v"), "open": True}), 201)
        blue = picture(get_map(anonymous, "cantons_bleus"))[pixel_of(centre.x, centre.y)[::-1]]
        assert np.abs(blue[:3].astype(int) - (0x33, 0x66, 0xCC)).max() <= 1 and 140 < blue[3] < 165  # fill-opacity 0.6
        replaced = client.put(f"{BASE}/configurations/{plain.json()['_id']}", json=se_body)
        assert replaced.status_code == 200, replaced.text
        # away from the labels (drawn above every shape: canton n°4's runs into this canton's bottom)
        corner = pixel_of(geoms[-1].bounds[0] + 300.0, geoms[-1].bounds[1] + 1500.0)
        # population 1185 > 1100: orange under the SE style
        assert wait_for(lambda: tuple(picture(get_map(anonymous, "cantons_bleus"))[corner[::-1]]) == (0xFF, 0x88, 0x00, 255))
        opaque = picture(get_map(anonymous, "cantons_bleus", TRANSPARENT="FALSE", BGCOLOR="0x000000"))
        assert opaque[0, 0].tolist() == [0, 0, 0, 255]

        # deleting the offering and the configuration frees the statics
        assert client.delete(f"{BASE}/offerings/{offering['_id']}").status_code == 204
        assert client.delete(f"{BASE}/configurations/{configuration.json()['_id']}").status_code == 204
        assert client.delete(f"{BASE}/statics/{style['_id']}").status_code == 204


# --- one /wms: raster and vector layers together -----------------------------------------------------------


def test_mixed_raster_and_vector_map_and_capabilities(tmp_path: Path, vector_backend: str) -> None:
    from apputil import layer_descriptor

    from tileserver.publication.model import parse_layer
    from tileserver.publication.store import PublicationStore

    area = shapely.box(1.55, 46.10, 1.75, 46.20)  # inside the SCAN1000 fixture's level 10 (lon/lat)
    gpkg = tmp_path / "zone.gpkg"
    write_layer(gpkg, [shapely.MultiPolygon([area])], {"nom": np.array(["zone"], dtype=object)}, layer="zone",
                crs="EPSG:4326")
    with warehouse_server(tmp_path) as (url, settings):
        store = PublicationStore(settings.resolved_store_url)
        try:
            store.add_layer(parse_layer("SCAN", layer_descriptor("SCAN1000")))
        finally:
            store.close()
        client = api_client(url)
        stored = integrate(client, upload(client, {"zone.gpkg": gpkg}, srs="EPSG:4326")["_id"])
        configuration = _ok(client.post(f"{BASE}/configurations", json=wmsv_configuration(
            stored["_id"], "zone", [{"name": "zone"}])), 201)
        _ok(client.post(f"{BASE}/configurations/{configuration['_id']}/offerings",
                        json={"endpoint": endpoint_id(client, "gpf-geoserver-wms-v"), "open": True}), 201)
        anonymous = httpx.Client(base_url=url, timeout=30)
        bbox, size = (1.45, 46.07, 1.95, 46.25), (250, 90)
        wait_for(lambda: get_map(anonymous, "SCAN", bbox, size, "CRS:84").status_code == 200)
        raster = picture(get_map(anonymous, "SCAN", bbox, size, "CRS:84"))
        vector = picture(get_map(anonymous, "zone", bbox, size, "CRS:84"))
        mixed = picture(get_map(anonymous, "SCAN,zone", bbox, size, "CRS:84"))
        under = picture(get_map(anonymous, "zone,SCAN", bbox, size, "CRS:84"))
        assert (raster[..., 3] > 0).mean() > 0.2 and (vector[..., 3] > 0).mean() > 0.1
        assert ((raster[..., 3] == 255) & (vector[..., 3] > 0)).sum() > 500  # they overlap

        # alpha-over, computed here: vector over raster
        a = vector[..., 3:4] / 255.0
        b = raster[..., 3:4] / 255.0
        out_a = a + b * (1 - a)
        rgb = np.where(out_a > 0, (vector[..., :3] * a + raster[..., :3] * b * (1 - a)) / np.maximum(out_a, 1e-9), 0)
        expected = np.concatenate([rgb, out_a * 255.0], axis=2)
        assert np.abs(mixed.astype(float) - expected).max() <= 1.5
        outside = (vector[..., 3] == 0) & (raster[..., 3] > 0)
        assert np.abs(mixed[outside].astype(int) - raster[outside]).max() <= 1  # the raster alone, to rounding
        assert (mixed[vector[..., 3] > 0] != raster[vector[..., 3] > 0]).any()
        opaque = raster[..., 3] == 255
        assert np.abs(under[opaque].astype(int) - raster[opaque]).max() <= 1  # the raster over the vector hides it

        # formats: JPEG (BGCOLOR under transparency), GeoTIFF; data formats refused for a vector layer
        jpeg = get_map(anonymous, "SCAN,zone", bbox, size, "CRS:84", FORMAT="image/jpeg", TRANSPARENT="FALSE")
        assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
        tiff = get_map(anonymous, "zone", bbox, size, "CRS:84", FORMAT="image/geotiff")
        assert tiff.status_code == 200 and tiff.headers["content-type"] == "image/geotiff"
        refused = get_map(anonymous, "zone", bbox, size, "CRS:84", FORMAT="text/asc")
        assert refused.status_code == 400 and "InvalidFormat" in refused.text
        lat_lon = picture(get_map(anonymous, "SCAN,zone", (bbox[1], bbox[0], bbox[3], bbox[2]), size, "EPSG:4326"))
        assert np.abs(lat_lon.astype(int) - mixed).max() <= 1  # 1.3.0 EPSG:4326 is latitude first
        refused = get_map(anonymous, "zone", bbox, size, "EPSG:99999")
        assert refused.status_code == 400 and "InvalidCRS" in refused.text
        refused = get_map(anonymous, "zone", bbox, size, "CRS:84", STYLES="nope")
        assert refused.status_code == 400 and "StyleNotDefined" in refused.text

        # one capabilities document: both kinds, the same CRS list, schema-valid
        document = anonymous.get("/wms", params={"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetCapabilities"})
        root = etree.fromstring(document.content)
        capabilities_schema().assertValid(root)
        ns = {"w": "http://www.opengis.net/wms"}
        layers = {n.findtext("w:Name", namespaces=ns): n for n in root.findall("w:Capability/w:Layer/w:Layer", ns)}
        assert {"SCAN", "zone"} <= set(layers)
        zone = layers["zone"]
        assert zone.get("queryable") == "1" and zone.findall("w:CRS", ns) == []  # the root's list
        box = zone.find("w:EX_GeographicBoundingBox", ns)
        assert float(box.findtext("w:westBoundLongitude", namespaces=ns)) == pytest.approx(1.55)
        assert float(box.findtext("w:northBoundLatitude", namespaces=ns)) == pytest.approx(46.20)
        crs = {b.get("CRS") for b in zone.findall("w:BoundingBox", ns)}
        root_crs = {c.text for c in root.findall("w:Capability/w:Layer/w:CRS", ns)}
        assert crs == root_crs
        v111 = anonymous.get("/wms", params={"SERVICE": "WMS", "VERSION": "1.1.1", "REQUEST": "GetCapabilities"})
        assert v111.status_code == 200 and "<Name>zone</Name>" in v111.text
        # GetFeatureInfo on a raster and a vector layer at once is refused (one kind per request)
        both = anonymous.get("/wms", params={"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetFeatureInfo",
                                             "LAYERS": "SCAN,zone", "QUERY_LAYERS": "SCAN,zone", "STYLES": "",
                                             "CRS": "CRS:84", "BBOX": ",".join(map(str, bbox)), "WIDTH": "250",
                                             "HEIGHT": "90", "I": "100", "J": "40", "INFO_FORMAT": "text/plain"})
        assert both.status_code == 400
