"""A vector base held in one PostgreSQL schema with PostGIS, read with psycopg 3.

Selected when `TILESERVER_VECTOR_DB_URL` is set: each VECTOR-DB stored data is then one schema of
that database (as on the platform), its descriptor URL `postgresql://user@host:port/db#schema`.
The catalog never holds a password: `configure()` (called with the setting by the app and the
execution runner) maps the descriptor's server part back to the full connection URL.

Queries are one SQL statement each, as in `geopackage.py`, with the same semantics:
* a bbox or a spatial predicate is a PostGIS function on the geometry column (`ST_Intersects`,
  `ST_Within`…), which the planner answers from the table's GiST index; the literal geometry is
  bound as WKB with the table's SRID;
* the pygeofilter AST becomes a WHERE clause by the GeoPackage translator, with booleans, LIKE
  (a LIKE/ILIKE pattern with an explicit escape, matched against the value as text) and the
  spatial operators written for PostgreSQL; values are always bound parameters;
* ILIKE folds case as the database's LC_CTYPE does: all of Unicode under a UTF-8 locale (as
  GeoPackage's Python regex does), ASCII only under the C locale;
* NULLs sort first ascending and text sorts by code point (`COLLATE "C"`), as SQLite does, so a
  base answers the same pages on either backend.

Threads: as `GeoPackageBase`, every `features()`/`count()` takes a connection of its own from a
small pool (read-only sessions) and gives it back when the iteration ends; features stream out of
a server-side cursor. Dates and datetimes come back as the ISO text GeoPackage stores.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import shapely
from pygeofilter import ast

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
from tileserver.vector.geopackage import _GEOMETRY_TYPES, _Translator, quote

FETCH = 1000
POOL = 4
META = "ts_relations"  # per schema: srs, exact extent and count of each table, written by integration
ENV = "TILESERVER_VECTOR_DB_URL"
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_configured: dict[str, str] = {}


def is_postgis(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def public_url(url: str) -> str:
    """The connection URL without its password, query or fragment (what the catalog may store)."""
    parts = urllib.parse.urlsplit(url)
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = (urllib.parse.quote(user) + "@" if user else "") + host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(("postgresql", netloc, parts.path, "", ""))


def configure(url: str) -> None:
    """Remember the full connection URL of a vector database (credentials stay in this process)."""
    if url:
        _configured[public_url(url)] = url


def descriptor_url(url: str, schema: str) -> str:
    return f"{public_url(url)}#{schema}"


def new_schema() -> str:
    return "vb_" + uuid.uuid4().hex


def split(descriptor: str) -> tuple[str, str]:
    """(connection URL with credentials, schema) of a descriptor URL."""
    server, _, schema = descriptor.partition("#")
    if not _SCHEMA.fullmatch(schema):
        raise ValueError(f"not a PostGIS base URL (postgresql://…#schema): {descriptor}")
    public = public_url(server)
    full = _configured.get(public)
    if full is None and os.environ.get(ENV) and public_url(os.environ[ENV]) == public:
        full = os.environ[ENV]
    return full or server, schema


def connect(url: str, **kwargs: Any) -> Any:
    import psycopg

    return psycopg.connect(url, **kwargs)


_TYPES = {"smallint": "integer", "integer": "integer", "bigint": "integer", "real": "real",
          "double precision": "real", "numeric": "real", "boolean": "boolean", "date": "date",
          "timestamp without time zone": "datetime", "timestamp with time zone": "datetime", "bytea": "binary"}

_FUNCTIONS = {"intersects": "ST_Intersects", "disjoint": "ST_Disjoint", "contains": "ST_Contains",
              "within": "ST_Within", "touches": "ST_Touches", "crosses": "ST_Crosses",
              "overlaps": "ST_Overlaps", "equals": "ST_Equals"}


def like_pattern(pattern: str, wildcard: str, singlechar: str, escapechar: str | None) -> str:
    """A CQL/FES LIKE pattern as a PostgreSQL LIKE pattern escaped with a backslash."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if escapechar and c == escapechar and i + 1 < len(pattern):
            c = pattern[i + 1]
            out.append("\\" + c if c in "%_\\" else c)
            i += 2
            continue
        out.append("%" if c == wildcard else "_" if c == singlechar else "\\" + c if c in "%_\\" else c)
        i += 1
    return "".join(out)


