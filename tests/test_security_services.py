"""Every route of every service, over real HTTP, for a restricted layer: no key, another key, a revoked
key and the right key; status, body kind and cache headers. Raster layers are published by the
operator (admin API, admin keys); vector offerings (WFS, OGC API Features, WMS-vector, vector tiles)
by an `/api` user on private endpoints, opened by his keys (the other key is another user's). The
service switch covers every service, the fast path too; bad input gets the protocol's 4xx; garbage
tiles are a 502."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apputil import PYRAMIDS, layer_descriptor, live_server, make_settings
from test_tms_service import built_pyramids
from test_warehouse_support import BASE, add_user, api_client, wait_for, warehouse_server
from test_warehouse_vector import endpoint_id, wfs_configuration
from test_warehouse_wms_vector import MAP_BBOX, canton_base, wmsv_configuration

ADMIN = {"Authorization": "Bearer secret"}


def _publish(http: httpx.Client, layer_id: str, descriptor: dict) -> None:
    answer = http.post(f"/admin/layers/{layer_id}", json=descriptor, headers=ADMIN)
    assert answer.status_code == 204, answer.text


def _key(http: httpx.Client, layers: list[str]) -> tuple[str, str]:
    created = http.post("/admin/keys", json={"name": "k", "layers": layers}, headers=ADMIN)
    assert created.status_code == 201, created.text
    return created.json()["id"], created.json()["key"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """SECRET (restricted, queryable), OTHER (restricted), OPEN; the right key, another key, a revoked one."""
    tmp = tmp_path_factory.mktemp("security")
    with live_server(make_settings(tmp)) as url, httpx.Client(base_url=url, timeout=30) as http:
        gfi = {"get_feature_info": {"type": "PYRAMID"}}
        _publish(http, "SECRET", layer_descriptor("SCAN1000", restricted=True, **gfi))
        _publish(http, "OTHER", layer_descriptor("MONTAGNE", restricted=True))
        _publish(http, "OPEN", layer_descriptor("SCAN1000", metadata=[{"url": "javascript:alert(1)", "type": "Other"}],
                                                **gfi))
        _, right = _key(http, ["SECRET"])
        _, other = _key(http, ["OTHER"])
        revoked_id, revoked = _key(http, ["SECRET"])
        assert http.delete(f"/admin/keys/{revoked_id}", headers=ADMIN).status_code == 204
        keys = {"none": None, "other": other, "revoked": revoked, "right": right}
        tilemap = ET.fromstring(http.get("/tms/1.0.0/SECRET", headers={"X-Api-Key": right}).content)
        level = next(t for t in tilemap.iter("TileSet") if t.get("order") == "10")
        row, col = int(level.get("minrow")), int(level.get("mincol"))
        bounds = http.get("/tms/1.0.0/SECRET/metadata.json", headers={"X-Api-Key": right}).json()["bounds"]
        yield http, keys, row, col, bounds


def _routes(row: int, col: int, bounds: list[float]) -> dict[str, tuple[str, str]]:
    """name → (path and query, body kind of the protocol: the image, document or exception it answers)."""
    bbox = ",".join(str(v) for v in bounds)
    wmts = "/wmts?SERVICE=WMTS&VERSION=1.0.0&LAYER=SECRET&STYLE=normal&FORMAT=image/png&TILEMATRIXSET=PM"
    tile = f"&TILEMATRIX=10&TILEROW={row}&TILECOL={col}"
    wms = f"/wms?SERVICE=WMS&VERSION=1.3.0&LAYERS=SECRET&STYLES=&CRS=CRS:84&BBOX={bbox}&WIDTH=64&HEIGHT=64"
    return {
        "wmts GetTile": (f"{wmts}&REQUEST=GetTile{tile}", "image"),
        "wmts GetFeatureInfo": (f"{wmts}&REQUEST=GetFeatureInfo{tile}&INFOFORMAT=text/plain&I=1&J=1", "text"),
        "wmts REST tile": (f"/wmts/1.0.0/SECRET/normal/PM/10/{row}/{col}.png", "image"),
        "tms TileMap": ("/tms/1.0.0/SECRET", "xml"),
        "tms tile": (f"/tms/1.0.0/SECRET/10/{col}/{row}.png", "image"),
        "tms TileJSON": ("/tms/1.0.0/SECRET/metadata.json", "json"),
        "tms gdal.xml": ("/tms/1.0.0/SECRET/gdal.xml", "xml"),
        "xyz tile": (f"/xyz/SECRET/10/{col}/{row}.png", "image"),
        "ogcapi collection": ("/ogcapi/collections/SECRET", "json"),
        "ogcapi tilesets": ("/ogcapi/collections/SECRET/map/tiles", "json"),
        "ogcapi tileset": ("/ogcapi/collections/SECRET/map/tiles/WebMercatorQuad", "json"),
        "ogcapi tile": (f"/ogcapi/collections/SECRET/map/tiles/PM/10/{row}/{col}", "image"),
        "ogcapi map tile": (f"/ogcapi/map/tiles/PM/10/{row}/{col}?collections=SECRET", "image"),
        "ogcapi styled tile": (f"/ogcapi/collections/SECRET/styles/normal/map/tiles/PM/10/{row}/{col}", "image"),
        "wms GetMap": (f"{wms}&REQUEST=GetMap&FORMAT=image/png", "image"),
        "wms GetFeatureInfo": (f"{wms}&REQUEST=GetFeatureInfo&QUERY_LAYERS=SECRET&INFO_FORMAT=text/plain&I=5&J=5",
                               "text"),
        "wms GetLegendGraphic": ("/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetLegendGraphic&LAYER=SECRET"
                                 "&FORMAT=image/png", "image"),
    }


LISTINGS = {
    "wmts KVP GetCapabilities": ("/wmts?SERVICE=WMTS&REQUEST=GetCapabilities", b"SECRET"),
    "wmts REST capabilities": ("/wmts/1.0.0/WMTSCapabilities.xml", b"SECRET"),
    "tms root": ("/tms/1.0.0", b"SECRET"),
    "ogcapi collections": ("/ogcapi/collections", b"SECRET"),
    "wms GetCapabilities": ("/wms?SERVICE=WMS&REQUEST=GetCapabilities", b"SECRET"),
}


def _exception_kind(answer: httpx.Response) -> bool:
    """The protocol's own error: an OWS/WMS exception report, TMS's error, or a JSON problem."""
    kind = answer.headers.get("content-type", "")
    return ("problem+json" in kind or b"ExceptionReport" in answer.content or b"TileMapServerError" in answer.content)


def _private(answer: httpx.Response) -> bool:
    cache = answer.headers.get("cache-control", "")
    return "private" in cache and "public" not in cache and "X-Api-Key" in answer.headers.get("vary", "")


def _failures(http: httpx.Client, key: str | None, right: bool, routes: dict[str, tuple[str, str]],
              listings: dict[str, tuple[str, bytes]]) -> list[tuple[Any, ...]]:
    """What is wrong in the answers to `routes` and `listings` with `key` (None: no key; `right`: the
    key granted the restricted data): the right key gets the data, privately cached; any other gets
    the protocol's 4xx, never stored; listings show the restricted names to the right key only."""
    headers = {"X-Api-Key": key} if key else {}
    failures: list[tuple[Any, ...]] = []
    for name, (path, kind) in routes.items():
        answer = http.get(path, headers=headers)
        content_type = answer.headers.get("content-type", "")
        if right:
            ok = answer.status_code == 200 and _private(answer) and not _exception_kind(answer)
            ok = ok and (content_type.startswith("image/") if kind == "image" else kind in content_type
                         or (kind == "json" and "json" in content_type))
        else:
            ok = (400 <= answer.status_code < 500 and _exception_kind(answer) and not content_type.startswith("image/")
                  and "no-store" in answer.headers.get("cache-control", "")
                  and "X-Api-Key" in answer.headers.get("vary", ""))
        if not ok:
            failures.append((name, answer.status_code, content_type, answer.headers.get("cache-control"),
                             answer.headers.get("vary"), answer.text[:120]))
    for name, (path, marker) in listings.items():
        answer = http.get(path, headers=headers)
        listed = marker in answer.content
        ok = answer.status_code == 200 and listed == right
        ok = ok and (_private(answer) if key else "X-Api-Key" in answer.headers.get("vary", ""))
        if not ok:
            failures.append((name, answer.status_code, listed, answer.headers.get("cache-control"),
                             answer.headers.get("vary")))
    return failures


