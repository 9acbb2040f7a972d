"""The processing "Intégration de données vecteur livrées en base": a checked delivery into a GeoPackage base.

One base is one GeoPackage file (VECTOR.md §1.3, option A). Every delivered layer becomes one table
named as the platform names it (`names.py`), with the primary key `fid`, the geometry column `geom`
and a GeoPackage R-tree `rtree_<table>_geom`; geometries are reprojected to the processing's `srs`
on the way in when one is given. Features travel in batches of `delivery.BATCH` (read by pyogrio,
written by pyogrio with the index off, then the R-tree is bulk-loaded from the batches' bounds):
memory stays bounded whatever the layer's size, and bulk loading is ~5x faster than letting GDAL's
triggers maintain the R-tree row by row on appends.

Keys. A table's `fid` is, in that order: the delivered integer column named `fid` (any case, any
format); the GeoPackage's own fid (a GeoPackage delivery keeps its producer's keys); otherwise the
row number from 1. Duplicate keys fail the integration.

Change sets (`update`/`delete`), applied by `apply_changes` to an existing base:
* `<table>.update.<ext>` (any vector format; for a GeoPackage, its layers name the tables): every
  feature is upserted by key: a feature whose `fid` exists replaces that row's geometry and the
  attributes the file carries, others are inserted. Its attributes must exist in the table.
* `<table>.delete.<ext>` (typically a CSV with one `fid` column, or a GeoPackage whose fids are
  the keys): the rows with those keys are deleted; other columns and geometries are ignored.
* A plain layer adds a new table; naming an existing table fails (deliver a `.update` instead).
A change set is applied in one SQLite transaction per base: it applies entirely or not at all.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyogrio.raw
import shapely
from numpy.typing import DTypeLike
from pyproj import CRS

from tileserver import transformers
from tileserver.vector import gpkgbinary
from tileserver.vector.base import Relation
from tileserver.vector.delivery import (
    GEOMETRY,
    KEY,
    DeliveryError,
    DeliveryReport,
    Layer,
    iter_batches,
    srs_name,
)
from tileserver.vector.geopackage import GeoPackageBase, quote

_EMPTY_DTYPES: dict[str, DTypeLike] = {"integer": "int64", "real": "float64", "string": object, "boolean": "bool",
                                       "date": "datetime64[D]", "datetime": "datetime64[ms]",
                                       "binary": object}


class IntegrationError(Exception):
    """The delivery cannot be integrated; the message says which layer and why."""


@dataclass
class Integration:
    relations: list[Relation]
    srs: str | None  # the base's CRS when all tables share one
    extent: tuple[float, float, float, float] | None  # EPSG:4326
    size: int  # bytes of the GeoPackage file (of the schema's tables and indexes on PostGIS)


def _reprojector(layer: Layer, srs: str | None) -> tuple[Callable[[np.ndarray], np.ndarray] | None, str]:
    if not srs:
        return None, layer.srs
    source, target = CRS.from_user_input(layer.srs), CRS.from_user_input(srs)
    if source.equals(target, ignore_axis_order=True):
        return None, srs_name(target)
    t = transformers.transformer(source, target)

    def project(coords: np.ndarray) -> np.ndarray:
        out = t.transform(*coords.T)
        return np.column_stack(out)

    def apply(geoms: np.ndarray) -> np.ndarray:
        return shapely.transform(geoms, project, include_z=layer.has_z)

    return apply, srs_name(target)


def _keys(layer: Layer, fids: np.ndarray | None, data: list[np.ndarray], first_row: int, n: int) -> np.ndarray:
    if layer.key_field is not None:
        return np.asarray(data[-1], dtype="int64")
    if layer.persistent_fids and fids is not None:
        return np.asarray(fids, dtype="int64")
    return np.arange(first_row + 1, first_row + n + 1, dtype="int64")


def _columns(layer: Layer) -> list[str]:
    return list(layer.fields) + ([layer.key_field] if layer.key_field else [])


def _geometry_type(layer: Layer) -> str:
    name = layer.geometry_type or "Unknown"
    name = "Unknown" if name == "Geometry" else name
    return name + " Z" if layer.has_z and name != "Unknown" else name


_MULTI = {"Point": shapely.multipoints, "LineString": shapely.multilinestrings, "Polygon": shapely.multipolygons}


def _promote(geoms: np.ndarray, gtype: str) -> np.ndarray:
    """Singles as one-part multis when the table's type is a multi (shapefiles mix them freely)."""
    single = gtype.removeprefix("Multi").removesuffix(" Z")
    make = _MULTI.get(single)
    if make is None:
        return geoms
    mask = shapely.get_type_id(geoms) == {"Point": 0, "LineString": 1, "Polygon": 3}[single]
    if mask.any():
        geoms = geoms.copy()
        geoms[mask] = make(geoms[mask].reshape(-1, 1))
    return geoms


