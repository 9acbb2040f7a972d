"""Client styles of vector tile layers (`/tms/1.0.0/{layer}/style.json`, `styles.json`,
`styles/{name}.json`): the default style generated from a real vector pyramid (GeoPackage → tippecanoe →
ROK4 slabs), checked against the layer's TileJSON and tiles; attached styles offered from the layer record."""

from __future__ import annotations

import json
from pathlib import Path

import mapbox_vector_tile
import numpy as np
import pytest
import shapely
from apputil import app_client, make_settings

from tileserver.settings import load_settings
from tileserver.writer.vector_pyramid import Composition, VectorPyramidOptions, build_vector_pyramid

ADMIN = {"Authorization": "Bearer secret"}
# the data: around (2.35, 48.85), small enough for one tile of each level
PARCS = [shapely.box(2.30 + i * 0.02, 48.83, 2.31 + i * 0.02, 48.84) for i in range(4)]
ROUTES = [shapely.LineString([(2.30, 48.86 + i * 0.004), (2.40, 48.86 + i * 0.004)]) for i in range(3)]
ARBRES = [shapely.Point(2.30 + i * 0.01, 48.85) for i in range(10)]
TABLES = {"parcs": ("Polygon", PARCS), "routes": ("LineString", ROUTES), "arbres": ("Point", ARBRES)}
LEVELS = ("10", "13")


def make_vector_base(path: Path) -> Path:
    """Three tables in EPSG:4326: `parcs` (polygons), `routes` (lines), `arbres` (points)."""
    from pyogrio.raw import write

    for i, (table, (geometry_type, shapes)) in enumerate(TABLES.items()):
        write(path, np.array(shapely.to_wkb(shapes), dtype=object),
              [np.array([f"{table} {n}" for n in range(len(shapes))], dtype=object)], ["nom"],
              layer=table, driver="GPKG", geometry_type=geometry_type, crs="EPSG:4326", append=i > 0)
    return path


def build_vector_tiles(tmp: Path, name: str = "VTILES") -> Path:
    """A ROK4 vector pyramid of the three tables, levels 10 to 13 (`parcs` from 11 only)."""
    tmp.mkdir(parents=True, exist_ok=True)
    base = make_vector_base(tmp / "base.gpkg")
    top, bottom = LEVELS
    items = (Composition("parcs", "11", bottom), Composition("routes", top, bottom), Composition("arbres", top, bottom))
    build_vector_pyramid(base, str(tmp), name, VectorPyramidOptions(items), settings=load_settings(env={}))
    return tmp / f"{name}.json"


def vector_layer_descriptor(path: Path, **extra) -> dict:
    top, bottom = LEVELS
    return {"title": "Vector tiles", "abstract": "three tables",
            "pyramids": [{"path": f"file://{path}", "bottom_level": bottom, "top_level": top}], **extra}


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    return build_vector_tiles(tmp_path_factory.mktemp("vtiles"))


async def publish(client, name: str, descriptor: dict) -> None:
    answer = await client.post(f"/admin/layers/{name}", json=descriptor, headers=ADMIN)
    assert answer.status_code == 204, answer.text


