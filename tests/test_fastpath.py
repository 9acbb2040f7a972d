"""The WMTS REST fast path answers exactly what the routed path answers, and hands everything else on."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from apputil import app_client, free_port, layer_descriptor, make_settings, running
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tileserver.app import create_app
from tileserver.publication.model import parse_layer
from tileserver.publication.store import PublicationStore
from tileserver.server_cli import FastTileProtocol, uvicorn_options
from tileserver.settings import Settings


async def test_fast_path_matches_the_routed_answer(tmp_path):
    async with app_client(make_settings(tmp_path)) as client:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("S", layer_descriptor("SCAN1000")))
        runtime.store.add_layer(parse_layer("R", layer_descriptor("SCAN1000", restricted=True)))
        await runtime.refresh()
        lim = runtime.catalog.layers["S"].limits["10"]
        rest = f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png"
        kvp = ("/wmts?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=S&STYLE=normal&TILEMATRIXSET=PM"
               f"&TILEMATRIX=10&TILEROW={lim.min_row}&TILECOL={lim.min_col}&FORMAT=image/png")
        fast, routed = await client.get(rest), await client.get(kvp)
        assert fast.status_code == routed.status_code == 200
        assert fast.content == routed.content and len(fast.content) > 0
        for header in ("content-type", "cache-control", "etag", "access-control-allow-origin", "content-length"):
            assert fast.headers[header] == routed.headers[header], header
        # a nodata tile inside the limits, the same both ways
        empty = f"/wmts/1.0.0/S/normal/PM/10/{lim.max_row}/{lim.max_col}.png"
        assert (await client.get(empty)).status_code == 200
        # everything else goes to the route: errors, restricted layers, conversions
        out = await client.get(f"/wmts/1.0.0/S/normal/PM/10/{lim.max_row + 5}/{lim.min_col}.png")
        assert out.status_code == 400 and b"TileOutOfRange" in out.content
        assert (await client.get(f"/wmts/1.0.0/R/normal/PM/10/{lim.min_row}/{lim.min_col}.png")).status_code == 400
        jpeg = await client.get(f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.jpeg")
        assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
        head = await client.head(rest)
        assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == fast.headers["etag"]


def _kvp(layer: str, row: int, col: int, service: str = "WMTS", fmt: str = "image%2Fpng") -> str:
    return (f"/wmts?SERVICE={service}&REQUEST=GetTile&VERSION=1.0.0&LAYER={layer}&STYLE=normal&TILEMATRIXSET=PM"
            f"&TILEMATRIX=10&TILEROW={row}&TILECOL={col}&FORMAT={fmt}")


async def test_kvp_and_conditional_requests_match_the_route(tmp_path):
    async with app_client(make_settings(tmp_path)) as client:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("S", layer_descriptor("SCAN1000")))
        await runtime.refresh()
        lim = runtime.catalog.layers["S"].limits["10"]
        fast = await client.get(_kvp("S", lim.min_row, lim.min_col))
        # SERVICE=wmts (case-insensitive for the route) is not the plain form: it takes the full path
        routed = await client.get(_kvp("S", lim.min_row, lim.min_col, service="wmts"))
        rest = await client.get(f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png")
        assert fast.status_code == routed.status_code == rest.status_code == 200
        assert fast.content == routed.content == rest.content
        for header in ("content-type", "cache-control", "etag", "access-control-allow-origin", "content-length"):
            assert fast.headers[header] == routed.headers[header] == rest.headers[header], header
        assert fast.headers["x-request-id"] != routed.headers["x-request-id"]
        # If-None-Match: 304 without body or Content-Type, the same from both paths
        etag = fast.headers["etag"]
        for url in (_kvp("S", lim.min_row, lim.min_col), _kvp("S", lim.min_row, lim.min_col, service="wmts"),
                    f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png"):
            answer = await client.get(url, headers={"If-None-Match": f'"x", {etag}'})
            assert answer.status_code == 304 and answer.content == b"", url
            assert "content-type" not in answer.headers and answer.headers["etag"] == etag
        # a tile elsewhere does not match that validator
        other = await client.get(_kvp("S", lim.min_row, lim.min_col + 1), headers={"If-None-Match": etag})
        assert other.status_code == 200 and other.headers["etag"] != etag
        # errors keep the route's wording: out of range, missing parameter, bad format, repeated parameter
        out = await client.get(_kvp("S", lim.max_row + 5, lim.min_col))
        assert out.status_code == 400 and b"TileOutOfRange" in out.content
        missing = await client.get(_kvp("S", lim.min_row, lim.min_col).replace("&TILECOL=", "&X="))
        assert missing.status_code == 400 and b"MissingParameterValue" in missing.content
        jpeg = await client.get(_kvp("S", lim.min_row, lim.min_col, fmt="image/jpeg"))
        assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
        twice = await client.get(_kvp("S", lim.min_row, lim.min_col) + "&LAYER=S")
        assert twice.status_code in (200, 400)  # the route decides; never a 500


async def test_a_new_catalog_is_seen_by_the_next_tile(tmp_path):
    async with app_client(make_settings(tmp_path)) as client:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("S", layer_descriptor("SCAN1000")))
        await runtime.refresh()
        lim = runtime.catalog.layers["S"].limits["10"]
        url = f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png"
        first = await client.get(url)
        assert first.status_code == 200
        runtime.store.put_layer(parse_layer("S", layer_descriptor("SCAN1000", cache_control="max-age=7")))
        await runtime.refresh()
        assert (await client.get(url)).headers["cache-control"] == "max-age=7"
        runtime.store.set_restricted("S", True)
        await runtime.refresh()
        assert (await client.get(url)).status_code == 400  # restricted: only the route answers, with a key
        runtime.store.remove_layer("S")
        await runtime.refresh()
        gone = await client.get(url)
        assert gone.status_code == 400 and b"unknown layer" in gone.content


# --------------------------------------------------------------------------- fast path on vs off

_SEGMENT = st.sampled_from(["S", "R", "X", "normal", "PM", "10", "9", "11", "s", ""])
_EXT = st.sampled_from(["png", "jpeg", "tif", "PNG", "webp", "png.", ""])


@st.composite
def _tile_request(draw, lim) -> tuple[str, str, dict[str, str]]:
    """A WMTS tile request near the layer's limits: REST or KVP, valid or not, HEAD or GET,
    with or without a validator."""
    near = draw(st.integers(0, 4)) == 0  # mostly inside the limits, sometimes just outside
    row = draw(st.integers(lim.min_row - 2 * near, lim.max_row + 2 * near))
    col = draw(st.integers(lim.min_col - 2 * near, lim.max_col + 2 * near))
    layer = draw(st.sampled_from(["S", "S", "S", "R", "X"]))
    style = draw(st.sampled_from(["normal", "normal", "other"]))
    tms = draw(st.sampled_from(["PM", "PM", "PM", "WGS84"]))
    z = draw(st.sampled_from(["10", "10", "9", "21", "x"]))
    if draw(st.booleans()):
        ext = draw(_EXT)
        path = f"/wmts/1.0.0/{layer}/{style}/{tms}/{z}/{row}/{col}" + (f".{ext}" if ext else "")
        if draw(st.integers(0, 9)) == 0:
            path = path.replace(f"/{layer}/", f"/{draw(_SEGMENT)}/")
        if draw(st.integers(0, 9)) == 0:
            path += "?x=1"
    else:
        fmt = draw(st.sampled_from(["image%2Fpng", "image/png", "image%2Fjpeg", "image%2Fwebp"]))
        service = draw(st.sampled_from(["WMTS", "WMTS", "wmts"]))
        pairs = [f"SERVICE={service}", "REQUEST=GetTile", "VERSION=1.0.0", f"LAYER={layer}", f"STYLE={style}",
                 f"TILEMATRIXSET={tms}", f"TILEMATRIX={z}", f"TILEROW={row}", f"TILECOL={col}", f"FORMAT={fmt}"]
        drop = draw(st.integers(-1, len(pairs) - 1))
        if drop >= 2 and draw(st.integers(0, 4)) == 0:
            del pairs[drop]
        if draw(st.integers(0, 19)) == 0:
            pairs.append(f"LAYER={layer}")
        path = "/wmts?" + "&".join(draw(st.permutations(pairs)))
    method = draw(st.sampled_from(["GET", "GET", "HEAD"]))
    headers = {}
    if draw(st.booleans()):
        headers["If-None-Match"] = draw(st.sampled_from(["ETAG", '"nope"', '"x", ETAG', "*"]))
    if draw(st.integers(0, 4)) == 0:
        headers["Accept-Encoding"] = draw(st.sampled_from(["gzip", "identity", "br, gzip"]))
    return method, path, headers


def _comparable(answer) -> tuple:
    headers = sorted((k.lower(), v) for k, v in answer.headers.multi_items() if k.lower() != "x-request-id")
    return answer.status_code, answer.content, headers


def test_fast_path_on_and_off_answer_the_same(tmp_path):
    """Status, body and every header (but the request id) with the fast path on and off, over the
    same application: the fast path is one decision with the routed path, never another answer."""
    loop = asyncio.new_event_loop()
    context = app_client(make_settings(tmp_path))
    client = loop.run_until_complete(context.__aenter__())
    try:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("S", layer_descriptor("SCAN1000")))
        runtime.store.add_layer(parse_layer("R", layer_descriptor("SCAN1000", restricted=True)))
        loop.run_until_complete(runtime.refresh())
        lim = runtime.catalog.layers["S"].limits["10"]
        on = runtime.settings
        off = replace(on, fast_tiles=False)
        etag = loop.run_until_complete(
            client.get(f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png")).headers["etag"]
        seen = {"fast": 0}

        @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # the same examples every run: no flaky count
        @given(request=_tile_request(lim))
        def check(request) -> None:
            method, path, headers = request
            headers = {k: v.replace("ETAG", etag) for k, v in headers.items()}
            runtime.settings = off
            routed = loop.run_until_complete(client.request(method, path, headers=headers))
            runtime.settings = on
            fast = loop.run_until_complete(client.request(method, path, headers=headers))
            assert _comparable(fast) == _comparable(routed), (method, path, headers)
            seen["fast"] += fast.status_code in (200, 304)

        check()
        assert seen["fast"] >= 5  # the generator does reach the fast path's own answers (7 of the fixed examples)
    finally:
        runtime.settings = on
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()


# --------------------------------------------------------------------------- over real HTTP

# The fast path of `tileserver serve` answers below ASGI (server_cli.FastTileProtocol): these tests run
# the app under uvicorn with serve's own options, over sockets, once with fast_tiles on and once off.


@contextlib.contextmanager
def serving(settings: Settings, keep_alive: float = 5.0) -> Iterator[tuple[str, int]]:
    """The app under uvicorn with `tileserver serve`'s options on a loopback port; yields the address."""
    port = free_port()
    options = {k: v for k, v in uvicorn_options(settings).items() if k not in ("host", "port", "workers")}
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_keep_alive=keep_alive, **options)
    with running(uvicorn.Server(config)):
        yield "127.0.0.1", port


