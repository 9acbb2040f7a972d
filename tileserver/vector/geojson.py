"""GeoJSON encoding of features (WFS `application/json`, OGC API Features items), a batch at a time."""

from __future__ import annotations

import base64
import datetime
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import shapely
import shapely.geometry

_PLAIN = frozenset((str, int, float, bool, type(None)))  # written by orjson as they are


def _value(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    return value


def geometries(geoms: Sequence[Any]) -> list[orjson.Fragment | None]:
    """The `geometry` members of a batch (None for a null or empty geometry), encoded by GEOS in one
    call: the same values as shapely's per-geometry `mapping`, several times faster, which is most of
    the cost of a GeoJSON answer of polygons."""
    array = np.empty(len(geoms), dtype=object)
    array[:] = geoms
    texts = shapely.to_geojson(array).tolist()
    empty = shapely.is_empty(array).tolist()
    return [None if text is None or hollow else orjson.Fragment(text)
            for text, hollow in zip(texts, empty, strict=True)]


def feature(fid: Any, properties: dict[str, Any], geom: Any, names: Any = None, **extra: Any) -> bytes:
    """One Feature; `geom` a shapely geometry or a member from `geometries`; `names` keeps only those
    properties (None: all)."""
    props = {k: v if type(v) in _PLAIN else _value(v) for k, v in properties.items() if names is None or k in names}
    if geom is not None and not isinstance(geom, orjson.Fragment):
        geom = None if geom.is_empty else shapely.geometry.mapping(geom)
    body: dict[str, Any] = {"type": "Feature", "id": fid, "geometry": geom, "properties": props, **extra}
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
