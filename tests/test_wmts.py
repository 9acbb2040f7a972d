"""WMTS 1.0.0 against real ROK4 fixture pyramids and small pyramids built here for the other formats.

Bytes are checked against the slab files read independently (slab index parsed from the file),
pixels against what was encoded, XML against the official schemas (tests/schemas, offline).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from apputil import PYRAMIDS, app_client, layer_descriptor, make_settings
from lxml import etree
from PIL import Image

from tileserver.rok4.codecs import decode_tile, encode_tile
from tileserver.rok4.formats import get_format
from tileserver.rok4.naming import b36_path
from tileserver.rok4.slab import build_slab, index_size, parse_index, tiff_wrap
from tileserver.rok4.tms import load_tms
from tileserver.services.ows import KVP, OWSException, base_url, echo, exception_report, hash_key
from tileserver.settings import load_settings

SCHEMAS = Path(__file__).parent / "schemas"
TMS_DIR = load_settings(env={}).tms_directory
NS = {"w": "http://www.opengis.net/wmts/1.0", "ows": "http://www.opengis.net/ows/1.1"}
ADMIN = {"Authorization": "Bearer secret"}
TILE_BYTES = 256 * 256


def schema(path: str) -> etree.XMLSchema:
    parser = etree.XMLParser(no_network=True)
    return etree.XMLSchema(etree.parse(str(SCHEMAS / path), parser))


CAPABILITIES_SCHEMA = schema("wmts/1.0/wmtsGetCapabilities_response.xsd")
EXCEPTION_SCHEMA = schema("ows/1.1.0/owsExceptionReport.xsd")


def assert_valid(xsd: etree.XMLSchema, body: bytes) -> etree._Element:
    doc = etree.fromstring(body)
    assert xsd.validate(doc), xsd.error_log
    return doc


def assert_exception(response, status: int, code: str, locator: str | None) -> str:
    """Status, content type, schema validity, code and exact locator of an OWS exception report."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/xml")
    doc = assert_valid(EXCEPTION_SCHEMA, response.content)
    exc = doc.find("ows:Exception", NS)
    assert exc.get("exceptionCode") == code, response.text
    assert exc.get("locator") == locator, response.text
    return exc.findtext("ows:ExceptionText", namespaces=NS)


# --- pyramids built for the formats the fixtures lack -------------------------------------------

LEVEL, TPW = "3", 2  # PM level 3 is 8×8 tiles; one 2×2 slab at (0, 0); limits cols 0–3 rows 0–1
BUILT_LIMITS = {"min_col": 0, "max_col": 3, "min_row": 0, "max_row": 1}


def built_pixels(code: str, channels: int, col: int, row: int) -> np.ndarray:
    y, x = np.mgrid[0:256, 0:256]
    if get_format(code).dtype == "float32":
        return (x * 0.5 + y + col * 1000 + row * 100).astype("<f4")[..., None].repeat(channels, axis=2)
    planes = [(x + 3 * y + 40 * k + 7 * col + 11 * row) % 256 for k in range(channels)]
    return np.stack(planes, axis=2).astype(np.uint8)


