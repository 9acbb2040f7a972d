"""OGC API – Tiles over the published fixture layers: documents against the spec's required members,
every link followed, tiles in every form, content negotiation, every error, fuzzing; in-process and
over real HTTP.

The OGC API – Tiles JSON schemas are not available offline, so the required members of each
building block (ogcapi-tiles-1 OpenAPI components: landingPage, confClasses, collections,
collectionInfo, tileSet, tileSet-item, tileMatrixLimits, tileMatrixSet-item, link, exception) are
written below as JSON Schemas; tile matrix set definitions are loaded by morecantile (OGC 2D-TMS 2.0).
"""

from __future__ import annotations

import io
import json
from collections import deque
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import jsonschema
import morecantile
import numpy as np
import pytest
from apputil import app_client, layer_descriptor, live_server, make_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_tms_service import AUTH, TMS_DIR, publish_world, stored_tile

from tileserver.rok4.tms import load_tms
from tileserver.services.ogcapi import OPERATIONS
from tileserver.services.ogcapi_common import CONFORMANCE
from tileserver.services.ogcapi_grids import registered_alias

REL = "http://www.opengis.net/def/rel/ogc/1.0/"
ROOT = "http://testserver/ogcapi"
CORE = "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/core"
TEMPLATE_VARS = ("{tileMatrix}", "{tileRow}", "{tileCol}")

# --- the spec's required members, as JSON Schemas -------------------------------------------------

LINK = {
    "type": "object",
    "required": ["href", "rel"],
    "properties": {
        "href": {"type": "string"},
        "rel": {"type": "string"},
        "type": {"type": "string"},
        "title": {"type": "string"},
        "templated": {"type": "boolean"},
    },
}
LINKS = {"type": "array", "items": LINK}
CRS = {"oneOf": [{"type": "string"}, {"type": "object"}]}
LIMITS = {
    "type": "object",
    "required": ["tileMatrix", "minTileRow", "maxTileRow", "minTileCol", "maxTileCol"],
    "properties": {
        "tileMatrix": {"type": "string"},
        **{
            k: {"type": "integer", "minimum": 0}
            for k in ("minTileRow", "maxTileRow", "minTileCol", "maxTileCol")
        },
    },
}
DATA_TYPE = {"type": "string", "enum": ["map", "vector", "coverage"]}
TILESET_ITEM = {
    "type": "object",
    "required": ["dataType", "links", "crs"],
    "properties": {"dataType": DATA_TYPE, "crs": CRS, "links": LINKS, "tileMatrixSetURI": {"type": "string"}},
}
COLLECTION = {
    "type": "object",
    "required": ["id", "links"],
    "properties": {
        "id": {"type": "string"},
        "title": {"type": "string"},
        "links": LINKS,
        "dataType": DATA_TYPE,
        "crs": {"type": "array", "items": {"type": "string"}},
        "extent": {
            "type": "object",
            "properties": {
                "spatial": {
                    "type": "object",
                    "required": ["bbox"],
                    "properties": {
                        "bbox": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "array",
                                "minItems": 4,
                                "maxItems": 6,
                                "items": {"type": "number"},
                            },
                        },
                        "crs": {"type": "string"},
                    },
                }
            },
        },
    },
}
SCHEMAS = {
    "landing": {
        "type": "object",
        "required": ["links"],
        "properties": {"title": {"type": "string"}, "links": LINKS},
    },
    "conformance": {
        "type": "object",
        "required": ["conformsTo"],
        "properties": {"conformsTo": {"type": "array", "items": {"type": "string"}}},
    },
    "collections": {
        "type": "object",
        "required": ["links", "collections"],
        "properties": {"links": LINKS, "collections": {"type": "array", "items": COLLECTION}},
    },
    "collection": COLLECTION,
    "tilesets": {
        "type": "object",
        "required": ["tilesets"],
        "properties": {"links": LINKS, "tilesets": {"type": "array", "items": TILESET_ITEM}},
    },
    "tileset": {
        "type": "object",
        "required": ["dataType", "crs", "links"],
        "properties": {
            "dataType": DATA_TYPE,
            "crs": CRS,
            "links": LINKS,
            "tileMatrixSetLimits": {"type": "array", "items": LIMITS},
            "layers": {
                "type": "array",
                "minItems": 1,
                "items": {"type": "object", "required": ["id", "dataType"]},
            },
        },
    },
    "tileMatrixSets": {
        "type": "object",
        "properties": {
            "tileMatrixSets": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["links"],
                    "properties": {"id": {"type": "string"}, "uri": {"type": "string"}, "links": LINKS},
                },
            }
        },
    },
    "problem": {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
    },
}


