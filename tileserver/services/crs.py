"""Map CRS: how a CRS code a client writes is read, what PROJ knows of it, which CRS a layer is
drawn in and its extent there. WMS advertises and draws in these; the home page lists them.

Axis order: in WMS 1.3.0 a BBOX follows the CRS definition (EPSG:4326, EPSG:4258, EPSG:3035 are
northing first; CRS:84 and IGNF geographic CRSs are lon/lat); in 1.1.1 it is always x/y.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tileserver.catalog import PublishedLayer
from tileserver.render.georef import get_crs, get_transformer, reproject_bbox

log = logging.getLogger("tileserver.wms")

V130, V111 = "1.3.0", "1.1.1"  # the WMS versions whose axis order differs
# server-wide CRS list (settings.wms_crs overrides); CRS:84 is always offered
DEFAULT_CRS = ("CRS:84", "EPSG:4326", "EPSG:3857", "EPSG:4258", "EPSG:2154", "IGNF:LAMB93", "EPSG:3035")


@dataclass(frozen=True)
class CRSInfo:
    code: str  # as advertised: "EPSG:4326", "CRS:84", "IGNF:LAMB93"
    grid_crs: str  # what the render package uses (x/y order always)
    northing_first: bool  # 1.3.0 BBOX order
    geographic: bool


_URN = re.compile(r"^urn:ogc:def:crs:(\w+):[\d.]*:(\w+)$", re.I)
_URI = re.compile(r"^https?://www\.opengis\.net/def/crs/(\w+)/[\d.]+/(\w+)$", re.I)


def normalise_crs(value: str) -> str:
    """`epsg:4326`, `urn:ogc:def:crs:EPSG::4326`, OGC URIs → `EPSG:4326`; CRS84 → `CRS:84`."""
    text = value.strip()
    match = _URN.match(text) or _URI.match(text)
    if match:
        text = f"{match.group(1)}:{match.group(2)}"
    authority, sep, code = text.partition(":")
    if not sep:
        return text
    authority = authority.upper()
    if authority in ("CRS", "OGC") and code.upper() in ("84", "CRS84"):
        return "CRS:84"
    return f"{authority}:{code.upper() if authority in ('EPSG', 'CRS') else code}"


@lru_cache(maxsize=512)
def crs_info(code: str) -> CRSInfo | None:
    """What we need to know of an advertised CRS code; None if PROJ does not know it."""
    if code == "CRS:84":
        return CRSInfo(code, "EPSG:4326", False, True)
    try:
        crs = get_crs(code)
    except Exception:  # pyproj raises CRSError, sometimes plain ValueError
        return None
    axes = crs.axis_info
    northing = bool(axes) and axes[0].direction.lower() in ("north", "south")
    return CRSInfo(code, code, northing, bool(crs.is_geographic))


def server_crs(settings: Any) -> tuple[str, ...]:
    listed = tuple(settings.wms_crs or DEFAULT_CRS)
    codes = [normalise_crs(c) for c in ("CRS:84", *listed)]
    return tuple(c for c in dict.fromkeys(codes) if crs_info(c) is not None)


@lru_cache(maxsize=1024)
def transformable(src: str, dst: str) -> bool:
    """Whether PROJ can join two CRS it knows. Some pairs it cannot (IGNF:UTM20W84MART → IGNF:WGS84G:
    "Missing required parameter values in transformation"): such a CRS is unusable for that layer,
    and must cost the layer's BoundingBox there, never the capabilities document. Logged once."""
    try:
        get_transformer(src, dst)
    except Exception as exc:  # pyproj's ProjError, CRSError
        log.warning("no transformation from %s to %s, that CRS is not offered for its layers: %s", src, dst, exc)
        return False
    return True


def usable_crs(published: PublishedLayer, code: str) -> bool:
    """A CRS a layer can be drawn in: PROJ knows it and reaches it from the layer's own CRS."""
    info = crs_info(code)
    return info is not None and transformable(published.tms.crs, info.grid_crs)


def layer_crs(published: PublishedLayer) -> tuple[str, ...]:
    """A layer's own CRS (native first, then extra_crs), those PROJ knows and can reach."""
    codes = [normalise_crs(published.tms.crs), *(normalise_crs(c) for c in published.layer.extra_crs)]
    return tuple(c for c in dict.fromkeys(codes) if usable_crs(published, c))


def layer_bbox(published: PublishedLayer, code: str) -> tuple[float, float, float, float] | None:
    """The layer's extent in a CRS, x/y order; None where it cannot be expressed there."""
    info = crs_info(code)
    if info is None:
        return None
    if code == "CRS:84":
        return published.wgs84_bbox
    if not transformable(published.tms.crs, info.grid_crs):
        return None
    try:
        box = reproject_bbox(published.native_bbox, published.tms.crs, info.grid_crs)
    except ValueError:
        return None
    if not all(math.isfinite(v) for v in box) or not (box[0] < box[2] and box[1] < box[3]):
        return None
    return box


def axis_ordered(box: tuple[float, ...], info: CRSInfo, version: str) -> tuple[float, ...]:
    """x/y bbox → the order of `version` (1.3.0 follows the CRS axes)."""
    if version == V130 and info.northing_first:
        return (box[1], box[0], box[3], box[2])
    return box
