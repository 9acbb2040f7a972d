"""WMTS 1.0.0 (OGC 07-057r7): KVP and RESTful GetCapabilities, GetTile and GetFeatureInfo.

Every layer is offered in its grid under two ids, as ROK4 does: the full grid (`PM`) and the
published range `<TMS>_<top>_<bottom>` (`PM_0_15`). Inside the advertised TileMatrixSetLimits
every tile is an image (a nodata tile where no slab exists); a TileMatrix listed in a set but
not in the limits is unrestricted by WMTS rules, so its tiles are nodata images too. KVP and
REST go through the same validation, hence identical bytes and errors.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict
from urllib.parse import quote

import pyproj
from lxml import etree
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.catalog import Catalog, PublishedLayer
from tileserver.rok4.tms import TileMatrix
from tileserver.runtime import get_runtime
from tileserver.services.grids import GridSet, converted_formats, grid_sets
from tileserver.services.numbers import BadIndex, parse_index, shortest
from tileserver.services.ows import (
    KVP,
    OWS_NS,
    XLINK_NS,
    XML_DECLARATION,
    OWSException,
    base_url,
    echo,
    fill_template,
    hash_key,
    key_hash,
    load_template,
    ows_endpoint,
    render_report,
)
from tileserver.services.policy import document_headers, map_headers, register
from tileserver.services.relay import relay_feature_info
from tileserver.services.stylebook import DEFAULT_STYLE, style_book, tile_styles
from tileserver.services.tiles import (
    TileAnswer,
    TileNotFound,
    empty_tile,
    feature_info,
    native_tile,
    rendered_tile,
    tile_response,
)

SERVICE = "wmts"
VERSION = "1.0.0"
WMTS_NS = "http://www.opengis.net/wmts/1.0"
TEMPLATE = "wmts-1.0.0.xml"
REST_PREFIX = "/wmts/1.0.0"
CAPABILITIES_PATH = f"{REST_PREFIX}/WMTSCapabilities.xml"
MAX_CACHED_DOCUMENTS = 64  # capabilities variants kept per snapshot (base URL × key access)

# Where the conformance suite (ets-wmts10) and the letter of the standard or ROK4 disagree, we
# follow the suite; one table so the choice is visible and reversible.
class _Policy(TypedDict):
    unknown_request: tuple[str, str]
    not_queryable: tuple[str, str]
    gfi_tile_out_of_range: str
    point_out_of_range: str


POLICY: _Policy = {
    # Server.KVP.GET.InvalidRequest: REQUEST=GetBOGUS → 400 InvalidParameterValue "request"
    # (ROK4: OperationNotSupported).
    "unknown_request": ("InvalidParameterValue", "request"),
    # GetFeatureInfo.NonQueryable.Layer → 501 OperationNotSupported "GetFeatureInfo"
    # (ROK4: InvalidParameterValue "layer").
    "not_queryable": ("OperationNotSupported", "GetFeatureInfo"),
    # GetFeatureInfo with TileRow/TileCol outside the limits → TileOutOfRange, as GetTile: 07-057r7
    # §7.3 gives GetFeatureInfo GetTile's parameters and their exceptions (ROK4 and an earlier choice
    # here: InvalidParameterValue).
    "gfi_tile_out_of_range": "TileOutOfRange",
    # GetFeatureInfo.Invalid.I/J → InvalidParameterValue (07-057r7 table 28 and ROK4: PointIJOutOfRange).
    "point_out_of_range": "InvalidParameterValue",
}

# REST extension → Format, and the extension each native MIME type is advertised with.
EXTENSIONS = {
    "jpeg": "image/jpeg",
    "jpg": "image/jpeg",
    "png": "image/png",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "bil": "image/x-bil;bits=32",
}
CANONICAL_EXTENSION = {
    "image/jpeg": "jpeg",
    "image/png": "png",
    "image/tiff": "tif",
    "image/x-bil;bits=32": "bil",
}
INFO_FORMATS = {"text/plain": "txt", "application/json": "json", "text/html": "html", "text/xml": "xml"}
INFO_EXTENSIONS = {ext: mime for mime, ext in INFO_FORMATS.items()}
SECTIONS = ("ServiceIdentification", "ServiceProvider", "OperationsMetadata", "Contents", "Themes")
CAPABILITIES_FORMATS = ("application/xml", "text/xml")


def _ows(tag: str) -> str:
    return f"{{{OWS_NS}}}{tag}"


def _wmts(tag: str) -> str:
    return f"{{{WMTS_NS}}}{tag}"


def _same_mime(a: str, b: str) -> bool:
    """MIME types compare without case or blanks around parameters (`image/x-bil; bits=32`)."""
    return a.replace(" ", "").lower() == b.replace(" ", "").lower()


# --- grids offered per layer --------------------------------------------------------------------


STYLED_FORMATS = ("image/png", "image/jpeg")  # what a style that changes pixels renders to


def tile_formats(published: PublishedLayer, styles: Mapping[str, Any]) -> tuple[str, ...]:
    """Formats a layer's tiles are advertised in, whatever the style: the capabilities list them
    per layer, so `resolve_tile` must answer every style in every one of them. A DEM lists its
    pictures first: GDAL reads tiles through the first ResourceURL, and cannot decode BIL."""
    formats = (published.format.mime, *converted_formats(published))
    if len(styles) > 1:
        formats += tuple(f for f in STYLED_FORMATS if f not in formats)
    if published.format.sample_format == "FLOAT32":
        formats = tuple(sorted(formats, key=lambda f: f not in STYLED_FORMATS))
    return formats


def drawing_style(published: PublishedLayer, styles: Mapping[str, Any], style: str, mime: str) -> Any:
    """The style a tile is drawn with, None for the stored values. A style draws pictures (PNG,
    JPEG): in a data format (BIL, TIFF) every style is the stored values. A DEM has no picture
    of its own, so `normal` in PNG/JPEG is drawn with the layer's first style that draws one."""
    if mime not in STYLED_FORMATS:
        return None
    chosen = styles[style]
    if chosen is None and published.format.sample_format == "FLOAT32":
        chosen = next((s for s in styles.values() if s is not None), None)
    return chosen


