"""The hot path: a WMTS GetTile of a stored tile, answered before Starlette is entered.

Under load a stored tile costs ~15 µs while the middleware stack, routing, Request/Response objects,
validating every parameter again and a LogRecord cost several times that (benchmarks/RESULTS.md).
This path answers only the plain case — an open layer, its own grid and format, no key, a tile
inside the advertised limits, REST without a query or a KVP query of GetTile's own parameters —
with exactly the routed answer's bytes and headers (ETag and 304, CORS, request id, Cache-Control,
access log). A read that fails is answered with the route's own wording of the failure (never read
again by the route). Everything else (other errors, keys, rendering) goes to the ordinary route,
which does the full work and gives the protocol's answer.

Two entries share every decision and every header:
- `FastTiles.__call__`, an ASGI layer in front of Starlette (any ASGI server, tests in process);
- `FastTiles.answer_tile`, called by `tileserver serve`'s HTTP protocol (server_cli.FastTileProtocol)
  as soon as a request is parsed, without an ASGI cycle. It answers at once when nothing can
  block: the slab index is cached and the tile is in the page cache of a FILE slab already open
  (preadv2 RWF_NOWAIT). When the slab index is cached but the bytes must be read (object storage,
  a FILE slab not open or not in the page cache), it gives a coroutine instead, which the protocol
  runs in its own task: the read the route would make, then the tile, or the route's own error
  answer for a failed read (`wmts_tiles.stored_tile`, `ows.error_report`) — never a second read.
  Anything else gives None and the ASGI cycle takes the request.

The first request of a (layer, style, grid, matrix, extension) is checked by the route's own
`resolve_tile`; what it settles is kept per catalog snapshot, so later tiles only check their
row and column against the limits.

It sits beside `app` and `http` (whose access log and ETags it shares), above the services whose
tiles it answers: not under `services/`, which imports nothing from the application layer.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import unquote_plus

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from tileserver.hot_tiles import held_on_object_storage
from tileserver.http import CORS_HEADERS, canonical, etag_matches, etag_of, log_access, next_request_id
from tileserver.pyramid import ABSENT
from tileserver.services.numbers import is_plain_index
from tileserver.services.ows import error_report
from tileserver.services.policy import ServiceError, check_payload, tile_headers
from tileserver.services.tiles import empty_tile, for_client
from tileserver.services.wmts_tiles import EXTENSIONS, REST_PREFIX, VERSION, resolve_tile, stored_tile
from tileserver.storage.paths import Scheme, parse_path

log = logging.getLogger("tileserver.fastpath")
_PREFIX = REST_PREFIX + "/"
_SEGMENTS = 6  # layer / style / tms / z / row / col.ext
_MAX_ROUTES = 4096  # settled routes kept per catalog snapshot (only valid ones are kept)
_MAX_FILES = 16384  # slab paths resolved to their backend, per catalog snapshot
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # what uvicorn refuses in a header value
_DECLINED = frozenset((b"x-api-key", b"content-length", b"transfer-encoding"))
_CORS_LINES = b"".join(b"%s: %s\r\n" % pair for pair in CORS_HEADERS)


@dataclass(frozen=True)
class _Route:
    """What the first request of a tile route settled: the layer, the level, limits, fixed headers."""

    published: Any
    level: str
    stored: bool  # a published level (else every tile is the nodata tile)
    rows: tuple[int, int]
    cols: tuple[int, int]
    headers: tuple[tuple[bytes, bytes], ...]
    lines: bytes  # the same headers, as they go on the wire
    lines_304: bytes  # the same without Content-Type, for a 304
    pyramid: Any  # the pyramid holding the level, and its level (None: not stored, TIFF-wrapped, deflated)
    stored_level: Any
    compression: str


_ROUTED = object()  # a route that always needs the full path (rendered, restricted)


class _Asked(NamedTuple):
    """A request the fast path takes, with the two request headers its answer depends on."""

    route: _Route
    row: int
    col: int
    if_none_match: bytes | None
    accept_encoding: str | None
    runtime: Any


class Answer(NamedTuple):
    """A fast answer: status, header lines (canonical names, CRLF-terminated) and the bytes to send."""

    status: int
    lines: bytes
    body: bytes


class _Read:
    """`_stored_now`'s word for "the slab index is at hand, the bytes are not": a read will tell."""


_READ = _Read()


