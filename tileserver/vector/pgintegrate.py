"""The integration of a checked delivery into a PostGIS base: one schema per base (`postgis.py`).

The same tables as in a GeoPackage base (`integrate.py`: the key `fid`, the geometry `geom`, the
delivered attributes, reprojection on the way in, the same key rules and change sets), loaded with
`COPY … FROM STDIN` batch by batch (geometries as hex EWKB, rows adapted by psycopg's C copy),
then a GiST index, ANALYZE, and `ts_relations` (srs, exact extent, count) as gpkg_contents holds
them. A whole integration or change set is one transaction: the base is complete or unchanged.
ogr2ogr/pyogrio cannot be the loader here: the GDAL in pyogrio's wheel has no PostgreSQL driver.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import shapely
from pyproj import CRS

from tileserver.vector.delivery import GEOMETRY, KEY, DeliveryError, DeliveryReport, Layer, iter_batches
from tileserver.vector.geopackage import quote
from tileserver.vector.integrate import (
    Integration,
    IntegrationError,
    _check,
    _columns,
    _geometry_type,
    _keys,
    _promote,
    _reprojector,
    summarise,
)
from tileserver.vector.postgis import META, PostGISBase, connect, split

_PG_TYPES = {"integer": "bigint", "real": "double precision", "string": "text", "boolean": "boolean",
             "date": "date", "datetime": "timestamp", "binary": "bytea"}


def _srid(srs: str) -> int:
    return int(CRS.from_user_input(srs).to_epsg(min_confidence=70) or 0)


def _typmod(gtype: str) -> str:
    name = "Geometry" if gtype.removesuffix(" Z") == "Unknown" else gtype.removesuffix(" Z")
    return name + ("Z" if gtype.endswith(" Z") else "")


def _values(array: np.ndarray) -> list[Any]:
    """Python values psycopg copies (NaT and NaN as NULL)."""
    if np.issubdtype(array.dtype, np.datetime64):
        out = array.astype("datetime64[us]" if np.datetime_data(array.dtype)[0] != "D" else "datetime64[D]")
        return [None if np.isnat(v) else v.item() for v in out]
    if np.issubdtype(array.dtype, np.floating):
        return [None if np.isnan(v) else float(v) for v in array]
    return array.tolist()


def _create(cur: Any, schema: str, layer: Layer, srs: str | None) -> tuple[str, str | None, int]:
    """The empty table of `layer`: (its srs, its typmod or None, its SRID)."""
    _, table_srs = _reprojector(layer, srs)
    gtype = _geometry_type(layer) if layer.geometry_type else None
    srid = _srid(table_srs) if table_srs else 0
    columns = [f"{quote(KEY)} bigint PRIMARY KEY"]
    if gtype:
        columns.append(f"{quote(GEOMETRY)} geometry({_typmod(gtype)}, {srid})")
    columns += [f"{quote(a.name)} {_PG_TYPES[a.type]}" for a in layer.attributes]
    cur.execute(f"CREATE TABLE {quote(schema)}.{quote(layer.table)} ({', '.join(columns)})")
    return table_srs, gtype, srid


def _copy(cur: Any, target: str, layer: Layer, project: Any, gtype: str | None, srid: int,
          names: list[str]) -> None:
    """Every feature of `layer` into `target` (a table or a temporary one) with COPY."""
    columns = [KEY, *([GEOMETRY] if gtype else []), *names]
    row = 0
    with cur.copy(f"COPY {target} ({', '.join(quote(c) for c in columns)}) FROM STDIN") as copy:
        for fids, geom, data in iter_batches(layer, columns=_columns(layer), fids=True):
            n = len(geom) if geom is not None else len(data[0])
            cols = [_values(a) for a in data[: len(names)]]
            if gtype:
                geoms = shapely.from_wkb(geom)
                if project is not None:
                    geoms = project(geoms)
                if gtype.startswith("Multi"):
                    geoms = _promote(geoms, gtype)
                geoms = shapely.set_srid(geoms, srid)
                cols.insert(0, shapely.to_wkb(geoms, hex=True, include_srid=True,
                                              output_dimension=3 if layer.has_z else 2).tolist())
            for values in zip(_keys(layer, fids, data, row, n).tolist(), *cols, strict=True):
                copy.write_row(values)
            row += n


def _index(cur: Any, schema: str, table: str) -> None:
    t = f"{quote(schema)}.{quote(table)}"
    cur.execute(f"CREATE INDEX {quote(table + '_geom_gist')} ON {t} USING gist ({quote(GEOMETRY)})")


def _meta(cur: Any, schema: str) -> None:
    cur.execute(f"CREATE TABLE IF NOT EXISTS {quote(schema)}.{META} (name text PRIMARY KEY, srs text NOT NULL, "
                "min_x double precision, min_y double precision, max_x double precision, "
                "max_y double precision, count bigint NOT NULL)")


def _refresh(cur: Any, schema: str, table: str, srs: str, spatial: bool) -> None:
    """The table's row of ts_relations: exact extent and count, as gpkg_contents after a build."""
    t = f"{quote(schema)}.{quote(table)}"
    cur.execute(f"ANALYZE {t}")
    if spatial:
        cur.execute(f"SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e), n FROM (SELECT ST_Extent("
                    f"{quote(GEOMETRY)}) AS e, count(*) AS n FROM {t}) x")
    else:
        cur.execute(f"SELECT NULL, NULL, NULL, NULL, count(*) FROM {t}")
    minx, miny, maxx, maxy, n = cur.fetchone()
    cur.execute(f"INSERT INTO {quote(schema)}.{META} VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO "
                "UPDATE SET srs = excluded.srs, min_x = excluded.min_x, min_y = excluded.min_y, "
                "max_x = excluded.max_x, max_y = excluded.max_y, count = excluded.count",
                (table, srs, minx, miny, maxx, maxy, n))


