"""A vector base held in one GeoPackage file, read with the standard library's sqlite3.

Queries become one SQL statement each, so that counting, sorting and paging stay in SQLite and a
page of a million-row table reads only that page:
* a bbox (or a spatial predicate of the filter) joins the GeoPackage R-tree `rtree_<t>_<g>`
  (`fid IN (SELECT id FROM rtree … WHERE minx <= ? …)`, which SQLite drives as rowid lookups), then
  the exact test runs in SQL through a Python function on the candidates only (shapely, the literal
  geometry prepared once per connection), so OFFSET/LIMIT and count() agree with the exact answer;
* the pygeofilter AST becomes a WHERE clause written here rather than by pygeofilter's SQL backend,
  which inlines literals as text (an injection) and emits PostGIS functions SQLite lacks. Values are
  always bound parameters; identifiers are the relation's own columns, checked, then quoted;
* LIKE runs as a Python regular expression (SQLite's LIKE folds only ASCII case and its GLOB has no
  case-insensitive form, so neither gives CQL's semantics for "Île-de-France").

Threads: a `GeoPackageBase` may be shared. Every `features()`/`count()` call takes a connection of
its own from a small pool (read-only, `mode=ro`, `check_same_thread=False`) and gives it back when
the iteration ends, so a generator can be advanced from different threads one step at a time (as
Starlette's `iterate_in_threadpool` does), but one generator must not be advanced by two threads at
once. Relations are read once at open: a base changed by `integrate.apply_changes` is reopened.
Dates and datetimes come back as the ISO text GeoPackage stores.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import shapely
from pygeofilter import ast, values
from pyproj import CRS

from tileserver.vector import gpkgbinary
from tileserver.vector.base import (
    Attribute,
    Feature,
    Query,
    QueryError,
    Relation,
    UnknownRelation,
    integer_keys,
    query_box,
)

FETCH = 1000  # rows per fetchmany: features stream out a page at a time
POOL = 8  # idle connections kept per base

_SQL_TYPES = {
    "INTEGER": "integer", "INT": "integer", "MEDIUMINT": "integer", "SMALLINT": "integer", "TINYINT": "integer",
    "BOOLEAN": "boolean", "REAL": "real", "FLOAT": "real", "DOUBLE": "real", "TEXT": "string",
    "DATE": "date", "DATETIME": "datetime", "BLOB": "binary",
}
_GEOMETRY_TYPES = {
    "GEOMETRY": "Geometry", "POINT": "Point", "LINESTRING": "LineString", "POLYGON": "Polygon",
    "MULTIPOINT": "MultiPoint", "MULTILINESTRING": "MultiLineString", "MULTIPOLYGON": "MultiPolygon",
    "GEOMETRYCOLLECTION": "GeometryCollection",
}


def quote(identifier: str) -> str:
    """An SQL identifier, double-quoted (GeoPackage names may hold any character)."""
    return '"' + identifier.replace('"', '""') + '"'


def _column_type(declared: str) -> str:
    base = re.sub(r"\(.*\)", "", declared or "").strip().upper()
    return _SQL_TYPES.get(base, "string")


# --- SQL functions run on candidate rows ---------------------------------------------------------

_SPATIAL: dict[str, Callable[[Any, Any], bool]] = {
    "intersects": shapely.intersects, "disjoint": shapely.disjoint, "contains": shapely.contains,
    "within": shapely.within, "touches": shapely.touches, "crosses": shapely.crosses,
    "overlaps": shapely.overlaps, "equals": shapely.equals,
}


class _Functions:
    """Python functions registered on one connection; literals decoded and prepared once."""

    def __init__(self) -> None:
        self._literals: dict[bytes, Any] = {}
        self._patterns: dict[tuple[str, int], re.Pattern[str]] = {}

    def _literal(self, wkb: bytes) -> Any:
        geom = self._literals.get(wkb)
        if geom is None:
            if len(self._literals) > 64:
                self._literals.clear()
            geom = shapely.from_wkb(wkb)
            shapely.prepare(geom)
            self._literals[wkb] = geom
        return geom

    def spatial(self, blob: bytes | None, op: str, wkb: bytes) -> int:
        if blob is None:
            return 0
        geom = gpkgbinary.decode(blob)
        if geom is None or geom.is_empty:
            return 0
        # the literal is the prepared operand: a op b == inverse(b, a)
        literal = self._literal(wkb)
        return int(_SPATIAL[_INVERSE[op]](literal, geom))

    def dwithin(self, blob: bytes | None, wkb: bytes, distance: float) -> int:
        if blob is None:
            return 0
        geom = gpkgbinary.decode(blob)
        return int(geom is not None and not geom.is_empty and shapely.dwithin(self._literal(wkb), geom, distance))

    def relate(self, blob: bytes | None, wkb: bytes, pattern: str) -> int:
        if blob is None:
            return 0
        geom = gpkgbinary.decode(blob)
        return int(geom is not None and shapely.relate_pattern(geom, shapely.from_wkb(wkb), pattern))

    def like(self, value: Any, pattern: str, nocase: int) -> int | None:
        if value is None:
            return None
        regex = self._patterns.get((pattern, nocase))
        if regex is None:
            regex = re.compile(pattern, re.DOTALL | (re.IGNORECASE if nocase else 0))
            self._patterns[(pattern, nocase)] = regex
        return int(regex.fullmatch(str(value)) is not None)

    def register(self, con: sqlite3.Connection) -> None:
        con.create_function("ts_spatial", 3, self.spatial, deterministic=True)
        con.create_function("ts_dwithin", 3, self.dwithin, deterministic=True)
        con.create_function("ts_relate", 3, self.relate, deterministic=True)
        con.create_function("ts_like", 3, self.like, deterministic=True)


_INVERSE = {"intersects": "intersects", "disjoint": "disjoint", "contains": "within", "within": "contains",
            "touches": "touches", "crosses": "crosses", "overlaps": "overlaps", "equals": "equals"}
_SWAP = {"contains": "within", "within": "contains"}  # when the literal is written first


def like_regex(pattern: str, wildcard: str, singlechar: str, escapechar: str | None) -> str:
    """A CQL/FES LIKE pattern as a Python regular expression matched against the whole value."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if escapechar and c == escapechar and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if c == wildcard else "." if c == singlechar else re.escape(c))
        i += 1
    return "".join(out)