@pytest.mark.parametrize("who", ["none", "other", "revoked", "right"])
def test_every_route_of_a_restricted_layer(server, who):
    http, keys, row, col, bounds = server
    assert not _failures(http, keys[who], who == "right", _routes(row, col, bounds), LISTINGS)


# --- restricted vector offerings, published and opened through /api ----------------------------------

OTHER_LOGIN = "mmartin"
FEATURES = "wfsprive:canton"  # WFS layer name : relation public name
WMSV = "wmsvprive"
VTILES = "tuilesprivees"
VTILE = ("15", 16515, 11970)  # level, col, row of the stored tile of test_tms_service's ROADS


def _restricted_offering(api: httpx.Client, configuration: dict, endpoint: str) -> str:
    created = api.post(f"{BASE}/configurations", json=configuration)
    assert created.status_code == 201, created.text
    offering = api.post(f"{BASE}/configurations/{created.json()['_id']}/offerings",
                        json={"endpoint": endpoint_id(api, endpoint), "open": False})
    assert offering.status_code == 201, offering.text
    assert offering.json()["open"] is False
    return offering.json()["_id"]


def _api_key(api: httpx.Client, secret: str, offerings: list[str]) -> str:
    """A HASH key whose value is `secret`, granted `offerings`; its id."""
    key = api.post("/api/users/me/keys", json={"name": secret, "type": "HASH", "type_infos": {"hash": secret}})
    assert key.status_code == 201, key.text
    if offerings:
        granted = api.post(f"/api/users/me/keys/{key.json()['_id']}/accesses", json={"offerings": offerings})
        assert granted.status_code in (200, 201), granted.text
    return key.json()["_id"]


