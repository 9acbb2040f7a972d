"""TMS 1.0.0, TileJSON, gdal.xml and XYZ over the real fixture pyramids, in-process and over real HTTP.

References are independent of the server: stored tile bytes are read straight from the slab files
(index parsed here), documents are checked element by element and parsed by OWSLib.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from apputil import PYRAMIDS, app_client, live_server, make_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree
from PIL import Image

from tileserver.rok4.codecs import encode_tile
from tileserver.rok4.naming import b36_path
from tileserver.rok4.slab import build_slab, build_vector_slab, index_size, parse_index
from tileserver.rok4.tms import load_tms
from tileserver.settings import Settings, load_settings

AUTH = {"Authorization": "Bearer secret"}
TMS_DIR = load_settings(env={}).tms_directory
FIXTURES = ("SCAN1000", "MONTAGNE", "BDPARCELLAIRE", "RGEALTI")
RASTERS = (*FIXTURES, "ORTHO")


# --- a published world shared by the TMS and OGC API tests ----------------------------------------


def write_pyramid(
    root: Path,
    name: str,
    code: str,
    tiles: dict[str, dict[tuple[int, int], bytes]],
    limits: dict[str, tuple[int, int, int, int]],
    channels: int = 3,
    tables: list[dict] | None = None,
) -> Path:
    """A small PM pyramid with single-tile slabs; `limits` (min_col, min_row, max_col, max_row) may
    cover tiles that have no slab (empty tiles inside the limits)."""
    vector = code == "TIFF_PBF_MVT"
    levels = []
    for level, (c0, r0, c1, r1) in limits.items():
        directory = f"{name}/DATA/{level}"
        for (col, row), data in tiles.get(level, {}).items():
            slab = root / directory / b36_path(col, row, 2)
            slab.parent.mkdir(parents=True, exist_ok=True)
            if vector:
                slab.write_bytes(build_vector_slab([data], 1, 1))
            else:
                slab.write_bytes(
                    build_slab([data], 1, 1, 256, 256, channels, "UINT8", code.split("_")[1].lower())
                )
        entry = {
            "id": level,
            "tiles_per_width": 1,
            "tiles_per_height": 1,
            "tile_limits": {"min_col": c0, "min_row": r0, "max_col": c1, "max_row": r1},
            "storage": {"type": "FILE", "image_directory": directory, "path_depth": 2},
        }
        if vector:
            entry["tables"] = tables or []
        levels.append(entry)
    descriptor: dict = {"tile_matrix_set": "PM", "format": code, "levels": levels}
    if not vector:
        descriptor["raster_specifications"] = {
            "channels": channels,
            "nodata": "255,255,255",
            "photometric": "rgb",
            "interpolation": "bicubic",
        }
    path = root / f"{name}.json"
    path.write_text(json.dumps(descriptor))
    return path


ROADS_TABLES = [
    {
        "name": "roads",
        "geometry": "LINESTRING",
        "attributes": [{"name": "kind", "type": "varchar", "count": 2, "values": ["a", "b"]}],
    }
]


def built_pyramids(root: Path) -> dict[str, Path]:
    """ORTHO: JPEG, level 16 has one stored tile and one empty tile inside its limits. ROADS: vector."""
    rng = np.random.default_rng(7)
    jpeg = encode_tile(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8), "jpg")
    ortho = write_pyramid(
        root,
        "ORTHO",
        "TIFF_JPG_UINT8",
        {"15": {(16515, 11970): jpeg}, "16": {(33030, 23940): jpeg}},
        {"15": (16515, 11970, 16515, 11970), "16": (33030, 23940, 33031, 23940)},
    )
    mvt = bytes(range(40))  # served as stored: any payload will do
    roads = write_pyramid(
        root,
        "ROADS",
        "TIFF_PBF_MVT",
        {"14": {(8257, 5985): mvt}, "15": {(16515, 11970): mvt}},
        {"14": (8257, 5985, 8257, 5985), "15": (16515, 11970, 16515, 11970)},
        tables=ROADS_TABLES,
    )
    return {"ORTHO": ortho, "ROADS": roads}


def descriptor_for(path: Path, **extra) -> dict:
    """A layer descriptor publishing every level of a pyramid."""
    desc = json.loads(path.read_text())
    tms = load_tms(desc["tile_matrix_set"], TMS_DIR)
    cells = {lv["id"]: tms.get(lv["id"]).cell_size for lv in desc["levels"]}
    pyramid = {
        "path": f"file://{path}",
        "bottom_level": min(cells, key=cells.get),
        "top_level": max(cells, key=cells.get),
    }
    out = {
        "title": f"{path.stem} title",
        "abstract": f"{path.stem} abstract",
        "keywords": [path.stem, "ROK4"],
        "pyramids": [pyramid],
        "styles": ["normal", "hypso"],
        "attribution": {
            "title": "IGN",
            "url": "https://ign.fr",
            "logo": {"format": "image/png", "url": "https://ign.fr/logo.png", "width": 10, "height": 10},
        },
        "metadata": [{"format": "text/xml", "url": "https://ign.fr/meta.xml", "type": "ISO19115:2003"}],
    }
    out.update(extra)
    return out


@dataclass
class World:
    settings: Settings
    sources: dict[str, Path]  # layer id → pyramid descriptor
    key: str = ""  # API key granting the restricted layer SECRET
    layers: dict[str, dict] = field(default_factory=dict)  # layer id → layer descriptor


def publish_world(tmp: Path, base: str) -> World:
    """Publish every layer through the admin API of the server at `base` (the store is shared)."""
    world = World(make_settings(tmp), {n: PYRAMIDS / f"{n}.json" for n in FIXTURES})
    world.sources.update(built_pyramids(tmp / "built"))
    world.layers = {name: descriptor_for(path) for name, path in world.sources.items()}
    world.layers["SECRET"] = descriptor_for(world.sources["MONTAGNE"], restricted=True)
    world.layers["EMPTY404"] = descriptor_for(world.sources["ORTHO"], empty_tile_404=True)
    world.sources.update(SECRET=world.sources["MONTAGNE"], EMPTY404=world.sources["ORTHO"])
    with httpx.Client(base_url=base, headers=AUTH, timeout=30) as http:
        for layer_id, desc in world.layers.items():
            answer = http.post(f"/admin/layers/{layer_id}", json=desc)
            assert answer.status_code == 204, answer.text
        answer = http.post("/admin/keys", json={"name": "tests", "layers": ["SECRET"]})
        assert answer.status_code == 201, answer.text
        world.key = answer.json()["key"]
    return world


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL of a live uvicorn server, World); the same store serves the in-process client."""
    tmp = tmp_path_factory.mktemp("tms")
    with live_server(make_settings(tmp)) as base:
        yield base, publish_world(tmp, base)


