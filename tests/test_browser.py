"""The map page `/` and an OpenLayers client of our WMTS capabilities, in a real browser.

Playwright drives Debian's chromium (`apt-get install chromium`; Playwright never downloads a browser
here) against uvicorn on loopback with the fixture pyramids published. Every response the page gets
is watched: a 4xx/5xx, a console error or a script error fails the test. OpenLayers 10 is the `ol`
npm package, fetched once with `npm pack` (pinned version and integrity) into a cache directory: its
dist/ol.js is over 1 MB, too big to vendor in tests/data.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from apputil import DATA, PYRAMIDS, app_client, layer_descriptor, live_server, make_settings
from lxml import html as lxml_html
from PIL import Image
from pyproj import Transformer

CHROMIUM = os.environ.get("TILESERVER_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--enable-unsafe-swiftshader",  # WebGL (MapLibre) in software: headless has no GPU, and the implicit fallback is going away
]  # fmt: skip
OL_VERSION = "10.11.0"
OL_INTEGRITY = "sha512-OJ+lrx7kx/1O7Xx18Ff9QkVnwZIEL0OuhJQSy2sYgzzDvyZ2qHvuZEGAajbSstUyBwaS1OtQ4RWnY84tRMDdqg=="
FIXTURES = ("SCAN1000", "MONTAGNE", "BDPARCELLAIRE", "RGEALTI")
TRICKY_TITLE = 'SCAN1000 <img src=x onerror="window.pwned=1"> & co'  # must show as text
WAIT_MS = 30_000  # ceiling for the browser to settle (not a speed assertion)



# --- the server and the references read without it ------------------------------------------------


def descriptor_levels(layer_id: str) -> dict[str, tuple[int, int, int, int]]:
    """Level id → (min_col, min_row, max_col, max_row), straight from the fixture pyramid."""
    desc = json.loads((PYRAMIDS / f"{layer_id}.json").read_text())
    return {
        lv["id"]: tuple(lv["tile_limits"][k] for k in ("min_col", "min_row", "max_col", "max_row"))
        for lv in desc["levels"]
    }  # type: ignore[misc]


@dataclass
class Served:
    base: str
    bounds: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)  # west, south, east, north


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    settings = make_settings(tmp, styles_directory=str(DATA / "styles"))
    extra = {
        "SCAN1000": {"title": TRICKY_TITLE},
        "RGEALTI": {"styles": ["normal", "hypso", "estompage"]},  # a DEM: drawn through hypso
    }
    with live_server(settings) as base:
        world = Served(base)
        with httpx.Client(base_url=base, headers={"Authorization": "Bearer secret"}, timeout=30) as http:
            for name in FIXTURES:
                answer = http.post(f"/admin/layers/{name}", json=layer_descriptor(name, **extra.get(name, {})))
                assert answer.status_code == 204, answer.text
            for name in FIXTURES:  # the TileJSON bounds: what every client is told of the extent
                world.bounds[name] = tuple(http.get(f"/tms/1.0.0/{name}/metadata.json").json()["bounds"])
        yield world


# --- the browser, and what it sees --------------------------------------------------------------


@pytest.fixture(scope="module")
async def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:  # the `test` extra installs it: missing is a broken setup, not a skip
        pytest.fail("playwright is not installed: pip install -e '.[test]'")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@dataclass
class Seen:
    """Responses, console errors and script errors of one page."""

    responses: list = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def watch(self, page) -> None:
        page.on("response", lambda r: self.responses.append(r))
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"script: {e}"))
        page.on("requestfailed", lambda r: self.errors.append(f"failed: {r.url} {r.failure}"))

    def assert_clean(self) -> None:
        bad = [(r.status, r.url) for r in self.responses if r.status >= 400]
        assert not bad, bad
        assert not self.errors, self.errors

    def tiles(self) -> dict[str, list]:
        """Image responses by the layer they draw."""
        out: dict[str, list] = {}
        for response in self.responses:
            layer = tile_layer(response.url)
            if layer is not None:
                out.setdefault(layer, []).append(response)
        return out


def tile_layer(url: str) -> str | None:
    """The layer a tile or map request is for (WMTS REST or KVP, WMS GetMap), None otherwise."""
    parts = urlsplit(url)
    query = {k.lower(): v for k, v in parse_qsl(parts.query)}
    if parts.path.startswith("/wmts/1.0.0/") and not parts.path.endswith(".xml"):
        return parts.path.split("/")[3]
    if parts.path == "/wmts" and query.get("request", "").lower() == "gettile":
        return query["layer"]
    if parts.path == "/wms" and query.get("request", "").lower() == "getmap":
        return query["layers"]
    return None


async def settle(page) -> None:
    """Until the network is quiet and every tile image has loaded or failed."""
    await page.wait_for_load_state("networkidle")
    await page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#map img.leaflet-tile')).every(i => i.complete)",
        timeout=WAIT_MS,
    )


async def moved(page, action) -> None:
    """Run an action that moves the map and wait for the move (an animated zoom included) to end:
    Leaflet ignores a zoom asked while it animates one."""
    await page.evaluate("() => { window.moveEnded = false; tileserverMap.once('moveend', () => { window.moveEnded = true; }); }")
    await action
    await page.wait_for_function("() => window.moveEnded", timeout=WAIT_MS)
    await settle(page)


async def drawn_tiles(page) -> dict[str, list[str]]:
    """URLs of the tile images on the map now, by layer."""
    srcs = await page.evaluate("() => Array.from(document.querySelectorAll('#map img.leaflet-tile-loaded'), i => i.src)")
    out: dict[str, list[str]] = {}
    for src in srcs:
        layer = tile_layer(src)
        assert layer is not None, src
        out.setdefault(layer, []).append(src)
    return out


def has_pixels(body: bytes) -> bool:
    image = Image.open(io.BytesIO(body)).convert("RGBA")
    return image.getextrema()[3][1] > 0


def to_mercator(bounds: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    return Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform_bounds(*bounds)


def assert_requests_inside_limits(seen: Seen, served: Served) -> None:
    """WMTS tiles only inside the published level's limits, WMS images only over the layer's extent."""
    for layer, responses in seen.tiles().items():
        limits = descriptor_levels(layer)
        for response in responses:
            parts = urlsplit(response.url)
            if parts.path.startswith("/wmts/1.0.0/"):
                _, _, _, _, _, grid, z, row, col = parts.path.rsplit(".", 1)[0].split("/")
                assert grid == "PM" and z in limits, response.url
                c0, r0, c1, r1 = limits[z]
                assert c0 <= int(col) <= c1 and r0 <= int(row) <= r1, response.url
            else:
                query = {k.lower(): v for k, v in parse_qsl(parts.query)}
                assert query["crs"] == "EPSG:3857", response.url
                x0, y0, x1, y1 = map(float, query["bbox"].split(","))
                w, s, e, n = to_mercator(served.bounds[layer])
                assert x0 < e and x1 > w and y0 < n and y1 > s, response.url


async def map_contains(page, bounds: tuple[float, float, float, float]) -> bool:
    west, south, east, north = bounds
    return await page.evaluate(
        "b => tileserverMap.getBounds().contains(L.latLngBounds(b))", [[south, west], [north, east]]
    )


@contextlib.asynccontextmanager
async def open_page(browser, url: str):
    page = await browser.new_page(viewport={"width": 1200, "height": 800})
    seen = Seen()
    seen.watch(page)
    try:
        await page.goto(url)
        await settle(page)
        yield page, seen
    finally:
        await page.close()


# --- the map page ---------------------------------------------------------------------------------


async def test_home_fits_lists_and_draws_every_layer(browser, served):
    async with open_page(browser, served.base + "/") as (page, seen):
        await page.wait_for_function(
            f"() => new Set(Array.from(document.querySelectorAll('#map img.leaflet-tile-loaded'), i => i.src"
            f".match(/(?:wmts\\/1\\.0\\.0\\/|layers=)(\\w+)/)[1])).size >= {len(FIXTURES)}",
            timeout=WAIT_MS,
        )
        await settle(page)
        seen.assert_clean()
        tooltips = await page.evaluate(
            """() => { const out = []; tileserverMap.eachLayer(l => { if (l.getTooltip && l.getTooltip()) {
                 l.openTooltip(); out.push(l.getTooltip().getElement().textContent); } }); return out; }"""
        )
        assert TRICKY_TITLE in tooltips
        await page.wait_for_timeout(100)  # an injected <img onerror> would have fired by now
        assert await page.evaluate("() => window.pwned") is None  # the title did not run as markup

        # the view fits the layers: all of them in it, and no zoom further in would hold them
        for name, bounds in served.bounds.items():
            assert await map_contains(page, bounds), name
        union = [[min(b[1] for b in served.bounds.values()), min(b[0] for b in served.bounds.values())],
                 [max(b[3] for b in served.bounds.values()), max(b[2] for b in served.bounds.values())]]
        zoom, fit = await page.evaluate(
            "u => [tileserverMap.getZoom(), tileserverMap.getBoundsZoom(L.latLngBounds(u), false, L.point(40, 40))]",
            union,
        )
        assert zoom == fit

        # every layer drawn (a tile image on the map, answered 200 as an image), inside its limits
        drawn = await drawn_tiles(page)
        assert set(drawn) == set(FIXTURES), drawn
        tiles = seen.tiles()
        for name in FIXTURES:
            assert any(r.status == 200 and r.headers["content-type"].startswith("image/") for r in tiles[name])
        assert_requests_inside_limits(seen, served)
        # the DEM through its rendered style, never as raw samples
        assert all(dict(parse_qsl(urlsplit(u).query))["styles"] == "hypso" for u in drawn["RGEALTI"])

        # the list: each layer, topmost (smallest extent) first, the same stacking on the map
        ids = await page.eval_on_selector_all("#layers > li.layer", "items => items.map(i => i.dataset.id)")
        area = {n: (b[2] - b[0]) * (b[3] - b[1]) for n, b in served.bounds.items()}
        assert ids == sorted(FIXTURES, key=lambda n: area[n])
        z_index = await page.evaluate(
            """() => { const out = {}; tileserverMap.eachLayer(l => { if (l instanceof L.GridLayer)
                 out[l.wmsParams ? l.wmsParams.layers : l._url.split('/')[2]] = l.options.zIndex; }); return out; }"""
        )
        assert sorted(z_index, key=z_index.get, reverse=True) == ids

        # each layer's service URLs, and they answer
        scan = page.locator('li.layer[data-id="SCAN1000"]')
        assert TRICKY_TITLE in await scan.locator("b").inner_text()
        for name in FIXTURES:
            item = page.locator(f'li.layer[data-id="{name}"]')
            links = await item.locator("a.url").evaluate_all("links => links.map(a => [a.parentNode.firstChild.textContent, a.href])")
            urls = {label.rstrip(": "): href for label, href in links}
            assert set(urls) == {"WMTS capabilities", "TMS tile template", "TileJSON", "WMS capabilities", "WMS GetMap"}
            assert urls["TMS tile template"].startswith(f"{served.base}/tms/1.0.0/{name}/%7Bz%7D/%7Bx%7D/%7By%7D.")
            top, (col, row, _, _) = next(iter(descriptor_levels(name).items()))
            urls["TMS tile template"] = (
                urls["TMS tile template"].replace("%7Bz%7D", top).replace("%7Bx%7D", str(col)).replace("%7By%7D", str(row))
            )
            async with httpx.AsyncClient(timeout=30) as http:
                for label, url in urls.items():
                    answer = await http.get(url)
                    assert answer.status_code == 200, (name, label, url, answer.text[:300])
                    if label == "WMS GetMap":
                        assert has_pixels(answer.content), (name, url)  # a DEM too: its style is asked for


@pytest.mark.parametrize("name", FIXTURES)
async def test_zoom_to_shows_the_layer_and_past_its_bottom(browser, served, name):
    async with open_page(browser, served.base + "/") as (page, seen):
        start = await page.evaluate("() => tileserverMap.getZoom()")
        await moved(page, page.click(f'li.layer[data-id="{name}"] .zoom-to'))
        assert await map_contains(page, served.bounds[name])
        west, south, east, north = served.bounds[name]
        zoom, fit = await page.evaluate(
            "b => [tileserverMap.getZoom(), tileserverMap.getBoundsZoom(L.latLngBounds(b))]",
            [[south, west], [north, east]],
        )
        # the layer fills the view, unless that is more than a few zooms past its finest level
        assert zoom > start and fit - 3 <= zoom <= fit, (start, zoom, fit)
        before = len(seen.responses)
        drawn = await drawn_tiles(page)
        assert name in drawn, drawn
        shown = [r for r in seen.tiles()[name] if r.url in drawn[name]]
        assert any([has_pixels(await r.body()) for r in shown]), name  # data, not only nodata

        # past the finest level the layer stays (tiles stretched), still asking nothing outside
        await moved(page, page.evaluate("() => tileserverMap.setZoom(tileserverMap.getMaxZoom())"))
        assert await page.evaluate("() => tileserverMap.getZoom()") > zoom
        assert name in await drawn_tiles(page)
        assert len(seen.responses) >= before
        seen.assert_clean()
        assert_requests_inside_limits(seen, served)


async def test_opacity_and_visibility_controls(browser, served):
    async with open_page(browser, served.base + "/") as (page, seen):
        item = page.locator('li.layer[data-id="MONTAGNE"]')
        await item.locator(".opacity").evaluate("e => { e.value = 30; e.dispatchEvent(new Event('input')); }")
        opacity = await page.evaluate(
            """() => { let o = null; tileserverMap.eachLayer(l => { if (l instanceof L.GridLayer && !l.wmsParams
                 && l._url.includes('/MONTAGNE/')) o = getComputedStyle(l.getContainer()).opacity; }); return o; }"""
        )
        assert float(opacity) == pytest.approx(0.3)
        # a DEM starts translucent so that what lies under it shows through
        assert await page.locator('li.layer[data-id="RGEALTI"] .opacity').input_value() == "60"
        await item.locator(".visible").uncheck()
        await settle(page)
        assert "MONTAGNE" not in await drawn_tiles(page)
        await item.locator(".visible").check()
        # Leaflet adds the layer's tiles after the click; "networkidle" was reached long before, so
        # wait for a MONTAGNE tile to have loaded (the test fails by time-out if none ever does)
        await page.wait_for_function(
            "() => Array.from(document.querySelectorAll('#map img.leaflet-tile-loaded'))"
            ".some(i => i.src.includes('/MONTAGNE/'))", timeout=WAIT_MS)
        await settle(page)
        assert "MONTAGNE" in await drawn_tiles(page)
        seen.assert_clean()


# --- OpenLayers reading our WMTS capabilities -----------------------------------------------------


def openlayers_dist() -> Path:
    """ol.js and ol.css of the pinned `ol` npm package, fetched once with npm into a cache."""
    root = os.environ.get("TILESERVER_TEST_CACHE") or Path.home() / ".cache" / "tileserver-tests"
    cache = Path(root) / f"ol-{OL_VERSION}"
    if (cache / "ol.js").is_file() and (cache / "ol.css").is_file():
        return cache
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is needed to fetch the `ol` package (Debian: apt-get install npm)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", f"ol@{OL_VERSION}", "--silent"], cwd=tmp, check=True, timeout=600,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        tarball = Path(tmp) / f"ol-{OL_VERSION}.tgz"
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        assert digest == OL_INTEGRITY, f"ol@{OL_VERSION} tarball integrity {digest}"
        staging = Path(tmp) / "out"
        staging.mkdir()
        with tarfile.open(tarball) as tar:
            for member, name in (("package/dist/ol.js", "ol.js"), ("package/ol.css", "ol.css")):
                (staging / name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
        cache.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # another run may have filled it meanwhile
            staging.rename(cache)
    return cache


OL_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"><link rel="stylesheet" href="ol.css">
<style>html, body, #map { margin: 0; width: 100%; height: 100%; }</style></head>
<body><div id="map"></div><script src="ol.js"></script><script>
(async function () {
  const params = new URLSearchParams(location.search);
  const answer = await fetch('/wmts?SERVICE=WMTS&REQUEST=GetCapabilities');
  const caps = new ol.format.WMTSCapabilities().read(await answer.text());
  const view = new ol.View();
  const extent = ol.extent.createEmpty();
  const layers = params.get('layers').split(',').map(function (id) {
    const options = ol.source.WMTS.optionsFromCapabilities(caps, {layer: id, matrixSet: params.get('matrixSet')});
    if (!options) throw new Error('no WMTS options for ' + id);
    const described = caps.Contents.Layer.find(function (l) { return l.Identifier === id; });
    ol.extent.extend(extent, ol.proj.transformExtent(described.WGS84BoundingBox, 'EPSG:4326', view.getProjection()));
    return new ol.layer.Tile({source: new ol.source.WMTS(options)});
  });
  const map = new ol.Map({target: 'map', layers: layers, view: view});
  view.fit(extent, {padding: [20, 20, 20, 20]});
  window.olMap = map;
  map.once('rendercomplete', function () { window.olDone = true; });
})().catch(function (e) { window.olError = String(e); console.error(e); });
</script></body></html>
"""