def _write_table(layer: Layer, target: Path, srs: str | None) -> str:
    """Write `layer` as table `layer.table` of `target`, batch by batch; the table's CRS name.

    pyogrio (GDAL) creates the empty table, so that its schema, CRS and GeoPackage metadata are
    GDAL's; the rows then go in through sqlite3 in one transaction, carrying their keys (pyogrio
    cannot set fids when appending) without GDAL's per-row R-tree triggers (built afterwards)."""
    project, table_srs = _reprojector(layer, srs)
    names = [a.name for a in layer.attributes]
    gtype = _geometry_type(layer) if layer.geometry_type else None
    empty = [np.array([], dtype=_EMPTY_DTYPES[a.type]) for a in layer.attributes]
    pyogrio.raw.write(target, None if gtype is None else np.array([], dtype=object),
                      [np.array([], dtype="int64"), *empty], [KEY, *names], layer=layer.table,
                      driver="GPKG", geometry_type=gtype, crs=table_srs,
                      layer_options={"SPATIAL_INDEX": "NO", "FID": KEY, "GEOMETRY_NAME": GEOMETRY})
    con = sqlite3.connect(target, isolation_level=None)
    try:
        srs_id, _ = _srs_id(con, layer.table)
        columns = [KEY, *([GEOMETRY] if gtype else []), *names]
        sql = (f"INSERT INTO {quote(layer.table)} ({', '.join(quote(c) for c in columns)}) "
               f"VALUES ({', '.join('?' * len(columns))})")
        con.execute("BEGIN")
        row = 0
        for fids, geom, data in iter_batches(layer, columns=_columns(layer), fids=True):
            n = len(geom) if geom is not None else len(data[0])
            cols = [_sql_values(a) for a in data[: len(names)]]
            if gtype:
                geoms = shapely.from_wkb(geom)
                if project is not None:
                    geoms = project(geoms)
                if gtype.startswith("Multi"):
                    geoms = _promote(geoms, gtype)
                cols.insert(0, gpkgbinary.encode_many(geoms, srs_id))
            con.executemany(sql, zip(_keys(layer, fids, data, row, n).tolist(), *cols, strict=True))
            row += n
        con.execute("COMMIT")
    except sqlite3.IntegrityError as e:
        raise IntegrationError(f"{layer.source}: layer {layer.name!r}: {e} (duplicate keys?)") from e
    finally:
        if con.in_transaction:
            con.execute("ROLLBACK")
        con.close()
    return table_srs


# --- the R-tree (the triggers are GDAL's, GeoPackage 1.4 Annex F.3) ------------------------------

_TRIGGERS = [
    ('insert', 'AFTER INSERT ON {t} WHEN (new.{g} NOT NULL AND NOT ST_IsEmpty(NEW.{g})) BEGIN INSERT OR REPLACE '
     'INTO {r} VALUES (NEW.{k},ST_MinX(NEW.{g}), ST_MaxX(NEW.{g}),ST_MinY(NEW.{g}), ST_MaxY(NEW.{g})); END'),
    ('update6', 'AFTER UPDATE OF {g} ON {t} WHEN OLD.{k} = NEW.{k} AND (NEW.{g} NOTNULL AND NOT ST_IsEmpty(NEW.{g})) '
     'AND (OLD.{g} NOTNULL AND NOT ST_IsEmpty(OLD.{g})) BEGIN UPDATE {r} SET minx = ST_MinX(NEW.{g}), '
     'maxx = ST_MaxX(NEW.{g}),miny = ST_MinY(NEW.{g}), maxy = ST_MaxY(NEW.{g}) WHERE id = NEW.{k};END'),
    ('update7', 'AFTER UPDATE OF {g} ON {t} WHEN OLD.{k} = NEW.{k} AND (NEW.{g} NOTNULL AND NOT ST_IsEmpty(NEW.{g})) '
     'AND (OLD.{g} ISNULL OR ST_IsEmpty(OLD.{g})) BEGIN INSERT INTO {r} VALUES (NEW.{k},ST_MinX(NEW.{g}), '
     'ST_MaxX(NEW.{g}),ST_MinY(NEW.{g}), ST_MaxY(NEW.{g})); END'),
    ('update2', 'AFTER UPDATE OF {g} ON {t} WHEN OLD.{k} = NEW.{k} AND (NEW.{g} ISNULL OR ST_IsEmpty(NEW.{g})) '
     'BEGIN DELETE FROM {r} WHERE id = OLD.{k}; END'),
    ('update5', 'AFTER UPDATE ON {t} WHEN OLD.{k} != NEW.{k} AND (NEW.{g} NOTNULL AND NOT ST_IsEmpty(NEW.{g})) '
     'BEGIN DELETE FROM {r} WHERE id = OLD.{k}; INSERT OR REPLACE INTO {r} VALUES (NEW.{k},ST_MinX(NEW.{g}), '
     'ST_MaxX(NEW.{g}),ST_MinY(NEW.{g}), ST_MaxY(NEW.{g})); END'),
    ('update4', 'AFTER UPDATE ON {t} WHEN OLD.{k} != NEW.{k} AND (NEW.{g} ISNULL OR ST_IsEmpty(NEW.{g})) '
     'BEGIN DELETE FROM {r} WHERE id IN (OLD.{k}, NEW.{k}); END'),
    ('delete', 'AFTER DELETE ON {t} WHEN old.{g} NOT NULL BEGIN DELETE FROM {r} WHERE id = OLD.{k}; END'),
]