def queryable(published: PublishedLayer) -> bool:
    """GetFeatureInfo on pixel values (PYRAMID) or relayed to the WMS the layer names (EXTERNALWMS)."""
    gfi = published.layer.get_feature_info
    return gfi is not None and gfi.get("type") in ("PYRAMID", "EXTERNALWMS")


def served(published: PublishedLayer) -> bool:
    """WMTS lists raster layers only (ROK4 ≥ 5.4.1 does the same for vector pyramids)."""
    return not published.format.is_vector


# --- validation shared by KVP and REST ----------------------------------------------------------

TILE_PARAMETERS = ("layer", "style", "format", "TileMatrixSet", "TileMatrix", "TileRow", "TileCol")


@dataclass(frozen=True)
class TileRequest:
    published: PublishedLayer
    grid: GridSet
    matrix: TileMatrix
    row: int
    col: int
    mime: str = ""
    style: Any = None  # a style that changes pixels, or None: as stored

    @property
    def level(self) -> str:
        return self.matrix.id

    @property
    def published_level(self) -> bool:
        return self.matrix.id in self.published.limits

    @property
    def below_bottom(self) -> bool:
        """A matrix of the full grid finer than the published bottom level."""
        bottom = self.published.matrix(self.published.bottom_level)
        return self.grid.native and not self.published_level and self.matrix.cell_size < bottom.cell_size

    @property
    def rendered(self) -> bool:
        """Not a stored tile: another grid, format or style, or a level below the bottom one (the
        bottom level's data magnified, as WMS draws it), made by the render pipeline."""
        return (
            not self.grid.native
            or self.mime != self.published.format.mime
            or self.style is not None
            or self.below_bottom
        )

    def outside_extent(self) -> bool:
        """The tile does not overlap the layer's extent in its grid: nothing to render there."""
        extent = self.grid.extent
        if extent is None:
            return False
        xmin, ymin, xmax, ymax = self.matrix.tile_bbox(self.col, self.row)
        return xmin >= extent[2] or xmax <= extent[0] or ymin >= extent[3] or ymax <= extent[1]