class _PgTranslator(_Translator):
    """The GeoPackage translator, speaking PostgreSQL: named parameters, booleans, PostGIS."""

    def __init__(self, relation: Relation, srid: int) -> None:
        super().__init__(relation, None)
        self.srid = srid

    def _bind(self, value: Any) -> str:
        self.params.append(value)
        return f"%(p{len(self.params)})s"

    def bound(self) -> dict[str, Any]:
        return {f"p{i + 1}": v for i, v in enumerate(self.params)}

    def _scalar(self, node: Any) -> str:
        if isinstance(node, bool):
            return self._bind(node)
        if isinstance(node, dt.datetime):
            value = node.astimezone(dt.UTC).replace(tzinfo=None) if node.tzinfo else node
            return self._bind(value)
        if isinstance(node, dt.date):
            return self._bind(node)
        return str(super()._scalar(node))

    def _literal(self, geom: Any) -> str:
        return f"ST_GeomFromWKB({self._bind(shapely.to_wkb(geom))}, {int(self.srid)})"

    def spatial(self, op: str, geom: Any) -> str:
        g = self._geometry()
        test = f"{_FUNCTIONS[op]}({g}, {self._literal(geom)})"
        if op == "disjoint":  # a missing or empty geometry is disjoint from nothing (as in GeoPackage)
            return f"({g} IS NOT NULL AND NOT ST_IsEmpty({g}) AND {test})"
        return test

    def _condition(self, node: Any) -> str:
        if self.relation.geometry_column is None and isinstance(
                node, ast.SpatialComparisonPredicate | ast.BBox | ast.SpatialDistancePredicate | ast.Relate):
            raise QueryError(f"{self.relation.name!r} has no geometry")
        if isinstance(node, ast.Not):
            return f"(NOT coalesce({self._condition(node.sub_node)}, false))"
        if isinstance(node, ast.Include):
            return "false" if node.not_ else "true"
        if isinstance(node, ast.Like):
            if not isinstance(node.pattern, str):
                raise QueryError("LIKE takes a text pattern")
            pattern = like_pattern(node.pattern, node.wildcard, node.singlechar, node.escapechar)
            op = ("NOT " if node.not_ else "") + ("ILIKE" if node.nocase else "LIKE")
            return f"(({self._scalar(node.lhs)})::text {op} {self._bind(pattern)} ESCAPE '\\')"
        if isinstance(node, ast.SpatialDistancePredicate):
            _, geom = self._spatial_operands(node, "intersects")
            test = f"ST_DWithin({self._geometry()}, {self._literal(geom)}, {self._bind(float(node.distance))})"
            return f"(NOT {test})" if node.op == ast.SpatialDistanceOp.BEYOND else test
        if isinstance(node, ast.Relate):
            _, geom = self._spatial_operands(node, "intersects")
            if not re.fullmatch(r"[TF012*]{9}", str(node.pattern)):
                raise QueryError(f"invalid RELATE pattern {node.pattern!r}")
            return f"ST_Relate({self._geometry()}, {self._literal(geom)}, {self._bind(str(node.pattern))})"
        return str(super()._condition(node))


def _iso(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.tzinfo:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, memoryview):
        return bytes(value)
    return value