def _register_pyramid(data_dir: str, descriptor: Path, name: str) -> str:
    """`tileserver stored-data add`, as an operator registers a pyramid built elsewhere; the stored data id."""
    from tileserver.cli import main

    out = io.StringIO()
    previous = os.environ.get("TILESERVER_DATA_DIR")
    os.environ["TILESERVER_DATA_DIR"] = data_dir
    try:
        with contextlib.redirect_stdout(out):
            assert main(["stored-data", "add", str(descriptor), "--name", name, "--json"]) == 0
    finally:
        if previous is None:
            del os.environ["TILESERVER_DATA_DIR"]
        else:
            os.environ["TILESERVER_DATA_DIR"] = previous
    return str(json.loads(out.getvalue())["_id"])


@pytest.fixture(scope="module")
def vector_server(tmp_path_factory) -> Iterator[tuple[httpx.Client, dict[str, str | None], str]]:
    """An /api user's restricted WFS (also OGC API Features), WMS-vector and vector tile offerings; his
    right key, his revoked key, another user's key. Yields (anonymous client, keys, a feature id)."""
    tmp = tmp_path_factory.mktemp("vector-security")
    with warehouse_server(tmp) as (url, settings), httpx.Client(base_url=url, timeout=30) as http:
        api = api_client(url)
        stored = canton_base(api, tmp)
        pyramid = _register_pyramid(settings.data_dir, built_pyramids(tmp / "built")["ROADS"], "routes")
        offerings = [
            _restricted_offering(api, wfs_configuration(stored["_id"], FEATURES.split(":")[0]),
                                 "gpf-geoserver-wfs-private"),
            _restricted_offering(api, wmsv_configuration(stored["_id"], WMSV, [{"name": "canton"}]),
                                 "gpf-geoserver-wms-v-private"),
            _restricted_offering(api, {"type": "WMTS-TMS", "name": VTILES, "layer_name": VTILES, "type_infos": {
                "title": "Routes", "abstract": "Routes", "keywords": [],
                "used_data": [{"stored_data": pyramid, "bottom_level": "15", "top_level": "14"}]}},
                "gpf-rok4-server-wmts-tms"),
        ]
        _api_key(api, "right-vector-key", offerings)
        revoked = _api_key(api, "revoked-vector-key", offerings)
        assert api.delete(f"/api/users/me/keys/{revoked}").status_code == 204
        add_user(settings, OTHER_LOGIN, "another-pass", "Martin", datastores=())
        _api_key(api_client(url, OTHER_LOGIN, "another-pass"), "another-users-key", [])
        keys: dict[str, str | None] = {"none": None, "other": "another-users-key", "revoked": "revoked-vector-key",
                                       "right": "right-vector-key"}
        items = wait_for(lambda: (a := http.get(f"/ogcapi/collections/{FEATURES}/items",
                                                headers={"X-Api-Key": "right-vector-key"})).status_code == 200 and a)
        yield http, keys, str(items.json()["features"][0]["id"])


