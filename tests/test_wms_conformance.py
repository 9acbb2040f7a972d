"""WMS conformance over real HTTP (uvicorn on loopback), built to the OGC suite's assertions
(PEERS-AND-TESTS §2.3): official schemas, every exception case, requests derived from our own
capabilities, OWSLib as a client, GDAL's WMS driver where installed, and a KVP fuzz that must
never produce a 5xx."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import httpx
import numpy as np
import pytest
from apputil import DATA, layer_descriptor, live_server, make_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree
from PIL import Image

SCHEMAS = Path(__file__).parent / "schemas"
NS = {"wms": "http://www.opengis.net/wms", "xlink": "http://www.w3.org/1999/xlink", "ogc": "http://www.opengis.net/ogc"}
HREF = f"{{{NS['xlink']}}}href"
LAYERS = {
    "SCAN1000": layer_descriptor("SCAN1000"),
    "MONTAGNE": layer_descriptor("MONTAGNE"),
    "BDPARCELLAIRE": layer_descriptor("BDPARCELLAIRE", get_feature_info={"type": "PYRAMID"}),
    "RGEALTI": layer_descriptor("RGEALTI", styles=["normal", "hypso", "estompage"], get_feature_info={"type": "PYRAMID"}),
    "HIDDEN": layer_descriptor("SCAN1000", wms={"enabled": False}),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    settings = make_settings(tmp_path_factory.mktemp("wmsc"), styles_directory=str(DATA / "styles"))
    with live_server(settings) as url:
        with httpx.Client(base_url=url) as admin:
            for layer_id, descriptor in LAYERS.items():
                answer = admin.post(f"/admin/layers/{layer_id}", json=descriptor,
                                    headers={"Authorization": "Bearer secret"})
                assert answer.status_code == 204, answer.text
        yield url


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as client:
        yield client


def wms(http: httpx.Client, **params) -> httpx.Response:
    return http.get("/wms?" + urlencode(params))


@pytest.fixture(scope="module")
def capabilities(http) -> etree._Element:
    return etree.fromstring(wms(http, SERVICE="WMS", REQUEST="GetCapabilities").content)


@pytest.fixture(scope="module")
def caps_schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(SCHEMAS / "wms" / "1.3.0" / "capabilities_1_3_0.xsd")))


@pytest.fixture(scope="module")
def exception_schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(SCHEMAS / "wms" / "1.3.0" / "exceptions_1_3_0.xsd")))


# --------------------------------------------------------------------------- capabilities document


def test_capabilities_validate_against_the_official_schema(capabilities, caps_schema):
    assert caps_schema.validate(capabilities), caps_schema.error_log
    location = capabilities.get("{http://www.w3.org/2001/XMLSchema-instance}schemaLocation").split()
    assert location == ["http://www.opengis.net/wms", "http://schemas.opengis.net/wms/1.3.0/capabilities_1_3_0.xsd"]


def test_online_resources_are_url_prefixes(capabilities):
    gets = capabilities.findall(".//wms:DCPType/wms:HTTP/wms:Get/wms:OnlineResource", NS)
    assert len(gets) == 3 and all(g.get(HREF).endswith(("?", "&")) for g in gets)
    assert capabilities.find(".//wms:GetCapabilities/wms:Format", NS).text == "text/xml"
    assert "XML" in [f.text for f in capabilities.findall(".//wms:Exception/wms:Format", NS)]


def _named_layers(capabilities):
    return capabilities.findall(".//wms:Layer[wms:Name]", NS)


def _advertised_crs(layer) -> list[str]:
    """Own and inherited CRS of a layer."""
    out: list[str] = []
    node = layer
    while node is not None and node.tag == f"{{{NS['wms']}}}Layer":
        out += [c.text for c in node.findall("wms:CRS", NS)]
        node = node.getparent()
    return out


def test_layer_metadata_rules(capabilities):
    root = capabilities.find("wms:Capability/wms:Layer", NS)
    root_crs = {c.text for c in root.findall("wms:CRS", NS)}
    assert {"CRS:84", "EPSG:4326"} <= root_crs
    names = [layer.find("wms:Name", NS).text for layer in _named_layers(capabilities)]
    assert sorted(names) == ["BDPARCELLAIRE", "MONTAGNE", "RGEALTI", "SCAN1000"] and len(set(names)) == len(names)
    root_styles = {s.text for s in root.findall("wms:Style/wms:Name", NS)}
    for layer in _named_layers(capabilities):
        crs = _advertised_crs(layer)
        boxes = [b.get("CRS") for b in layer.findall("wms:BoundingBox", NS)]
        assert crs and boxes and len(boxes) == len(set(boxes)) and set(boxes) <= set(crs)
        geo = layer.find("wms:EX_GeographicBoundingBox", NS)
        west, east, south, north = (float(geo.find(f"wms:{t}", NS).text) for t in
                                    ("westBoundLongitude", "eastBoundLongitude", "southBoundLatitude", "northBoundLatitude"))
        assert west < east and south < north
        assert not root_styles & {s.text for s in layer.findall("wms:Style/wms:Name", NS)}
        scales = [float(layer.find(f"wms:{t}ScaleDenominator", NS).text) for t in ("Min", "Max")]
        assert 0 < scales[0] < scales[1]


@pytest.mark.parametrize("asked", [None, "1.3.0", "100.0.0", "1.1.1", "1.2.0", "1.0.0", "x.y"])
def test_version_negotiation(http, asked):
    expected = {None: "1.3.0", "1.3.0": "1.3.0", "100.0.0": "1.3.0", "1.1.1": "1.1.1", "1.2.0": "1.1.1",
                "1.0.0": "1.1.1", "x.y": "1.3.0"}[asked]
    params = {"SERVICE": "WMS", "REQUEST": "GetCapabilities", **({"VERSION": asked} if asked else {})}
    assert etree.fromstring(wms(http, **params).content).get("version") == expected


def test_names_are_case_insensitive_and_values_percent_decoded(http):
    plain = wms(http, SERVICE="WMS", REQUEST="GetCapabilities").content
    assert http.get("/wms?sErViCe=WMS&ReQuEsT=%47%65%74%43%61%70%61%62%69%6c%69%74%69%65%73").content == plain
    assert http.get("/wms?service=WMS&request=GetCapabilities&format=bogus/x&foo=bar").content == plain


def test_update_sequence(http, capabilities):
    current = int(capabilities.get("updateSequence"))
    base = {"SERVICE": "WMS", "REQUEST": "GetCapabilities"}
    assert b"WMS_Capabilities" in wms(http, **base, UPDATESEQUENCE=current - 1).content
    assert b'code="CurrentUpdateSequence"' in wms(http, **base, UPDATESEQUENCE=current).content
    assert b'code="InvalidUpdateSequence"' in wms(http, **base, UPDATESEQUENCE=current + 1).content


# --------------------------------------------------------------------------- GetMap derived from capabilities


def _request_box(layer, crs: str) -> str:
    box = layer.find(f"wms:BoundingBox[@CRS='{crs}']", NS)
    return ",".join(box.get(k) for k in ("minx", "miny", "maxx", "maxy"))


def test_every_advertised_crs_of_every_layer_draws(http, capabilities):
    for layer in _named_layers(capabilities):
        name = layer.find("wms:Name", NS).text
        for crs in _advertised_crs(layer):
            answer = wms(http, SERVICE="WMS", VERSION="1.3.0", REQUEST="GetMap", LAYERS=name, STYLES="", CRS=crs,
                         BBOX=_request_box(layer, crs), WIDTH=64, HEIGHT=48, FORMAT="image/png", TRANSPARENT="TRUE")
            assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", (name, crs, answer.text)
            image = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGBA"))
            assert image.shape == (48, 64, 4)
            assert (image[..., 3] > 0).any(), (name, crs)  # the layer's own bbox shows some of its data


def test_every_advertised_format_returns_its_mime_type(http, capabilities):
    formats = [f.text for f in capabilities.findall(".//wms:GetMap/wms:Format", NS)]
    layer = capabilities.find(".//wms:Layer[wms:Name='RGEALTI']", NS)
    for fmt in formats:
        answer = wms(http, SERVICE="WMS", VERSION="1.3.0", REQUEST="GetMap", LAYERS="RGEALTI", STYLES="",
                     CRS="CRS:84", BBOX=_request_box(layer, "CRS:84"), WIDTH=33, HEIGHT=17, FORMAT=fmt)
        assert answer.status_code == 200 and answer.headers["content-type"] == fmt, (fmt, answer.text)


@pytest.mark.parametrize(("layers", "styles"), [
    ("SCAN1000", ""), ("SCAN1000,MONTAGNE", ""), ("SCAN1000,MONTAGNE,RGEALTI", ""), ("SCAN1000,MONTAGNE,RGEALTI", ",,,"),
    ("SCAN1000,MONTAGNE,RGEALTI", "normal,,hypso"), ("RGEALTI,RGEALTI", "hypso,estompage"), ("SCAN1000", "default"),
])
def test_layer_and_style_combinations(http, layers, styles):
    answer = wms(http, SERVICE="WMS", VERSION="1.3.0", REQUEST="GetMap", LAYERS=layers, STYLES=styles, CRS="CRS:84",
                 BBOX="1.3,43.5,2.2,46.4", WIDTH=40, HEIGHT=90, FORMAT="image/png", EXTRA="ignored", DPI="96")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text


def test_bbox_edge_cases_draw(http):
    common = {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": "SCAN1000", "STYLES": "",
              "WIDTH": 16, "HEIGHT": 16, "FORMAT": "image/png"}
    for crs, bbox in (("CRS:84", "1.4e0,4.6E1,2.1e+0,4.63e1"),  # exponents
                      ("EPSG:3857", "-1e9,-1e9,1e9,1e9"),  # outside the CRS domain
                      ("EPSG:4326", "-90,-180,90,180"),  # whole world, far coarser than the top level
                      ("EPSG:3857", "200000,5800000,200000.001,5800000.001")):  # far finer than the bottom level
        answer = wms(http, **common, CRS=crs, BBOX=bbox)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", (crs, bbox, answer.text)


@pytest.mark.parametrize("transparent", [None, "FALSE", "TRUE"])
def test_png_transparency(http, transparent):
    params = {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": "MONTAGNE", "STYLES": "",
              "CRS": "EPSG:3857", "BBOX": "160000,5397500,161000,5398500", "WIDTH": 64, "HEIGHT": 64,
              "FORMAT": "image/png", **({"TRANSPARENT": transparent} if transparent else {})}
    alpha = np.asarray(Image.open(io.BytesIO(wms(http, **params).content)).convert("RGBA"))[..., 3]
    assert (alpha == 0).any() == (transparent == "TRUE")


@pytest.mark.parametrize(("mode", "transparent", "check"), [
    ("INIMAGE", "FALSE", lambda px: len(np.unique(px.reshape(-1, 4), axis=0)) > 1),
    ("BLANK", "FALSE", lambda px: (px == [255, 0, 0, 255]).all()),
    ("BLANK", "TRUE", lambda px: (px[..., 3] == 0).all()),
])
def test_image_exceptions(http, mode, transparent, check):
    answer = wms(http, SERVICE="WMS", VERSION="1.3.0", REQUEST="GetMap", LAYERS="NOPE", STYLES="", CRS="CRS:84",
                 BBOX="0,0,1,1", WIDTH=120, HEIGHT=40, FORMAT="image/png", EXCEPTIONS=mode, BGCOLOR="0xFF0000",
                 TRANSPARENT=transparent)
    assert answer.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGBA"))
    assert pixels.shape == (40, 120, 4) and check(pixels)


def test_feature_info_formats(http, capabilities):
    formats = [f.text for f in capabilities.findall(".//wms:GetFeatureInfo/wms:Format", NS)]
    assert len(formats) == 4
    for fmt in formats:
        answer = wms(http, SERVICE="WMS", VERSION="1.3.0", REQUEST="GetFeatureInfo", LAYERS="SCAN1000,RGEALTI",
                     QUERY_LAYERS="RGEALTI", STYLES="", CRS="CRS:84", BBOX="1.4402,43.5589,1.4436,43.5636", WIDTH=50,
                     HEIGHT=50, I=25, J=25, INFO_FORMAT=fmt)
        assert answer.status_code == 200 and answer.headers["content-type"].split(";")[0] == fmt


# --------------------------------------------------------------------------- exceptions

BASE = {"SERVICE": "WMS", "VERSION": "1.3.0"}
MAP = {**BASE, "REQUEST": "GetMap", "LAYERS": "SCAN1000", "STYLES": "", "CRS": "EPSG:3857",
       "BBOX": "156000,5790000,235000,5832000", "WIDTH": "64", "HEIGHT": "32", "FORMAT": "image/png"}
GFI = {**MAP, "REQUEST": "GetFeatureInfo", "LAYERS": "RGEALTI,SCAN1000", "QUERY_LAYERS": "RGEALTI",
       "INFO_FORMAT": "text/plain", "I": "1", "J": "1"}


def _with(base: dict, **changes) -> dict:
    out = {k: v for k, v in base.items() if k not in changes or changes[k] is not None}
    out.update({k: v for k, v in changes.items() if v is not None})
    return out


# (name, parameters, exception code, HTTP status)
EXCEPTION_CASES = [
    ("no service", {"REQUEST": "GetCapabilities"}, "MissingParameterValue", 400),
    ("other service", {"SERVICE": "WFS", "REQUEST": "GetCapabilities"}, "InvalidParameterValue", 400),
    ("no request", {"SERVICE": "WMS"}, "MissingParameterValue", 400),
    ("unknown request", {"SERVICE": "WMS", "REQUEST": "GetBogus"}, "OperationNotSupported", 501),
    ("GetMap without version", _with(MAP, VERSION=None), "MissingParameterValue", 400),
    ("GetMap bad version", _with(MAP, VERSION="9.9.9"), "InvalidParameterValue", 400),
    ("no layers", _with(MAP, LAYERS=None), "MissingParameterValue", 400),
    ("unknown layer", _with(MAP, LAYERS="NOPE"), "LayerNotDefined", 400),
    ("second layer unknown", _with(MAP, LAYERS="SCAN1000,NOPE"), "LayerNotDefined", 400),
    ("both layers unknown", _with(MAP, LAYERS="NOPE1,NOPE2"), "LayerNotDefined", 400),
    ("layer not in WMS", _with(MAP, LAYERS="HIDDEN"), "LayerNotDefined", 400),
    ("empty layer entry", _with(MAP, LAYERS="SCAN1000,"), "LayerNotDefined", 400),
    ("too many layers", _with(MAP, LAYERS=",".join(["SCAN1000"] * 11)), "InvalidParameterValue", 400),
    ("unknown style", _with(MAP, STYLES="nope"), "StyleNotDefined", 400),
    ("second style unknown", _with(MAP, LAYERS="SCAN1000,RGEALTI", STYLES=",nope"), "StyleNotDefined", 400),
    ("style of another layer", _with(MAP, STYLES="hypso"), "StyleNotDefined", 400),
    ("no crs", _with(MAP, CRS=None), "MissingParameterValue", 400),
    ("unknown crs", _with(MAP, CRS="EPSG:99999"), "InvalidCRS", 400),
    ("crs not offered", _with(MAP, CRS="EPSG:32631"), "InvalidCRS", 400),
    ("markup crs", _with(MAP, CRS="<script>alert(1)</script>"), "InvalidCRS", 400),
    ("no bbox", _with(MAP, BBOX=None), "MissingParameterValue", 400),
    ("3 numbers", _with(MAP, BBOX="1,2,3"), "InvalidParameterValue", 400),
    ("words", _with(MAP, BBOX="a,b,c,d"), "InvalidParameterValue", 400),
    ("nan", _with(MAP, BBOX="nan,0,1,1"), "InvalidParameterValue", 400),
    ("inf", _with(MAP, BBOX="0,0,inf,1"), "InvalidParameterValue", 400),
    ("minx > maxx", _with(MAP, BBOX="2,0,1,1"), "InvalidParameterValue", 400),
    ("minx = maxx", _with(MAP, BBOX="1,0,1,1"), "InvalidParameterValue", 400),
    ("miny > maxy", _with(MAP, BBOX="0,2,1,1"), "InvalidParameterValue", 400),
    ("miny = maxy", _with(MAP, BBOX="0,1,1,1"), "InvalidParameterValue", 400),
    ("no width", _with(MAP, WIDTH=None), "MissingParameterValue", 400),
    ("zero width", _with(MAP, WIDTH="0"), "InvalidParameterValue", 400),
    ("negative height", _with(MAP, HEIGHT="-5"), "InvalidParameterValue", 400),
    ("word height", _with(MAP, HEIGHT="abc"), "InvalidParameterValue", 400),
    ("width over the limit", _with(MAP, WIDTH="99999"), "InvalidParameterValue", 400),
    ("no format", _with(MAP, FORMAT=None), "MissingParameterValue", 400),
    ("gif", _with(MAP, FORMAT="image/gif"), "InvalidFormat", 400),
    ("asc of colours", _with(MAP, FORMAT="text/asc"), "InvalidFormat", 400),
    ("bad transparent", _with(MAP, TRANSPARENT="maybe"), "InvalidParameterValue", 400),
    ("bad bgcolor", _with(MAP, BGCOLOR="red"), "InvalidParameterValue", 400),
    ("bad quality", _with(MAP, FORMAT_OPTIONS="quality:500"), "InvalidParameterValue", 400),
    ("bad compression", _with(MAP, FORMAT="image/tiff", FORMAT_OPTIONS="compression:jpeg2000"), "InvalidParameterValue", 400),
    ("no query layers", _with(GFI, QUERY_LAYERS=None), "MissingParameterValue", 400),
    ("unknown query layer", _with(GFI, QUERY_LAYERS="NOPE"), "LayerNotDefined", 400),
    ("query layer not in layers", _with(GFI, LAYERS="RGEALTI", QUERY_LAYERS="BDPARCELLAIRE"), "LayerNotDefined", 400),
    ("not queryable", _with(GFI, QUERY_LAYERS="SCAN1000"), "LayerNotQueryable", 400),
    ("no info format", _with(GFI, INFO_FORMAT=None), "MissingParameterValue", 400),
    ("bad info format", _with(GFI, INFO_FORMAT="image/png"), "InvalidFormat", 400),
    ("no i", _with(GFI, I=None), "MissingParameterValue", 400),
    ("negative i", _with(GFI, I="-1"), "InvalidPoint", 400),
    ("i = width", _with(GFI, I="64"), "InvalidPoint", 400),
    ("j beyond height", _with(GFI, J="32"), "InvalidPoint", 400),
    ("word j", _with(GFI, J="x"), "InvalidPoint", 400),
    ("GetMap of another service", _with(MAP, SERVICE="WFS"), "InvalidParameterValue", 400),
    ("GetMap without service, unknown layer", _with(MAP, SERVICE=None, LAYERS="NOPE"), "LayerNotDefined", 400),
    ("legend of unknown layer", {"SERVICE": "WMS", "REQUEST": "GetLegendGraphic", "LAYER": "NOPE"}, "LayerNotDefined", 400),
    ("legend of unknown style", {"SERVICE": "WMS", "REQUEST": "GetLegendGraphic", "LAYER": "RGEALTI", "STYLE": "x"},
     "StyleNotDefined", 400),
]


@pytest.mark.parametrize(("name", "params", "code", "status"), EXCEPTION_CASES, ids=[c[0] for c in EXCEPTION_CASES])
def test_exception_cases(http, exception_schema, name, params, code, status):
    answer = wms(http, **params)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("text/xml")
    report = etree.fromstring(answer.content)
    assert exception_schema.validate(report), exception_schema.error_log
    found = report.findall("ogc:ServiceException", NS)
    assert [e.get("code") for e in found] == [code]
    assert "<" not in found[0].text and "script" not in found[0].text or "?script" in found[0].text


SERVICELESS = {
    "1.3.0 GetMap": MAP,
    "1.1.1 GetMap": _with(MAP, VERSION="1.1.1", CRS=None, SRS="EPSG:3857"),
    "1.3.0 GetFeatureInfo": GFI,
    "1.1.1 GetFeatureInfo": _with(GFI, VERSION="1.1.1", CRS=None, SRS="EPSG:3857", I=None, J=None, X="1", Y="1"),
    "GetLegendGraphic": {"REQUEST": "GetLegendGraphic", "LAYER": "RGEALTI", "STYLE": "hypso", "FORMAT": "image/png"},
}


@pytest.mark.parametrize("name", SERVICELESS)
def test_service_is_not_required_but_by_get_capabilities(http, name):
    """06-042 §7.3-7.4 list GetMap's and GetFeatureInfo's parameters without SERVICE (only GetCapabilities
    asks it, §7.2.2): OGC's suite and some clients send none, and must get the very answer sent with it."""
    params = SERVICELESS[name]
    without = wms(http, **_with(params, SERVICE=None))
    assert without.status_code == 200, without.text
    assert not without.headers["content-type"].startswith(("text/xml", "application/vnd.ogc.se"))
    assert without.content == wms(http, **{**params, "SERVICE": "WMS"}).content


