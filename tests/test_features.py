# ruff: noqa: F811  (fixtures imported from test_wfs are parameters here)
"""OGC API – Features (Part 1 core, Part 2 CRS) at /ogcapi/collections/{layer}/items, over real HTTP."""

from __future__ import annotations

import subprocess

import shapely
from test_wfs import http, needs_gdal, server, source  # noqa: F401  (fixtures)

ITEMS = "/ogcapi/collections/bdtopo:commune/items"


def test_collections_and_conformance_list_the_vector_layers(http):
    collections = http.get("/ogcapi/collections").json()["collections"]
    ids = {c["id"] for c in collections}
    assert {"bdtopo:commune", "bdtopo:gare"} <= ids and "prive:gare" not in ids
    doc = http.get("/ogcapi/collections/bdtopo%3Acommune").json()
    assert doc["itemType"] == "feature"
    assert "http://www.opengis.net/def/crs/EPSG/0/2154" in doc["crs"]
    assert any(link["rel"] == "items" for link in doc["links"])
    west, south, east, north = doc["extent"]["spatial"]["bbox"][0]
    assert 0 < west < east < 10 and 40 < south < north < 52
    conformance = http.get("/ogcapi/conformance").json()["conformsTo"]
    assert "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core" in conformance
    assert "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/core" in conformance


def test_items_paging_with_next_links(server, http):
    r = http.get(ITEMS)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/geo+json")
    assert r.headers["content-crs"] == "<http://www.opengis.net/def/crs/OGC/1.3/CRS84>"
    doc = r.json()
    assert doc["numberMatched"] == 37 and doc["numberReturned"] == len(doc["features"]) == 10  # default limit
    seen = []
    url = ITEMS + "?limit=8"
    while url:
        page = http.get(url).json()
        seen += [f["id"] for f in page["features"]]
        url = next((lk["href"] for lk in page["links"] if lk["rel"] == "next"), None)
    assert sorted(seen) == sorted(source(server["gpkg"], "communes"))


def test_items_bbox_properties_crs(server, http):
    communes = source(server["gpkg"], "communes")
    from pyproj import Transformer

    to_lonlat = Transformer.from_crs("EPSG:2154", "OGC:CRS84", always_xy=True)
    window = shapely.box(600000, 6800000, 605500, 6802500)
    bbox = to_lonlat.transform_bounds(*window.bounds)
    expected = {f for f, (_, g) in communes.items() if g.intersects(shapely.box(*Transformer.from_crs(
        "OGC:CRS84", "EPSG:2154", always_xy=True).transform_bounds(*bbox)))}
    doc = http.get(ITEMS, params={"bbox": ",".join(map(str, bbox)), "limit": 100}).json()
    assert {f["id"] for f in doc["features"]} == expected != set()
    # the same window in the storage CRS, only two properties, geometries in Lambert-93
    r = http.get(ITEMS, params={"bbox": ",".join(map(str, window.bounds)), "limit": 100, "properties": "nom",
                                "bbox-crs": "http://www.opengis.net/def/crs/EPSG/0/2154",
                                "crs": "http://www.opengis.net/def/crs/EPSG/0/2154"})
    assert r.headers["content-crs"] == "<http://www.opengis.net/def/crs/EPSG/0/2154>"
    doc = r.json()
    assert {f["id"] for f in doc["features"]} == {f for f, (_, g) in communes.items() if g.intersects(window)}
    for feature in doc["features"]:
        assert set(feature["properties"]) == {"nom"}
        assert shapely.geometry.shape(feature["geometry"]).equals(communes[feature["id"]][1])
    # EPSG:4326 by URI is latitude first
    one = http.get(ITEMS + "/1", params={"crs": "http://www.opengis.net/def/crs/EPSG/0/4326"}).json()
    lat, lon = shapely.geometry.shape(one["geometry"]).exterior.coords[0]
    assert 40 < lat < 52 and 0 < lon < 10


def test_item_and_errors(http):
    assert http.get(ITEMS + "/5").json()["properties"]["nom"] == "commune-04"
    assert http.get(ITEMS + "/999").status_code == 404
    assert http.get("/ogcapi/collections/bdtopo:nope/items").status_code == 404
    assert http.get("/ogcapi/collections/prive:gare/items").status_code == 404
    for params in ({"limit": "x"}, {"bbox": "1,2"}, {"crs": "EPSG:9999"}, {"properties": "nope"}, {"bogus": "1"}):
        r = http.get(ITEMS, params=params)
        assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json", params
    assert http.get(ITEMS, params={"f": "html"}).text.startswith("<!DOCTYPE html>")


def test_restricted_collection_with_key(server, http):
    r = http.get("/ogcapi/collections/prive:gare/items", headers={"X-Api-Key": server["key"]})
    assert r.status_code == 200 and r.json()["numberMatched"] == 12
    assert r.headers["cache-control"].startswith("private")


@needs_gdal
def test_gdal_oapif_client(server):
    info = subprocess.run(["ogrinfo", "-ro", "-so", f"OAPIF:{server['url']}/ogcapi", "bdtopo:commune"],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "Feature Count: 37" in info.stdout