def build_pyramid(
    root: Path, name: str, code: str, channels: int, nodata: str
) -> dict[tuple[int, int], bytes]:
    """A one-slab ROK4 pyramid on disk (slab (1, 0) absent inside the limits); returns stored tiles."""
    fmt = get_format(code)
    stored = {}
    for row in range(TPW):
        for col in range(TPW):
            stored[(col, row)] = encode_tile(built_pixels(code, channels, col, row), fmt.compression)
    tiles = [stored[(i % TPW, i // TPW)] for i in range(TPW * TPW)]
    slab = build_slab(tiles, TPW, TPW, 256, 256, channels, fmt.sample_format, fmt.compression)
    path = root / name / "DATA" / LEVEL / b36_path(0, 0, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(slab)
    descriptor = {
        "tile_matrix_set": "PM",
        "format": code,
        "raster_specifications": {"channels": channels, "nodata": nodata, "interpolation": "nn"},
        "levels": [
            {
                "id": LEVEL,
                "tiles_per_width": TPW,
                "tiles_per_height": TPW,
                "tile_limits": BUILT_LIMITS,
                "storage": {"type": "FILE", "image_directory": f"{name}/DATA/{LEVEL}", "path_depth": 2},
            }
        ],
    }
    (root / f"{name}.json").write_text(json.dumps(descriptor))
    return stored


# (layer id, format code, channels, nodata, content type, content encoding)
BUILT = [
    ("ZIPRGB", "TIFF_ZIP_UINT8", 3, "255,255,255", "image/tiff", None),
    ("RAWGRAY", "TIFF_RAW_UINT8", 1, "0", "image/tiff", None),
    ("PKBRGBA", "TIFF_PKB_UINT8", 4, "0,0,0,0", "image/tiff", None),
    ("LZWF32", "TIFF_LZW_FLOAT32", 1, "-99999", "image/tiff", None),
    ("RAWF32", "TIFF_RAW_FLOAT32", 1, "-99999", "image/x-bil;bits=32", None),
    ("ZIPF32", "TIFF_ZIP_FLOAT32", 1, "-99999", "image/x-bil;bits=32", "deflate"),
    ("JPGRGB", "TIFF_JPG_UINT8", 3, "255,255,255", "image/jpeg", None),
    ("PNGGRAY", "TIFF_PNG_UINT8", 1, "255", "image/png", None),
]


def built_descriptor(root: Path, name: str, **extra) -> dict:
    return {
        "title": name,
        "abstract": f"{name} built by the tests",
        "pyramids": [{"path": f"file://{root}/{name}.json", "bottom_level": LEVEL, "top_level": LEVEL}],
        **extra,
    }


class Env:
    """The running app and what the tests compare against."""

    def __init__(self, client, root: Path, stored: dict[str, dict], key: str) -> None:
        self.client = client
        self.root = root
        self.stored = stored
        self.key = key

    @property
    def runtime(self):
        return self.client.app.state.runtime


async def publish(client, layer_id: str, descriptor: dict) -> None:
    response = await client.post(f"/admin/layers/{layer_id}", json=descriptor, headers=ADMIN)
    assert response.status_code == 204, response.text


async def start(tmp: Path, **settings):
    """App with the fixture pyramids, built pyramids, a holed copy of SCAN1000 and a restricted layer."""
    root = tmp / "pyramids"
    root.mkdir()
    stored = {name: build_pyramid(root, name, code, ch, nd) for name, code, ch, nd, *_ in BUILT}
    # SCAN1000 with its level-10 slab removed: the limits still announce it
    shutil.copytree(PYRAMIDS / "SCAN1000", root / "SCAN1000")
    shutil.copy(PYRAMIDS / "SCAN1000.json", root / "SCAN1000.json")
    for slab in (root / "SCAN1000" / "DATA" / "10").rglob("*.tif"):
        slab.unlink()
    cm = app_client(make_settings(tmp, **settings))
    client = await cm.__aenter__()
    gfi = {"get_feature_info": {"type": "PYRAMID"}}
    for name in ("SCAN1000", "BDPARCELLAIRE", "MONTAGNE"):
        await publish(client, name, layer_descriptor(name, **(gfi if name != "MONTAGNE" else {})))
    await publish(client, "RGEALTI", layer_descriptor("RGEALTI", cache_control="max-age=60", **gfi))
    await publish(client, "HOLE", layer_descriptor("SCAN1000", root=f"file://{root}"))
    await publish(client, "HOLE404", layer_descriptor("SCAN1000", root=f"file://{root}", empty_tile_404=True))
    await publish(client, "SECRET", layer_descriptor("MONTAGNE", restricted=True))
    for name, *_ in BUILT:
        await publish(client, name, built_descriptor(root, name, **gfi))
    created = await client.post("/admin/keys", json={"name": "tests", "layers": ["SECRET"]}, headers=ADMIN)
    assert created.status_code == 201, created.text
    return cm, Env(client, root, stored, created.json()["key"])


@pytest.fixture(scope="module")
async def env(tmp_path_factory):
    cm, environment = await start(tmp_path_factory.mktemp("wmts"))
    yield environment
    await cm.__aexit__(None, None, None)


def tile_params(layer: str, tms: str, z: str, row: int, col: int, fmt: str = "image/png", **extra) -> dict:
    params = {
        "SERVICE": "WMTS",
        "REQUEST": "GetTile",
        "VERSION": "1.0.0",
        "LAYER": layer,
        "STYLE": "normal",
        "FORMAT": fmt,
        "TILEMATRIXSET": tms,
        "TILEMATRIX": z,
        "TILEROW": str(row),
        "TILECOL": str(col),
    }
    params.update(extra)
    return {k: v for k, v in params.items() if v is not None}


def slab_tile(pyramid_dir: Path, level: str, col: int, row: int, tpw: int = 2, tph: int = 2) -> bytes:
    """A tile read from the slab file the way a ROK4 reader does, without tileserver's reader."""
    data = (pyramid_dir / "DATA" / level / b36_path(col // tpw, row // tph, 2)).read_bytes()
    index = parse_index(data[: index_size(tpw * tph)], tpw * tph)
    n = (row % tph) * tpw + (col % tpw)
    return data[index.offsets[n] : index.offsets[n] + index.sizes[n]]


SCAN_TILE = ("SCAN1000", "PM", "10", 363, 516)


# --- OWS helpers --------------------------------------------------------------------------------


def test_kvp_names_are_case_insensitive_values_are_not():
    kvp = KVP.parse(b"SeRvIcE=wmts&layer=A%20b&LAYER=second&Empty=&plus=a+b&%52equest=%47etTile&bad=%ff")
    assert kvp.get("service") == "wmts" and kvp.get("SERVICE") == "wmts"
    assert kvp.get("Layer") == "A b" and kvp.getall("layer") == ["A b", "second"]
    assert kvp.get("empty") == "" and "EMPTY" in kvp and kvp.get("absent") is None
    assert kvp.get("plus") == "a b" and kvp.get("request") == "GetTile" and kvp.get("bad") == "\ufffd"
    with pytest.raises(OWSException) as missing:
        kvp.require("empty", "Empty")
    assert (missing.value.code, missing.value.locator, missing.value.status) == (
        "MissingParameterValue",
        "Empty",
        400,
    )
    with pytest.raises(OWSException):
        KVP.parse("&".join(f"p{i}=1" for i in range(1000)))


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("MissingParameterValue", 400),
        ("InvalidParameterValue", 400),
        ("TileOutOfRange", 400),
        ("OperationNotSupported", 501),
        ("VersionNegotiationFailed", 400),
        ("Not Found", 404),
    ],
)
def test_exception_report_status_and_schema(code, status):
    exc = OWSException(code, "layer", "bad <script>alert(1)</script> & \x00 value")
    assert exc.status == status
    body = exc.to_xml()
    assert b"<script" not in body and b"\x00" not in body
    assert_valid(EXCEPTION_SCHEMA, body)
    assert OWSException("X", None, "m", 503).status == 503
    assert_valid(EXCEPTION_SCHEMA, exception_report([exc, OWSException("NoApplicableCode", None, "second")]))


def test_echo_never_carries_markup():
    assert echo("<b>\x01" + "x" * 500).startswith("'?b??") and len(echo("x" * 500)) < 100


def test_key_hash_matches_the_store():
    from tileserver.publication.store import PublicationStore

    assert hash_key("s3cret") == PublicationStore.hash_key("s3cret")


@pytest.mark.parametrize(
    ("headers", "public_url", "expected"),
    [
        ({}, "", "http://testserver"),
        ({}, "https://tiles.example.org/geo/", "https://tiles.example.org/geo"),
        (
            {"x-forwarded-proto": "https", "x-forwarded-host": "maps.example.org"},
            "",
            "https://maps.example.org",
        ),
        (
            {"x-forwarded-proto": "https, http", "x-forwarded-host": "a.example:8443, b"},
            "",
            "https://a.example:8443",
        ),
        ({"x-forwarded-proto": "gopher", "x-forwarded-host": 'evil"><x'}, "", "http://testserver"),
    ],
)
@pytest.mark.parametrize("peer", ["127.0.0.1", "203.0.113.7"])
def test_base_url(headers, public_url, expected, peer):
    """Forwarded headers count only from a trusted proxy (loopback by default), never from any client."""
    from starlette.requests import Request

    from tileserver.services.policy import apply_forwarded

    class State:
        settings = type("S", (), {"public_url": public_url})()

    app = type("App", (), {"state": State()})()
    raw = [(b"host", b"testserver")] + [(k.encode(), v.encode()) for k, v in headers.items()]
    scope = {
        "type": "http",
        "scheme": "http",
        "server": ("testserver", 80),
        "path": "/",
        "root_path": "",
        "headers": raw,
        "query_string": b"",
        "app": app,
        "client": (peer, 40000),
    }
    if peer != "127.0.0.1" and not public_url:
        expected = "http://testserver"
    apply_forwarded(scope, State.settings)  # what the application does first with every request
    assert base_url(Request(scope)) == expected


# --- capabilities -------------------------------------------------------------------------------


async def capabilities(env: Env, **params) -> etree._Element:
    response = await env.client.get(
        "/wmts", params={"SERVICE": "WMTS", "REQUEST": "GetCapabilities", **params}
    )
    assert response.status_code == 200, response.text
    return assert_valid(CAPABILITIES_SCHEMA, response.content)


async def test_capabilities_content(env):
    doc = await capabilities(env)
    layers = {
        lay.findtext("ows:Identifier", namespaces=NS): lay for lay in doc.iterfind("w:Contents/w:Layer", NS)
    }
    assert "SECRET" not in layers and {"SCAN1000", "RGEALTI", "ZIPF32", "HOLE"} <= set(layers)
    scan = layers["SCAN1000"]
    assert scan.findtext("ows:Title", namespaces=NS) == "SCAN1000 title"
    assert [k.text for k in scan.iterfind("ows:Keywords/ows:Keyword", NS)] == ["SCAN1000", "ROK4"]
    assert scan.find("w:Style", NS).get("isDefault") == "true"
    assert [f.text for f in scan.iterfind("w:Format", NS)] == ["image/png", "image/jpeg"]  # JPEG converted by the render pipeline
    assert [f.text for f in scan.iterfind("w:InfoFormat", NS)] == [
        "text/plain",
        "application/json",
        "text/html",
        "text/xml",
    ]
    assert layers["MONTAGNE"].find("w:InfoFormat", NS) is None
    links = {
        link.findtext("w:TileMatrixSet", namespaces=NS): link
        for link in scan.iterfind("w:TileMatrixSetLink", NS)
    }
    assert list(links) == ["PM_0_10", "PM"]
    for link in links.values():  # the published levels only, with their limits, in both sets
        limits = {
            tml.findtext("w:TileMatrix", namespaces=NS): [
                int(tml.findtext(f"w:{t}", namespaces=NS))
                for t in ("MinTileRow", "MaxTileRow", "MinTileCol", "MaxTileCol")
            ]
            for tml in link.iterfind("w:TileMatrixSetLimits/w:TileMatrixLimits", NS)
        }
        assert list(limits) == [str(z) for z in range(11)] and limits["10"] == [363, 363, 516, 517]
    templates = {
        r.get("resourceType") + r.get("format"): r.get("template") for r in scan.iterfind("w:ResourceURL", NS)
    }
    assert templates["tileimage/png"] == (
        "http://testserver/wmts/1.0.0/SCAN1000/{Style}/{TileMatrixSet}/{TileMatrix}/{TileRow}/{TileCol}.png"
    )
    assert templates["FeatureInfoapplication/json"].endswith("/{TileCol}/{J}/{I}.json")
    assert layers["RGEALTI"].findtext("w:Format", namespaces=NS) == "image/x-bil;bits=32"
    assert layers["ZIPRGB"].find("w:ResourceURL", NS).get("template").endswith(".tif")
    assert doc.find("w:ServiceMetadataURL", NS).get("{http://www.w3.org/1999/xlink}href") == (
        "http://testserver/wmts/1.0.0/WMTSCapabilities.xml"
    )
    assert doc.findtext("ows:ServiceIdentification/ows:Title", namespaces=NS) == "tileserver"


async def test_tile_matrix_sets_follow_the_crs(env):
    doc = await capabilities(env)
    sets = {
        s.findtext("ows:Identifier", namespaces=NS): s for s in doc.iterfind("w:Contents/w:TileMatrixSet", NS)
    }
    assert {
        "PM",
        "PM_0_10",
        "PM_0_17",
        "PM_3_3",
        "4326",
        "4326_0_19",
        "LAMB93_1M_MNT",
        "LAMB93_1M_MNT_0_8",
    } <= set(sets)
    expectations = [
        ("PM", "urn:ogc:def:crs:EPSG::3857", lambda m: (m.origin_x, m.origin_y)),
        ("4326", "urn:ogc:def:crs:EPSG::4326", lambda m: (m.origin_y, m.origin_x)),
        ("LAMB93_1M_MNT", "urn:ogc:def:crs:IGNF::LAMB93", lambda m: (m.origin_x, m.origin_y)),
    ]
    for tms_id, urn, corner in expectations:
        tms = load_tms(tms_id, TMS_DIR)
        node = sets[tms_id]
        assert node.findtext("ows:SupportedCRS", namespaces=NS) == urn
        matrices = node.findall("w:TileMatrix", NS)
        assert len(matrices) == len(tms.matrices)
        for tm in matrices:
            m = tms.get(tm.findtext("ows:Identifier", namespaces=NS))
            assert tuple(map(float, tm.findtext("w:TopLeftCorner", namespaces=NS).split())) == corner(m)
            assert float(tm.findtext("w:ScaleDenominator", namespaces=NS)) == pytest.approx(
                tms.scale_denominator(m)
            )
            assert int(tm.findtext("w:MatrixWidth", namespaces=NS)) == m.matrix_width
    subset = [
        tm.findtext("ows:Identifier", namespaces=NS) for tm in sets["PM_0_10"].iterfind("w:TileMatrix", NS)
    ]
    assert subset == [str(z) for z in range(11)]
    assert sets["4326"].find("w:TileMatrix/w:TopLeftCorner", NS).text == "90 -180"


async def test_capabilities_parameters(env):
    full = await env.client.get("/wmts?service=WMTS&request=GetCapabilities")
    revision = etree.fromstring(full.content).get("updateSequence")
    rest = await env.client.get("/wmts/1.0.0/WMTSCapabilities.xml")
    assert rest.content == full.content and rest.headers["content-type"] == "application/xml"
    same = await env.client.get(
        "/wmts", params={"service": "WMTS", "request": "GetCapabilities", "updateSequence": revision}
    )
    root = assert_valid(CAPABILITIES_SCHEMA, same.content)
    assert len(root) == 0 and root.get("updateSequence") == revision and root.get("version") == "1.0.0"
    older = await env.client.get(
        "/wmts", params={"service": "WMTS", "request": "GetCapabilities", "updateSequence": "0"}
    )
    assert older.content == full.content
    for sections, expected in [
        ("Contents", ["Contents"]),
        ("ServiceIdentification,OperationsMetadata", ["ServiceIdentification", "OperationsMetadata"]),
        ("All", None),
        ("Themes", []),
    ]:
        doc = await capabilities(env, Sections=sections)
        names = [etree.QName(c).localname for c in doc if etree.QName(c).localname != "ServiceMetadataURL"]
        assert names == (
            expected
            if expected is not None
            else ["ServiceIdentification", "ServiceProvider", "OperationsMetadata", "Contents"]
        )
    text_xml = await env.client.get("/wmts?service=WMTS&request=GetCapabilities&AcceptFormats=text/xml")
    assert text_xml.headers["content-type"].startswith("text/xml")
    bogus = await env.client.get("/wmts?service=WMTS&request=GetCapabilities&AcceptFormats=bogus/xml")
    assert bogus.headers["content-type"] == "application/xml"
    ok = await env.client.get("/wmts?service=WMTS&request=GetCapabilities&AcceptVersions=2.0.0,1.0.0")
    assert ok.status_code == 200
    assert (await env.client.get("/wmts/1.0.0/WMTSCapabilities.xml/Bogus")).status_code == 404
    refused = await env.client.get("/wmts/1.0.0/WMTSCapabilities.xml", headers={"Accept": "example/unknown"})
    assert_exception(refused, 406, "InvalidParameterValue", "Accept")
    accepted = await env.client.get(
        "/wmts/1.0.0/WMTSCapabilities.xml", headers={"Accept": "text/html,*/*;q=0.8"}
    )
    assert accepted.status_code == 200


async def test_capabilities_honour_the_public_address(env):
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "maps.example.org"}
    body = (await env.client.get("/wmts?service=WMTS&request=GetCapabilities", headers=headers)).text
    assert "https://maps.example.org/wmts?" in body and "http://testserver" not in body
    again = (await env.client.get("/wmts?service=WMTS&request=GetCapabilities")).text
    assert "https://maps.example.org" not in again


async def test_restricted_layer_needs_a_granted_key(env):
    anonymous = await env.client.get("/wmts", params=tile_params("SECRET", "PM", "10", 370, 530))
    assert_exception(anonymous, 400, "InvalidParameterValue", "layer")
    wrong = await env.client.get(
        "/wmts", params=tile_params("SECRET", "PM", "10", 370, 530), headers={"X-Api-Key": "no"}
    )
    assert_exception(wrong, 400, "InvalidParameterValue", "layer")
    limits = env.runtime.catalog.layers["SECRET"].limits["10"]
    params = tile_params("SECRET", "PM", "10", limits.min_row, limits.min_col)
    by_header = await env.client.get("/wmts", params=params, headers={"X-Api-Key": env.key})
    by_param = await env.client.get("/wmts", params={**params, "apikey": env.key})
    assert by_header.status_code == by_param.status_code == 200 and by_header.content == by_param.content
    assert (
        by_header.headers["cache-control"] == "private, max-age=3600"
        and "X-Api-Key" in by_header.headers["vary"]
    )
    doc = await capabilities(env, apikey=env.key)
    ids = [i.text for i in doc.iterfind("w:Contents/w:Layer/ows:Identifier", NS)]
    assert "SECRET" in ids
    kvp_href = doc.find(".//ows:Operation[@name='GetTile']//ows:Get", NS).get(
        "{http://www.w3.org/1999/xlink}href"
    )
    assert kvp_href == f"http://testserver/wmts?apikey={env.key}&"
    template = doc.find("w:Contents/w:Layer/w:ResourceURL", NS).get("template")
    assert template.endswith(f"?apikey={env.key}")
    header_doc = await env.client.get(
        "/wmts?service=WMTS&request=GetCapabilities", headers={"X-Api-Key": env.key}
    )
    assert b"SECRET" in header_doc.content and env.key.encode() not in header_doc.content


# --- tiles --------------------------------------------------------------------------------------


async def test_native_png_tiles_are_the_slab_bytes_kvp_rest_and_head(env):
    layer, tms, z, row, col = SCAN_TILE
    for c in (516, 517):
        expected = slab_tile(PYRAMIDS / "SCAN1000", z, c, row)
        for tms_id in ("PM", "PM_0_10"):
            kvp = await env.client.get("/wmts", params=tile_params(layer, tms_id, z, row, c))
            rest = await env.client.get(f"/wmts/1.0.0/{layer}/normal/{tms_id}/{z}/{row}/{c}.png")
            for response in (kvp, rest):
                assert response.status_code == 200 and response.content == expected
                assert response.headers["content-type"] == "image/png"
                assert response.headers["cache-control"] == "public, max-age=3600"
                assert "content-encoding" not in response.headers
    head = await env.client.head(f"/wmts/1.0.0/{layer}/normal/PM/{z}/{row}/516.png")
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0


async def test_kvp_names_any_case_and_percent_encoded_values(env):
    layer, tms, z, row, col = SCAN_TILE
    reference = (await env.client.get("/wmts", params=tile_params(*SCAN_TILE))).content
    query = (
        f"sErViCe=WMTS&ReQuEsT=%47et%54ile&vErSiOn=1.0.0&LaYeR={layer}&StYlE=normal&FoRmAt=image%2Fpng"
        f"&tilematrixset={tms}&TileMatrix={z}&tilerow={row}&TILECOL={col}&unknown=ignored"
    )
    response = await env.client.get(f"/wmts?{query}")
    assert response.status_code == 200 and response.content == reference
    lower_value = await env.client.get("/wmts", params=tile_params(layer.lower(), tms, z, row, col))
    assert_exception(lower_value, 400, "InvalidParameterValue", "layer")


@pytest.mark.parametrize(("name", "code", "channels", "nodata", "mime", "encoding"), BUILT)
async def test_every_native_format(env, name, code, channels, nodata, mime, encoding):
    fmt = get_format(code)
    ext = {"image/tiff": "tif", "image/x-bil;bits=32": "bil", "image/jpeg": "jpeg", "image/png": "png"}[mime]
    for (col, row), stored in env.stored[name].items():
        response = await env.client.get("/wmts", params=tile_params(name, "PM", LEVEL, row, col, mime))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == mime
        assert response.headers.get("content-encoding") == encoding
        rest = await env.client.get(f"/wmts/1.0.0/{name}/normal/PM_3_3/{LEVEL}/{row}/{col}.{ext}")
        assert rest.content == response.content
        pixels = built_pixels(code, channels, col, row)
        if fmt.tiff_wrapped:
            assert response.content == tiff_wrap(
                stored, 256, 256, channels, fmt.sample_format, fmt.compression
            )
            decoded = tifffile.imread(io.BytesIO(response.content))
            assert np.array_equal(decoded.reshape(pixels.shape), pixels)
        elif mime == "image/jpeg":
            assert response.content == stored
            assert np.abs(np.asarray(Image.open(io.BytesIO(response.content)), int) - pixels).mean() < 8
        elif mime == "image/png":
            assert response.content == stored
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(response.content))), pixels[..., 0])
        else:  # BIL: httpx has already undone Content-Encoding: deflate
            assert len(response.content) == TILE_BYTES * 4
            assert np.array_equal(np.frombuffer(response.content, "<f4").reshape(256, 256, 1), pixels)
            async with env.client.stream(
                "GET", "/wmts", params=tile_params(name, "PM", LEVEL, row, col, mime)
            ) as raw:
                body = b"".join([chunk async for chunk in raw.aiter_raw()])
            assert body == stored


