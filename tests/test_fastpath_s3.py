"""Tiles on S3 answered below ASGI: once the slab index is cached, `tileserver serve`'s protocol reads
the tile in its own task (server_cli.FastTileProtocol, fastpath.FastTiles.answer_tile) and answers
exactly what the routed path answers — tiles, validators, keep-alive, pipelining, and a failing S3
worded as the route words it, after the same single read. Over sockets, moto behind the fault proxy."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from apputil import free_port, layer_descriptor, running
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s3proxy import S3Proxy
from s3server import MotoS3Server
from test_fastpath import (
    Raw,
    _limits,
    _plain_tile_request,
    _tile_request,
    comparable,
    pipelined_as_alone,
    request_bytes,
)
from test_faults import proxied_settings, upload_scan1000

from tileserver.app import create_app
from tileserver.publication.model import parse_layer
from tileserver.publication.store import PublicationStore
from tileserver.server_cli import FastTileProtocol, uvicorn_options
from tileserver.settings import Settings


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[tuple[tuple[str, int], uvicorn.Server]]:
    """test_fastpath.serving, also yielding the uvicorn server (its connections and tasks)."""
    port = free_port()
    options = {k: v for k, v in uvicorn_options(settings).items() if k not in ("host", "port", "workers")}
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            **options)
    server = uvicorn.Server(config)
    with running(server):
        yield ("127.0.0.1", port), server


@contextlib.contextmanager
def asgi_only(settings: Settings) -> Iterator[tuple[str, int]]:
    """The app under uvicorn's own protocol: tiles only through the ASGI layer `FastTiles.__call__`."""
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    with running(uvicorn.Server(config)):
        yield "127.0.0.1", port


def _s3_layers(tmp: Path, s3_server: MotoS3Server, proxy: S3Proxy, **overrides: Any) -> tuple[Settings, str]:
    """Settings reading S3 through the proxy, whose store publishes SCAN1000 on S3 as the open layer S
    and the restricted R; the key of R."""
    url = upload_scan1000(s3_server, s3_server.create_bucket())
    # these tests are about each read: tiles are not kept in memory (test_hot_tiles.py keeps them)
    settings = proxied_settings(tmp, proxy, **{"object_tile_cache_bytes": 0, **overrides})
    Path(settings.data_dir).mkdir(parents=True)
    store = PublicationStore(settings.resolved_store_url)
    root = url.rpartition("/")[0]
    store.add_layer(parse_layer("S", layer_descriptor("SCAN1000", root=root)))
    store.add_layer(parse_layer("R", layer_descriptor("SCAN1000", root=root, restricted=True)))
    _, key = store.create_key("k", ["R"])
    store.close()
    return settings, key


@pytest.fixture(scope="module")
def s3_on_and_off(tmp_path_factory: pytest.TempPathFactory, s3_server: MotoS3Server,
                  _s3_proxy_running: S3Proxy) -> Iterator[tuple[tuple[str, int], tuple[str, int], str]]:
    settings, key = _s3_layers(tmp_path_factory.mktemp("fast-s3"), s3_server, _s3_proxy_running)
    with serving(settings) as (on, _), serving(replace(settings, fast_tiles=False)) as (off, _):
        yield on, off, key


def _data_tile(lim: Any) -> str:
    return f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png"  # a stored tile


def test_s3_tiles_on_and_off_answer_the_same(s3_on_and_off) -> None:
    """test_fastpath's comparison over HTTP, on S3: a tile read in the protocol's task is the routed
    answer byte for byte (every header but Date and the request id, keep-alive included)."""
    on, off, key = s3_on_and_off
    lim = _limits(on)
    fast, routed = Raw(on), Raw(off)
    status, headers, body, _ = fast.exchange(request_bytes("GET", _data_tile(lim), {}))  # caches the slab index
    assert status == 200 and body.startswith(b"\x89PNG")
    etag = dict(headers)["ETag"]
    before = FastTileProtocol.answered_later
    seen: dict[tuple[int, bool], bool] = {}

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=st.one_of(_plain_tile_request(lim), _plain_tile_request(lim), _tile_request(lim)),
           version=st.sampled_from(["1.1"] * 8 + ["1.0"]), close=st.sampled_from([False] * 8 + [True]),
           keyed=st.sampled_from([None] * 7 + ["header"]))
    def check(request, version, close, keyed) -> None:
        method, path, headers = request
        headers = {k: v.replace("ETAG", etag) for k, v in headers.items()}
        if close:
            headers["Connection"] = "close"
        if keyed:
            headers["X-Api-Key"] = key
        data = request_bytes(method, path, headers, version)
        routed_answer, fast_answer = routed.exchange(data, method), fast.exchange(data, method)
        assert comparable(fast_answer) == comparable(routed_answer), (method, path, headers, version)
        seen[(fast_answer[0], keyed is not None)] = True
        if version == "1.0" or close:
            assert fast_answer[3] and fast.sock is None  # closed after the answer

    check()
    fast.close()
    routed.close()
    # the drawn tiles were read from S3 by the protocol's task, without an ASGI cycle
    assert FastTileProtocol.answered_later - before >= 20, FastTileProtocol.answered_later - before
    assert {(200, False), (304, False), (400, False)} <= seen.keys(), seen