V111_CASES = [
    ("unknown srs", {"VERSION": "1.1.1", "SRS": "EPSG:99999"}, "InvalidSRS"),
    ("unknown layer", {"VERSION": "1.1.1", "SRS": "EPSG:4326", "LAYERS": "NOPE"}, "LayerNotDefined"),
    ("bad x", {"VERSION": "1.1.1", "SRS": "EPSG:4326", "REQUEST": "GetFeatureInfo", "LAYERS": "RGEALTI",
               "QUERY_LAYERS": "RGEALTI", "INFO_FORMAT": "text/plain", "X": "999", "Y": "1"}, "InvalidPoint"),
]


@pytest.mark.parametrize(("name", "changes", "code"), V111_CASES, ids=[c[0] for c in V111_CASES])
def test_exceptions_1_1_1(http, name, changes, code):
    params = _with(MAP, CRS=None, **changes)
    answer = wms(http, **params)
    assert answer.status_code == 400 and answer.headers["content-type"].startswith("application/vnd.ogc.se_xml")
    report = etree.fromstring(answer.content)
    dtd = etree.DTD(str(SCHEMAS / "wms" / "1.1.1" / "exception_1_1_1.dtd"))
    assert dtd.validate(report), dtd.error_log
    assert report.find("ServiceException").get("code") == code