# --- filter → SQL --------------------------------------------------------------------------------


class _Translator:
    """One pygeofilter AST as (WHERE text, parameters) for one relation."""

    def __init__(self, relation: Relation, rtree: str | None) -> None:
        self.relation = relation
        self.rtree = rtree
        self.columns = {a.name for a in relation.attributes} | set(relation.primary_key)
        self.params: list[Any] = []

    def where(self, node: Any) -> str:
        return self._condition(node)

    def _bind(self, value: Any) -> str:
        """A numbered placeholder: the text may be assembled in any order (`?` counts on from these)."""
        self.params.append(value)
        return f"?{len(self.params)}"

    def _attribute(self, name: str) -> str:
        if name not in self.columns:
            raise QueryError(f"unknown attribute {name!r} in filter on {self.relation.name!r}")
        return quote(name)

    def _is_geometry(self, node: Any) -> bool:
        return isinstance(node, ast.Attribute) and node.name == self.relation.geometry_column

    def _scalar(self, node: Any) -> str:
        if isinstance(node, ast.Attribute):
            if self._is_geometry(node):
                raise QueryError(f"the geometry {node.name!r} is only usable in spatial operators")
            return self._attribute(node.name)
        if isinstance(node, ast.Arithmetic):
            op = {ast.ArithmeticOp.ADD: "+", ast.ArithmeticOp.SUB: "-", ast.ArithmeticOp.MUL: "*",
                  ast.ArithmeticOp.DIV: "/"}[node.op]
            return f"({self._scalar(node.lhs)} {op} {self._scalar(node.rhs)})"
        if isinstance(node, bool):
            return self._bind(int(node))
        if isinstance(node, int | float | str):
            return self._bind(node)
        if isinstance(node, dt.datetime):
            value = node.astimezone(dt.UTC) if node.tzinfo else node
            return self._bind(value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z")
        if isinstance(node, dt.date):
            return self._bind(node.isoformat())
        raise QueryError(f"unsupported expression in filter: {type(node).__name__}")

    def _geometry_literal(self, node: Any) -> Any:
        if isinstance(node, values.Geometry):
            try:
                return shapely.geometry.shape(node.geometry)
            except (ValueError, TypeError, shapely.errors.GEOSException) as e:
                raise QueryError(f"invalid geometry in filter: {e}") from e
        if isinstance(node, values.Envelope):
            return shapely.box(node.x1, node.y1, node.x2, node.y2)
        raise QueryError(f"spatial operators compare the geometry with a literal, not {type(node).__name__}")

    def _prefilter(self, bounds: tuple[float, float, float, float]) -> str:
        """R-tree candidates of an envelope: the part SQLite answers from the index."""
        if self.rtree is None:
            return "1"
        minx, miny, maxx, maxy = bounds
        pk = quote(self.relation.primary_key[0])
        return (f"{pk} IN (SELECT id FROM {quote(self.rtree)} WHERE minx <= {self._bind(float(maxx))} AND "
                f"maxx >= {self._bind(float(minx))} AND miny <= {self._bind(float(maxy))} AND "
                f"maxy >= {self._bind(float(miny))})")

    def _inside(self, bounds: tuple[float, float, float, float]) -> str:
        """Rows whose R-tree box lies inside an envelope. The R-tree rounds boxes outwards, so such a
        (non-empty) geometry lies inside the envelope too: it intersects the envelope for sure."""
        minx, miny, maxx, maxy = bounds
        pk = quote(self.relation.primary_key[0])
        return (f"{pk} IN (SELECT id FROM {quote(self.rtree or '')} WHERE minx >= {self._bind(float(minx))} AND "
                f"maxx <= {self._bind(float(maxx))} AND miny >= {self._bind(float(miny))} AND "
                f"maxy <= {self._bind(float(maxy))})")

    def _geometry(self) -> str:
        """The quoted geometry column; a spatial filter on a table without one is the client's error."""
        if self.relation.geometry_column is None:
            raise QueryError(f"{self.relation.name} has no geometry: spatial filters do not apply")
        return quote(self.relation.geometry_column)

    def spatial(self, op: str, geom: Any) -> str:
        g = self._geometry()
        wkb = shapely.to_wkb(geom)
        test = f"ts_spatial({g}, {self._bind(op)}, {self._bind(wkb)})"
        if op == "disjoint" or geom.is_empty:
            return test
        if op == "intersects" and self.rtree is not None and _is_rectangle(geom):
            # a bbox: only candidates crossing its edge need the exact test (decoding the blob in
            # Python), which SQLite's OR skips for the others; most of a bbox read's cost otherwise
            test = f"({self._inside(geom.bounds)} OR {test})"
        return f"({self._prefilter(geom.bounds)} AND {test})"

    def _spatial_operands(self, node: Any, op: str) -> tuple[str, Any]:
        if self._is_geometry(node.lhs):
            return op, self._geometry_literal(node.rhs)
        if self._is_geometry(node.rhs):
            return _SWAP.get(op, op), self._geometry_literal(node.lhs)
        name = node.lhs.name if isinstance(node.lhs, ast.Attribute) else None
        raise QueryError(f"spatial operators apply to the geometry {self.relation.geometry_column!r}"
                         + (f", not {name!r}" if name else ""))

    def _check_crs(self, crs: str | None) -> None:
        if crs and not CRS.from_user_input(crs).equals(CRS.from_user_input(self.relation.srs), ignore_axis_order=True):
            raise QueryError(f"BBOX in {crs}: give it in {self.relation.srs}")

    def _condition(self, node: Any) -> str:
        if self.relation.geometry_column is None and isinstance(
                node, ast.SpatialComparisonPredicate | ast.BBox | ast.SpatialDistancePredicate | ast.Relate):
            raise QueryError(f"{self.relation.name!r} has no geometry")
        if isinstance(node, ast.And | ast.Or):
            return f"({self._condition(node.lhs)} {node.op.value} {self._condition(node.rhs)})"
        if isinstance(node, ast.Not):
            return f"(NOT coalesce({self._condition(node.sub_node)}, 0))"
        if isinstance(node, ast.Include):
            return "0" if node.not_ else "1"
        if isinstance(node, ast.Comparison):
            op = {ast.ComparisonOp.EQ: "=", ast.ComparisonOp.NE: "<>", ast.ComparisonOp.LT: "<",
                  ast.ComparisonOp.LE: "<=", ast.ComparisonOp.GT: ">", ast.ComparisonOp.GE: ">="}[node.op]
            return f"({self._scalar(node.lhs)} {op} {self._scalar(node.rhs)})"
        if isinstance(node, ast.Between):
            return (f"({self._scalar(node.lhs)} {'NOT ' if node.not_ else ''}BETWEEN "
                    f"{self._scalar(node.low)} AND {self._scalar(node.high)})")
        if isinstance(node, ast.Like):
            if not isinstance(node.pattern, str):
                raise QueryError("LIKE takes a text pattern")
            regex = like_regex(node.pattern, node.wildcard, node.singlechar, node.escapechar)
            test = f"ts_like({self._scalar(node.lhs)}, {self._bind(regex)}, {self._bind(int(node.nocase))})"
            return f"(NOT {test})" if node.not_ else test
        if isinstance(node, ast.In):
            options = ", ".join(self._scalar(option) for option in node.sub_nodes)
            return f"({self._scalar(node.lhs)} {'NOT ' if node.not_ else ''}IN ({options}))"
        if isinstance(node, ast.IsNull):
            return f"({self._scalar(node.lhs)} IS {'NOT ' if node.not_ else ''}NULL)"
        if isinstance(node, ast.BBox):
            if not self._is_geometry(node.lhs):
                raise QueryError(f"BBOX applies to the geometry {self.relation.geometry_column!r}")
            self._check_crs(node.crs)
            return self.spatial("intersects", shapely.box(node.minx, node.miny, node.maxx, node.maxy))
        if isinstance(node, ast.SpatialComparisonPredicate):
            op, geom = self._spatial_operands(node, node.op.value.lower())
            return self.spatial(op, geom)
        if isinstance(node, ast.SpatialDistancePredicate):
            _, geom = self._spatial_operands(node, "intersects")
            d = float(node.distance)
            g = self._geometry()
            test = f"ts_dwithin({g}, {self._bind(shapely.to_wkb(geom))}, {self._bind(d)})"
            if node.op == ast.SpatialDistanceOp.BEYOND:
                return f"(NOT {test})"
            minx, miny, maxx, maxy = geom.bounds
            return f"({self._prefilter((minx - d, miny - d, maxx + d, maxy + d))} AND {test})"
        if isinstance(node, ast.Relate):
            _, geom = self._spatial_operands(node, "intersects")
            if not re.fullmatch(r"[TF012*]{9}", str(node.pattern)):
                raise QueryError(f"invalid RELATE pattern {node.pattern!r}")
            return (f"ts_relate({self._geometry()}, {self._bind(shapely.to_wkb(geom))}, "
                    f"{self._bind(str(node.pattern))})")
        raise QueryError(f"unsupported filter operator: {type(node).__name__}")


def _is_rectangle(geom: Any) -> bool:
    """An axis-aligned rectangle (a BBOX, an envelope literal): it covers its whole envelope."""
    return geom.geom_type == "Polygon" and bool(shapely.equals(geom, shapely.box(*geom.bounds)))


# --- the base ------------------------------------------------------------------------------------


class GeoPackageBase:
    """The VectorBase protocol over one GeoPackage file (see the module docstring for threads)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(self.path)
        self._uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False
        con = self._acquire()
        try:
            self._relations, self._rtrees = self._read_relations(con)
        finally:
            self._release(con)

    # connections
    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
        con.execute("PRAGMA query_only = ON")
        _Functions().register(con)
        return con

    def _acquire(self) -> sqlite3.Connection:
        with self._lock:
            if self._closed:
                raise RuntimeError("the base is closed")
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _release(self, con: sqlite3.Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < POOL:
                self._idle.append(con)
                return
        con.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for con in idle:
            con.close()

    # schema
    def _read_relations(self, con: sqlite3.Connection) -> tuple[dict[str, Relation], dict[str, str | None]]:
        relations: dict[str, Relation] = {}
        rtrees: dict[str, str | None] = {}
        names = {row[0] for row in con.execute("SELECT name FROM sqlite_master")}
        kinds = dict(con.execute("SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view')").fetchall())
        geometry = {row[0]: row[1:] for row in con.execute(
            "SELECT table_name, column_name, geometry_type_name, srs_id FROM gpkg_geometry_columns")}
        srs = {row[0]: row[1:] for row in con.execute(
            "SELECT srs_id, organization, organization_coordsys_id, definition FROM gpkg_spatial_ref_sys")}
        counts = {}
        if "gpkg_ogr_contents" in names:
            counts = dict(con.execute("SELECT table_name, feature_count FROM gpkg_ogr_contents").fetchall())
        for table, _data_type, minx, miny, maxx, maxy, srs_id in con.execute(
                "SELECT table_name, data_type, min_x, min_y, max_x, max_y, srs_id FROM gpkg_contents "
                "WHERE data_type IN ('features', 'attributes')").fetchall():
            if table not in kinds:
                continue
            columns = con.execute(f"PRAGMA table_info({quote(table)})").fetchall()
            pk = tuple(c[1] for c in sorted(columns, key=lambda c: c[5]) if c[5])
            geom_col, geom_type, geom_srs = (geometry.get(table) or (None, None, srs_id))
            attributes = tuple(Attribute(c[1], _column_type(c[2])) for c in columns
                               if c[1] != geom_col and c[1] not in pk)
            org = srs.get(geom_srs if geom_srs is not None else srs_id)
            if org and org[0] and org[1] is not None and org[0].upper() != "NONE":
                srs_text = f"{org[0].upper()}:{org[1]}"
            else:
                srs_text = org[2] if org else ""
            rtree = f"rtree_{table}_{geom_col}" if geom_col else None
            rtrees[table] = rtree if rtree in names else None
            count = counts.get(table)
            if count is None:
                count = con.execute(f"SELECT count(*) FROM {quote(table)}").fetchone()[0]
            extent = (minx, miny, maxx, maxy) if None not in (minx, miny, maxx, maxy) and count else None
            relations[table] = Relation(
                name=table, type="VIEW" if kinds[table] == "view" else "TABLE", geometry_column=geom_col,
                geometry_type=_GEOMETRY_TYPES.get((geom_type or "").upper(), geom_type) if geom_col else None,
                srs=srs_text, attributes=attributes, primary_key=pk or ("rowid",), extent=extent, count=count)
        return relations, rtrees

    def relations(self) -> list[Relation]:
        return list(self._relations.values())

    def relation(self, name: str) -> Relation | None:
        return self._relations.get(name)

    def has_rtree(self, name: str) -> bool:
        return self._rtrees.get(name) is not None

    # queries
    def _relation(self, name: str) -> Relation:
        relation = self._relations.get(name)
        if relation is None:
            raise UnknownRelation(name)
        return relation

    def _where(self, relation: Relation, query: Query) -> tuple[str, list[Any]]:
        t = _Translator(relation, self._rtrees.get(relation.name))
        parts = []
        box = query_box(relation, query)
        if box is not None:
            parts.append(t.spatial("intersects", shapely.box(*box)))
        if query.ids is not None:
            keys = integer_keys(query.ids)
            parts.append(f"{quote(relation.primary_key[0])} IN (SELECT value FROM json_each({t._bind(json.dumps(keys))}))")
        if query.filter is not None:
            parts.append(t.where(query.filter))
        return (" WHERE " + " AND ".join(parts)) if parts else "", t.params

    def count(self, query: Query) -> int:
        relation = self._relation(query.relation)
        where, params = self._where(relation, query)
        con = self._acquire()
        try:
            return con.execute(f"SELECT count(*) FROM {quote(relation.name)}{where}", params).fetchone()[0]
        finally:
            self._release(con)

    def features(self, query: Query) -> Iterator[Feature]:
        relation = self._relation(query.relation)
        known = {a.name for a in relation.attributes}
        props = list(query.properties) if query.properties is not None else [a.name for a in relation.attributes]
        for name in props:
            if name not in known:
                raise QueryError(f"unknown property {name!r} of {relation.name!r}")
        order = []
        for name, ascending in query.sortby:
            if name not in known and name not in relation.primary_key:
                raise QueryError(f"cannot sort {relation.name!r} by {name!r}")
            order.append(f"{quote(name)} {'ASC' if ascending else 'DESC'}")
        pk = relation.primary_key[0]
        order.append(f"{quote(pk)} ASC")  # a total order: pages neither repeat nor skip rows
        if query.offset < 0 or (query.limit is not None and query.limit < 0):
            raise QueryError("offset and limit must not be negative")
        where, params = self._where(relation, query)
        geom = relation.geometry_column
        select = [quote(pk), quote(geom) if geom else "NULL", *(quote(p) for p in props)]
        sql = (f"SELECT {', '.join(select)} FROM {quote(relation.name)}{where} ORDER BY {', '.join(order)} "
               f"LIMIT ? OFFSET ?")
        params += [query.limit if query.limit is not None else -1, query.offset]
        booleans = [i for i, p in enumerate(props) if _type_of(relation, p) == "boolean"]
        return self._stream(sql, params, props, booleans)

    def _stream(self, sql: str, params: list[Any], props: list[str], booleans: list[int]) -> Iterator[Feature]:
        con = self._acquire()
        try:
            cur = con.execute(sql, params)
            while rows := cur.fetchmany(FETCH):
                geoms = gpkgbinary.decode_many([row[1] for row in rows])
                for row, g in zip(rows, geoms, strict=True):
                    values_ = list(row[2:])
                    for i in booleans:
                        if values_[i] is not None:
                            values_[i] = bool(values_[i])
                    yield Feature(row[0], g, dict(zip(props, values_, strict=True)))
            cur.close()
        finally:
            self._release(con)


def _type_of(relation: Relation, name: str) -> str | None:
    for a in relation.attributes:
        if a.name == name:
            return a.type
    return None