def _integer(value: str, locator: str) -> int:
    try:
        return parse_index(value.strip())
    except BadIndex:
        raise OWSException(
            "InvalidParameterValue", locator, f"{locator} must be an integer, not {echo(value)}"
        ) from None


def _missing(params: Mapping[str, str | None], names: tuple[str, ...]) -> None:
    for name in names:
        value = params.get(name)
        if value is None or (not value.strip() and name != "style"):
            raise OWSException("MissingParameterValue", name, f"parameter {name} is required")


def _layer(catalog: Catalog, layer_id: str, key: str | None) -> PublishedLayer:
    published = catalog.get(layer_id, SERVICE, key)
    if published is None or not served(published):
        raise OWSException("InvalidParameterValue", "layer", f"unknown layer {echo(layer_id)}")
    return published


def resolve_tile(
    catalog: Catalog,
    params: Mapping[str, str | None],
    key: str | None,
    info: bool = False,
    book: Mapping[str, Any] | None = None,
) -> TileRequest:
    """Check GetTile (or the tile part of GetFeatureInfo) parameters, in the order the standard lists them."""
    _missing(params, TILE_PARAMETERS)
    published = _layer(catalog, params["layer"] or "", key)
    if info and not queryable(published):
        code, locator = POLICY["not_queryable"]
        raise OWSException(code, locator, f"layer {published.id} is not queryable")
    style = (params["style"] or "").strip() or DEFAULT_STYLE
    styles = tile_styles(published, book)
    if style not in styles:
        raise OWSException(
            "InvalidParameterValue", "style", f"unknown style {echo(style)} for layer {published.id}"
        )
    fmt = params["format"] or ""
    offered = tile_formats(published, styles)
    mime = next((m for m in offered if _same_mime(fmt, m)), None)
    if mime is None:
        raise OWSException(
            "InvalidParameterValue",
            "format",
            f"format {echo(fmt)} is not offered, use {' or '.join(offered)}",
        )
    sets = grid_sets(catalog, published)
    set_id = params["TileMatrixSet"] or ""
    grid = sets.get(set_id)
    if grid is None or (info and not grid.native):
        raise OWSException(
            "InvalidParameterValue",
            "TileMatrixSet",
            f"TileMatrixSet {echo(set_id)} is unknown for layer {published.id}",
        )
    matrix = grid.matrix(params["TileMatrix"] or "")
    if matrix is None:
        raise OWSException(
            "InvalidParameterValue",
            "TileMatrix",
            f"unknown TileMatrix {echo(params['TileMatrix'])} in {grid.id}",
        )
    row = _integer(params["TileRow"] or "", "TileRow")
    col = _integer(params["TileCol"] or "", "TileCol")
    limits = grid.limits.get(matrix.id)
    if limits is not None:
        rows, cols = (limits.min_row, limits.max_row), (limits.min_col, limits.max_col)
    else:  # listed in the set without limits: the whole matrix
        rows, cols = (0, matrix.matrix_height - 1), (0, matrix.matrix_width - 1)
    code = POLICY["gfi_tile_out_of_range"] if info else "TileOutOfRange"
    for value, (low, high), locator in ((row, rows, "TileRow"), (col, cols, "TileCol")):
        if not low <= value <= high:
            raise OWSException(
                code, locator, f"{locator} {value} is outside [{low}, {high}] at TileMatrix {matrix.id}"
            )
    rendering = None if info else drawing_style(published, styles, style, mime)
    return TileRequest(published, grid, matrix, row, col, mime, rendering)


async def _tile_answer(request: Request, tile: TileRequest) -> TileAnswer:
    as_stored = tile.mime == tile.published.format.mime and tile.style is None
    if tile.below_bottom and as_stored and tile.outside_extent():  # nothing to magnify: no render
        try:
            return empty_tile(tile.published, tile.level)
        except TileNotFound:
            raise OWSException("Not Found", None, "No data found", 404) from None
    if tile.rendered:
        runtime = get_runtime(request)
        return await rendered_tile(
            runtime, tile.published, tile.grid.tms, tile.level, tile.col, tile.row, tile.style, tile.mime
        )
    try:
        answer = None
        if tile.published_level:
            answer = await native_tile(tile.published, tile.level, tile.col, tile.row)
        return answer or empty_tile(tile.published, tile.level)
    except TileNotFound:
        raise OWSException("Not Found", None, "No data found", 404) from None