# --------------------------------------------------------------------------- real clients


def test_owslib_reads_capabilities_and_fetches_maps(server):
    from owslib.wms import WebMapService

    service = WebMapService(f"{server}/wms", version="1.3.0")
    assert sorted(service.contents) == ["BDPARCELLAIRE", "MONTAGNE", "RGEALTI", "SCAN1000"]
    dem = service["RGEALTI"]
    assert dem.queryable == 1 and "hypso" in dem.styles and "EPSG:2154" in dem.crsOptions
    west, south, east, north = dem.boundingBoxWGS84
    image = service.getmap(layers=["RGEALTI"], styles=["hypso"], srs="EPSG:4326", bbox=(west, south, east, north),
                           size=(128, 128), format="image/png", transparent=True)
    pixels = np.asarray(Image.open(io.BytesIO(image.read())).convert("RGBA"))
    assert pixels.shape == (128, 128, 4) and (pixels[..., 3] > 0).mean() > 0.2
    info = service.getfeatureinfo(layers=["RGEALTI"], query_layers=["RGEALTI"], srs="EPSG:4326",
                                  bbox=(west, south, east, north), size=(128, 128), format="image/png",
                                  info_format="application/json", xy=(64, 64))
    assert b"FeatureCollection" in info.read()
    old = WebMapService(f"{server}/wms", version="1.1.1")
    assert "SCAN1000" in old.contents
    image = old.getmap(layers=["SCAN1000"], styles=[""], srs="EPSG:4326", bbox=old["SCAN1000"].boundingBoxWGS84[:4],
                       size=(64, 32), format="image/jpeg")
    assert Image.open(io.BytesIO(image.read())).size == (64, 32)


