"""WMS constants, exception reports and request parsing shared by every WMS operation."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lxml import etree
from starlette.requests import Request
from starlette.responses import Response

from tileserver.catalog import Catalog, PublishedLayer, VectorMap
from tileserver.render.encode import normalise_format
from tileserver.render.georef import Grid
from tileserver.render.model import MapLayer
from tileserver.render.styles import Style
from tileserver.services.crs import (
    V111,
    V130,
    CRSInfo,
    crs_info,
    layer_crs,
    normalise_crs,
    server_crs,
    usable_crs,
)
from tileserver.services.numbers import positive_int
from tileserver.services.ows import KVP, XML_DECLARATION, XSI_NS, OWSException, echo, xml_text
from tileserver.services.policy import ServiceError
from tileserver.services.stylebook import layer_styles, style_book

log = logging.getLogger("tileserver.wms")

SERVICE = "wms"
WMS_NS = "http://www.opengis.net/wms"
OGC_NS = "http://www.opengis.net/ogc"
SUPPORTED_VERSIONS = (V111, V130)  # ascending
TEMPLATES = {V130: "wms-1.3.0.xml", V111: "wms-1.1.1.xml"}
CAPABILITIES_MIME = {V130: "text/xml", V111: "application/vnd.ogc.wms_xml"}
EXCEPTION_MIME = {V130: "text/xml", V111: "application/vnd.ogc.se_xml"}
EXCEPTION_SCHEMA = "http://schemas.opengis.net/wms/1.3.0/exceptions_1_3_0.xsd"
DTD_111 = "http://schemas.opengis.net/wms/1.1.1/"

GETMAP_FORMATS = ("image/png", "image/jpeg", "image/tiff", "image/geotiff", "image/x-bil;bits=32", "text/asc")
PICTURE_FORMATS = ("image/png", "image/jpeg")
INFO_FORMATS = ("text/plain", "text/html", "application/json", "text/xml")
LEGEND_SIZE = (20, 100)  # width, height of a generated palette legend when the style gives none
MAX_CACHED_DOCUMENTS = 64
WHITE = (255, 255, 255)

# codes named by the 1.1.1 standard differently
CODES_111 = {"InvalidCRS": "InvalidSRS"}


# --------------------------------------------------------------------------- exceptions


def exception_report(exc: ServiceError, version: str) -> bytes:
    """ServiceExceptionReport of `version` (1.3.0 namespaced and schema-located, 1.1.1 with DTD)."""
    if version == V111:
        root = etree.Element("ServiceExceptionReport", version=V111)
        code = CODES_111.get(exc.code, exc.code)
    else:
        root = etree.Element(f"{{{OGC_NS}}}ServiceExceptionReport", nsmap={None: OGC_NS, "xsi": XSI_NS})
        root.set(f"{{{XSI_NS}}}schemaLocation", f"{OGC_NS} {EXCEPTION_SCHEMA}")
        root.set("version", V130)
        code = exc.code
    node = etree.SubElement(root, "ServiceException" if version == V111 else f"{{{OGC_NS}}}ServiceException")
    node.set("code", xml_text(code))
    if exc.locator and version == V130:  # the 1.1.1 DTD has no locator
        node.set("locator", xml_text(exc.locator))
    node.text = xml_text(exc.message)
    doctype = f'<!DOCTYPE ServiceExceptionReport SYSTEM "{DTD_111}exception_1_1_1.dtd">' if version == V111 else None
    return XML_DECLARATION + etree.tostring(root, encoding="UTF-8", pretty_print=True, doctype=doctype)


def exception_response(exc: ServiceError, version: str) -> Response:
    return Response(exception_report(exc, version), status_code=exc.status, media_type=EXCEPTION_MIME[version])


def render_report(request: Request, error: ServiceError) -> Response:
    """The WMS error handler's format when the version is not known yet (the gate): 1.3.0."""
    return exception_response(error, V130)


