"""Publication of vector pyramids: a `WMTS-TMS` configuration on a `ROK4-PYRAMID-VECTOR` is served by
TMS and OGC API vector tiles only, and its offering lists only URLs that answer.

IGN's SDK runs `generic_vecteur.jsonc` unmodified (`mise-en-base`, `création-pyramide`,
`configuration-tms-py`, `publication-tms-py`); everything after is read from the offering's URLs as
cartes.gouv.fr does (`{TMS url}/metadata.json`), and checked against the base's GeoPackage (read
with pyogrio, reprojected with pyproj) and the slabs read back with the pyramid core's reader.

Tiles inside a level's limits where the pyramid holds nothing (no slab, or an empty tile in a slab)
answer 200 with an empty MVT (0 bytes, the tiles' own Content-Type) on TMS and OGC API alike: a
valid tile with no layer, which MapLibre and OpenLayers draw as nothing. Outside the limits each
protocol keeps its error (TMS 404, OGC API 404; an unpublished level: TMS 400, OGC API 404)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import mapbox_vector_tile
import numpy as np
import pyogrio.raw
import shapely
from lxml import etree
from pyproj import Transformer
from test_vector_pyramid import Composition, build, read_pyramid, sdk_vector_pyramid

from tileserver.pyramid import Pyramid
from tileserver.rok4.naming import b36_path
from tileserver.rok4.slab import index_size, parse_index
from tileserver.services.vectortables import tilejson_type
from tileserver.settings import load_settings
from tileserver.storage import Storage

BASE = "/api/datastores/default"
HALF = 20037508.342789244  # half the Web Mercator world, metres
TO_MERCATOR = Transformer.from_crs("EPSG:2154", "EPSG:3857", always_xy=True)
ATTRIBUTES = {"id", "insee_dep", "insee_reg", "insee_can"}  # the workflow's, less its geometry column


def to_tile(geometry: Any, z: int, col: int, row: int, extent: int) -> Any:
    """A Lambert 93 geometry in the units of tile (z, col, row) of the PM grid, y down."""
    span = 2 * HALF / 2 ** z

    def units(xy: np.ndarray) -> np.ndarray:
        x, y = TO_MERCATOR.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([((np.asarray(x) + HALF) / span - col) * extent,
                                ((HALF - np.asarray(y)) / span - row) * extent])

    return shapely.transform(geometry, units)


def decoded_geometry(feature: dict[str, Any]) -> Any:
    return shapely.geometry.shape(feature["geometry"])


def fill(template: str, **values: int) -> str:
    for name, value in values.items():
        template = template.replace("{" + name + "}", str(value))
    return template


def stored_tile(descriptor: Path, level: str, col: int, row: int) -> bytes:
    """The tile's bytes straight from its FILE slab (ROK4's slab naming and index, parsed here); b""
    where the slab is absent or the tile empty."""
    doc = json.loads(descriptor.read_text())
    lv = next(lv for lv in doc["levels"] if lv["id"] == level)
    tpw, tph = lv["tiles_per_width"], lv["tiles_per_height"]
    root = Path(lv["storage"]["image_directory"])
    slab = (root if root.is_absolute() else descriptor.parent / root) / b36_path(
        col // tpw, row // tph, lv["storage"]["path_depth"])
    if not slab.exists():
        return b""
    data = slab.read_bytes()
    index = parse_index(data[: index_size(tpw * tph)], tpw * tph)
    i = (row % tph) * tpw + col % tpw
    return data[index.offsets[i]: index.offsets[i] + index.sizes[i]]


def test_tilejson_types() -> None:
    for kind, expected in (("integer", "Number"), ("bigint", "Number"), ("double precision", "Number"),
                           ("numeric(10,2)", "Number"), ("Real", "Number"), ("boolean", "Boolean"),
                           ("character varying(80)", "String"), ("varchar", "String"), ("text", "String"),
                           ("date", "String"), ("interval", "String"), ("", "String")):
        assert tilejson_type(kind) == expected, kind


def test_sdk_generic_vecteur_publication(tmp_path: Path) -> None:
    """The SDK's TMS publication of its vector pyramid, then everything a client reads from the offering."""
    from test_warehouse_support import LAST_NAME

    with sdk_vector_pyramid(tmp_path) as run, httpx.Client(timeout=30) as http:  # http: no token, as a client
        for step in ("configuration-tms-py", "publication-tms-py"):
            run.step(step)
        client = run.client
        [offering] = [o for o in client.get(f"{BASE}/offerings").json() if o["type"] == "WMTS-TMS"]
        offering = client.get(f"{BASE}/offerings/{offering['_id']}").json()
        layer = f"{LAST_NAME}__vecteur_tms_py"
        assert offering["status"] == "PUBLISHED" and offering["layer_name"] == layer
        urls = offering["urls"]
        # TMS and OGC API vector tiles only: no WMTS (400 for vector), no OGC API map tiles (404)
        assert [u["type"] for u in urls] == ["TMS", "TMS", "OGCAPI-TILES"]
        tms, template, tileset_url = (u["url"] for u in urls)
        assert tms == f"{run.url}/tms/1.0.0/{layer}"
        assert tileset_url == f"{run.url}/ogcapi/collections/{layer}/tiles/PM"
        assert not any("/wmts" in u["url"] or "/map/" in u["url"] for u in urls)

        pyramid = run.stored("ROK4-PYRAMID-VECTOR")
        descriptor = Path(run.file(pyramid["_id"]))
        doc, stored = read_pyramid(str(descriptor))  # every tile, through the pyramid core's reader
        limits = {lv["id"]: lv["tile_limits"] for lv in doc["levels"]}
        assert sorted(limits, key=int) == [str(z) for z in range(10)]  # the workflow's 0 … 9

        # TileJSON where cartes.gouv.fr looks for it
        answer = http.get(tms + "/metadata.json")
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
        tilejson = answer.json()
        assert (tilejson["minzoom"], tilejson["maxzoom"], tilejson["format"]) == (0, 9, "pbf")
        assert tilejson["tiles"] == [template]
        [vector_layer] = tilejson["vector_layers"]
        assert vector_layer["id"] == "canton" and (vector_layer["minzoom"], vector_layer["maxzoom"]) == (0, 9)
        # the types the descriptor's `tables` give, as TileJSON names them
        [table] = {json.dumps(t) for lv in doc["levels"] for t in lv["tables"]}
        assert vector_layer["fields"] == {a["name"]: tilejson_type(a["type"]) for a in json.loads(table)["attributes"]}
        assert set(vector_layer["fields"]) == ATTRIBUTES
        assert {k: vector_layer["fields"][k] for k in ("insee_dep", "insee_reg", "insee_can")} == \
            dict.fromkeys(("insee_dep", "insee_reg", "insee_can"), "String")
        base_gpkg = run.file(run.stored("VECTOR-DB")["_id"])
        meta, _, wkb, columns = pyogrio.raw.read(base_gpkg, layer="canton")
        source = [dict(zip(meta["fields"], (c[i] for c in columns), strict=True)) | {"geometry": shapely.from_wkb(g)}
                  for i, g in enumerate(wkb)]
        assert len(source) == 5
        west, south, east, north = tilejson["bounds"]
        to_wgs84 = Transformer.from_crs(meta["crs"], "EPSG:4326", always_xy=True)
        for row in source:
            lons, lats = to_wgs84.transform(*np.asarray(row["geometry"].exterior.coords
                                                        if row["geometry"].geom_type == "Polygon"
                                                        else row["geometry"].geoms[0].exterior.coords).T)
            assert west <= min(lons) and max(lons) <= east and south <= min(lats) and max(lats) <= north

        # the TileMap (the TMS URL itself) and the OGC API tileset: the descriptor's levels and limits
        tilemap = etree.fromstring(http.get(tms).content)
        tilesets = {t.get("order"): {k: int(t.get(k)) for k in ("minrow", "maxrow", "mincol", "maxcol")}
                    for t in tilemap.iter("TileSet")}
        assert tilesets == {z: {"minrow": lim["min_row"], "maxrow": lim["max_row"], "mincol": lim["min_col"],
                                "maxcol": lim["max_col"]} for z, lim in limits.items()}
        tileset = http.get(tileset_url, params={"f": "json"}).json()
        assert tileset["dataType"] == "vector"
        assert {m["tileMatrix"]: (m["minTileRow"], m["maxTileRow"], m["minTileCol"], m["maxTileCol"])
                for m in tileset["tileMatrixSetLimits"]} == \
            {z: (lim["min_row"], lim["max_row"], lim["min_col"], lim["max_col"]) for z, lim in limits.items()}
        [ogc_template] = [link["href"] for link in tileset["links"] if link["rel"] == "item"]
        assert [(t["id"], t["minTileMatrix"], t["maxTileMatrix"]) for t in tileset["layers"]] == [("canton", "0", "9")]
        assert {name: p["type"] for name, p in tileset["layers"][0]["propertiesSchema"]["properties"].items()} == \
            {name: kind.lower() for name, kind in vector_layer["fields"].items()}  # JSON Schema's names

        # every tile inside the limits: the same bytes on TMS, OGC API and in the slab; each decodes
        tiles: dict[tuple[int, int, int], dict[str, Any]] = {}
        for z, lim in limits.items():
            for col in range(lim["min_col"], lim["max_col"] + 1):
                for row in range(lim["min_row"], lim["max_row"] + 1):
                    by_tms = http.get(fill(template, z=int(z), x=col, y=row))
                    by_ogc = http.get(fill(ogc_template, tileMatrix=int(z), tileRow=row, tileCol=col))
                    assert by_tms.status_code == by_ogc.status_code == 200, (z, col, row)
                    assert by_tms.content == by_ogc.content == stored_tile(descriptor, z, col, row)
                    decoded = mapbox_vector_tile.decode(by_tms.content, default_options={"y_coord_down": True})
                    assert decoded == stored[z].get((col, row), {})
                    if decoded:
                        assert set(decoded) == {"canton"}
                        tiles[(int(z), col, row)] = decoded["canton"]
        # tippecanoe leaves the 5 small cantons out of the top levels: those tiles answered 200 and 0 bytes
        assert {z for z, _, _ in tiles} >= set(range(5, 10))
        mistyped: set[str] = set()
        for found in tiles.values():
            for feature in found["features"]:
                assert set(feature["properties"]) == ATTRIBUTES  # the requested attributes, no more
                assert feature["properties"]["insee_dep"] == "75"
                for name, value in feature["properties"].items():
                    kind = "Boolean" if isinstance(value, bool) else "Number" if isinstance(value, int | float) \
                        else "String"
                    if kind != vector_layer["fields"][name]:
                        mistyped.add(name)
        # TileJSON's types are those of the values in the tiles, the key (the base's fid) included
        assert not mistyped, mistyped

        # features fall where the source's do: each canton, reprojected to the tile, within 2 pixels
        # (of a 256-pixel tile) of the feature of the same insee_can
        for (z, col, row), found in tiles.items():
            if z < 7:  # a canton is a few pixels wide up there: tippecanoe may merge or drop it
                continue
            extent = found["extent"]
            box = shapely.box(0, 0, extent, extent)
            by_code = {f["properties"]["insee_can"]: f for f in found["features"]}
            for canton in source:
                expected = shapely.intersection(to_tile(canton["geometry"], z, col, row, extent), box)
                if expected.area < 1:
                    continue
                feature = by_code[canton["insee_can"]]
                assert feature["properties"]["insee_reg"] == canton["insee_reg"]
                assert feature["properties"]["id"] == canton.get("id", feature["properties"]["id"])
                got = shapely.intersection(decoded_geometry(feature), box)
                assert shapely.hausdorff_distance(got, expected) <= 2 * extent / 256, (z, canton["insee_can"])

        # every advertised URL answers 200; outside the published levels and limits, the protocols' errors
        z9 = limits["9"]
        for url in (tms, fill(template, z=9, x=z9["min_col"], y=z9["min_row"]), tileset_url):
            assert http.get(url).status_code == 200, url
        assert http.get(fill(template, z=9, x=z9["max_col"] + 1, y=z9["min_row"])).status_code == 404
        assert http.get(fill(template, z=10, x=0, y=0)).status_code == 400
        outside = fill(ogc_template, tileMatrix=9, tileRow=z9["min_row"], tileCol=z9["max_col"] + 1)
        assert http.get(outside).status_code == 404
        assert http.get(fill(ogc_template, tileMatrix=10, tileRow=0, tileCol=0)).status_code == 404
        assert http.get(f"{run.url}/wmts/1.0.0/{layer}/normal/PM/9/{z9['min_row']}/{z9['min_col']}.pbf"
                         ).status_code == 400  # why the offering does not list WMTS


