"""WMS 1.3.0 (OGC 06-042) and 1.1.1: GetCapabilities, GetMap, GetFeatureInfo, GetLegendGraphic.

Maps go through `tileserver.render.pipeline`. Where the standard, the OGC conformance suite and
ROK4 differ, the suite wins (PEERS-AND-TESTS §2.3): StyleNotDefined / InvalidCRS / InvalidFormat
codes (ROK4 says InvalidParameterValue), a BBOX without data is an empty image, GetMap without
VERSION is an exception, EXCEPTIONS=INIMAGE|BLANK are honoured. HTTP status: 400 for client
mistakes, 501 for an unknown operation, 502/503 for storage trouble, 503 when every render
slot is busy (with Retry-After); INIMAGE and BLANK answer 200 with the image, as clients expect.

Axis order: in 1.3.0 a BBOX follows the CRS definition (EPSG:4326, EPSG:4258, EPSG:3035 are
northing first; CRS:84 and IGNF geographic CRSs are lon/lat); in 1.1.1 it is always x/y.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlparse

from lxml import etree
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.catalog import Catalog, PublishedLayer
from tileserver.render.encode import blank_image, encode_image, exception_in_image, normalise_format
from tileserver.render.georef import Grid, get_transformer
from tileserver.render.pipeline import (
    MapLayer,
    Raster,
    RenderBusy,
    RenderError,
    choose_level,
    gate_for,
    local_resolution,
    render_map,
)
from tileserver.render.styles import Style, legend_image
from tileserver.runtime import get_runtime
from tileserver.services.crs import (
    V111,
    V130,
    CRSInfo,
    axis_ordered,
    crs_info,
    layer_bbox,
    layer_crs,
    normalise_crs,
    server_crs,
    transformable,
    usable_crs,
)
from tileserver.services.numbers import positive_int, rounded, shortest
from tileserver.services.ows import (
    KVP,
    XLINK_NS,
    XML_DECLARATION,
    XSI_NS,
    OWSException,
    base_url,
    echo,
    fill_template,
    hash_key,
    key_hash,
    load_template,
    xml_text,
)
from tileserver.services.policy import (
    ServiceError,
    document_headers,
    error_response,
    map_headers,
    register,
    request_id,
)
from tileserver.services.relay import INFO_ALIASES, relay_feature_info
from tileserver.services.stylebook import layer_styles, style_book
from tileserver.services.tiles import feature_info

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


def _exception_response(exc: ServiceError, version: str) -> Response:
    return Response(exception_report(exc, version), status_code=exc.status, media_type=EXCEPTION_MIME[version])


def render_report(request: Request, error: ServiceError) -> Response:
    """The WMS error handler's format when the version is not known yet (the gate): 1.3.0."""
    return _exception_response(error, V130)


def _error(code: str, locator: str | None, message: str, status: int = 400, **headers: str) -> OWSException:
    return OWSException(code, locator, message, status, dict(headers) or None)


# --------------------------------------------------------------------------- CRS


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
    raise _error("StyleNotDefined", "styles", f"layer {echo(published.id)} has no style {echo(name)}")


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


def _version_of(kvp: KVP) -> str | None:
    """The version a non-capabilities request speaks (None if absent); WMTVER is 1.0's name."""
    value = kvp.get("VERSION") or kvp.get("WMTVER")
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text == V130:
        return V130
    if text in ("1.1.1", "1.1.0", "1.1", "1.0.0", "1.0.8", "1.0.7"):
        return V111
    raise _error("InvalidParameterValue", "version", f"VERSION {echo(text)} is not supported; use 1.3.0 or 1.1.1")


def _positive_int(kvp: KVP, name: str, limit: int) -> int:
    raw = kvp.require(name, name.lower())
    value = positive_int(raw, 9)
    if value is None:
        raise _error("InvalidParameterValue", name.lower(), f"{name} must be a positive integer, not {echo(raw)}")
    if value > limit:
        raise _error("InvalidParameterValue", name.lower(), f"{name} {value} exceeds the maximum {limit}")
    return value