def wms_error(code: str, locator: str | None, message: str, status: int = 400, **headers: str) -> OWSException:
    return OWSException(code, locator, message, status, dict(headers) or None)


# --------------------------------------------------------------------------- styles


def pick_style(published: PublishedLayer, styles: tuple[Style, ...], asked: str) -> Style:
    """STYLES entry → style: empty or `default` = the layer's first; identifier, then file id."""
    name = asked.strip()
    if not name:
        return styles[0]
    for style in styles:
        if style.identifier == name:
            return style
    for style in styles:
        if style.id == name:
            return style
    if name.lower() == "default":
        return styles[0]
    raise wms_error("StyleNotDefined", "styles", f"layer {echo(published.id)} has no style {echo(name)}")


# --------------------------------------------------------------------------- request parsing


@dataclass(frozen=True)
class MapRequest:
    """The map part shared by GetMap and GetFeatureInfo, validated."""

    version: str
    layers: tuple[MapLayer, ...]
    crs: CRSInfo
    bbox_text: str
    grid: Grid
    format: str | None
    transparent: bool
    bgcolor: tuple[int, int, int]
    options: dict[str, str] = field(default_factory=dict)
    # every LAYERS entry in order: a raster MapLayer (also in `layers`) or a WMS-vector layer
    order: tuple[MapLayer | VectorMap, ...] = ()

    @property
    def vector_maps(self) -> tuple[VectorMap, ...]:
        return tuple(e for e in self.order if isinstance(e, VectorMap))

    @property
    def served(self) -> tuple[PublishedLayer | VectorMap, ...]:
        """What the map reads, for access and cache headers."""
        return tuple(e.published if isinstance(e, MapLayer) else e for e in self.order)


def version_of(kvp: KVP) -> str | None:
    """The version a non-capabilities request speaks (None if absent); WMTVER is 1.0's name."""
    value = kvp.get("VERSION") or kvp.get("WMTVER")
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text == V130:
        return V130
    if text in ("1.1.1", "1.1.0", "1.1", "1.0.0", "1.0.8", "1.0.7"):
        return V111
    raise wms_error("InvalidParameterValue", "version", f"VERSION {echo(text)} is not supported; use 1.3.0 or 1.1.1")


def positive_param(kvp: KVP, name: str, limit: int) -> int:
    raw = kvp.require(name, name.lower())
    value = positive_int(raw, 9)
    if value is None:
        raise wms_error("InvalidParameterValue", name.lower(), f"{name} must be a positive integer, not {echo(raw)}")
    if value > limit:
        raise wms_error("InvalidParameterValue", name.lower(), f"{name} {value} exceeds the maximum {limit}")
    return value


def _bbox(kvp: KVP) -> tuple[str, tuple[float, float, float, float]]:
    raw = kvp.require("BBOX", "bbox")
    parts = raw.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise wms_error("InvalidParameterValue", "bbox", f"BBOX must be four numbers minx,miny,maxx,maxy, not {echo(raw)}")
    if not (values[0] < values[2] and values[1] < values[3]):
        raise wms_error("InvalidParameterValue", "bbox", f"BBOX {echo(raw)} has min ≥ max")
    return raw, values


def _transparent(kvp: KVP) -> bool:
    raw = kvp.get("TRANSPARENT")
    if raw is None or not raw.strip():
        return False
    value = raw.strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise wms_error("InvalidParameterValue", "transparent", f"TRANSPARENT must be TRUE or FALSE, not {echo(raw)}")


def _bgcolor(kvp: KVP) -> tuple[int, int, int]:
    raw = kvp.get("BGCOLOR")
    if raw is None or not raw.strip():
        return WHITE
    match = re.fullmatch(r"(?:0x|#)?([0-9a-fA-F]{6})", raw.strip())
    if not match:
        raise wms_error("InvalidParameterValue", "bgcolor", f"BGCOLOR must be 0xRRGGBB, not {echo(raw)}")
    value = int(match.group(1), 16)
    return (value >> 16) & 255, (value >> 8) & 255, value & 255


