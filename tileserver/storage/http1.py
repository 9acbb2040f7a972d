"""A small HTTP/1.1 client for the storage read path: GET and HEAD over kept-alive connections.

Every tile on S3 is one ranged GET. Through aiohttp that request cost ~90 µs of CPU on the event
loop (request and response objects, multidicts, stream readers, timers); this client spends a
fraction of that: one asyncio Protocol per connection, the request written as one bytes object
(`send` takes it ready-made from the signer), the answer parsed straight from the read that holds
it, headers beyond the framing ones parsed only when asked for, and no timer per request (a
deadline per connection, checked by one lazily re-armed timer); benchmarks/RESULTS.md, "S3 read
path". It does only what the read path needs:
no redirects, no proxies, no compression, no request bodies. Writes, listings and credentials stay
with aiobotocore.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

_MAX_HEAD = 64 << 10  # bytes of status line + headers accepted
_TICK = 0.05  # seconds: how late past its deadline a stalled request may be failed


class HttpError(ConnectionError):
    """The peer broke the exchange: closed early, or answered something that is not HTTP/1.x."""


class Headers(Mapping[str, str]):
    """Response headers, looked up without regard to case; parsed from the raw head on first use
    (a tile read never looks at them: the framing fields are read apart, see `_Connection`)."""

    __slots__ = ("_head", "_map")

    def __init__(self, head: bytes) -> None:
        self._head = head
        self._map: dict[str, str] | None = None

    def _parsed(self) -> dict[str, str]:
        if self._map is None:
            raw: dict[str, str] = {}
            for line in self._head.decode("latin-1").split("\r\n")[1:]:
                name, colon, value = line.partition(":")
                if colon:
                    key = name.strip().lower()
                    previous = raw.get(key)
                    raw[key] = value.strip() if previous is None else f"{previous}, {value.strip()}"
            self._map = raw
        return self._map

    def __getitem__(self, key: str) -> str:
        return self._parsed()[key.lower()]

    def get(self, key: str, default: Any = None) -> Any:
        return self._parsed().get(key.lower(), default)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._parsed()

    def __iter__(self) -> Iterator[str]:
        return iter(self._parsed())

    def __len__(self) -> int:
        return len(self._parsed())

    def __repr__(self) -> str:
        return f"Headers({self._parsed()!r})"


def _field(lower_head: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (``b"\r\ncontent-length:"``) in a lower-cased head, repeated
    fields joined by ``, `` as RFC 9110 reads them; None when absent."""
    at = lower_head.find(name)
    if at < 0:
        return None
    values = []
    while at >= 0:
        start = at + len(name)
        end = lower_head.find(b"\r\n", start)
        values.append(lower_head[start : end if end >= 0 else len(lower_head)].strip())
        at = lower_head.find(name, start)
    return values[0] if len(values) == 1 else b", ".join(values)