class PostGISBase:
    """The VectorBase protocol over one schema of a PostGIS database (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conninfo, self.schema = split(url)
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._closed = False
        con = self._acquire()
        try:
            self._relations, self._srids = self._read_relations(con)
        finally:
            self._release(con)
        if not self._relations and not self._schema_exists():
            self.close()
            raise FileNotFoundError(url)

    # connections
    def _acquire(self) -> Any:
        with self._lock:
            if self._closed:
                raise RuntimeError("the base is closed")
            if self._idle:
                return self._idle.pop()
        import psycopg

        try:
            con = connect(self._conninfo)
        except psycopg.OperationalError as e:  # the URL's password is not in the message
            raise ConnectionError(f"{public_url(self.url)}: {e}") from None
        con.read_only = True
        return con

    def _release(self, con: Any) -> None:
        try:
            con.rollback()
        except Exception:  # a broken connection is not given back
            con.close()
            return
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

    def _schema_exists(self) -> bool:
        with connect(self._conninfo) as con:
            return con.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)).fetchone() is not None

    def _table(self, name: str) -> str:
        return f"{quote(self.schema)}.{quote(name)}"

    # schema
    def _read_relations(self, con: Any) -> tuple[dict[str, Relation], dict[str, int]]:
        s = self.schema
        kinds = dict(con.execute(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'v', 'p', 'm')", (s,)).fetchall())
        kinds.pop(META, None)
        columns: dict[str, list[tuple[str, str, str]]] = {}
        for table, column, data_type, udt in con.execute(
                "SELECT table_name, column_name, data_type, udt_name FROM information_schema.columns "
                "WHERE table_schema = %s ORDER BY table_name, ordinal_position", (s,)):
            columns.setdefault(table, []).append((column, data_type, udt))
        geometry = {row[0]: row[1:] for row in con.execute(
            "SELECT f_table_name, f_geometry_column, type, srid FROM geometry_columns WHERE f_table_schema = %s", (s,))}
        keys: dict[str, list[str]] = {}
        for table, column in con.execute(
                "SELECT tc.table_name, kcu.column_name FROM information_schema.table_constraints tc "
                "JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name) "
                "WHERE tc.table_schema = %s AND tc.constraint_type = 'PRIMARY KEY' ORDER BY kcu.ordinal_position",
                (s,)):
            keys.setdefault(table, []).append(column)
        meta: dict[str, tuple[Any, ...]] = {}
        if con.execute("SELECT to_regclass(%s)", (f"{quote(s)}.{META}",)).fetchone()[0] is not None:
            meta = {row[0]: row[1:] for row in con.execute(
                f"SELECT name, srs, min_x, min_y, max_x, max_y, count FROM {quote(s)}.{META}")}
        relations: dict[str, Relation] = {}
        srids: dict[str, int] = {}
        for table in sorted(kinds):
            cols = columns.get(table, [])
            geom_col, geom_type, srid = geometry.get(table) or (None, None, 0)
            pk = tuple(keys.get(table, ())) or (("fid",) if any(c[0] == "fid" for c in cols) else (cols[0][0],))
            attributes = tuple(Attribute(c[0], _TYPES.get(c[1], "string")) for c in cols
                               if c[0] != geom_col and c[0] not in pk and c[2] != "geometry")
            srids[table] = int(srid or 0)
            known = meta.get(table)
            if known is not None:
                srs, minx, miny, maxx, maxy, count = known
            else:
                srs = f"EPSG:{srid}" if srid else ""
                count = con.execute(f"SELECT count(*) FROM {self._table(table)}").fetchone()[0]
                minx = miny = maxx = maxy = None
                if geom_col:
                    minx, miny, maxx, maxy = con.execute(
                        f"SELECT ST_XMin(e), ST_YMin(e), ST_XMax(e), ST_YMax(e) FROM "
                        f"(SELECT ST_Extent({quote(geom_col)}) AS e FROM {self._table(table)}) x").fetchone()
            extent = (minx, miny, maxx, maxy) if None not in (minx, miny, maxx, maxy) and count else None
            relations[table] = Relation(
                name=table, type="VIEW" if kinds[table] in ("v", "m") else "TABLE", geometry_column=geom_col,
                geometry_type=_GEOMETRY_TYPES.get((geom_type or "").upper().removesuffix("Z").removesuffix("M"),
                                                  geom_type) if geom_col else None,
                srs=srs, attributes=attributes, primary_key=pk, extent=extent, count=int(count))
        return relations, srids

    def relations(self) -> list[Relation]:
        return list(self._relations.values())

    def relation(self, name: str) -> Relation | None:
        return self._relations.get(name)

    def has_rtree(self, name: str) -> bool:
        """A spatial (GiST) index: every table integration writes has one."""
        return self._relations.get(name) is not None and self._relations[name].geometry_column is not None

    # queries
    def _relation(self, name: str) -> Relation:
        relation = self._relations.get(name)
        if relation is None:
            raise UnknownRelation(name)
        return relation

    def _where(self, relation: Relation, query: Query) -> tuple[str, dict[str, Any]]:
        t = _PgTranslator(relation, self._srids.get(relation.name, 0))
        parts = []
        box = query_box(relation, query)
        if box is not None:
            parts.append(t.spatial("intersects", shapely.box(*box)))
        if query.ids is not None:
            keys = integer_keys(query.ids)
            parts.append(f"{quote(relation.primary_key[0])} = ANY({t._bind(keys)}::bigint[])")
        if query.filter is not None:
            parts.append(t.where(query.filter))
        return (" WHERE " + " AND ".join(parts)) if parts else "", t.bound()

    def count(self, query: Query) -> int:
        import psycopg

        relation = self._relation(query.relation)
        where, params = self._where(relation, query)
        con = self._acquire()
        try:
            return int(con.execute(f"SELECT count(*) FROM {self._table(relation.name)}{where}", params).fetchone()[0])
        except (psycopg.errors.DataError, psycopg.errors.SyntaxErrorOrAccessRuleViolation) as e:
            raise QueryError(f"invalid filter: {e.diag.message_primary or e}") from None
        finally:
            self._release(con)

    def features(self, query: Query) -> Iterator[Feature]:
        import psycopg

        relation = self._relation(query.relation)
        types = {a.name: a.type for a in relation.attributes}
        props = list(query.properties) if query.properties is not None else [a.name for a in relation.attributes]
        for name in props:
            if name not in types:
                raise QueryError(f"unknown property {name!r} of {relation.name!r}")
        order = []
        for name, ascending in query.sortby:
            if name not in types and name not in relation.primary_key:
                raise QueryError(f"cannot sort {relation.name!r} by {name!r}")
            collate = ' COLLATE "C"' if types.get(name) == "string" else ""
            order.append(f"{quote(name)}{collate} {'ASC NULLS FIRST' if ascending else 'DESC NULLS LAST'}")
        pk = relation.primary_key[0]
        order.append(f"{quote(pk)} ASC")
        if query.offset < 0 or (query.limit is not None and query.limit < 0):
            raise QueryError("offset and limit must not be negative")
        where, params = self._where(relation, query)
        geom = relation.geometry_column
        select = [quote(pk), f"ST_AsBinary({quote(geom)})" if geom else "NULL", *(quote(p) for p in props)]
        params.update(limit=query.limit, offset=query.offset)
        sql = (f"SELECT {', '.join(select)} FROM {self._table(relation.name)}{where} ORDER BY {', '.join(order)} "
               f"LIMIT %(limit)s OFFSET %(offset)s")
        con = self._acquire()
        try:  # declared now, so that a filter PostgreSQL rejects is the caller's QueryError
            cur = con.cursor(name=f"f{uuid.uuid4().hex[:12]}")
            cur.execute(sql, params)
        except (psycopg.errors.DataError, psycopg.errors.SyntaxErrorOrAccessRuleViolation) as e:
            self._release(con)
            raise QueryError(f"invalid filter: {e.diag.message_primary or e}") from None
        except BaseException:
            self._release(con)
            raise
        return self._stream(con, cur, props)

    def _stream(self, con: Any, cur: Any, props: list[str]) -> Iterator[Feature]:
        import psycopg

        try:
            while True:
                try:
                    rows = cur.fetchmany(FETCH)
                except psycopg.errors.DataError as e:
                    raise QueryError(f"invalid filter: {e.diag.message_primary or e}") from None
                if not rows:
                    break
                geoms = shapely.from_wkb([row[1] for row in rows])
                for row, g in zip(rows, geoms, strict=True):
                    yield Feature(row[0], g, {p: _iso(v) for p, v in zip(props, row[2:], strict=True)})
            cur.close()
        finally:
            self._release(con)
