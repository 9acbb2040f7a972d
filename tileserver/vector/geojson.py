"""GeoJSON encoding of features (WFS `application/json`, OGC API Features items), one at a time."""

from __future__ import annotations

import base64
import datetime
from typing import Any

import orjson
import shapely.geometry


def _value(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    return value


def feature(fid: Any, properties: dict[str, Any], geom: Any, names: Any = None, **extra: Any) -> bytes:
    """One Feature; `names` keeps only those properties (None: all)."""
    props = {k: _value(v) for k, v in properties.items() if names is None or k in names}
    body: dict[str, Any] = {
        "type": "Feature",
        "id": fid,
        "geometry": None if geom is None or geom.is_empty else shapely.geometry.mapping(geom),
        "properties": props,
        **extra,
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