@pytest.mark.parametrize(("name", "code", "channels", "nodata", "mime", "encoding"), BUILT)
async def test_empty_tiles_inside_the_limits_are_nodata_images(
    env, name, code, channels, nodata, mime, encoding
):
    """Slab (1, 0) is absent: tiles (2..3, 0..1) answer a nodata tile of the right size and format."""
    fmt = get_format(code)
    expected = np.array([float(v) for v in nodata.split(",")], dtype=fmt.dtype)
    if channels == 4:
        expected[3] = 0  # transparent
    bodies = set()
    for col, row in [(2, 0), (3, 1)]:
        response = await env.client.get("/wmts", params=tile_params(name, "PM", LEVEL, row, col, mime))
        assert response.status_code == 200 and response.headers["content-type"] == mime
        assert response.headers.get("content-encoding") == encoding
        bodies.add(response.content)
        if fmt.tiff_wrapped:
            pixels = tifffile.imread(io.BytesIO(response.content)).reshape(256, 256, channels)
        elif mime == "image/jpeg":
            pixels = np.asarray(Image.open(io.BytesIO(response.content)))
            assert pixels.shape == (256, 256, 3)
            continue
        elif mime == "image/png":  # 1 channel, no alpha: the nodata grey
            pixels = np.asarray(Image.open(io.BytesIO(response.content))).reshape(256, 256, 1)
        else:
            pixels = np.frombuffer(response.content, "<f4").reshape(256, 256, 1)
        assert (pixels == expected).all()
    assert len(bodies) == 1


