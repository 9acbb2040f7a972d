"""GeoPackage geometry blobs (GeoPackage 1.3 §2.1.3 "GeoPackageBinary"): a header, then WKB.

    magic "GP" | version (0) | flags | srs_id int32 | envelope (0, 4, 6 or 8 doubles) | WKB

flags: bit 0 byte order of the header (1 little endian), bits 1-3 envelope code (0 none, 1 xy,
2 xyz, 3 xym, 4 xyzm), bit 4 empty geometry, bit 5 extended type. Reading it by hand keeps the
base readable with the standard library's sqlite3 and shapely, without SpatiaLite or GDAL in the
query path. The SQL functions GDAL's R-tree triggers call (`ST_MinX`, `ST_IsEmpty`, …) are defined
here too, so that a plain sqlite3 connection can write to a GDAL-made table.
"""

from __future__ import annotations

import sqlite3
import struct
from typing import overload

import numpy as np
import shapely

_ENVELOPE_DOUBLES = {0: 0, 1: 4, 2: 6, 3: 6, 4: 8}


class GeometryBlobError(ValueError):
    """Not a GeoPackage geometry blob."""


def wkb_offset(blob: bytes) -> int:
    """Where the WKB starts in a GeoPackage blob."""
    if len(blob) < 8 or blob[0:2] != b"GP":
        raise GeometryBlobError("not a GeoPackage geometry (no 'GP' magic)")
    code = (blob[3] >> 1) & 0x07
    if code not in _ENVELOPE_DOUBLES:
        raise GeometryBlobError(f"invalid envelope code {code}")
    return 8 + 8 * _ENVELOPE_DOUBLES[code]


def is_empty_flag(blob: bytes) -> bool:
    return bool(blob[3] & 0x10)


@overload
def decode(blob: bytes) -> shapely.Geometry: ...
@overload
def decode(blob: None) -> None: ...


def decode(blob: bytes | None) -> shapely.Geometry | None:
    if blob is None:
        return None
    return shapely.from_wkb(memoryview(blob)[wkb_offset(blob):].tobytes())


def decode_many(blobs: list[bytes | None]) -> np.ndarray:
    """Vectorised decode: one shapely call for a whole batch."""
    wkbs = [None if b is None else b[wkb_offset(b):] for b in blobs]
    return shapely.from_wkb(np.array(wkbs, dtype=object))


def encode(geom: shapely.Geometry | None, srs_id: int) -> bytes | None:
    """A little-endian blob with an xy envelope (none for points, as GDAL writes them)."""
    if geom is None:
        return None
    if geom.is_empty:
        return struct.pack("<2sBBi", b"GP", 0, 0x01 | 0x10, srs_id) + shapely.to_wkb(geom, byte_order=1)
    if geom.geom_type == "Point":
        return struct.pack("<2sBBi", b"GP", 0, 0x01, srs_id) + shapely.to_wkb(geom, byte_order=1)
    minx, miny, maxx, maxy = geom.bounds
    header = struct.pack("<2sBBi4d", b"GP", 0, 0x01 | (1 << 1), srs_id, minx, maxx, miny, maxy)
    return header + shapely.to_wkb(geom, byte_order=1)


def encode_many(geoms: np.ndarray, srs_id: int) -> list[bytes | None]:
    """`encode` for a batch: WKB and bounds computed once per batch by shapely."""
    wkbs = shapely.to_wkb(geoms, byte_order=1)
    bounds = shapely.bounds(geoms)
    empty = shapely.is_empty(geoms)
    point = shapely.get_type_id(geoms) == 0
    plain = struct.pack("<2sBBi", b"GP", 0, 0x01, srs_id)
    empty_header = struct.pack("<2sBBi", b"GP", 0, 0x01 | 0x10, srs_id)
    out: list[bytes | None] = []
    for wkb, b, is_empty, is_point in zip(wkbs, bounds.tolist(), empty.tolist(), point.tolist(), strict=True):
        if wkb is None:
            out.append(None)
        elif is_empty:
            out.append(empty_header + wkb)
        elif is_point:
            out.append(plain + wkb)
        else:
            out.append(struct.pack("<2sBBi4d", b"GP", 0, 0x03, srs_id, b[0], b[2], b[1], b[3]) + wkb)
    return out


def _bound(i: int):
    def fn(blob: bytes | None) -> float | None:
        geom = decode(blob) if blob is not None else None
        if geom is None or geom.is_empty:
            return None
        return float(geom.bounds[i])
    return fn


def _is_empty(blob: bytes | None) -> int | None:
    if blob is None:
        return None
    return int(is_empty_flag(blob) or decode(blob).is_empty)


def register_functions(con: sqlite3.Connection) -> None:
    """The SQL functions GeoPackage R-tree triggers use, for writes through the standard sqlite3."""
    con.create_function("ST_MinX", 1, _bound(0), deterministic=True)
    con.create_function("ST_MinY", 1, _bound(1), deterministic=True)
    con.create_function("ST_MaxX", 1, _bound(2), deterministic=True)
    con.create_function("ST_MaxY", 1, _bound(3), deterministic=True)
    con.create_function("ST_IsEmpty", 1, _is_empty, deterministic=True)
