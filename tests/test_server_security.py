"""The server process's own defences, over real sockets: the demo's admin token, the admin API's
publish roots, the header timeout (slowloris) and which proxies' forwarded headers are believed."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from apputil import PYRAMIDS, app_client, make_settings, running

from tileserver.app import create_app
from tileserver.server_cli import uvicorn_options
from tileserver.settings import Settings

WORKTREE = Path(__file__).resolve().parent.parent
HEADER_TIMEOUT = 1.0  # seconds, the served process's setting
DEMO_LAYER = {"title": "t", "abstract": "a", "keywords": [], "styles": ["normal"]}


def other_address() -> str | None:
    """A non-loopback IPv4 address of this machine that can be bound, if it has one."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for candidate in out.split():
        if "." in candidate and not candidate.startswith("127."):
            with socket.socket() as s, contextlib.suppress(OSError):
                s.bind((candidate, 0))
                return candidate
    return None


OTHER = other_address()


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This worktree's code, none of the developer's tileserver or ROK4 settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TILESERVER_", "ROK4_"))}
    env.update(PYTHONPATH=str(WORKTREE), PYTHONUNBUFFERED="1", **extra)
    return env


@contextlib.contextmanager
def serve(data_dir: Path, host: str, **env: str) -> Iterator[tuple[str, Path]]:
    """`tileserver serve` as the README starts it (no token), in a subprocess; yields (base URL, stdout file)."""
    port = free_port(host)
    out = data_dir.parent / f"serve-{port}.out"
    command = [sys.executable, "-m", "tileserver.cli", "serve", "--host", host, "--port", str(port),
               "--data-dir", str(data_dir), "--log-level", "warning"]  # fmt: skip
    with out.open("w") as stdout:
        process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, env=clean_env(**env))
    base = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, out.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        yield base, out
    finally:
        process.terminate()
        process.wait(20)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """One demo server without a configured token, on a non-loopback address when the machine has one."""
    data_dir = tmp_path_factory.mktemp("served") / "data"
    with serve(data_dir, OTHER or "127.0.0.1", TILESERVER_HEADER_TIMEOUT=str(HEADER_TIMEOUT)) as (base, out):
        yield base, out, data_dir


def token_of(data_dir: Path) -> str:
    return (data_dir / "admin-token").read_text().strip()


# --- 7a: the demo's admin API -------------------------------------------------------------------


def test_serve_demo_generates_a_private_admin_token(served: tuple[str, Path, Path]) -> None:
    base, out, data_dir = served
    token_file = data_dir / "admin-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_of(data_dir)
    assert len(token) >= 32
    printed = out.read_text()
    assert f"demo admin token (shown once, kept in {token_file}): {token}" in printed
    # from a non-loopback address (when there is one) the admin API wants the token
    for headers, status in (({}, 401), ({"X-Rok4-Secret": "nope"}, 403), ({"Authorization": f"Bearer {token}x"}, 403)):
        response = httpx.get(base + "/admin/layers", headers=headers)
        assert response.status_code == status, response.text
    layers = httpx.get(base + "/admin/layers", headers={"Authorization": f"Bearer {token}"})
    assert layers.status_code == 200 and [layer["id"] for layer in layers.json()] == ["SCAN1000"]
    assert httpx.get(base + "/").status_code == 200  # the README's first command still serves the demo


