"""The tables a vector pyramid's tiles hold, as its descriptor lists them: TileJSON (TMS) and the
OGC API tilesets both describe them."""

from __future__ import annotations

import re
from collections.abc import Iterator

from tileserver.catalog import PublishedLayer


def vector_tables(published: PublishedLayer) -> Iterator[tuple[str, str, str, dict[str, str]]]:
    """(level, table name, geometry, {attribute: type}) of every table of a vector pyramid's published
    levels, top → bottom: what its descriptor says the tiles hold (TileJSON, OGC API tilesets)."""
    for level in published.level_ids:
        descriptor_level = published.owners[level].descriptor.level(level)
        for table in (descriptor_level.tables if descriptor_level else None) or ():
            if not isinstance(table, dict) or not table.get("name"):
                continue
            attributes = [a for a in table.get("attributes") or () if isinstance(a, dict) and a.get("name")]
            fields = {str(a["name"]): str(a.get("type", "")) for a in attributes}
            yield level, str(table["name"]), str(table.get("geometry") or ""), fields


_NUMBERS = {"integer", "int", "int2", "int4", "int8", "smallint", "bigint", "serial", "smallserial", "bigserial",
            "double precision", "real", "float", "float4", "float8", "numeric", "decimal", "number",
            "integer64"}  # PostgreSQL names (ROK4's 4ALAMO copies them from PostGIS), OGR's, TileJSON's
_BOOLEANS = {"boolean", "bool"}


def tilejson_type(kind: str) -> str:
    """An attribute's descriptor type as TileJSON and tippecanoe name MVT values: "Number",
    "Boolean" or "String" (text, dates and anything else travel as strings in the tiles)."""
    name = re.sub(r"\s*\(.*\)\s*$", "", kind.strip().lower())  # character varying(80), numeric(10,2)
    if name in _NUMBERS:
        return "Number"
    if name in _BOOLEANS:
        return "Boolean"
    return "String"