@pytest.fixture(scope="module")
def world(served) -> World:
    return served[1]


@pytest.fixture(scope="module")
async def client(world):
    async with app_client(world.settings) as c:
        yield c


# --- references read without the server -----------------------------------------------------------


def stored_tile(descriptor: Path, level: str, col: int, row: int) -> bytes | None:
    """The tile's bytes straight from its FILE slab."""
    desc = json.loads(descriptor.read_text())
    lv = next(lv for lv in desc["levels"] if lv["id"] == level)
    tpw, tph = lv["tiles_per_width"], lv["tiles_per_height"]
    slab = (
        descriptor.parent
        / lv["storage"]["image_directory"]
        / b36_path(col // tpw, row // tph, lv["storage"]["path_depth"])
    )
    if not slab.exists():
        return None
    data = slab.read_bytes()
    n = tpw * tph
    index = parse_index(data[: index_size(n)], n)
    i = (row % tph) * tpw + col % tpw
    return data[index.offsets[i] : index.offsets[i] + index.sizes[i]]


def levels_of(descriptor: Path) -> list[tuple[str, dict]]:
    return [(lv["id"], lv["tile_limits"]) for lv in json.loads(descriptor.read_text())["levels"]]


async def get_raw(client: httpx.AsyncClient, url: str, **kwargs) -> tuple[httpx.Response, bytes]:
    """The body as sent (no Content-Encoding decoding): zbil tiles are compared deflated."""
    async with client.stream("GET", url, **kwargs) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    return response, raw


def xml(response: httpx.Response) -> etree._Element:
    assert response.headers["content-type"].startswith("text/xml"), response.headers["content-type"]
    return etree.fromstring(response.content)


# --- documents ------------------------------------------------------------------------------------


async def test_root_and_service_document(client, world):
    services = xml(await client.get("/tms"))
    assert services.tag == "Services"
    (entry,) = services.findall("TileMapService")
    assert entry.get("version") == "1.0.0" and entry.get("href") == "http://testserver/tms/1.0.0/"
    root = xml(await client.get("/tms/1.0.0/"))  # ROK4 ignores a trailing slash
    assert root.tag == "TileMapService" and root.get("version") == "1.0.0"
    assert [child.tag for child in root] == [
        "Title",
        "Abstract",
        "KeywordList",
        "ContactInformation",
        "TileMaps",
    ]
    maps = {tm.get("href").rsplit("/", 1)[1]: tm for tm in root.findall("TileMaps/TileMap")}
    assert set(maps) == set(world.layers) - {"SECRET"}  # restricted: not without a key
    for layer_id, tilemap in maps.items():
        source = json.loads(world.sources[layer_id].read_text())
        assert tilemap.get("title") == world.layers[layer_id]["title"]
        assert tilemap.get("srs") == load_tms(source["tile_matrix_set"], TMS_DIR).crs
        assert tilemap.get("profile") == "none"
        assert tilemap.get("href") == f"http://testserver/tms/1.0.0/{layer_id}"
    assert maps["SCAN1000"].get("extension") == "png" and maps["RGEALTI"].get("extension") == "zbil"
    assert maps["ORTHO"].get("extension") == "jpeg" and maps["ROADS"].get("extension") == "pbf"


@pytest.mark.parametrize("layer_id", [*RASTERS, "ROADS"])
async def test_tilemap_document(client, world, layer_id):
    root = xml(await client.get(f"/tms/1.0.0/{layer_id}"))
    assert root.tag == "TileMap" and root.get("version") == "1.0.0"
    assert root.get("tilemapservice") == "http://testserver/tms/1.0.0"
    order = [
        "Title",
        "Abstract",
        "KeywordList",
        "Metadata",
        "Attribution",
        "SRS",
        "BoundingBox",
        "Origin",
        "TileFormat",
        "TileSets",
    ]
    assert [child.tag for child in root] == order
    assert root.findtext("Title") == f"{world.sources[layer_id].stem} title"
    assert root.findtext("KeywordList").split() == [world.sources[layer_id].stem, "ROK4"]
    assert root.find("Metadata").get("href") == "https://ign.fr/meta.xml"
    assert (
        root.findtext("Attribution/Title") == "IGN"
        and root.find("Attribution/Logo").get("mime-type") == "image/png"
    )
    source = json.loads(world.sources[layer_id].read_text())
    tms = load_tms(source["tile_matrix_set"], TMS_DIR)
    assert root.findtext("SRS") == tms.crs
    levels = sorted(source["levels"], key=lambda lv: -tms.get(lv["id"]).cell_size)
    bottom = tms.get(levels[-1]["id"])
    origin = root.find("Origin")
    assert (float(origin.get("x")), float(origin.get("y"))) == (bottom.origin_x, bottom.origin_y)  # top-left
    lim = levels[-1]["tile_limits"]
    expected_bbox = bottom.range_bbox(lim["min_col"], lim["min_row"], lim["max_col"], lim["max_row"])
    bbox = root.find("BoundingBox")
    assert [float(bbox.get(k)) for k in ("minx", "miny", "maxx", "maxy")] == pytest.approx(expected_bbox)
    tile_format = root.find("TileFormat")
    assert (tile_format.get("width"), tile_format.get("height")) == ("256", "256")
    assert tile_format.get("extension") in ("png", "jpeg", "zbil", "pbf")
    tilesets = root.findall("TileSets/TileSet")
    assert root.find("TileSets").get("profile") == "none"
    assert [ts.get("href").rsplit("/", 1)[1] for ts in tilesets] == [lv["id"] for lv in levels]
    for tileset, level in zip(tilesets, levels, strict=True):
        assert float(tileset.get("units-per-pixel")) == tms.get(level["id"]).cell_size
        assert tileset.get("order") == level["id"]
        got = {k: int(tileset.get(k)) for k in ("minrow", "maxrow", "mincol", "maxcol")}
        lim = level["tile_limits"]
        assert got == {
            "minrow": lim["min_row"],
            "maxrow": lim["max_row"],
            "mincol": lim["min_col"],
            "maxcol": lim["max_col"],
        }


# --- tiles ----------------------------------------------------------------------------------------


def corner_tiles(descriptor: Path) -> list[tuple[str, int, int]]:
    out = []
    for level, lim in levels_of(descriptor):
        for col, row in {(lim["min_col"], lim["min_row"]), (lim["max_col"], lim["max_row"])}:
            out.append((level, col, row))
    return out


@pytest.mark.parametrize("layer_id", FIXTURES)
async def test_tiles_are_the_stored_bytes_and_match_wmts(client, world, layer_id):
    source = world.sources[layer_id]
    desc = json.loads(source.read_text())
    ext = {"TIFF_PNG_UINT8": "png", "TIFF_ZIP_FLOAT32": "zbil"}[desc["format"]]
    for level, col, row in corner_tiles(source):
        response, raw = await get_raw(client, f"/tms/1.0.0/{layer_id}/{level}/{col}/{row}.{ext}")
        assert response.status_code == 200, (level, col, row, response.text)
        expected = stored_tile(source, level, col, row)
        assert expected is not None and raw == expected  # rows from the top: no flip
        if ext == "zbil":
            assert response.headers["content-type"] == "image/x-bil;bits=32"
            assert response.headers["content-encoding"] == "deflate"
        params = {
            "SERVICE": "WMTS",
            "REQUEST": "GetTile",
            "VERSION": "1.0.0",
            "LAYER": layer_id,
            "STYLE": "normal",
            "TILEMATRIXSET": desc["tile_matrix_set"],
            "TILEMATRIX": level,
            "TILEROW": row,
            "TILECOL": col,
            "FORMAT": response.headers["content-type"],
        }
        wmts, wmts_raw = await get_raw(client, "/wmts", params=params)
        assert wmts.status_code == 200, wmts.text
        assert wmts_raw == raw
    xyz = await client.get(f"/xyz/{layer_id}/{level}/{col}/{row}.{ext}")
    assert (
        xyz.status_code == 200
        and xyz.content == (await client.get(f"/tms/1.0.0/{layer_id}/{level}/{col}/{row}.{ext}")).content
    )


async def test_jpeg_alias_and_empty_tiles_inside_limits(client, world):
    stored = stored_tile(world.sources["ORTHO"], "16", 33030, 23940)
    for ext in ("jpeg", "jpg"):
        answer = await client.get(f"/tms/1.0.0/ORTHO/16/33030/23940.{ext}")
        assert (
            answer.status_code == 200
            and answer.content == stored
            and answer.headers["content-type"] == "image/jpeg"
        )
    empty = await client.get("/tms/1.0.0/ORTHO/16/33031/23940.jpeg")  # inside the limits, no slab
    assert empty.status_code == 200 and empty.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(empty.content))
    assert image.size == (256, 256) and image.getpixel((10, 10)) == pytest.approx((255, 255, 255), abs=2)
    rok4_like = await client.get("/tms/1.0.0/EMPTY404/16/33031/23940.jpeg")  # the layer asks ROK4's 404
    assert rok4_like.status_code == 404 and etree.fromstring(rok4_like.content).tag == "TileMapServerError"
    assert (await client.get("/tms/1.0.0/EMPTY404/16/33030/23940.jpeg")).content == stored