async def test_openlayers_draws_our_wmts_layers(browser, served):
    """OpenLayers 10 `optionsFromCapabilities` on our capabilities; the page and OpenLayers are served
    from the server's origin by the browser itself (page.route), so the capabilities fetch is same-origin."""
    dist = openlayers_dist()
    files = {
        "index.html": (OL_PAGE.encode(), "text/html"),
        "ol.js": ((dist / "ol.js").read_bytes(), "text/javascript"),
        "ol.css": ((dist / "ol.css").read_bytes(), "text/css"),
    }

    async def serve_test_files(route):
        body, media_type = files[urlsplit(route.request.url).path.rsplit("/", 1)[1]]
        await route.fulfill(status=200, body=body, content_type=media_type)

    page = await browser.new_page(viewport={"width": 1000, "height": 700})
    seen = Seen()
    seen.watch(page)
    try:
        await page.route(f"{served.base}/__openlayers__/**", serve_test_files)
        layers = ("SCAN1000", "MONTAGNE")  # the PM layers: OpenLayers knows EPSG:3857 without proj4
        await page.goto(f"{served.base}/__openlayers__/index.html?matrixSet=PM&layers={','.join(layers)}")
        await page.wait_for_function("() => window.olDone || window.olError", timeout=WAIT_MS)
        await page.wait_for_load_state("networkidle")
        assert await page.evaluate("() => window.olError") is None
        seen.assert_clean()
        tiles = seen.tiles()
        painted = await page.evaluate(
            """() => Array.from(document.querySelectorAll('#map canvas')).some(c => {
                 const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                 for (let i = 3; i < d.length; i += 4) if (d[i] > 0) return true;
                 return false; })"""
        )
        assert painted  # OpenLayers drew the tiles on its canvas
        for name in layers:
            ok = [r for r in tiles.get(name, []) if r.status == 200 and r.headers["content-type"] == "image/png"]
            assert ok, (name, [r.url for r in seen.responses])
            assert any([has_pixels(await r.body()) for r in ok]), name
        # zoomed out to the top of the grid, OpenLayers still asks only for tiles we serve
        await page.evaluate("() => olMap.getView().setZoom(1)")
        await page.wait_for_timeout(200)
        await page.wait_for_load_state("networkidle")
        seen.assert_clean()
        assert len(seen.tiles()) == len(layers)
    finally:
        await page.close()