def _vector_routes(feature_id: str) -> dict[str, tuple[str, str]]:
    wfs = f"/wfs?SERVICE=WFS&VERSION=2.0.0&TYPENAMES={FEATURES}"
    bbox = ",".join(repr(v) for v in MAP_BBOX)
    wms = f"/wms?SERVICE=WMS&VERSION=1.3.0&LAYERS={WMSV}&STYLES=&CRS=EPSG:2154&BBOX={bbox}&WIDTH=100&HEIGHT=30"
    level, col, row = VTILE
    return {
        "wfs GetFeature": (f"{wfs}&REQUEST=GetFeature&OUTPUTFORMAT=application/json", "json"),
        "wfs GetFeature GML": (f"{wfs}&REQUEST=GetFeature", "xml"),
        "wfs DescribeFeatureType": (f"{wfs}&REQUEST=DescribeFeatureType", "xml"),
        "ogcapi features collection": (f"/ogcapi/collections/{FEATURES}", "json"),
        "ogcapi items": (f"/ogcapi/collections/{FEATURES}/items", "json"),
        "ogcapi item": (f"/ogcapi/collections/{FEATURES}/items/{feature_id}", "json"),
        "wms-vector GetMap": (f"{wms}&REQUEST=GetMap&FORMAT=image/png", "image"),
        "wms-vector GetFeatureInfo": (f"{wms}&REQUEST=GetFeatureInfo&QUERY_LAYERS={WMSV}&INFO_FORMAT=application/json"
                                      "&I=5&J=5", "json"),
        "wms-vector GetLegendGraphic": (f"/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetLegendGraphic&LAYER={WMSV}"
                                        "&FORMAT=image/png", "image"),
        "tms vector TileMap": (f"/tms/1.0.0/{VTILES}", "xml"),
        "tms vector tile": (f"/tms/1.0.0/{VTILES}/{level}/{col}/{row}.pbf", "protobuf"),
        "tms vector TileJSON": (f"/tms/1.0.0/{VTILES}/metadata.json", "json"),
        "ogcapi vector tilesets": (f"/ogcapi/collections/{VTILES}/tiles", "json"),
        "ogcapi vector tile": (f"/ogcapi/collections/{VTILES}/tiles/PM/{level}/{row}/{col}", "protobuf"),
    }


VECTOR_LISTINGS = {
    "wfs GetCapabilities": ("/wfs?SERVICE=WFS&REQUEST=GetCapabilities", FEATURES.encode()),
    "ogcapi collections (features)": ("/ogcapi/collections", FEATURES.encode()),
    "ogcapi collections (vector tiles)": ("/ogcapi/collections", VTILES.encode()),
    "tms root": ("/tms/1.0.0", VTILES.encode()),
    "wms GetCapabilities": ("/wms?SERVICE=WMS&REQUEST=GetCapabilities", WMSV.encode()),
}


@pytest.mark.parametrize("who", ["none", "other", "revoked", "right"])
def test_every_route_of_a_restricted_vector_offering(vector_server, who):
    http, keys, feature_id = vector_server
    assert not _failures(http, keys[who], who == "right", _vector_routes(feature_id), VECTOR_LISTINGS)