def _bbox(kvp: KVP) -> tuple[str, tuple[float, float, float, float]]:
    raw = kvp.require("BBOX", "bbox")
    parts = raw.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise _error("InvalidParameterValue", "bbox", f"BBOX must be four numbers minx,miny,maxx,maxy, not {echo(raw)}")
    if not (values[0] < values[2] and values[1] < values[3]):
        raise _error("InvalidParameterValue", "bbox", f"BBOX {echo(raw)} has min ≥ max")
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
    raise _error("InvalidParameterValue", "transparent", f"TRANSPARENT must be TRUE or FALSE, not {echo(raw)}")


def _bgcolor(kvp: KVP) -> tuple[int, int, int]:
    raw = kvp.get("BGCOLOR")
    if raw is None or not raw.strip():
        return WHITE
    match = re.fullmatch(r"(?:0x|#)?([0-9a-fA-F]{6})", raw.strip())
    if not match:
        raise _error("InvalidParameterValue", "bgcolor", f"BGCOLOR must be 0xRRGGBB, not {echo(raw)}")
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
        raise _error("InvalidParameterValue", "format_options", f"quality must be within 1..100, not {echo(quality)}")
    compression = out.get("compression")
    if compression is not None and compression.lower() not in ("raw", "none", "lzw", "deflate", "zip", "packbits"):
        raise _error("InvalidParameterValue", "format_options",
                     f"compression must be raw, lzw, deflate or packbits, not {echo(compression)}")
    return out


def map_format(raw: str | None, required: bool) -> str | None:
    if raw is None or not raw.strip():
        if required:
            raise _error("MissingParameterValue", "format", "parameter FORMAT is required")
        return None
    try:
        fmt = normalise_format(raw)
    except ValueError:
        fmt = ""
    if fmt not in GETMAP_FORMATS:
        raise _error("InvalidFormat", "format", f"FORMAT {echo(raw)} is not offered; use one of {', '.join(GETMAP_FORMATS)}")
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
                          _positive_int(kvp, "WIDTH", settings.render_max_width),
                          _positive_int(kvp, "HEIGHT", settings.render_max_height),
                          _transparent(kvp), _bgcolor(kvp))
    except OWSException:
        return ImageFrame("XML")


def _layer(catalog: Catalog, name: str, key: str | None, locator: str = "layers") -> PublishedLayer:
    published = catalog.get(name, SERVICE, key)
    if published is None or published.format.is_vector:
        raise _error("LayerNotDefined", locator, f"no layer {echo(name)}")
    return published


def parse_map_request(kvp: KVP, runtime: Any, key: str | None, version: str, format_required: bool) -> MapRequest:
    """Validate the map parameters in the order a client fixes them: layers, styles, CRS, BBOX, size, format."""
    settings = runtime.settings
    catalog: Catalog = runtime.catalog
    names = [n.strip() for n in kvp.require("LAYERS", "layers").split(",")]
    if any(not n for n in names):
        raise _error("LayerNotDefined", "layers", "LAYERS has an empty entry")
    limit = settings.wms_layer_limit
    if len(names) > limit:
        raise _error("InvalidParameterValue", "layers", f"at most {limit} layers per request (LayerLimit)")
    published = [_layer(catalog, n, key) for n in names]
    asked_styles = (kvp.get("STYLES") or "").split(",")
    if len(asked_styles) > len(names) and any(s.strip() for s in asked_styles[len(names):]):
        raise _error("StyleNotDefined", "styles", "STYLES has more entries than LAYERS")
    asked_styles += [""] * (len(names) - len(asked_styles))
    book = style_book(runtime)
    layers = tuple(MapLayer(p, pick_style(p, layer_styles(p, book), s)) for p, s in zip(published, asked_styles, strict=False))
    crs_name = "SRS" if version == V111 else "CRS"
    raw_crs = kvp.get(crs_name) or kvp.get("SRS" if version == V130 else "CRS")
    if raw_crs is None or not raw_crs.strip():
        raise _error("MissingParameterValue", crs_name.lower(), f"parameter {crs_name} is required")
    code = normalise_crs(raw_crs)
    offered = set(server_crs(settings))
    for p in published:  # membership first: PROJ is never asked to parse arbitrary client text
        if code not in offered.union(layer_crs(p)) or not usable_crs(p, code):
            raise _error("InvalidCRS", crs_name.lower(), f"{crs_name} {echo(raw_crs)} is not offered for layer {echo(p.id)}")
    info = crs_info(code)
    assert info is not None  # offered codes are known to PROJ
    bbox_text, box = _bbox(kvp)
    if version == V130 and info.northing_first:
        box = (box[1], box[0], box[3], box[2])
    width = _positive_int(kvp, "WIDTH", settings.render_max_width)
    height = _positive_int(kvp, "HEIGHT", settings.render_max_height)
    fmt = map_format(kvp.get("FORMAT"), format_required)
    return MapRequest(version, layers, info, bbox_text, Grid(info.grid_crs, box, width, height), fmt,
                      _transparent(kvp), _bgcolor(kvp), _format_options(kvp))


