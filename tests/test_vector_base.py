"""The two vector base backends behind `tileserver.vector.base.VectorBase`, checked on what WFS and
OGC API Features read (relations, bbox, ECQL/FES filters, paging and sorting, properties and ids,
injection, threads) against brute-force Python answers:

- `GeoPackageBase` (the embedded default: one GeoPackage per stored data, SQLite R-tree), integrated
  with `vector.integrate`;
- `PostGISBase` (the production backend, `TILESERVER_VECTOR_DB_URL`), integrated with
  `vector.pgintegrate` into a throwaway schema; skipped when PostGIS is not installed (`postgis_url`).

Every test taking `data` runs on both. `test_like_translation` and `test_measure_bbox_on_a_large_table`
are GeoPackage only (its LIKE → regex and its R-tree), `test_postgis_descriptor_urls_hold_no_password`
PostGIS only (no database needed).
"""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import shapely
from pygeofilter import ast
from pygeofilter.parsers.ecql import parse as ecql
from pygeofilter.parsers.fes import parse as fes

from tileserver.vector import pgintegrate, postgis
from tileserver.vector.base import Query, QueryError, UnknownRelation
from tileserver.vector.delivery import check_delivery
from tileserver.vector.geopackage import GeoPackageBase, like_regex
from tileserver.vector.integrate import integrate

N = 1500
NAMES = ["Abbeville", "Amiens", "arras", "Île-de-Ré", "Bar_le_Duc", "Aé%z", None]


@pytest.fixture(scope="module", params=["gpkg", "postgis"])
def data(request, tmp_path_factory) -> dict:
    rng = np.random.default_rng(7)
    tmp = tmp_path_factory.mktemp("vbase")
    x, y = rng.uniform(0, 1000, N), rng.uniform(0, 1000, N)
    pts = shapely.points(x, y)
    polys = shapely.buffer(shapely.points(x[:300], y[:300]), rng.uniform(1, 30, 300))
    names = np.array([NAMES[i % len(NAMES)] for i in range(N)], dtype=object)
    population = rng.integers(0, 5000, N)
    flag = rng.integers(0, 2, N).astype(bool)
    gpkg = tmp / "src.gpkg"
    pyogrio.raw.write(gpkg, shapely.to_wkb(pts), [names, population, flag], ["name", "population", "flag"],
                      layer="villes", driver="GPKG", geometry_type="Point", crs="EPSG:2154")
    pyogrio.raw.write(gpkg, shapely.to_wkb(polys), [population[:300]], ["population"], layer="zones",
                      driver="GPKG", geometry_type="Polygon", crs="EPSG:2154")
    report = check_delivery([gpkg], "EPSG:2154", tmp / "work")
    assert report.ok, report.problems
    if request.param == "gpkg":
        integrate(report, tmp / "base.gpkg")
        base = GeoPackageBase(tmp / "base.gpkg")
    else:
        server = request.getfixturevalue("postgis_url")
        postgis.configure(server)
        url = postgis.descriptor_url(server, postgis.new_schema())
        pgintegrate.integrate(report, url)
        base = postgis.PostGISBase(url)
    yield {"base": base, "path": tmp / "base.gpkg", "pts": pts, "polys": polys, "names": names,
           "population": population, "flag": flag, "backend": request.param}
    base.close()
    if request.param == "postgis":
        pgintegrate.drop(base.url)


def _ids(base, query) -> list:
    return [f.id for f in base.features(query)]


def test_relations(data):
    base = data["base"]
    r = base.relation("villes")
    assert r.geometry_column == "geom" and r.geometry_type == "Point" and r.srs == "EPSG:2154"
    assert [(a.name, a.type) for a in r.attributes] == [("name", "string"), ("population", "integer"),
                                                          ("flag", "boolean")]
    assert r.primary_key == ("fid",) and r.count == N and r.type == "TABLE"
    np.testing.assert_allclose(r.extent, shapely.total_bounds(data["pts"]))
    assert {x.name for x in base.relations()} == {"villes", "zones"} and base.has_rtree("zones")
    with pytest.raises(UnknownRelation):
        base.count(Query("nope"))


@pytest.mark.parametrize("bbox", [(100, 100, 250, 180), (0, 0, 1000, 1000), (500.5, 500.5, 500.6, 500.6),
                                  (-10, -10, 3, 3)])
def test_bbox_equals_brute_force(data, bbox):
    base, box = data["base"], shapely.box(*bbox)
    expected_pts = (np.flatnonzero(shapely.intersects(data["pts"], box)) + 1).tolist()
    assert _ids(base, Query("villes", bbox=bbox)) == expected_pts
    assert base.count(Query("villes", bbox=bbox)) == len(expected_pts)
    # polygons: envelopes meeting the box are only candidates; the exact test decides
    expected = (np.flatnonzero(shapely.intersects(data["polys"], box)) + 1).tolist()
    got = list(base.features(Query("zones", bbox=bbox)))
    assert [f.id for f in got] == expected
    for f in got:
        assert f.geometry.equals(data["polys"][f.id - 1])


