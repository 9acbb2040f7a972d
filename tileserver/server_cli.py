"""`tileserver serve`: run the server with uvicorn (several worker processes share one store).

The server process's own defences live here: the demo's admin token, the header timeout of every
connection and which proxies' forwarded headers are believed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Protocol

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from tileserver.http import canonical
from tileserver.settings import Settings, load_settings

log = logging.getLogger("tileserver.server")


# request line and headers of one request; httptools has no limit (8 MB were measured accepted)
MAX_HEADER_BYTES = 64 << 10
_TOO_LARGE = b"request line and headers exceed %d bytes" % MAX_HEADER_BYTES


class _HeadersTooLarge(Exception):
    pass


def canonical_head(data: bytes) -> bytes:
    """A response head with its header names spelt canonically (`Content-Type`, `ETag`)."""
    head, blank, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    for i in range(1, len(lines)):
        name, colon, value = lines[i].partition(b":")
        lines[i] = canonical(name) + colon + value
    return b"\r\n".join(lines) + blank + rest


class _CanonicalHeads:
    """The transport as uvicorn's protocol sees it. uvicorn's httptools protocol lower-cases every
    header name it writes, and some clients match names case-sensitively (QGIS's identify looks for
    `Content-Type`, as ROK4 spells it): the head of each response leaves with canonical names. A head
    is the first write starting with the status line after a request's headers were read."""

    __slots__ = ("_transport", "pending")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.pending = 0

    def write(self, data: bytes) -> None:
        if self.pending and data.startswith(b"HTTP/1."):
            self.pending -= 1
            data = canonical_head(data)
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request headers are not complete in time.

    uvicorn arms no timer before the first request, and its keep-alive timer is cancelled by the
    first byte of the next one: a client sending a request line and then nothing (slowloris) would
    hold its connection, and a file descriptor, for ever. The timer runs from the connection (or
    the first byte of each next request) to the end of the headers; bodies are the app's business.
    Headers are also bounded in size (431), or a fast client could fill memory within the timeout.
    """

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._headers_since: float | None = None  # loop time the awaited headers began
        self._idle_since: float | None = None  # loop time a fast answer left the connection idle
        self._header_bytes = 0
        self._oversized = False

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            self._oversized = True
            raise _HeadersTooLarge  # httptools stops parsing; uvicorn answers through send_400_response

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._count(0)
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            self._count(0)
        super().on_header(name, value)

    def data_received(self, data: bytes) -> None:
        if not self._oversized:
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        if not self._oversized:
            super().send_400_response(msg)
            return
        head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
        self.transport.write(head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(_TOO_LARGE) + _TOO_LARGE)
        self.transport.close()

    def _arm(self) -> None:
        if self._headers_since is None and self._header_timeout > 0:
            self._headers_since = self.loop.time()

    def _disarm(self) -> None:
        self._headers_since = None

    def sweep(self, now: float) -> None:
        """Called about every `_Sweeper.interval` s: drop the connection if its headers are late, or
        if a fast answer left it idle for uvicorn's keep-alive timeout."""
        if self._headers_since is not None and now - self._headers_since >= self._header_timeout:
            self._headers_too_slow()
        if self._idle_since is not None and now - self._idle_since >= self.timeout_keep_alive:
            self._idle_since = None
            if not self.transport.is_closing():
                self.transport.close()

    def _headers_too_slow(self) -> None:
        self._headers_since = None
        if not self.transport.is_closing():
            log.debug("connection from %s closed: headers not complete in %s s", self.client, self._header_timeout)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._heads = _CanonicalHeads(transport)
        self.transport = self._heads  # type: ignore[assignment]
        self._arm()
        _Sweeper.of(self).members.add(self)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._heads.pending += 1
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        _Sweeper.of(self).members.discard(self)
        super().connection_lost(exc)