async def test_empty_png_is_transparent_and_option_restores_404(env):
    for layer, z, row, col in [("HOLE", "10", 363, 516), ("SCAN1000", "12", 1452, 2066)]:
        response = await env.client.get("/wmts", params=tile_params(layer, "PM", z, row, col))
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content))
        # below the bottom level (12 < 10) the tile is drawn from level 10 (no data in this corner)
        assert image.size == (256, 256) and (image.mode == "RGBA" or z == "12")
        assert np.asarray(image.convert("RGBA"))[..., 3].max() == 0
    not_found = await env.client.get("/wmts", params=tile_params("HOLE404", "PM", "10", 363, 516))
    assert_exception(not_found, 404, "Not Found", None)
    present = await env.client.get("/wmts", params=tile_params("HOLE404", "PM", "9", 181, 258))
    assert present.status_code == 200
    beyond = await env.client.get("/wmts", params=tile_params("SCAN1000", "PM_0_10", "12", 1452, 2066))
    assert_exception(beyond, 400, "InvalidParameterValue", "TileMatrix")


async def test_zip_float32_fixture_is_deflated_bil(env):
    lim = env.runtime.catalog.layers["RGEALTI"].limits["8"]
    params = tile_params("RGEALTI", "LAMB93_1M_MNT", "8", lim.min_row, lim.min_col, "image/x-bil;bits=32")
    response = await env.client.get("/wmts", params=params)
    assert (
        response.headers["content-encoding"] == "deflate"
        and response.headers["cache-control"] == "max-age=60"
    )
    assert len(response.content) == TILE_BYTES * 4
    stored = slab_tile(PYRAMIDS / "RGEALTI", "8", lim.min_col, lim.min_row)
    assert zlib.decompress(stored) == response.content
    spaced = await env.client.get("/wmts", params={**params, "FORMAT": "image/x-bil; bits=32"})
    assert spaced.status_code == 200