def test_serve_demo_token_is_kept_and_not_shown_again(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with serve(data_dir, "127.0.0.1") as (_, first_out):
        token = token_of(data_dir)
        assert token in first_out.read_text()
    with serve(data_dir, "127.0.0.1") as (base, second_out):
        printed = second_out.read_text()
        assert f"demo admin token in {data_dir / 'admin-token'}" in printed and token not in printed
        assert token_of(data_dir) == token
        assert httpx.get(base + "/admin/layers", headers={"X-Rok4-Secret": token}).status_code == 200
        assert httpx.get(base + "/admin/layers").status_code == 401  # loopback is no exception either
    with serve(tmp_path / "configured", "127.0.0.1", TILESERVER_ADMIN_TOKEN="mine-8d1e") as (base, out):
        assert not (tmp_path / "configured" / "admin-token").exists() and "demo admin token" not in out.read_text()
        assert httpx.get(base + "/admin/layers", headers={"X-Rok4-Secret": "mine-8d1e"}).status_code == 200


@contextlib.contextmanager
def live(settings: Settings, hosts: list[str]) -> Iterator[list[str]]:
    """The app under uvicorn with `tileserver serve`'s options, listening on each host; yields base URLs."""
    sockets = []
    for host in hosts:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sockets.append(sock)
    options = {k: v for k, v in uvicorn_options(settings).items() if k not in ("host", "port", "workers")}
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", lifespan="on", **options))
    try:
        with running(server, sockets=sockets):
            yield [f"http://{host}:{sock.getsockname()[1]}" for host, sock in zip(hosts, sockets, strict=True)]
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.skipif(OTHER is None, reason="this machine has no non-loopback address")
def test_demo_without_token_answers_local_clients_only(tmp_path: Path) -> None:
    """The app itself (run by uvicorn directly, without `tileserver serve`), demo on and no token."""
    assert OTHER is not None
    settings = make_settings(tmp_path, demo=True, admin_token="")
    with live(settings, ["127.0.0.1", OTHER]) as (local, remote):
        assert httpx.get(local + "/admin/layers").status_code == 200
        refused = httpx.get(remote + "/admin/layers")
        assert refused.status_code == 403 and "local clients only" in refused.json()["detail"]
        # a forged X-Forwarded-For from an untrusted peer changes nothing ...
        assert httpx.get(remote + "/admin/layers", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 403
        # ... while the trusted local proxy's word about a remote client is believed
        forwarded = httpx.get(local + "/admin/layers", headers={"X-Forwarded-For": "203.0.113.7"})
        assert forwarded.status_code == 403
        assert httpx.put(remote + "/admin/off").status_code == 403
    # forwarded_allow_ips reaches uvicorn: that address now speaks for its clients
    with live(make_settings(tmp_path, demo=True, admin_token="", forwarded_allow_ips=OTHER), [OTHER]) as (remote,):
        assert httpx.get(remote + "/admin/layers", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200
        assert httpx.get(remote + "/admin/layers").status_code == 403


async def test_demo_without_token_refuses_a_remote_client_in_process(tmp_path: Path) -> None:
    """Same rule without a second address: the client address given by the ASGI server decides."""
    app = create_app(make_settings(tmp_path, demo=True, admin_token=""))
    async with app.router.lifespan_context(app):
        for client, status in ((("203.0.113.7", 4000), 403), (("::ffff:127.0.0.1", 4000), 200), (("::1", 1), 200)):
            transport = httpx.ASGITransport(app=app, client=client)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
                assert (await http.get("/admin/layers")).status_code == status, client


# --- 7b: publish roots ----------------------------------------------------------------------------


def copy_pyramid(name: str, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PYRAMIDS / name, target / name, dirs_exist_ok=True)
    for suffix in (".json", ".list"):
        shutil.copy2(PYRAMIDS / f"{name}{suffix}", target / f"{name}{suffix}")
    return target / f"{name}.json"


def layer(path: str | Path) -> dict:
    """A layer over the SCAN1000 levels of the pyramid at `path` (a file path or a URL)."""
    url = path if isinstance(path, str) else f"file://{path}"
    return {**DEMO_LAYER, "pyramids": [{"path": url, "bottom_level": "10", "top_level": "0"}]}


def test_admin_publishes_only_inside_the_roots(served: tuple[str, Path, Path], tmp_path: Path) -> None:
    base, _, data_dir = served
    auth = {"Authorization": f"Bearer {token_of(data_dir)}"}
    outside = copy_pyramid("SCAN1000", tmp_path / "outside")  # a valid pyramid, just elsewhere
    (data_dir / "pyramids" / "escape").symlink_to(outside.parent, target_is_directory=True)
    elsewhere = json.loads(outside.read_text())  # a descriptor inside whose slabs live outside
    for level in elsewhere["levels"]:
        level["storage"]["image_directory"] = str(outside.parent / level["storage"]["image_directory"])
    (data_dir / "pyramids" / "ELSEWHERE.json").write_text(json.dumps(elsewhere))
    refused = {
        "OUT": outside,
        "DOTS": data_dir / "pyramids" / os.path.relpath(outside, data_dir / "pyramids"),  # climbs out with ..
        "LINK": data_dir / "pyramids" / "escape" / "SCAN1000.json",
        "ELSEWHERE": data_dir / "pyramids" / "ELSEWHERE.json",
    }
    for layer_id, path in refused.items():
        response = httpx.post(f"{base}/admin/layers/{layer_id}", json=layer(path), headers=auth)
        assert response.status_code == 400, (layer_id, response.text)
        body = response.json()
        assert body["field"] == "pyramids[0].path" and "admin_roots" in body["detail"], body
    inside = data_dir / "pyramids" / "SCAN1000.json"  # the demo's copy
    assert httpx.post(f"{base}/admin/layers/INSIDE", json=layer(inside), headers=auth).status_code == 204
    assert httpx.put(f"{base}/admin/layers/INSIDE", json=layer(inside), headers=auth).status_code == 204
    replaced = httpx.put(f"{base}/admin/layers/INSIDE", json=layer(outside), headers=auth)
    assert replaced.status_code == 400 and replaced.json()["field"] == "pyramids[0].path"
    listed = {entry["id"] for entry in httpx.get(f"{base}/admin/layers", headers=auth).json()}
    assert listed == {"SCAN1000", "INSIDE"}


async def test_admin_roots_setting(tmp_path: Path, s3_server, s3_bucket: str, s3_settings: Settings) -> None:
    outside = copy_pyramid("SCAN1000", tmp_path / "outside")
    auth = {"Authorization": "Bearer secret"}
    # the refused pyramid above is accepted once its directory is a root: the roots decided
    async with app_client(make_settings(tmp_path, admin_roots=(str(outside.parent),))) as client:
        assert (await client.post("/admin/layers/OUT", json=layer(outside), headers=auth)).status_code == 204
        inside_default = tmp_path / "data" / "pyramids" / "X.json"
        refused = await client.post("/admin/layers/D", json=layer(inside_default), headers=auth)
        assert refused.status_code == 400 and "admin_roots" in refused.json()["detail"]  # explicit roots replace
    # S3: the bucket the warehouse writes to is a default root, another bucket is not
    settings = make_settings(tmp_path, admin_roots=(), s3_clusters=s3_settings.s3_clusters,
                             warehouse_pyramids=f"s3://{s3_bucket}/computed")  # fmt: skip
    async with app_client(settings) as client:
        for layer_id, url in (("S3OUT", "s3://not-ours/SCAN1000.json"),
                              ("S3UP", f"s3://{s3_bucket}/computed/../elsewhere/SCAN1000.json")):  # fmt: skip
            response = await client.post(f"/admin/layers/{layer_id}", json=layer(url), headers=auth)
            assert response.status_code == 400 and "admin_roots" in response.json()["detail"], response.text
        s3_server.put(s3_bucket, "computed/SCAN1000.json", (PYRAMIDS / "SCAN1000.json").read_bytes())
        response = await client.post("/admin/layers/S3IN", json=layer(f"s3://{s3_bucket}/computed/SCAN1000.json"),
                                     headers=auth)  # fmt: skip
        # past the roots; its slabs (FILE, beside a descriptor on S3) are not ours to judge here
        assert "admin_roots" not in response.text


# --- 3c: header timeout ---------------------------------------------------------------------------


def host_port(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    """True when the server closes the connection within `wait` seconds (a generous bound, not a measure)."""
    sock.settimeout(wait)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def read_response(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_incomplete_headers_are_dropped(served: tuple[str, Path, Path]) -> None:
    address = host_port(served[0])
    request = f"GET /healthcheck HTTP/1.1\r\nHost: {address[0]}\r\n\r\n".encode()
    with socket.create_connection(address) as sock:  # a complete request is answered
        sock.sendall(request)
        assert read_response(sock).startswith(b"HTTP/1.1 200")
    with socket.create_connection(address) as sock:  # connected, nothing sent
        assert closed_by_server(sock, 10 * HEADER_TIMEOUT + 10)
    with socket.create_connection(address) as sock:  # a request line and part of the headers, no end
        started = time.monotonic()
        sock.sendall(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\n")
        assert closed_by_server(sock, 10 * HEADER_TIMEOUT + 10)
        print(f"partial headers dropped after {time.monotonic() - started:.2f} s (header_timeout {HEADER_TIMEOUT})")
    with socket.create_connection(address) as sock:  # keep-alive, then a next request that never ends
        sock.sendall(request)
        read_response(sock)
        sock.sendall(b"GET /hea")
        assert closed_by_server(sock, 10 * HEADER_TIMEOUT + 10)


def test_trickled_headers_are_dropped(served: tuple[str, Path, Path]) -> None:
    """One header byte at a time (each byte resets uvicorn's own keep-alive timer): dropped all the same."""
    with socket.create_connection(host_port(served[0])) as sock:
        sock.sendall(b"GET /healthcheck HTTP/1.1\r\nX-Slow: ")
        deadline = time.monotonic() + 10 * HEADER_TIMEOUT + 10
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                sock.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if select.select([sock], [], [], HEADER_TIMEOUT / 5)[0]:
                closed = closed_by_server(sock, 1)
        assert closed


def test_oversized_headers_are_refused(served: tuple[str, Path, Path]) -> None:
    """Within the timeout a fast client could still send megabytes of headers: 431 past 64 KiB."""
    from tileserver.server_cli import MAX_HEADER_BYTES

    address = host_port(served[0])
    for size, status in ((MAX_HEADER_BYTES - 1024, b"200"), (MAX_HEADER_BYTES + 1024, b"431")):
        with socket.create_connection(address) as sock:
            sock.sendall(b"GET /healthcheck HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 " + status), size
