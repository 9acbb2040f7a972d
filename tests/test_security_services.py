"""Every route of every service, over real HTTP, for a restricted layer: no key, another key, a revoked
key and the right key; status, body kind and cache headers. The service switch covers every service,
the fast path too; bad input gets the protocol's 4xx; garbage tiles are a 502."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from apputil import PYRAMIDS, layer_descriptor, live_server, make_settings

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
        _publish(http, "OPEN", layer_descriptor("SCAN1000", metadata=[{"url": "javascript:alert(1)", "type": "Other"}]))
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
    "wmts KVP GetCapabilities": "/wmts?SERVICE=WMTS&REQUEST=GetCapabilities",
    "wmts REST capabilities": "/wmts/1.0.0/WMTSCapabilities.xml",
    "tms root": "/tms/1.0.0",
    "ogcapi collections": "/ogcapi/collections",
    "wms GetCapabilities": "/wms?SERVICE=WMS&REQUEST=GetCapabilities",
}


def _exception_kind(answer: httpx.Response) -> bool:
    """The protocol's own error: an OWS/WMS exception report, TMS's error, or a JSON problem."""
    kind = answer.headers.get("content-type", "")
    return ("problem+json" in kind or b"ExceptionReport" in answer.content or b"TileMapServerError" in answer.content)


def _private(answer: httpx.Response) -> bool:
    cache = answer.headers.get("cache-control", "")
    return "private" in cache and "public" not in cache and "X-Api-Key" in answer.headers.get("vary", "")


@pytest.mark.parametrize("who", ["none", "other", "revoked", "right"])
def test_every_route_of_a_restricted_layer(server, who):
    http, keys, row, col, bounds = server
    headers = {"X-Api-Key": keys[who]} if keys[who] else {}
    failures = []
    for name, (path, kind) in _routes(row, col, bounds).items():
        answer = http.get(path, headers=headers)
        content_type = answer.headers.get("content-type", "")
        if who == "right":
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
    for name, path in LISTINGS.items():
        answer = http.get(path, headers=headers)
        listed = b"SECRET" in answer.content
        ok = answer.status_code == 200 and listed == (who == "right")
        ok = ok and (_private(answer) if who != "none" else "X-Api-Key" in answer.headers.get("vary", ""))
        if not ok:
            failures.append((name, answer.status_code, listed, answer.headers.get("cache-control"),
                             answer.headers.get("vary")))
    assert not failures, failures


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


def test_admin_off_covers_every_service_and_the_fast_path(server):
    http, keys, row, col, bounds = server
    open_tile = f"/wmts/1.0.0/OPEN/normal/PM/10/{row}/{col}.png"
    assert http.get(open_tile).status_code == 200  # the fast path has settled this route
    paths = {
        "fast path REST": (open_tile, b"ExceptionReport"),
        "fast path KVP": ("/wmts?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=OPEN&STYLE=normal&TILEMATRIXSET=PM"
                          f"&TILEMATRIX=10&TILEROW={row}&TILECOL={col}&FORMAT=image/png", b"ExceptionReport"),
        "tms": (f"/tms/1.0.0/OPEN/10/{col}/{row}.png", b"TileMapServerError"),
        "tms document": ("/tms/1.0.0", b"TileMapServerError"),
        "xyz": (f"/xyz/OPEN/10/{col}/{row}.png", b"TileMapServerError"),
        "ogcapi": (f"/ogcapi/collections/OPEN/map/tiles/PM/10/{row}/{col}", b"ServiceDisabled"),
        "ogcapi landing": ("/ogcapi", b"ServiceDisabled"),
        "wms": ("/wms?SERVICE=WMS&REQUEST=GetCapabilities", b"ServiceExceptionReport"),
    }
    assert http.put("/admin/off", headers=ADMIN).status_code == 204
    try:
        for name, (path, marker) in paths.items():
            answer = http.get(path)
            assert answer.status_code == 503 and marker in answer.content, name
            assert answer.headers["retry-after"] == "60" and answer.headers["cache-control"] == "no-store", name
    finally:
        assert http.put("/admin/on", headers=ADMIN).status_code == 204
    for name, (path, _) in paths.items():
        assert http.get(path).status_code == 200, name


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