# --- errors -------------------------------------------------------------------------------------

TILE_ERRORS = [
    # (change to a valid GetTile, status, exceptionCode, locator)
    *[
        ({name: None}, 400, "MissingParameterValue", locator)
        for name, locator in [
            ("LAYER", "layer"),
            ("STYLE", "style"),
            ("FORMAT", "format"),
            ("TILEMATRIXSET", "TileMatrixSet"),
            ("TILEMATRIX", "TileMatrix"),
            ("TILEROW", "TileRow"),
            ("TILECOL", "TileCol"),
            ("SERVICE", "service"),
            ("REQUEST", "request"),
        ]
    ],
    ({"LAYER": ""}, 400, "MissingParameterValue", "layer"),
    ({"LAYER": "NOPE"}, 400, "InvalidParameterValue", "layer"),
    ({"STYLE": "hypso"}, 400, "InvalidParameterValue", "style"),
    ({"FORMAT": "image/gif"}, 400, "InvalidParameterValue", "format"),
    ({"FORMAT": "image/x-bil;bits=32"}, 400, "InvalidParameterValue", "format"),
    ({"TILEMATRIXSET": "WebMercatorQuad"}, 400, "InvalidParameterValue", "TileMatrixSet"),
    ({"TILEMATRIXSET": "PM_0_9"}, 400, "InvalidParameterValue", "TileMatrixSet"),
    ({"TILEMATRIX": "99"}, 400, "InvalidParameterValue", "TileMatrix"),
    ({"TILEROW": "362"}, 400, "TileOutOfRange", "TileRow"),
    ({"TILECOL": "518"}, 400, "TileOutOfRange", "TileCol"),
    ({"TILEROW": "-1"}, 400, "TileOutOfRange", "TileRow"),
    ({"TILECOL": "2147483647"}, 400, "TileOutOfRange", "TileCol"),
    ({"TILEROW": "abc"}, 400, "InvalidParameterValue", "TileRow"),
    ({"TILECOL": "1e99"}, 400, "InvalidParameterValue", "TileCol"),
    ({"TILEROW": "363.0"}, 400, "InvalidParameterValue", "TileRow"),
    ({"TILECOL": "9" * 40}, 400, "InvalidParameterValue", "TileCol"),
    ({"SERVICE": "BOGUS"}, 400, "InvalidParameterValue", "service"),
    ({"REQUEST": "GetBOGUS"}, 400, "InvalidParameterValue", "request"),
    ({"VERSION": "2.0.0"}, 400, "InvalidParameterValue", "version"),
]