@pytest.mark.skipif(shutil.which("gdal_translate") is None, reason="GDAL command-line tools not installed")
def test_gdal_wms_driver_reads_a_map(server, tmp_path):
    url = (f"WMS:{server}/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetMap&LAYERS=SCAN1000&CRS=EPSG:3857"
           "&BBOX=156543,5792092,234814,5831228&FORMAT=image/png")
    out = tmp_path / "map.tif"
    subprocess.run(["gdal_translate", "-outsize", "256", "128", url, str(out)], check=True, capture_output=True)
    assert Image.open(out).size == (256, 128)


# --------------------------------------------------------------------------- fuzz

NAMES = ["SERVICE", "REQUEST", "VERSION", "LAYERS", "STYLES", "CRS", "SRS", "BBOX", "WIDTH", "HEIGHT", "FORMAT",
         "TRANSPARENT", "BGCOLOR", "EXCEPTIONS", "QUERY_LAYERS", "INFO_FORMAT", "I", "J", "X", "Y", "FORMAT_OPTIONS",
         "LAYER", "STYLE", "UPDATESEQUENCE", "WMTVER"]
VALUES = ["WMS", "GetMap", "GetFeatureInfo", "GetCapabilities", "GetLegendGraphic", "1.3.0", "1.1.1", "SCAN1000",
          "RGEALTI", "RGEALTI,SCAN1000", "hypso", "EPSG:4326", "CRS:84", "EPSG:3857", "IGNF:LAMB93", "0,0,1,1",
          "46,1.4,46.4,2.2", "-1e308,0,1e308,1", "1", "64", "0", "-3", "4097", "image/png", "image/jpeg",
          "text/asc", "image/x-bil;bits=32", "INIMAGE", "BLANK", "TRUE", "0xFF00FF", "text/plain",
          "application/json", "quality:1", "compression:lzw", ""]


