"""Overload (issue 16, goal 4): renders beyond the slots and the queue are shed at once.

A server with one render slot and a queue of two gets many GetMaps at once while its storage is
held (an S3 proxy that answers nothing until released), so the render in the slot cannot finish:
every request beyond slot + queue must be answered 503 with Retry-After *while* the slot is still
held, each in its protocol's format; once the storage answers, the slot and the queue are served
and the server renders again.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from apputil import PYRAMIDS, app_client, layer_descriptor, live_server, make_settings
from s3proxy import S3Proxy
from s3server import KEY, SECRET, MotoS3Server

from tileserver.render.draw import DECODED_TILES
from tileserver.render.errors import RenderBusy
from tileserver.render.gate import RenderGate
from tileserver.rok4.listfile import parse_list
from tileserver.rok4.naming import parse_slab_name
from tileserver.settings import S3Cluster

AUTH = {"Authorization": "Bearer secret"}
SCAN_BBOX_3857 = (156543.03, 5792092.26, 234814.55, 5831228.01)  # the SCAN1000 fixture's extent
ASKED = 9  # one in the slot, two queued, six shed


def _upload_scan1000(s3_server: MotoS3Server, bucket: str) -> str:
    """SCAN1000 as S3 objects named the ROK4 way; the descriptor's URL."""
    desc = json.loads((PYRAMIDS / "SCAN1000.json").read_text())
    for level in desc["levels"]:
        level["storage"] = {"type": "S3", "bucket_name": bucket, "image_prefix": f"SCAN1000/DATA_{level['id']}"}
    for _, slab, _ in parse_list((PYRAMIDS / "SCAN1000.list").read_text()).entries:
        parsed = parse_slab_name(slab)
        s3_server.put(bucket, f"SCAN1000/DATA_{parsed.level}_{parsed.col}_{parsed.row}",
                      (PYRAMIDS / "SCAN1000" / slab).read_bytes())
    s3_server.put(bucket, "SCAN1000.json", json.dumps(desc).encode())
    return f"s3://{bucket}/SCAN1000.json"


def _getmap(i: int) -> dict[str, str]:
    """A map of a slice of the extent, a different one each time (no answer can be shared)."""
    x0, y0, x1, y1 = SCAN_BBOX_3857
    step = (x1 - x0) / (2 * ASKED)
    bbox = (x0 + i * step, y0, x0 + (i + ASKED) * step, y1)
    return {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": "S3", "STYLES": "",
            "CRS": "EPSG:3857", "BBOX": ",".join(f"{v:.2f}" for v in bbox), "WIDTH": "256", "HEIGHT": "256",
            "FORMAT": "image/png"}


def test_a_full_render_queue_sheds_at_once_with_retry_after(
    tmp_path: Path, s3_server: MotoS3Server, s3_bucket: str, s3_proxy: S3Proxy
) -> None:
    url = _upload_scan1000(s3_server, s3_bucket)
    settings = make_settings(
        tmp_path, s3_clusters=(S3Cluster(s3_proxy.url, KEY, SECRET),), render_concurrency=1, render_queue_depth=2,
        render_queue_wait=60.0, render_timeout=60.0, request_timeout=60.0,
        storage_timeout=60.0, storage_read_timeout=60.0, storage_deadline=60.0, storage_retries=0,
    )
    with live_server(settings) as base:
        with httpx.Client(base_url=base, timeout=10) as client:
            descriptor = layer_descriptor("SCAN1000", root=url.rpartition("/")[0])
            assert client.post("/admin/layers/S3", json=descriptor, headers=AUTH).status_code == 204

        async def storm() -> tuple[list[httpx.Response], list[httpx.Response], int]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                pending = {asyncio.create_task(client.get("/wms", params=_getmap(i))) for i in range(ASKED)}
                shed: list[httpx.Response] = []
                # the storage is held: the render in the slot cannot end, so every answer that comes
                # now was refused without waiting for a slot
                while len(shed) < ASKED - 3:
                    done, pending = await asyncio.wait(pending, timeout=30, return_when=asyncio.FIRST_COMPLETED)
                    assert done, f"only {len(shed)} answers while the slot was held"
                    shed.extend(t.result() for t in done)
                assert s3_proxy.count() >= 1  # the render in the slot is reading the storage
                still_waiting = len(pending)
                s3_proxy.release()
                served = [await t for t in pending]
                return shed, served, still_waiting

        s3_proxy.hold()
        try:
            shed, served, still_waiting = asyncio.run(asyncio.wait_for(storm(), 90))
        finally:
            s3_proxy.release()
        assert still_waiting == 3  # one render in the slot, two in the queue
        for answer in shed:
            assert answer.status_code == 503, answer.text[:300]
            assert answer.headers["retry-after"].isdigit()
            assert "ServiceExceptionReport" in answer.text and "render slots busy" in answer.text
        for answer in served:
            assert answer.status_code == 200, answer.text[:300]
            assert answer.headers["content-type"] == "image/png"
        # healthy afterwards: the slot and the queue are free
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/healthcheck").status_code == 200
            again = [client.get("/wms", params=_getmap(i)) for i in range(3)]
            assert [a.status_code for a in again] == [200, 200, 200]


# --- workers (goal 3): the caches are server-wide budgets, each worker holding its share ----------


async def test_each_worker_holds_its_share_of_the_caches(tmp_path: Path) -> None:
    for workers, decoded, entries in ((4, 12 << 20, 2500), (1, 48 << 20, 10000)):  # the default last
        settings = make_settings(tmp_path, workers=workers, decoded_tile_cache_bytes=48 << 20, index_cache_size=10000)
        async with app_client(settings) as client:
            runtime = client.app.state.runtime  # type: ignore[attr-defined]
            assert DECODED_TILES.budget == decoded and runtime.index_cache.maxsize == entries
            assert (await client.get("/healthcheck")).status_code == 200


async def test_the_gate_queues_up_to_its_depth_then_refuses_at_once() -> None:
    gate = RenderGate(1, wait=60.0, queue_depth=1)
    await gate.acquire(10)  # in the slot
    queued = asyncio.create_task(gate.acquire(10))
    await asyncio.sleep(0)
    assert gate.waiting == 1 and not queued.done()
    with pytest.raises(RenderBusy) as refused:  # the queue is full: no wait at all
        await asyncio.wait_for(gate.acquire(10), 1.0)
    assert refused.value.status == 503 and refused.value.retry_after and gate.shed == 1
    gate.release(10)
    await asyncio.wait_for(queued, 5.0)  # the queued render gets the slot
    assert gate.waiting == 0 and gate.in_use == 1 and gate.bytes_in_use == 10
    gate.release(10)
    assert gate.in_use == 0 and gate.bytes_in_use == 0
