"""A small HTTP/1.1 client for the storage read path: GET and HEAD over kept-alive connections.

Every tile on S3 is one ranged GET. Through aiohttp that request cost ~90 µs of CPU on the event
loop (request and response objects, multidicts, stream readers, timers); this client spends a
fraction of that: one asyncio Protocol per connection, the request written as one bytes object,
the response parsed from one buffer (benchmarks/RESULTS.md). It does only what the read path needs:
no redirects, no proxies, no compression, no request bodies. Writes, listings and credentials stay
with aiobotocore.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import Any

_MAX_HEAD = 64 << 10  # bytes of status line + headers accepted


class HttpError(ConnectionError):
    """The peer broke the exchange: closed early, or answered something that is not HTTP/1.x."""


class Headers(dict[str, str]):
    """Response headers, looked up without regard to case (keys are stored lower-case)."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, Headers, bytes, bool]] | None = None
        self._head_only = False
        self._until_close = False
        self._status = 0
        self._headers: Headers | None = None
        self._body_at = 0
        self._keep_alive = True

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is not None and not self._waiter.done():
            try:
                self._advance()
            except HttpError as exc:
                self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._until_close and self._headers is not None:  # a body delimited by the close
            waiter.set_result((self._status, self._headers, bytes(self._buffer[self._body_at :]), False))
            return
        waiter.set_exception(HttpError(f"connection closed before the whole response ({exc or 'EOF'})"))

    # -- request -------------------------------------------------------------------------------

    async def exchange(self, request: bytes, head_only: bool) -> tuple[int, Headers, bytes, bool]:
        """Send one request; (status, headers, body, whether the connection may be reused)."""
        if self.closed or self.transport is None:
            raise HttpError("connection already closed")
        self._buffer.clear()
        self._head_only, self._until_close, self._headers = head_only, False, None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    def _advance(self) -> None:
        buffer = self._buffer
        if self._headers is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    raise HttpError("response headers too large")
                return
            self._parse_head(bytes(buffer[:end]))
            self._body_at = end + 4
            if self._status < 200:  # 1xx interim answer: the real one follows
                del buffer[: self._body_at]
                self._headers = None
                self._advance()
                return
        assert self._headers is not None
        headers, start = self._headers, self._body_at
        if self._head_only or self._status in (204, 304):
            self._done(b"")
            return
        length = dict.get(headers, "content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise HttpError(f"bad Content-Length {length!r}") from None
            if len(buffer) - start >= n:
                self._done(bytes(buffer[start : start + n]))
            return
        if "chunked" in dict.get(headers, "transfer-encoding", "").lower():
            body = _dechunk(buffer, start)
            if body is not None:
                self._done(body)
            return
        self._until_close = True  # neither: the body ends with the connection
        self._keep_alive = False

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise HttpError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
        try:
            self._status = int(rest[:3])
        except ValueError:
            raise HttpError(f"bad status line {lines[0][:80]!r}") from None
        raw: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if colon:
                key = name.strip().lower()
                previous = raw.get(key)
                raw[key] = value.strip() if previous is None else f"{previous}, {value.strip()}"
        self._headers = Headers(raw)
        connection = raw.get("connection", "").lower()
        self._keep_alive = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)

    def _done(self, body: bytes) -> None:
        assert self._headers is not None and self._waiter is not None
        self._waiter.set_result((self._status, self._headers, body, self._keep_alive and not self.closed))


def _dechunk(buffer: bytearray, start: int) -> bytes | None:
    """The body of a complete chunked message, or None while more is to come."""
    parts: list[bytes] = []
    at = start
    while True:
        eol = buffer.find(b"\r\n", at)
        if eol < 0:
            return None
        try:
            size = int(bytes(buffer[at:eol]).split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HttpError("bad chunk size") from None
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", eol)
            if buffer[eol : eol + 4] == b"\r\n\r\n" or trailer_end >= 0:
                return b"".join(parts)
            return None
        chunk_start = eol + 2
        if len(buffer) < chunk_start + size + 2:
            return None
        parts.append(bytes(buffer[chunk_start : chunk_start + size]))
        at = chunk_start + size + 2


class Http1Client:
    """Kept-alive connections to one endpoint, at most `limit` at once."""

    def __init__(self, scheme: str, host: str, port: int, *, limit: int = 256, timeout: float = 10.0,
                 connect_timeout: float = 3.0, verify_tls: bool = True) -> None:
        self.host, self.port = host, port
        default = 443 if scheme == "https" else 80
        bracketed = f"[{host}]" if ":" in host else host  # an IPv6 literal
        self._host_header = bracketed if port == default else f"{bracketed}:{port}"
        self._ssl: ssl.SSLContext | None = None
        if scheme == "https":
            self._ssl = ssl.create_default_context()
            if not verify_tls:
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        self._limit = max(1, limit)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._slots: asyncio.Semaphore | None = None

    async def request(self, method: str, target: str, headers: Mapping[str, str],
                      timeout: float | None = None) -> tuple[int, bytes, Headers]:
        """(status, body, headers) of one GET or HEAD; OSError/HttpError/TimeoutError on failure.

        `timeout` (default: the client's) bounds everything: waiting for a connection slot,
        connecting (itself within the connect timeout) and the whole answer."""
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        if not any(name.lower() == "host" for name in headers):  # a signer may have set it already
            lines.append(f"Host: {self._host_header}\r\n")
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        lines.append("\r\n")
        raw = "".join(lines).encode("latin-1")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._limit)
        async with asyncio.timeout(self._timeout if timeout is None else timeout), self._slots:
            for attempt in (1, 2):
                connection = self._take_idle()
                reused = connection is not None
                if connection is None:
                    connection = await self._connect()
                try:
                    status, answer_headers, body, keep = await connection.exchange(raw, method == "HEAD")
                except HttpError:
                    connection.close()
                    if reused and attempt == 1:  # the server dropped an idle connection: once more, fresh
                        continue
                    raise
                except BaseException:  # cancelled or timed out mid-answer: the connection is unusable
                    connection.close()
                    raise
                if keep:
                    self._idle.append(connection)
                else:
                    connection.close()
                return status, body, answer_headers
        raise AssertionError("unreachable")

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            _, protocol = await loop.create_connection(
                _Connection, self.host, self.port, ssl=self._ssl,
                server_hostname=self.host if self._ssl is not None else None,
            )
        return protocol

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