def _case(name: str, flips: list[bool]) -> str:
    return "".join(c.upper() if f else c.lower() for c, f in zip(name, flips + [False] * len(name), strict=False))


kvp = st.lists(
    st.tuples(st.sampled_from(NAMES), st.lists(st.booleans(), max_size=12),
              st.one_of(st.sampled_from(VALUES), st.text(max_size=30))),
    max_size=14,
)


# valid GetMap / GetFeatureInfo requests with a few values replaced: reaches rendering with odd input
mutated = st.tuples(
    st.sampled_from([MAP, GFI, _with(MAP, VERSION="1.1.1", CRS=None, SRS="EPSG:4326", BBOX="1.4,46,2.2,46.4")]),
    st.dictionaries(st.sampled_from(NAMES), st.one_of(st.sampled_from(VALUES), st.text(max_size=30)), max_size=3),
).map(lambda pair: [(k, [], v) for k, v in {**pair[0], **pair[1]}.items()])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.one_of(kvp, mutated))
def test_fuzzed_requests_never_fail_on_the_server(http, pairs):
    query = "&".join(f"{quote(_case(name, flips))}={quote(value)}" for name, flips, value in pairs)
    answer = http.get(f"/wms?{query}")
    # 501: an unknown operation (OWS), 503: render slots busy; never an unhandled 500
    assert answer.status_code < 500 or answer.status_code in (501, 503), (query, answer.text)
    if answer.headers.get("content-type", "").startswith("text/xml") and answer.status_code >= 400:
        etree.fromstring(answer.content)  # always well-formed


