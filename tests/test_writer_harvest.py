"""`pyramid harvest` against a small WMS on loopback that renders GetMap from SCAN1000.tif."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator

import numpy as np
import pyproj
import pytest
from aiohttp import web
from PIL import Image
from test_writer_build import _tree
from test_writer_util import SETTINGS, Reference, level_tiles

from tileserver.cli import main
from tileserver.pyramid import Pyramid
from tileserver.storage import Storage
from tileserver.writer.errors import WriterError
from tileserver.writer.harvest import HarvestOptions, harvest_async, parse_wkt_polygons
from tileserver.writer.options import BuildOptions

AREA = "POLYGON((1.70 46.10, 2.05 46.10, 2.05 46.35, 1.70 46.35, 1.70 46.10))"
OPTIONS = BuildOptions(tms="PM", bottom="12", top="10", width=2, height=2, compression="png")


class FakeWms:
    """GetMap by nearest neighbour from the source (RGBA PNG, transparent outside), with scripted
    failures: `script` maps request numbers (1-based) to "500", "xml", "slow" or "down" (500 from
    then on, until `down` is cleared)."""

    def __init__(self) -> None:
        self.source = Reference("SCAN1000.tif", "EPSG:2154")
        self.requests: list[dict[str, str]] = []
        self.script: dict[int, str] = {}
        self.down_from: int | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        query = {k.upper(): v for k, v in request.query.items()}
        self.requests.append(query)
        number = len(self.requests)
        action = self.script.get(number)
        if action == "down":
            self.down_from = number
        if action == "500" or self.down_from is not None:
            return web.Response(status=500, text="internal error")
        if action == "xml":
            return web.Response(body=b'<?xml version="1.0"?><ServiceExceptionReport><ServiceException>'
                                b"busy, try later</ServiceException></ServiceExceptionReport>",
                                content_type="application/vnd.ogc.se_xml")
        if action == "slow":
            await asyncio.sleep(1.0)
        if query.get("REQUEST") != "GetMap" or query.get("VERSION") != "1.3.0":
            return web.Response(status=400, text="bad request")
        return web.Response(body=self.render(query), content_type="image/png")

    def render(self, query: dict[str, str]) -> bytes:
        crs = query["CRS"]
        width, height = int(query["WIDTH"]), int(query["HEIGHT"])
        values = [float(v) for v in query["BBOX"].split(",")]
        lat_first = pyproj.CRS(crs).axis_info[0].direction in ("north", "south")
        xmin, ymin, xmax, ymax = (values[1], values[0], values[3], values[2]) if lat_first else values
        xs = xmin + (np.arange(width) + 0.5) * (xmax - xmin) / width
        ys = ymax - (np.arange(height) + 0.5) * (ymax - ymin) / height
        gx, gy = np.meshgrid(xs, ys)
        sx, sy = pyproj.Transformer.from_crs(crs, "EPSG:2154", always_xy=True).transform(gx, gy)
        src = self.source
        ci = np.floor((np.asarray(sx) - src.x0) / src.rx).astype(int)
        ri = np.floor((src.y0 - np.asarray(sy)) / src.ry).astype(int)
        h, w = src.pixels.shape[:2]
        inside = (ci >= 0) & (ci < w) & (ri >= 0) & (ri < h)
        rgba = np.zeros((height, width, 4), np.uint8)
        rgba[..., :3] = src.pixels[np.clip(ri, 0, h - 1), np.clip(ci, 0, w - 1)]
        rgba[..., 3] = np.where(inside, 255, 0)
        out = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(out, "PNG")
        return out.getvalue()


@pytest.fixture
async def wms() -> AsyncIterator[FakeWms]:
    fake = FakeWms()
    app = web.Application()
    app.router.add_get("/wms", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}/wms"
    yield fake
    await runner.cleanup()


def harvest_options(wms: FakeWms, **kw) -> HarvestOptions:
    params = {"url": wms.url, "layers": "SCAN1000", "format": "image/png", "area": AREA, "levels": "12",
              "dimensions": "256,256", "retries": 2, "backoff": 0.01, "timeout": 5.0}
    params.update(kw)
    return HarvestOptions.from_text(**params)


async def run_harvest(tmp_path, harvest: HarvestOptions, options: BuildOptions = OPTIONS) -> dict:
    async with Storage(SETTINGS) as storage:
        return await harvest_async(harvest, str(tmp_path), "H", options, storage)


async def test_harvest_matches_the_remote_images(tmp_path, wms):
    summary = await run_harvest(tmp_path, harvest_options(wms))
    assert summary["type_infos"]["levels"] == ["10", "11", "12"]
    first = wms.requests[0]
    assert first["CRS"] == "EPSG:3857" and first["LAYERS"] == "SCAN1000" and first["FORMAT"] == "image/png"
    assert (int(first["WIDTH"]), int(first["HEIGHT"])) == (256, 256)
    async with Storage(SETTINGS) as storage:
        pyramid = await Pyramid.open(str(tmp_path / "H.json"), storage)
        tiles = await level_tiles(pyramid, "12")
        ref = Reference("SCAN1000.tif", "EPSG:2154")
        compared = 0
        for (col, row), tile in tiles.items():
            expected, inside = ref.nearest(pyramid.matrix("12"), "EPSG:3857", col, row)
            assert np.array_equal(tile[inside], expected[inside])
            assert np.all(tile[~inside] == 255)
            compared += int(inside.sum())
        assert compared > 10000
        assert await level_tiles(pyramid, "10")  # computed from the level below
    slabs = summary["slabs"]
    assert len(wms.requests) == 4 * sum(1 for _ in (tmp_path / "H" / "DATA" / "12").rglob("*.tif")) or slabs


async def test_harvest_levels_and_axis_order(tmp_path, wms):
    """Two harvested levels (the others computed), in EPSG:4326: BBOX is lat,lon in WMS 1.3.0."""
    options = BuildOptions(tms="4326", top="9", width=2, height=2, compression="zip")
    await run_harvest(tmp_path, harvest_options(wms, levels="11,9", dimensions="512,256"), options)
    asked = {(r["WIDTH"], r["HEIGHT"]) for r in wms.requests}
    assert asked == {("512", "256")}
    lat_min, lon_min, lat_max, lon_max = (float(v) for v in wms.requests[0]["BBOX"].split(","))
    assert 40 < lat_min < lat_max < 50 and 0 < lon_min < lon_max < 3
    descriptor = json.loads((tmp_path / "H.json").read_text())
    assert [lv["id"] for lv in descriptor["levels"]] == ["9", "10", "11"]
    async with Storage(SETTINGS) as storage:
        pyramid = await Pyramid.open(str(tmp_path / "H.json"), storage)
        ref = Reference("SCAN1000.tif", "EPSG:2154")
        for (col, row), tile in (await level_tiles(pyramid, "9")).items():
            expected, inside = ref.nearest(pyramid.matrix("9"), "EPSG:4326", col, row)
            assert np.array_equal(tile[inside], expected[inside])  # harvested, not averaged


async def test_transient_failures_are_retried(tmp_path, wms):
    wms.script = {1: "500", 2: "xml", 3: "slow"}
    await run_harvest(tmp_path, harvest_options(wms, timeout=0.5, retries=3))
    assert (tmp_path / "H.json").exists()
    clean = len(wms.requests)
    assert clean > 3


async def test_remote_failing_mid_run_then_resume(tmp_path, wms):
    await run_harvest(tmp_path / "clean", harvest_options(wms))
    clean_requests = len(wms.requests)
    wms.requests.clear()
    wms.script = {9: "down"}
    with pytest.raises(WriterError) as failure:
        await run_harvest(tmp_path / "run", harvest_options(wms))
    message = str(failure.value)
    assert "level 12, slab (" in message and "GetMap failed after 3 attempt(s) (HTTP 500" in message
    assert not (tmp_path / "run" / "H.json").exists()
    assert (tmp_path / "run" / "H.list.partial").exists()
    journaled = [line for line in (tmp_path / "run" / "H.list.partial").read_text().splitlines()
                 if line[:1] in "DE"]
    assert journaled  # the slabs finished before the failure
    wms.down_from = None
    wms.script = {}
    wms.requests.clear()
    await run_harvest(tmp_path / "run", harvest_options(wms))
    assert len(wms.requests) == clean_requests - 4 * len(journaled)  # finished slabs not asked again
    assert _tree(tmp_path / "run") == _tree(tmp_path / "clean")


async def test_threshold_makes_small_answers_empty(tmp_path, wms):
    with pytest.raises(WriterError, match="empty"):
        await run_harvest(tmp_path, harvest_options(wms, threshold=10**9))
    assert not (tmp_path / "H.json").exists()


def test_harvest_from_the_cli(tmp_path, capsys):
    # a sync test (main() runs its own event loop): the WMS serves from a thread of its own
    import threading

    loop = asyncio.new_event_loop()
    holder: dict = {}

    async def serve() -> None:
        fake = FakeWms()
        app = web.Application()
        app.router.add_get("/wms", fake.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/wms"  # type: ignore[union-attr]
        holder["runner"] = runner

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    try:
        code = main(["pyramid", "harvest", "--output", str(tmp_path), "--name", "H", "--harvest-url", holder["url"],
                     "--harvest-layers", "SCAN1000", "--harvest-format", "image/png", "--harvest-area", AREA,
                     "--harvest-levels", "11", "--bottom", "11", "--top", "11", "--width", "2", "--height", "2",
                     "--harvest-dimensions", "256,512", "--json", "--quiet"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert json.loads(out.out)["type_infos"]["levels"] == ["11"]
        code = main(["pyramid", "harvest", "--output", str(tmp_path), "--name", "X", "--harvest-url", holder["url"],
                     "--harvest-layers", "SCAN1000", "--harvest-format", "image/png", "--harvest-area", AREA,
                     "--harvest-levels", "11", "--bottom", "11", "--harvest-dimensions", "300,300"])
        err = capsys.readouterr().err
        assert code == 1 and "must divide" in err and len(err.strip().splitlines()) == 1
    finally:
        asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


@pytest.mark.parametrize(("wkt", "words"), [
    ("POINT(1 2)", "POLYGON"),
    ("POLYGON((1 2, 3 4))", "3 points"),
    ("POLYGON((46 1, 46 400, 47 400, 46 1))", "longitude"),
])
def test_bad_area(wkt, words):
    with pytest.raises(WriterError, match=words):
        parse_wkt_polygons(wkt)


def test_multipolygon():
    rings = parse_wkt_polygons("MULTIPOLYGON(((1 2, 3 2, 3 4, 1 2)), ((5 6, 7 6, 7 8, 5 6)))")
    assert len(rings) == 2 and rings[1][0].tolist() == [5, 6]