# --- what the page says of layers it cannot draw as tiles (no browser needed) ---------------------


async def test_page_data_for_layers_not_drawn_as_tiles(tmp_path):
    """A DEM without a rendered style is listed, not drawn; a vector tile layer is drawn by MapLibre
    with its default style; a PM layer that 404s its empty tiles is drawn through WMS (which never
    answers 404) instead of WMTS tiles."""
    from test_tms_service import built_pyramids, descriptor_for

    roads = built_pyramids(tmp_path / "built")["ROADS"]
    layers = {
        "DEMRAW": layer_descriptor("RGEALTI", styles=["normal"]),
        "ROADS": descriptor_for(roads, styles=["normal"]),
        "EMPTY404": layer_descriptor("MONTAGNE", empty_tile_404=True),
        "SCAN1000": layer_descriptor("SCAN1000"),
    }
    async with app_client(make_settings(tmp_path, styles_directory=str(DATA / "styles"))) as client:
        for name, desc in layers.items():
            answer = await client.post(f"/admin/layers/{name}", json=desc, headers={"Authorization": "Bearer secret"})
            assert answer.status_code == 204, answer.text
        page = await client.get("/")
    assert page.status_code == 200
    doc = lxml_html.fromstring(page.text)
    data = {layer["id"]: layer for layer in json.loads(doc.get_element_by_id("layer-data").text)["layers"]}
    assert set(data) == set(layers)
    assert data["DEMRAW"]["draw"] is None
    assert data["ROADS"]["draw"]["kind"] == "maplibre" and data["ROADS"]["draw"]["url"] == "tms/1.0.0/ROADS/style.json"
    assert data["EMPTY404"]["draw"]["kind"] == "wms" and data["SCAN1000"]["draw"]["kind"] == "wmts"
    assert data["SCAN1000"]["draw"]["limits"]["10"] == list(descriptor_levels("SCAN1000")["10"])
    items = {li.get("data-id"): li for li in doc.xpath("//ol[@id='layers']/li")}
    assert "no style rendering them" in items["DEMRAW"].text_content()
    assert "vector tiles with MapLibre GL, default style" in items["ROADS"].text_content()
    assert b"maplibre-gl.js" in page.content  # loaded only when a vector tile layer is drawn
    assert not items["DEMRAW"].xpath(".//input") and items["SCAN1000"].xpath(".//input[@class='opacity']")


