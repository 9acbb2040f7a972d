"""What the vector services ask of a vector base ("VECTOR-DB" stored data), whatever holds it.

The embedded default is one GeoPackage file per stored data (`vector/geopackage.py`); PostGIS comes
later behind the same interface. Reads are synchronous (SQLite and PostgreSQL drivers block): the
services call them in a worker thread and stream the features out in batches, so no answer holds a
whole collection in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

# attribute types as the services expose them (XSD and JSON Schema are derived from these)
ATTRIBUTE_TYPES = ("integer", "real", "string", "boolean", "date", "datetime", "binary")


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # one of ATTRIBUTE_TYPES


@dataclass(frozen=True)
class Relation:
    """A table (or view) of a base, with what capabilities and schemas need to describe it."""

    name: str  # normalised: lower case, ASCII, no hyphens
    type: str  # "TABLE" or "VIEW"
    geometry_column: str | None
    geometry_type: str | None  # "Point", "MultiPolygon", … (OGC simple features names); None: no geometry
    srs: str  # "EPSG:2154"
    attributes: tuple[Attribute, ...]  # without the geometry column
    primary_key: tuple[str, ...]
    extent: tuple[float, float, float, float] | None  # in `srs`; None when empty
    count: int


@dataclass(frozen=True)
class Feature:
    id: int | str  # the primary key's value
    geometry: Any  # a shapely geometry in the relation's srs, or None
    properties: dict[str, Any]


@dataclass(frozen=True)
class Query:
    """One read of a relation. `bbox` is in the relation's srs (callers reproject); `filter` is a
    pygeofilter AST whose attribute names are the relation's; `ids` selects by primary key."""

    relation: str
    bbox: tuple[float, float, float, float] | None = None
    filter: Any = None
    ids: tuple[int | str, ...] | None = None
    properties: tuple[str, ...] | None = None  # None: all attributes
    sortby: tuple[tuple[str, bool], ...] = ()  # (attribute, ascending)
    offset: int = 0
    limit: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class UnknownRelation(KeyError):
    """The base holds no relation of that name."""


class QueryError(ValueError):
    """A query the base cannot answer as asked: unknown attribute, unsupported filter operator,
    literal of the wrong kind. The message is safe to show to the client (services map it to their
    protocol's "invalid parameter" error)."""


def query_box(relation: Relation, query: Query) -> tuple[float, float, float, float] | None:
    """A query's bbox checked against its relation (every backend refuses the same way)."""
    if query.bbox is None:
        return None
    if relation.geometry_column is None:
        raise QueryError(f"{relation.name!r} has no geometry")
    minx, miny, maxx, maxy = (float(v) for v in query.bbox)
    if not (minx <= maxx and miny <= maxy):
        raise QueryError("bbox: min must not exceed max")
    return minx, miny, maxx, maxy


def integer_keys(ids: Any) -> list[int]:
    """Feature ids as the bases' integer keys; an id that is not one matches nothing."""
    keys = []
    for value in ids:
        try:
            keys.append(int(value))
        except (TypeError, ValueError):
            continue
    return keys


class VectorBase(Protocol):
    def relations(self) -> list[Relation]: ...

    def relation(self, name: str) -> Relation | None: ...

    def count(self, query: Query) -> int:
        """Features matching the query, offset and limit ignored."""
        ...

    def features(self, query: Query) -> Iterator[Feature]:
        """Matching features in order; reads lazily (a bbox reads only the spatial index's candidates)."""
        ...

    def close(self) -> None: ...