# --------------------------------------------------------------------------- GetMap


def _encode(raster: Raster, req: MapRequest) -> tuple[bytes, str]:
    fmt = req.format
    assert fmt is not None
    quality = int(req.options["quality"]) if "quality" in req.options else None
    if fmt in PICTURE_FORMATS:
        return encode_image(raster.data, fmt, transparent=req.transparent, bgcolor=req.bgcolor, quality=quality)
    return encode_image(raster.data, fmt, nodata=raster.nodata, transparent=True if req.transparent else None,
                        grid=req.grid, tiff_compression=req.options.get("compression"))


async def _render(request: Request, runtime: Any, req: MapRequest) -> tuple[bytes, str]:
    settings = runtime.settings
    try:
        async with asyncio.timeout(settings.request_timeout):
            return await render_map(req.layers, req.grid, picture=req.format in PICTURE_FORMATS,
                                    gate=gate_for(runtime), max_tiles=settings.render_max_tiles,
                                    finish=lambda raster: _encode(raster, req))  # inside budget and deadline
    except RenderBusy as exc:
        raise _error("NoApplicableCode", None, exc.message, 503, **{"Retry-After": "2"}) from None
    except TimeoutError:
        raise _error("NoApplicableCode", None, f"the map took longer than {settings.request_timeout:g} s",
                     503, **{"Retry-After": "5"}) from None
    except RenderError as exc:
        if exc.status >= 500:
            log.error("%s render failed (%d): %s", request_id(request), exc.status, exc.message)
            reason = "stored data is unreadable" if exc.status == 502 else "storage is unavailable"
            raise _error("NoApplicableCode", None, f"{reason} (request {request_id(request)})", exc.status) from None
        raise _error("InvalidParameterValue", None, exc.message) from None
    except ValueError as exc:  # the format cannot hold this data (float as ASC with bands…)
        raise _error("InvalidFormat", "format", str(exc)) from None


async def get_map(request: Request, kvp: KVP, version: str) -> Response:
    runtime = get_runtime(request)
    req = parse_map_request(kvp, runtime, key_hash(request), version, format_required=True)
    body, content_type = await _render(request, runtime, req)
    headers = {"Content-Type": content_type}  # exact: no charset appended to text/asc
    headers.update(map_headers((layer.published for layer in req.layers), runtime.settings))
    return Response(body, headers=headers)


def _image_exception(exc: ServiceError, frame: ImageFrame) -> Response:
    assert frame.format is not None
    if frame.mode == "BLANK":
        body, mime = blank_image(frame.width, frame.height, frame.format, transparent=frame.transparent,
                                 bgcolor=frame.bgcolor)
    else:
        body, mime = exception_in_image(f"{exc.code}: {exc.message}", frame.width, frame.height, frame.format,
                                        transparent=frame.transparent, bgcolor=frame.bgcolor)
    return Response(body, media_type=mime)


# --------------------------------------------------------------------------- GetFeatureInfo


def _info_format(kvp: KVP) -> str:
    raw = kvp.require("INFO_FORMAT", "info_format")
    value = "".join(raw.split()).lower()
    value = INFO_ALIASES.get(value, value)
    if value not in INFO_FORMATS:
        raise _error("InvalidFormat", "info_format", f"INFO_FORMAT {echo(raw)} is not offered; use one of "
                     f"{', '.join(INFO_FORMATS)}")
    return value


def _point(kvp: KVP, version: str, grid: Grid) -> tuple[int, int]:
    names = ("X", "Y") if version == V111 else ("I", "J")
    out = []
    for name, size in zip(names, (grid.width, grid.height), strict=True):
        raw = kvp.get(name)
        if raw is None or not raw.strip():
            raise _error("MissingParameterValue", name.lower(), f"parameter {name} is required")
        text = raw.strip()
        if not re.fullmatch(r"[+-]?\d{1,9}", text) or not 0 <= int(text) < size:
            raise _error("InvalidPoint", name.lower(), f"{name} must be an integer within 0..{size - 1}, not {echo(raw)}")
        out.append(int(text))
    return out[0], out[1]