def _vector_fixture(tmp_path: Path) -> dict[str, dict]:
    """A raster layer, a public WFS layer (two tables) and a restricted one, as admin descriptors."""
    from vectorutil import make_gpkg

    gpkg = make_gpkg(tmp_path / "base.gpkg")

    def wfs(restricted: bool = False) -> dict:
        return {"title": "BD TOPO <extract>", "abstract": "two tables", **({"restricted": True} if restricted else {}),
                "wfs": {"base": f"file://{gpkg}", "relations": [
                    {"native_name": "communes", "public_name": "commune"},
                    {"native_name": "gares", "public_name": "gare"}]}}

    return {"SCAN1000": layer_descriptor("SCAN1000"), "bdtopo": wfs(), "hidden": wfs(restricted=True)}


def _union(boxes: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


async def test_page_lists_vector_layers_with_their_links(tmp_path):
    """A WFS layer is listed (not drawn yet) with its extent and the URLs of WFS and OGC API Features,
    every one of which answers; a restricted one is not on the public page."""
    from owslib.wfs import WebFeatureService

    layers = _vector_fixture(tmp_path)
    async with app_client(make_settings(tmp_path)) as client:
        for name, desc in layers.items():
            answer = await client.post(f"/admin/layers/{name}", json=desc, headers={"Authorization": "Bearer secret"})
            assert answer.status_code == 204, answer.text
        page = await client.get("/")
        assert page.status_code == 200
        doc = lxml_html.fromstring(page.text)
        data = json.loads(doc.get_element_by_id("layer-data").text)["layers"]
        assert [(d["id"], d["kind"]) for d in data] == [("SCAN1000", "raster"), ("bdtopo", "vector")]
        vector = data[1]
        assert vector["draw"] is None and vector["title"] == "BD TOPO <extract>"
        # the extent: the union of the feature types' WGS84 boxes, as the WFS capabilities give them
        capabilities = (await client.get("/wfs", params={"SERVICE": "WFS", "REQUEST": "GetCapabilities"})).content
        wfs = WebFeatureService("http://testserver/wfs", version="2.0.0", xml=capabilities)
        assert set(wfs.contents) == {"bdtopo:commune", "bdtopo:gare"}
        west, south, east, north = _union([wfs.contents[n].boundingBoxWGS84 for n in wfs.contents])
        assert [*vector["bounds"][0], *vector["bounds"][1]] == pytest.approx([south, west, north, east])

        items = {li.get("data-id"): li for li in doc.xpath("//ol[@id='layers']/li")}
        assert set(items) == {"SCAN1000", "bdtopo"}  # "hidden" is restricted
        item = items["bdtopo"]
        assert "vector" in item.get("class") and item.get("data-index") == "1"
        text = item.text_content()
        assert "not drawn yet" in text and "commune (Polygon, 37 features)" in text and "gare (Point, 12" in text
        assert "BD TOPO <extract>" in item.xpath(".//b")[0].text_content()  # text, not markup
        assert not item.xpath(".//input") and item.xpath(".//button[@class='zoom-to']")
        links = {a.getparent().text.rstrip(": "): a.get("href") for a in item.xpath(".//a[@class='url']")}
        assert set(links) == {
            "WFS capabilities",
            *(f"{kind} (bdtopo:{t})" for kind in ("WFS GetFeature", "OGC API collection", "OGC API items")
              for t in ("commune", "gare")),
        }
        for label, url in links.items():
            assert url.startswith("http://testserver/"), url
            answer = await client.get(url.removeprefix("http://testserver"))
            assert answer.status_code == 200, (label, url, answer.text[:300])
            if label.startswith(("WFS GetFeature", "OGC API items")):
                assert answer.json()["type"] == "FeatureCollection" and answer.json()["features"], label
            elif label.startswith("OGC API collection"):
                assert answer.json()["id"] == label.split("(")[1].rstrip(")"), label
            else:
                assert b"bdtopo:commune" in answer.content


async def test_vector_layers_on_the_map_page_fail_no_request(browser, tmp_path):
    """The page with a WFS layer: outlined, zoom-to works, and no request, script or console error."""
    layers = _vector_fixture(tmp_path)
    with live_server(make_settings(tmp_path)) as base:
        with httpx.Client(base_url=base, headers={"Authorization": "Bearer secret"}, timeout=30) as http:
            for name, desc in layers.items():
                answer = http.post(f"/admin/layers/{name}", json=desc)
                assert answer.status_code == 204, answer.text
        async with open_page(browser, base + "/") as (page, seen):
            item = page.locator('li.layer.vector[data-id="bdtopo"]')
            assert "not drawn yet" in await item.inner_text()
            hrefs = await item.locator("a.url").evaluate_all("links => links.map(a => a.href)")
            assert any("/ogcapi/collections/bdtopo:commune/items" in h for h in hrefs)
            outlines = await page.evaluate(
                "() => { let n = 0; tileserverMap.eachLayer(l => { if (l instanceof L.Rectangle) n++; }); return n; }")
            assert outlines == 2  # the raster layer's and the vector layer's
            await moved(page, item.locator(".zoom-to").click())
            await settle(page)
            bounds = json.loads(await page.locator("#layer-data").text_content())["layers"][1]["bounds"]
            (south, west), (north, east) = bounds
            assert await map_contains(page, (west, south, east, north))
            seen.assert_clean()


# --- vector tiles drawn with MapLibre GL ----------------------------------------------------------


def _gl_ready_js() -> str:
    """True once every MapLibre layer on the map has its style and the tiles of its view loaded."""
    return """() => { const gl = []; tileserverMap.eachLayer(l => { if (l.getMaplibreMap) gl.push(l.getMaplibreMap()); });
        return gl.length > 0 && gl.every(m => m && m.isStyleLoaded() && m.areTilesLoaded() && !m.isMoving()); }"""


async def test_vector_tiles_drawn_with_maplibre_next_to_raster_layers(browser, tmp_path):
    """A vector tile pyramid (GeoPackage → tippecanoe → ROK4 slabs) on the map page: a Leaflet layer
    drawn by MapLibre GL with the layer's default style, listed and stacked with the raster layer; its
    data shows as coloured pixels where the features are, nothing where there are none."""
    import asyncio

    from test_vector_styles import ARBRES, PARCS, build_vector_tiles, vector_layer_descriptor

    pyramid = await asyncio.to_thread(build_vector_tiles, tmp_path / "vtiles")
    layers = {"SCAN1000": layer_descriptor("SCAN1000"), "VTILES": vector_layer_descriptor(pyramid)}
    with live_server(make_settings(tmp_path)) as base:
        with httpx.Client(base_url=base, headers={"Authorization": "Bearer secret"}, timeout=30) as http:
            for name, desc in layers.items():
                answer = http.post(f"/admin/layers/{name}", json=desc)
                assert answer.status_code == 204, answer.text
        async with open_page(browser, base + "/") as (page, seen):
            item = page.locator('li.layer[data-id="VTILES"]')
            assert "MapLibre GL, default style" in await item.inner_text()
            assert await item.locator("input.visible").is_checked()
            await moved(page, item.locator(".zoom-to").click())
            await page.wait_for_function(_gl_ready_js(), timeout=WAIT_MS)
            await page.wait_for_timeout(300)  # the frame after the last tile is painted

            style_urls = [r.url for r in seen.responses if r.url.endswith("/style.json")]
            assert style_urls == [f"{base}/tms/1.0.0/VTILES/style.json"]
            pbf = [r for r in seen.responses if r.url.endswith(".pbf")]
            assert any(r.status == 200 for r in pbf)
            # tiles inside the limits the pyramid does not hold are empty MVTs (200), never errors
            seen.assert_clean()

            shot = Image.open(io.BytesIO(await page.locator("#map").screenshot())).convert("RGB")
            background = shot.getpixel((2, shot.height - 2))

            async def pixel(lon: float, lat: float) -> tuple[int, int, int]:
                x, y = await page.evaluate("p => { const c = tileserverMap.latLngToContainerPoint(p); return [c.x, c.y]; }",
                                           [lat, lon])
                return shot.getpixel((round(x), round(y)))

            def coloured(rgb: tuple[int, int, int]) -> bool:
                return max(abs(a - b) for a, b in zip(rgb, background, strict=True)) > 30

            # inside each park polygon and on each tree: the style's colours; between them: nothing drawn
            for park in PARCS:
                centre = park.centroid
                assert coloured(await pixel(centre.x, centre.y)), ("park", centre)
            for tree in ARBRES[:3]:
                assert coloured(await pixel(tree.x, tree.y)), ("tree", tree)
            assert not coloured(await pixel(2.355, 48.8435))  # south of the trees, north of the parks
            # hidden by its checkbox: no WebGL layer on the map, the parks' pixels gone
            await item.locator("input.visible").uncheck()
            assert await page.evaluate(
                "() => { let n = 0; tileserverMap.eachLayer(l => { if (l.getMaplibreMap) n++; }); return n; }") == 0