async def test_vector_tiles(client, world):
    answer = await client.get("/tms/1.0.0/ROADS/15/16515/11970.pbf")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/x-protobuf"
    assert answer.content == stored_tile(world.sources["ROADS"], "15", 16515, 11970)


# --- TileJSON and gdal.xml ------------------------------------------------------------------------


async def test_tilejson(client, world):
    doc = (await client.get("/tms/1.0.0/SCAN1000/metadata.json")).json()
    assert doc["tilejson"] == "3.0.0" and doc["scheme"] == "xyz" and doc["format"] == "png"
    assert doc["tiles"] == ["http://testserver/tms/1.0.0/SCAN1000/{z}/{x}/{y}.png"]
    assert (doc["minzoom"], doc["maxzoom"]) == (0, 10) and doc["crs"] == "EPSG:3857"
    assert doc["name"] == "SCAN1000 title" and doc["description"] == "SCAN1000 abstract"
    assert doc["attribution"] == '<a href="https://ign.fr">IGN</a>' and doc["version"]
    west, south, east, north = doc["bounds"]
    assert -180 <= west < east <= 180 and -90 <= south < north <= 90
    lon, lat, zoom = doc["center"]
    assert west <= lon <= east and south <= lat <= north and 0 <= zoom <= 10
    assert "vector_layers" not in doc
    # the template really serves: fill it with a published tile
    tile = doc["tiles"][0].format(z=10, x=516, y=363).removeprefix("http://testserver")
    assert (await client.get(tile)).status_code == 200
    # a grid that is not a quad tree still answers, and says which CRS
    dem = (await client.get("/tms/1.0.0/RGEALTI/metadata.json")).json()
    assert dem["crs"] == "IGNF:LAMB93" and dem["quadtree"] is False and dem["format"] == "zbil"
    vector = (await client.get("/tms/1.0.0/ROADS/metadata.json")).json()
    assert vector["format"] == "pbf"
    assert vector["vector_layers"] == [
        {"id": "roads", "fields": {"kind": "String"}, "minzoom": 14, "maxzoom": 15, "geometry": "LINESTRING"}
    ]