@pytest.mark.parametrize(("change", "status", "code", "locator"), TILE_ERRORS)
async def test_get_tile_errors(env, change, status, code, locator):
    params = {k: v for k, v in {**tile_params(*SCAN_TILE), **change}.items() if v is not None}
    assert_exception(await env.client.get("/wmts", params=params), status, code, locator)


REST_ERRORS = [
    ("NOPE/normal/PM/10/363/516.png", "InvalidParameterValue", "layer"),
    ("SCAN1000/fancy/PM/10/363/516.png", "InvalidParameterValue", "style"),
    ("SCAN1000/normal/PM/10/363/516.bil", "InvalidParameterValue", "format"),
    ("SCAN1000/normal/PM/10/363/516.webp", "InvalidParameterValue", "format"),
    ("SCAN1000/normal/XX/10/363/516.png", "InvalidParameterValue", "TileMatrixSet"),
    ("SCAN1000/normal/PM/x/363/516.png", "InvalidParameterValue", "TileMatrix"),
    ("SCAN1000/normal/PM/10/-5/516.png", "TileOutOfRange", "TileRow"),
    ("SCAN1000/normal/PM/10/363/2147483647.png", "TileOutOfRange", "TileCol"),
    ("SCAN1000/normal/PM/10/363/5.16.png", "InvalidParameterValue", "TileCol"),
    ("SCAN1000/normal/PM/10/363/516/0/300.json", "InvalidParameterValue", "I"),
    ("SCAN1000/normal/PM/10/363/516/0/0.csv", "InvalidParameterValue", "InfoFormat"),
    ("MONTAGNE/normal/PM/10/363/516/0/0.json", "OperationNotSupported", "GetFeatureInfo"),
]


@pytest.mark.parametrize(("path", "code", "locator"), REST_ERRORS)
async def test_rest_errors(env, path, code, locator):
    response = await env.client.get(f"/wmts/1.0.0/{path}")
    assert_exception(response, 501 if code == "OperationNotSupported" else 400, code, locator)


CAPABILITIES_ERRORS = [
    ("request=GetCapabilities", "MissingParameterValue", "service"),
    ("service=WMTS", "MissingParameterValue", "request"),
    ("service=BOGUS&request=GetCapabilities", "InvalidParameterValue", "service"),
    ("service=WMTS&request=GetCapabilities&AcceptVersions=2.0.0", "VersionNegotiationFailed", None),
    ("service=WMTS&request=GetCapabilities&Sections=Bogus", "InvalidParameterValue", "sections"),
    ("service=WMTS&request=GetCapabilities&Sections=", "MissingParameterValue", "sections"),
    ("service=WMTS&request=GetCapabilities&UpdateSequence=999999", "InvalidUpdateSequence", None),
    ("", "MissingParameterValue", "service"),
]


@pytest.mark.parametrize(("query", "code", "locator"), CAPABILITIES_ERRORS)
async def test_capabilities_errors(env, query, code, locator):
    assert_exception(await env.client.get(f"/wmts?{query}"), 400, code, locator)