# --------------------------------------------------------------------------- header names on the wire


def _raw_head(base: str, path: str, extra: str = "") -> tuple[str, list[tuple[str, str]]]:
    """Status line and header lines exactly as they came over the socket."""
    import socket

    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status, *lines = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return status, [(line.split(":", 1)[0], line.split(":", 1)[1].strip()) for line in lines]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[str]:
    """The server as `tileserver serve` runs it (its own httptools protocol, whose heads leave with
    canonical names where uvicorn's would lower them all)."""
    import threading
    import time

    import uvicorn
    from apputil import free_port

    from tileserver.app import create_app

    settings = make_settings(tmp_path_factory.mktemp("wms-h11"), styles_directory=str(DATA / "styles"))
    port = free_port()
    from tileserver.server_cli import uvicorn_options

    options = {**uvicorn_options(settings), "host": "127.0.0.1", "port": port}
    options.pop("workers", None)
    uv = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", **options))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not uv.started and time.time() < deadline:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base) as admin:
        for layer_id in ("SCAN1000", "RGEALTI"):
            answer = admin.post(f"/admin/layers/{layer_id}", json=LAYERS[layer_id], headers={"Authorization": "Bearer secret"})
            assert answer.status_code == 204, answer.text
    yield base
    uv.should_exit = True
    thread.join(10)