async def get_tile(request: Request, params: Mapping[str, str | None], key: str | None) -> Response:
    runtime = get_runtime(request)
    tile = resolve_tile(runtime.catalog, params, key, book=style_book(runtime))
    answer = await _tile_answer(request, tile)
    return tile_response(answer, tile.published, runtime.settings, request.headers.get("accept-encoding"))


# --- GetFeatureInfo -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _to_wgs84(crs: str) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True)


def _pixel_lonlat(tile: TileRequest, i: int, j: int) -> tuple[float, float] | None:
    xmin, _, _, ymax = tile.matrix.tile_bbox(tile.col, tile.row)
    x = xmin + (i + 0.5) * tile.matrix.cell_size
    y = ymax - (j + 0.5) * tile.matrix.cell_size
    lon, lat = _to_wgs84(tile.grid.tms.crs).transform(x, y)
    return (lon, lat) if math.isfinite(lon) and math.isfinite(lat) else None


def _info_body(info_format: str, values: list[float] | None, tile: TileRequest, i: int, j: int) -> bytes:
    """ROK4's four renderings of pixel values; no data gives an empty list, not an error."""
    texts = [shortest(v) for v in values or ()]
    if info_format == "text/plain":
        return ",".join(texts).encode()
    if info_format == "text/html":
        items = "".join(f"<li>{t}</li>" for t in texts)
        return f"<html><body><p><b>Pixel value :</b></p><ul>{items}</ul></body></html>".encode()
    if info_format == "text/xml":
        pixel = etree.Element("Pixel")
        for t in texts:
            etree.SubElement(pixel, "Band").text = t
        return XML_DECLARATION + etree.tostring(pixel, encoding="UTF-8")
    features = []
    if values is not None:
        point = _pixel_lonlat(tile, i, j)
        geometry = {"type": "Point", "coordinates": list(point)} if point else None
        pixel = [v if math.isfinite(v) else None for v in values]  # JSON has no NaN
        features.append({"type": "Feature", "geometry": geometry, "properties": {"pixel": pixel}})
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


async def get_feature_info(request: Request, params: Mapping[str, str | None], key: str | None) -> Response:
    runtime = get_runtime(request)
    _missing(params, TILE_PARAMETERS + ("InfoFormat", "J", "I"))
    tile = resolve_tile(runtime.catalog, params, key, info=True, book=style_book(runtime))
    info_format = params["InfoFormat"] or ""
    info_format = next((f for f in INFO_FORMATS if _same_mime(f, info_format)), info_format)
    if info_format not in INFO_FORMATS:
        raise OWSException(
            "InvalidParameterValue", "InfoFormat", f"InfoFormat {echo(info_format)} is not offered"
        )
    bounds = {"I": tile.matrix.tile_width, "J": tile.matrix.tile_height}
    point = {}
    for locator in ("I", "J"):
        value = _integer(params[locator] or "", locator)
        if not 0 <= value < bounds[locator]:
            raise OWSException(
                POLICY["point_out_of_range"],
                locator,
                f"{locator} {value} is outside [0, {bounds[locator] - 1}]",
            )
        point[locator] = value
    i, j = point["I"], point["J"]
    if (tile.published.layer.get_feature_info or {}).get("type") == "EXTERNALWMS":  # ROK4: the tile as a map
        box = tile.matrix.tile_bbox(tile.col, tile.row)
        size = (tile.matrix.tile_width, tile.matrix.tile_height)
        relayed = await relay_feature_info(request, tile.published, tile.grid.tms.crs, box, size, i, j, info_format)
        relayed.headers.update(map_headers((tile.published,), runtime.settings))
        return relayed
    values = None
    if tile.published_level:
        values = await feature_info(tile.published, tile.level, tile.col, tile.row, i, j)
    media_type = "application/json" if info_format == "application/json" else info_format
    headers = map_headers((tile.published,), runtime.settings)
    return Response(_info_body(info_format, values, tile, i, j), media_type=media_type, headers=headers)