async def test_default_style_draws_every_table_of_the_tilejson(pyramid, tmp_path):
    async with app_client(make_settings(tmp_path)) as client:
        await publish(client, "VTILES", vector_layer_descriptor(pyramid))
        answer = await client.get("/tms/1.0.0/VTILES/style.json")
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/json"
        style = answer.json()
        tilejson = (await client.get("/tms/1.0.0/VTILES/metadata.json")).json()

        assert style["version"] == 8
        assert style["sources"] == {"VTILES": {"type": "vector", "url": "http://testserver/tms/1.0.0/VTILES/metadata.json"}}
        # every source-layer of the style is a vector layer of the TileJSON, and each of those is drawn
        known = {v["id"] for v in tilejson["vector_layers"]}
        assert known == set(TABLES)
        used = {layer["source-layer"] for layer in style["layers"]}
        assert used == known
        assert len({layer["id"] for layer in style["layers"]}) == len(style["layers"])
        by_table: dict[str, list[dict]] = {}
        for layer in style["layers"]:
            assert layer["source"] == "VTILES"
            by_table.setdefault(layer["source-layer"], []).append(layer)
        # the geometry type of each table, as the descriptor says it, picks the layer types
        assert [(x["type"], x["filter"]) for x in by_table["parcs"]] == [
            ("fill", ["==", "$type", "Polygon"]), ("line", ["==", "$type", "Polygon"])]
        assert [(x["type"], x["filter"]) for x in by_table["routes"]] == [("line", ["==", "$type", "LineString"])]
        assert [(x["type"], x["filter"]) for x in by_table["arbres"]] == [("circle", ["==", "$type", "Point"])]
        # one colour per source-layer
        colours = {t: {v for x in layers for k, v in x["paint"].items() if k.endswith("-color") and "stroke" not in k}
                   for t, layers in by_table.items()}
        assert all(len(c) == 1 for c in colours.values()) and len(set.union(*colours.values())) == 3
        assert by_table["parcs"][0]["minzoom"] == 11 and "minzoom" not in by_table["routes"][0]

        # what the style names is in the tiles the TileJSON points at
        tile_url = tilejson["tiles"][0].removeprefix("http://testserver")
        z, x, y = 12, 2074, 1409  # the tile holding (2.35, 48.85)
        tile = await client.get(tile_url.format(z=z, x=x, y=y))
        assert tile.status_code == 200
        decoded = mapbox_vector_tile.decode(tile.content)
        assert set(decoded) == set(TABLES)


async def test_default_style_follows_the_public_url(pyramid, tmp_path):
    settings = make_settings(tmp_path, forwarded_allow_ips="*")
    async with app_client(settings) as client:
        await publish(client, "VTILES", vector_layer_descriptor(pyramid))
        answer = await client.get("/tms/1.0.0/VTILES/style.json",
                                  headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "maps.example.org"})
        assert answer.json()["sources"]["VTILES"]["url"] == "https://maps.example.org/tms/1.0.0/VTILES/metadata.json"
        assert "X-Forwarded-Host" in answer.headers["vary"]


async def test_attached_styles_are_listed_and_redirect(pyramid, tmp_path):
    attached = [{"name": "sobre", "title": "Sobre", "url": "https://example.org/annexes/ds/style/sobre.json"},
                {"name": "vif", "url": "https://example.org/vif.json", "current": True}]
    async with app_client(make_settings(tmp_path)) as client:
        await publish(client, "VTILES", vector_layer_descriptor(pyramid, vector_styles=attached))
        listed = (await client.get("/tms/1.0.0/VTILES/styles.json")).json()
        base = "http://testserver/tms/1.0.0/VTILES"
        assert [(s["name"], s["url"], s["current"]) for s in listed] == [
            ("default", f"{base}/style.json", False),
            ("sobre", f"{base}/styles/sobre.json", False),
            ("vif", f"{base}/styles/vif.json", True),
        ]
        default = await client.get("/tms/1.0.0/VTILES/styles/default.json")
        assert default.json()["version"] == 8
        moved = await client.get("/tms/1.0.0/VTILES/styles/sobre.json", follow_redirects=False)
        assert moved.status_code == 302 and moved.headers["location"] == attached[0]["url"]
        missing = await client.get("/tms/1.0.0/VTILES/styles/nope.json")
        assert missing.status_code == 404 and b"TileMapServerError" in missing.content
        # the map page draws the layer with the current one
        from lxml import html as lxml_html

        page = lxml_html.fromstring((await client.get("/")).text)
        data = json.loads(page.get_element_by_id("layer-data").text)["layers"]
        assert [d["draw"]["url"] for d in data if d["id"] == "VTILES"] == ["tms/1.0.0/VTILES/styles/vif.json"]
        # the record keeps them (admin API round trip)
        record = (await client.get("/admin/layers/VTILES", headers=ADMIN)).json()
        assert [s["name"] for s in record["vector_styles"]] == ["sobre", "vif"]