def _scan_layer(tmp_path: Path) -> Settings:
    """Settings whose store holds one open layer S (SCAN1000)."""
    settings = make_settings(tmp_path)
    Path(settings.data_dir).mkdir(parents=True)
    store = PublicationStore(settings.resolved_store_url)
    store.add_layer(parse_layer("S", layer_descriptor("SCAN1000")))
    store.close()
    return settings


class Raw:
    """One HTTP/1.x connection spoken by hand: requests as bytes, answers parsed as they come."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.sock: socket.socket | None = None
        self.buffer = b""

    def open(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=10)
            self.buffer = b""
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, data: bytes) -> None:
        self.open().sendall(data)

    def _more(self) -> bool:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def answer(self, method: str) -> tuple[int, list[tuple[str, str]], bytes, bool]:
        """Status, headers (as sent), body, and whether the server closed the connection after it."""
        while b"\r\n\r\n" not in self.buffer:
            assert self._more(), "connection closed before an answer"
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = [(name, value.strip()) for name, _, value in (line.partition(":") for line in lines[1:])]
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), None)
        if method == "HEAD" or status in (204, 304):
            length = 0
        if length is None:
            assert all(k.lower() != "transfer-encoding" for k, _ in headers), "chunked tile answers are not expected"
            while self._more():
                pass
            length = len(self.buffer)
        while len(self.buffer) < length:
            assert self._more(), "connection closed inside a body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        closes = any(k.lower() == "connection" and "close" in v.lower() for k, v in headers)
        if closes:
            self.sock.settimeout(5)  # type: ignore[union-attr]
            assert not self.buffer and not self._more(), "the server must close after Connection: close"
            self.close()
        return status, headers, body, closes

    def exchange(self, request: bytes, method: str = "GET") -> tuple[int, list[tuple[str, str]], bytes, bool]:
        try:
            self.send(request)
            return self.answer(method)
        except (ConnectionError, AssertionError) as exc:  # a keep-alive connection the server just closed
            if self.buffer or "inside a body" in str(exc):
                raise
            self.close()
            self.send(request)
            return self.answer(method)


def request_bytes(method: str, path: str, headers: dict[str, str], version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def comparable(answer: tuple[int, list[tuple[str, str]], bytes, bool]) -> tuple:
    """Every header but Date and the request id, names as spelt: the fast path is byte for byte the route."""
    status, headers, body, closes = answer
    kept = sorted((k, v) for k, v in headers if k.lower() not in ("date", "x-request-id"))
    return status, kept, body, closes


@pytest.fixture(scope="module")
def on_and_off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[tuple[str, int], tuple[str, int], str]]:
    """Two servers over one store (an open layer S, a restricted R and a key for it): fast path on, off."""
    tmp = tmp_path_factory.mktemp("fast")
    settings = make_settings(tmp)
    Path(settings.data_dir).mkdir(parents=True)
    store = PublicationStore(settings.resolved_store_url)
    store.add_layer(parse_layer("S", layer_descriptor("SCAN1000")))
    store.add_layer(parse_layer("R", layer_descriptor("SCAN1000", restricted=True)))
    _, key = store.create_key("k", ["R"])
    store.close()
    with serving(settings) as on, serving(replace(settings, fast_tiles=False)) as off:
        yield on, off, key


def _limits(address: tuple[str, int]) -> Any:
    raw = Raw(address)
    status, _, body, _ = raw.exchange(request_bytes("GET", "/wmts?SERVICE=WMTS&REQUEST=GetCapabilities", {}))
    raw.close()
    assert status == 200
    found = re.search(rb"<TileMatrix>10</TileMatrix>\s*<MinTileRow>(\d+)</MinTileRow>\s*<MaxTileRow>(\d+)"
                      rb"</MaxTileRow>\s*<MinTileCol>(\d+)</MinTileCol>\s*<MaxTileCol>(\d+)</MaxTileCol>", body)
    assert found is not None
    min_row, max_row, min_col, max_col = map(int, found.groups())
    return SimpleNamespace(min_row=min_row, max_row=max_row, min_col=min_col, max_col=max_col)


@st.composite
def _plain_tile_request(draw, lim) -> tuple[str, str, dict[str, str]]:
    """A tile inside the limits of S (which the fast path takes) or R (restricted: the route's), REST
    or KVP, GET or HEAD."""
    row, col = draw(st.integers(lim.min_row, lim.max_row)), draw(st.integers(lim.min_col, lim.max_col))
    layer = draw(st.sampled_from(["S", "S", "R"]))
    if draw(st.booleans()):
        path = f"/wmts/1.0.0/{layer}/normal/PM/10/{row}/{col}.png"
    else:
        path = "/wmts?" + "&".join(draw(st.permutations(
            ["SERVICE=WMTS", "REQUEST=GetTile", "VERSION=1.0.0", f"LAYER={layer}", "STYLE=normal", "TILEMATRIXSET=PM",
             "TILEMATRIX=10", f"TILEROW={row}", f"TILECOL={col}", "FORMAT=image%2Fpng"])))
    headers = {"If-None-Match": draw(st.sampled_from(["ETAG", "*", '"x"']))} if draw(st.booleans()) else {}
    return draw(st.sampled_from(["GET", "GET", "HEAD"])), path, headers


def test_fast_path_on_and_off_answer_the_same_over_http(on_and_off) -> None:
    """Status, body, every header (but Date and the request id) and keep-alive, over sockets, between
    a server answering tiles below ASGI and one taking every request through the routed path."""
    on, off, key = on_and_off
    lim = _limits(on)
    fast, routed = Raw(on), Raw(off)
    first = f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png"
    etag = dict(fast.exchange(request_bytes("GET", first, {}))[1])["ETag"]
    before = FastTileProtocol.answered
    seen: dict[tuple[int, bool], bool] = {}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=st.one_of(_plain_tile_request(lim), _tile_request(lim)), version=st.sampled_from(["1.1"] * 8 + ["1.0"]),
           close=st.sampled_from([False] * 8 + [True]), keyed=st.sampled_from([None] * 7 + ["header", "query"] * 2),
           body=st.sampled_from([b""] * 12 + [b"abc"]))
    def check(request, version, close, keyed, body) -> None:
        method, path, headers = request
        headers = {k: v.replace("ETAG", etag) for k, v in headers.items()}
        if close:
            headers["Connection"] = "close"
        if keyed == "header":
            headers["X-Api-Key"] = key
        elif keyed == "query":
            path += ("&" if "?" in path else "?") + f"key={key}"
        if body:  # a GET with a body: the route ignores it, the fast path leaves such requests to it
            headers["Content-Length"] = str(len(body))
        data = request_bytes(method, path, headers, version) + body
        routed_answer, fast_answer = routed.exchange(data, method), fast.exchange(data, method)
        assert comparable(fast_answer) == comparable(routed_answer), (method, path, headers, version)
        restricted = "/R/" in path or "LAYER=R&" in path or path.endswith("LAYER=R")
        seen[(fast_answer[0], restricted and keyed is not None)] = True
        if version == "1.0":
            assert fast_answer[3] and fast.sock is None  # HTTP/1.0: closed after the answer

    check()
    fast.close()
    routed.close()
    # the drawn requests did reach the answers given below ASGI (a tile read twice is in the page cache)
    assert FastTileProtocol.answered - before >= 20
    # tiles, validators, errors and a restricted layer's tiles with its key were all compared
    assert {(200, False), (304, False), (400, False), (200, True)} <= seen.keys(), seen


def pipelined_as_alone(address, methods: list[str], paths: list[str], counter: str) -> tuple[list, int]:
    """The answers of requests sent one by one, and the same requests pipelined in one write, must be
    equal (asserted); returns the pipelined answers and how much FastTileProtocol's `counter` grew."""
    alone = []
    for method, path in zip(methods, paths, strict=True):
        raw = Raw(address)
        alone.append(comparable(raw.exchange(request_bytes(method, path, {}), method)))
        raw.close()
    raw = Raw(address)
    before = getattr(FastTileProtocol, counter)
    raw.send(b"".join(request_bytes(m, p, {}) for m, p in zip(methods, paths, strict=True)))
    together = [comparable(raw.answer(m)) for m in methods]
    raw.close()
    assert together == alone
    return together, getattr(FastTileProtocol, counter) - before


def test_pipelined_requests_keep_their_order(on_and_off) -> None:
    """Tiles answered at once and requests through the ASGI cycle, sent in one write: answers in order."""
    on, off, _ = on_and_off
    lim = _limits(on)
    inside = [(row, col) for row in range(lim.min_row, lim.max_row + 1) for col in range(lim.min_col, lim.max_col + 1)]
    tiles = [f"/wmts/1.0.0/S/normal/PM/10/{row}/{col}.png" for row, col in (inside * 6)[:6]]
    slow = ["/wmts?SERVICE=WMTS&REQUEST=GetCapabilities", "/wmts/1.0.0/X/normal/PM/10/0/0.png",
            "/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetMap&LAYERS=S&STYLES=&CRS=EPSG:3857"
            "&BBOX=-20000,5000000,600000,5600000&WIDTH=64&HEIGHT=64&FORMAT=image/png"]
    paths = [tiles[0], tiles[1], slow[0], tiles[2], slow[2], tiles[3], tiles[4], slow[1], tiles[5], tiles[0]]
    methods = ["GET", "HEAD", "GET", "GET", "GET", "GET", "GET", "GET", "HEAD", "GET"]
    for address in (on, on, off):  # twice on: the second time every tile is page-cached and indexed
        together, fast = pipelined_as_alone(address, methods, paths, "answered")
        # the two tiles before the first routed request are answered at once; the rest wait their turn
        assert fast >= 2 if address == on else fast == 0
        assert [a[0] for a in together] == [200, 200, 200, 200, 200, 200, 200, 400, 200, 200]


def test_http10_connection_close_and_the_idle_timer(tmp_path) -> None:
    settings = _scan_layer(tmp_path)
    with serving(settings, keep_alive=1.0) as address:
        lim = _limits(address)
        tile = f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png"
        warm = Raw(address)
        warm.exchange(request_bytes("GET", tile, {}))
        warm.exchange(request_bytes("GET", tile, {}))
        warm.close()
        before = FastTileProtocol.answered
        for version, headers in (("1.0", {}), ("1.1", {"Connection": "close"}), ("1.0", {"Connection": "keep-alive"})):
            raw = Raw(address)
            status, answer_headers, body, closes = raw.exchange(request_bytes("GET", tile, headers, version))
            assert status == 200 and body and closes and raw.sock is None, (version, headers)
            assert ("Connection", "close") in answer_headers
        assert FastTileProtocol.answered - before == 3
        # keep-alive: the connection stays open for another request, then the idle timer closes it
        raw = Raw(address)
        assert raw.exchange(request_bytes("GET", tile, {}))[0] == 200
        assert raw.exchange(request_bytes("HEAD", tile, {}), "HEAD")[0] == 200
        assert FastTileProtocol.answered - before == 5
        sock = raw.open()
        started = time.monotonic()
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed by the server
        assert 0.5 < time.monotonic() - started < 4
        raw.close()


@settings(max_examples=60, deadline=None, database=None)
@given(body=st.binary(min_size=0, max_size=20000))
def test_the_etag_is_zlibs_crc32_whatever_computes_it(body) -> None:
    """etag_of takes zlib-ng's CRC-32 for large bodies: the same value as zlib's, so the ETag of a tile
    does not depend on its size class, on the build, or on the path that answered it."""
    import zlib

    from tileserver.http import etag_of

    for data in (body, body * 3):
        assert etag_of(data) == b'W/"%x-%08x"' % (len(data), zlib.crc32(data))


_NEAR = {"SERVICE": ["wmts", "WMS"], "REQUEST": ["gettile", "GetCapabilities"], "VERSION": ["1.0.1", ""],
         "LAYER": ["a%20b", "a+b", "x=y", ""], "STYLE": ["", "a+b", "a%2Fb"],
         "FORMAT": ["image/png", ".png", "", "image%2Fjpeg", "a+b", "image%2fpng"],
         "TILEMATRIXSET": ["", "x=y", "a%20b"], "TILEMATRIX": ["", "9"], "TILEROW": ["007", "", "-1"],
         "TILECOL": ["x", "1 "]}


@settings(max_examples=300, deadline=None, database=None)
@given(first=st.permutations(sorted(_NEAR)), spelling=st.sampled_from([str.upper, str.lower, str.title]),
       drop=st.integers(-10, 9), changes=st.dictionaries(st.sampled_from(sorted(_NEAR)), st.integers(0, 5), max_size=2))
@example(first=sorted(_NEAR), spelling=str.upper, drop=-1, changes={"SERVICE": 0})
@example(first=sorted(_NEAR), spelling=str.lower, drop=-1, changes={"VERSION": 0})
@example(first=sorted(_NEAR), spelling=str.title, drop=-1, changes={"LAYER": 0, "FORMAT": 5})
def test_a_learnt_parameter_order_reads_queries_as_the_loop_does(first, spelling, drop, changes) -> None:
    """The KVP parser learns the parameter order of a plain query and reads later queries of that
    order with one regular expression: whatever the values, the same answer as its loop."""
    from tileserver import fastpath

    names = [spelling(name) for name in first]
    plain = {"SERVICE": "WMTS", "REQUEST": "GetTile", "VERSION": "1.0.0", "LAYER": "S", "STYLE": "normal",
             "FORMAT": "image%2Fpng", "TILEMATRIXSET": "PM", "TILEMATRIX": "10", "TILEROW": "1", "TILECOL": "2"}
    learnt = "&".join(f"{name}={plain[name.upper()]}" for name in names).encode()
    near = {name: _NEAR[name][i % len(_NEAR[name])] for name, i in changes.items()}
    other = "&".join(f"{name}={near.get(name.upper(), plain[name.upper()])}" for i, name in enumerate(names)
                     if i != drop).encode()
    fastpath._kvp_shapes.clear()
    by_loop = fastpath._kvp_request(other)
    fastpath._kvp_shapes.clear()
    assert fastpath._kvp_request(learnt) is not None
    assert len(fastpath._kvp_shapes) == 1  # that order is learnt
    assert fastpath._kvp_request(other) == by_loop
    fastpath._kvp_shapes.clear()


def test_the_idle_timer_never_cuts_an_answer_in_progress(tmp_path) -> None:
    """A fast answer followed, on the same connection, by a request the ASGI cycle takes longer than
    the keep-alive timeout to answer: the idle time starts only once that answer is sent."""
    settings = _scan_layer(tmp_path)
    with serving(settings, keep_alive=0.05) as address:
        lim = _limits(address)
        tile = request_bytes("GET", f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png", {})
        big_map = request_bytes("GET", "/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetMap&LAYERS=S&STYLES="
                                "&CRS=EPSG:3857&BBOX=-20000,5000000,600000,5600000&WIDTH=2048&HEIGHT=2048"
                                "&FORMAT=image/png", {})
        raw = Raw(address)
        raw.exchange(tile)  # warms the slab: the next tiles are answered at once
        before = FastTileProtocol.answered
        started = time.monotonic()
        raw.send(tile + big_map)
        assert raw.answer("GET")[0] == 200
        status, _, body, _ = raw.answer("GET")
        assert status == 200 and body.startswith(b"\x89PNG")
        assert FastTileProtocol.answered - before == 1
        print(f"map answered after {time.monotonic() - started:.2f} s with a 0.05 s keep-alive timeout")
        sock = raw.open()  # and then the idle connection is closed
        sock.settimeout(5)
        assert sock.recv(1) == b""
        raw.close()