def validate(doc: dict, schema: str) -> None:
    jsonschema.validate(doc, SCHEMAS[schema])


def schema_of(path: str) -> str | None:
    """Which building block a path under the API answers (None: a tile or the OpenAPI document)."""
    parts = [p for p in urlsplit(path).path.removeprefix("/ogcapi").split("/") if p]
    if not parts:
        return "landing"
    if parts[0] in ("conformance", "collections", "tileMatrixSets") and len(parts) == 1:
        return {
            "conformance": "conformance",
            "collections": "collections",
            "tileMatrixSets": "tileMatrixSets",
        }[parts[0]]
    if parts[0] == "collections" and len(parts) == 2:
        return "collection"
    if parts[0] == "tileMatrixSets":
        return "tileMatrixSet"
    if parts[-1] == "tiles":
        return "tilesets"
    if len(parts) >= 2 and parts[-2] == "tiles":
        return "tileset"
    return None


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ogcapi")
    with live_server(make_settings(tmp)) as base:
        yield base, publish_world(tmp, base)


@pytest.fixture(scope="module")
def world(served):
    return served[1]


@pytest.fixture(scope="module")
async def client(world):
    async with app_client(world.settings) as c:
        yield c


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served[0], timeout=10) as c:
        yield c


def links_of(doc) -> list[dict]:
    """Every link object anywhere in a document."""
    found = []
    if isinstance(doc, dict):
        if "href" in doc and "rel" in doc:
            found.append(doc)
        for value in doc.values():
            found += links_of(value)
    elif isinstance(doc, list):
        for value in doc:
            found += links_of(value)
    return found


# --- landing, conformance, link crawl -------------------------------------------------------------


async def test_landing_and_conformance(client):
    landing = await client.get("/ogcapi")
    assert landing.status_code == 200 and landing.headers["content-type"] == "application/json"
    doc = landing.json()
    validate(doc, "landing")
    rels = {link["rel"]: link for link in doc["links"]}
    for rel in (
        "self",
        "alternate",
        "service-desc",
        "conformance",
        "data",
        REL + "tiling-schemes",
        REL + "tilesets-map",
    ):
        assert rel in rels, rel
    assert rels["service-desc"]["type"] == "application/vnd.oai.openapi+json;version=3.0"
    assert any(r.startswith(REL + "tilesets-") for r in rels)
    conformance = (await client.get("/ogcapi/conformance")).json()
    validate(conformance, "conformance")
    encodings = {f"http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/{n}" for n in ("png", "jpeg", "mvt")}
    # the world serves PNG, JPEG, BIL (DEMs: no class) and MVT tiles
    assert CORE in conformance["conformsTo"] and set(conformance["conformsTo"]) == set(CONFORMANCE) | encodings
    for suffix in ("core", "landing-page", "json", "html", "oas30"):
        assert f"http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/{suffix}" in conformance["conformsTo"]
    assert (
        "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/dataset-tilesets"
        not in conformance["conformsTo"]
    )
    assert (await client.get("/ogcapi/")).json() == doc
    assert (await client.get("/ogcapitiles")).json()["links"][0][
        "href"
    ] == "http://testserver/ogcapitiles?f=json"


