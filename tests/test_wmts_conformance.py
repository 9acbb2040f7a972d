"""The WMTS 1.0 conformance assertions (ets-wmts10, PEERS-AND-TESTS.md §2.3), a real client, and fuzzing.

Every request is derived from our own capabilities, as the suite does; where the suite accepts any
locator we require the exact one. OWSLib talks to uvicorn over real HTTP.
"""

from __future__ import annotations

import io
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import tifffile
from apputil import PYRAMIDS, layer_descriptor, live_server, make_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree
from PIL import Image
from test_wmts import (
    ADMIN,
    CAPABILITIES_SCHEMA,
    EXCEPTION_SCHEMA,
    NS,
    assert_exception,
    assert_valid,
    slab_tile,
    start,
)

XLINK = "{http://www.w3.org/1999/xlink}href"
SKIP_LAYERS = {"HOLE404"}  # its option restores ROK4's 404 for empty tiles: outside what the suite accepts


@pytest.fixture(scope="module")
async def env(tmp_path_factory):
    cm, environment = await start(tmp_path_factory.mktemp("wmts-conformance"))
    response = await environment.client.get("/wmts?SERVICE=WMTS&REQUEST=GetCapabilities")
    environment.caps = assert_valid(CAPABILITIES_SCHEMA, response.content)
    yield environment
    await cm.__aexit__(None, None, None)


def text(node, path: str) -> str:
    return node.findtext(path, namespaces=NS)


def kvp_url(caps, operation: str) -> str:
    for get in caps.iterfind(f"ows:OperationsMetadata/ows:Operation[@name='{operation}']//ows:Get", NS):
        if get.findtext(".//ows:Value", namespaces=NS) == "KVP":
            return get.get(XLINK)
    raise AssertionError(f"no KVP Get for {operation}")


def path_of(url: str) -> str:
    return url.replace("http://testserver", "")


def tile_matrix_sets(caps) -> dict:
    return {text(s, "ows:Identifier"): s for s in caps.iterfind("w:Contents/w:TileMatrixSet", NS)}


def layers(caps) -> list:
    return [
        lay
        for lay in caps.iterfind("w:Contents/w:Layer", NS)
        if text(lay, "ows:Identifier") not in SKIP_LAYERS
    ]