def _far_apart(path: Path) -> None:
    """Two points 400 km apart (Paris, Lyon): at level 10 their limits hold many tiles without data."""
    points = shapely.points([2.35, 4.83], [48.85, 45.76])
    pyogrio.raw.write(path, np.array(shapely.to_wkb(points), dtype=object),
                      [np.array(["paris", "lyon"], dtype=object)], ["nom"], layer="villes", driver="GPKG",
                      geometry_type="Point", crs="EPSG:4326")


async def test_empty_tiles_inside_the_limits(tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    """A vector pyramid published through the API: empty MVT (200, 0 bytes) inside the limits, whether
    the slab is absent or holds no such tile; the offering's URLs (vector) answer."""
    from test_warehouse_support import app_with_user

    from tileserver.cli import main
    from tileserver.rok4.tms import load_tms

    gpkg = tmp_path / "villes.gpkg"
    _far_apart(gpkg)
    descriptor = Path(await asyncio.to_thread(build, gpkg, tmp_path / "pyramids", Composition("villes", "9", "10"),
                                              width=4, height=4))
    async with app_with_user(tmp_path) as client:
        monkeypatch.setenv("TILESERVER_DATA_DIR", client.settings.data_dir)
        assert await asyncio.to_thread(main, ["stored-data", "add", str(descriptor), "--name", "villes", "--json"]) == 0
        stored = json.loads(capsys.readouterr().out)
        endpoint = next(e for e in (await client.get(BASE)).json()["endpoints"]
                        if e["endpoint"]["technical_name"] == "gpf-rok4-server-wmts-tms")["endpoint"]["_id"]
        configuration = (await client.post(f"{BASE}/configurations", json={
            "type": "WMTS-TMS", "name": "villes", "layer_name": "villes",
            "type_infos": {"title": "Villes", "abstract": "deux villes", "keywords": [],
                           "used_data": [{"stored_data": stored["_id"], "bottom_level": "10", "top_level": "9"}]},
        })).json()
        offering = await client.post(f"{BASE}/configurations/{configuration['_id']}/offerings",
                                     json={"endpoint": endpoint, "open": True})
        assert offering.status_code == 201, offering.text
        urls = offering.json()["urls"]
        assert [u["type"] for u in urls] == ["TMS", "TMS", "OGCAPI-TILES"]
        for url in (urls[0]["url"], urls[0]["url"] + "/metadata.json", urls[2]["url"]):
            assert (await client.get(url)).status_code == 200, url

        doc = json.loads(descriptor.read_text())
        [lim] = [lv["tile_limits"] for lv in doc["levels"] if lv["id"] == "10"]
        tpw = doc["levels"][0]["tiles_per_width"]
        grid = load_tms("PM", load_settings(env={}).tms_directory).get("10")
        assert grid is not None
        settings = load_settings(env={})
        async with Storage(settings) as storage:
            pyramid = await Pyramid.open(str(descriptor), storage, tms_directory=settings.tms_directory)
            data = {(c, r) for c in range(lim["min_col"], lim["max_col"] + 1)
                    for r in range(lim["min_row"], lim["max_row"] + 1) if await pyramid.get_tile("10", c, r)}
        assert len(data) == 2  # one tile per city
        slabs = {(c // tpw, r // tpw) for c, r in data}
        in_a_slab = next((c, r) for c in range(lim["min_col"], lim["max_col"] + 1)
                         for r in range(lim["min_row"], lim["max_row"] + 1)
                         if (c // tpw, r // tpw) in slabs and (c, r) not in data)
        no_slab = next((c, r) for c in range(lim["min_col"], lim["max_col"] + 1)
                       for r in range(lim["min_row"], lim["max_row"] + 1) if (c // tpw, r // tpw) not in slabs)
        full = next(iter(data))
        template = urls[1]["url"].removeprefix("http://testserver")
        ogc = urls[2]["url"].removeprefix("http://testserver") + "/10/{row}/{col}"
        stored_answer = await client.get(template.format(z=10, x=full[0], y=full[1]))
        assert stored_answer.status_code == 200 and mapbox_vector_tile.decode(stored_answer.content)
        for col, row in (in_a_slab, no_slab):
            for url in (template.format(z=10, x=col, y=row), ogc.format(row=row, col=col)):
                answer = await client.get(url)
                assert (answer.status_code, answer.content) == (200, b""), url
                assert answer.headers["content-type"] == stored_answer.headers["content-type"]
                assert mapbox_vector_tile.decode(answer.content) == {}
        # outside the limits (still in the grid) and outside the levels: the protocols' errors
        beyond = lim["max_col"] + 1
        assert beyond < grid.matrix_width
        assert (await client.get(template.format(z=10, x=beyond, y=lim["min_row"]))).status_code == 404
        assert (await client.get(ogc.format(row=lim["min_row"], col=beyond))).status_code == 404
        assert (await client.get(template.format(z=11, x=0, y=0))).status_code == 400


def test_reader_and_slab_agree(tmp_path: Path) -> None:
    """The test's own slab parsing reads what the pyramid core reads (so the comparison above means something)."""
    gpkg = tmp_path / "villes.gpkg"
    _far_apart(gpkg)
    descriptor = Path(build(gpkg, tmp_path / "p", Composition("villes", "9", "10"), width=4, height=4))
    doc, tiles = read_pyramid(str(descriptor))
    level = "9"
    [lim] = [lv["tile_limits"] for lv in doc["levels"] if lv["id"] == level]
    seen = 0
    for col in range(lim["min_col"], lim["max_col"] + 1):
        for row in range(lim["min_row"], lim["max_row"] + 1):
            raw = stored_tile(descriptor, level, col, row)
            assert bool(raw) == ((col, row) in tiles[level])
            if raw:
                seen += 1
                assert mapbox_vector_tile.decode(raw, default_options={"y_coord_down": True}) == tiles[level][(col, row)]
    assert seen == 2