_CANONICAL_NAME = r"(ETag|[A-Z][a-z0-9]*(-[A-Z][a-z0-9]*)*)"


def test_header_names_are_canonically_spelt(served):
    """QGIS's identify with application/json looks for `Content-Type` (case-sensitively, as ROK4 spells
    it): the app spells every name canonically, on the routed path, the fast tile path, its 304, errors
    and CORS preflights."""
    import re

    gfi = ("/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetFeatureInfo&LAYERS=RGEALTI&QUERY_LAYERS=RGEALTI&STYLES="
           "&CRS=CRS:84&BBOX=1.4402,43.5589,1.4436,43.5636&WIDTH=50&HEIGHT=50&I=25&J=25&INFO_FORMAT=application/json")
    status, headers = _raw_head(served, gfi)
    assert status.startswith("HTTP/1.1 200") and ("Content-Type", "application/json") in headers, headers
    tile = "/wmts/1.0.0/SCAN1000/normal/PM/10/363/516.png"  # the fast path answers it
    status, fast = _raw_head(served, tile)
    assert status.startswith("HTTP/1.1 200") and ("Content-Type", "image/png") in fast, fast
    etag = dict(fast)["ETag"]
    answers = [headers, fast, _raw_head(served, tile, f"If-None-Match: {etag}\r\n")[1],
               _raw_head(served, "/wms?SERVICE=WMS&REQUEST=GetBogus")[1],
               _raw_head(served, "/wmts/1.0.0/SCAN1000/normal/PM/10/0/0.png")[1]]
    for names in answers:
        ours = [n for n, _ in names if n.lower() not in ("date", "server", "connection", "transfer-encoding")]
        assert ours and all(re.fullmatch(_CANONICAL_NAME, n) for n in ours), ours