async def test_gdal_xml(client):
    root = xml(await client.get("/tms/1.0.0/SCAN1000/gdal.xml"))
    assert root.tag == "GDAL_WMS" and root.find("Service").get("name") == "TMS"
    assert root.findtext("Service/ServerUrl") == "http://testserver/tms/1.0.0/SCAN1000/${z}/${x}/${y}.png"
    window = {child.tag: child.text for child in root.find("DataWindow")}
    pm = load_tms("PM", TMS_DIR).get("0")
    assert float(window["UpperLeftX"]) == pm.origin_x and float(window["UpperLeftY"]) == pm.origin_y
    assert float(window["LowerRightX"]) == pytest.approx(-pm.origin_x) and float(
        window["LowerRightY"]
    ) == pytest.approx(-pm.origin_y)
    assert (window["TileLevel"], window["TileCountX"], window["TileCountY"], window["YOrigin"]) == (
        "10",
        "1",
        "1",
        "top",
    )
    assert root.findtext("Projection") == "EPSG:3857"
    assert (root.findtext("BlockSizeX"), root.findtext("BlockSizeY"), root.findtext("BandsCount")) == (
        "256",
        "256",
        "4",
    )
    assert root.findtext("ZeroBlockHttpCodes") == "204,404"
    # GDAL's arithmetic: resolution at TileLevel = window width / (TileCountX · 2^level · block) = the bottom level's
    width = float(window["LowerRightX"]) - float(window["UpperLeftX"])
    assert width / (1 * 2**10 * 256) == pytest.approx(load_tms("PM", TMS_DIR).get("10").cell_size)
    geographic = {
        c.tag: c.text for c in xml(await client.get("/tms/1.0.0/BDPARCELLAIRE/gdal.xml")).find("DataWindow")
    }
    assert (geographic["TileCountX"], geographic["TileCountY"], geographic["UpperLeftX"]) == (
        "2",
        "1",
        "-180",
    )


