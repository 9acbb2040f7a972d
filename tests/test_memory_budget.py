"""Renders are bounded in memory and in time (issue 11): maps are drawn in strips with the same
result as whole, admitted by their estimated memory against a per-worker budget, refused when they
alone exceed it, and stopped at their deadline; the largest map the defaults allow, twice at once,
keeps a real server process under its documented budget."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from apputil import DATA, free_port, layer_descriptor, live_server, make_settings
from test_render_pipeline import fixture_layers, matched_target  # noqa: F401 - fixture

from tileserver.publication.model import parse_layer
from tileserver.publication.store import PublicationStore
from tileserver.render.draw import draw
from tileserver.render.errors import RenderBusy, RenderTimeout, RenderTooLarge
from tileserver.render.fetch import fetch_tiles
from tileserver.render.gate import DEFAULT_MEMORY_BUDGET, RenderGate
from tileserver.render.georef import Grid
from tileserver.render.levels import plan_source
from tileserver.render.model import MapLayer
from tileserver.render.pipeline import render_map
from tileserver.render.styles import load_style
from tileserver.settings import Settings

FIXTURES = ["SCAN1000", "MONTAGNE", "BDPARCELLAIRE", "RGEALTI"]
MAP = {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "STYLES": "", "FORMAT": "image/png"}
SCAN_BBOX_3857 = "156543.03,5792092.26,234814.55,5831228.01"  # the SCAN1000 fixture's extent


def _layers_param(count: int) -> str:
    return ",".join(FIXTURES[i % len(FIXTURES)] for i in range(count))


# --------------------------------------------------------------------------- strips


async def _drawn(layers: list[MapLayer], target: Grid, picture: bool, strip_pixels: int):
    plans = [plan_source(layer.published, target, layer.kernel_name,
                         layer.active_style.border if layer.active_style else 0) for layer in layers]
    fetched = [await fetch_tiles(layer.published, plan) for layer, plan in zip(layers, plans, strict=True)]
    return await asyncio.to_thread(draw, layers, plans, fetched, target, picture, None, strip_pixels)


@pytest.mark.parametrize(("names", "crs", "picture", "style"), [
    (["SCAN1000"], "EPSG:3857", True, None),
    (["SCAN1000"], "EPSG:2154", True, None),  # reprojected picture: the mesh path
    (["SCAN1000", "MONTAGNE", "SCAN1000"], "EPSG:4326", True, None),  # alpha compositing
    (["RGEALTI"], "EPSG:2154", False, None),  # data values, warp
    (["RGEALTI"], "EPSG:3857", True, "estompage"),  # a style with a border: strips need their neighbours
    (["RGEALTI"], "EPSG:2154", False, "pente"),
])
async def test_a_map_drawn_in_strips_is_the_map_drawn_whole(fixture_layers, names, crs, picture, style):  # noqa: F811
    published = [fixture_layers[n] for n in names]
    loaded = load_style(DATA / "styles" / f"{style}.json") if style else None
    layers = [MapLayer(p, loaded) for p in published]
    target = matched_target(published[-1], crs, shrink=0.1)
    target = Grid(target.crs, target.bbox, 300, 257)
    whole = await _drawn(layers, target, picture, 1 << 30)
    strips = await _drawn(layers, target, picture, 300 * 16 + 7)  # 16 rows a strip, the last one shorter
    assert strips.data.shape == whole.data.shape and strips.data.dtype == whole.data.dtype
    assert np.array_equal(strips.valid, whole.valid)
    if picture:
        # Pillow's weights depend on the mosaic's origin, and a reprojected strip's antialiasing
        # prefilter on its own scale: rounding, and a few levels at antialiased data edges
        # (premultiplied: colour under an alpha of 1/255 is meaningless)
        alpha_w, alpha_s = whole.data[..., 3:].astype(int), strips.data[..., 3:].astype(int)
        assert np.abs(alpha_w - alpha_s).max() <= 2
        colour = np.abs(whole.data[..., :3] * alpha_w - strips.data[..., :3] * alpha_s) / 255
        assert colour.max() <= 4 and (colour > 1).mean() < 0.01
    elif whole.data.dtype.kind == "f":  # coordinates from another origin: float32 rounding (slopes amplify it)
        np.testing.assert_allclose(strips.data, whole.data, rtol=1e-4, atol=1e-3)
    else:
        assert np.array_equal(strips.data, whole.data)
    assert strips.levels == whole.levels


# --------------------------------------------------------------------------- admission by memory


async def test_a_map_larger_than_the_budget_alone_is_refused(fixture_layers):  # noqa: F811
    published = fixture_layers["SCAN1000"]
    gate = RenderGate(4, wait=1.0, memory_budget=64 << 20)
    with pytest.raises(RenderTooLarge) as info:
        await render_map([MapLayer(published)], Grid("EPSG:3857", published.native_bbox, 4096, 4096), gate=gate)
    assert info.value.status == 400 and "MiB" in info.value.message and "64 MiB" in info.value.message
    assert gate.bytes_in_use == 0 and gate.in_use == 0
    small = await render_map([MapLayer(published)], Grid("EPSG:3857", published.native_bbox, 256, 256), gate=gate)
    assert small.data.shape[:2] == (256, 256) and gate.bytes_in_use == 0


async def test_renders_wait_for_memory_not_only_for_a_slot(fixture_layers):  # noqa: F811
    published = fixture_layers["SCAN1000"]
    target = Grid("EPSG:3857", published.native_bbox, 2048, 2048)
    gate = RenderGate(8, wait=60.0, memory_budget=DEFAULT_MEMORY_BUDGET)
    peak = {"bytes": 0, "renders": 0}
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            peak["bytes"] = max(peak["bytes"], gate.bytes_in_use)
            peak["renders"] = max(peak["renders"], gate.in_use)
            await asyncio.sleep(0.001)

    probe = RenderGate(1, memory_budget=1 << 40)  # room for anything: see what one render reserves
    task = asyncio.create_task(render_map([MapLayer(published)], target, gate=probe))
    one = 0
    while not task.done():
        one = max(one, probe.bytes_in_use)
        await asyncio.sleep(0)
    first = await task
    watcher = asyncio.create_task(watch())
    # a budget for one such map and a half: three renders asked at once run one at a time
    gate.memory_budget = one + one // 2
    results = await asyncio.gather(*(render_map([MapLayer(published)], target, gate=gate) for _ in range(3)))
    stop.set()
    await watcher
    assert all(np.array_equal(r.data, first.data) for r in results)
    assert one > 0 and peak["renders"] == 1 and peak["bytes"] <= gate.memory_budget
    assert gate.bytes_in_use == 0 and gate.in_use == 0


async def test_waiting_for_memory_beyond_the_queue_wait_is_busy(fixture_layers):  # noqa: F811
    published = fixture_layers["SCAN1000"]
    gate = RenderGate(8, wait=0.05, memory_budget=512 << 20)
    await gate.acquire(500 << 20)  # a render in flight holds most of the budget
    with pytest.raises(RenderBusy) as info:
        await render_map([MapLayer(published)], Grid("EPSG:3857", published.native_bbox, 1024, 1024), gate=gate)
    assert info.value.status == 503 and "MiB" in info.value.message and gate.busy_refusals == 1
    gate.release(500 << 20)
    assert gate.bytes_in_use == 0 and gate.in_use == 0


# --------------------------------------------------------------------------- deadline


async def test_a_render_past_its_deadline_stops_between_strips(fixture_layers):  # noqa: F811
    published = fixture_layers["SCAN1000"]
    gate = RenderGate(2, timeout=1e-9)
    with pytest.raises(RenderTimeout) as info:
        await render_map([MapLayer(published)] * 3, Grid("EPSG:3857", published.native_bbox, 4096, 4096), gate=gate)
    assert info.value.status == 503 and "longer than" in info.value.message
    assert gate.in_use == 0 and gate.bytes_in_use == 0


def test_a_getmap_past_the_render_timeout_answers_an_ogc_error(tmp_path):
    settings = make_settings(tmp_path, render_timeout=0.05)
    store = PublicationStore(settings.resolved_store_url)
    for name in FIXTURES:
        store.add_layer(parse_layer(name, layer_descriptor(name)))
    with live_server(settings) as base:
        params = {**MAP, "LAYERS": _layers_param(10), "CRS": "EPSG:3857", "BBOX": SCAN_BBOX_3857,
                  "WIDTH": "4096", "HEIGHT": "4096"}
        answer = httpx.get(f"{base}/wms", params=params, timeout=120)
        assert answer.status_code == 503, answer.text[:500]
        assert "ServiceExceptionReport" in answer.text and "longer than 0.05 s" in answer.text
        # the server is free again: a small map renders
        small = httpx.get(f"{base}/wms", params={**params, "LAYERS": "SCAN1000", "WIDTH": "64", "HEIGHT": "64"},
                          timeout=60)
        assert small.status_code == 200 and small.headers["content-type"] == "image/png"


# --------------------------------------------------------------------------- the worker's budget


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


def test_the_largest_maps_the_defaults_allow_twice_at_once_stay_under_the_budget(tmp_path):
    defaults = Settings()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store = PublicationStore(str(data_dir / "store.sqlite"))
    for name in FIXTURES:
        store.add_layer(parse_layer(name, layer_descriptor(name)))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TILESERVER_", "ROK4_"))}
    # the memory limits are the defaults; only time limits are raised, for a machine shared with others
    env.update(TILESERVER_DATA_DIR=str(data_dir), TILESERVER_DEMO="false", TILESERVER_RENDER_TIMEOUT="300",
               TILESERVER_REQUEST_TIMEOUT="300", TILESERVER_RENDER_QUEUE_WAIT="300")
    server = subprocess.Popen([sys.executable, "-m", "tileserver.cli", "serve", "--port", str(port),
                               "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/healthcheck", timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        params = {**MAP, "LAYERS": _layers_param(defaults.wms_layer_limit), "CRS": "EPSG:3857",
                  "BBOX": SCAN_BBOX_3857, "WIDTH": str(defaults.render_max_width),
                  "HEIGHT": str(defaults.render_max_height)}
        warm = httpx.get(f"{base}/wms", params={**params, "WIDTH": "64", "HEIGHT": "64"}, timeout=60)
        assert warm.status_code == 200, warm.text[:500]
        before = _status_kib(server.pid, "VmRSS")
        answers: list[httpx.Response] = []

        def one() -> None:
            answers.append(httpx.get(f"{base}/wms", params=params, timeout=600))

        clients = [threading.Thread(target=one) for _ in range(2)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        peak = _status_kib(server.pid, "VmHWM")
        assert [a.status_code for a in answers] == [200, 200], [a.text[:300] for a in answers]
        assert all(a.headers["content-type"] == "image/png" and len(a.content) > 1000 for a in answers)
        growth = (peak - before) * 1024
        print(f"two {params['WIDTH']}x{params['HEIGHT']} maps of {defaults.wms_layer_limit} layers: "
              f"peak RSS +{growth >> 20} MiB (budget {defaults.render_memory_budget >> 20} MiB)")
        assert growth < defaults.render_memory_budget
    finally:
        server.terminate()
        server.wait(30)
