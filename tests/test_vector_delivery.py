"""Vector deliveries: the check ("Vérification vecteur") and the integration into a GeoPackage base.

Fixtures are written in each test with pyogrio (GDAL) or as plain files; nothing is mocked."""

from __future__ import annotations

import os
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import shapely
from pyproj import Transformer

from tileserver.vector import delivery
from tileserver.vector.delivery import check_delivery
from tileserver.vector.integrate import IntegrationError, apply_changes, integrate
from tileserver.vector.names import MAX_LENGTH, normalise, normalise_all

RNG = np.random.default_rng(13)


def _points(n: int, x0: float = 650_000, y0: float = 6_860_000) -> np.ndarray:
    return shapely.points(RNG.uniform(x0, x0 + 10_000, n), RNG.uniform(y0, y0 + 10_000, n))


def _write(path: Path, geoms, fields: dict, layer: str | None = None, crs: str | None = "EPSG:2154", **kw) -> None:
    gtype = kw.pop("gtype", "Point")
    pyogrio.raw.write(str(path), shapely.to_wkb(geoms), [np.asarray(v) for v in fields.values()], list(fields),
                      layer=layer, crs=crs, geometry_type=gtype, **kw)


def _geopackage(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two tables with the names producers give them: accents, hyphens, capitals."""
    pts = _points(120)
    polys = shapely.buffer(_points(30), 50.0)
    _write(path, pts, {"Nom-Commune": np.array([f"Lieu-{i}" for i in range(120)], dtype=object),
                       "Population": np.arange(120) * 10}, layer="Équipements-Publics", driver="GPKG")
    _write(path, polys, {"Surface m²": shapely.area(polys)}, layer="zones bâties", driver="GPKG",
           gtype="Polygon", append=False)
    return pts, polys


def _shapefile(directory: Path, name: str = "routes", n: int = 40, crs: str = "EPSG:2154") -> list[Path]:
    lines = shapely.linestrings(np.stack([shapely.get_coordinates(_points(n)),
                                          shapely.get_coordinates(_points(n))], axis=1))
    _write(directory / f"{name}.shp", lines, {"ID": np.arange(n), "Nature": np.array(["a"] * n, dtype=object)},
           driver="ESRI Shapefile", gtype="LineString", crs=crs)
    return sorted(p for p in directory.iterdir() if p.stem == name)


# --- names ----------------------------------------------------------------------------------------


def test_names_are_normalised_as_the_platform_does():
    assert normalise("Équipements-Publics") == "equipements_publics"
    assert normalise("zones bâties") == "zones_baties"
    assert normalise("2020 Données") == "_2020_donnees"
    assert normalise("Surface m²") == "surface_m2"
    assert normalise("€€") == "column"
    assert len(normalise("é" * 200)) == MAX_LENGTH
    assert normalise_all(["Route", "route", "ROUTE"]) == ["route", "route_2", "route_3"]
    assert normalise_all(["fid", "Geom"], taken={"fid", "geom"}) == ["fid_2", "geom_2"]
    long = ["x" * 70, "x" * 80]
    out = normalise_all(long)
    assert out[0] != out[1] and all(len(n) <= MAX_LENGTH for n in out)


# --- the check ------------------------------------------------------------------------------------


def test_geopackage_with_two_tables(tmp_path):
    pts, polys = _geopackage(tmp_path / "lot.gpkg")
    report = check_delivery([tmp_path / "lot.gpkg"], "EPSG:2154", tmp_path / "work", names=["data/lot.gpkg"])
    assert report.ok, report.problems
    layers = {layer.table: layer for layer in report.layers}
    assert set(layers) == {"equipements_publics", "zones_baties"}
    eq = layers["equipements_publics"]
    assert eq.count == 120 and eq.geometry_type == "Point" and eq.srs == "EPSG:2154"
    assert {a.name: a.type for a in eq.attributes} == {"nom_commune": "string", "population": "integer"}
    assert eq.source == "data/lot.gpkg" and eq.name == "Équipements-Publics"
    np.testing.assert_allclose(eq.extent, shapely.total_bounds(pts))
    zb = layers["zones_baties"]
    assert zb.geometry_type == "Polygon" and zb.count == 30
    assert [a.name for a in zb.attributes] == ["surface_m2"] and zb.attributes[0].type == "real"
    t = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True)
    np.testing.assert_allclose(zb.extent_4326, t.transform_bounds(*shapely.total_bounds(polys), densify_pts=21))
    assert report.extent[0] <= min(eq.extent_4326[0], zb.extent_4326[0])


def test_shapefile_siblings_pushed_one_by_one_or_zipped(tmp_path):
    shp = tmp_path / "shp"
    shp.mkdir()
    files = _shapefile(shp)
    assert {p.suffix for p in files} >= {".shp", ".shx", ".dbf", ".prj"}
    loose = check_delivery(files, "EPSG:2154", tmp_path / "w1")
    assert loose.ok, loose.problems
    assert [(layer.table, layer.count, layer.geometry_type) for layer in loose.layers] == [("routes", 40, "LineString")]
    archive = tmp_path / "routes.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in files:
            zf.write(p, f"export/{p.name}")
    zipped = check_delivery([archive], "EPSG:2154", tmp_path / "w2")
    assert zipped.ok, zipped.problems
    assert zipped.layers[0].count == 40 and zipped.layers[0].extent == loose.layers[0].extent
    assert zipped.layers[0].source == f"{archive}!export/routes.shp"
    # a shapefile without its .dbf is refused, naming what is missing
    partial = check_delivery([p for p in files if p.suffix != ".dbf"], "EPSG:2154", tmp_path / "w3")
    assert not partial.ok and any("routes.shp" in p and ".dbf" in p for p in partial.problems)


def test_geojson_and_csv_deliveries(tmp_path):
    pts = shapely.points(RNG.uniform(2, 3, 5), RNG.uniform(48, 49, 5))
    _write(tmp_path / "sites.geojson", pts, {"nom": np.array(list("abcde"), dtype=object)}, driver="GeoJSON",
           crs="EPSG:4326")
    rows = [f'"{shapely.to_wkt(p)}",{i},{i * 1.5},nom {i}' for i, p in enumerate(pts)]
    (tmp_path / "wkt.csv").write_text("WKT,id,valeur,nom\n" + "\n".join(rows) + "\n")
    lonlat = [f"{p.x};{p.y};{i};2024-01-0{i + 1}" for i, p in enumerate(pts)]
    (tmp_path / "lonlat.csv").write_text("lon;lat;code;jour\n" + "\n".join(lonlat) + "\n")
    (tmp_path / "lonlat.csvt").write_text("Real,Real,String,Date\n")
    files = [tmp_path / n for n in ("sites.geojson", "wkt.csv", "lonlat.csv", "lonlat.csvt")]
    report = check_delivery(files, "EPSG:4326", tmp_path / "work")
    assert report.ok, report.problems
    layers = {layer.table: layer for layer in report.layers}
    assert set(layers) == {"sites", "wkt", "lonlat"}
    for layer in layers.values():
        assert layer.count == 5 and layer.geometry_type == "Point" and layer.srs == "EPSG:4326"
        np.testing.assert_allclose(layer.extent, shapely.total_bounds(pts), atol=1e-6)  # GeoJSON: 7 decimals
    assert {a.name: a.type for a in layers["wkt"].attributes} == {"id": "integer", "valeur": "real", "nom": "string"}
    # the .csvt makes `code` a string (autodetection would make it an integer)
    assert {a.name: a.type for a in layers["lonlat"].attributes} == {"code": "string", "jour": "date"}
    # a CSV carries no CRS: without a declared srs the check fails
    bare = check_delivery([tmp_path / "wkt.csv"], None, tmp_path / "w2")
    assert not bare.ok and "no CRS" in bare.problems[0]


def test_shapefile_truncated_by_one_byte_fails(tmp_path):
    polys = shapely.buffer(_points(50), 30.0)
    _write(tmp_path / "canton.shp", polys, {"code": np.arange(50)}, driver="ESRI Shapefile", gtype="Polygon")
    files = sorted(tmp_path.glob("canton.*"))
    assert check_delivery(files, "EPSG:2154", tmp_path / "w0").ok
    shp = tmp_path / "canton.shp"
    os.truncate(shp, shp.stat().st_size - 1)
    # GDAL alone reads the file "fine": the last polygon comes back as a null geometry
    _, _, geoms, _ = pyogrio.raw.read(shp)
    assert len(geoms) == 50 and geoms[-1] is None
    report = check_delivery(files, "EPSG:2154", tmp_path / "w1", names=[f"data/{p.name}" for p in files])
    assert not report.ok
    assert len(report.problems) == 1 and report.problems[0].startswith("data/canton.shp")
    assert "fread" in report.problems[0]


def test_crs_other_than_the_upload_srs_fails_naming_both(tmp_path):
    files = _shapefile(tmp_path, "wgs", crs="EPSG:4326")
    report = check_delivery(files, "EPSG:2154", tmp_path / "work")
    assert not report.ok
    assert "EPSG:4326" in report.problems[0] and "EPSG:2154" in report.problems[0] and "wgs.shp" in report.problems[0]
    assert check_delivery(files, "EPSG:4326", tmp_path / "w2").ok


def test_zip_members_may_not_escape_and_the_uncompressed_total_is_bounded(tmp_path, monkeypatch):
    _geopackage(tmp_path / "lot.gpkg")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.write(tmp_path / "lot.gpkg", "../../escaped.gpkg")
        zf.writestr(zipfile.ZipInfo("/abs/escaped.gpkg"), (tmp_path / "lot.gpkg").read_bytes())
    report = check_delivery([evil], "EPSG:2154", tmp_path / "work")
    assert not report.ok and sum("escapes" in p for p in report.problems) == 2
    assert not list(tmp_path.rglob("escaped.gpkg"))

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.csv", b"0" * 5_000_000)
    assert bomb.stat().st_size < 50_000
    monkeypatch.setattr(delivery, "MAX_UNCOMPRESSED", 1_000_000)
    report = check_delivery([bomb], "EPSG:2154", tmp_path / "w2")
    assert not report.ok and "more than 1000000 bytes" in report.problems[0]
    assert sum(f.stat().st_size for f in (tmp_path / "w2").rglob("*") if f.is_file()) <= 1_000_000 + (1 << 20)


def test_unsupported_and_orphan_files_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "orphan.dbf").write_bytes(b"")
    report = check_delivery([tmp_path / "notes.txt", tmp_path / "orphan.dbf"], "EPSG:2154", tmp_path / "w")
    assert not report.ok
    assert any("notes.txt" in p for p in report.problems) and any("orphan.dbf" in p for p in report.problems)


# --- integration --------------------------------------------------------------------------------


def test_integration_normalises_reprojects_and_indexes(tmp_path):
    pts, polys = _geopackage(tmp_path / "lot.gpkg")
    report = check_delivery([tmp_path / "lot.gpkg"], "EPSG:2154", tmp_path / "work")
    base = tmp_path / "base.gpkg"
    result = integrate(report, base, srs="EPSG:4326")
    relations = {r.name: r for r in result.relations}
    assert set(relations) == {"equipements_publics", "zones_baties"}
    eq = relations["equipements_publics"]
    assert eq.srs == "EPSG:4326" and eq.primary_key == ("fid",) and eq.count == 120 and eq.type == "TABLE"
    assert [(a.name, a.type) for a in eq.attributes] == [("nom_commune", "string"), ("population", "integer")]
    assert result.size == base.stat().st_size and result.srs == "EPSG:4326"

    # coordinates as pyproj computes them, independently; GDAL reads the file back
    info, fids, geoms, fields = pyogrio.raw.read(base, layer="equipements_publics", return_fids=True)
    assert info["crs"] == "EPSG:4326"
    t = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True)
    expected = np.column_stack(t.transform(shapely.get_x(pts), shapely.get_y(pts)))
    got = shapely.get_coordinates(shapely.from_wkb(geoms))
    np.testing.assert_allclose(got[np.argsort(fids)], expected[np.argsort(np.arange(1, 121))], rtol=0, atol=1e-9)
    assert list(fields[1][np.argsort(fids)]) == list(np.arange(120) * 10)

    con = sqlite3.connect(base)
    for table in relations:
        rtree = f"rtree_{table}_geom"
        assert con.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (rtree,)).fetchone()[0] == 1
        assert con.execute(f'SELECT count(*) FROM "{rtree}"').fetchone()[0] == relations[table].count
    assert con.execute("SELECT count(*) FROM gpkg_extensions WHERE extension_name = 'gpkg_rtree_index'").fetchone()[0] == 2
    con.close()
    # GDAL uses the index: its bbox read agrees with a brute-force test
    x0, y0 = t.transform(655_000, 6_865_000)
    box = (x0 - 0.02, y0 - 0.02, x0 + 0.02, y0 + 0.02)
    _, _, hits, _ = pyogrio.raw.read(base, layer="equipements_publics", bbox=box)
    all_points = shapely.from_wkb(geoms)
    assert len(hits) == int(shapely.intersects(all_points, shapely.box(*box)).sum())
    with pytest.raises(IntegrationError):
        integrate(report, base)  # never overwrites a base


def test_shapefile_integration_keeps_a_fid_column_as_key_and_refuses_duplicates(tmp_path):
    pts = _points(10)
    _write(tmp_path / "pois.shp", pts, {"FID": np.arange(100, 110), "nom": np.array(list("abcdefghij"), dtype=object)},
           driver="ESRI Shapefile")
    files = sorted(tmp_path.glob("pois.*"))
    report = check_delivery(files, "EPSG:2154", tmp_path / "w")
    assert report.ok and report.layers[0].key_field == "FID"
    result = integrate(report, tmp_path / "base.gpkg")
    assert [a.name for a in result.relations[0].attributes] == ["nom"]
    con = sqlite3.connect(tmp_path / "base.gpkg")
    assert [r[0] for r in con.execute("SELECT fid FROM pois ORDER BY fid")] == list(range(100, 110))
    con.close()

    _write(tmp_path / "dup.shp", pts, {"fid": np.array([1] * 10)}, driver="ESRI Shapefile")
    dup = check_delivery(sorted(tmp_path.glob("dup.*")), "EPSG:2154", tmp_path / "w2")
    with pytest.raises(IntegrationError, match="dup"):
        integrate(dup, tmp_path / "dup.gpkg")
    assert not (tmp_path / "dup.gpkg").exists() and not list(tmp_path.glob("*.part.gpkg"))


def test_update_and_delete_files(tmp_path):
    pts = _points(20)
    _write(tmp_path / "roads.gpkg", pts, {"nom": np.array([f"r{i}" for i in range(20)], dtype=object),
                                          "fid": np.arange(1, 21)}, layer="roads", driver="GPKG")
    report = check_delivery([tmp_path / "roads.gpkg"], "EPSG:2154", tmp_path / "w1")
    base = tmp_path / "base.gpkg"
    integrate(report, base)

    # update: fid 3 moves and is renamed, fid 50 is new
    moved = shapely.points([[700_000, 6_900_000], [701_000, 6_901_000]])
    changes = tmp_path / "changes"
    changes.mkdir()
    _write(changes / "roads.update.gpkg", moved, {"nom": np.array(["moved", "new"], dtype=object),
                                                  "fid": np.array([3, 50])}, layer="roads", driver="GPKG")
    (changes / "roads.delete.csv").write_text("fid\n5\n6\n")
    files = sorted(changes.iterdir())
    report = check_delivery(files, "EPSG:2154", tmp_path / "w2")
    assert report.ok, report.problems
    assert {(layer.table, layer.role) for layer in report.layers} == {("roads", "update"), ("roads", "delete")}
    result = apply_changes(report, base)
    assert result.relations[0].count == 20 - 2 + 1

    con = sqlite3.connect(base)
    rows = {fid: nom for fid, nom in con.execute("SELECT fid, nom FROM roads")}
    assert rows[3] == "moved" and rows[50] == "new" and 5 not in rows and 6 not in rows and rows[4] == "r3"
    rtree = {r[0]: r[1:] for r in con.execute("SELECT id, minx, maxx, miny, maxy FROM rtree_roads_geom")}
    assert set(rtree) == set(rows)
    assert rtree[50][0] == pytest.approx(701_000, abs=0.1) and rtree[3][2] == pytest.approx(6_900_000, abs=0.1)
    minx, maxy = con.execute("SELECT min_x, max_y FROM gpkg_contents WHERE table_name = 'roads'").fetchone()
    assert maxy == pytest.approx(6_901_000, abs=1)
    con.close()
    # GDAL still reads the changed table, including the upserted geometry
    _, fids, geoms, _ = pyogrio.raw.read(base, layer="roads", return_fids=True)
    by_fid = dict(zip(fids.tolist(), shapely.from_wkb(geoms), strict=True))
    assert by_fid[3].equals(moved[0]) and by_fid[50].equals(moved[1])

    # a change set naming an unknown column changes nothing
    _write(changes / "roads.update.gpkg", moved, {"surprise": np.array([1, 2]), "fid": np.array([1, 2])},
           layer="roads", driver="GPKG")
    bad = check_delivery([changes / "roads.update.gpkg"], "EPSG:2154", tmp_path / "w3")
    with pytest.raises(IntegrationError, match="surprise"):
        apply_changes(bad, base)
    con = sqlite3.connect(base)
    assert con.execute("SELECT count(*) FROM roads").fetchone()[0] == 19
    con.close()
