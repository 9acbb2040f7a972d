"""The storage read path's HTTP/1.1 client against scripted servers on loopback: framing (length,
chunked, until close, HEAD), keep-alive reuse, a dropped idle connection, broken answers, time-outs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from tileserver.storage.http1 import Http1Client, HttpError
from tileserver.storage.sigv4 import Credentials, SigV4Signer, canonical_uri


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


async def test_a_stalled_answer_times_out_and_the_next_request_gets_a_fresh_connection():
    """Headers then silence: the per-connection deadline fails the request (no timer of its own),
    the connection is dropped, and the next request on the client is answered on a new one."""
    stalled = b"HTTP/1.1 206 Partial Content\r\nContent-Length: 100\r\n\r\nonly part"
    whole = b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\n\r\nhello"

    def answer(n: int, _: bytes) -> bytes:
        return stalled if n == 2 else whole

    async with Scripted(answer) as server:
        http = client(server.port, timeout=5.0)
        assert (await http.request("GET", "/a", {}))[1] == b"hello"  # connection 1, kept alive
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await http.request("GET", "/b", {}, timeout=0.2)
        assert 0.2 <= loop.time() - started < 1.0
        assert (await http.request("GET", "/c", {}))[1] == b"hello"
        assert (await http.request("GET", "/d", {}))[1] == b"hello"
        await http.close()
    assert server.connections == 2 and len(server.requests) == 4


async def test_a_short_deadline_after_long_ones_still_fires_in_time():
    """A connection's timer armed for a long budget is re-armed for a shorter one."""
    def answer(n: int, _: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" if n == 1 else b"HTTP/1.1 200 OK\r\n"

    async with Scripted(answer) as server:
        http = client(server.port)
        assert (await http.request("GET", "/x", {}, timeout=30.0))[1] == b"ok"
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await http.request("GET", "/x", {}, timeout=0.15)
        assert loop.time() - started < 1.0
        await http.close()


async def test_the_deadline_covers_the_wait_for_a_connection_slot():
    async with Scripted(lambda n, _: b"HTTP/1.1 200 OK\r\n" if n == 1 else b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as server:
        http = client(server.port, limit=1)
        first = asyncio.create_task(http.request("GET", "/stalls", {}, timeout=2.0))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):  # the only slot is taken by the stalled request
            await http.request("GET", "/waits", {}, timeout=0.1)
        with pytest.raises(TimeoutError):
            await first
        assert (await http.request("GET", "/then", {}, timeout=1.0))[0] == 200
        await http.close()


async def test_idle_connections_hold_no_timer():
    async with Scripted(lambda n, _: b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1") as server:
        http = client(server.port, timeout=0.1)
        for _ in range(3):
            assert (await http.request("GET", "/x", {}))[1] == b"1"
        await asyncio.sleep(0.3)  # past the deadlines: the timer fired, found nothing in flight, stopped
        (connection,) = http._idle
        assert connection._timer is None and not connection.closed
        assert (await http.request("GET", "/x", {}))[1] == b"1"
        await http.close()
    assert server.connections == 1


async def test_headers_are_read_lazily_and_repeated_fields_are_joined():
    raw = (b"HTTP/1.1 200 OK\r\nX-Amz-Request-Id: R1\r\nVary: a\r\ncontent-length: 2\r\nVARY: b\r\n"
           b"Connection: keep-alive\r\n\r\nok")
    async with Scripted(lambda n, _: raw) as server:
        http = client(server.port)
        status, body, headers = await http.request("GET", "/x", {})
        assert (status, body) == (200, b"ok")
        assert headers["x-amz-request-id"] == "R1" and headers.get("Vary") == "a, b" and "CONTENT-LENGTH" in headers
        assert dict(headers) == {"x-amz-request-id": "R1", "vary": "a, b", "content-length": "2",
                                 "connection": "keep-alive"}
        await http.close()


async def test_repeated_content_lengths_are_refused():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk"
    async with Scripted(lambda n, _: raw, close_after=True) as server:
        with pytest.raises(HttpError, match="Content-Length"):
            await client(server.port).request("GET", "/x", {})


@pytest.mark.parametrize("key", ["PYR/DATA_6_1121_11181", "a b/c+d=é~%x(1)!*'", "ünï/😀"])
@pytest.mark.parametrize("token", [None, "session/token+=="])
@pytest.mark.parametrize(("method", "range_header"), [("GET", "bytes=0-2047"), ("GET", None), ("HEAD", None)])
def test_signed_request_head_matches_botocore(key: str, token: str | None, method: str,
                                              range_header: str | None) -> None:
    """The bytes `request_head` writes carry exactly the headers botocore's SigV4 signer computes."""
    uri = "/prefix" + canonical_uri("my-bucket", key)
    request = AWSRequest(method, "https://s3.example.test:8443" + uri,
                         headers={"Range": range_header} if range_header else {})
    S3SigV4Auth(BotoCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token), "s3", "eu-west-3").add_auth(request)
    signer = SigV4Signer("eu-west-3")
    for _ in range(2):  # the second time from the cached signing key and credential scope
        head = signer.request_head(Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token), method,
                                   "s3.example.test:8443", uri, range_header, amz_date=request.headers["X-Amz-Date"])
        assert head.endswith(b"\r\n\r\n")
        first, *lines = head[:-4].decode("latin-1").split("\r\n")
        assert first == f"{method} {uri} HTTP/1.1"
        sent = dict(line.split(": ", 1) for line in lines)
        assert len(sent) == len(lines)  # no header twice
        expected = {"Host": "s3.example.test:8443", "Accept-Encoding": "identity"}
        for name in ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256", "X-Amz-Security-Token", "Range"):
            if name in request.headers:
                expected[name] = request.headers[name]
        assert sent == expected
    assert sent["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")


