"""HTTP behaviour every route shares: request ids and access log, ETag/304, gzip of text, HEAD, CORS.

One pure-ASGI middleware sees the complete body of ordinary responses (all service answers are
single-message bodies); streamed responses pass through untouched.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import logging.handlers
import os
import re
import time
import zlib
from collections.abc import Callable
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tileserver.observability import JsonFormatter, access_json, json_logs, use_json_logs
from tileserver.settings import Settings

access_log = logging.getLogger("tileserver.access")

_GZIP_TYPES = ("text/", "application/xml", "application/json", "application/problem+json", "application/vnd.oai",
               "application/geo+json", "application/gml+xml", "application/schema+json")
_GZIP_MIN = 1024
_ids = itertools.count(1)
_PREFIX = f"{os.getpid():x}"


def next_request_id() -> str:
    """Unique in the process, and across workers by the pid prefix."""
    return f"{_PREFIX}-{next(_ids)}"


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _set(headers: list[tuple[bytes, bytes]], name: bytes, value: bytes) -> None:
    headers[:] = [(k, v) for k, v in headers if k.lower() != name]
    headers.append((name, value))


# Field names are case-insensitive (RFC 9110 §5.1) and ASGI hands them over in lower case, which uvicorn
# writes as given; yet some clients look them up by their usual spelling (QGIS's identify with
# application/json wants `Content-Type`, as ROK4 sends). Answers go out canonically spelt.
_CANONICAL: dict[bytes, bytes] = {b"etag": b"ETag", b"www-authenticate": b"WWW-Authenticate",
                                  b"content-md5": b"Content-MD5", b"dnt": b"DNT"}
_MAX_CANONICAL = 1024  # names a response can carry are few; never let odd ones grow the table


def canonical(name: bytes) -> bytes:
    """`content-type` → `Content-Type`, `etag` → `ETag`; one dict lookup once a name was seen."""
    spelt = _CANONICAL.get(name)
    if spelt is None:
        spelt = b"-".join(part[:1].upper() + part[1:] for part in name.lower().split(b"-"))
        if len(_CANONICAL) < _MAX_CANONICAL:
            _CANONICAL[name] = spelt
    return spelt


def canonical_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(canonical(name), value) for name, value in headers]


_SECRET_PARAMS = re.compile(rb"(?i)((?:^|&)(?:apikey|api_key|key|token|access_token)=)[^&]*")


def redacted_query(query: bytes) -> str:
    """Query string for the log with key-like parameters masked: keys must never reach logs."""
    return _SECRET_PARAMS.sub(rb"\1***", query).decode("latin-1")


def _fast_crc32() -> Callable[[bytes], int]:
    """The same CRC-32 as zlib's, from zlib-ng or libdeflate (bundled by imagecodecs): ~0.9 µs for a
    15 KB tile where the system zlib takes ~4 µs. zlib's own for small bodies (the call costs ~0.6 µs)."""
    try:
        import imagecodecs
    except ImportError:  # pragma: no cover - imagecodecs is a dependency
        return zlib.crc32
    for name in ("deflate_crc32", "zlibng_crc32"):  # libdeflate's: 1.6 µs for 15 KB, zlib-ng's 2.0
        crc = getattr(imagecodecs, name, None)
        if crc is not None:
            try:
                if crc(b"tileserver") == zlib.crc32(b"tileserver"):
                    return crc
            except Exception:  # a build without that codec
                continue
    return zlib.crc32


_crc32 = _fast_crc32()
_SMALL = 4096  # below this zlib's crc32 is as fast as any


def etag_of(body: bytes) -> bytes:
    """Weak validator from length and CRC-32 (blake2b took 16 µs for a 15 KB tile): one function for
    every route and the fast path, so a tile has one ETag whichever path answered it."""
    return b'W/"%x-%08x"' % (len(body), zlib.crc32(body) if len(body) < _SMALL else _crc32(body))


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """Weak comparison (RFC 9110 §13.1.2), as If-None-Match requires."""
    if if_none_match.strip() == b"*":
        return True
    candidates = [c.strip().removeprefix(b"W/") for c in if_none_match.split(b",")]
    return etag.removeprefix(b"W/") in candidates


# CORS for every answer: public read-only services, any origin (credentials are headers, not cookies)
CORS_HEADERS = [
    (b"Access-Control-Allow-Origin", b"*"),
    (b"Access-Control-Expose-Headers", b"ETag, Content-Range, X-Request-Id"),
]
_ALLOWED_METHODS = b"GET, HEAD, OPTIONS, POST, PUT, DELETE"