def _format_options(kvp: KVP) -> dict[str, str]:
    """FORMAT_OPTIONS=key:value;key:value (ROK4: quality for JPEG, compression for TIFF)."""
    out: dict[str, str] = {}
    for item in (kvp.get("FORMAT_OPTIONS") or "").split(";"):
        key, _, value = item.partition(":")
        if key.strip():
            out[key.strip().lower()] = value.strip()
    quality = out.get("quality")
    if quality is not None and not (quality.isdigit() and 1 <= int(quality) <= 100):
        raise wms_error("InvalidParameterValue", "format_options", f"quality must be within 1..100, not {echo(quality)}")
    compression = out.get("compression")
    if compression is not None and compression.lower() not in ("raw", "none", "lzw", "deflate", "zip", "packbits"):
        raise wms_error("InvalidParameterValue", "format_options",
                     f"compression must be raw, lzw, deflate or packbits, not {echo(compression)}")
    return out


def map_format(raw: str | None, required: bool) -> str | None:
    if raw is None or not raw.strip():
        if required:
            raise wms_error("MissingParameterValue", "format", "parameter FORMAT is required")
        return None
    try:
        fmt = normalise_format(raw)
    except ValueError:
        fmt = ""
    if fmt not in GETMAP_FORMATS:
        raise wms_error("InvalidFormat", "format", f"FORMAT {echo(raw)} is not offered; use one of {', '.join(GETMAP_FORMATS)}")
    return fmt


@dataclass(frozen=True)
class ImageFrame:
    """What an image-shaped exception (INIMAGE, BLANK) needs, parsed without raising."""

    mode: str  # XML, INIMAGE, BLANK
    format: str | None = None
    width: int = 0
    height: int = 0
    transparent: bool = False
    bgcolor: tuple[int, int, int] = WHITE


_EXCEPTION_MODES = {"xml": "XML", "text/xml": "XML", "application/vnd.ogc.se_xml": "XML",
                    "inimage": "INIMAGE", "application/vnd.ogc.se_inimage": "INIMAGE",
                    "blank": "BLANK", "application/vnd.ogc.se_blank": "BLANK"}


def image_frame(kvp: KVP, settings: Any) -> ImageFrame:
    mode = _EXCEPTION_MODES.get((kvp.get("EXCEPTIONS") or kvp.get("EXCEPTION") or "xml").strip().lower(), "XML")
    if mode == "XML":
        return ImageFrame("XML")
    try:
        return ImageFrame(mode, map_format(kvp.get("FORMAT"), True),
                          positive_param(kvp, "WIDTH", settings.render_max_width),
                          positive_param(kvp, "HEIGHT", settings.render_max_height),
                          _transparent(kvp), _bgcolor(kvp))
    except OWSException:
        return ImageFrame("XML")


def requested_layer(catalog: Catalog, name: str, key: str | None, locator: str = "layers") -> PublishedLayer:
    published = catalog.get(name, SERVICE, key)
    if published is None or published.format.is_vector:
        raise wms_error("LayerNotDefined", locator, f"no layer {echo(name)}")
    return published


def requested_any(catalog: Catalog, name: str, key: str | None, locator: str = "layers") -> PublishedLayer | VectorMap:
    """A raster WMS layer or a WMS-vector layer of that name the caller may read (one namespace)."""
    published = catalog.get(name, SERVICE, key)
    if published is not None and not published.format.is_vector:
        return published
    vector = catalog.vector_map(name, key)
    if vector is None:
        raise wms_error("LayerNotDefined", locator, f"no layer {echo(name)}")
    return vector


def map_crs_usable(vector: VectorMap, code: str) -> bool:
    """A CRS a WMS-vector layer can be drawn in: PROJ reaches it from every relation's CRS."""
    from tileserver.services.crs import transformable

    info = crs_info(code)
    return info is not None and all(transformable(r.relation.srs, info.grid_crs) for r in vector.relations)