def rtree_name(table: str, geometry: str) -> str:
    return f"rtree_{table}_{geometry}"


def build_rtree(con: sqlite3.Connection, table: str, geometry: str = GEOMETRY, key: str = KEY,
                batch: int = 50_000) -> tuple[float, float, float, float] | None:
    """Bulk-load the GeoPackage R-tree of `table` and install its triggers (inside the caller's
    transaction); the table's exact extent (the R-tree's is rounded outwards to float32)."""
    r = rtree_name(table, geometry)
    con.execute(f"CREATE VIRTUAL TABLE {quote(r)} USING rtree(id, minx, maxx, miny, maxy)")
    cur = con.execute(f"SELECT {quote(key)}, {quote(geometry)} FROM {quote(table)} WHERE {quote(geometry)} IS NOT NULL")
    extent = np.array([np.inf, np.inf, -np.inf, -np.inf])
    while rows := cur.fetchmany(batch):
        ids = np.array([row[0] for row in rows], dtype="int64")
        geoms = gpkgbinary.decode_many([row[1] for row in rows])
        keep = ~shapely.is_empty(geoms) & ~shapely.is_missing(geoms)
        b = shapely.bounds(geoms[keep])
        if len(b):
            extent = np.concatenate([np.minimum(extent[:2], b[:, :2].min(axis=0)),
                                     np.maximum(extent[2:], b[:, 2:].max(axis=0))])
        con.executemany(f"INSERT INTO {quote(r)} VALUES (?, ?, ?, ?, ?)",
                        zip(ids[keep].tolist(), b[:, 0].tolist(), b[:, 2].tolist(), b[:, 1].tolist(),
                            b[:, 3].tolist(), strict=True))
    for suffix, body in _TRIGGERS:
        sql = body.format(t=quote(table), g=quote(geometry), k=quote(key), r=quote(r))
        con.execute(f"CREATE TRIGGER {quote(r + '_' + suffix)} {sql}")
    con.execute("CREATE TABLE IF NOT EXISTS gpkg_extensions (table_name TEXT, column_name TEXT, "
                "extension_name TEXT NOT NULL, definition TEXT NOT NULL, scope TEXT NOT NULL, "
                "CONSTRAINT ge_tce UNIQUE (table_name, column_name, extension_name))")  # GeoPackage 1.4 §2.3.2
    con.execute("INSERT INTO gpkg_extensions (table_name, column_name, extension_name, definition, scope) "
                "VALUES (?, ?, 'gpkg_rtree_index', 'http://www.geopackage.org/spec120/#extension_rtree', "
                "'write-only')", (table, geometry))
    if not np.isfinite(extent).all():
        return None
    minx, miny, maxx, maxy = (float(v) for v in extent)
    return minx, miny, maxx, maxy


def _refresh_extent(con: sqlite3.Connection, table: str, geometry: str = GEOMETRY,
                    extent: tuple[float, float, float, float] | None = None) -> None:
    """gpkg_contents' bounds (readers take them as the layer's extent): exact after a build, from
    the R-tree after changes (float32, rounded outwards: never smaller than the data)."""
    row = extent or con.execute(f"SELECT min(minx), min(miny), max(maxx), max(maxy) "
                                f"FROM {quote(rtree_name(table, geometry))}").fetchone()
    con.execute("UPDATE gpkg_contents SET min_x = ?, min_y = ?, max_x = ?, max_y = ?, "
                "last_change = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE table_name = ?", (*row, table))