async def test_style_of_unknown_or_raster_layers_is_an_error(tmp_path):
    from apputil import layer_descriptor

    async with app_client(make_settings(tmp_path)) as client:
        await publish(client, "SCAN1000", layer_descriptor("SCAN1000"))
        unknown = await client.get("/tms/1.0.0/NOPE/style.json")
        assert unknown.status_code == 400 and b"TileMapServerError" in unknown.content
        raster = await client.get("/tms/1.0.0/SCAN1000/style.json")
        assert raster.status_code == 404 and b"no vector tiles" in raster.content
        bad = await client.post("/admin/layers/BAD", headers=ADMIN, json={
            **layer_descriptor("SCAN1000"), "vector_styles": [{"name": "x", "url": "javascript:alert(1)"}]})
        assert bad.status_code == 400 and "vector_styles[0].url" in bad.text


def test_style_problems_name_what_is_wrong():
    from tileserver.services.vectorstyles import style_problems

    assert style_problems({"version": 8, "sources": {}, "layers": []}) == []
    assert style_problems([]) == ["a style must be a JSON object"]
    problems = style_problems({"version": 7, "sources": [], "layers": [{"id": 1}]})
    assert [p.split(":")[0] for p in problems] == ["version", "sources", "layers[0]"]
    assert json.dumps(problems)


async def test_a_key_given_in_the_url_is_carried_by_tilejson_and_style(pyramid, tmp_path):
    """A restricted vector layer opened with `?apikey=`: MapLibre cannot add a header, so the TileJSON's
    tile template and the style's source URL repeat the key; an unknown key is never echoed."""
    from urllib.parse import quote, urlsplit

    async with app_client(make_settings(tmp_path)) as client:
        await publish(client, "SECRET", vector_layer_descriptor(pyramid, restricted=True))
        runtime = client.app.state.runtime
        _, key = runtime.store.create_key("maplibre", ["SECRET"])
        await runtime.refresh()
        assert (await client.get("/tms/1.0.0/SECRET/metadata.json")).status_code >= 400
        assert (await client.get("/tms/1.0.0/SECRET/metadata.json?apikey=nope")).status_code >= 400

        style = (await client.get(f"/tms/1.0.0/SECRET/style.json?apikey={quote(key)}")).json()
        [source] = style["sources"].values()
        link = urlsplit(source["url"])
        assert link.query == f"apikey={quote(key, safe='')}"
        tilejson = await client.get(f"{link.path}?{link.query}")
        assert tilejson.status_code == 200 and "private" in tilejson.headers["cache-control"]
        template = tilejson.json()["tiles"][0]
        assert template.endswith(f"?apikey={quote(key, safe='')}")
        tile = urlsplit(template.replace("{z}", "10").replace("{x}", "0").replace("{y}", "0"))
        answer = await client.get(f"{tile.path}?{tile.query}")
        assert answer.status_code in (200, 404)  # the key opens the layer (a tile outside the limits is a 404)
        assert (await client.get(tile.path)).status_code not in (200, 204)

        # a public layer's documents carry no key, whatever the caller sent
        await publish(client, "OPEN", vector_layer_descriptor(pyramid))
        await runtime.refresh()
        plain = (await client.get(f"/tms/1.0.0/OPEN/metadata.json?apikey={quote(key)}")).json()["tiles"][0]
        assert "apikey" in plain  # a valid key is repeated (it may open other layers the page shows)
        assert "apikey" not in (await client.get("/tms/1.0.0/OPEN/metadata.json?apikey=nope")).json()["tiles"][0]