async def test_messages_never_reflect_markup(env):
    for value in ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "\x00\x1b[31m"):
        response = await env.client.get("/wmts", params={**tile_params(*SCAN_TILE), "LAYER": value})
        text = assert_exception(response, 400, "InvalidParameterValue", "layer")
        assert "<" not in text and ">" not in text and "\x00" not in text
        assert b"<script" not in response.content and b"<img" not in response.content


async def test_service_switched_off_answers_503(env):
    off = await env.client.put("/admin/off", headers=ADMIN)
    assert off.status_code == 204
    try:
        for url in (
            "/wmts?service=WMTS&request=GetCapabilities",
            "/wmts/1.0.0/SCAN1000/normal/PM/10/363/516.png",
            "/wmts/1.0.0/WMTSCapabilities.xml",
        ):
            assert_exception(await env.client.get(url), 503, "NoApplicableCode", None)
    finally:
        assert (await env.client.put("/admin/on", headers=ADMIN)).status_code == 204
    assert (await env.client.get("/wmts", params=tile_params(*SCAN_TILE))).status_code == 200


async def test_corrupt_slab_is_502_and_logged_with_the_request_id(env, caplog):
    level_dir = env.root / "ZIPRGB" / "DATA" / LEVEL
    slab = next(level_dir.rglob("*.tif"))
    original = slab.read_bytes()
    caches = {id(p.cache): p.cache for p in env.runtime.catalog.layers["ZIPRGB"].owners.values()}
    caches[id(env.runtime.index_cache)] = env.runtime.index_cache
    for cache in caches.values():
        cache.clear()
    slab.write_bytes(b"this is not a TIFF at all" * 200)
    try:
        with caplog.at_level(logging.ERROR, logger="tileserver.tiles"):
            response = await env.client.get(
                "/wmts", params=tile_params("ZIPRGB", "PM", LEVEL, 0, 0, "image/tiff")
            )
        text = assert_exception(response, 502, "NoApplicableCode", None)
        request_id = response.headers["x-request-id"]
        assert request_id in text and "this is not" not in text
        assert any(request_id in r.getMessage() and "ZIPRGB" in r.getMessage() for r in caplog.records)
    finally:
        slab.write_bytes(original)
        for cache in caches.values():
            cache.clear()


async def test_s3_outage_is_503(tmp_path, s3_server, s3_bucket, s3_proxy, s3_proxy_settings):
    """SCAN1000 on S3 behind a proxy that fails: an OWS 503, then tiles again once S3 is back."""
    from dataclasses import replace

    from tileserver.rok4.listfile import parse_list
    from tileserver.rok4.naming import parse_slab_name

    desc = json.loads((PYRAMIDS / "SCAN1000.json").read_text())
    for level in desc["levels"]:
        level["storage"] = {
            "type": "S3",
            "bucket_name": s3_bucket,
            "image_prefix": f"SCAN1000/DATA_{level['id']}",
        }
    for _, slab, _ in parse_list((PYRAMIDS / "SCAN1000.list").read_text()).entries:
        parsed = parse_slab_name(slab)
        key = f"SCAN1000/DATA_{parsed.level}_{parsed.col}_{parsed.row}"
        s3_server.put(s3_bucket, key, (PYRAMIDS / "SCAN1000" / slab).read_bytes())
    s3_server.put(s3_bucket, "SCAN1000.json", json.dumps(desc).encode())
    settings = replace(
        make_settings(tmp_path),
        s3_clusters=s3_proxy_settings.s3_clusters,
        storage_retries=1,
        storage_timeout=0.5,
        storage_retry_backoff=0.01,
    )
    async with app_client(settings) as client:
        await publish(client, "S3SCAN", layer_descriptor("SCAN1000", root=f"s3://{s3_bucket}"))
        params = tile_params("S3SCAN", *SCAN_TILE[1:])
        s3_proxy.fail_next(10, 503)
        assert_exception(await client.get("/wmts", params=params), 503, "NoApplicableCode", None)
        s3_proxy.clear()
        response = await client.get("/wmts", params=params)
        assert response.status_code == 200 and response.content == slab_tile(
            PYRAMIDS / "SCAN1000", "10", 516, 363
        )


# --- GetFeatureInfo -----------------------------------------------------------------------------


def info_params(
    layer: str, tms: str, z: str, row: int, col: int, fmt: str, i: int, j: int, info: str
) -> dict:
    return {
        **tile_params(layer, tms, z, row, col, fmt),
        "REQUEST": "GetFeatureInfo",
        "INFOFORMAT": info,
        "I": str(i),
        "J": str(j),
    }


INFO_PARSERS: dict[str, Callable[[bytes], list[float]]] = {
    "text/plain": lambda body: [float(v) for v in body.decode().split(",") if v],
    "application/json": lambda body: (
        [f["properties"]["pixel"] for f in json.loads(body)["features"]][0]
        if json.loads(body)["features"]
        else []
    ),
    "text/html": lambda body: [float(v) for v in etree.HTML(body).xpath("//li/text()")],
    "text/xml": lambda body: [float(v) for v in etree.fromstring(body).xpath("/Pixel/Band/text()")],
}


