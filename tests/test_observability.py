"""Operators' view (tileserver/observability.py): /metrics over real HTTP moves with requests, adds
up several worker processes, is for operators unless public; the access line in JSON carries the
request id."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from apputil import app_client, free_port, layer_descriptor, live_server, make_settings
from prometheus_client.parser import text_string_to_metric_families

from tileserver.publication.model import parse_layer
from tileserver.publication.store import PublicationStore

TOKEN = {"Authorization": "Bearer secret"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def _scrape(base: str) -> dict:
    answer = httpx.get(f"{base}/metrics", headers=TOKEN)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=")
    return samples(answer.text)


def test_metrics_move_with_tiles_maps_and_errors_over_real_http(tmp_path):
    settings = make_settings(tmp_path)
    Path(settings.data_dir).mkdir(parents=True)
    store = PublicationStore(settings.resolved_store_url)
    store.add_layer(parse_layer("S", layer_descriptor("SCAN1000")))
    store.close()
    with live_server(settings) as base:
        before = _scrape(base)
        info = httpx.get(f"{base}/healthcheck/info", headers=TOKEN).json()
        assert info["layers"] == ["S"]
        assert info["compiled_kernels"] == {"separable": True, "pixels": True, "mesh": True}  # README's install
        capabilities = httpx.get(f"{base}/wmts?SERVICE=WMTS&REQUEST=GetCapabilities").text
        row, col = re.search(r"<TileMatrix>10</TileMatrix>\s*<MinTileRow>(\d+)</MinTileRow>\s*<MaxTileRow>\d+"
                             r"</MaxTileRow>\s*<MinTileCol>(\d+)</MinTileCol>", capabilities).groups()
        tile = httpx.get(f"{base}/wmts/1.0.0/S/normal/PM/10/{row}/{col}.png")  # the fast path
        assert tile.status_code == 200
        again = httpx.get(f"{base}/wmts?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=S&STYLE=normal"
                          f"&TILEMATRIXSET=PM&TILEMATRIX=10&TILEROW={row}&TILECOL={col}&FORMAT=image/png")
        assert again.content == tile.content
        getmap = httpx.get(f"{base}/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetMap&LAYERS=S&STYLES=&CRS=EPSG:3857"
                           "&BBOX=-20000,5000000,600000,5600000&WIDTH=64&HEIGHT=64&FORMAT=image/png")
        assert getmap.status_code == 200 and getmap.headers["content-type"] == "image/png"
        error = httpx.get(f"{base}/wmts/1.0.0/S/normal/PM/10/99999999/{col}.png")
        assert error.status_code == 400
        after = _scrape(base)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tileserver_requests_total", service="wmts", status="200") == 3  # capabilities, tile twice
    assert moved("tileserver_requests_total", service="wmts", status="400") == 1
    assert moved("tileserver_requests_total", service="wms", status="200") == 1
    assert moved("tileserver_requests_total", service="health", status="200") == 1
    assert moved("tileserver_requests_total", service="metrics", status="200") == 1  # the first scrape
    assert moved("tileserver_request_duration_seconds_count", service="wmts") == 4
    assert moved("tileserver_request_duration_seconds_bucket", service="wms", le="+Inf") == 1
    assert moved("tileserver_request_duration_seconds_sum", service="wms") > 0
    # the first read of the tile's slab index is a miss, the second a hit
    assert moved("tileserver_slab_index_cache_total", result="miss") >= 1
    assert moved("tileserver_slab_index_cache_total", result="hit") >= 1
    assert value(after, "tileserver_render_slots") == settings.render_concurrency
    assert value(after, "tileserver_render_slots_in_use") == 0
    assert value(after, "tileserver_renders_waiting") == 0
    assert ("tileserver_storage_errors_total", (("kind", "operation"),)) in after
    # the counters are the process's: earlier tests in this process may have counted storage errors
    assert moved("tileserver_storage_errors_total", kind="operation") == 0


async def test_metrics_are_for_operators_unless_public(tmp_path):
    async with app_client(make_settings(tmp_path)) as client:
        refused = await client.get("/metrics")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 403
        assert (await client.get("/metrics", headers=TOKEN)).status_code == 200
    async with app_client(make_settings(tmp_path, metrics_public=True)) as client:
        assert (await client.get("/metrics")).status_code == 200


async def test_storage_errors_and_jobs_are_counted(tmp_path, store_backend):
    """Storage failures are counted; jobs come from the shared store (SQLite and PostgreSQL)."""
    from tileserver.observability import job_metrics
    from tileserver.storage.retry import STATS, RetryPolicy, TransientError

    async with app_client(make_settings(tmp_path)) as client:
        before = samples((await client.get("/metrics", headers=TOKEN)).text)

        async def failing(_budget: float) -> None:
            raise TransientError("503 from the test")

        try:
            await RetryPolicy(retries=1, backoff=0.0).run("GET s3://b/k", failing)
        except Exception as exc:
            assert "503 from the test" in str(exc)
        after = samples((await client.get("/metrics", headers=TOKEN)).text)
        assert STATS["operation"] >= 1
        assert value(after, "tileserver_storage_errors_total", kind="attempt") - value(
            before, "tileserver_storage_errors_total", kind="attempt") == 2
        assert value(after, "tileserver_storage_errors_total", kind="operation") - value(
            before, "tileserver_storage_errors_total", kind="operation") == 1
        # two ended jobs and a waiting one, as the warehouse stores them
        from tileserver.warehouse.entities import Entities

        entities = Entities(client.app.state.runtime.store)
        entities.create("processing_execution", "ds", {"status": "SUCCESS", "start": "2026-01-01T00:00:00.000Z",
                                                        "finish": "2026-01-01T00:00:42.500Z"})
        entities.create("processing_execution", "ds", {"status": "FAILURE", "start": "2026-01-01T00:00:00.000Z",
                                                        "finish": "2026-01-01T02:00:00.000Z"})
        entities.create("check_execution", "ds", {"status": "WAITING"})
        found = {}
        for family in job_metrics(client.app.state.runtime.store):
            for sample in family.samples:
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        assert value(found, "tileserver_jobs", kind="processing_execution", status="SUCCESS") == 1
        assert value(found, "tileserver_jobs", kind="check_execution", status="WAITING") == 1
        assert value(found, "tileserver_job_duration_seconds_sum", kind="processing_execution", status="SUCCESS") == 42.5
        assert value(found, "tileserver_job_duration_seconds_bucket", kind="processing_execution",
                     status="SUCCESS", le="60.0") == 1
        assert value(found, "tileserver_job_duration_seconds_bucket", kind="processing_execution",
                     status="FAILURE", le="3600.0") == 0


def test_serve_with_two_workers_json_logs_and_summed_metrics(tmp_path):
    """`tileserver serve --workers 2` with log_format=json: every access line is one JSON object with
    the request id the answer carried; /metrics from either worker counts both workers' requests."""
    port = free_port()
    dirs_before = set(Path(tempfile.gettempdir()).glob("tileserver-metrics-*"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TILESERVER_", "ROK4_", "PROMETHEUS_"))}
    env.update(TILESERVER_DATA_DIR=str(tmp_path / "data"), TILESERVER_ADMIN_TOKEN="secret",
               TILESERVER_LOG_FORMAT="json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tileserver.cli", "serve", "--port", str(port), "--workers", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    ids = []
    try:
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(f"{base}/metrics", headers=TOKEN, timeout=1)
                break
            except httpx.TransportError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError(proc.stderr.read() if proc.poll() is not None else "no answer") from None
                time.sleep(0.2)
        while len({pid for _id, pid in ids}) < 2 or len(ids) < 20:  # a new connection each: the
            answer = httpx.get(f"{base}/healthcheck")                  # kernel spreads them over both workers
            ids.append((answer.headers["x-request-id"], answer.json()["pid"]))
            assert len(ids) < 500, "one worker answered every request"
        missing = httpx.get(f"{base}/wmts/1.0.0/NOPE/normal/PM/10/0/0.png")
        assert missing.status_code in (400, 404)
        def counted() -> float:
            found = samples(httpx.get(f"{base}/metrics", headers=TOKEN).text)
            return value(found, "tileserver_requests_total", service="health", status="200")

        # a request is counted once its answer is sent: the last one may still be on its way
        settle = time.time() + 10
        while counted() != len(ids) and time.time() < settle:
            time.sleep(0.1)
        for _ in range(4):  # whichever worker answers, it reports every worker's requests
            assert counted() == len(ids)
        time.sleep(1.5)  # the access buffer is flushed every second
    finally:
        proc.terminate()
        proc.wait(20)
    stderr = proc.stderr.read()
    records = []
    for line in stderr.splitlines():
        if line.strip():
            records.append(json.loads(line))  # every line of stderr is a JSON object, uvicorn's too
    assert any("Application startup complete" in r.get("message", "") for r in records)
    access = {r["request_id"]: r for r in records if r.get("logger") == "tileserver.access"}
    for request_id, _pid in ids:
        record = access[request_id]
        assert record["method"] == "GET" and record["path"] == "/healthcheck" and record["status"] == 200
        assert record["service"] == "health" and record["duration_ms"] >= 0
    error = access[missing.headers["x-request-id"]]
    assert error["service"] == "wmts" and error["status"] == missing.status_code
    # the metrics directory `serve` made for its workers is gone with them
    assert set(Path(tempfile.gettempdir()).glob("tileserver-metrics-*")) <= dirs_before


async def test_the_grafana_dashboard_uses_metrics_the_server_exposes(tmp_path):
    dashboard = json.loads((Path(__file__).resolve().parent.parent / "deploy" / "grafana"
                            / "tileserver-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"\b(tileserver_\w+)", target["expr"])}
    assert len(used) >= 10
    async with app_client(make_settings(tmp_path)) as client:
        await client.get("/healthcheck")
        text = (await client.get("/metrics", headers=TOKEN)).text
    exposed = set()
    for family in text_string_to_metric_families(text):
        exposed.add(family.name)
        exposed.update(sample.name for sample in family.samples)
        if family.type == "histogram":
            exposed.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    assert used <= exposed, used - exposed


def test_tiles_answered_below_asgi_are_logged_and_counted(tmp_path, caplog):
    """`tileserver serve`'s protocol answers page-cached tiles without an ASGI cycle: each still has its
    access line (with the request id it carried) and counts in /metrics like any other request."""
    import threading

    import uvicorn

    from tileserver.app import create_app
    from tileserver.server_cli import FastTileProtocol, uvicorn_options

    settings = make_settings(tmp_path)
    Path(settings.data_dir).mkdir(parents=True)
    store = PublicationStore(settings.resolved_store_url)
    store.add_layer(parse_layer("S", layer_descriptor("SCAN1000")))
    store.close()
    port = free_port()
    options = {k: v for k, v in uvicorn_options(settings).items() if k not in ("host", "port", "workers")}
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    caplog.set_level("INFO", logger="tileserver.access")
    try:
        capabilities = httpx.get(f"{base}/wmts?SERVICE=WMTS&REQUEST=GetCapabilities").text
        row, col = re.search(r"<TileMatrix>10</TileMatrix>\s*<MinTileRow>(\d+)</MinTileRow>\s*<MaxTileRow>\d+"
                             r"</MaxTileRow>\s*<MinTileCol>(\d+)</MinTileCol>", capabilities).groups()
        rest = f"/wmts/1.0.0/S/normal/PM/10/{row}/{col}.png"
        kvp = ("/wmts?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=S&STYLE=normal&TILEMATRIXSET=PM"
               f"&TILEMATRIX=10&TILEROW={row}&TILECOL={col}&FORMAT=image/png")
        with httpx.Client(base_url=base) as client:
            assert client.get(rest).status_code == 200  # opens the slab and caches its index (ASGI)
            before = _scrape(base)
            answered = FastTileProtocol.answered
            tiles = [client.get(url) for url in (rest, kvp, rest)]
            etag = tiles[0].headers["etag"]
            tiles.append(client.get(rest, headers={"If-None-Match": etag}))
            assert [t.status_code for t in tiles] == [200, 200, 200, 304]
            assert FastTileProtocol.answered - answered == 4  # all four below ASGI
            after = _scrape(base)
    finally:
        server.should_exit = True
        thread.join(10)
    assert value(after, "tileserver_requests_total", service="wmts", status="200") - value(
        before, "tileserver_requests_total", service="wmts", status="200") == 3
    assert value(after, "tileserver_requests_total", service="wmts", status="304") - value(
        before, "tileserver_requests_total", service="wmts", status="304") == 1
    assert value(after, "tileserver_request_duration_seconds_count", service="wmts") - value(
        before, "tileserver_request_duration_seconds_count", service="wmts") == 4
    lines = {record.getMessage().split(" ")[0]: record.getMessage() for record in caplog.records
             if record.name == "tileserver.access"}
    for tile in tiles:
        line = lines[tile.headers["x-request-id"]]
        assert " GET /wmts" in line and f" {tile.status_code} " in line, line
    assert "?SERVICE=WMTS&REQUEST=GetTile" in lines[tiles[1].headers["x-request-id"]]


def test_batched_request_metrics_equal_prometheus_own_observations():
    """RequestMetrics tallies answers in plain ints and adds them at flush (scrape, periodic sync):
    the counter, every bucket and the sum move exactly as Prometheus's own inc/observe would."""
    from prometheus_client import REGISTRY, CollectorRegistry, Histogram
    from prometheus_client.exposition import generate_latest

    from tileserver.observability import LATENCY_BUCKETS, RequestMetrics, flush_request_metrics

    durations = [0.0, 0.001, 0.0010001, 0.0024, 0.004, 0.01, 0.3, 2.5, 7.0, 31.0, 120.0] * 3
    reference = Histogram("ref_seconds", "reference", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    for seconds in durations:
        reference.observe(seconds)
    expected = {s.labels.get("le"): s.value for m in reference.collect() for s in m.samples
                if s.name == "ref_seconds_bucket"}

    flush_request_metrics()  # nothing pending from earlier tests
    before = samples(generate_latest(REGISTRY).decode())
    recorder = RequestMetrics(app=None)  # type: ignore[arg-type]
    for seconds in durations:
        recorder.record("/healthcheck", 204, seconds)
    recorder.record("/healthcheck", 503, 0.002)
    pending = samples(generate_latest(REGISTRY).decode())
    assert {k: v for k, v in pending.items() if k[0].startswith("tileserver_request")} == {
        k: v for k, v in before.items() if k[0].startswith("tileserver_request")}  # tallied, not yet added
    flush_request_metrics()
    after = samples(generate_latest(REGISTRY).decode())

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tileserver_requests_total", service="health", status="204") == len(durations)
    assert moved("tileserver_requests_total", service="health", status="503") == 1
    for le, count in expected.items():
        extra = 1 if float(le) >= 0.002 else 0  # the 503's 2 ms
        assert moved("tileserver_request_duration_seconds_bucket", service="health", le=le) == count + extra, le
    assert abs(moved("tileserver_request_duration_seconds_sum", service="health") - (sum(durations) + 0.002)) < 1e-9