def _python(data, i: int, expression: str) -> bool:
    name, pop, flag, pt = data["names"][i], int(data["population"][i]), bool(data["flag"][i]), data["pts"][i]
    return {
        "population > 1000 AND name LIKE 'A%'": pop > 1000 and name is not None and name.startswith("A"),
        "name ILIKE 'a%'": name is not None and name.lower().startswith("a"),
        "name LIKE 'Î%'": name is not None and name.startswith("Î"),
        "name LIKE 'Aé\\%%'": name is not None and name.startswith("Aé%"),
        "name LIKE 'Bar_le%'": name is not None and name.startswith("Bar_le"),
        "population BETWEEN 100 AND 200 OR name = 'arras'": 100 <= pop <= 200 or name == "arras",
        "name IN ('Amiens', 'arras') AND NOT population < 2500": name in ("Amiens", "arras") and not pop < 2500,
        "name IS NULL": name is None,
        "flag = TRUE AND population + 10 >= 4000": flag and pop + 10 >= 4000,
        "INTERSECTS(geom, POLYGON((0 0, 300 0, 300 300, 0 0))) AND population < 2000":
            shapely.intersects(pt, shapely.Polygon([(0, 0), (300, 0), (300, 300)])) and pop < 2000,
        "BBOX(geom, 200, 200, 400, 300) OR WITHIN(geom, POLYGON((900 900, 1000 900, 1000 1000, 900 1000, 900 900)))":
            shapely.intersects(pt, shapely.box(200, 200, 400, 300))
            or shapely.within(pt, shapely.box(900, 900, 1000, 1000)),
        "DWITHIN(geom, POINT(500 500), 50, meters)": shapely.dwithin(pt, shapely.Point(500, 500), 50),
        "DISJOINT(geom, POLYGON((0 0, 800 0, 800 800, 0 800, 0 0)))":
            shapely.disjoint(pt, shapely.box(0, 0, 800, 800)),
    }[expression]


@pytest.mark.parametrize("expression", [
    "population > 1000 AND name LIKE 'A%'",
    "name ILIKE 'a%'",
    "name LIKE 'Î%'",
    "name LIKE 'Aé\\%%'",
    "name LIKE 'Bar_le%'",
    "population BETWEEN 100 AND 200 OR name = 'arras'",
    "name IN ('Amiens', 'arras') AND NOT population < 2500",
    "name IS NULL",
    "flag = TRUE AND population + 10 >= 4000",
    "INTERSECTS(geom, POLYGON((0 0, 300 0, 300 300, 0 0))) AND population < 2000",
    "BBOX(geom, 200, 200, 400, 300) OR WITHIN(geom, POLYGON((900 900, 1000 900, 1000 1000, 900 1000, 900 900)))",
    "DWITHIN(geom, POINT(500 500), 50, meters)",
    "DISJOINT(geom, POLYGON((0 0, 800 0, 800 800, 0 800, 0 0)))",
])
def test_ecql_filters_equal_python(data, expression):
    expected = [i + 1 for i in range(N) if _python(data, i, expression)]
    assert expected, "the fixture must make the filter select something"
    q = Query("villes", filter=ecql(expression))
    assert _ids(data["base"], q) == expected
    assert data["base"].count(q) == len(expected)


def test_fes_filter(data):
    xml = """<fes:Filter xmlns:fes="http://www.opengis.net/fes/2.0" xmlns:gml="http://www.opengis.net/gml/3.2">
      <fes:And>
        <fes:PropertyIsGreaterThan><fes:ValueReference>population</fes:ValueReference>
          <fes:Literal>1000</fes:Literal></fes:PropertyIsGreaterThan>
        <fes:BBOX><fes:ValueReference>geom</fes:ValueReference>
          <gml:Envelope srsName="urn:ogc:def:crs:EPSG::2154"><gml:lowerCorner>0 0</gml:lowerCorner>
          <gml:upperCorner>500 500</gml:upperCorner></gml:Envelope></fes:BBOX>
      </fes:And></fes:Filter>"""
    box = shapely.box(0, 0, 500, 500)
    expected = [i + 1 for i in range(N)
                if data["population"][i] > 1000 and shapely.intersects(data["pts"][i], box)]
    assert _ids(data["base"], Query("villes", filter=fes(xml))) == expected


def test_like_translation():
    assert like_regex("A%", "%", "_", "\\") == "A.*"
    assert like_regex("a.b*", "*", ".", "!") == "a.b.*"
    assert like_regex("50!%", "%", "_", "!") == "50%"


