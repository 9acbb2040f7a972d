"""Vector bases for the WFS / OGC API Features tests.

`make_gpkg` writes a GeoPackage with pyogrio (GDAL), as the warehouse's integration will. Reading goes
through `tileserver.vector.geopackage.GeoPackageBase` when that module exists; until it lands,
`SqliteBase` below is a TEST DOUBLE of the VectorBase protocol (sqlite3 + shapely + pygeofilter's
native evaluator, everything filtered in Python) installed under that module name.
"""

from __future__ import annotations

import importlib
import sqlite3
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from tileserver.vector.base import Attribute, Feature, Query, Relation

_TYPES = {"INTEGER": "integer", "INT": "integer", "MEDIUMINT": "integer", "SMALLINT": "integer",
          "TINYINT": "integer", "REAL": "real", "DOUBLE": "real", "FLOAT": "real", "TEXT": "string",
          "BOOLEAN": "boolean", "DATE": "date", "DATETIME": "datetime", "BLOB": "binary"}


def _geometry(blob: bytes | None) -> Any:
    if blob is None:
        return None
    flags = blob[3]
    envelope = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}[(flags >> 1) & 7]
    return shapely.from_wkb(bytes(blob[8 + envelope:]))


class SqliteBase:
    """TEST DOUBLE of the VectorBase protocol over one GeoPackage file (read-only)."""

    def __init__(self, path: str) -> None:
        self.path = path
        if not Path(path).is_file():
            raise FileNotFoundError(path)
        self._relations = {r.name: r for r in self._read_relations()}

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)

    def _read_relations(self) -> list[Relation]:
        out = []
        with self._connect() as db:
            rows = db.execute(
                "SELECT c.table_name, g.column_name, g.geometry_type_name, s.organization, s.organization_coordsys_id,"
                " c.min_x, c.min_y, c.max_x, c.max_y FROM gpkg_contents c JOIN gpkg_geometry_columns g"
                " ON g.table_name = c.table_name JOIN gpkg_spatial_ref_sys s ON s.srs_id = g.srs_id"
                " WHERE c.data_type = 'features'").fetchall()
            for table, column, gtype, org, code, *extent in rows:
                info = db.execute(f'PRAGMA table_info("{table}")').fetchall()
                attributes = tuple(Attribute(r[1], _TYPES.get(r[2].split("(")[0].upper(), "string"))
                                   for r in info if r[1] != column and not r[5])
                pk = tuple(r[1] for r in info if r[5])
                count = db.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
                gtype = {"MULTIPOLYGON": "MultiPolygon", "POINT": "Point", "POLYGON": "Polygon",
                         "LINESTRING": "LineString", "MULTILINESTRING": "MultiLineString",
                         "MULTIPOINT": "MultiPoint"}.get(gtype.upper(), "Geometry")
                out.append(Relation(table, "TABLE", column, gtype, f"{org.upper()}:{code}", attributes, pk,
                                    tuple(extent) if None not in extent else None, count))
        return out

    def relations(self) -> list[Relation]:
        return list(self._relations.values())

    def relation(self, name: str) -> Relation | None:
        return self._relations.get(name)

    def _matching(self, query: Query) -> list[Feature]:
        from pygeofilter.backends.native.evaluate import NativeEvaluator

        relation = self._relations[query.relation]
        test = NativeEvaluator(use_getattr=False).evaluate(query.filter) if query.filter is not None else None
        box = shapely.box(*query.bbox) if query.bbox else None
        key = relation.primary_key[0]
        out = []
        with self._connect() as db:
            cursor = db.execute(f'SELECT * FROM "{relation.name}"')
            names = [d[0] for d in cursor.description]
            for row in cursor:
                record = dict(zip(names, row, strict=True))
                geom = _geometry(record.pop(relation.geometry_column))
                fid = record.pop(key)
                if query.ids is not None and fid not in query.ids:
                    continue
                if box is not None and (geom is None or not geom.intersects(box)):
                    continue
                if test is not None and not test({**record, key: fid, relation.geometry_column: geom}):
                    continue
                if query.properties is not None:
                    record = {k: v for k, v in record.items() if k in query.properties}
                out.append(Feature(fid, geom, record))
        for name, ascending in reversed(query.sortby):
            out.sort(key=lambda f: (f.properties.get(name) is None, f.properties.get(name)), reverse=not ascending)
        return out

    def count(self, query: Query) -> int:
        return len(self._matching(query))

    def features(self, query: Query) -> Iterator[Feature]:
        matching = self._matching(query)
        end = None if query.limit is None else query.offset + query.limit
        yield from matching[query.offset:end]

    def close(self) -> None:
        pass


def install_base() -> str:
    """Make `tileserver.vector.geopackage` importable: the real one, else the double. Returns which."""
    try:
        importlib.import_module("tileserver.vector.geopackage")
        return "GeoPackageBase"
    except ModuleNotFoundError:
        module = types.ModuleType("tileserver.vector.geopackage")
        module.GeoPackageBase = SqliteBase  # type: ignore[attr-defined]
        sys.modules["tileserver.vector.geopackage"] = module
        return "SqliteBase (test double)"


def make_gpkg(path: Path) -> Path:
    """`communes`: 37 polygons in EPSG:2154 (names, populations, areas, one null); `gares`: 12 points in
    EPSG:4326."""
    from pyogrio.raw import write

    n = 37
    polygons = [shapely.box(600000 + i * 1000, 6800000 + (i % 5) * 1000, 600800 + i * 1000, 6800800 + (i % 5) * 1000)
                for i in range(n)]
    write(
        path, np.array(shapely.to_wkb(polygons), dtype=object),
        [np.array([f"commune-{i:02d} <&>" if i == 3 else f"commune-{i:02d}" for i in range(n)], dtype=object),
         np.array([(i * 37) % 101 * 100 for i in range(n)], dtype=np.int64),
         np.array([0.64 + i / 8 for i in range(n)], dtype=np.float64)],
        ["nom", "population", "surface"],
        layer="communes", driver="GPKG", geometry_type="Polygon", crs="EPSG:2154",
    )
    points = [shapely.Point(2.0 + i * 0.1, 48.0 + i * 0.05) for i in range(12)]
    write(
        path, np.array(shapely.to_wkb(points), dtype=object),
        [np.array([f"gare {i}" for i in range(12)], dtype=object), np.array([i % 2 == 0 for i in range(12)])],
        ["nom", "ouverte"],
        layer="gares", driver="GPKG", geometry_type="Point", crs="EPSG:4326", append=True,
    )
    return path