# --- errors ---------------------------------------------------------------------------------------

ERRORS = [
    ("/tms/2.0.0", 400),
    ("/tms/1.0.0/NOPE", 400),
    ("/tms/1.0.0/NOPE/metadata.json", 400),
    ("/tms/1.0.0/SCAN1000/99/0/0.png", 400),  # level not in the grid
    ("/tms/1.0.0/SCAN1000/11/0/0.png", 400),  # grid level not published
    ("/tms/1.0.0/SCAN1000/10/516/363.jpeg", 400),  # not the layer's extension
    ("/tms/1.0.0/SCAN1000/10/516/363.jpg", 400),
    ("/tms/1.0.0/SCAN1000/10/516/363", 400),
    ("/tms/1.0.0/SCAN1000/10/abc/363.png", 400),
    ("/tms/1.0.0/SCAN1000/10/516/1e3.png", 400),
    ("/tms/1.0.0/SCAN1000/10/0/0.png", 404),  # outside the limits
    ("/tms/1.0.0/SCAN1000/10/2147483647/2147483647.png", 404),
    ("/tms/1.0.0/SCAN1000/10/-1/363.png", 404),
    ("/tms/1.0.0/SCAN1000/10/516/-363.png", 404),
    ("/tms/1.0.0/SCAN1000/10/99999999999999999999999/363.png", 404),
    ("/tms/1.0.0/RGEALTI/gdal.xml", 400),  # not a quad tree, as ROK4
    ("/tms/1.0.0/ROADS/gdal.xml", 400),  # vector
    ("/tms/1.0.0/SECRET", 400),  # restricted, no key: as if unknown
    ("/tms/1.0.0/SCAN1000/10", 404),
    ("/tms/1.0.0/SCAN1000/10/516", 404),
    ("/tms/1.0.0/SCAN1000/10/516/363/x.png", 404),
    ("/tms/1.0.0//SCAN1000", 404),
    ("/tmsfoo", 404),
    ("/xyz/SCAN1000/10/0/0.png", 404),
    ("/xyz/NOPE/10/0/0.png", 400),
]