# --- GetCapabilities ----------------------------------------------------------------------------


def _url_key(request: Request, catalog: Catalog) -> str | None:
    """A valid key given in the query string is repeated in advertised URLs, so clients keep sending it."""
    key = KVP.from_request(request).get("apikey")
    if key and hash_key(key) in catalog.key_access:
        return key
    return None


def _text(parent: etree._Element, tag: str, text: str, **attrs: str) -> etree._Element:
    element = etree.SubElement(parent, tag, attrs)
    element.text = text
    return element


def _crs_urn(crs: str) -> str:
    authority, _, code = crs.partition(":")
    if authority.upper() == "CRS" and code == "84":
        return "urn:ogc:def:crs:OGC:1.3:CRS84"
    return f"urn:ogc:def:crs:{authority.upper()}::{code}" if code else crs


@functools.lru_cache(maxsize=64)
def _northing_first(crs: str) -> bool:
    """TopLeftCorner follows the CRS's axis order (EPSG:4326 is lat, lon): asked of pyproj, not guessed."""
    axes = pyproj.CRS.from_user_input(crs).axis_info
    return bool(axes) and axes[0].direction.lower() in ("north", "south")


def _tile_matrix_set(contents: etree._Element, grid: GridSet) -> None:
    node = etree.SubElement(contents, _wmts("TileMatrixSet"))
    if grid.tms.title and grid.id == grid.tms.id:
        _text(node, _ows("Title"), grid.tms.title)
    _text(node, _ows("Identifier"), grid.id)
    _text(node, _ows("SupportedCRS"), _crs_urn(grid.tms.crs))
    swap = _northing_first(grid.tms.crs)
    for m in grid.matrices:
        tm = etree.SubElement(node, _wmts("TileMatrix"))
        _text(tm, _ows("Identifier"), m.id)
        _text(tm, _wmts("ScaleDenominator"), shortest(grid.tms.scale_denominator(m)))
        corner = (m.origin_y, m.origin_x) if swap else (m.origin_x, m.origin_y)
        _text(tm, _wmts("TopLeftCorner"), " ".join(shortest(v) for v in corner))
        for tag, value in (
            ("TileWidth", m.tile_width),
            ("TileHeight", m.tile_height),
            ("MatrixWidth", m.matrix_width),
            ("MatrixHeight", m.matrix_height),
        ):
            _text(tm, _wmts(tag), str(value))


# GDAL snaps the BoundingBox to pixels of the finest matrix with floor/ceil and a 1e-10 pixel
# tolerance; at 1e8 pixels from the origin (4326 level 19) float error alone moves an edge one pixel
# out, then one tile out of the limits. The advertised box is the extent inset by this many pixels.
BBOX_INSET_PIXELS = 1e-3


def _bounding_boxes(node: etree._Element, grids: tuple[GridSet, ...]) -> None:
    """One ows:BoundingBox per CRS the layer is offered in: its extent there, in the CRS's axis order.
    Clients that size a layer from it (GDAL) then never ask for a tile outside the limits."""
    finest: dict[str, float] = {}  # per CRS: the finest matrix any of its sets offers
    for grid in grids:
        cell = min(m.cell_size for m in grid.matrices)
        finest[grid.tms.crs] = min(finest.get(grid.tms.crs, cell), cell)
    done: set[str] = set()
    for grid in grids:
        crs = _crs_urn(grid.tms.crs)
        if grid.extent is None or crs in done:
            continue
        done.add(crs)
        inset = finest[grid.tms.crs] * BBOX_INSET_PIXELS
        x0, y0, x1, y1 = grid.extent
        lower, upper = (x0 + inset, y0 + inset), (x1 - inset, y1 - inset)
        if _northing_first(grid.tms.crs):
            lower, upper = lower[::-1], upper[::-1]
        bbox = etree.SubElement(node, _ows("BoundingBox"), crs=crs)
        _text(bbox, _ows("LowerCorner"), " ".join(shortest(v) for v in lower))
        _text(bbox, _ows("UpperCorner"), " ".join(shortest(v) for v in upper))