def _load(cur: Any, schema: str, layer: Layer, srs: str | None) -> None:
    project, _ = _reprojector(layer, srs)
    table_srs, gtype, srid = _create(cur, schema, layer, srs)
    _copy(cur, f"{quote(schema)}.{quote(layer.table)}", layer, project, gtype, srid,
          [a.name for a in layer.attributes])
    if gtype:
        _index(cur, schema, layer.table)
    _refresh(cur, schema, layer.table, table_srs, gtype is not None)


def _result(url: str) -> Integration:
    base = PostGISBase(url)
    try:
        relations = base.relations()
        with connect(base._conninfo) as con:
            size = con.execute("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN "
                               "pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
                               (base.schema,)).fetchone()[0]
    finally:
        base.close()
    return summarise(relations, int(size))


def _run(url: str, work: Any) -> None:
    import psycopg

    conninfo, schema = split(url)
    try:
        with connect(conninfo) as con, con.cursor() as cur:  # one transaction, committed on success
            work(cur, schema)
    except psycopg.errors.UniqueViolation as e:
        raise IntegrationError(f"{e.diag.message_primary} (duplicate keys?)") from None
    except (psycopg.Error, DeliveryError) as e:
        raise IntegrationError(str(e)) from e


def integrate(report: DeliveryReport, url: str, *, srs: str | None = None) -> Integration:
    """A new base in the schema of `url` (which must not exist) from the delivery's layers."""
    _check(report)
    changes = [layer.source for layer in report.layers if layer.role != "load"]
    if changes:
        raise IntegrationError(f"change sets need an existing base: {', '.join(sorted(set(changes)))}")

    def work(cur: Any, schema: str) -> None:
        if cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone():
            raise IntegrationError(f"schema {schema} already exists")
        cur.execute(f"CREATE SCHEMA {quote(schema)}")
        _meta(cur, schema)
        for layer in report.layers:
            _load(cur, schema, layer, srs)

    _run(url, work)
    return _result(url)


def apply_changes(report: DeliveryReport, url: str) -> Integration:
    """As integrate.apply_changes, in one transaction: `.update` upserts, `.delete` deletes, plain
    layers add tables."""
    _check(report)
    base = PostGISBase(url)
    existing = {r.name: r for r in base.relations()}
    base.close()
    for layer in report.layers:
        if layer.role == "load" and layer.table in existing:
            raise IntegrationError(f"{layer.source}: table {layer.table!r} already exists in the base "
                                   f"(deliver {layer.table}.update.* to change it)")
        if layer.role != "load" and layer.table not in existing:
            raise IntegrationError(f"{layer.source}: the base has no table {layer.table!r}")

    def work(cur: Any, schema: str) -> None:
        _meta(cur, schema)
        for layer in report.layers:
            if layer.role == "load":
                _load(cur, schema, layer, None)
                continue
            if layer.key_field is None and not layer.persistent_fids:
                raise IntegrationError(f"{layer.source}: an {layer.role} needs the keys: a 'fid' column or a "
                                       "GeoPackage")
            relation = existing[layer.table]
            t = f"{quote(schema)}.{quote(layer.table)}"
            if layer.role == "delete":
                columns = [layer.key_field] if layer.key_field else []
                for fids, _, data in iter_batches(layer, columns=columns, fids=True):
                    keys = np.asarray(data[0] if layer.key_field else fids, dtype="int64").tolist()
                    cur.execute(f"DELETE FROM {t} WHERE {quote(KEY)} = ANY(%s::bigint[])", (keys,))
            else:
                names = [a.name for a in layer.attributes]
                known = {a.name for a in relation.attributes}
                unknown = [n for n in names if n not in known]
                if unknown:
                    raise IntegrationError(f"{layer.source}: table {layer.table!r} has no column {', '.join(unknown)}")
                spatial = relation.geometry_column is not None and layer.geometry_type is not None
                project, _ = _reprojector(layer, relation.srs)
                gtype = relation.geometry_type if spatial else None
                srid = _srid(relation.srs) if spatial else 0
                cur.execute(f"CREATE TEMPORARY TABLE ts_changes ON COMMIT DROP AS SELECT * FROM {t} WITH NO DATA")
                _copy(cur, "ts_changes", layer, project, gtype, srid, names)
                target = [KEY, *([GEOMETRY] if spatial else []), *names]
                listed = ", ".join(quote(c) for c in target)
                sets = ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in target[1:])
                cur.execute(f"INSERT INTO {t} ({listed}) SELECT {listed} FROM ts_changes ON CONFLICT ({quote(KEY)}) "
                            + (f"DO UPDATE SET {sets}" if sets else "DO NOTHING"))
                cur.execute("DROP TABLE ts_changes")
            _refresh(cur, schema, layer.table, relation.srs, relation.geometry_column is not None)

    _run(url, work)
    return _result(url)


def drop(url: str) -> None:
    """Remove a base: its schema and everything in it."""
    conninfo, schema = split(url)
    with connect(conninfo) as con:
        con.execute(f"DROP SCHEMA IF EXISTS {quote(schema)} CASCADE")