class FastTiles:
    """Wraps the Starlette application; `app.state.runtime` is read at each request."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state
        # Starlette's State keeps its attributes in this dict: read directly, not through its
        # __getattr__ (~2 µs a request)
        self._state: dict[str, Any] | None = getattr(state, "_state", None)
        self._catalog: object = None
        self._routes: dict[tuple[str, ...], _Route | object] = {}
        self._files: dict[str, tuple[Any, str] | None] = {}  # slab path → (FILE handles, name), per catalog

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] in ("GET", "HEAD")
            and (scope["path"] == _KVP_PATH or scope["path"].startswith(_PREFIX))
            and await self._try(scope, send)
        ):
            return
        await self.app(scope, receive, send)

    async def _try(self, scope: Scope, send: Send) -> bool:
        try:
            return await self._answer(scope, send)
        except Exception:  # a bug here must not cost the request: the route answers it
            log.exception("fast tile path failed on %s; the route answers", scope["path"])
            return False

    async def _answer(self, scope: Scope, send: Send) -> bool:
        """True when the tile was sent; False hands the request to the ordinary route."""
        started = time.perf_counter()
        path: str = scope["path"]
        query: bytes = scope["query_string"]
        asked = self._asked(path, scope.get("raw_path", b""), query, scope["headers"])
        if asked is None:
            return False
        route = asked.route
        method = scope["method"]
        try:
            answer = await stored_tile(route.published, route.level, asked.col, asked.row, route.stored)
            answer = for_client(answer, asked.accept_encoding)
        except ServiceError as exc:  # no data (404 layers), storage failures: worded as the route words them
            status, headers, body = _refusal(exc, method, path, query, started)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
            return True
        status, body, etag, request_id = _validated(answer.body, asked.if_none_match)
        headers = list(route.headers)
        if answer.content_encoding:
            headers.append((b"Content-Encoding", answer.content_encoding.encode()))
        if status == 304:
            headers = [h for h in headers if h[0] != b"Content-Type"]
            headers.append((b"ETag", etag))
        else:
            headers += ((b"ETag", etag), (b"Content-Length", b"%d" % len(body)))
        headers.append((b"X-Request-Id", request_id.encode()))
        headers += CORS_HEADERS
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
        log_access(request_id, method, path, query, status, len(body), started, secret_free=True)
        return True

    def answer_now(self, method: str, path: str, raw_path: bytes, query: bytes,
                   headers: list[tuple[bytes, bytes]]) -> Answer | None:
        """The whole answer at once when nothing has to wait (see the module docstring); None hands
        the request to the ASGI cycle. `headers` as ASGI gives them (lower-case names)."""
        answer = self.answer_tile(method, path, raw_path, query, headers, later=False)
        assert answer is None or isinstance(answer, Answer)
        return answer

    def answer_tile(self, method: str, path: str, raw_path: bytes, query: bytes, headers: list[tuple[bytes, bytes]],
               later: bool = True) -> Answer | Coroutine[Any, Any, Answer] | None:
        """`answer_now`'s answer; else, with `later`, a coroutine giving the answer after the one
        storage read it needs, for a request whose slab index is cached (see the module docstring)."""
        try:
            return self._answer_tile(method, path, raw_path, query, headers, later)
        except Exception:  # a bug here must not cost the request: the ASGI cycle answers it
            log.exception("fast tile path failed on %s; the route answers", path)
            return None

    def _answer_tile(self, method: str, path: str, raw_path: bytes, query: bytes,
                     headers: list[tuple[bytes, bytes]], later: bool) -> Answer | Coroutine[Any, Any, Answer] | None:
        started = time.perf_counter()
        if method not in ("GET", "HEAD") or not (path == _KVP_PATH or path.startswith(_PREFIX)):
            return None
        asked = self._asked(path, raw_path, query, headers)
        if asked is None:
            return None
        body = self._stored_now(asked)
        if body is None:
            return None
        if body is _READ:
            return self._read_later(asked, method, path, query, started) if later else None
        assert isinstance(body, bytes)
        return _answered(asked, body, method, path, query, started)

    async def _read_later(self, asked: _Asked, method: str, path: str, query: bytes, started: float) -> Answer:
        """The tile as the route reads it, or the route's own error answer when the read fails."""
        route = asked.route
        try:
            tile = await stored_tile(route.published, route.level, asked.col, asked.row, route.stored)
            tile = for_client(tile, asked.accept_encoding)
        except ServiceError as exc:
            return _refused(exc, method, path, query, started)
        return _answered(asked, tile.body, method, path, query, started)

    def _stored_now(self, asked: _Asked) -> bytes | _Read | None:
        """The body `native_tile` and `for_client` would give, when it is at hand without waiting;
        `_READ` when the slab index is cached but the bytes are not at hand (object storage, the slab
        not open, the bytes not in the page cache): one read gives them; None for anything else (the
        index not cached, TIFF wrapping, a deflated format, an unreadable payload, anything odd): the
        ASGI cycle then answers the ordinary way."""
        route, col, row = asked.route, asked.col, asked.row
        level = route.stored_level
        if level is None:  # TIFF-wrapped or deflated payloads, nodata-only levels: the ASGI path
            return None
        published = route.published
        try:
            if not published.in_limits(route.level, col, row) or not level.tile_limits.contains(col, row):
                return empty_tile(published, route.level).body
            slab_col, slab_row, n = level.slab_of(col, row)
            pyramid = route.pyramid
            entry = pyramid.cache.peek(pyramid.slab_path(level, slab_col, slab_row))
            if entry is None:
                return None
            if entry is ABSENT or entry.index.sizes[n] == 0:
                return empty_tile(published, route.level).body
            data = self._read_now(asked.runtime, entry.path, entry.index.offsets[n], entry.index.sizes[n])
            if data is None and held_on_object_storage(entry.path):
                data = pyramid.cache.tiles.tile(entry, n)  # an S3 tile read before: no read at all
            if not data:
                return None if data is not None else _READ
            check_payload(route.compression, data, "")
        except ServiceError:  # TileNotFound (404 layers), unreadable payloads: the route words them
            return None
        return data

    def _read_now(self, runtime: Any, path: str, offset: int, size: int) -> bytes | None:
        """The FILE backend's own inline read (preadv2 RWF_NOWAIT on its open descriptor), or None
        when the bytes need a read that may wait."""
        if size > runtime.settings.file_inline_read_max:
            return None
        try:
            file = self._files[path]
        except KeyError:
            where = parse_path(path)
            file = (runtime.storage.backend(where).handles, where.key) if where.scheme is Scheme.FILE else None
            if len(self._files) < _MAX_FILES:
                self._files[path] = file
        if file is None:  # object storage: a network read
            return None
        handles, name = file
        entry = handles.entry(name)
        if entry is None or not entry[2]:
            return None
        data: bytes | None = handles.read_nowait(name, entry, offset, size)
        return data

    def _asked(self, path: str, raw_path: bytes, query: bytes, headers: list[tuple[bytes, bytes]]) -> _Asked | None:
        """The settled route and tile of a request the fast path takes; None hands it to the route."""
        if_none_match = accept_encoding = None
        for name, value in headers:  # ASGI header names are lower case
            if name == b"if-none-match":
                if_none_match = value
            elif name == b"accept-encoding":
                accept_encoding = value.decode("latin-1")
            elif name in _DECLINED and (name != b"content-length" or value != b"0"):
                return None  # a key (the route checks it), or a body a fast answer would not wait for
        request = _kvp_request(query) if path == _KVP_PATH else _rest_request(path, raw_path, query)
        if request is None:
            return None
        layer, style, tms, matrix, fmt, row_text, col_text = request
        if not (is_plain_index(row_text) and is_plain_index(col_text)):
            return None
        runtime = self._state.get("runtime") if self._state is not None else getattr(self.state, "runtime", None)
        if runtime is None or not runtime.enabled or not runtime.settings.fast_tiles:
            return None
        catalog = runtime.catalog
        if catalog is not self._catalog:
            self._catalog, self._routes, self._files = catalog, {}, {}
        row, col = int(row_text), int(col_text)
        key = (layer, style, tms, matrix, fmt)
        route = self._routes.get(key)
        if route is None:
            route = self._settle(runtime, catalog, key, row, col)
            if route is None:
                return None
            if len(self._routes) < _MAX_ROUTES:
                self._routes[key] = route
        if route is _ROUTED:
            return None
        assert isinstance(route, _Route)
        if not (route.rows[0] <= row <= route.rows[1] and route.cols[0] <= col <= route.cols[1]):
            return None  # TileOutOfRange: the route words it
        return _Asked(route, row, col, if_none_match, accept_encoding, runtime)

    def _settle(self, runtime: Any, catalog: Any, key: tuple[str, ...], row: int, col: int) -> _Route | object | None:
        """The route's own checks, once; None when this request is refused (the route words it)."""
        layer, style, tms, matrix, fmt = key
        params = {
            "layer": layer,
            "style": style,
            "format": EXTENSIONS.get(fmt[1:].lower(), "") if fmt.startswith(".") else fmt,
            "TileMatrixSet": tms,
            "TileMatrix": matrix,
            "TileRow": str(row),
            "TileCol": str(col),
        }
        try:
            tile = resolve_tile(catalog, params, None)
        except ServiceError:
            return None
        published = tile.published
        if tile.rendered or published.restricted:
            return _ROUTED
        limits = tile.grid.limits.get(tile.matrix.id)
        if limits is not None:
            rows, cols = (limits.min_row, limits.max_row), (limits.min_col, limits.max_col)
        else:
            rows, cols = (0, tile.matrix.matrix_height - 1), (0, tile.matrix.matrix_width - 1)
        headers = [(b"Content-Type", published.format.mime.encode())]
        # the routed answer's own headers (content encoding is added per answer), spelt as http.py sends them
        headers += [(canonical(k.encode()), v.encode()) for k, v in tile_headers(published, runtime.settings).items()]
        if any(_BAD_VALUE.search(value) for _, value in headers):
            return _ROUTED  # uvicorn refuses such a value: the route's answer is its 500
        lines = b"".join(b"%s: %s\r\n" % pair for pair in headers)
        lines_304 = b"".join(b"%s: %s\r\n" % pair for pair in headers if pair[0] != b"Content-Type")
        stored = published.format
        pyramid = published.owners.get(tile.level) if tile.published_level else None
        level = None
        if pyramid is not None and not stored.tiff_wrapped and not stored.content_encoding:
            level = pyramid.level(tile.level)
        return _Route(published, tile.level, tile.published_level, rows, cols, tuple(headers), lines, lines_304,
                      pyramid, level, stored.compression)