@dataclass(frozen=True)
class PixelInfo:
    layer: str
    values: list[float] | None  # None: no data there
    level: str | None = None


async def pixel_info(published: PublishedLayer, grid: Grid, i: int, j: int) -> PixelInfo:
    """Stored values under the centre of pixel (i, j) at the level GetMap would read."""
    x, y = grid.to_coords(i, j)
    tms = published.tms
    px, py = get_transformer(grid.crs, tms.crs).transform(float(x), float(y), errcheck=False)
    if not (math.isfinite(px) and math.isfinite(py)):
        return PixelInfo(published.id, None)
    area = (float(x) - grid.res_x, float(y) - grid.res_y, float(x) + grid.res_x, float(y) + grid.res_y)
    level = choose_level(published, local_resolution(grid, area, tms.crs, samples=1))
    col, row, pi, pj = published.matrix(level).point_to_pixel(px, py)
    return PixelInfo(published.id, await feature_info(published, level, col, row, pi, pj), level)


def _lonlat(grid: Grid, i: int, j: int) -> list[float] | None:
    if not transformable(grid.crs, "EPSG:4326"):
        return None
    x, y = grid.to_coords(i, j)
    lon, lat = get_transformer(grid.crs, "EPSG:4326").transform(float(x), float(y), errcheck=False)
    return [lon, lat] if math.isfinite(lon) and math.isfinite(lat) else None


def _info_plain(infos: list[PixelInfo], grid: Grid, i: int, j: int) -> bytes:
    """ROK4's text/plain: the bare band values, comma-joined, nothing else (its suite matches the whole
    body against a number); one line per queried layer, in QUERY_LAYERS order; no data is an empty line."""
    return "\n".join(",".join(shortest(v) for v in p.values or ()) for p in infos).encode()


def _info_html(infos: list[PixelInfo], grid: Grid, i: int, j: int) -> bytes:
    """ROK4's text/html opening (its suite checks it), then the values of each queried layer."""
    parts = ["<html><body><b>FeatureInfo :</b><br>"]
    for p in infos:
        parts.append(f"<h3>{html.escape(p.layer)}</h3><ul>")
        parts += [f"<li>{shortest(v)}</li>" for v in p.values or ()] or ["<li>no data</li>"]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "".join(parts).encode()


def _info_json(infos: list[PixelInfo], grid: Grid, i: int, j: int) -> bytes:
    point = _lonlat(grid, i, j)
    features = [{"type": "Feature", "id": p.layer,
                 "geometry": {"type": "Point", "coordinates": point} if point else None,
                 "properties": {"layer": p.layer, "pixel": p.values, "level": p.level}} for p in infos]
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


def _info_xml(infos: list[PixelInfo], grid: Grid, i: int, j: int) -> bytes:
    root = etree.Element("FeatureInfoResponse")
    for p in infos:
        layer = etree.SubElement(root, "Layer", name=xml_text(p.layer))
        pixel = etree.SubElement(layer, "Pixel")
        for v in p.values or ():
            etree.SubElement(pixel, "Band").text = shortest(v)
    return XML_DECLARATION + etree.tostring(root, encoding="UTF-8", pretty_print=True)


INFO_WRITERS: dict[str, Callable[[list[PixelInfo], Grid, int, int], bytes]] = {
    "text/plain": _info_plain, "text/html": _info_html, "application/json": _info_json, "text/xml": _info_xml,
}


