"""WMTS GetCapabilities, built once per catalog snapshot, base URL and key access, trimmed per request."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import pyproj
from lxml import etree
from starlette.requests import Request
from starlette.responses import Response

from tileserver.catalog import Catalog, PublishedLayer
from tileserver.runtime import get_runtime
from tileserver.services.grids import GridSet, grid_sets
from tileserver.services.numbers import shortest
from tileserver.services.ows import (
    KVP,
    OWS_NS,
    XLINK_NS,
    XML_DECLARATION,
    OWSException,
    base_url,
    echo,
    fill_template,
    key_hash,
    load_template,
)
from tileserver.services.policy import document_headers
from tileserver.services.policy import url_key as policy_url_key
from tileserver.services.stylebook import DEFAULT_STYLE, layer_styles, style_book, tile_styles
from tileserver.services.wmts_tiles import (
    CANONICAL_EXTENSION,
    CAPABILITIES_FORMATS,
    CAPABILITIES_PATH,
    INFO_FORMATS,
    MAX_CACHED_DOCUMENTS,
    REST_PREFIX,
    SECTIONS,
    SERVICE,
    TEMPLATE,
    VERSION,
    WMTS_NS,
    queryable,
    served,
    tile_formats,
)

# --- GetCapabilities ----------------------------------------------------------------------------


def _ows(tag: str) -> str:
    return f"{{{OWS_NS}}}{tag}"


def _wmts(tag: str) -> str:
    return f"{{{WMTS_NS}}}{tag}"


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


def _numbers(parent: etree._Element, **values: int) -> None:
    """Integer elements in the order given (a matrix's sizes, its limits): the schema fixes the order."""
    for tag, value in values.items():
        _text(parent, _wmts(tag), str(value))


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
        _numbers(tm, TileWidth=m.tile_width, TileHeight=m.tile_height, MatrixWidth=m.matrix_width,
                 MatrixHeight=m.matrix_height)


# GDAL snaps the BoundingBox to pixels of the finest matrix with floor/ceil and a 1e-10 pixel
# tolerance; at 1e8 pixels from the origin (4326 level 19) float error alone moves an edge one pixel
# out, then one tile out of the limits. The advertised box is the extent inset by this many pixels.
BBOX_INSET_PIXELS = 1e-3


def _legend_url(style_node: etree._Element, legend: Any) -> None:
    """WMTS 1.0.0 LegendURL (after the style's Identifier): the style's own legend image."""
    attrs = {"format": legend.format, f"{{{XLINK_NS}}}href": legend.url,
             "width": str(legend.width), "height": str(legend.height)}
    if legend.min_scale_denominator is not None:
        attrs["minScaleDenominator"] = shortest(legend.min_scale_denominator)
    if legend.max_scale_denominator is not None:
        attrs["maxScaleDenominator"] = shortest(legend.max_scale_denominator)
    etree.SubElement(style_node, _wmts("LegendURL"), attrs)


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
    # the stored rendering's legend: an identity style of the layer that carries one (seed 004's
    # ROK4-STYLE static `{identifier, title, legend}` on a harvested pyramid)
    plain = next((s for s in layer_styles(published, book) if s.is_identity and s.legend is not None), None) \
        if book and not published.format.is_vector else None
    for style, definition in styles.items():
        style_node = etree.SubElement(node, _wmts("Style"), isDefault=str(style == DEFAULT_STYLE).lower())
        _text(style_node, _ows("Identifier"), style)
        legend = (definition if definition is not None else plain)
        if legend is not None and legend.legend is not None and legend.legend.url:
            _legend_url(style_node, legend.legend)
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
            _numbers(tml, MinTileRow=limits.min_row, MaxTileRow=limits.max_row, MinTileCol=limits.min_col,
                     MaxTileCol=limits.max_col)
    prefix = (
        f"{base}{REST_PREFIX}/{layer.id}/{{Style}}/{{TileMatrixSet}}/{{TileMatrix}}/{{TileRow}}/{{TileCol}}"
    )
    resources = [(f, "tile", f".{CANONICAL_EXTENSION[f]}") for f in formats]
    resources += [(f, "FeatureInfo", f"/{{J}}/{{I}}.{INFO_FORMATS[f]}") for f in infos]
    for offered, kind, suffix in resources:
        etree.SubElement(node, _wmts("ResourceURL"), format=offered, resourceType=kind,
                         template=f"{prefix}{suffix}{query}")


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
    url_key = policy_url_key(request, catalog.key_access)
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


def capabilities_response(request: Request, document: bytes, media_type: str = "application/xml") -> Response:
    return Response(document, media_type=media_type, headers=document_headers(request, visible_layers(request)))


async def get_capabilities(request: Request, kvp: KVP) -> Response:
    versions = kvp.get("AcceptVersions")
    if versions is not None and VERSION not in [v.strip() for v in versions.split(",")]:
        raise OWSException("VersionNegotiationFailed", None, f"only version {VERSION} is supported")
    keep = _sections(kvp.get("Sections"))
    sequence = _update_sequence(kvp.get("UpdateSequence"), get_runtime(request).catalog.revision)
    formats = [f.strip() for f in (kvp.get("AcceptFormats") or "").split(",")]
    media_type = next((f for f in formats if f in CAPABILITIES_FORMATS), "application/xml")
    return capabilities_response(request, _trimmed(capabilities_document(request), keep, sequence), media_type)