def _answered(asked: _Asked, body: bytes, method: str, path: str, query: bytes, started: float) -> Answer:
    """A tile's answer as `http.HttpBehaviour` gives it (200 or 304, ETag, request id, CORS), logged."""
    route = asked.route
    status, body, etag, request_id = _validated(body, asked.if_none_match)
    if status == 304:  # the ASGI answer's headers above, as lines
        lines = route.lines_304 + b"ETag: %s\r\nX-Request-Id: %s\r\n" % (etag, request_id.encode())
    else:
        lines = route.lines + b"ETag: %s\r\nContent-Length: %d\r\nX-Request-Id: %s\r\n" % (
            etag, len(body), request_id.encode())
    log_access(request_id, method, path, query, status, len(body), started, secret_free=True)
    return Answer(status, lines + _CORS_LINES, b"" if method == "HEAD" else body)


def _refusal(error: ServiceError, method: str, path: str, query: bytes,
             started: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A failed read worded by the WMTS routes' own error function (`ows.error_report`: exception
    report, Retry-After, no-store, the 5xx log line with the request id), then given the headers
    `http.HttpBehaviour` gives every other answer (Content-Length last, the request id, CORS), logged:
    status, headers and body. Neither fast answer hands a failed read to the route, which would read again."""
    request_id = next_request_id()
    response = error_report(Request({"type": "http", "state": {"request_id": request_id}}), error)
    body = bytes(response.body)
    headers = [(canonical(name), value) for name, value in response.raw_headers if name != b"content-length"]
    headers += ((b"Content-Length", b"%d" % len(body)), (b"X-Request-Id", request_id.encode()), *CORS_HEADERS)
    log_access(request_id, method, path, query, response.status_code, len(body), started, secret_free=True)
    return response.status_code, headers, body


def _refused(error: ServiceError, method: str, path: str, query: bytes, started: float) -> Answer:
    """`_refusal` as the protocol writes it."""
    status, headers, body = _refusal(error, method, path, query, started)
    lines = b"".join(b"%s: %s\r\n" % pair for pair in headers)
    return Answer(status, lines, b"" if method == "HEAD" else body)


def _validated(body: bytes, if_none_match: bytes | None) -> tuple[int, bytes, bytes, str]:
    """Status, body, ETag and request id of a tile's body, as `http.HttpBehaviour` gives them; both
    fast answers take them from here."""
    etag = etag_of(body)
    if if_none_match is not None and etag_matches(if_none_match, etag):
        return 304, b"", etag, next_request_id()
    return 200, body, etag, next_request_id()


_Request = tuple[str, str, str, str, str, str, str]  # layer, style, tms, matrix, .ext or MIME, row, col
_KVP_PATH = "/wmts"
_KVP_NAMES = frozenset(
    ("SERVICE", "REQUEST", "VERSION", "LAYER", "STYLE", "FORMAT", "TILEMATRIXSET", "TILEMATRIX", "TILEROW", "TILECOL")
)
_KVP_REQUIRED = _KVP_NAMES - {"VERSION"}
_KVP_SPELLINGS = {spelling: name for name in _KVP_NAMES
                  for spelling in (name, name.lower(), name.title(), name.title().replace("matrix", "Matrix")
                                   .replace("set", "Set").replace("row", "Row").replace("col", "Col"))}


def _rest_request(path: str, raw_path: bytes, query: bytes) -> _Request | None:
    if query or b"%" in raw_path:
        return None
    parts = path[len(_PREFIX) :].split("/")
    if len(parts) != _SEGMENTS:
        return None
    col, dot, ext = parts[5].rpartition(".")
    if not dot:
        return None
    return parts[0], parts[1], parts[2], parts[3], "." + ext, parts[4], col


def _kvp_request(query: bytes) -> _Request | None:
    """A plain GetTile query: only its own parameters, each once; anything else goes to the route.

    A client writes its parameters in one order: once an order has given a plain request, a regular
    expression of that order reads the next queries (~0.8 µs where the loop takes ~2.4 µs)."""
    try:
        text = query.decode("ascii")
    except UnicodeDecodeError:
        return None
    for shape in _kvp_shapes:
        match = shape.fullmatch(text)
        if match is not None:
            found = match.groupdict()
            return _kvp_tile(found["LAYER"], found["STYLE"], found["TILEMATRIXSET"], found["TILEMATRIX"],
                             found["FORMAT"], found["TILEROW"], found["TILECOL"])
    pairs = text.split("&")
    if not len(_KVP_REQUIRED) <= len(pairs) <= len(_KVP_NAMES):
        return None
    found = {}
    spelt = []
    for pair in pairs:
        given, _, value = pair.partition("=")
        name = _KVP_SPELLINGS.get(given) or given.upper()
        if name not in _KVP_NAMES or name in found:
            return None
        found[name] = value
        spelt.append((given, name))
    if (
        len(found) < len(_KVP_REQUIRED) + ("VERSION" in found)
        or found["SERVICE"] != "WMTS"
        or found["REQUEST"] != "GetTile"
        or found.get("VERSION", VERSION) != VERSION
    ):
        return None
    request = _kvp_tile(found["LAYER"], found["STYLE"], found["TILEMATRIXSET"], found["TILEMATRIX"],
                        found["FORMAT"], found["TILEROW"], found["TILECOL"])
    if request is not None and len(_kvp_shapes) < _MAX_KVP_SHAPES:
        _learn_shape(spelt)
    return request


def _kvp_tile(layer: str, style: str, tms: str, matrix: str, fmt: str, row: str, col: str) -> _Request | None:
    fmt = fmt.replace("%2F", "/")
    if "%" in fmt or "+" in fmt:
        fmt = unquote_plus(fmt)
    if not fmt or fmt.startswith(".") or "%" in layer or "+" in layer or "%" in style or "+" in style:
        return None  # encoded names: the route decodes them
    return layer, style, tms, matrix, fmt, row, col


# what the loop above accepts, written as patterns: its fixed values, anything else (`_kvp_tile` checks the rest)
_KVP_VALUES = {"SERVICE": "WMTS", "REQUEST": "GetTile", "VERSION": re.escape(VERSION)}
_MAX_KVP_SHAPES = 16  # parameter orders kept (a client has one; a generator of permutations many)
_kvp_shapes: list[re.Pattern[str]] = []


def _learn_shape(spelt: list[tuple[str, str]]) -> None:
    pattern = "&".join(re.escape(given) + "=" + _KVP_VALUES.get(name, f"(?P<{name}>[^&]*)") for given, name in spelt)
    compiled = re.compile(pattern)
    if compiled not in _kvp_shapes:
        _kvp_shapes.append(compiled)
