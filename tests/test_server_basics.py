"""The server as a whole: embedded demo, map page, health routes, shared HTTP behaviour, `tileserver serve`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
from apputil import app_client, free_port, layer_descriptor, live_server, make_settings

from tileserver.publication.model import parse_layer

OPERATOR = {"Authorization": "Bearer secret"}  # make_settings' admin token


async def test_demo_is_published_once_and_shown_on_the_map_page(tmp_path):
    settings = make_settings(tmp_path, demo=True)
    async with app_client(settings) as client:
        page = await client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "SCAN1000" in page.text and "static/leaflet/leaflet.js" in page.text
        assert "unpkg" not in page.text and "cdn" not in page.text.lower()
        asset = await client.get("/static/leaflet/leaflet.js")
        assert asset.status_code == 200 and len(asset.content) > 100_000
        info = (await client.get("/healthcheck/info", headers=OPERATOR)).json()
        assert info["layers"] == ["SCAN1000"]
        # the user removes the demo layer: a restart must not bring it back
        client.app.state.runtime.store.remove_layer("SCAN1000")
    async with app_client(settings) as client:
        assert (await client.get("/healthcheck/info", headers=OPERATOR)).json()["layers"] == []


async def test_health_routes(tmp_path):
    async with app_client(make_settings(tmp_path)) as client:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("MONTAGNE", layer_descriptor("MONTAGNE")))
        await runtime.refresh()
        health = (await client.get("/healthcheck")).json()
        assert health["status"] == "OK" and health["pid"] == os.getpid() and health["version"]
        info = (await client.get("/healthcheck/info", headers=OPERATOR)).json()
        assert info["layers"] == ["MONTAGNE"] and info["tile_matrix_sets"] == ["PM"]
        assert set(info["caches"]["slab_index"]) == {"entries", "hits", "misses"}
        threads = (await client.get("/healthcheck/threads")).json()
        assert threads["event_loop"]["running"] and threads["number"] >= 1
        depends = await client.get("/healthcheck/depends", headers=OPERATOR)
        assert depends.status_code == 200 and depends.json()["storage"]["file"]["ok"] == 1


async def test_depends_reports_a_vanished_pyramid(tmp_path):
    import shutil

    from apputil import PYRAMIDS

    shutil.copytree(PYRAMIDS / "SCAN1000", tmp_path / "p" / "SCAN1000")
    shutil.copy(PYRAMIDS / "SCAN1000.json", tmp_path / "p" / "SCAN1000.json")
    async with app_client(make_settings(tmp_path)) as client:
        runtime = client.app.state.runtime
        runtime.store.add_layer(parse_layer("S", layer_descriptor("SCAN1000", root=f"file://{tmp_path}/p")))
        await runtime.refresh()
        (tmp_path / "p" / "SCAN1000.json").unlink()
        answer = await client.get("/healthcheck/depends")
        assert answer.status_code == 503 and answer.json()["status"] == "DEGRADED"


async def test_etag_304_gzip_head_cors(tmp_path):
    async with app_client(make_settings(tmp_path, demo=True)) as client:
        first = await client.get("/", headers={"Accept-Encoding": "gzip"})
        assert first.headers["content-encoding"] == "gzip" and "Accept-Encoding" in first.headers["vary"]
        assert first.headers["x-request-id"]
        etag = first.headers["etag"]
        again = await client.get("/", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        other = await client.get("/", headers={"If-None-Match": '"nope"'})
        assert other.status_code == 200
        head = await client.head("/static/leaflet/leaflet.css")
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
        cors = await client.get("/healthcheck", headers={"Origin": "https://example.org"})
        assert cors.headers["access-control-allow-origin"] == "*"
        preflight = await client.options(
            "/healthcheck", headers={"Origin": "https://x.org", "Access-Control-Request-Method": "GET"}
        )
        assert preflight.status_code == 200
        raw = await client.get("/static/leaflet/leaflet.js", headers={"Accept-Encoding": "gzip"})
        # httpx inflates transparently: the text must be intact either way
        assert b"Leaflet" in raw.content[:400]


def test_live_server_over_real_http(tmp_path):
    with live_server(make_settings(tmp_path, demo=True)) as base:
        assert httpx.get(f"{base}/healthcheck").json()["status"] == "OK"
        assert "SCAN1000" in httpx.get(f"{base}/").text


def test_tileserver_serve_starts_with_no_configuration(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TILESERVER_", "ROK4_"))}
    env["TILESERVER_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tileserver.cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/healthcheck/info", timeout=1)
                break
            except httpx.TransportError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError(proc.stdout.read() if proc.poll() is not None else "no answer") from None
                time.sleep(0.2)
        assert answer.json()["layers"] == 1  # anonymous: a count; names need the admin token
        assert (tmp_path / "data" / "store.sqlite").exists()
        capabilities = httpx.get(f"http://127.0.0.1:{port}/wmts?SERVICE=WMTS&REQUEST=GetCapabilities").text
        matrix, row, col = re.search(
            r"<TileMatrixLimits>\s*<TileMatrix>([^<]+)</TileMatrix>\s*<MinTileRow>(\d+)</MinTileRow>"
            r"\s*<MaxTileRow>\d+</MaxTileRow>\s*<MinTileCol>(\d+)</MinTileCol>", capabilities).groups()
        tile_path = f"/wmts/1.0.0/SCAN1000/normal/PM/{matrix}/{row}/{col}.jpeg"
        assert httpx.get(f"http://127.0.0.1:{port}{tile_path}").status_code == 200
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells why it stopped
        assert proc.wait(15) in (0, -15)
        output = proc.stdout.read()
        assert "Application shutdown complete" in output
        # the access log (buffered) reached stderr with its request id
        assert any("access" in line and "GET /healthcheck/info 200" in line for line in output.splitlines())
        # the tile answered before the router is logged the same way
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} access [0-9a-f]+-\d+ GET "
                         + re.escape(tile_path) + r" 200 \d+B [\d.]+ms", output), output[-2000:]


def test_access_log_masks_keys(tmp_path, caplog):
    import logging

    from tileserver.http import redacted_query

    assert redacted_query(b"SERVICE=WMTS&apikey=abc123&LAYER=x&token=zz") == "SERVICE=WMTS&apikey=***&LAYER=x&token=***"
    with caplog.at_level(logging.INFO, logger="tileserver.access"):
        with live_server(make_settings(tmp_path)) as base:
            httpx.get(f"{base}/healthcheck?apikey=TOPSECRET")
    assert "TOPSECRET" not in caplog.text and "/healthcheck?apikey=***" in caplog.text


def test_a_users_scan1000_takes_the_name_over_from_the_demo(tmp_path):
    """The demo borrows ROK4's sample name: publishing one's own SCAN1000 replaces it (no 409), once
    only — a user's SCAN1000 is then protected like any layer, and a restart does not bring the demo back."""
    settings = make_settings(tmp_path, demo=True)
    mine = layer_descriptor("SCAN1000", title="my SCAN1000")
    with live_server(settings) as base:
        assert httpx.get(f"{base}/admin/layers/SCAN1000", headers=OPERATOR).json()["title"] == "SCAN 1000 (demo)"
        created = httpx.post(f"{base}/admin/layers/SCAN1000", json=mine, headers=OPERATOR)
        assert created.status_code == 204, created.text
        assert httpx.get(f"{base}/admin/layers/SCAN1000", headers=OPERATOR).json()["title"] == "my SCAN1000"
        again = httpx.post(f"{base}/admin/layers/SCAN1000", json=mine, headers=OPERATOR)
        assert again.status_code == 409
    with live_server(settings) as base:
        assert httpx.get(f"{base}/admin/layers/SCAN1000", headers=OPERATOR).json()["title"] == "my SCAN1000"