def test_the_key_in_the_url_makes_answers_private(server):
    http, keys, row, col, _ = server
    answer = http.get(f"/tms/1.0.0/SECRET/10/{col}/{row}.png", params={"apikey": keys["right"]})
    assert answer.status_code == 200 and _private(answer)
    styled = http.get(f"/ogcapi/collections/SECRET/styles/normal/map/tiles/PM/10/{row}/{col}",
                      params={"apikey": keys["right"]})
    assert styled.status_code == 200 and _private(styled)


def test_rendered_answers_of_a_restricted_layer_are_private(tmp_path):
    """A style that changes pixels renders (not the stored tile): still private, whatever the path."""
    import json

    from tileserver.publication.store import PublicationStore

    settings = make_settings(tmp_path)
    Path(settings.data_dir).mkdir(parents=True)
    store = PublicationStore(settings.resolved_store_url)
    store.put_style("hypso", json.loads((Path(__file__).parent / "data" / "styles" / "hypso.json").read_text()))
    store.close()
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=30) as http:
        _publish(http, "DEM", layer_descriptor("RGEALTI", restricted=True, styles=["normal", "hypso"]))
        _, key = _key(http, ["DEM"])
        tile = "LAMB93_1M_MNT/8/22363/2242"
        for path in (f"/ogcapi/collections/DEM/styles/hypso/map/tiles/{tile}?f=png",
                     f"/ogcapi/styles/hypso/map/tiles/{tile}?collections=DEM",
                     f"/wmts/1.0.0/DEM/hypso/{tile}.png"):
            answer = http.get(path, headers={"X-Api-Key": key})
            assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", (path, answer.text)
            assert _private(answer), (path, answer.headers)
            refused = http.get(path)
            assert refused.status_code in (400, 404) and refused.headers["cache-control"] == "no-store", path


def test_documents_have_a_cache_policy_and_ignore_forged_hosts(server):
    http, *_ = server
    for path in ("/tms", "/tms/1.0.0/OPEN", "/tms/1.0.0/OPEN/metadata.json", "/ogcapi", "/ogcapi/conformance",
                 "/wmts?SERVICE=WMTS&REQUEST=GetCapabilities", "/wms?SERVICE=WMS&REQUEST=GetCapabilities"):
        answer = http.get(path)
        assert answer.status_code == 200, path
        assert "no-cache" in answer.headers["cache-control"] and "Host" in answer.headers["vary"], path


def test_forwarded_host_only_from_trusted_proxies(tmp_path):
    """The test client connects from loopback: trusted by default, not when the setting names another proxy."""
    forged = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}
    for allowed, trusted in (("127.0.0.1", True), ("10.0.0.1", False)):
        settings = make_settings(tmp_path / allowed, forwarded_allow_ips=allowed)
        with live_server(settings) as url, httpx.Client(base_url=url, timeout=30) as http:
            _publish(http, "OPEN", layer_descriptor("SCAN1000"))
            for path in ("/tms/1.0.0", "/tms/1.0.0/OPEN", "/ogcapi/collections",
                         "/wmts?SERVICE=WMTS&REQUEST=GetCapabilities"):
                body = http.get(path, headers=forged).text
                assert ("https://evil.example" in body) == trusted, (allowed, path)


def _switched_off(http: httpx.Client, paths: dict[str, tuple[str, bytes]], headers: dict[str, str]) -> None:
    """`PUT /admin/off`: every path answers the protocol's 503 (Retry-After, never stored); `on`: 200 again."""
    assert http.put("/admin/off", headers=ADMIN).status_code == 204
    try:
        for name, (path, marker) in paths.items():
            answer = http.get(path, headers=headers)
            assert answer.status_code == 503 and marker in answer.content, (name, answer.status_code, answer.text[:200])
            assert answer.headers["retry-after"] == "60" and answer.headers["cache-control"] == "no-store", name
    finally:
        assert http.put("/admin/on", headers=ADMIN).status_code == 204
    for name, (path, _) in paths.items():
        assert http.get(path, headers=headers).status_code == 200, name