async def test_conformance_declares_only_the_encodings_tilesets_serve(tmp_path):
    """OGC's suite tests each encoding class declared: one PNG layer declares PNG alone (no JPEG that
    `?f=jpeg` would refuse, no TIFF or MVT); a DEM's own tiles are BIL (no class), but the dataset's map
    tiles without `collections` draw it to PNG, as does a style that changes pixels."""
    conf = "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/"

    async def encodings(client) -> set[str]:
        classes = (await client.get("/ogcapi/conformance")).json()["conformsTo"]
        assert CORE in classes
        return {c.removeprefix(conf) for c in classes if c.removeprefix(conf) in ("png", "jpeg", "tiff", "mvt")}

    settings = make_settings(tmp_path, styles_directory=str(Path(__file__).parent / "data" / "styles"))
    async with app_client(settings) as client:
        assert await encodings(client) == set()  # nothing published, nothing served
        assert (await client.post("/admin/layers/SCAN", json=layer_descriptor("SCAN1000"), headers=AUTH)).status_code == 204
        assert await encodings(client) == {"png"}
        refused = await client.get("/ogcapi/collections/SCAN/map/tiles/PM/10/363/516?f=jpeg")
        assert refused.status_code == 400
        await client.delete("/admin/layers/SCAN", headers=AUTH)
        await client.post("/admin/layers/DEM", json=layer_descriptor("RGEALTI", styles=["normal"]), headers=AUTH)
        assert await encodings(client) == {"png"}  # the dataset's map tiles (no `collections`) are drawn
        dataset = await client.get("/ogcapi/map/tiles/LAMB93_1M_MNT/8/22363/2242")
        assert dataset.status_code == 200 and dataset.headers["content-type"] == "image/png"
        assert (await client.get("/ogcapi/collections/DEM/map/tiles/LAMB93_1M_MNT/8/22363/2242?f=png")).status_code == 400
        await client.put("/admin/layers/DEM", json=layer_descriptor("RGEALTI", styles=["normal", "hypso"]),
                         headers=AUTH)
        assert await encodings(client) == {"png"}  # hypso renders PNG tiles
        hypso = await client.get("/ogcapi/collections/DEM/styles/hypso/map/tiles/LAMB93_1M_MNT/8/22363/2242")
        assert hypso.status_code == 200 and hypso.headers["content-type"] == "image/png"


async def test_every_link_resolves_and_every_document_has_the_required_members(client):
    """Crawl from the landing page: every non-templated link inside the API answers 200, every JSON
    document matches its building block, every templated tile link names the three variables."""
    queue, seen, checked = deque([f"{ROOT}"]), {ROOT}, {}
    while queue:
        url = queue.popleft()
        answer = await client.get(url)
        assert answer.status_code == 200, (url, answer.status_code, answer.text[:300])
        kind = answer.headers["content-type"].split(";")[0]
        if kind != "application/json" and not url.endswith("/api"):
            continue
        doc = answer.json()
        schema = schema_of(url)
        if schema == "tileMatrixSet":
            morecantile.TileMatrixSet.model_validate(doc)
        elif schema is not None:
            validate(doc, schema)
            checked[schema] = checked.get(schema, 0) + 1
        for link in links_of(doc):
            href = link["href"]
            if link.get("templated"):
                assert all(v in href for v in TEMPLATE_VARS), href
                continue
            if href.startswith(ROOT) and href not in seen:
                seen.add(href)
                queue.append(href)
    assert set(checked) >= {
        "landing",
        "conformance",
        "collections",
        "collection",
        "tilesets",
        "tileset",
        "tileMatrixSets",
    }
    assert len(seen) > 50


async def test_collections(client, world):
    doc = (await client.get("/ogcapi/collections")).json()
    validate(doc, "collections")
    by_id = {c["id"]: c for c in doc["collections"]}
    assert set(by_id) == set(world.layers) - {"SECRET"}
    for collection_id in by_id:
        full = (await client.get(f"/ogcapi/collections/{collection_id}")).json()
        validate(full, "collection")
        assert full["title"] == world.layers[collection_id]["title"]
        assert full["extent"]["spatial"]["crs"] == "http://www.opengis.net/def/crs/OGC/1.3/CRS84"
        west, south, east, north = full["extent"]["spatial"]["bbox"][0]
        assert -180 <= west < east <= 180 and -90 <= south < north <= 90
        assert full["attribution"] == "IGN" and full["storageCrs"] in full["crs"]
        tilesets = [link for link in full["links"] if link["rel"].startswith(REL + "tilesets-")]
        assert tilesets and all(
            "/tiles" in link["href"] for link in tilesets
        )  # ETS: tilesets link has /tiles
        assert full["dataType"] == ("vector" if collection_id == "ROADS" else "map")
    assert by_id["RGEALTI"]["storageCrs"] == "http://www.opengis.net/def/crs/IGNF/0/LAMB93"
    # bbox filter (CRS84): a point inside MONTAGNE finds it; the South Pacific finds nothing
    west, south, east, north = by_id["MONTAGNE"]["extent"]["spatial"]["bbox"][0]
    x, y = (west + east) / 2, (south + north) / 2
    for bbox, expected in ((f"{x},{y},{x + 1e-6},{y + 1e-6}", True), ("-170,-80,-169,-79", False)):
        found = (await client.get("/ogcapi/collections", params={"bbox": bbox})).json()["collections"]
        assert ("MONTAGNE" in {c["id"] for c in found}) is expected
        assert expected or found == []