async def _preflight(headers: list[tuple[bytes, bytes]], send: Send) -> None:
    asked = _header(headers, b"access-control-request-headers")
    answer = [
        (b"Access-Control-Allow-Origin", b"*"),
        (b"Access-Control-Allow-Methods", _ALLOWED_METHODS),
        (b"Access-Control-Max-Age", b"600"),
        (b"Content-Length", b"0"),
    ]
    if asked:
        answer.append((b"Access-Control-Allow-Headers", asked))
    await send({"type": "http.response.start", "status": 200, "headers": answer})
    await send({"type": "http.response.body", "body": b""})


class HttpBehaviour:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_headers_list = scope["headers"]
        if scope["method"] == "OPTIONS" and _header(request_headers_list, b"access-control-request-method"):
            await _preflight(request_headers_list, send)
            return
        request_id = next_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        request_headers = {k.lower(): v for k, v in scope["headers"]}
        method = scope["method"]
        start: dict[str, Any] = {}
        outcome = {"status": 0, "size": 0}

        def final_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
            _set(headers, b"x-request-id", request_id.encode())
            headers = canonical_headers(headers)
            headers.extend(CORS_HEADERS)
            return headers

        def gzip_wanted(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
            content_type = (_header(headers, b"content-type") or b"").decode("latin-1")
            return (
                status == 200
                and content_type.startswith(_GZIP_TYPES)
                and _header(headers, b"content-encoding") is None
                and b"gzip" in request_headers.get(b"accept-encoding", b"")
            )

        def mark_gzip(headers: list[tuple[bytes, bytes]]) -> None:
            _set(headers, b"content-encoding", b"gzip")
            vary = _header(headers, b"vary")
            _set(headers, b"vary", vary + b", Accept-Encoding" if vary else b"Accept-Encoding")

        async def finish(message: Message, body: bytes) -> None:
            headers = list(message.get("headers", []))
            status = message["status"]
            # a HEAD answered without its body (file responses) keeps the length it announced
            bodiless_head = method == "HEAD" and not body and _header(headers, b"content-length") is not None
            if method in ("GET", "HEAD") and status == 200 and not (bodiless_head and _header(headers, b"etag") is None):
                etag = _header(headers, b"etag")
                if etag is None:
                    etag = etag_of(body)
                    _set(headers, b"etag", etag)
                if_none_match = request_headers.get(b"if-none-match")
                if if_none_match is not None and etag_matches(if_none_match, etag):
                    status, body = 304, b""
                    headers = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"content-type")]
            if not bodiless_head and len(body) >= _GZIP_MIN and gzip_wanted(status, headers):
                body = gzip.compress(body, compresslevel=5, mtime=0)
                mark_gzip(headers)
            if status != 304 and not bodiless_head:
                _set(headers, b"content-length", str(len(body)).encode())
            outcome["status"], outcome["size"] = status, len(body)
            await send({"type": "http.response.start", "status": status, "headers": final_headers(headers)})
            await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

        async def begin_stream(first: bytes, compress: bool) -> None:
            """Send the head now and the body as it comes: a stream (WFS GetFeature, OGC API items)
            is not held back for an ETag; text is gzipped on the fly, flushed at each chunk."""
            message = start["message"]
            headers = list(message.get("headers", []))
            if compress and gzip_wanted(message["status"], headers):
                mark_gzip(headers)
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                start["gzip"] = zlib.compressobj(5, zlib.DEFLATED, 31)
            start["streaming"] = True
            outcome["status"] = message["status"]
            await send({**message, "headers": final_headers(headers)})
            await stream(first, True)

        async def stream(body: bytes, more: bool) -> None:
            compressor = start.get("gzip")
            if compressor is not None:
                body = compressor.compress(body) + compressor.flush(zlib.Z_SYNC_FLUSH if more else zlib.Z_FINISH)
            outcome["size"] += len(body)
            await send({"type": "http.response.body", "body": body, "more_body": more})

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                start["message"] = message
                return
            if message["type"] == "http.response.body":
                body, more = message.get("body", b""), message.get("more_body", False)
                if "streaming" in start:
                    await stream(body, more)
                    return
                if not more and "chunks" not in start:
                    await finish(start["message"], body)
                    return
                if more and "chunks" not in start and _header(start["message"].get("headers", []), b"content-length") is None:
                    await begin_stream(body, compress=method != "HEAD")  # a stream of unknown length
                    return
                # a body of known length in parts (files): gathered for its ETag and gzip, up to 8 MiB
                start.setdefault("chunks", []).append(body)
                if not more:
                    await finish(start["message"], b"".join(start.pop("chunks")))
                    return
                if sum(len(c) for c in start["chunks"]) > 8 << 20:  # large download: stream it as it is
                    await begin_stream(b"".join(start.pop("chunks")), compress=False)
                return
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            log_access(request_id, method, scope["path"], scope.get("query_string"), outcome["status"],
                       outcome["size"], started)