class _Sweeper:
    """One timer per server for every connection's header deadline and fast-answer idle time.

    A timer per request (armed when a request begins, cancelled when its headers are complete) cost
    ~2.6 µs a request under uvloop, as much as reading the tile; a loop time per request and one
    sweep a fraction of a second costs next to nothing. Connections are dropped between the timeout
    and the timeout plus one interval."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        self.members: _Members = _Members(self)
        self._handle: asyncio.TimerHandle | None = None

    @staticmethod
    def of(protocol: HeaderTimeoutProtocol) -> _Sweeper:
        state = protocol.server_state
        sweeper: _Sweeper | None = getattr(state, "_tileserver_sweeper", None)
        if sweeper is None:
            timeouts = [t for t in (protocol._header_timeout, float(protocol.timeout_keep_alive)) if t > 0]
            interval = min(1.0, max(0.05, min(timeouts, default=1.0) / 4))
            sweeper = _Sweeper(protocol.loop, interval)
            state._tileserver_sweeper = sweeper  # type: ignore[attr-defined]
        return sweeper

    def start(self) -> None:
        if self._handle is None:
            self._handle = self.loop.call_later(self.interval, self._run)

    def _run(self) -> None:
        self._handle = None
        now = self.loop.time()
        for protocol in list(self.members):
            protocol.sweep(now)
        if self.members:
            self.start()


class _Members(set[HeaderTimeoutProtocol]):
    """The sweeper's connections; the first one added starts it."""

    def __init__(self, sweeper: _Sweeper) -> None:
        super().__init__()
        self._sweeper = sweeper

    def add(self, protocol: HeaderTimeoutProtocol) -> None:
        super().add(protocol)
        self._sweeper.start()


class _Answerer(Protocol):
    def answer_tile(self, method: str, path: str, raw_path: bytes, query: bytes,
                    headers: list[tuple[bytes, bytes]], later: bool = True) -> Any: ...


def _answerer(app: Any) -> _Answerer | None:
    """The application under uvicorn's wrappers (proxy headers, message logger), if it answers tiles."""
    for _ in range(8):
        if hasattr(app, "answer_tile"):
            return app
        app = getattr(app, "app", None)
        if app is None:
            break
    return None


_default_head: tuple[object, bytes] = (None, b"")