def _layer_node(
    contents: etree._Element,
    published: PublishedLayer,
    grids: tuple[GridSet, ...],
    base: str,
    query: str,
    book: Mapping[str, Any] | None = None,
) -> None:
    layer = published.layer
    node = etree.SubElement(contents, _wmts("Layer"))
    _text(node, _ows("Title"), layer.title)
    if layer.abstract:
        _text(node, _ows("Abstract"), layer.abstract)
    if layer.keywords:
        keywords = etree.SubElement(node, _ows("Keywords"))
        for keyword in layer.keywords:
            _text(keywords, _ows("Keyword"), keyword)
    west, south, east, north = published.wgs84_bbox
    bbox = etree.SubElement(node, _ows("WGS84BoundingBox"))
    _text(bbox, _ows("LowerCorner"), f"{shortest(west)} {shortest(south)}")
    _text(bbox, _ows("UpperCorner"), f"{shortest(east)} {shortest(north)}")
    _text(node, _ows("Identifier"), layer.id)
    _bounding_boxes(node, grids)
    for metadata in layer.metadata:
        etree.SubElement(node, _ows("Metadata"), {f"{{{XLINK_NS}}}href": str(metadata.get("url", ""))})
    styles = tile_styles(published, book)
    for style in styles:
        style_node = etree.SubElement(node, _wmts("Style"), isDefault=str(style == DEFAULT_STYLE).lower())
        _text(style_node, _ows("Identifier"), style)
    formats = tile_formats(published, styles)
    for offered in formats:
        _text(node, _wmts("Format"), offered)
    infos = tuple(INFO_FORMATS) if queryable(published) else ()
    for info_format in infos:
        _text(node, _wmts("InfoFormat"), info_format)
    for grid in grids:
        link = etree.SubElement(node, _wmts("TileMatrixSetLink"))
        _text(link, _wmts("TileMatrixSet"), grid.id)
        limits_node = etree.SubElement(link, _wmts("TileMatrixSetLimits"))
        for m in grid.matrices:
            limits = grid.limits.get(m.id)
            if limits is None:
                continue
            tml = etree.SubElement(limits_node, _wmts("TileMatrixLimits"))
            _text(tml, _wmts("TileMatrix"), m.id)
            for tag, value in (
                ("MinTileRow", limits.min_row),
                ("MaxTileRow", limits.max_row),
                ("MinTileCol", limits.min_col),
                ("MaxTileCol", limits.max_col),
            ):
                _text(tml, _wmts(tag), str(value))
    prefix = (
        f"{base}{REST_PREFIX}/{layer.id}/{{Style}}/{{TileMatrixSet}}/{{TileMatrix}}/{{TileRow}}/{{TileCol}}"
    )
    for offered in formats:
        etree.SubElement(
            node,
            _wmts("ResourceURL"),
            format=offered,
            resourceType="tile",
            template=f"{prefix}.{CANONICAL_EXTENSION[offered]}{query}",
        )
    for info_format in infos:
        etree.SubElement(
            node,
            _wmts("ResourceURL"),
            format=info_format,
            resourceType="FeatureInfo",
            template=f"{prefix}/{{J}}/{{I}}.{INFO_FORMATS[info_format]}{query}",
        )


def build_capabilities(
    catalog: Catalog,
    layers: list[PublishedLayer],
    base: str,
    settings: Any,
    url_key: str | None,
    book: Mapping[str, Any] | None = None,
) -> bytes:
    """The full document; sections and update sequences are cut from it afterwards."""
    query = f"?apikey={quote(url_key, safe='')}" if url_key else ""
    kvp_url = f"{base}/wmts?apikey={quote(url_key, safe='')}&" if url_key else f"{base}/wmts?"
    root = fill_template(
        load_template(TEMPLATE),
        {
            "update_sequence": str(catalog.revision),
            "title": settings.service_title,
            "abstract": settings.service_abstract,
            "provider_name": settings.provider_name,
            "provider_site": settings.provider_site,
            "kvp_url": kvp_url,
            "rest_url": f"{base}{REST_PREFIX}/",
            "capabilities_url": f"{base}{CAPABILITIES_PATH}{query}",
        },
    )
    contents = root.find(_wmts("Contents"))
    assert contents is not None, "template has no Contents"
    used: dict[str, GridSet] = {}
    for published in layers:
        grids = tuple(grid_sets(catalog, published).values())
        _layer_node(contents, published, grids, base, query, book)
        for grid in grids:
            used.setdefault(grid.id, grid)
    for grid in used.values():
        _tile_matrix_set(contents, grid)
    return XML_DECLARATION + etree.tostring(root, encoding="UTF-8", pretty_print=True)