def test_paging_covers_everything_once_and_sortby(data):
    base = data["base"]
    q = Query("villes", sortby=(("population", False), ("name", True)))
    full = list(base.features(q))
    assert len(full) == N
    pops = [f.properties["population"] for f in full]
    assert pops == sorted(pops, reverse=True)
    pages = []
    for offset in range(0, N, 97):
        pages += [f.id for f in base.features(Query("villes", sortby=q.sortby, offset=offset, limit=97))]
    assert pages == [f.id for f in full] and len(set(pages)) == N
    # a filtered page: offset/limit apply after the exact spatial test
    bq = Query("zones", bbox=(0, 0, 500, 500))
    every = _ids(base, bq)
    assert _ids(base, Query("zones", bbox=(0, 0, 500, 500), offset=5, limit=7)) == every[5:12]


def test_properties_ids_and_values(data):
    base = data["base"]
    features = list(base.features(Query("villes", ids=(3, 1, 99999, "2", "x"), properties=("flag",))))
    assert [f.id for f in features] == [1, 2, 3]
    for f in features:
        assert f.properties == {"flag": bool(data["flag"][f.id - 1])}
        assert isinstance(f.properties["flag"], bool) and f.geometry.equals(data["pts"][f.id - 1])


def test_no_injection_and_clear_errors(data):
    base = data["base"]
    hostile = "x'); DROP TABLE villes; --"
    assert _ids(base, Query("villes", filter=ast.Equal(ast.Attribute("name"), hostile))) == []
    assert _ids(base, Query("villes", filter=ast.Like(ast.Attribute("name"), hostile, False, "%", "_", "\\", False))) == []
    for bad in [Query("villes", properties=('name" FROM villes; --',)),
                Query("villes", sortby=(('population"; DROP TABLE villes; --', True),)),
                Query("villes", filter=ecql("nosuch = 1")),
                Query("villes", filter=ecql("INTERSECTS(name, POINT(1 1))")),
                Query("villes", offset=-1)]:
        with pytest.raises(QueryError):
            list(base.features(bad))
    assert base.count(Query("villes")) == N
    # the base's connections are read-only
    con = base._acquire()  # the pool's own connection, to show it cannot write
    try:
        if data["backend"] == "gpkg":
            with pytest.raises(sqlite3.OperationalError):
                con.execute("DELETE FROM villes")
        else:
            import psycopg

            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                con.execute(f"DELETE FROM {base._table('villes')}")
    finally:
        base._release(con)


def test_threads_share_one_base(data):
    base = data["base"]
    boxes = [(i * 50, i * 50, i * 50 + 200, i * 50 + 200) for i in range(16)]
    expected = [(np.flatnonzero(shapely.intersects(data["pts"], shapely.box(*b))) + 1).tolist() for b in boxes]
    barrier = threading.Barrier(4)

    def run(b):
        barrier.wait(timeout=10) if b[0] < 200 else None
        return _ids(base, Query("villes", bbox=b))

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, boxes)) == expected
    # one generator advanced from different threads, step by step
    it = base.features(Query("villes", limit=30))
    with ThreadPoolExecutor(3) as pool:
        got = [pool.submit(next, it).result().id for _ in range(30)]
    assert got == list(range(1, 31))


def test_measure_bbox_on_a_large_table(tmp_path: Path):
    """A measured figure, not asserted: the bbox read is R-tree bound (see tests/vector_bbox_bench.py for 1M)."""
    n = 50_000
    rng = np.random.default_rng(1)
    pts = shapely.points(rng.uniform(0, 1e5, n), rng.uniform(0, 1e5, n))
    pyogrio.raw.write(tmp_path / "big.gpkg", shapely.to_wkb(pts), [np.arange(n)], ["v"], layer="big",
                      driver="GPKG", geometry_type="Point", crs="EPSG:2154")
    base = GeoPackageBase(tmp_path / "big.gpkg")
    try:
        side = 1e5 * (1000 / n) ** 0.5
        got = _ids(base, Query("big", bbox=(0, 0, side, side)))
        assert got == (np.flatnonzero(shapely.intersects(pts, shapely.box(0, 0, side, side))) + 1).tolist()
    finally:
        base.close()


def test_postgis_descriptor_urls_hold_no_password(monkeypatch):
    full = "postgresql://tileserver:s3cr%40t@db.example:5433/vecteur?sslmode=require"
    descriptor = postgis.descriptor_url(full, "vb_abc")
    assert descriptor == "postgresql://tileserver@db.example:5433/vecteur#vb_abc"
    monkeypatch.setattr(postgis, "_configured", {})
    monkeypatch.delenv(postgis.ENV, raising=False)
    assert postgis.split(descriptor) == ("postgresql://tileserver@db.example:5433/vecteur", "vb_abc")
    postgis.configure(full)  # the setting gives the credentials back, in this process only
    assert postgis.split(descriptor) == (full, "vb_abc")
    for bad in ("postgresql://h/db", "postgresql://h/db#x; DROP SCHEMA y", "postgresql://h/db#A"):
        with pytest.raises(ValueError):
            postgis.split(bad)