@pytest.mark.parametrize(("path", "status"), ERRORS)
async def test_errors(client, path, status):
    answer = await client.get(path)
    assert answer.status_code == status, answer.text
    root = xml(answer)
    assert root.tag == "TileMapServerError" and root.findtext("Message")


async def test_messages_do_not_echo_markup(client):
    answer = await client.get("/tms/1.0.0/" + quote("<script>alert(1)</script>", safe=""))
    assert (
        answer.status_code == 400
        and b"<script>" not in answer.content
        and b"&lt;script" not in answer.content
    )


async def test_restricted_layer_needs_its_key(client, world):
    for kwargs in ({"params": {"apikey": world.key}}, {"headers": {"X-Api-Key": world.key}}):
        assert (await client.get("/tms/1.0.0/SECRET", **kwargs)).status_code == 200
        listed = xml(await client.get("/tms/1.0.0", **kwargs))
        assert "SECRET" in [tm.get("href").rsplit("/", 1)[1] for tm in listed.findall("TileMaps/TileMap")]
        assert (await client.get("/tms/1.0.0/SECRET/17/66060/47880.png", **kwargs)).status_code == 200
    assert (await client.get("/tms/1.0.0/SECRET", params={"apikey": "wrong"})).status_code == 400
    assert (await client.get("/tms/1.0.0/SECRET/17/66060/47880.png")).status_code == 400


async def test_documents_follow_the_store(world):
    """A layer removed through the admin API disappears from the cached documents at once."""
    settings = replace(world.settings, data_dir=str(Path(world.settings.data_dir).parent / "other"))
    async with app_client(settings) as c:
        assert (
            await c.post("/admin/layers/S", json=world.layers["SCAN1000"], headers=AUTH)
        ).status_code == 204
        assert b"/S" in (await c.get("/tms/1.0.0")).content
        assert (await c.delete("/admin/layers/S", headers=AUTH)).status_code == 204
        assert b"/S" not in (await c.get("/tms/1.0.0")).content
        assert (await c.get("/tms/1.0.0/S")).status_code == 400


# --- S3 and storage failures ----------------------------------------------------------------------


def upload(s3_server, bucket: str, name: str) -> None:
    """A fixture pyramid on S3 with ROK4's object naming (`<name>/DATA_<level>_<col>_<row>`)."""
    desc = json.loads((PYRAMIDS / f"{name}.json").read_text())
    for level in desc["levels"]:
        directory = PYRAMIDS / level["storage"]["image_directory"]
        for slab in directory.rglob("*.tif"):
            from tileserver.rok4.naming import b36_path_decode

            col, row = b36_path_decode(str(slab.relative_to(directory)))
            s3_server.put(bucket, f"{name}/DATA_{level['id']}_{col}_{row}", slab.read_bytes())
        level["storage"] = {"type": "S3", "bucket_name": bucket, "image_prefix": f"{name}/DATA_{level['id']}"}
    s3_server.put(bucket, f"{name}.json", json.dumps(desc).encode())


