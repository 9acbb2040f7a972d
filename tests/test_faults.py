"""Faults degrade, they don't stall: a FIFO for a slab, a stalled S3, S3 down at start-up, a store
file deleted or made read-only while the server runs. Over real HTTP (uvicorn on loopback), with
moto's S3 server behind the project's fault proxy and real SQLite files."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from apputil import PYRAMIDS, layer_descriptor, live_server, make_settings
from s3proxy import S3Proxy
from s3server import KEY, SECRET, MotoS3Server

from tileserver.publication.model import parse_layer
from tileserver.publication.store import PublicationStore
from tileserver.pyramid import Pyramid
from tileserver.rok4.listfile import parse_list
from tileserver.rok4.naming import parse_slab_name
from tileserver.settings import S3Cluster, Settings, load_settings
from tileserver.storage import Storage, StorageError, StorageUnavailable

AUTH = {"Authorization": "Bearer secret"}
TILE = ("10", 516, 363)  # level, col, row of a SCAN1000 tile with data


def wmts_tile(layer: str, level: str, col: int, row: int) -> dict[str, str]:
    return {"SERVICE": "WMTS", "REQUEST": "GetTile", "VERSION": "1.0.0", "LAYER": layer, "STYLE": "normal",
            "FORMAT": "image/png", "TILEMATRIXSET": "PM", "TILEMATRIX": level, "TILEROW": str(row),
            "TILECOL": str(col)}


def scan_tiles(limit: int) -> list[tuple[str, int, int]]:
    """Tiles inside the published limits of SCAN1000, finest levels first."""
    desc = json.loads((PYRAMIDS / "SCAN1000.json").read_text())
    tiles = []
    for level in sorted(desc["levels"], key=lambda lv: -int(lv["id"])):
        lim = level["tile_limits"]
        for row in range(lim["min_row"], lim["max_row"] + 1):
            for col in range(lim["min_col"], lim["max_col"] + 1):
                tiles.append((level["id"], col, row))
    return tiles[:limit]


def upload_scan1000(s3_server: MotoS3Server, bucket: str) -> str:
    """SCAN1000 as S3 objects named the ROK4 way; the descriptor's URL."""
    desc = json.loads((PYRAMIDS / "SCAN1000.json").read_text())
    for level in desc["levels"]:
        level["storage"] = {"type": "S3", "bucket_name": bucket, "image_prefix": f"SCAN1000/DATA_{level['id']}"}
    for _, slab, _ in parse_list((PYRAMIDS / "SCAN1000.list").read_text()).entries:
        parsed = parse_slab_name(slab)
        key = f"SCAN1000/DATA_{parsed.level}_{parsed.col}_{parsed.row}"
        s3_server.put(bucket, key, (PYRAMIDS / "SCAN1000" / slab).read_bytes())
    s3_server.put(bucket, "SCAN1000.json", json.dumps(desc).encode())
    return f"s3://{bucket}/SCAN1000.json"


def proxied_settings(tmp_path: Path, proxy: S3Proxy, **overrides) -> Settings:
    """The server's own defaults for timeouts, retries and the circuit breaker, unless overridden."""
    return make_settings(tmp_path, s3_clusters=(S3Cluster(proxy.url, KEY, SECRET),), **overrides)


# --- FILE: nothing that can block runs on the event loop ---------------------------------------------