@pytest.mark.parametrize("info", list(INFO_PARSERS))
async def test_feature_info_gives_stored_values(env, info):
    lim = env.runtime.catalog.layers["RGEALTI"].limits["8"]
    row, col = lim.min_row, lim.min_col
    stored = decode_tile(slab_tile(PYRAMIDS / "RGEALTI", "8", col, row), "zip", 256, 256, 1, "float32")
    mime = "image/x-bil;bits=32"
    for i, j in [(0, 0), (255, 255), (17, 201)]:
        response = await env.client.get(
            "/wmts", params=info_params("RGEALTI", "LAMB93_1M_MNT", "8", row, col, mime, i, j, info)
        )
        assert response.status_code == 200 and response.headers["content-type"].startswith(info)
        values = INFO_PARSERS[info](response.content)
        expected = float(stored[j, i, 0])
        assert values == ([] if expected == -99999 else [pytest.approx(expected, rel=1e-6)])
        rest = await env.client.get(
            f"/wmts/1.0.0/RGEALTI/normal/LAMB93_1M_MNT/8/{row}/{col}/{j}/{i}."
            + {"text/plain": "txt", "application/json": "json", "text/html": "html", "text/xml": "xml"}[info]
        )
        assert rest.content == response.content
    rgb = await env.client.get(
        "/wmts", params=info_params("ZIPRGB", "PM", LEVEL, 1, 1, "image/tiff", 10, 20, info)
    )
    assert INFO_PARSERS[info](rgb.content) == [
        float(v) for v in built_pixels("TIFF_ZIP_UINT8", 3, 1, 1)[20, 10]
    ]
    empty = await env.client.get(
        "/wmts", params=info_params("ZIPRGB", "PM", LEVEL, 0, 3, "image/tiff", 10, 20, info)
    )
    assert empty.status_code == 200 and INFO_PARSERS[info](empty.content) == []


async def test_feature_info_json_has_the_pixel_position(env):
    from pyproj import Transformer

    params = info_params("ZIPRGB", "PM", LEVEL, 1, 1, "image/tiff", 0, 255, "application/json")
    feature = (await env.client.get("/wmts", params=params)).json()["features"][0]
    xmin, ymin, _, _ = load_tms("PM", TMS_DIR).get(LEVEL).tile_bbox(1, 1)
    cell = load_tms("PM", TMS_DIR).get(LEVEL).cell_size
    expected = Transformer.from_crs("EPSG:3857", "EPSG:4326", always_xy=True).transform(
        xmin + cell / 2, ymin + cell / 2
    )
    assert feature["geometry"]["coordinates"] == pytest.approx(list(expected))
    assert feature["properties"]["pixel"] == [
        float(v) for v in built_pixels("TIFF_ZIP_UINT8", 3, 1, 1)[255, 0]
    ]


INFO_ERRORS = [
    ({"I": "256"}, 400, "InvalidParameterValue", "I"),
    ({"J": "-1"}, 400, "InvalidParameterValue", "J"),
    ({"I": "x"}, 400, "InvalidParameterValue", "I"),
    ({"J": None}, 400, "MissingParameterValue", "J"),
    ({"INFOFORMAT": None}, 400, "MissingParameterValue", "InfoFormat"),
    ({"INFOFORMAT": "image/png"}, 400, "InvalidParameterValue", "InfoFormat"),
    ({"TILEROW": "364"}, 400, "TileOutOfRange", "TileRow"),
    ({"TILECOL": "2147483647"}, 400, "TileOutOfRange", "TileCol"),
    ({"LAYER": "MONTAGNE"}, 501, "OperationNotSupported", "GetFeatureInfo"),
    ({"LAYER": "NOPE"}, 400, "InvalidParameterValue", "layer"),
    ({"STYLE": "x"}, 400, "InvalidParameterValue", "style"),
]


@pytest.mark.parametrize(("change", "status", "code", "locator"), INFO_ERRORS)
async def test_feature_info_errors(env, change, status, code, locator):
    base = info_params(*SCAN_TILE, "image/png", 1, 1, "text/plain")
    if change.get("LAYER") == "MONTAGNE":
        lim = env.runtime.catalog.layers["MONTAGNE"].limits["10"]
        base.update(TILEROW=str(lim.min_row), TILECOL=str(lim.min_col))
    params = {k: v for k, v in {**base, **change}.items() if v is not None}
    assert_exception(await env.client.get("/wmts", params=params), status, code, locator)


async def test_tile_answers_for_other_protocols(env):
    """The protocol-neutral API TMS and OGC API Tiles build on."""
    from tileserver.services.tiles import TileNotFound, empty_tile, feature_info, native_tile, tile_response

    layers = env.runtime.catalog.layers
    scan, hole404, rgealti = layers["SCAN1000"], layers["HOLE404"], layers["RGEALTI"]
    answer = await native_tile(scan, "10", 516, 363)
    assert (answer.content_type, answer.content_encoding, answer.empty) == ("image/png", None, False)
    assert answer.body == slab_tile(PYRAMIDS / "SCAN1000", "10", 516, 363)
    assert await native_tile(scan, "10", 518, 363) is None and await native_tile(scan, "12", 0, 0) is None
    assert (await native_tile(layers["HOLE"], "10", 516, 363)).empty
    with pytest.raises(TileNotFound):
        await native_tile(hole404, "10", 516, 363)
    with pytest.raises(TileNotFound):
        empty_tile(hole404, "12")
    zbil = await native_tile(rgealti, "8", rgealti.limits["8"].min_col, rgealti.limits["8"].min_row)
    response = tile_response(zbil, rgealti, env.runtime.settings, "gzip, deflate")
    assert (
        response.headers["content-encoding"] == "deflate"
        and response.headers["cache-control"] == "max-age=60"
        and response.headers["vary"] == "Accept-Encoding"
    )
    assert response.headers["content-type"] == "image/x-bil;bits=32"
    for refusing in (None, "gzip", "deflate;q=0"):  # not accepted: inflated, same Vary
        plain = tile_response(zbil, rgealti, env.runtime.settings, refusing)
        assert "content-encoding" not in plain.headers and plain.headers["vary"] == "Accept-Encoding"
        assert plain.body == zlib.decompress(zbil.body) and len(plain.body) == TILE_BYTES * 4
    values = await feature_info(layers["ZIPRGB"], LEVEL, 0, 0, 5, 6)
    assert values == [float(v) for v in built_pixels("TIFF_ZIP_UINT8", 3, 0, 0)[6, 5]]
    assert await feature_info(layers["ZIPRGB"], LEVEL, 3, 0, 5, 6) is None  # absent slab
    assert await feature_info(layers["ZIPRGB"], LEVEL, 9, 0, 5, 6) is None  # outside the limits