def _default_lines(default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's own headers (Date, Server), spelt as `_CanonicalHeads` sends them; uvicorn replaces
    the list each second, so one rendering serves every answer of that second."""
    global _default_head
    if _default_head[0] is not default_headers:
        _default_head = (default_headers, b"".join(b"%s: %s\r\n" % (canonical(k.lower()), v)
                                                   for k, v in default_headers))
    return _default_head[1]


class _NoEvent:
    """A cycle's `message_event` where nothing waits on it: uvicorn sets it on connection loss."""

    def set(self) -> None:
        pass


class _Reading:
    """What uvicorn's protocol reads of the cycle in progress (its RequestResponseCycle), for a tile
    being read by this protocol's own task: later requests queue behind it in `pipeline`, `shutdown`
    asks it to close the connection after its answer, a lost connection marks it."""

    __slots__ = ("keep_alive", "response_complete", "disconnected", "body", "more_body")
    message_event = _NoEvent()

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.response_complete = False
        self.disconnected = False
        self.body = b""  # a fast answer takes no request body: nothing is ever added
        self.more_body = False


_INTERNAL_ERROR = (b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 21\r\nConnection: close\r\n\r\n",
                   b"Internal Server Error")  # uvicorn's answer when an application fails


class FastTileProtocol(HeaderTimeoutProtocol):
    """`HeaderTimeoutProtocol` answering stored tiles as soon as their request is parsed.

    uvicorn turns each request into a scope, a task running the ASGI application and messages
    through `send`: ~50 µs a request, several times what a page-cached tile costs. When no earlier
    request of the connection is still being answered (answers keep their order) and the transport
    is not pushing back, the application's `answer_now` (fastpath.FastTiles) may answer a GET or
    HEAD at once with what the ASGI path would send; the answer is written when the request is
    complete. A tile whose bytes need a storage read (S3) is read by a task of this protocol, with
    no scope, ASGI cycle or Starlette: while it runs, a `_Reading` stands for uvicorn's cycle, so
    later requests of the connection queue behind it as behind any running cycle (reading paused,
    answers in order), and its answer waits for a transport pushing back. Anything `answer_tile`
    declines goes through uvicorn's ordinary cycle. Keep-alive as uvicorn keeps it: HTTP/1.0 and
    `Connection: close` close after the answer, and the idle timer is armed when the data at hand
    is done (never while a task or an ASGI answer is still running). uvicorn's `limit_concurrency`
    counts ASGI tasks: an answer at once starts none and is never refused by it; a read's task
    counts, and past the limit the ASGI cycle takes the request (and refuses it).
    """

    answered = 0  # requests of this process answered at once (tests check that the fast path was taken)
    answered_later = 0  # ... and after a read in the protocol's own task


    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tiles = _answerer(self.app)
        self._fast: tuple[bytes, bytes] | None = None  # head and body, written when the request is complete
        self._fast_close = False
        self._fast_sent = False
        self._later: tuple[Coroutine[Any, Any, Any], _Reading] | None = None  # a read, started when the request is complete
        self._reading: tuple[asyncio.Task[None], Coroutine[Any, Any, Any]] | None = None

    def on_message_begin(self) -> None:
        # uvicorn's on_message_begin, less the scope: a fast answer needs none, so it is built in
        # on_headers_complete for the requests the ASGI cycle takes (uvicorn 0.55's own dict)
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._header_bytes = 0
        if self._headers_since is None and self._header_timeout > 0:
            self._headers_since = self.loop.time()

    def on_headers_complete(self) -> None:
        if self._tiles is not None and self._answer_now():
            self._headers_since = None
            return
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }
        super().on_headers_complete()

    def _answer_now(self) -> bool:
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.pipeline or self.flow.write_paused:
            return False
        method = self.parser.get_method()
        if method not in (b"GET", b"HEAD") or self.expect_100_continue or self.parser.should_upgrade():
            return False
        parsed = httptools.parse_url(self.url)
        raw_path = parsed.path
        if b"%" in raw_path:
            return False
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            return False
        assert self._tiles is not None
        limit = self.limit_concurrency
        later = limit is None or (len(self.connections) < limit and len(self.tasks) < limit)
        answer = self._tiles.answer_tile(method.decode("ascii"), self.root_path + path, raw_path,
                                         parsed.query or b"", self.headers, later)
        if answer is None:
            return False
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        if not isinstance(answer, tuple):  # a read to await: this protocol's task answers
            reading = _Reading(keep_alive)
            self.cycle = reading  # type: ignore[assignment]
            self._later = (answer, reading)
            return True
        status, lines, body = answer  # fastpath.Answer
        head = STATUS_LINE[status] + _default_lines(self.server_state.default_headers) + lines
        self._fast = (head + (b"\r\n" if keep_alive else b"Connection: close\r\n\r\n"), body)
        self._fast_close = not keep_alive
        return True

    def on_body(self, body: bytes) -> None:
        if self._fast is None and self._later is None:  # a GET's body, if any, is not read by the fast answer
            super().on_body(body)

    def on_message_complete(self) -> None:
        answer = self._fast
        if answer is None:
            if self._later is not None:
                pending, reading = self._later
                self._later = None
                task = self.loop.create_task(self._answer_later(pending, reading))
                self._reading = (task, pending)
                self.tasks.add(task)  # uvicorn's shutdown waits for it, as for an ASGI task
                task.add_done_callback(self.tasks.discard)
                return
            super().on_message_complete()
            return
        self._fast = None
        self.server_state.total_requests += 1
        FastTileProtocol.answered += 1
        transport = self._heads._transport  # names already canonical: past `_CanonicalHeads`
        if transport.is_closing():
            return
        transport.writelines(answer)  # one writev, no copy of the body
        if self._fast_close:
            self.transport.close()
        else:
            self._fast_sent = True

    async def _answer_later(self, pending: Coroutine[Any, Any, Any], reading: _Reading) -> None:
        """Await the read, then write its answer as uvicorn's cycle would and start what queued behind it."""
        try:
            answer = await pending
        except Exception:  # a bug (a failed read is an answer): uvicorn's 500, as for a failing application
            log.exception("fast tile answer failed")
            answer = None
        if self.flow.write_paused and not reading.disconnected:
            await self.flow.drain()  # back-pressure, as uvicorn's send waits
        self._reading = None
        reading.response_complete = True
        transport = self._heads._transport  # names already canonical: past `_CanonicalHeads`
        if reading.disconnected or transport.is_closing():
            return
        keep_alive = reading.keep_alive and answer is not None  # False also after `shutdown`
        head = STATUS_LINE[500 if answer is None else answer.status] + _default_lines(self.server_state.default_headers)
        if answer is None:
            transport.writelines((head + _INTERNAL_ERROR[0], _INTERNAL_ERROR[1]))
        else:
            head += answer.lines + (b"\r\n" if keep_alive else b"Connection: close\r\n\r\n")
            transport.writelines((head, answer.body))
            FastTileProtocol.answered_later += 1
        self.server_state.total_requests += 1
        if not keep_alive:
            self.transport.close()
            return
        self.flow.resume_reading()  # paused by uvicorn if requests queued behind this one
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self.timeout_keep_alive_task is None:
            self._idle_since = self.loop.time()  # uvicorn's keep-alive timeout, kept by the sweeper

    def connection_lost(self, exc: Exception | None) -> None:
        if self._later is not None:  # never started: nothing to cancel
            self._later[0].close()
            self._later = None
        if self._reading is not None:  # the read is of no use any more; its storage connection is closed cleanly
            task, pending = self._reading
            self._reading = None
            task.cancel()
            task.add_done_callback(lambda _: pending.close())  # unawaited if cancelled before it began
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._oversized:
            return
        self._idle_since = None
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        try:  # uvicorn's data_received, one call deep instead of three
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        if self._fast_sent:
            self._fast_sent = False
            cycle = self.cycle
            if (cycle is None or cycle.response_complete) and self.timeout_keep_alive_task is None:
                self._idle_since = self.loop.time()  # uvicorn's keep-alive timeout, kept by the sweeper


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn.run/Config arguments the settings decide (tests run the app with the same ones)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        # fast_tiles off: every request takes uvicorn's ASGI cycle (tests/test_fastpath.py compares both)
        "http": functools.partial(FastTileProtocol if settings.fast_tiles else HeaderTimeoutProtocol,
                                  header_timeout=settings.header_timeout),
        # the app applies X-Forwarded-* of trusted proxies itself (policy.apply_forwarded): it needs
        # the proxy's address, which uvicorn's rewrite would hide
        "proxy_headers": False,
        "timeout_graceful_shutdown": 10,
    }


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the tile and map server")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 9000)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1)")
    serve.add_argument("--data-dir", help="data directory: embedded store and demo data")
    serve.add_argument("--admin-token", help="bearer token protecting /admin (prefer TILESERVER_ADMIN_TOKEN)")
    serve.add_argument("--no-demo", action="store_true", help="do not publish the demo layer")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=_serve)