async def get_feature_info(request: Request, kvp: KVP, version: str) -> Response:
    runtime = get_runtime(request)
    key = key_hash(request)
    req = parse_map_request(kvp, runtime, key, version, format_required=False)
    names = [n.strip() for n in kvp.require("QUERY_LAYERS", "query_layers").split(",") if n.strip()]
    if not names:
        raise _error("MissingParameterValue", "query_layers", "parameter QUERY_LAYERS is required")
    map_names = {layer.published.id for layer in req.layers}
    queried = []
    for name in names:
        published = _layer(runtime.catalog, name, key, "query_layers")
        if name not in map_names:
            raise _error("LayerNotDefined", "query_layers", f"query layer {echo(name)} is not in LAYERS")
        if not published.layer.queryable:
            raise _error("LayerNotQueryable", "query_layers", f"layer {echo(name)} is not queryable")
        queried.append(published)
    info_format = _info_format(kvp)
    i, j = _point(kvp, version, req.grid)
    external = [p for p in queried if (p.layer.get_feature_info or {}).get("type") == "EXTERNALWMS"]
    if external:
        if len(queried) > 1:
            raise _error("InvalidParameterValue", "query_layers",
                         f"layer {echo(external[0].id)} is answered by another WMS and must be queried alone")
        asked = {"FEATURE_COUNT": kvp.get("FEATURE_COUNT") or "1", "INFO_FORMAT": kvp.get("INFO_FORMAT") or info_format}
        if req.version == V130:
            asked["BBOX"] = req.bbox_text  # verbatim: the client's digits, its axis order
        relayed = await relay_feature_info(request, external[0], req.crs.code, req.grid.bbox,
                                           (req.grid.width, req.grid.height), i, j, info_format, asked)
        relayed.headers.update(map_headers(queried, runtime.settings))
        return relayed
    infos = list(await asyncio.gather(*(pixel_info(p, req.grid, i, j) for p in queried)))
    body = INFO_WRITERS[info_format](infos, req.grid, i, j)
    content_type = info_format + ("; charset=utf-8" if info_format.startswith("text/") else "")
    return Response(body, headers={"Content-Type": content_type, **map_headers(queried, runtime.settings)})


# --------------------------------------------------------------------------- GetLegendGraphic


def legend_url(base: str, published: PublishedLayer, style: Style, url_key: str | None) -> tuple[str, str, int, int]:
    """(href, format, width, height) of a style's legend: the style's own image URL when it
    names one (a path, not a bare site), else our GetLegendGraphic at the advertised size."""
    legend = style.legend
    if legend is not None and urlparse(legend.url).path not in ("", "/"):
        return legend.url, legend.format, legend.width, legend.height
    width, height = (legend.width, legend.height) if legend is not None else LEGEND_SIZE
    params = {"SERVICE": "WMS", "REQUEST": "GetLegendGraphic", "VERSION": V130, "LAYER": published.id,
              "STYLE": style.identifier, "FORMAT": "image/png", "WIDTH": width, "HEIGHT": height}
    if url_key:
        params["apikey"] = url_key
    return f"{base}/wms?{urlencode(params)}", "image/png", width, height


async def get_legend_graphic(request: Request, kvp: KVP) -> Response:
    runtime = get_runtime(request)
    published = _layer(runtime.catalog, kvp.require("LAYER", "layer").strip(), key_hash(request), "layer")
    style = pick_style(published, layer_styles(published, style_book(runtime)), kvp.get("STYLE") or "")
    fmt = (kvp.get("FORMAT") or "image/png").strip().lower()
    if fmt != "image/png":
        raise _error("InvalidFormat", "format", "legends are PNG images")
    default_w, default_h = (style.legend.width, style.legend.height) if style.legend else LEGEND_SIZE
    width = _positive_int(kvp, "WIDTH", 2048) if kvp.get("WIDTH") else default_w
    height = _positive_int(kvp, "HEIGHT", 2048) if kvp.get("HEIGHT") else default_h
    body = await asyncio.to_thread(legend_image, style, width, height)
    return Response(body, media_type="image/png", headers=map_headers((published,), runtime.settings))


# --------------------------------------------------------------------------- GetCapabilities


def _url_key(request: Request, catalog: Catalog) -> str | None:
    """A valid key given in the query string is repeated in advertised URLs, so clients keep sending it."""
    key = KVP.from_request(request).get("apikey")
    return key if key and hash_key(key) in catalog.key_access else None