Answer = tuple[int, Headers, bytes, bool]


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; one request in flight at a time.

    Time-outs cost no timer per request: `exchange` only records the request's deadline, and one
    timer per connection, re-armed lazily, fails the request once it is found past its deadline
    (at most `_TICK` late). An idle connection holds no timer."""

    __slots__ = ("transport", "closed", "_loop", "_buffer", "_waiter", "_head_only", "_until_close", "_status",
                 "_head", "_body_at", "_length", "_chunked", "_keep_alive", "_deadline", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._loop = loop
        self._buffer = bytearray()
        self._waiter: asyncio.Future[Answer] | None = None
        self._head_only = False
        self._until_close = False
        self._status = 0
        self._head: bytes | None = None  # the status line and headers of the answer being read
        self._body_at = 0
        self._length = -1  # Content-Length, -1 when absent
        self._chunked = False
        self._keep_alive = True
        self._deadline = 0.0  # loop.time() by which the request in flight must be answered
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self._buffer += data
            return
        if not self._buffer and self._whole(data):
            return
        self._buffer += data
        try:
            self._advance()
        except HttpError as exc:
            self._fail(exc)

    def _whole(self, data: bytes) -> bool:
        """The whole answer came in this one read (a tile, usually): answered straight from `data`,
        which is never copied into the buffer. False: nothing done, take the buffered way."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        try:
            self._parse_head(data[:end])
        except HttpError:
            return False  # raised again by the buffered way
        if self._status >= 200:
            if self._head_only or self._status in (204, 304):
                self._done(b"")
                return True
            start, n = end + 4, self._length
            if n >= 0 and len(data) - start >= n:
                self._done(data[start : start + n])
                return True
        self._head = None
        return False

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._until_close and self._head is not None:  # a body delimited by the close
            waiter.set_result((self._status, Headers(self._head), bytes(self._buffer[self._body_at :]), False))
            return
        waiter.set_exception(HttpError(f"connection closed before the whole response ({exc or 'EOF'})"))

    # -- request -------------------------------------------------------------------------------

    def exchange(self, request: bytes, head_only: bool, deadline: float) -> asyncio.Future[Answer]:
        """Send one request; a future of (status, headers, body, whether the connection may be
        reused), failed with TimeoutError once `deadline` (loop time) has passed."""
        if self.closed or self.transport is None:
            raise HttpError("connection already closed")
        self._buffer.clear()
        self._head_only, self._until_close, self._head = head_only, False, None
        self._waiter = waiter = self._loop.create_future()
        self._deadline = deadline
        if self._timer is None or self._timer_at > deadline + _TICK:  # none, or one too late for this request
            self._arm(deadline)
        self.transport.write(request)
        return waiter

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline + _TICK  # a little late: the next requests' deadlines fall before it
        self._timer = self._loop.call_at(self._timer_at, self._check)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # idle: no timer until the next request
        if self._loop.time() >= self._deadline:
            self._fail(TimeoutError(f"no complete answer within the deadline ({len(self._buffer)} bytes received)"))
        else:
            self._arm(self._deadline)

    def close(self) -> None:
        self.closed = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    def _advance(self) -> None:
        buffer = self._buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    raise HttpError("response headers too large")
                return
            self._parse_head(bytes(buffer[:end]))
            self._body_at = end + 4
            if self._status < 200:  # 1xx interim answer: the real one follows
                del buffer[: self._body_at]
                self._head = None
                self._advance()
                return
        start = self._body_at
        if self._head_only or self._status in (204, 304):
            self._done(b"")
            return
        n = self._length
        if n >= 0:
            if len(buffer) - start >= n:
                self._done(bytes(buffer[start : start + n]))
            return
        if self._chunked:
            body = _dechunk(buffer, start)
            if body is not None:
                self._done(body)
            return
        self._until_close = True  # neither: the body ends with the connection
        self._keep_alive = False

    def _parse_head(self, head: bytes) -> None:
        """Status and the framing fields only (Content-Length, Transfer-Encoding, Connection)."""
        line_end = head.find(b"\r\n")
        status_line = head if line_end < 0 else head[:line_end]
        version, _, rest = status_line.partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise HttpError(f"not an HTTP/1.x answer: {status_line[:80]!r}")
        try:
            self._status = int(rest[:3])
        except ValueError:
            raise HttpError(f"bad status line {status_line[:80]!r}") from None
        lower = head.lower()
        length = _field(lower, b"\r\ncontent-length:")
        if length is None:
            self._length = -1
        else:
            try:
                self._length = int(length)
            except ValueError:
                raise HttpError(f"bad Content-Length {length.decode('latin-1')!r}") from None
            if self._length < 0:
                raise HttpError(f"bad Content-Length {self._length}")
        self._chunked = b"chunked" in (_field(lower, b"\r\ntransfer-encoding:") or b"")
        connection = _field(lower, b"\r\nconnection:") or b""
        self._keep_alive = b"close" not in connection and (version != b"HTTP/1.0" or b"keep-alive" in connection)
        self._head = head

    def _done(self, body: bytes) -> None:
        assert self._head is not None and self._waiter is not None
        self._waiter.set_result((self._status, Headers(self._head), body, self._keep_alive and not self.closed))


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
        self._busy = 0  # requests holding a connection slot
        self._queue: deque[asyncio.Future[None]] = deque()  # requests waiting for one, first come first served

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
        return await self.send("".join(lines).encode("latin-1"), method == "HEAD", timeout)

    async def send(self, request: bytes, head_only: bool = False,
                   timeout: float | None = None) -> tuple[int, bytes, Headers]:
        """`request` for a whole request head as bytes (its own Host header included: see
        `host_header`); otherwise as `request`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._timeout if timeout is None else timeout)
        if self._busy < self._limit and not self._queue:
            self._busy += 1
        else:
            await self._wait_for_slot(loop, deadline)
        try:
            for attempt in (1, 2):
                connection = self._take_idle()
                reused = connection is not None
                if connection is None:
                    connection = await self._connect(loop, deadline)
                try:
                    status, answer_headers, body, keep = await connection.exchange(request, head_only, deadline)
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
        finally:
            self._release()
        raise AssertionError("unreachable")

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Every connection is busy: queue until `_release` hands this request a slot, or the deadline."""
        waiter: asyncio.Future[None] = loop.create_future()
        self._queue.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed a slot just as it gave up: pass it on
                self._release()
            else:
                try:
                    self._queue.remove(waiter)
                except ValueError:
                    pass
            raise

    def _release(self) -> None:
        """A request is done with its slot: hand it to the first one waiting, else free it."""
        queue = self._queue
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: `_busy` unchanged
                return
        self._busy -= 1

    @property
    def host_header(self) -> str:
        """The Host header value `request` sends (``host[:port]``, the port only when not the default)."""
        return self._host_header

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        async with asyncio.timeout_at(min(deadline, loop.time() + self._connect_timeout)):
            _, protocol = await loop.create_connection(
                lambda: _Connection(loop), self.host, self.port, ssl=self._ssl,
                server_hostname=self.host if self._ssl is not None else None,
            )
        return protocol

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