# --- tile matrix sets and registered aliases ------------------------------------------------------


async def test_tile_matrix_sets_and_registered_ids(client):
    listing = (await client.get("/ogcapi/tileMatrixSets")).json()
    validate(listing, "tileMatrixSets")
    ids = {item["id"]: item for item in listing["tileMatrixSets"]}
    assert {"PM", "WebMercatorQuad", "4326", "WorldCRS84Quad", "LAMB93_1M_MNT"} <= set(ids)
    assert ids["WebMercatorQuad"]["uri"] == "http://www.opengis.net/def/tilematrixset/OGC/1.0/WebMercatorQuad"
    for grid in ids:
        doc = (await client.get(f"/ogcapi/tileMatrixSets/{grid}")).json()
        parsed = morecantile.TileMatrixSet.model_validate(doc)
        assert doc["id"] == grid and len(parsed.tileMatrices) == len(doc["tileMatrices"])
    # the aliases are the registered definitions themselves
    for registered in ("WebMercatorQuad", "WorldCRS84Quad"):
        doc = (await client.get(f"/ogcapi/tileMatrixSets/{registered}")).json()
        reference = morecantile.tms.get(registered)
        assert morecantile.TileMatrixSet.model_validate(doc).tileMatrices == reference.tileMatrices
        assert doc["uri"] == reference.uri
    pm = (await client.get("/ogcapi/tileMatrixSets/PM")).json()
    assert [m["cellSize"] for m in pm["tileMatrices"]] == [
        m.cell_size for m in load_tms("PM", TMS_DIR).matrices
    ]


def test_registered_aliases_only_when_the_numbers_match():
    expected = {
        "PM": "WebMercatorQuad",
        "4326": "WorldCRS84Quad",
        "WGS84G": "WorldCRS84Quad",
        "LAMB93_1M_MNT": None,
        "LAMB93": None,
        "2154_10m": None,
        "PM_5cm": "WebMercatorQuad",  # levels 0–22 of the same grid
        "SwissCH1903_28mm": None,
    }
    for grid, alias in expected.items():
        assert registered_alias(load_tms(grid, TMS_DIR)) == alias, grid
    pm = load_tms("PM", TMS_DIR)
    shifted = replace(
        pm,
        matrices=(
            replace(pm.matrices[0], origin_x=pm.matrices[0].origin_x + pm.matrices[0].cell_size),
            *pm.matrices[1:],
        ),
        _by_id={},
    )
    resized = replace(pm, matrices=(*pm.matrices[:-1], replace(pm.matrices[-1], matrix_width=7)), _by_id={})
    other_crs = replace(pm, crs="EPSG:2154", _by_id={})
    for grid in (shifted, resized, other_crs):
        assert registered_alias(grid) is None


# --- tilesets and tiles ---------------------------------------------------------------------------


async def test_tilesets_point_at_registered_grids_and_limits(client, world):
    listing = (await client.get("/ogcapi/collections/SCAN1000/map/tiles")).json()
    validate(listing, "tilesets")
    uris = {ts.get("tileMatrixSetURI") for ts in listing["tilesets"]}
    assert "http://www.opengis.net/def/tilematrixset/OGC/1.0/WebMercatorQuad" in uris
    for item in listing["tilesets"]:
        assert any(
            link["rel"] == "self" and link.get("type") for link in item["links"]
        )  # ETS: typed self link
        assert any(link["rel"] == REL + "tiling-scheme" for link in item["links"])
    tileset = (await client.get("/ogcapi/collections/SCAN1000/map/tiles/WebMercatorQuad")).json()
    validate(tileset, "tileset")
    template = next(link["href"] for link in tileset["links"] if link["rel"] == "item")
    assert "/tiles/WebMercatorQuad/" in template  # ETS A.2: registered id in the URL template
    desc = json.loads(world.sources["SCAN1000"].read_text())
    assert {
        lim["tileMatrix"]: (lim["minTileRow"], lim["maxTileRow"], lim["minTileCol"], lim["maxTileCol"])
        for lim in tileset["tileMatrixSetLimits"]
    } == {
        lv["id"]: (
            lv["tile_limits"]["min_row"],
            lv["tile_limits"]["max_row"],
            lv["tile_limits"]["min_col"],
            lv["tile_limits"]["max_col"],
        )
        for lv in desc["levels"]
    }
    vector = (await client.get("/ogcapi/collections/ROADS/tiles/PM")).json()
    validate(vector, "tileset")
    assert vector["dataType"] == "vector" and vector["layers"][0]["id"] == "roads"
    dataset = (await client.get("/ogcapi/map/tiles/PM")).json()
    validate(dataset, "tileset")
    assert {layer["id"] for layer in dataset["layers"]} >= {"SCAN1000", "MONTAGNE", "ORTHO"}