class _Builder:
    """Element helpers for one version: 1.3.0 is namespaced, 1.1.1 is not."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.ns = f"{{{WMS_NS}}}" if version == V130 else ""

    def el(self, parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
        node = etree.SubElement(parent, self.ns + tag, {k: xml_text(v) for k, v in attrs.items()})
        if text is not None:
            node.text = xml_text(text)
        return node

    def link(self, parent: etree._Element, tag: str, href: str, **attrs: str) -> etree._Element:
        # 1.1.1's DTD wants xmlns:xlink on every OnlineResource; in 1.3.0 the root's is in scope
        node = etree.SubElement(parent, self.ns + tag, {k: xml_text(v) for k, v in attrs.items()},
                                nsmap={"xlink": XLINK_NS})
        node.set(f"{{{XLINK_NS}}}type", "simple")
        node.set(f"{{{XLINK_NS}}}href", xml_text(href))
        return node

    def find(self, root: etree._Element, path: str) -> etree._Element:
        node = root.find("/".join(self.ns + p for p in path.split("/")))
        assert node is not None, f"template has no {path}"
        return node

    def keywords(self, parent: etree._Element, words: tuple[str, ...]) -> None:
        if words:
            node = self.el(parent, "KeywordList")
            for word in words:
                self.el(node, "Keyword", word)

    def bounding_boxes(self, parent: etree._Element, boxes: list[tuple[str, tuple[float, float, float, float]]]) -> None:
        """Geographic box, then one BoundingBox per CRS, in the version's axis order."""
        crs_attr = "CRS" if self.version == V130 else "SRS"
        for code, box in boxes:
            info = crs_info(code)
            assert info is not None
            ordered = axis_ordered(box, info, self.version)
            attrs = dict(zip(("minx", "miny", "maxx", "maxy"), (rounded(v) for v in ordered), strict=True))
            if self.version == V111 and code == "CRS:84":
                continue
            self.el(parent, "BoundingBox", **{crs_attr: code}, **attrs)

    def geographic(self, parent: etree._Element, box: tuple[float, float, float, float]) -> None:
        west, south, east, north = _clamp_wgs84(box)
        if self.version == V130:
            node = self.el(parent, "EX_GeographicBoundingBox")
            for tag, value in (("westBoundLongitude", west), ("eastBoundLongitude", east),
                               ("southBoundLatitude", south), ("northBoundLatitude", north)):
                self.el(node, tag, rounded(value))
        else:
            self.el(parent, "LatLonBoundingBox", minx=rounded(west), miny=rounded(south), maxx=rounded(east), maxy=rounded(north))


def _clamp_wgs84(box: tuple[float, ...]) -> tuple[float, float, float, float]:
    west, south, east, north = max(box[0], -180.0), max(box[1], -90.0), min(box[2], 180.0), min(box[3], 90.0)
    if not west < east:
        west, east = -180.0, 180.0
    if not south < north:
        south, north = -90.0, 90.0
    return west, south, east, north


def _layer_node(b: _Builder, parent: etree._Element, published: PublishedLayer, root_crs: tuple[str, ...],
                book: Mapping[str, Style], base: str, url_key: str | None) -> None:
    layer = published.layer
    node = b.el(parent, "Layer", queryable="1" if layer.queryable else "0")
    b.el(node, "Name", published.id)
    b.el(node, "Title", layer.title or published.id)
    if layer.abstract:
        b.el(node, "Abstract", layer.abstract)
    b.keywords(node, layer.keywords)
    own = [c for c in layer_crs(published) if c not in root_crs]
    for code in own:
        b.el(node, "CRS" if b.version == V130 else "SRS", code)
    b.geographic(node, published.wgs84_bbox)
    boxes = [(c, box) for c in (*root_crs, *own) if (box := layer_bbox(published, c)) is not None]
    b.bounding_boxes(node, boxes)
    attribution = layer.attribution or {}
    if attribution:
        att = b.el(node, "Attribution")
        if attribution.get("title"):
            b.el(att, "Title", str(attribution["title"]))
        if attribution.get("url"):
            b.link(att, "OnlineResource", str(attribution["url"]))
        logo = attribution.get("logo")
        if isinstance(logo, dict) and logo.get("url"):
            logo_node = b.el(att, "LogoURL", width=str(int(logo.get("width", 1))), height=str(int(logo.get("height", 1))))
            b.el(logo_node, "Format", str(logo.get("format", "image/png")))
            b.link(logo_node, "OnlineResource", str(logo["url"]))
    for meta in layer.metadata:
        kind = str(meta.get("type") or "ISO19115:2003")
        if b.version == V111:  # the 1.1.1 DTD knows two types only
            kind = "FGDC" if kind.upper().startswith("FGDC") else "TC211"
        meta_node = b.el(node, "MetadataURL", type=kind)
        b.el(meta_node, "Format", str(meta.get("format") or "text/xml"))
        b.link(meta_node, "OnlineResource", str(meta["url"]))
    for style in layer_styles(published, book):
        style_node = b.el(node, "Style")
        b.el(style_node, "Name", style.identifier)
        b.el(style_node, "Title", style.title or style.identifier)
        if style.abstract:
            b.el(style_node, "Abstract", style.abstract)
        if style.palette is not None or style.legend is not None:
            href, fmt, width, height = legend_url(base, published, style, url_key)
            legend = b.el(style_node, "LegendURL", width=str(width), height=str(height))
            b.el(legend, "Format", fmt)
            b.link(legend, "OnlineResource", href)
    bottom, top = published.matrix(published.bottom_level), published.matrix(published.top_level)
    if b.version == V130:
        b.el(node, "MinScaleDenominator", rounded(published.tms.scale_denominator(bottom)))
        b.el(node, "MaxScaleDenominator", rounded(published.tms.scale_denominator(top)))
    else:  # ScaleHint: ground size of a pixel's diagonal, metres
        factor = math.sqrt(2) * published.tms.metres_per_unit
        b.el(node, "ScaleHint", min=rounded(bottom.cell_size * factor), max=rounded(top.cell_size * factor))