def test_admin_off_covers_every_service_and_the_fast_path(server):
    http, keys, row, col, bounds = server
    open_tile = f"/wmts/1.0.0/OPEN/normal/PM/10/{row}/{col}.png"
    assert http.get(open_tile).status_code == 200  # the fast path has settled this route
    _switched_off(http, {
        "fast path REST": (open_tile, b"ExceptionReport"),
        "fast path KVP": ("/wmts?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=OPEN&STYLE=normal&TILEMATRIXSET=PM"
                          f"&TILEMATRIX=10&TILEROW={row}&TILECOL={col}&FORMAT=image/png", b"ExceptionReport"),
        "tms": (f"/tms/1.0.0/OPEN/10/{col}/{row}.png", b"TileMapServerError"),
        "tms document": ("/tms/1.0.0", b"TileMapServerError"),
        "xyz": (f"/xyz/OPEN/10/{col}/{row}.png", b"TileMapServerError"),
        "ogcapi": (f"/ogcapi/collections/OPEN/map/tiles/PM/10/{row}/{col}", b"ServiceDisabled"),
        "ogcapi landing": ("/ogcapi", b"ServiceDisabled"),
        "wms": ("/wms?SERVICE=WMS&REQUEST=GetCapabilities", b"ServiceExceptionReport"),
    }, {})


def test_admin_off_covers_features_and_vector_services(vector_server):
    """WFS, OGC API Features, WMS-vector and vector tiles are switched off with the rest (here with the
    right key: the switch is decided before access control)."""
    http, keys, feature_id = vector_server
    routes = _vector_routes(feature_id)
    wfs = ("/wfs?SERVICE=WFS&REQUEST=GetCapabilities", b"ExceptionReport")
    paths = {name: (routes[name][0], marker) for name, marker in (
        ("wfs GetFeature", b"ExceptionReport"), ("wfs DescribeFeatureType", b"ExceptionReport"),
        ("ogcapi items", b"ServiceDisabled"), ("ogcapi item", b"ServiceDisabled"),
        ("wms-vector GetMap", b"ServiceExceptionReport"), ("tms vector tile", b"TileMapServerError"),
        ("tms vector TileJSON", b"TileMapServerError"), ("ogcapi vector tile", b"ServiceDisabled"))}
    _switched_off(http, {**paths, "wfs GetCapabilities": wfs}, {"X-Api-Key": str(keys["right"])})


def test_feature_info_and_legends_carry_the_policy_s_cache_headers(server, vector_server):
    """GetFeatureInfo (WMS, WMTS, WMS-vector) and GetLegendGraphic: the server's explicit Cache-Control for
    an open layer; `private` and Vary on the key header for a restricted one."""
    http, keys, row, col, bounds = server
    bbox = ",".join(str(v) for v in bounds)

    def asked(layer: str) -> dict[str, str]:
        wms = f"/wms?SERVICE=WMS&VERSION=1.3.0&LAYERS={layer}&STYLES=&CRS=CRS:84&BBOX={bbox}&WIDTH=64&HEIGHT=64"
        wmts = (f"/wmts?SERVICE=WMTS&VERSION=1.0.0&LAYER={layer}&STYLE=normal&FORMAT=image/png&TILEMATRIXSET=PM"
                f"&TILEMATRIX=10&TILEROW={row}&TILECOL={col}")
        return {
            "wms GetFeatureInfo": f"{wms}&REQUEST=GetFeatureInfo&QUERY_LAYERS={layer}&INFO_FORMAT=text/plain&I=5&J=5",
            "wms GetFeatureInfo json": f"{wms}&REQUEST=GetFeatureInfo&QUERY_LAYERS={layer}"
                                       "&INFO_FORMAT=application/json&I=5&J=5",
            "wmts GetFeatureInfo": f"{wmts}&REQUEST=GetFeatureInfo&INFOFORMAT=text/plain&I=1&J=1",
            "wmts REST FeatureInfo": f"/wmts/1.0.0/{layer}/normal/PM/10/{row}/{col}/1/1.txt",
            "wms GetLegendGraphic": f"/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetLegendGraphic&LAYER={layer}"
                                    "&FORMAT=image/png",
        }

    failures = []
    for name, path in asked("OPEN").items():
        answer = http.get(path)
        if answer.status_code != 200 or answer.headers.get("cache-control") != "public, max-age=3600":
            failures.append(("open " + name, answer.status_code, answer.headers.get("cache-control"), answer.text[:120]))
    restricted = list(asked("SECRET").items())
    restricted_http, vector_keys, feature_id = vector_server
    vector = _vector_routes(feature_id)
    for name, path in restricted:
        answer = http.get(path, headers={"X-Api-Key": str(keys["right"])})
        if answer.status_code != 200 or not _private(answer) or "max-age=3600" not in answer.headers["cache-control"]:
            failures.append((name, answer.status_code, answer.headers.get("cache-control"), answer.headers.get("vary")))
    for name in ("wms-vector GetFeatureInfo", "wms-vector GetLegendGraphic"):
        answer = restricted_http.get(vector[name][0], headers={"X-Api-Key": str(vector_keys["right"])})
        if answer.status_code != 200 or not _private(answer):
            failures.append((name, answer.status_code, answer.headers.get("cache-control"), answer.headers.get("vary")))
    assert not failures, failures