async def test_s3_tiles_and_storage_failures(tmp_path, s3_server, s3_bucket, s3_proxy, s3_proxy_settings):
    upload(s3_server, s3_bucket, "SCAN1000")
    settings = make_settings(
        tmp_path,
        s3_clusters=s3_proxy_settings.s3_clusters,
        storage_timeout=0.5,
        storage_retries=1,
        storage_retry_backoff=0.01,
    )
    desc = descriptor_for(PYRAMIDS / "SCAN1000.json")
    desc["pyramids"][0]["path"] = f"s3://{s3_bucket}/SCAN1000.json"
    async with app_client(settings) as c:
        assert (await c.post("/admin/layers/S3LAYER", json=desc, headers=AUTH)).status_code == 204
        for level, col, row in corner_tiles(PYRAMIDS / "SCAN1000.json")[:4]:
            answer = await c.get(f"/tms/1.0.0/S3LAYER/{level}/{col}/{row}.png")
            assert answer.status_code == 200 and answer.content == stored_tile(
                PYRAMIDS / "SCAN1000.json", level, col, row
            )
        s3_proxy.fail_next(20, 503)
        failed = await c.get("/tms/1.0.0/S3LAYER/9/258/181.png")  # a slab not read yet
        assert failed.status_code == 503 and xml(failed).tag == "TileMapServerError"
        ogc = await c.get("/ogcapi/collections/S3LAYER/map/tiles/PM/9/181/258")
        assert ogc.status_code == 503 and ogc.headers["content-type"] == "application/problem+json"
        s3_proxy.clear()
        assert (await c.get("/tms/1.0.0/S3LAYER/9/258/181.png")).status_code == 200


# --- over real HTTP -------------------------------------------------------------------------------


def test_owslib_reads_the_service_and_fetches_stored_tiles(served):
    from owslib.tms import TileMapService

    base, world = served
    service = TileMapService(f"{base}/tms/1.0.0")
    assert service.identification.title == "tileserver" and "TMS" in service.identification.keywords
    href = f"{base}/tms/1.0.0/SCAN1000"
    assert href in service.contents and f"{base}/tms/1.0.0/SECRET" not in service.contents
    content = service.contents[href]
    tilemap = content.tilemap
    assert tilemap.srs == "EPSG:3857" and tilemap.extension == "png" and tilemap.mimetype == "image/png"
    assert tilemap.origin == (-20037508.3427892, 20037508.3427892)
    assert [ts["order"] for ts in tilemap.tilesets] == list(range(11))
    tile = service.gettile(
        516, 363, 10, id=href
    )  # OWSLib: href of the TileSet whose order is z, then x/y.ext
    assert tile.read() == stored_tile(world.sources["SCAN1000"], "10", 516, 363)


def test_documents_over_http(served):
    base, _ = served
    with httpx.Client(base_url=base) as http:
        for path in ("/tms", "/tms/1.0.0", "/tms/1.0.0/MONTAGNE", "/tms/1.0.0/MONTAGNE/gdal.xml"):
            answer = http.get(path, headers={"Accept-Encoding": "gzip"})
            assert answer.status_code == 200 and etree.fromstring(answer.content) is not None
        tilejson = http.get("/tms/1.0.0/MONTAGNE/metadata.json").json()
        tile = http.get(tilejson["tiles"][0].format(z=17, x=66060, y=47880))
        assert tile.status_code == 200 and tile.headers["content-type"] == "image/png"
        assert http.head("/tms/1.0.0/MONTAGNE/17/66060/47880.png").status_code == 200
        assert http.get("/tms/1.0.0/MONTAGNE/17/0/0.png").status_code == 404


SEGMENT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["1.0.0", "SCAN1000", "RGEALTI", "ROADS", "10", "516", "363", "..", ".", "%00", "0"]),
)


@pytest.fixture(scope="module")
def http(served):
    """One keep-alive client for the real-HTTP tests (a client per request costs ~50 ms of TLS setup)."""
    with httpx.Client(base_url=served[0], timeout=10) as c:
        yield c


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(SEGMENT, min_size=0, max_size=6),
    ext=st.sampled_from(["png", "jpg", "pbf", "", "zbil", "x.y"]),
)
def test_fuzz_never_500(http, parts, ext):
    path = "/".join(quote(p, safe="") for p in parts)
    for url in (f"/tms/{path}", f"/tms/1.0.0/SCAN1000/{path}.{ext}", f"/xyz/{path}.{ext}"):
        answer = http.get(url)
        assert answer.status_code < 500, (url, answer.status_code, answer.text)
        path = answer.request.url.path  # '..' segments may have left /tms
        if answer.status_code >= 400 and (path == "/tms" or path.startswith("/tms/")):
            assert etree.fromstring(answer.content).tag == "TileMapServerError", url