def test_the_signing_key_follows_the_day_and_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """One signer across midnight and a rotated secret (its cached key must follow both)."""
    import datetime

    import botocore.auth

    signer = SigV4Signer("eu-west-3")
    for day, secret in [("20260101", "s1"), ("20260102", "s1"), ("20260102", "s2")]:
        amz_date = f"{day}T120000Z"
        now = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ")
        monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda now=now: now)  # botocore's clock
        request = AWSRequest("GET", "http://h/b/k")
        S3SigV4Auth(BotoCredentials("AK", secret), "s3", "eu-west-3").add_auth(request)
        assert request.headers["X-Amz-Date"] == amz_date
        head = signer.request_head(Credentials("AK", secret), "GET", "h", "/b/k", amz_date=amz_date)
        assert f"Authorization: {request.headers['Authorization']}\r\n".encode() in head


async def test_an_answer_split_over_several_reads():
    """Head and body in separate TCP reads take the buffered way; in one read, the direct one."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                for part in (b"HTTP/1.1 206 Partial", b" Content\r\nContent-Length: 6\r\n\r\nab", b"cdef"):
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.02)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        http = client(server.sockets[0].getsockname()[1])
        for _ in range(2):
            assert (await http.request("GET", "/x", {}))[:2] == (206, b"abcdef")
        await http.close()
    finally:
        server.close()


async def test_waiting_requests_that_give_up_free_their_place():
    """Cancelled or timed-out waiters for a slot leave the queue; the slot is not lost."""
    async with Scripted(lambda n, _: b"HTTP/1.1 200 OK\r\n" if n == 1 else b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1") as server:
        http = client(server.port, limit=1)
        stalled = asyncio.create_task(http.request("GET", "/stalls", {}, timeout=0.5))
        await asyncio.sleep(0.05)
        cancelled = asyncio.create_task(http.request("GET", "/cancelled", {}))
        waiting = asyncio.create_task(http.request("GET", "/waits", {}, timeout=3.0))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(TimeoutError):
            await http.request("GET", "/gives-up", {}, timeout=0.05)
        with pytest.raises(TimeoutError):
            await stalled
        assert (await waiting)[1] == b"1"  # got the slot the stalled request freed
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert (http._busy, len(http._queue)) == (0, 0)
        assert (await http.request("GET", "/then", {}))[1] == b"1"
        await http.close()