def log_access(request_id: str, method: str, path: str, query: bytes | None, status: int, size: int,
               started: float, secret_free: bool = False) -> None:
    """One access line. Under `tileserver serve` the line goes straight to the buffer: a LogRecord
    and its formatting cost ~40 µs a request under load (benchmarks/RESULTS.md)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    # `secret_free`: the caller knows every parameter, none of them a key
    shown_query = (query.decode("latin-1") if secret_free else redacted_query(query)) if query else ""
    if json_logs():  # log_format = "json": the line is the whole record, time included
        line = access_json(request_id, method, path, shown_query, status, size, time.perf_counter() - started)
        if _server_buffer is not None:
            _server_buffer.add(line, stamped=False)
        else:
            access_log.info("%s", line)
        return
    shown = f"{path}?{shown_query}" if shown_query else path
    line = f"{request_id} {method} {shown} {status} {size}B {(time.perf_counter() - started) * 1000:.1f}ms"
    if _server_buffer is not None:
        _server_buffer.add(line)
    else:
        access_log.info("%s", line)


class BufferedAccessLog(logging.handlers.MemoryHandler):
    """Access lines written in batches: one write syscall per request cost ~50 µs under load
    (benchmarks/RESULTS.md). Flushed when full and every second by `flush_periodically`.

    `add` takes a line already formatted, without a LogRecord; records sent through the logger
    (`access_log.info`) are buffered as well. Lines keep the logger's layout:
    ``<asctime> access <line>``."""

    def __init__(self) -> None:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("%(asctime)s access %(message)s"))
        super().__init__(capacity=512, flushLevel=logging.WARNING, target=stream)
        self.stream = stream
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""

    def add(self, line: str, stamped: bool = True) -> None:
        if not stamped:  # a JSON record carries its own time
            self._lines.append(line + "\n")
            if len(self._lines) >= self.capacity:
                self.flush()
            return
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once a second, not once a request
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        self._lines.append(f"{self._stamp},{int(now * 1000) % 1000:03d} access {line}\n")
        if len(self._lines) >= self.capacity:
            self.flush()

    def flush(self) -> None:
        super().flush()
        if self._lines:
            text, self._lines = "".join(self._lines), []
            self.acquire()
            try:
                self.stream.stream.write(text)
                self.stream.flush()
            except Exception:  # a closed or broken stderr must not fail requests
                pass
            finally:
                self.release()


_server_buffer: BufferedAccessLog | None = None


def configure_server_logging(settings: Settings | None = None) -> None:
    """Logging of a `tileserver serve` process (each uvicorn worker runs this): plain lines on stderr
    (JSON objects with `log_format = "json"`), the access log buffered. Library users and tests keep
    their own logging configuration (the access line still follows `log_format`)."""
    global _server_buffer
    json_format = settings is not None and settings.log_format == "json"
    use_json_logs(json_format)
    level = os.environ.get("TILESERVER_LOG_LEVEL")
    if not level or any(isinstance(h, BufferedAccessLog) for h in access_log.handlers):
        return
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if json_format:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    _server_buffer = BufferedAccessLog()
    access_log.addHandler(_server_buffer)
    access_log.propagate = False


def buffered_access_log() -> BufferedAccessLog | None:
    return next((h for h in access_log.handlers if isinstance(h, BufferedAccessLog)), None)


async def flush_periodically(handler: BufferedAccessLog, interval: float = 1.0) -> None:
    import asyncio

    try:
        while True:
            await asyncio.sleep(interval)
            handler.flush()
    finally:
        handler.flush()


def middleware(settings: Settings) -> list[Middleware]:
    from tileserver.services.policy import ServiceGate

    return [Middleware(HttpBehaviour), Middleware(ServiceGate)]