def copy_scan1000(root: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(PYRAMIDS / "SCAN1000", root / "SCAN1000")
    shutil.copy(PYRAMIDS / "SCAN1000.json", root / "SCAN1000.json")
    return root


async def slab_file(descriptor: Path, level: str, col: int, row: int) -> Path:
    async with Storage(load_settings(env={})) as storage:
        pyramid = await Pyramid.open(str(descriptor), storage)
        lv = pyramid.level(level)
        slab_col, slab_row, _ = lv.slab_of(col, row)
        return Path(pyramid.slab_path(lv, slab_col, slab_row).removeprefix("file://"))


def release_fifo(path: Path) -> None:
    """Give a reader blocked on the FIFO (the defect) its EOF, so a failing test does not hang."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader waiting


async def test_special_files_are_refused_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "slab.tif"
    os.mkfifo(fifo)
    async with Storage(Settings()) as storage:
        try:
            for path in (str(fifo), "/dev/zero"):
                for size in (16, None):
                    with pytest.raises(StorageError, match="not a regular file"):
                        await asyncio.wait_for(storage.read(path, 0, size), 10)
        finally:
            release_fifo(fifo)


def test_fifo_where_a_slab_should_be_fails_the_tile_not_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = copy_scan1000(tmp_path / "p")
    slab = asyncio.run(slab_file(root / "SCAN1000.json", *TILE))
    slab.unlink()
    os.mkfifo(slab)
    try:
        with live_server(make_settings(tmp_path)) as base, httpx.Client(base_url=base, timeout=10) as client:
            descriptor = layer_descriptor("SCAN1000", root=f"file://{root}")
            assert client.post("/admin/layers/S", json=descriptor, headers=AUTH).status_code == 204
            with ThreadPoolExecutor(1) as pool:
                tile = pool.submit(client.get, "/wmts", params=wmts_tile("S", *TILE))
                time.sleep(0.3)  # the tile request is in (and would block the event loop on the FIFO)
                assert client.get("/healthcheck").status_code == 200
                failed = tile.result(timeout=20)
                assert failed.status_code in (502, 503)
            other = client.get("/wmts", params=wmts_tile("S", "9", 258, 181))  # another slab still serves
            assert other.status_code == 200 and other.headers["content-type"] == "image/png"
    finally:
        release_fifo(slab)
    # the failure is one log line naming the request id and the cause, without a traceback
    request_id = failed.headers["x-request-id"]
    lines = [r for r in caplog.records if r.name == "tileserver.policy" and request_id in r.getMessage()]
    assert len(lines) == 1 and "regular file" in lines[0].getMessage() and lines[0].exc_info is None


# --- S3: a stalled storage answers 503 fast; the circuit breaker --------------------------------------


def test_stalled_s3_answers_503_within_seconds_then_recovers(
    tmp_path: Path, s3_server: MotoS3Server, s3_bucket: str, s3_proxy: S3Proxy
) -> None:
    url = upload_scan1000(s3_server, s3_bucket)
    settings = proxied_settings(tmp_path, s3_proxy, storage_breaker_cooldown=1.0)
    tiles = scan_tiles(40)
    with live_server(settings) as base:
        with httpx.Client(base_url=base, timeout=10) as client:
            descriptor = layer_descriptor("SCAN1000", root=url.rpartition("/")[0])
            assert client.post("/admin/layers/S3", json=descriptor, headers=AUTH).status_code == 204

        async def storm() -> tuple[list[int], float]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                started = time.monotonic()
                answers = await asyncio.gather(*(client.get("/wmts", params=wmts_tile("S3", *t)) for t in tiles))
                return [a.status_code for a in answers], time.monotonic() - started

        s3_proxy.hold()
        try:
            statuses, elapsed = asyncio.run(asyncio.wait_for(storm(), 30))
        finally:
            s3_proxy.release()
        print(f"\n40 concurrent tiles against a stalled S3: all answered in {elapsed:.2f} s")
        assert statuses == [503] * len(tiles)
        # S3 is back: after the cool-down one probe goes through, then tiles are served again
        with httpx.Client(base_url=base, timeout=10) as client:
            deadline = time.monotonic() + 20
            while (answer := client.get("/wmts", params=wmts_tile("S3", *TILE))).status_code != 200:
                assert answer.status_code == 503 and time.monotonic() < deadline
                time.sleep(0.2)
            assert answer.headers["content-type"] == "image/png"


def test_a_failed_s3_is_a_503_with_retry_after_for_tiles_and_maps(
    tmp_path: Path, s3_server: MotoS3Server, s3_bucket: str, s3_proxy: S3Proxy
) -> None:
    """Every protocol maps a storage failure the same way, passed-through tile or rendered map: 503
    with Retry-After, soon, in the protocol's own error body, never stored by a cache."""
    url = upload_scan1000(s3_server, s3_bucket)
    level, col, row = TILE
    bbox = "156543,5792092,195679,5831228"  # the same tile in EPSG:3857
    asked = {
        "wmts tile": ("/wmts", wmts_tile("S3", level, col, row), b"ExceptionReport"),
        "tms tile": (f"/tms/1.0.0/S3/{level}/{col}/{row}.png", {}, b"TileMapServerError"),
        "ogcapi tile": (f"/ogcapi/collections/S3/map/tiles/PM/{level}/{row}/{col}", {}, b"StorageUnavailable"),
        "ogcapi dataset tile (rendered)": (f"/ogcapi/map/tiles/PM/{level}/{row}/{col}", {}, b"StorageUnavailable"),
        "wms GetMap": ("/wms", {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": "S3",
                                "STYLES": "", "CRS": "EPSG:3857", "BBOX": bbox, "WIDTH": "256", "HEIGHT": "256",
                                "FORMAT": "image/png"}, b"ServiceExceptionReport"),
        "wms GetMap INIMAGE": ("/wms", {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": "S3",
                                        "STYLES": "", "CRS": "EPSG:3857", "BBOX": bbox, "WIDTH": "256",
                                        "HEIGHT": "256", "FORMAT": "image/png", "EXCEPTIONS": "INIMAGE"},
                               b"ServiceExceptionReport"),
    }
    with live_server(proxied_settings(tmp_path, s3_proxy)) as base, httpx.Client(base_url=base, timeout=30) as client:
        descriptor = layer_descriptor("SCAN1000", root=url.rpartition("/")[0])
        assert client.post("/admin/layers/S3", json=descriptor, headers=AUTH).status_code == 204
        s3_proxy.fail_next(1_000_000, 503)  # S3 answers, with an error, to everything
        failures = []
        for name, (path, params, marker) in asked.items():
            started = time.monotonic()
            answer = client.get(path, params=params)
            elapsed = time.monotonic() - started
            ok = (answer.status_code == 503 and answer.headers.get("retry-after", "").isdigit()
                  and marker in answer.content and not answer.headers["content-type"].startswith("image/")
                  and answer.headers["cache-control"] == "no-store" and elapsed < 3)
            if not ok:
                failures.append((name, answer.status_code, dict(answer.headers), f"{elapsed:.2f} s",
                                 answer.text[:200]))
        assert not failures, failures
        assert s3_proxy.count() > 0  # the storage was asked, and failed: not an answer from a cache


async def test_open_circuit_fails_fast_without_asking_the_storage(
    s3_server: MotoS3Server, s3_bucket: str, s3_proxy: S3Proxy
) -> None:
    s3_server.put(s3_bucket, "slab", b"0123456789")
    settings = Settings(s3_clusters=(S3Cluster(s3_proxy.url, KEY, SECRET),), storage_read_timeout=0.3,
                        storage_retries=1, storage_retry_backoff=0.01, storage_breaker_failures=4,
                        storage_breaker_cooldown=1.0)
    path = f"s3://{s3_bucket}/slab"
    async with Storage(settings) as storage:
        s3_proxy.hold()
        try:
            for _ in range(2):  # two reads of two attempts each open the circuit
                with pytest.raises(StorageUnavailable, match="no answer within 0.3 s"):
                    await storage.read(path, 0, 4)
            asked = s3_proxy.count()
            assert asked == 4
            started = time.monotonic()
            with pytest.raises(StorageUnavailable, match="is failing") as refused:
                await storage.read(path, 0, 4)
            print(f"\nan open circuit answers in {1000 * (time.monotonic() - started):.2f} ms")
            assert s3_proxy.count() == asked  # not asked at all
            assert refused.value.retry_after == 1  # the cool-down left, rounded up
        finally:
            s3_proxy.release()
        await asyncio.sleep(1.1)  # the cool-down ends: the next read is the probe, and it succeeds
        assert await storage.read(path, 0, 4) == b"0123"
        assert await storage.read(path, 4, 2) == b"45"


async def test_the_deadline_bounds_retries(s3_server: MotoS3Server, s3_bucket: str, s3_proxy: S3Proxy) -> None:
    s3_server.put(s3_bucket, "slab", b"0123456789")
    settings = Settings(s3_clusters=(S3Cluster(s3_proxy.url, KEY, SECRET),), storage_read_timeout=0.4,
                        storage_retries=10, storage_retry_backoff=0.01, storage_deadline=1.0,
                        storage_breaker_failures=0)
    async with Storage(settings) as storage:
        s3_proxy.hold()
        try:
            started = time.monotonic()
            with pytest.raises(StorageUnavailable, match="no answer within 0.4 s"):
                await asyncio.wait_for(storage.read(f"s3://{s3_bucket}/slab", 0, 4), 20)
            print(f"\n11 attempts allowed, deadline 1 s: gave up after {time.monotonic() - started:.2f} s")
            assert s3_proxy.count() <= 4  # 0.4 + 0.4 + what is left of the second
        finally:
            s3_proxy.release()


# --- layers whose storage failed at start-up come back -----------------------------------------------


def test_layers_dark_at_start_up_are_served_once_s3_recovers(
    tmp_path: Path, s3_server: MotoS3Server, s3_bucket: str, s3_proxy: S3Proxy
) -> None:
    url = upload_scan1000(s3_server, s3_bucket)
    settings = proxied_settings(tmp_path, s3_proxy, storage_retries=1, storage_breaker_cooldown=0.5,
                                layer_retry_interval=0.5, layer_retry_max_interval=2.0)
    store = PublicationStore(settings.resolved_store_url)
    store.add_layer(parse_layer("S3", layer_descriptor("SCAN1000", root=url.rpartition("/")[0])))
    store.close()
    s3_proxy.fail_next(1_000_000, 503)  # S3 is down when the server starts
    # layer names in /healthcheck/info are for the operator
    with live_server(settings) as base, httpx.Client(base_url=base, timeout=10, headers=AUTH) as client:
        info = client.get("/healthcheck/info").json()
        assert info["layers"] == [] and "S3" in info["layers_not_served"]
        time.sleep(1.5)  # retries run, and fail
        assert client.get("/healthcheck/info").json()["layers"] == []
        assert s3_proxy.count("GET", f"/{s3_bucket}/SCAN1000.json") >= 2
        s3_proxy.clear()  # S3 is back
        deadline = time.monotonic() + 20
        while "S3" not in client.get("/healthcheck/info").json()["layers"]:
            assert time.monotonic() < deadline, "the layer stayed dark"
            time.sleep(0.2)
        answer = client.get("/wmts", params=wmts_tile("S3", *TILE))
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"



# --- the store file deleted or made read-only under a running server ---------------------------------


def test_writes_to_a_deleted_store_fail_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path)
    store_file = Path(settings.resolved_store_path)
    descriptor = layer_descriptor("SCAN1000")
    with live_server(settings) as base, httpx.Client(base_url=base, timeout=10) as client:
        assert client.post("/admin/layers/KEPT", json=descriptor, headers=AUTH).status_code == 204
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store_file}{suffix}").unlink(missing_ok=True)
        lost = client.post("/admin/layers/LOST", json=descriptor, headers=AUTH)
        assert lost.status_code == 503, lost.text
        assert lost.headers["content-type"] == "application/problem+json" and "deleted" in lost.json()["detail"]
        assert client.delete("/admin/layers/KEPT", headers=AUTH).status_code == 503
        assert client.get("/healthcheck").status_code == 200  # reading goes on from what is open
        assert client.get("/wmts", params=wmts_tile("KEPT", *TILE)).status_code == 200
    assert any("was deleted or moved" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    assert not store_file.exists()  # a new connection did not make an empty store in its place


def test_writes_to_a_read_only_store_fail_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path)
    store_file = Path(settings.resolved_store_path)
    descriptor = layer_descriptor("SCAN1000")
    with live_server(settings) as base, httpx.Client(base_url=base, timeout=10) as client:
        assert client.post("/admin/layers/A", json=descriptor, headers=AUTH).status_code == 204
        store_file.chmod(0o444)
        try:
            refused = client.post("/admin/layers/B", json=descriptor, headers=AUTH)
            assert refused.status_code == 503 and "read-only" in refused.json()["detail"]
        finally:
            store_file.chmod(0o644)
        assert client.post("/admin/layers/C", json=descriptor, headers=AUTH).status_code == 204
    assert any("is read-only" in r.getMessage() for r in caplog.records)
    store = PublicationStore(str(store_file))  # what a restart sees: exactly what was answered 204
    try:
        assert sorted(layer.id for layer in store.list_layers()) == ["A", "C"]
    finally:
        store.close()