def map_layer_crs(vector: VectorMap) -> tuple[str, ...]:
    """A WMS-vector layer's own CRS: its tables' (offered beside the server's list, as a raster
    layer's native CRS is)."""
    codes = [normalise_crs(r.relation.srs) for r in vector.relations]
    return tuple(c for c in dict.fromkeys(codes) if map_crs_usable(vector, c))


def _vector_style(vector: VectorMap, asked: str) -> None:
    name = asked.strip()
    names = {r.style.name for r in vector.relations if r.style is not None and r.style.name}
    if name and name.lower() != "default" and name not in names:
        raise wms_error("StyleNotDefined", "styles", f"layer {echo(vector.id)} has no style {echo(name)}")


def parse_map_request(kvp: KVP, runtime: Any, key: str | None, version: str, format_required: bool) -> MapRequest:
    """Validate the map parameters in the order a client fixes them: layers, styles, CRS, BBOX, size, format."""
    settings = runtime.settings
    catalog: Catalog = runtime.catalog
    names = [n.strip() for n in kvp.require("LAYERS", "layers").split(",")]
    if any(not n for n in names):
        raise wms_error("LayerNotDefined", "layers", "LAYERS has an empty entry")
    limit = settings.wms_layer_limit
    if len(names) > limit:
        raise wms_error("InvalidParameterValue", "layers", f"at most {limit} layers per request (LayerLimit)")
    entries = [requested_any(catalog, n, key) for n in names]
    asked_styles = (kvp.get("STYLES") or "").split(",")
    if len(asked_styles) > len(names) and any(s.strip() for s in asked_styles[len(names):]):
        raise wms_error("StyleNotDefined", "styles", "STYLES has more entries than LAYERS")
    asked_styles += [""] * (len(names) - len(asked_styles))
    book = style_book(runtime)
    order: list[MapLayer | VectorMap] = []
    for entry, asked in zip(entries, asked_styles, strict=False):
        if isinstance(entry, VectorMap):
            _vector_style(entry, asked)
            order.append(entry)
        else:
            order.append(MapLayer(entry, pick_style(entry, layer_styles(entry, book), asked)))
    layers = tuple(e for e in order if isinstance(e, MapLayer))
    published = [e.published for e in layers]
    crs_name = "SRS" if version == V111 else "CRS"
    raw_crs = kvp.get(crs_name) or kvp.get("SRS" if version == V130 else "CRS")
    if raw_crs is None or not raw_crs.strip():
        raise wms_error("MissingParameterValue", crs_name.lower(), f"parameter {crs_name} is required")
    code = normalise_crs(raw_crs)
    offered = set(server_crs(settings))
    for p in published:  # membership first: PROJ is never asked to parse arbitrary client text
        if code not in offered.union(layer_crs(p)) or not usable_crs(p, code):
            raise wms_error("InvalidCRS", crs_name.lower(), f"{crs_name} {echo(raw_crs)} is not offered for layer {echo(p.id)}")
    for vector in (e for e in order if isinstance(e, VectorMap)):
        if code not in offered.union(map_layer_crs(vector)) or not map_crs_usable(vector, code):
            raise wms_error("InvalidCRS", crs_name.lower(), f"{crs_name} {echo(raw_crs)} is not offered for layer"
                            f" {echo(vector.id)}")
    info = crs_info(code)
    assert info is not None  # offered codes are known to PROJ
    bbox_text, box = _bbox(kvp)
    if version == V130 and info.northing_first:
        box = (box[1], box[0], box[3], box[2])
    width = positive_param(kvp, "WIDTH", settings.render_max_width)
    height = positive_param(kvp, "HEIGHT", settings.render_max_height)
    fmt = map_format(kvp.get("FORMAT"), format_required)
    return MapRequest(version, layers, info, bbox_text, Grid(info.grid_crs, box, width, height), fmt,
                      _transparent(kvp), _bgcolor(kvp), _format_options(kvp), tuple(order))