def _result(path: Path) -> Integration:
    base = GeoPackageBase(path)
    try:
        relations = base.relations()
    finally:
        base.close()
    return summarise(relations, os.path.getsize(path))


def summarise(relations: list[Relation], size: int) -> Integration:
    """What an integration reports of a base, whatever holds it: its CRS, extent in degrees, size."""
    srss = {r.srs for r in relations}
    extents = []
    for r in relations:
        if r.extent is not None:
            t = transformers.transformer(CRS.from_user_input(r.srs), "EPSG:4326")
            extents.append(t.transform_bounds(*r.extent, densify_pts=21))
    extent = None
    if extents:
        e = np.array(extents)
        extent = (float(e[:, 0].min()), float(e[:, 1].min()), float(e[:, 2].max()), float(e[:, 3].max()))
    return Integration(relations, srss.pop() if len(srss) == 1 else None, extent, size)


def _check(report: DeliveryReport) -> None:
    if not report.ok:
        raise IntegrationError("the delivery did not pass its check: " + "; ".join(report.problems))


def integrate(report: DeliveryReport, target: str | os.PathLike[str], *, srs: str | None = None) -> Integration:
    """A new base at `target` (which must not exist) from the delivery's layers, reprojected to `srs`.

    Written to `<target>.part` and renamed, so `target` is either absent or complete. Change sets
    (`.update`/`.delete`) need an existing base: see `apply_changes`."""
    _check(report)
    target = Path(target)
    if target.exists():
        raise IntegrationError(f"{target} already exists")
    changes = [layer.source for layer in report.layers if layer.role != "load"]
    if changes:
        raise IntegrationError(f"change sets need an existing base: {', '.join(sorted(set(changes)))}")
    part = target.with_name(target.stem + ".part.gpkg")  # GDAL wants the .gpkg extension
    part.unlink(missing_ok=True)
    try:
        for layer in report.layers:
            _write_table(layer, part, srs)
        _finish(part, [layer for layer in report.layers if layer.geometry_type])
        os.replace(part, target)
    except (DeliveryError, pyogrio.errors.DataLayerError, pyogrio.errors.DataSourceError, sqlite3.Error) as e:
        part.unlink(missing_ok=True)
        raise IntegrationError(str(e)) from e
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return _result(target)


def _finish(path: Path, spatial: list[Layer]) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    try:
        gpkgbinary.register_functions(con)
        con.execute("BEGIN")
        for layer in spatial:
            _refresh_extent(con, layer.table, extent=build_rtree(con, layer.table))
        con.execute("COMMIT")
    finally:
        con.close()


def _table_columns(con: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in con.execute(f"PRAGMA table_info({quote(table)})")]


def _srs_id(con: sqlite3.Connection, table: str) -> tuple[int, str | None]:
    row = con.execute("SELECT g.srs_id, s.organization, s.organization_coordsys_id FROM gpkg_geometry_columns g "
                      "JOIN gpkg_spatial_ref_sys s USING (srs_id) WHERE lower(g.table_name) = lower(?)",
                      (table,)).fetchone()
    if row is None:
        return 0, None
    return row[0], f"{row[1].upper()}:{row[2]}" if row[1] else None


def apply_changes(report: DeliveryReport, base_path: str | os.PathLike[str]) -> Integration:
    """Apply the delivery to an existing base: `.update` layers upsert, `.delete` layers delete, plain
    layers add new tables. Upserts and deletes run in one transaction (all or nothing); new tables
    are written first and removed again if the transaction fails."""
    _check(report)
    base_path = Path(base_path)
    con = sqlite3.connect(base_path, isolation_level=None)
    try:
        existing = {row[0] for row in con.execute("SELECT table_name FROM gpkg_contents")}
    finally:
        con.close()
    loads = [layer for layer in report.layers if layer.role == "load"]
    for layer in loads:
        if layer.table in existing:
            raise IntegrationError(f"{layer.source}: table {layer.table!r} already exists in the base "
                                   f"(deliver {layer.table}.update.* to change it)")
    for layer in report.layers:
        if layer.role != "load" and layer.table not in existing:
            raise IntegrationError(f"{layer.source}: the base has no table {layer.table!r}")
    try:
        for layer in loads:
            _write_table(layer, base_path, None)
        con = sqlite3.connect(base_path, isolation_level=None)
        try:
            gpkgbinary.register_functions(con)
            con.execute("BEGIN")
            for layer in loads:
                if layer.geometry_type:
                    _refresh_extent(con, layer.table, extent=build_rtree(con, layer.table))
            changed = set()
            for layer in report.layers:
                if layer.role == "update":
                    _upsert(con, layer)
                elif layer.role == "delete":
                    _delete(con, layer)
                else:
                    continue
                changed.add(layer.table)
            for table in changed:
                if con.execute("SELECT 1 FROM gpkg_geometry_columns WHERE table_name = ?", (table,)).fetchone():
                    _refresh_extent(con, table)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()
    except (DeliveryError, IntegrationError, sqlite3.Error, pyogrio.errors.DataLayerError) as e:
        _drop_tables(base_path, [layer.table for layer in loads])
        if isinstance(e, IntegrationError):
            raise
        raise IntegrationError(str(e)) from e
    return _result(base_path)