def build_capabilities(runtime: Any, layers: list[PublishedLayer], base: str, version: str,
                       url_key: str | None) -> bytes:
    settings = runtime.settings
    catalog: Catalog = runtime.catalog
    kvp_url = f"{base}/wms?" + (f"apikey={quote(url_key, safe='')}&" if url_key else "")
    root = fill_template(load_template(TEMPLATES[version]), {
        "update_sequence": str(catalog.revision),
        "title": settings.service_title,
        "abstract": settings.service_abstract,
        "provider_name": settings.provider_name,
        "service_url": settings.provider_site or f"{base}/wms",
        "kvp_url": kvp_url,
        "layer_limit": str(settings.wms_layer_limit),
        "max_width": str(settings.render_max_width),
        "max_height": str(settings.render_max_height),
        "root_title": settings.wms_root_title or settings.service_title,
        "root_abstract": settings.wms_root_abstract or settings.service_abstract,
    })
    b = _Builder(version)
    for operation, formats in (("GetMap", GETMAP_FORMATS), ("GetFeatureInfo", INFO_FORMATS)):
        op = b.find(root, f"Capability/Request/{operation}")
        dcp = op[0]
        for position, fmt in enumerate(formats):
            element = etree.Element(b.ns + "Format")
            element.text = fmt
            op.insert(position, element)
        assert dcp.tag.endswith("DCPType")
    exception = b.find(root, "Capability/Exception")
    modes = ("XML", "INIMAGE", "BLANK") if version == V130 else (
        "application/vnd.ogc.se_xml", "application/vnd.ogc.se_inimage", "application/vnd.ogc.se_blank")
    for mode in modes:
        b.el(exception, "Format", mode)
    top = b.find(root, "Capability/Layer")
    root_crs = server_crs(settings)
    for code in root_crs:
        b.el(top, "CRS" if version == V130 else "SRS", code)
    world = _union([p.wgs84_bbox for p in layers]) if layers else (-180.0, -90.0, 180.0, 90.0)
    b.geographic(top, world)
    b.bounding_boxes(top, [("CRS:84", _clamp_wgs84(world))] if version == V130 else [("EPSG:4326", _clamp_wgs84(world))])
    book = style_book(runtime)
    for published in layers:
        _layer_node(b, top, published, root_crs, book, base, url_key)
    doctype = f'<!DOCTYPE WMT_MS_Capabilities SYSTEM "{DTD_111}capabilities_1_1_1.dtd">' if version == V111 else None
    return XML_DECLARATION + etree.tostring(root, encoding="UTF-8", pretty_print=True, doctype=doctype)


