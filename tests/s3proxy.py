"""A counting, fault-injecting HTTP proxy in front of the moto S3 server.

It runs its own asyncio loop in a thread, so it works whatever loop (or none) a test uses. Every
request is recorded *when it arrives* (method, path, Range, then the status sent back), which lets
tests prove things like "one index read per cold slab under concurrency". Faults are queued and
taken by the next matching requests, in order:

    proxy.fail_next(2, 503)          # answer 503 SlowDown twice, then forward again
    proxy.stall_next(1, 5.0)         # hold the next request 5 s before forwarding it
    proxy.reset_next(1)              # drop the next connection with a TCP RST
    proxy.hold() / proxy.release()   # a stalled S3: every request waits (recorded) until released
    proxy.count("GET", "/bucket/key", "bytes=0-2047")
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout", 429: "Too Many Requests", 403: "Forbidden", 404: "Not Found"}
_CODES = {500: "InternalError", 503: "SlowDown", 429: "TooManyRequests", 403: "AccessDenied",
          404: "NoSuchKey", 502: "BadGateway", 504: "GatewayTimeout"}


@dataclass
class ProxiedRequest:
    """One request as the proxy received it; `status` is what it answered (None: reset, or no answer yet)."""

    method: str
    path: str  # raw (percent-encoded) URL path, no query
    query: str
    range: str | None
    headers: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    fault: str | None = None

    @property
    def bucket(self) -> str:
        return unquote(self.path.lstrip("/").partition("/")[0])

    @property
    def key(self) -> str:
        return unquote(self.path.lstrip("/").partition("/")[2])


@dataclass
class _Fault:
    kind: str  # "fail", "stall", "reset"
    remaining: int
    status: int = 503
    seconds: float = 0.0
    method: str | None = None
    path: str | None = None  # a substring of the raw path

    def matches(self, request: ProxiedRequest) -> bool:
        return (self.method is None or request.method == self.method.upper()) and (
            self.path is None or self.path in request.path
        )


@dataclass
class _Message:
    head: list[str]
    headers: list[tuple[str, str]]
    body: bytes = b""
    extra: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


async def _read_body(reader: asyncio.StreamReader, message: _Message, *, until_eof: bool) -> bytes:
    if (message.header("Transfer-Encoding") or "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = message.header("Content-Length")
    if length is not None:
        return await reader.readexactly(int(length))
    return await reader.read() if until_eof else b""


async def _read_head(reader: asyncio.StreamReader) -> _Message | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = raw.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return _Message(lines[0].split(" ", 2), headers)


class S3Proxy:
    """`url`, `requests`, `fail_next`, `stall_next`, `reset_next`, `count`, `counts`, `clear`."""

    def __init__(self, upstream: str, host: str = "127.0.0.1") -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._host = host
        self.port = 0
        self.requests: list[ProxiedRequest] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._holding = False

    @property
    def name(self) -> str:
        return f"{self._host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.name}"

    # -- test API -----------------------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 503, *, method: str | None = None, path: str | None = None) -> None:
        """Answer the next `n` matching requests with `status` and an S3 error body."""
        self._add(_Fault("fail", n, status=status, method=method, path=path))

    def stall_next(self, n: int = 1, seconds: float = 5.0, *, method: str | None = None,
                   path: str | None = None) -> None:
        """Hold the next `n` matching requests `seconds` before forwarding them."""
        self._add(_Fault("stall", n, seconds=seconds, method=method, path=path))

    def reset_next(self, n: int = 1, *, method: str | None = None, path: str | None = None) -> None:
        """Drop the next `n` matching requests' connections with a TCP reset, answering nothing."""
        self._add(_Fault("reset", n, method=method, path=path))

    def hold(self) -> None:
        """Stall the storage: every request from now on is recorded, then waits until `release`."""
        self._holding = True

    def release(self) -> None:
        """Let held and new requests through again (held ones are then forwarded)."""
        self._holding = False

    def clear(self) -> None:
        """Forget recorded requests and pending faults; release a hold."""
        with self._lock:
            self.requests.clear()
            self._faults.clear()
        self._holding = False

    def count(self, method: str | None = None, path: str | None = None, range: str | None = None) -> int:
        """Requests received matching every given field (`path` is the raw URL path)."""
        with self._lock:
            return sum(
                1 for r in self.requests
                if (method is None or r.method == method) and (path is None or r.path == path)
                and (range is None or r.range == range)
            )

    def counts(self) -> Counter[tuple[str, str, str | None]]:
        """Requests received per (method, path, Range)."""
        with self._lock:
            return Counter((r.method, r.path, r.range) for r in self.requests)

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> S3Proxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(asyncio.start_server(self._handle, self._host, 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="s3proxy", daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop = None

    # -- internals ------------------------------------------------------------------------------------

    def _add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, request: ProxiedRequest) -> _Fault | None:
        with self._lock:
            self.requests.append(request)
            for fault in self._faults:
                if fault.remaining > 0 and fault.matches(request):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                message = await _read_head(reader)
                if message is None or len(message.head) < 2:
                    return
                if (message.header("Expect") or "").lower() == "100-continue":  # botocore PUTs
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                message.body = await _read_body(reader, message, until_eof=False)
                method = message.head[0].upper()
                target = urlsplit(message.head[1])
                request = ProxiedRequest(method, target.path, target.query, message.header("Range"),
                                         dict(message.headers))
                fault = self._take_fault(request)
                while self._holding:
                    await asyncio.sleep(0.02)
                if fault is not None:
                    request.fault = fault.kind
                if fault is not None and fault.kind == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if fault is not None and fault.kind == "stall":
                    await asyncio.sleep(fault.seconds)
                if fault is not None and fault.kind == "fail":
                    status, response = fault.status, _error_response(fault.status, request)
                else:
                    status, response = await self._forward(message, method == "HEAD")
                request.status = status  # before writing: the client may look as soon as it reads
                writer.write(response)
                await writer.drain()
                if (message.header("Connection") or "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return  # client gone, or the proxy is stopping
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _forward(self, message: _Message, head_only: bool) -> tuple[int, bytes]:
        """Send the request upstream on a fresh connection and re-frame the answer with a length."""
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        try:
            lines = [" ".join(message.head)]
            for name, value in message.headers:
                if name.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length", "expect"):
                    lines.append(f"{name}: {value}")
            lines.append(f"Content-Length: {len(message.body)}")
            lines.append("Connection: close")
            up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + message.body)
            await up_writer.drain()
            answer = await _read_head(up_reader)
            if answer is None:
                raise ConnectionError("upstream closed")
            status = int(answer.head[1])
            body = b"" if head_only or status in (204, 304) else await _read_body(up_reader, answer, until_eof=True)
        finally:
            up_writer.close()
        lines = [" ".join(answer.head)]
        for name, value in answer.headers:
            lowered = name.lower()
            if lowered in ("connection", "keep-alive", "transfer-encoding"):
                continue
            if lowered == "content-length" and not head_only:
                continue
            lines.append(f"{name}: {value}")
        if not head_only:
            lines.append(f"Content-Length: {len(body)}")
        return status, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _error_response(status: int, request: ProxiedRequest) -> bytes:
    code = _CODES.get(status, "InternalError")
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' + code.encode()
        + b"</Code><Message>injected by the test proxy</Message><Resource>"
        + request.path.encode() + b"</Resource></Error>"
    )
    if request.method == "HEAD":
        body_part = b""
    else:
        body_part = body
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body_part
