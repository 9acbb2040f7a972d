"""The storage read path's HTTP/1.1 client against scripted servers on loopback: framing (length,
chunked, until close, HEAD), keep-alive reuse, a dropped idle connection, broken answers, time-outs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tileserver.storage.http1 import Http1Client, HttpError


class Scripted:
    """A TCP server answering each request (read up to the blank line) with `answer(n, request)`."""

    def __init__(self, answer: Callable[[int, bytes], bytes | None], close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    request = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                    return
                self.requests.append(request)
                answer = self.answer(len(self.requests), request)
                if answer is None:  # hang up without answering
                    return
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    return
        finally:
            writer.close()


def client(port: int, **kwargs) -> Http1Client:
    return Http1Client("http", "127.0.0.1", port, **kwargs)


async def test_length_chunked_head_and_keep_alive():
    answers = {
        1: b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\nETag: \"x\"\r\n\r\nhello",
        2: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n",
        3: b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n",  # HEAD: no body whatever the length says
        4: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno",
    }
    async with Scripted(lambda n, _: answers[n]) as server:
        http = client(server.port)
        status, body, headers = await http.request("GET", "/b/k", {"Range": "bytes=0-4", "Host": "h:1"})
        assert (status, body, headers["etag"], headers.get("ETAG")) == (206, b"hello", '"x"', '"x"')
        assert (await http.request("GET", "/b/k", {}))[:2] == (200, b"abcdefg")
        status, body, headers = await http.request("HEAD", "/b/k", {})
        assert (status, body, headers.get("Content-Length")) == (200, b"", "12345")
        assert (await http.request("GET", "/b/missing", {}))[:2] == (404, b"no")
        await http.close()
    assert server.connections == 1  # one kept-alive connection served them all
    first = server.requests[0].decode()
    assert first.startswith("GET /b/k HTTP/1.1\r\n") and first.count("Host:") == 1 and "Host: h:1" in first
    assert f"Host: 127.0.0.1:{server.port}" in server.requests[1].decode()


async def test_body_until_close_and_connection_close():
    async with Scripted(lambda n, _: b"HTTP/1.0 200 OK\r\n\r\nall of it", close_after=True) as server:
        http = client(server.port)
        assert (await http.request("GET", "/x", {}))[:2] == (200, b"all of it")
        assert (await http.request("GET", "/x", {}))[:2] == (200, b"all of it")
    assert server.connections == 2


async def test_a_dropped_idle_connection_is_retried_once_on_a_fresh_one():
    def answer(n: int, _: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" if n != 2 else None

    async with Scripted(answer) as server:
        http = client(server.port)
        assert (await http.request("GET", "/x", {}))[1] == b"ok"
        assert (await http.request("GET", "/x", {}))[1] == b"ok"  # request 2 hung up: retried as 3
    assert server.connections == 2 and len(server.requests) == 3


async def test_broken_answers_raise():
    cases = [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then the server closes
        b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
    ]
    for raw in cases:
        async with Scripted(lambda n, _, raw=raw: raw, close_after=True) as server:
            with pytest.raises(HttpError):
                await client(server.port).request("GET", "/x", {})


async def test_time_outs():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(TimeoutError):
            await client(port, timeout=0.2).request("GET", "/x", {})
    finally:
        server.close()
    with pytest.raises(OSError):  # nobody listening
        await client(port, timeout=1.0).request("GET", "/x", {})


async def test_at_most_limit_connections_at_once():
    async with Scripted(lambda n, r: b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1") as server:
        http = client(server.port, limit=3)
        answers = await asyncio.gather(*(http.request("GET", f"/{i}", {}) for i in range(20)))
        assert all(a[1] == b"1" for a in answers)
        await http.close()
    assert server.connections <= 3


async def test_tls(tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        port = server.sockets[0].getsockname()[1]
        unverified = Http1Client("https", "127.0.0.1", port, verify_tls=False)
        assert (await unverified.request("GET", "/x", {}))[:2] == (200, b"secret")
        with pytest.raises(ssl.SSLError):  # self-signed: refused when verifying (ROK4_SSL_NO_VERIFY unset)
            await Http1Client("https", "127.0.0.1", port).request("GET", "/x", {})
    finally:
        server.close()