def _drop_tables(path: Path, tables: list[str]) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    try:
        for table in tables:
            for meta in ("gpkg_contents", "gpkg_geometry_columns", "gpkg_ogr_contents", "gpkg_extensions"):
                try:
                    con.execute(f"DELETE FROM {meta} WHERE table_name = ?", (table,))
                except sqlite3.OperationalError:
                    pass
            con.execute(f"DROP TABLE IF EXISTS {quote(rtree_name(table, GEOMETRY))}")
            con.execute(f"DROP TABLE IF EXISTS {quote(table)}")
    finally:
        con.close()


def _upsert(con: sqlite3.Connection, layer: Layer) -> None:
    columns = _table_columns(con, layer.table)
    names = [a.name for a in layer.attributes]
    unknown = [n for n in names if n not in columns]
    if unknown:
        raise IntegrationError(f"{layer.source}: table {layer.table!r} has no column {', '.join(unknown)}")
    if layer.key_field is None and not layer.persistent_fids:
        raise IntegrationError(f"{layer.source}: an update needs the keys: a 'fid' column or a GeoPackage")
    srs_id, table_srs = _srs_id(con, layer.table)
    project, _ = _reprojector(layer, table_srs)
    has_geometry = GEOMETRY in columns and layer.geometry_type is not None
    target = [KEY, *([GEOMETRY] if has_geometry else []), *names]
    sets = ", ".join(f"{quote(c)} = excluded.{quote(c)}" for c in target[1:])
    sql = (f"INSERT INTO {quote(layer.table)} ({', '.join(quote(c) for c in target)}) "
           f"VALUES ({', '.join('?' * len(target))}) "
           + (f"ON CONFLICT({quote(KEY)}) DO UPDATE SET {sets}" if sets else f"ON CONFLICT({quote(KEY)}) DO NOTHING"))
    row = 0
    for fids, geom, data in iter_batches(layer, columns=_columns(layer), fids=True):
        n = len(geom) if geom is not None else len(data[0])
        keys = _keys(layer, fids, data, row, n).tolist()
        cols = [_sql_values(a) for a in data[: len(names)]]
        if has_geometry:
            geoms = shapely.from_wkb(geom)
            if project is not None:
                geoms = project(geoms)
            cols.insert(0, [gpkgbinary.encode(g, srs_id) for g in geoms])
        con.executemany(sql, zip(keys, *cols, strict=True))
        row += n


def _sql_values(array: np.ndarray) -> list:
    """Python values sqlite3 binds, as GDAL stores them in a GeoPackage (ISO dates as text)."""
    if np.issubdtype(array.dtype, np.datetime64):
        unit = np.datetime_data(array.dtype)[0]
        text = np.datetime_as_string(array, unit="ms" if unit not in ("D",) else "D")
        return [None if np.isnat(v) else (t + "Z" if unit != "D" else t) for v, t in zip(array, text, strict=True)]
    if array.dtype == bool:
        return [int(v) for v in array]
    if np.issubdtype(array.dtype, np.floating):
        return [None if np.isnan(v) else float(v) for v in array]
    return array.tolist()


def _delete(con: sqlite3.Connection, layer: Layer) -> None:
    if layer.key_field is None and not layer.persistent_fids:
        raise IntegrationError(f"{layer.source}: a delete needs the keys: a 'fid' column or a GeoPackage")
    columns = [layer.key_field] if layer.key_field else []
    for fids, _, data in iter_batches(layer, columns=columns, fids=True):
        keys = np.asarray(data[0] if layer.key_field else fids, dtype="int64").tolist()
        con.executemany(f"DELETE FROM {quote(layer.table)} WHERE {quote(KEY)} = ?", ((k,) for k in keys))