def test_too_many_parameters_are_the_protocols_400(server):
    http, *_ = server
    query = "&".join(f"p{i}=1" for i in range(250))
    for path, marker in (("/tms/1.0.0", b"TileMapServerError"), ("/ogcapi/collections", b"problem"),
                         ("/xyz/OPEN/10/1/1.png", b"TileMapServerError"), ("/wmts", b"ExceptionReport"),
                         ("/wms", b"ServiceExceptionReport")):
        answer = http.get(f"{path}?{query}")
        assert answer.status_code == 400, (path, answer.status_code, answer.text[:200])
        assert marker in answer.content or marker.decode() in answer.headers["content-type"], path


def test_javascript_metadata_urls_are_not_links(server):
    http, *_ = server
    page = http.get("/ogcapi/collections/OPEN", params={"f": "html"})
    assert page.status_code == 200 and "javascript:alert(1)" in page.text
    assert 'href="javascript:' not in page.text


def test_garbage_behind_a_valid_index_is_a_502(tmp_path):
    """A slab whose index is valid but whose tile bytes are not PNG: 502 from every path, never cached."""
    root = tmp_path / "p"
    shutil.copytree(PYRAMIDS / "SCAN1000", root / "SCAN1000")
    shutil.copy(PYRAMIDS / "SCAN1000.json", root / "SCAN1000.json")
    for slab in (root / "SCAN1000" / "DATA").rglob("*.tif"):
        data = bytearray(slab.read_bytes())
        offsets = _tile_offsets(bytes(data))
        for offset in offsets:
            data[offset:offset + 8] = b"GARBAGE!"
        slab.write_bytes(bytes(data))
    with live_server(make_settings(tmp_path)) as url, httpx.Client(base_url=url, timeout=30) as http:
        _publish(http, "BAD", layer_descriptor("SCAN1000", root=f"file://{root}"))
        tilemap = ET.fromstring(http.get("/tms/1.0.0/BAD").content)
        level = next(t for t in tilemap.iter("TileSet") if t.get("order") == "10")
        row, col = int(level.get("minrow")), int(level.get("mincol"))
        for path in (f"/wmts/1.0.0/BAD/normal/PM/10/{row}/{col}.png", f"/tms/1.0.0/BAD/10/{col}/{row}.png",
                     f"/xyz/BAD/10/{col}/{row}.png", f"/ogcapi/collections/BAD/map/tiles/PM/10/{row}/{col}"):
            for _ in range(2):  # the second time, the fast path has settled the route
                answer = http.get(path)
                assert answer.status_code == 502, (path, answer.status_code)
                assert not answer.headers["content-type"].startswith("image/")
                assert answer.headers["cache-control"] == "no-store"


def _tile_offsets(slab: bytes) -> list[int]:
    """Tile offsets of a ROK4 slab (TIFF tag 324 TileOffsets, little-endian classic TIFF)."""
    import struct

    first_ifd = struct.unpack_from("<I", slab, 4)[0]
    (count,) = struct.unpack_from("<H", slab, first_ifd)
    for i in range(count):
        tag, kind, n, value = struct.unpack_from("<HHII", slab, first_ifd + 2 + 12 * i)
        if tag == 324:
            if n == 1:
                return [value]
            return list(struct.unpack_from(f"<{n}I", slab, value))
    raise AssertionError("no TileOffsets")