def _union(boxes: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def visible_layers(request: Request) -> list[PublishedLayer]:
    catalog = get_runtime(request).catalog
    return sorted((p for p in catalog.visible(SERVICE, key_hash(request)) if not p.format.is_vector),
                  key=lambda p: p.id)


def capabilities_document(request: Request, version: str) -> bytes:
    """Cached per catalog snapshot, version, base URL and the layers the caller may see."""
    runtime = get_runtime(request)
    catalog = runtime.catalog
    layers = visible_layers(request)
    base = base_url(request)
    url_key = _url_key(request, catalog)
    cache_key = ("wms-caps", version, base, tuple(p.id for p in layers), url_key)

    def build() -> bytes:
        return build_capabilities(runtime, layers, base, version, url_key)

    cached = sum(1 for k in catalog.documents if isinstance(k, tuple) and k[:1] == ("wms-caps",))
    if cache_key not in catalog.documents and cached >= MAX_CACHED_DOCUMENTS:
        return build()  # forged Host headers must not grow the cache without bound
    return catalog.document(cache_key, build)


def negotiate(asked: str | None) -> str:
    """WMS version negotiation (06-042 §6.2.4): the asked version if supported, else the highest
    lower one, else the lowest we have; none asked → the highest."""
    if asked is None or not asked.strip():
        return SUPPORTED_VERSIONS[-1]
    try:
        wanted = tuple(int(p) for p in asked.strip().split("."))
    except ValueError:
        return SUPPORTED_VERSIONS[-1]
    lower = [v for v in SUPPORTED_VERSIONS if tuple(int(p) for p in v.split(".")) <= wanted]
    return lower[-1] if lower else SUPPORTED_VERSIONS[0]


async def get_capabilities(request: Request, kvp: KVP) -> Response:
    version = negotiate(kvp.get("VERSION") or kvp.get("WMTVER"))
    revision = get_runtime(request).catalog.revision
    sequence = (kvp.get("UPDATESEQUENCE") or "").strip()
    if sequence:
        if sequence == str(revision):
            raise _error("CurrentUpdateSequence", "updatesequence", f"updateSequence {revision} is current")
        if sequence.isdigit() and int(sequence) > revision:
            raise _error("InvalidUpdateSequence", "updatesequence", f"updateSequence {echo(sequence)} is newer than {revision}")
    body = capabilities_document(request, version)
    return Response(body, media_type=CAPABILITIES_MIME[version],
                    headers=document_headers(request, visible_layers(request)))


# --------------------------------------------------------------------------- dispatch


OPERATIONS = {"getcapabilities": "GetCapabilities", "capabilities": "GetCapabilities", "getmap": "GetMap",
              "map": "GetMap", "getfeatureinfo": "GetFeatureInfo", "feature_info": "GetFeatureInfo",
              "getlegendgraphic": "GetLegendGraphic"}


async def endpoint(request: Request) -> Response:
    kvp: KVP | None = None
    version = V130
    frame = ImageFrame("XML")
    try:
        kvp = KVP.from_request(request)
        runtime = get_runtime(request)
        try:
            version = _version_of(kvp) or V130
        except OWSException:
            pass  # reported below, by the operation that needs it
        service = kvp.get("SERVICE")
        operation = kvp.require("REQUEST", "request").strip()
        name = OPERATIONS.get(operation.lower())
        if name == "GetCapabilities":
            version = negotiate(kvp.get("VERSION") or kvp.get("WMTVER"))
        # 06-042 §7.2.2 asks SERVICE of GetCapabilities only; §7.3-7.4 list GetMap's and
        # GetFeatureInfo's parameters without it, and OGC's suite and some clients send none
        if service is None or not service.strip():
            if name == "GetCapabilities":
                raise _error("MissingParameterValue", "service", "parameter SERVICE is required")
        elif service.strip().upper() != "WMS":
            raise _error("InvalidParameterValue", "service", f"SERVICE must be WMS, not {echo(service)}")
        if name is None:
            raise _error("OperationNotSupported", "request", f"unknown operation {echo(operation)}", 501)
        if name == "GetCapabilities":
            return await get_capabilities(request, kvp)
        if name == "GetLegendGraphic":
            return await get_legend_graphic(request, kvp)
        asked = _version_of(kvp)
        if asked is None:
            raise _error("MissingParameterValue", "version", f"parameter VERSION is required for {name}")
        version = asked
        if name == "GetMap":
            frame = image_frame(kvp, runtime.settings)
            return await get_map(request, kvp, version)
        return await get_feature_info(request, kvp, version)
    except ServiceError as exc:
        if frame.mode != "XML" and exc.status < 500:
            return error_response(request, exc, lambda _, error: _image_exception(error, frame))
        return error_response(request, exc, lambda _, error: _exception_response(error, version))


def routes() -> list[BaseRoute]:
    register(SERVICE, render_report)
    return [Route("/wms", endpoint, methods=["GET"])]
