"""CRS names as WFS and OGC API clients write them, and the axis order each form implies.

WFS 2.0 and OGC API follow the CRS definition for URNs and http URIs (EPSG:4326 is latitude first),
while the short `EPSG:n` form keeps the traditional x/y order GIS clients and OWSLib send with it;
CRS84 is always longitude first. Geometries are kept x/y (shapely, pyproj `always_xy`) and swapped
only where a request or an answer is written in a y/x form.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import pyproj
import shapely

from tileserver import transformers

CRS84_URI = "http://www.opengis.net/def/crs/OGC/1.3/CRS84"
_EPSG = re.compile(
    r"^(?:urn:(?:x-)?ogc:def:crs:EPSG:[0-9.]*:|https?://www\.opengis\.net/def/crs/EPSG/[0-9.]+/)(\d{1,6})$", re.I
)
_SHORT = re.compile(r"^(?:EPSG:|https?://www\.opengis\.net/gml/srs/epsg\.xml#)(\d{1,6})$", re.I)
_CRS84 = re.compile(
    r"^(?:urn:ogc:def:crs:OGC:[0-9.]*:CRS84|https?://www\.opengis\.net/def/crs/OGC/[0-9.]+/CRS84|CRS:84|OGC:CRS84)$",
    re.I,
)


@dataclass(frozen=True)
class RequestCrs:
    """A CRS named by a client: `code` ("EPSG:2154", "OGC:CRS84"), and whether coordinates written
    in that form come y first."""

    text: str
    code: str
    yx: bool

    @property
    def crs(self) -> pyproj.CRS:
        return _crs(self.code)


@functools.lru_cache(maxsize=256)
def _crs(code: str) -> pyproj.CRS:
    return pyproj.CRS.from_user_input(code)


def _north_first(code: str) -> bool:
    axes = _crs(code).axis_info
    return bool(axes) and axes[0].direction.lower() in ("north", "south")


def parse_crs(text: str) -> RequestCrs:
    """Raise ValueError for a name that is not an EPSG code or CRS84 in one of the usual forms."""
    value = text.strip()
    if _CRS84.match(value):
        return RequestCrs(value, "OGC:CRS84", False)
    match = _EPSG.match(value)
    if match:
        code = f"EPSG:{int(match.group(1))}"
        _check(code)
        return RequestCrs(value, code, _north_first(code))
    match = _SHORT.match(value)
    if match:
        code = f"EPSG:{int(match.group(1))}"
        _check(code)
        return RequestCrs(value, code, False)
    raise ValueError(f"unknown CRS {value[:80]!r}")


def _check(code: str) -> None:
    try:
        _crs(code)
    except pyproj.exceptions.CRSError:
        raise ValueError(f"unknown CRS {code}") from None


def native(srs: str) -> RequestCrs:
    """A relation's own srs ("EPSG:2154") in its URN form, axis order as defined."""
    code = srs.upper()
    if code in ("OGC:CRS84", "CRS:84"):
        return RequestCrs(CRS84_URI, "OGC:CRS84", False)
    number = code.split(":")[-1]
    return RequestCrs(f"urn:ogc:def:crs:EPSG::{number}", code, _north_first(code))


def urn(srs: str) -> str:
    return native(srs).text


def uri(code: str) -> str:
    """OGC API's form: http://www.opengis.net/def/crs/EPSG/0/n, or CRS84."""
    if code.upper() in ("OGC:CRS84", "CRS:84"):
        return CRS84_URI
    return f"http://www.opengis.net/def/crs/EPSG/0/{code.split(':')[-1]}"


def same(a: str, b: str) -> bool:
    if a.upper() == b.upper():
        return True
    return bool(_crs(a).equals(_crs(b), ignore_axis_order=True))


def transformer(source: str, target: str) -> pyproj.Transformer:
    """x/y-ordered, owned by the calling thread (see `tileserver.transformers`)."""
    return transformers.transformer(_crs(source), _crs(target))


def transform(geometry: Any, source: str, target: str) -> Any:
    """A shapely geometry from one CRS code to another, x/y in and out."""
    if geometry is None or same(source, target):
        return geometry
    t = transformer(source, target)
    return shapely.transform(geometry, lambda xy: _stack(*t.transform(xy[:, 0], xy[:, 1])))


def _stack(x: Any, y: Any) -> Any:
    import numpy as np

    return np.column_stack((x, y))


def transform_bbox(bbox: tuple[float, float, float, float], source: str, target: str) -> tuple[float, ...]:
    if same(source, target):
        return bbox
    return tuple(transformer(source, target).transform_bounds(*bbox, densify_pts=21))


def swap(geometry: Any) -> Any:
    """x/y ↔ y/x."""
    if geometry is None:
        return None
    return shapely.transform(geometry, lambda xy: xy[:, ::-1])