def test_an_s3_tile_is_read_once_either_way(s3_on_and_off, _s3_proxy_running: S3Proxy) -> None:
    on, off, _ = s3_on_and_off
    lim = _limits(on)
    request = request_bytes("GET", _data_tile(lim), {})
    counts = []
    for address in (off, on):
        raw = Raw(address)
        raw.exchange(request)  # the slab index, cached
        _s3_proxy_running.clear()
        before = FastTileProtocol.answered_later
        assert raw.exchange(request)[0] == 200
        counts.append((_s3_proxy_running.count(), FastTileProtocol.answered_later - before))
        raw.close()
    assert counts == [(1, 0), (1, 1)]  # one ranged GET each; the second server answered below ASGI


def test_pipelined_s3_tiles_keep_their_order(s3_on_and_off) -> None:
    """Tiles read by the protocol's task and requests through the ASGI cycle, sent in one write:
    the requests behind a pending read wait their turn, the answers come in order."""
    on, off, _ = s3_on_and_off
    lim = _limits(on)
    tile, empty = _data_tile(lim), f"/wmts/1.0.0/S/normal/PM/10/{lim.max_row}/{lim.max_col}.png"
    kvp = ("/wmts?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=S&STYLE=normal&TILEMATRIXSET=PM&TILEMATRIX=10"
           f"&TILEROW={lim.min_row}&TILECOL={lim.min_col}&FORMAT=image%2Fpng")
    paths = [tile, tile, "/wmts?SERVICE=WMTS&REQUEST=GetCapabilities", kvp, empty, tile,
             "/wmts/1.0.0/X/normal/PM/10/0/0.png", tile]
    methods = ["GET", "HEAD", "GET", "GET", "GET", "GET", "GET", "HEAD"]
    for address in (on, off):
        together, later = pipelined_as_alone(address, methods, paths, "answered_later")
        assert [a[0] for a in together] == [200, 200, 200, 200, 200, 200, 400, 200]
        assert later >= 1 if address == on else later == 0  # the first tile, at least, read by the task


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _warnings() -> Iterator[list[logging.LogRecord]]:
    """Warnings and errors of uvicorn, asyncio and tileserver (uvicorn's loggers do not propagate)."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "asyncio", "tileserver")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def _normalised(answer: tuple[int, list[tuple[str, str]], bytes, bool], fold: bool = False) -> tuple:
    """`comparable` with the request id the error message names taken out (and so its length);
    `fold`: header names in lower case (uvicorn's own protocol writes them so)."""
    status, headers, body, closes = answer
    if fold:
        headers = [(k.lower(), v) for k, v in headers]
        headers = [("X-Request-Id" if k == "x-request-id" else k, v) for k, v in headers]
    rid = dict(headers)["X-Request-Id"].encode()
    assert rid in body or status < 500 or not body
    kept = [(k, v) for k, v in headers if k.lower() != "content-length"]
    sized = any(k.lower() == "content-length" for k, _ in headers)
    return comparable((status, kept, body.replace(rid, b"RID"), closes)), sized


def test_a_failing_s3_is_worded_as_the_route_words_it_after_one_read(
    tmp_path: Path, s3_server: MotoS3Server, s3_proxy: S3Proxy
) -> None:
    """S3 answers 503 to everything: the tile read by the protocol's task is answered with the route's
    exception report, status and Retry-After, after as many S3 requests as the route makes — so the
    circuit breaker opens at the same request and Retry-After goes 1, 5, 5 on both servers."""
    settings, _ = _s3_layers(tmp_path, s3_server, s3_proxy)
    with serving(settings) as (on, _), serving(replace(settings, fast_tiles=False)) as (off, _), \
            asgi_only(settings) as asgi:
        lim = _limits(on)
        rest = _data_tile(lim)
        kvp = ("/wmts?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=S&STYLE=normal&TILEMATRIXSET=PM"
               f"&TILEMATRIX=10&TILEROW={lim.min_row}&TILECOL={lim.min_col}&FORMAT=image%2Fpng")
        asked = [("GET", rest, {}), ("HEAD", kvp, {}), ("GET", rest, {"If-None-Match": "*"})]
        results = []
        with _warnings() as records:
            for address in (off, on, asgi):
                raw = Raw(address)
                assert raw.exchange(request_bytes("GET", rest, {}))[0] == 200  # the slab index, cached
                s3_proxy.clear()
                s3_proxy.fail_next(1_000_000, 503)
                before = FastTileProtocol.answered_later
                answers, reads = [], []
                for method, path, headers in asked:
                    count = s3_proxy.count()
                    answers.append(raw.exchange(request_bytes(method, path, headers), method))
                    reads.append(s3_proxy.count() - count)
                results.append((answers, reads, FastTileProtocol.answered_later - before))
                raw.close()
                s3_proxy.clear()
        (routed, routed_reads, routed_later), (fast, fast_reads, fast_later), (layer, layer_reads, _) = results
        assert [_normalised(a) for a in fast] == [_normalised(a) for a in routed]
        assert [_normalised(a, fold=True) for a in layer] == [_normalised(a, fold=True) for a in routed]
        assert layer_reads == routed_reads  # the ASGI layer (FastTiles.__call__) words the failure too
        assert [a[0] for a in fast] == [503, 503, 503]
        assert [dict(a[1])["Retry-After"] for a in fast] == ["1", "5", "5"]
        assert b"ExceptionReport" in fast[0][2] and b"storage is unavailable" in fast[0][2]
        assert fast_reads == routed_reads == [4, 1, 0]  # 4 attempts; the breaker opens; then open
        assert (routed_later, fast_later) == (0, 3)
        # the route's log lines, the same from both paths: one StorageUnavailable line per answer
        errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
        assert len(errors) == 9 and all("StorageUnavailable (503)" in e for e in errors), errors
        assert not any(r.exc_info for r in records)


def test_a_client_gone_while_s3_is_read_leaves_nothing_behind(
    tmp_path: Path, s3_server: MotoS3Server, s3_proxy: S3Proxy
) -> None:
    """The client closes its connection while the protocol's task waits for S3: the task is cancelled
    (no traceback, no task or connection left), and the server goes on answering."""
    settings, _ = _s3_layers(tmp_path, s3_server, s3_proxy)
    with serving(settings) as (address, server):
        lim = _limits(address)
        request = request_bytes("GET", _data_tile(lim), {})
        raw = Raw(address)
        assert raw.exchange(request)[0] == 200  # the slab index, cached
        raw.close()
        with _warnings() as records:
            s3_proxy.hold()
            try:
                for how in ("close", "reset"):
                    asked = s3_proxy.count()
                    sock = socket.create_connection(address, timeout=5)
                    sock.sendall(request)
                    deadline = time.monotonic() + 5
                    while s3_proxy.count() == asked:  # the read is under way
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    assert len(server.server_state.tasks) == 1
                    if how == "reset":
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    sock.close()
                    deadline = time.monotonic() + 5
                    while server.server_state.tasks or server.server_state.connections:
                        assert time.monotonic() < deadline, (server.server_state.tasks, server.server_state.connections)
                        time.sleep(0.01)
            finally:
                s3_proxy.release()
            raw = Raw(address)
            status, _, body, _ = raw.exchange(request)
            raw.close()
        assert status == 200 and body.startswith(b"\x89PNG")
        assert not records, [r.getMessage() for r in records]



def test_requests_pipelined_behind_a_pending_read_stop_the_reading(
    tmp_path: Path, s3_server: MotoS3Server, s3_proxy: S3Proxy
) -> None:
    """Back-pressure: while the protocol's task waits for S3, a client pipelining thousands of
    requests gets its connection's reading paused (uvicorn's flow control, which the stand-in
    cycle keeps), so what the server holds of them is bounded by one socket read, not by what the
    client sends (the rest waits in the kernel's socket buffers, then in the client); once S3 answers,
    every request is answered, in order."""
    settings, _ = _s3_layers(tmp_path, s3_server, s3_proxy, object_tile_cache_bytes=8 << 20)
    with serving(settings) as (address, server):
        lim = _limits(address)
        tile = _data_tile(lim)
        raw = Raw(address)
        assert raw.exchange(request_bytes("GET", tile, {}))[0] == 200  # the slab index, cached
        raw.close()
        other = f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col + 1}.png"  # not read yet: S3 is asked
        one = request_bytes("HEAD", other, {})
        count = 40_000
        burst = one * count  # ~3 MB of requests
        s3_proxy.hold()
        sent = [0]
        sock = socket.create_connection(address, timeout=30)
        try:
            def send_all() -> None:
                view = memoryview(burst)
                while sent[0] < len(burst):
                    sent[0] += sock.send(view[sent[0]:sent[0] + 65536])

            sender = threading.Thread(target=send_all, daemon=True)
            sender.start()
            deadline = time.monotonic() + 5
            while not s3_proxy.count() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(1.0)  # the client keeps writing as fast as it can
            protocols = list(server.server_state.connections)
            assert len(protocols) == 1
            protocol = protocols[0]
            assert not protocol.transport.is_reading()  # paused while the read is pending
            queued = len(protocol.pipeline)
            assert queued * len(one) <= 1 << 20, queued  # bounded by a socket read, not by the client
            time.sleep(0.5)
            assert len(protocol.pipeline) == queued and not protocol.transport.is_reading()  # and it stays so
            assert queued < sent[0] // len(one) // 2  # the rest waits in the kernel's buffers, not in the server
            s3_proxy.release()
            answers = Raw(address)
            answers.sock = sock
            for _ in range(count):
                status, headers, body, _ = answers.answer("HEAD")
                assert status == 200 and body == b""
            sender.join(10)
            assert sent[0] == len(burst)
        finally:
            s3_proxy.release()
            sock.close()