async def test_every_tile_of_every_tileset_answers(client):
    """ETS A.6: min, middle and max rows × cols of every tile matrix inside the limits → 200, right type."""
    collections = (await client.get("/ogcapi/collections")).json()["collections"]
    count = 0
    for collection in collections:
        if collection["id"] == "EMPTY404":  # asks for ROK4's 404 on empty tiles: checked below
            continue
        tilesets_link = next(
            link["href"] for link in collection["links"] if link["rel"].startswith(REL + "tilesets-")
        )
        for item in (await client.get(tilesets_link)).json()["tilesets"]:
            tileset = (
                await client.get(next(link["href"] for link in item["links"] if link["rel"] == "self"))
            ).json()
            template = next(link for link in tileset["links"] if link["rel"] == "item")
            for lim in tileset["tileMatrixSetLimits"]:
                rows = {lim["minTileRow"], (lim["minTileRow"] + lim["maxTileRow"]) // 2, lim["maxTileRow"]}
                cols = {lim["minTileCol"], (lim["minTileCol"] + lim["maxTileCol"]) // 2, lim["maxTileCol"]}
                for row in rows:
                    for col in cols:
                        url = template["href"].format(tileMatrix=lim["tileMatrix"], tileRow=row, tileCol=col)
                        answer = await client.get(url)
                        assert answer.status_code == 200, (url, answer.text)
                        assert answer.headers["content-type"] == template["type"]
                        count += 1
                edge = template["href"].format(
                    tileMatrix=lim["tileMatrix"], tileRow=2147483647, tileCol=2147483647
                )
                assert (await client.get(edge)).status_code in (400, 404)  # ETS A.7
    assert count > 100
    empty = await client.get("/ogcapi/collections/EMPTY404/map/tiles/PM/16/23940/33031")
    assert empty.status_code == 404 and "no data" in empty.json()["detail"]
    assert (await client.get("/ogcapi/collections/ORTHO/map/tiles/PM/16/23940/33031")).status_code == 200


TILE_FORMS = [
    "/ogcapi/collections/{id}/map/tiles/{tms}/{z}/{row}/{col}",
    "/ogcapi/collections/{id}/styles/normal/map/tiles/{tms}/{z}/{row}/{col}",
    "/ogcapi/collections/{id}/styles/hypso/map/tiles/{tms}/{z}/{row}/{col}?f={f}",
    "/ogcapi/map/tiles/{tms}/{z}/{row}/{col}?collections={id}",
    "/ogcapi/styles/normal/map/tiles/{tms}/{z}/{row}/{col}?collections={id}",
    "/ogcapitiles/collections/{id}/map/tiles/{tms}/{z}/{row}/{col}",
]
CASES = [
    ("SCAN1000", "PM", "10", 363, 516, "png"),
    ("MONTAGNE", "WebMercatorQuad", "17", 47880, 66060, "png"),
    ("BDPARCELLAIRE", "WorldCRS84Quad", "19", 123346, 544204, "png"),
    ("RGEALTI", "LAMB93_1M_MNT", "8", 22363, 2242, "bil"),
    ("ORTHO", "PM", "16", 23940, 33030, "jpg"),
]


@pytest.mark.parametrize("form", TILE_FORMS)
async def test_tile_forms_serve_the_stored_bytes(client, world, form):
    for layer_id, grid, z, row, col, f in CASES:
        url = form.format(id=layer_id, tms=grid, z=z, row=row, col=col, f=f)
        async with client.stream("GET", url) as answer:
            raw = b"".join([chunk async for chunk in answer.aiter_raw()])
        assert answer.status_code == 200, (url, answer.text if answer.is_closed else "")
        assert raw == stored_tile(world.sources[layer_id], z, col, row), url


async def test_vector_tiles(client, world):
    stored = stored_tile(world.sources["ROADS"], "15", 16515, 11970)
    for url in (
        "/ogcapi/collections/ROADS/tiles/PM/15/11970/16515",
        "/ogcapi/collections/ROADS/tiles/WebMercatorQuad/15/11970/16515?f=mvt",
        "/ogcapi/tiles/PM/15/11970/16515?collections=ROADS",
    ):
        answer = await client.get(url)
        assert answer.status_code == 200 and answer.content == stored, url
        assert answer.headers["content-type"] == "application/x-protobuf"


async def test_a_style_that_changes_pixels_is_rendered(world):
    """A palette on the DEM: rendered PNG (not the stored BIL); the default style still passes through."""
    settings = replace(world.settings, data_dir=str(Path(world.settings.data_dir).parent / "styled"))
    palette = json.loads((Path(__file__).parent / "data" / "styles" / "hypso.json").read_text())
    async with app_client(settings) as c:
        runtime = c.app.state.runtime
        runtime.store.put_style("hypso", palette)
        for layer_id, source in (("DEM", "RGEALTI"), ("PICTURE", "SCAN1000")):
            answer = await c.post(f"/admin/layers/{layer_id}", json=world.layers[source], headers=AUTH)
            assert answer.status_code == 204
        await runtime.refresh(force=True)
        tile = "LAMB93_1M_MNT/8/22363/2242"
        for url in (
            f"/ogcapi/collections/DEM/styles/hypso/map/tiles/{tile}?f=png",
            f"/ogcapi/styles/hypso/map/tiles/{tile}?collections=DEM",
        ):
            styled = await c.get(url)
            assert styled.status_code == 200 and styled.headers["content-type"] == "image/png", styled.text
            image = Image.open(io.BytesIO(styled.content))
            assert (
                image.size == (256, 256)
                and len(np.unique(np.asarray(image.convert("RGBA")).reshape(-1, 4), axis=0)) > 10
            )
        plain = await c.get(f"/ogcapi/collections/DEM/styles/normal/map/tiles/{tile}")
        assert plain.status_code == 200 and plain.headers["content-type"] == "image/x-bil;bits=32"
        tileset = (await c.get("/ogcapi/collections/DEM/styles/hypso/map/tiles/LAMB93_1M_MNT")).json()
        assert next(link for link in tileset["links"] if link["rel"] == "item")["type"] == "image/png"
        refused = {
            f"/ogcapi/collections/DEM/styles/hypso/map/tiles/{tile}?f=bil": 400,  # renders PNG only
            "/ogcapi/collections/DEM/styles/hypso/map/tiles/LAMB93_1M_MNT/8/0/0": 404,
            # a palette on RGBA: not a style PICTURE offers (its collection does not list it)
            "/ogcapi/collections/PICTURE/styles/hypso/map/tiles/PM/10/363/516": 404,
        }
        for url, status in refused.items():
            answer = await c.get(url)
            assert (
                answer.status_code == status and answer.headers["content-type"] == "application/problem+json"
            ), url


# --- negotiation ----------------------------------------------------------------------------------

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
NEGOTIATION = [
    ({}, {}, "application/json"),
    ({}, {"Accept": "*/*"}, "application/json"),
    ({}, {"Accept": "application/json"}, "application/json"),
    ({}, {"Accept": BROWSER}, "text/html"),
    ({"f": "html"}, {}, "text/html"),
    ({"f": "json"}, {"Accept": BROWSER}, "application/json"),
    ({"f": "application/json"}, {}, "application/json"),
    ({}, {"Accept": "text/html;q=0.5, application/json"}, "application/json"),
]


@pytest.mark.parametrize(("params", "headers", "media_type"), NEGOTIATION)
@pytest.mark.parametrize(
    "path",
    [
        "",
        "/conformance",
        "/collections",
        "/collections/SCAN1000",
        "/collections/SCAN1000/map/tiles/PM",
        "/tileMatrixSets/PM",
    ],
)
async def test_negotiation(client, path, params, headers, media_type):
    answer = await client.get(f"/ogcapi{path}", params=params, headers=headers)
    assert answer.status_code == 200 and answer.headers["content-type"].split(";")[0] == media_type
    assert "Accept" in answer.headers["vary"]
    if media_type == "text/html":
        page = answer.text
        assert page.startswith("<!DOCTYPE html>") and "<a href=" in page
        assert "<script" not in page and "<link" not in page  # no external assets


async def test_openapi_document(client):
    answer = await client.get("/ogcapi/api")
    assert answer.headers["content-type"] == "application/vnd.oai.openapi+json;version=3.0"
    doc = answer.json()
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(doc)
    ids = [op["get"]["operationId"] for op in doc["paths"].values()]
    assert len(ids) == len(set(ids)) == len(OPERATIONS)  # ETS A.23/A.24: every path, with operationIds
    assert {op.path or "/" for op in OPERATIONS} == set(doc["paths"])
    assert (
        (await client.get("/ogcapi/api", params={"f": "html"}))
        .headers["content-type"]
        .startswith("text/html")
    )


# --- errors ---------------------------------------------------------------------------------------

TILE = "/ogcapi/collections/SCAN1000/map/tiles/PM/10"
ERRORS = [
    ("/ogcapi/collections/NOPE", {}, 404),
    ("/ogcapi/collections/NOPE/map/tiles", {}, 404),
    ("/ogcapi/collections/SECRET", {}, 404),  # restricted, no key
    ("/ogcapi/collections/SCAN1000/map/tiles/NOPE", {}, 404),
    ("/ogcapi/collections/SCAN1000/map/tiles/LAMB93_1M_MNT", {}, 404),
    ("/ogcapi/collections/SCAN1000/map/tiles/NOPE/10/363/516", {}, 404),
    ("/ogcapi/collections/SCAN1000/map/tiles/PM/99/0/0", {}, 404),
    ("/ogcapi/collections/SCAN1000/map/tiles/PM/11/0/0", {}, 404),
    (f"{TILE}/0/0", {}, 404),
    (f"{TILE}/2147483647/2147483647", {}, 404),
    (f"{TILE}/-1/516", {}, 404),
    (f"{TILE}/363/99999999999999999999999", {}, 404),
    (f"{TILE}/a/516", {}, 400),
    (f"{TILE}/363/5e2", {}, 400),
    (f"{TILE}/363/516?f=jpg", {}, 400),
    (f"{TILE}/363/516?f=bogus", {}, 400),
    (f"{TILE}/363/516", {"Accept": "application/json"}, 406),
    ("/ogcapi/collections/SCAN1000/tiles", {}, 404),
    ("/ogcapi/collections/SCAN1000/tiles/PM/10/363/516", {}, 404),
    ("/ogcapi/collections/ROADS/map/tiles", {}, 404),
    ("/ogcapi/collections/SCAN1000/styles/nope/map/tiles", {}, 404),
    ("/ogcapi/collections/SCAN1000/styles/nope/map/tiles/PM/10/363/516", {}, 404),
    ("/ogcapi/styles/nope/map/tiles", {}, 404),
    ("/ogcapi/map/tiles/PM/10/363/516?f=jpeg", {}, 400),  # the dataset's tiles are drawn to PNG
    ("/ogcapi/map/tiles/PM/10/363/516?collections=SCAN1000,MONTAGNE", {}, 400),
    ("/ogcapi/map/tiles/PM/10/363/516?collections=NOPE", {}, 404),
    ("/ogcapi/map/tiles/PM/10/363/516?collections=ROADS", {}, 404),
    ("/ogcapi/map/tiles/LAMB93/10/363/516?collections=SCAN1000", {}, 404),
    ("/ogcapi/tileMatrixSets/NOPE", {}, 404),
    ("/ogcapi/collections?f=xml", {}, 400),
    ("/ogcapi/collections?bbox=1,2", {}, 400),
    ("/ogcapi/collections?bbox=a,b,c,d", {}, 400),
    ("/ogcapi/conformance?f=pdf", {}, 400),
    ("/ogcapi/collections", {"Accept": "image/png"}, 406),
    ("/ogcapi/api", {"Accept": "text/csv"}, 406),
]


@pytest.mark.parametrize(("path", "headers", "status"), ERRORS)
async def test_errors_are_problems(client, path, headers, status):
    answer = await client.get(path, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    validate(problem, "problem")
    assert problem["status"] == status


async def test_unknown_paths_are_404(client):
    for path in (
        "/ogcapi/nope",
        "/ogcapi/collections/SCAN1000/map/tiles/PM/10/363/516/1",
        "/ogcapi/collections/SCAN1000/items",
    ):
        assert (await client.get(path)).status_code == 404


async def test_restricted_collection_with_key(client, world):
    hidden = (await client.get("/ogcapi/collections")).json()
    assert "SECRET" not in {c["id"] for c in hidden["collections"]}
    doc = (await client.get("/ogcapi/collections", params={"apikey": world.key})).json()
    secret = next(c for c in doc["collections"] if c["id"] == "SECRET")
    assert all(
        f"apikey={world.key}" in link["href"] for link in secret["links"] if link["href"].startswith(ROOT)
    )
    tilesets_href = next(link["href"] for link in secret["links"] if link["rel"] == REL + "tilesets-map")
    tilesets = (await client.get(tilesets_href)).json()  # the key rides along the links
    tileset = (await client.get(tilesets["tilesets"][0]["links"][0]["href"])).json()
    template = next(link["href"] for link in tileset["links"] if link["rel"] == "item")
    tile = await client.get(template.format(tileMatrix="17", tileRow=47880, tileCol=66060))
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/png"
    header_only = await client.get("/ogcapi/collections/SECRET", headers={"X-Api-Key": world.key})
    assert header_only.status_code == 200


# --- over real HTTP -------------------------------------------------------------------------------


def test_over_real_http(http, world):
    landing = http.get("/ogcapi", headers={"Accept-Encoding": "gzip"})
    assert landing.status_code == 200 and landing.json()["links"]
    base = str(http.base_url).rstrip("/")
    assert landing.json()["links"][0]["href"] == f"{base}/ogcapi?f=json"
    assert CORE in http.get("/ogcapitiles/conformance").json()["conformsTo"]
    tile = http.get("/ogcapitiles/collections/MONTAGNE/map/tiles/WebMercatorQuad/17/47880/66060")
    assert tile.status_code == 200 and tile.content == stored_tile(
        world.sources["MONTAGNE"], "17", 66060, 47880
    )
    assert http.head("/ogcapi/collections/MONTAGNE/map/tiles/PM/17/47880/66060").status_code == 200
    assert (
        http.get("/ogcapi/collections/MONTAGNE", headers={"Accept": BROWSER})
        .headers["content-type"]
        .startswith("text/html")
    )
    etag = tile.headers["etag"]
    again = http.get(
        "/ogcapi/collections/MONTAGNE/map/tiles/WebMercatorQuad/17/47880/66060",
        headers={"If-None-Match": etag},
    )
    assert again.status_code == 304


SEGMENT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["SCAN1000", "ROADS", "PM", "WebMercatorQuad", "normal", "10", "363", "516", "%", ".."]),
)
SHAPES = [
    "/ogcapi/collections/{0}/map/tiles/{1}/{2}/{3}/{4}",
    "/ogcapi/collections/SCAN1000/styles/{0}/map/tiles/{1}/{2}/{3}/{4}",
    "/ogcapi/collections/{0}/tiles/{1}/{2}/{3}/{4}",
    "/ogcapi/map/tiles/{1}/{2}/{3}/{4}?collections={0}",
    "/ogcapi/collections/{0}/map/tiles/{1}",
    "/ogcapi/tileMatrixSets/{0}?f={1}",
    "/ogcapi/collections/SCAN1000/map/tiles/PM/10/{3}/{4}?f={0}",
    "/ogcapi/collections?bbox={0},{1},{2},{3}",
]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(SEGMENT, min_size=5, max_size=5),
    accept=st.sampled_from(["", "*/*", "image/png", "text/html", ";;q=x,"]),
)
def test_fuzz_never_500(http, values, accept):
    quoted = [quote(v, safe="") for v in values]
    headers = {"Accept": accept} if accept else {}
    for shape in SHAPES:
        url = shape.format(*quoted)
        answer = http.get(url, headers=headers)
        assert answer.status_code < 500, (url, answer.status_code, answer.text)
        if answer.status_code >= 400 and answer.request.url.path.startswith("/ogcapi/"):  # '..' may leave it
            assert answer.headers["content-type"] == "application/problem+json", url