def visible_layers(request: Request) -> list[PublishedLayer]:
    catalog = get_runtime(request).catalog
    return sorted((p for p in catalog.visible(SERVICE, key_hash(request)) if served(p)), key=lambda p: p.id)


def capabilities_document(request: Request) -> bytes:
    """Cached per catalog snapshot, base URL and the set of layers the caller may see."""
    runtime = get_runtime(request)
    catalog = runtime.catalog
    layers = visible_layers(request)
    base = base_url(request)
    url_key = _url_key(request, catalog)
    cache_key = ("wmts-caps", base, tuple(p.id for p in layers), url_key)

    def build() -> bytes:
        return build_capabilities(catalog, layers, base, runtime.settings, url_key, style_book(runtime))

    cached = sum(1 for k in catalog.documents if isinstance(k, tuple) and k[:1] == ("wmts-caps",))
    if cache_key not in catalog.documents and cached >= MAX_CACHED_DOCUMENTS:
        return build()  # forged Host headers must not grow the cache without bound
    return catalog.document(cache_key, build)


def _sections(value: str | None) -> set[str] | None:
    if value is None:
        return None
    if not value.strip():
        raise OWSException("MissingParameterValue", "sections", "Sections is empty")
    wanted = set()
    by_name = {s.lower(): s for s in SECTIONS}
    for item in value.split(","):
        name = item.strip().lower()
        if name == "all":
            return None
        if name not in by_name:
            raise OWSException("InvalidParameterValue", "sections", f"unknown section {echo(item)}")
        wanted.add(by_name[name])
    return wanted


def _update_sequence(requested: str | None, current: int) -> str:
    """'full', 'same' (caller is up to date) or raise InvalidUpdateSequence when ahead of us."""
    if requested is None or not requested.strip():
        return "full"
    try:
        asked = int(requested.strip())
    except ValueError:
        return "same" if requested.strip() == str(current) else "full"
    if asked == current:
        return "same"
    if asked > current:
        raise OWSException("InvalidUpdateSequence", None, f"updateSequence {asked} is newer than {current}")
    return "full"


def _trimmed(document: bytes, keep: set[str] | None, sequence: str) -> bytes:
    if keep is None and sequence == "full":
        return document
    root = etree.fromstring(document)
    for child in list(root):
        local = etree.QName(child).localname
        if sequence == "same" or (keep is not None and local in SECTIONS and local not in keep):
            root.remove(child)
    return XML_DECLARATION + etree.tostring(root, encoding="UTF-8", pretty_print=True)


def _capabilities_response(request: Request, document: bytes, media_type: str = "application/xml") -> Response:
    return Response(document, media_type=media_type, headers=document_headers(request, visible_layers(request)))


async def get_capabilities(request: Request, kvp: KVP) -> Response:
    versions = kvp.get("AcceptVersions")
    if versions is not None and VERSION not in [v.strip() for v in versions.split(",")]:
        raise OWSException("VersionNegotiationFailed", None, f"only version {VERSION} is supported")
    keep = _sections(kvp.get("Sections"))
    sequence = _update_sequence(kvp.get("UpdateSequence"), get_runtime(request).catalog.revision)
    formats = [f.strip() for f in (kvp.get("AcceptFormats") or "").split(",")]
    media_type = next((f for f in formats if f in CAPABILITIES_FORMATS), "application/xml")
    return _capabilities_response(request, _trimmed(capabilities_document(request), keep, sequence), media_type)


# --- endpoints ----------------------------------------------------------------------------------