def probe_tiles(link, tms_node):
    """(TileMatrix, row, col, TileWidth, TileHeight) for min, mid, max row × col of every TileMatrix (suite's choice)."""
    limits = {
        text(t, "w:TileMatrix"): t for t in link.iterfind("w:TileMatrixSetLimits/w:TileMatrixLimits", NS)
    }
    for tm in tms_node.iterfind("w:TileMatrix", NS):
        tm_id = text(tm, "ows:Identifier")
        lim = limits.get(tm_id)
        if lim is not None:
            rows = (int(text(lim, "w:MinTileRow")), int(text(lim, "w:MaxTileRow")))
            cols = (int(text(lim, "w:MinTileCol")), int(text(lim, "w:MaxTileCol")))
        else:
            rows, cols = (0, int(text(tm, "w:MatrixHeight")) - 1), (0, int(text(tm, "w:MatrixWidth")) - 1)
        size = int(text(tm, "w:TileWidth")), int(text(tm, "w:TileHeight"))
        for row in sorted({rows[0], sum(rows) // 2, rows[1]}):
            for col in sorted({cols[0], sum(cols) // 2, cols[1]}):
                yield tm_id, row, col, size, (rows, cols)


def image_size(body: bytes, mime: str, encoding: str | None) -> tuple[int, int]:
    if mime in ("image/png", "image/jpeg"):
        return Image.open(io.BytesIO(body)).size
    if mime == "image/tiff":
        page = tifffile.TiffFile(io.BytesIO(body)).pages[0]
        return page.imagewidth, page.imagelength
    side = int(np.sqrt(len(body) // 4))  # one float32 band
    return side, side


# --- capabilities ---------------------------------------------------------------------------------


async def test_capabilities_response_assertions(env):
    caps = env.caps
    assert caps.get("version") == "1.0.0"
    for get in caps.iterfind("ows:OperationsMetadata//ows:Get", NS):
        encoding = get.findtext(
            "ows:Constraint[@name='GetEncoding']/ows:AllowedValues/ows:Value", namespaces=NS
        )
        assert encoding in ("KVP", "RESTful")
        assert encoding == "RESTful" or get.get(XLINK).endswith(("?", "&"))
    for op in ("GetCapabilities", "GetTile", "GetFeatureInfo"):
        assert kvp_url(caps, op) == "http://testserver/wmts?"
    formats = caps.xpath(
        "ows:OperationsMetadata/ows:Operation[@name='GetCapabilities']/ows:Parameter"
        "[@name='AcceptFormats']/ows:AllowedValues/ows:Value/text()",
        namespaces=NS,
    )
    assert "application/xml" in formats
    ids = [text(lay, "ows:Identifier") for lay in caps.iterfind("w:Contents/w:Layer", NS)]
    assert len(ids) == len(set(ids)) and all(ids)
    sets = tile_matrix_sets(caps)
    assert len(sets) == len(caps.findall("w:Contents/w:TileMatrixSet", NS))
    for lay in caps.iterfind("w:Contents/w:Layer", NS):
        for link in lay.iterfind("w:TileMatrixSetLink", NS):
            tms = sets[text(link, "w:TileMatrixSet")]
            matrices = {text(tm, "ows:Identifier") for tm in tms.iterfind("w:TileMatrix", NS)}
            assert {text(t, "w:TileMatrix") for t in link.iterfind(".//w:TileMatrixLimits", NS)} <= matrices
        assert any(r.get("resourceType") == "tile" for r in lay.iterfind("w:ResourceURL", NS))
    for tms in sets.values():
        tm_ids = [text(tm, "ows:Identifier") for tm in tms.iterfind("w:TileMatrix", NS)]
        scales = [text(tm, "w:ScaleDenominator") for tm in tms.iterfind("w:TileMatrix", NS)]
        assert len(tm_ids) == len(set(tm_ids)) and len(scales) == len(set(scales))
        assert tms.find("w:WellKnownScaleSet", NS) is None
    metadata_url = caps.find("w:ServiceMetadataURL", NS).get(XLINK)
    again = await env.client.get(path_of(metadata_url))
    assert again.status_code == 200 and metadata_url.encode() in again.content
    assert (await env.client.get(path_of(metadata_url) + "/Bogus")).status_code == 404
    assert (
        await env.client.get(path_of(metadata_url), headers={"Accept": "example/unknown"})
    ).status_code == 406
    shuffled = await env.client.get("/wmts?ReQuEsT=GetCapabilities&sErViCe=WMTS&ACCEPTVERSIONS=1.0.0")
    assert shuffled.content == (await env.client.get("/wmts?SERVICE=WMTS&REQUEST=GetCapabilities")).content


# --- GetTile ------------------------------------------------------------------------------------


async def test_every_tile_matrix_min_mid_max_is_an_image_kvp(env):
    """KVP.GetTile.Mandatory for every layer (the suite takes the middle one), every set, every matrix."""
    count = 0
    for lay in layers(env.caps):
        layer_id, style = text(lay, "ows:Identifier"), text(lay, "w:Style/ows:Identifier")
        mime = text(lay, "w:Format")
        for link in lay.iterfind("w:TileMatrixSetLink", NS):
            set_id = text(link, "w:TileMatrixSet")
            for tm_id, row, col, size, _ in probe_tiles(link, tile_matrix_sets(env.caps)[set_id]):
                params = {
                    "service": "WMTS",
                    "request": "GetTile",
                    "version": "1.0.0",
                    "layer": layer_id,
                    "style": style,
                    "format": mime,
                    "TileMatrixSet": set_id,
                    "TileMatrix": tm_id,
                    "TileRow": row,
                    "TileCol": col,
                }
                response = await env.client.get("/wmts", params=params)
                assert response.status_code == 200, (params, response.text)
                assert response.headers["content-type"] == mime
                assert image_size(response.content, mime, response.headers.get("content-encoding")) == size
                count += 1
    assert count > 1000


async def test_every_tile_matrix_through_the_rest_template(env):
    for lay in layers(env.caps):
        template = next(
            r.get("template") for r in lay.iterfind("w:ResourceURL", NS) if r.get("resourceType") == "tile"
        )
        mime = text(lay, "w:Format")
        for link in lay.iterfind("w:TileMatrixSetLink", NS):
            set_id = text(link, "w:TileMatrixSet")
            seen = set()
            for tm_id, row, col, size, _ in probe_tiles(link, tile_matrix_sets(env.caps)[set_id]):
                if tm_id in seen:
                    continue
                seen.add(tm_id)
                url = (
                    template.replace("{Style}", "normal")
                    .replace("{TileMatrixSet}", set_id)
                    .replace("{TileMatrix}", tm_id)
                    .replace("{TileRow}", str(row))
                    .replace("{TileCol}", str(col))
                )
                response = await env.client.get(path_of(url))
                assert response.status_code == 200 and response.headers["content-type"] == mime
                assert image_size(response.content, mime, None) == size
                bad = await env.client.get(path_of(url.replace(f"/{row}/{col}.", f"/{row}/-{col + 1}.")))
                assert 400 <= bad.status_code < 500


def middle(items: list):
    return items[(len(items) + 1) // 2 - 1]


async def test_get_tile_exceptions_derived_from_capabilities(env):
    lay = middle(layers(env.caps))
    link = middle(lay.findall("w:TileMatrixSetLink", NS))
    set_id = text(link, "w:TileMatrixSet")
    tm_id, row, col, _, (rows, cols) = next(probe_tiles(link, tile_matrix_sets(env.caps)[set_id]))
    valid = {
        "service": "WMTS",
        "request": "GetTile",
        "version": "1.0.0",
        "layer": text(lay, "ows:Identifier"),
        "style": text(lay, "w:Style/ows:Identifier"),
        "format": text(lay, "w:Format"),
        "TileMatrixSet": set_id,
        "TileMatrix": tm_id,
        "TileRow": str(row),
        "TileCol": str(col),
    }
    assert (await env.client.get("/wmts", params=valid)).status_code == 200
    for name in ("layer", "style", "format", "TileMatrixSet", "TileMatrix", "TileRow", "TileCol"):
        missing = {k: v for k, v in valid.items() if k != name}
        assert_exception(await env.client.get("/wmts", params=missing), 400, "MissingParameterValue", name)
        bogus = {**valid, name: "BogusForTest"}
        code = "InvalidParameterValue"
        assert_exception(await env.client.get("/wmts", params=bogus), 400, code, name)
    for name, value in (("TileRow", rows[1] + 1), ("TileCol", cols[1] + 1), ("TileRow", rows[0] - 1)):
        response = await env.client.get("/wmts", params={**valid, name: str(value)})
        assert_exception(response, 400, "TileOutOfRange", name)
    for query, code, locator in [
        ("service=WMTS", "MissingParameterValue", "request"),
        ("service=BOGUS&request=GetCapabilities", "InvalidParameterValue", "service"),
        ("service=WMTS&request=GetBOGUS&version=1.0.0", "InvalidParameterValue", "request"),
        ("request=GetCapabilities&AcceptVersions=1.0.0", "MissingParameterValue", "service"),
    ]:
        assert_exception(await env.client.get(f"/wmts?{query}"), 400, code, locator)


async def test_get_feature_info_derived_from_capabilities(env):
    queryable = [lay for lay in layers(env.caps) if lay.find("w:InfoFormat", NS) is not None]
    lay = middle(queryable)
    link = lay.find("w:TileMatrixSetLink", NS)
    set_id = text(link, "w:TileMatrixSet")
    tm_id, row, col, (width, height), (rows, cols) = next(
        probe_tiles(link, tile_matrix_sets(env.caps)[set_id])
    )
    valid = {
        "service": "WMTS",
        "request": "GetFeatureInfo",
        "version": "1.0.0",
        "layer": text(lay, "ows:Identifier"),
        "style": text(lay, "w:Style/ows:Identifier"),
        "format": text(lay, "w:Format"),
        "TileMatrixSet": set_id,
        "TileMatrix": tm_id,
        "TileRow": str(row),
        "TileCol": str(col),
        "J": "0",
        "I": "0",
    }
    for info in [f.text for f in lay.iterfind("w:InfoFormat", NS)]:
        response = await env.client.get("/wmts", params={**valid, "InfoFormat": info})
        assert response.status_code == 200 and response.headers["content-type"].startswith(info)
    valid["InfoFormat"] = "text/plain"
    for name in (
        "layer",
        "style",
        "format",
        "InfoFormat",
        "TileMatrixSet",
        "TileMatrix",
        "TileRow",
        "TileCol",
        "J",
        "I",
    ):
        missing = {k: v for k, v in valid.items() if k != name}
        assert_exception(await env.client.get("/wmts", params=missing), 400, "MissingParameterValue", name)
    for name, value, code in (
        ("J", height, "InvalidParameterValue"),
        ("I", width, "InvalidParameterValue"),
        # GetFeatureInfo carries GetTile's parameters and exceptions (ets-wmts10 wmtsFunctions.xml)
        ("TileRow", rows[1] + 1, "TileOutOfRange"),
        ("TileCol", cols[1] + 1, "TileOutOfRange"),
        ("InfoFormat", "bogus/xml", "InvalidParameterValue"),
        ("layer", "BogusForTest", "InvalidParameterValue"),
        ("TileMatrixSet", "BogusForTest", "InvalidParameterValue"),
    ):
        response = await env.client.get("/wmts", params={**valid, name: str(value)})
        assert_exception(response, 400, code, name)
    plain = next(lay for lay in layers(env.caps) if lay.find("w:InfoFormat", NS) is None)
    plain_link = plain.find("w:TileMatrixSetLink", NS)
    tm_id, row, col, _, _ = next(
        probe_tiles(plain_link, tile_matrix_sets(env.caps)[text(plain_link, "w:TileMatrixSet")])
    )
    not_queryable = {
        **valid,
        "layer": text(plain, "ows:Identifier"),
        "format": text(plain, "w:Format"),
        "TileMatrixSet": text(plain_link, "w:TileMatrixSet"),
        "TileMatrix": tm_id,
        "TileRow": str(row),
        "TileCol": str(col),
    }
    assert_exception(
        await env.client.get("/wmts", params=not_queryable), 501, "OperationNotSupported", "GetFeatureInfo"
    )


# --- a real client over real HTTP ---------------------------------------------------------------


def test_owslib_over_http(tmp_path):
    from owslib.wmts import WebMapTileService

    with live_server(make_settings(tmp_path)) as base:
        for name in ("SCAN1000", "BDPARCELLAIRE"):
            added = httpx.post(f"{base}/admin/layers/{name}", json=layer_descriptor(name), headers=ADMIN)
            assert added.status_code == 204, added.text
        caps = httpx.get(f"{base}/wmts?SERVICE=WMTS&REQUEST=GetCapabilities")
        assert_valid(CAPABILITIES_SCHEMA, caps.content)
        wmts = WebMapTileService(f"{base}/wmts?SERVICE=WMTS&REQUEST=GetCapabilities")
        assert sorted(wmts.contents) == ["BDPARCELLAIRE", "SCAN1000"]
        layer = wmts.contents["SCAN1000"]
        assert layer.formats == ["image/png", "image/jpeg"] and set(layer.tilematrixsetlinks) == {"PM", "PM_0_10"}
        assert wmts.tilematrixsets["PM"].tilematrix["10"].matrixwidth == 1024
        for tms in ("PM", "PM_0_10"):
            for col in (516, 517):
                tile = wmts.gettile(
                    layer="SCAN1000",
                    tilematrixset=tms,
                    tilematrix="10",
                    row=363,
                    column=col,
                    format="image/png",
                )
                assert tile.read() == slab_tile(PYRAMIDS / "SCAN1000", "10", col, 363)
        parcel = wmts.gettile(
            layer="BDPARCELLAIRE",
            tilematrixset="4326",
            tilematrix="19",
            row=123346,
            column=544204,
            format="image/png",
        )
        assert parcel.read() == slab_tile(PYRAMIDS / "BDPARCELLAIRE", "19", 544204, 123346)
        rest = WebMapTileService(f"{base}/wmts/1.0.0/WMTSCapabilities.xml")
        assert (
            rest.contents["SCAN1000"].resourceURLs[0]["template"].startswith(f"{base}/wmts/1.0.0/SCAN1000/")
        )
        error = httpx.get(
            f"{base}/wmts", params={"service": "WMTS", "request": "GetTile", "layer": "SCAN1000"}
        )
        assert_exception(error, 400, "MissingParameterValue", "style")


# --- fuzzing ------------------------------------------------------------------------------------

NAMES = [
    "SERVICE",
    "REQUEST",
    "VERSION",
    "LAYER",
    "STYLE",
    "FORMAT",
    "TILEMATRIXSET",
    "TILEMATRIX",
    "TILEROW",
    "TILECOL",
    "INFOFORMAT",
    "I",
    "J",
    "SECTIONS",
    "ACCEPTVERSIONS",
    "UPDATESEQUENCE",
    "ACCEPTFORMATS",
    "APIKEY",
]
VALUES = [
    "WMTS",
    "GetTile",
    "GetFeatureInfo",
    "GetCapabilities",
    "1.0.0",
    "SCAN1000",
    "RGEALTI",
    "ZIPF32",
    "normal",
    "image/png",
    "image/x-bil;bits=32",
    "PM",
    "PM_0_10",
    "LAMB93_1M_MNT",
    "10",
    "363",
    "516",
    "0",
    "-1",
    "2147483647",
    "99999999999999999999999",
    "1e99",
    "NaN",
    "text/plain",
    "All",
    "Contents,Bogus",
    "",
]
NUMBERS = st.integers(min_value=-(2**70), max_value=2**70).map(str)
ANY_TEXT = st.text(max_size=40)


def _cased(name: str):
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(c.lower() if f else c for c, f in zip(name, flips, strict=True))
    )


PARAMS = st.dictionaries(
    st.sampled_from(NAMES).flatmap(_cased),
    st.one_of(st.sampled_from(VALUES), NUMBERS, ANY_TEXT),
    max_size=14,
)


def assert_no_server_error(response) -> None:
    """Never a server fault; the one 5xx a client can cause is 501 (GetFeatureInfo on a non-queryable layer)."""
    if response.status_code == 501:
        code = etree.fromstring(response.content).find("ows:Exception", NS).get("exceptionCode")
        assert code == "OperationNotSupported"
    else:
        assert response.status_code < 500, response.text
    if response.status_code >= 400 and response.headers.get("content-type", "").startswith("application/xml"):
        assert_valid(EXCEPTION_SCHEMA, response.content)


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(params=PARAMS)
async def test_fuzz_kvp(env, params):
    assert_no_server_error(await env.client.get("/wmts", params=params))


SEGMENT = st.one_of(st.sampled_from(VALUES[5:20]), NUMBERS, st.text(min_size=1, max_size=20))
EXTENSION = st.sampled_from(["png", "PNG", "jpeg", "tif", "bil", "json", "txt", "xml", "html", "", "x.y"])


@FUZZ
@given(segments=st.lists(SEGMENT, min_size=6, max_size=8), ext=EXTENSION)
async def test_fuzz_rest(env, segments, ext):
    path = "/".join(quote(s, safe="") for s in segments)
    assert_no_server_error(await env.client.get(f"/wmts/1.0.0/{path}.{ext}"))


INDEX = st.one_of(NUMBERS, st.integers(-3, 300).map(str))


@FUZZ
@given(
    layer=st.sampled_from(["SCAN1000", "RGEALTI", "ZIPRGB", "HOLE404", "MONTAGNE"]),
    row=INDEX,
    col=INDEX,
    z=st.one_of(st.integers(-2, 25).map(str), ANY_TEXT),
    tms=st.sampled_from(["PM", "PM_0_10", "LAMB93_1M_MNT", "x"]),
    info=st.one_of(
        st.none(), st.tuples(INDEX, INDEX, st.sampled_from(["text/plain", "application/json", "x"]))
    ),
)
async def test_fuzz_tile_indices(env, layer, row, col, z, tms, info):
    """Numbers anywhere, including inside the limits: only images, info, OWS exceptions, 404 for HOLE404."""
    fmt = {"RGEALTI": "image/x-bil;bits=32", "ZIPRGB": "image/tiff"}.get(layer, "image/png")
    params = {
        "service": "WMTS",
        "request": "GetTile",
        "layer": layer,
        "style": "normal",
        "format": fmt,
        "tilematrixset": tms,
        "tilematrix": z,
        "tilerow": row,
        "tilecol": col,
    }
    if info is not None:
        params.update(request="GetFeatureInfo", i=info[0], j=info[1], infoformat=info[2])
    response = await env.client.get("/wmts", params=params)
    assert_no_server_error(response)
    if response.status_code == 200:
        assert response.headers["content-type"].startswith(fmt if info is None else info[2])
    else:
        doc = etree.fromstring(response.content)
        assert doc.find("ows:Exception", NS).get("exceptionCode") in (
            "InvalidParameterValue",
            "TileOutOfRange",
            "Not Found",
            "MissingParameterValue",
            "OperationNotSupported",
        )