def _demo_token(settings: Settings) -> None:
    """The demo without a configured token gets its own, printed once; every worker reads it from the env."""
    from tileserver.demo import ADMIN_TOKEN_FILE, demo_admin_token

    token, created = demo_admin_token(settings.data_dir)
    os.environ["TILESERVER_ADMIN_TOKEN"] = token
    path = Path(settings.data_dir) / ADMIN_TOKEN_FILE
    if created:
        print(f"tileserver: demo admin token (shown once, kept in {path}): {token}")
    else:
        print(f"tileserver: demo admin token in {path}")
        if path.stat().st_mode & 0o077:
            print(f"tileserver: warning: {path} is readable by other users (chmod 600 it)")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    # flags become environment so every worker process builds the same settings
    if args.config:
        os.environ["TILESERVER_CONFIG"] = args.config
    for name, value in (("data_dir", args.data_dir), ("admin_token", args.admin_token)):
        if value is not None:
            os.environ["TILESERVER_" + name.upper()] = value
    if args.no_demo:
        os.environ["TILESERVER_DEMO"] = "false"
    settings = load_settings(host=args.host, port=args.port, workers=args.workers)
    os.environ["TILESERVER_WORKERS"] = str(settings.workers)  # each worker sizes its share of the caches by it
    if settings.demo and not settings.admin_token:
        _demo_token(settings)
    os.environ["TILESERVER_LOG_LEVEL"] = args.log_level  # every worker configures its logging from it
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.log_format == "json":
        from tileserver.observability import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    print(f"tileserver: serving on http://{settings.host}:{settings.port}/ (data in {settings.data_dir})")
    from tileserver.observability import prepare_multiprocess, remove_multiprocess_dir

    metrics_dir = prepare_multiprocess(settings.workers)  # before the workers import prometheus_client
    try:
        _run(uvicorn, args, settings)
    finally:
        remove_multiprocess_dir(metrics_dir)
    return 0


def _run(uvicorn: Any, args: argparse.Namespace, settings: Settings) -> None:
    uvicorn.run(
        "tileserver.app:create_app",
        factory=True,
        log_level=args.log_level,
        access_log=False,  # tileserver.access logs every request with its id
        # log_format=json: uvicorn's records reach the root logger's JSON handler, not its own text ones
        **({"log_config": None} if settings.log_format == "json" else {}),
        **uvicorn_options(settings),
    )