def _kvp_params(kvp: KVP, names: tuple[str, ...]) -> dict[str, str | None]:
    return {name: kvp.get(name) for name in names}


@ows_endpoint
async def kvp_endpoint(request: Request) -> Response:
    kvp = KVP.from_request(request)
    service = kvp.require("SERVICE", "service")
    if service.strip().lower() != SERVICE:
        raise OWSException("InvalidParameterValue", "service", f"SERVICE must be WMTS, not {echo(service)}")
    operation = kvp.require("REQUEST", "request").strip()
    name = operation.lower()
    if name not in ("getcapabilities", "gettile", "getfeatureinfo"):
        code, locator = POLICY["unknown_request"]
        raise OWSException(code, locator, f"unknown operation {echo(operation)}")
    # AcceptVersions negotiates; a VERSION naming another one is refused, GetCapabilities included (ROK4)
    version = kvp.get("VERSION")
    if version is not None and version.strip() != VERSION:
        raise OWSException(
            "InvalidParameterValue", "version", f"VERSION must be {VERSION}, not {echo(version)}"
        )
    if name == "getcapabilities":
        return await get_capabilities(request, kvp)
    key = key_hash(request, kvp)
    if name == "gettile":
        return await get_tile(request, _kvp_params(kvp, TILE_PARAMETERS), key)
    return await get_feature_info(request, _kvp_params(kvp, TILE_PARAMETERS + ("InfoFormat", "I", "J")), key)


def _accepts_xml(accept: str | None) -> bool:
    if not accept or not accept.strip():
        return True
    for item in accept.split(","):
        media, _, params = item.strip().partition(";")
        quality = re.search(r"q\s*=\s*([0-9.]+)", params)
        if quality and float(quality.group(1) or 0) == 0:
            continue
        if media.strip().lower() in ("*/*", "application/*", "text/*", *CAPABILITIES_FORMATS):
            return True
    return False


@ows_endpoint
async def rest_capabilities(request: Request) -> Response:
    if not _accepts_xml(request.headers.get("accept")):
        raise OWSException("InvalidParameterValue", "Accept", "capabilities are only available as XML", 406)
    return _capabilities_response(request, capabilities_document(request))


def _rest_params(request: Request) -> dict[str, str | None]:
    path = request.path_params
    ext = path["ext"].lower()
    return {
        "ext": ext,
        "layer": path["layer"],
        "style": path["style"],
        "format": EXTENSIONS.get(ext, f".{ext}"),
        "TileMatrixSet": path["tms"],
        "TileMatrix": path["z"],
        "TileRow": path["row"],
        "TileCol": path["col"],
    }


@ows_endpoint
async def rest_tile(request: Request) -> Response:
    params = _rest_params(request)
    del params["ext"]
    return await get_tile(request, params, key_hash(request))


@ows_endpoint
async def rest_feature_info(request: Request) -> Response:
    path = request.path_params
    params = _rest_params(request)
    # REST FeatureInfo URLs carry no tile format: take the layer's (an unknown layer fails on `layer` first)
    key = key_hash(request)
    layer = get_runtime(request).catalog.get(path["layer"], SERVICE, key)
    params["format"] = layer.format.mime if layer is not None else "-"
    params["InfoFormat"] = INFO_EXTENSIONS.get(params.pop("ext") or "", f".{path['ext']}")
    params["I"], params["J"] = path["i"], path["j"]
    return await get_feature_info(request, params, key)


def routes() -> list[BaseRoute]:
    register(SERVICE, render_report)
    return [
        Route("/wmts", kvp_endpoint, methods=["GET"]),
        Route(CAPABILITIES_PATH, rest_capabilities, methods=["GET"]),
        Route(
            f"{REST_PREFIX}/{{layer}}/{{style}}/{{tms}}/{{z}}/{{row}}/{{col}}.{{ext}}",
            rest_tile,
            methods=["GET"],
        ),
        Route(
            f"{REST_PREFIX}/{{layer}}/{{style}}/{{tms}}/{{z}}/{{row}}/{{col}}/{{j}}/{{i}}.{{ext}}",
            rest_feature_info,
            methods=["GET"],
        ),
    ]
