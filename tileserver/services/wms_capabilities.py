"""WMS GetCapabilities 1.3.0 and 1.1.1, built once per catalog snapshot, base URL and key access."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from lxml import etree
from starlette.requests import Request
from starlette.responses import Response

from tileserver.catalog import Catalog, PublishedLayer, VectorMap
from tileserver.render.styles import Style
from tileserver.runtime import get_runtime
from tileserver.services.crs import V111, V130, axis_ordered, crs_info, layer_bbox, layer_crs, server_crs
from tileserver.services.numbers import rounded
from tileserver.services.ows import (
    KVP,
    XLINK_NS,
    XML_DECLARATION,
    base_url,
    echo,
    fill_template,
    key_hash,
    load_template,
    xml_text,
)
from tileserver.services.policy import document_headers
from tileserver.services.policy import url_key as policy_url_key
from tileserver.services.stylebook import layer_styles, style_book
from tileserver.services.wms_legend import legend_url
from tileserver.services.wms_request import (
    CAPABILITIES_MIME,
    DTD_111,
    GETMAP_FORMATS,
    INFO_FORMATS,
    MAX_CACHED_DOCUMENTS,
    SERVICE,
    SUPPORTED_VERSIONS,
    TEMPLATES,
    WMS_NS,
    wms_error,
)

log = logging.getLogger("tileserver.wms")

# --------------------------------------------------------------------------- GetCapabilities


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


def _links(b: _Builder, node: etree._Element, layer: Any) -> None:
    """Attribution and MetadataURL of a layer record (raster or vector)."""
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


def _vector_legend_size(catalog: Catalog, vector: VectorMap) -> tuple[int, int]:
    """(width, height) of the layer's GetLegendGraphic at its default size (drawn once per catalog
    snapshot: the legend's width follows its rules' titles)."""
    def measure() -> tuple[int, int]:
        from tileserver.render.vector_legend import legend_size
        from tileserver.render.vector_map import default_style

        styles = [r.style if r.style is not None else default_style(r.relation) for r in vector.relations]
        try:
            return legend_size(styles)
        except ValueError:  # a style with no rule to show
            return (20, 20)

    return catalog.document(("wms-vector-legend-size", vector.record_id), measure)


def _layer_head(b: _Builder, parent: etree._Element, name: str, layer: Any, queryable: bool,
                crs: Iterable[str], root_crs: tuple[str, ...],
                wgs84_bbox: tuple[float, float, float, float]) -> tuple[etree._Element, list[str]]:
    """What every named layer starts with, pyramid or WMS-vector: name, title, abstract, keywords,
    the CRSs the root does not already list (returned) and the geographic extent."""
    node = b.el(parent, "Layer", queryable="1" if queryable else "0")
    b.el(node, "Name", name)
    b.el(node, "Title", layer.title or name)
    if layer.abstract:
        b.el(node, "Abstract", layer.abstract)
    b.keywords(node, layer.keywords)
    own = [c for c in crs if c not in root_crs]
    for code in own:
        b.el(node, "CRS" if b.version == V130 else "SRS", code)
    b.geographic(node, wgs84_bbox)
    return node, own


def _vector_node(b: _Builder, parent: etree._Element, vector: VectorMap, root_crs: tuple[str, ...],
                 catalog: Catalog, base: str, url_key: str | None) -> None:
    """A WMS-vector layer: the server's CRS list, its extent in each, queryable (its features), its
    style with the LegendURL of its GetLegendGraphic."""
    from tileserver.render.georef import reproject_bbox
    from tileserver.services.wms_request import map_crs_usable, map_layer_crs

    layer = vector.layer
    node, own = _layer_head(b, parent, vector.id, layer, True, map_layer_crs(vector), root_crs, vector.wgs84_bbox)
    west, south, east, north = _clamp_wgs84(vector.wgs84_bbox)
    boxes = []
    for code in (*root_crs, *own):
        info = crs_info(code)
        if info is None or not map_crs_usable(vector, code):
            continue
        if code == "CRS:84":
            boxes.append((code, (west, south, east, north)))
            continue
        try:
            box = reproject_bbox((west, south, east, north), "OGC:CRS84", info.grid_crs)
        except ValueError:
            continue
        if all(math.isfinite(v) for v in box) and box[0] < box[2] and box[1] < box[3]:
            boxes.append((code, box))
    b.bounding_boxes(node, boxes)
    _links(b, node, layer)
    style_node = b.el(node, "Style")
    b.el(style_node, "Name", "default")
    b.el(style_node, "Title", "Style par défaut")
    width, height = _vector_legend_size(catalog, vector)
    params = {"SERVICE": "WMS", "REQUEST": "GetLegendGraphic", "VERSION": V130, "LAYER": vector.id,
              "FORMAT": "image/png"}
    if url_key:
        params["apikey"] = url_key
    legend = b.el(style_node, "LegendURL", width=str(width), height=str(height))
    b.el(legend, "Format", "image/png")
    b.link(legend, "OnlineResource", f"{base}/wms?{urlencode(params)}")


def _layer_node(b: _Builder, parent: etree._Element, published: PublishedLayer, root_crs: tuple[str, ...],
                book: Mapping[str, Style], base: str, url_key: str | None) -> None:
    layer = published.layer
    node, own = _layer_head(b, parent, published.id, layer, bool(layer.queryable), layer_crs(published), root_crs,
                            published.wgs84_bbox)
    boxes = [(c, box) for c in (*root_crs, *own) if (box := layer_bbox(published, c)) is not None]
    b.bounding_boxes(node, boxes)
    _links(b, node, layer)
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
                       url_key: str | None, vectors: list[VectorMap] | None = None) -> bytes:
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
    vectors = vectors or []
    boxes = [p.wgs84_bbox for p in layers] + [v.wgs84_bbox for v in vectors]
    world = _union(boxes) if boxes else (-180.0, -90.0, 180.0, 90.0)
    b.geographic(top, world)
    b.bounding_boxes(top, [("CRS:84", _clamp_wgs84(world))] if version == V130 else [("EPSG:4326", _clamp_wgs84(world))])
    book = style_book(runtime)
    every: list[PublishedLayer | VectorMap] = sorted([*layers, *vectors], key=lambda p: p.id)
    for published in every:
        if isinstance(published, VectorMap):
            _vector_node(b, top, published, root_crs, catalog, base, url_key)
        else:
            _layer_node(b, top, published, root_crs, book, base, url_key)
    doctype = f'<!DOCTYPE WMT_MS_Capabilities SYSTEM "{DTD_111}capabilities_1_1_1.dtd">' if version == V111 else None
    return XML_DECLARATION + etree.tostring(root, encoding="UTF-8", pretty_print=True, doctype=doctype)


def _union(boxes: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def visible_layers(request: Request) -> list[PublishedLayer]:
    catalog = get_runtime(request).catalog
    return sorted((p for p in catalog.visible(SERVICE, key_hash(request)) if not p.format.is_vector),
                  key=lambda p: p.id)


def visible_maps(request: Request) -> list[VectorMap]:
    return sorted(get_runtime(request).catalog.visible_maps(key_hash(request)), key=lambda v: v.id)


def capabilities_document(request: Request, version: str) -> bytes:
    """Cached per catalog snapshot, version, base URL and the layers the caller may see."""
    runtime = get_runtime(request)
    catalog = runtime.catalog
    layers = visible_layers(request)
    vectors = visible_maps(request)
    base = base_url(request)
    url_key = policy_url_key(request, catalog.key_access)
    cache_key = ("wms-caps", version, base, tuple(p.id for p in layers), tuple(v.record_id for v in vectors), url_key)

    def build() -> bytes:
        return build_capabilities(runtime, layers, base, version, url_key, vectors)

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
            raise wms_error("CurrentUpdateSequence", "updatesequence", f"updateSequence {revision} is current")
        if sequence.isdigit() and int(sequence) > revision:
            raise wms_error("InvalidUpdateSequence", "updatesequence", f"updateSequence {echo(sequence)} is newer than {revision}")
    body = capabilities_document(request, version)
    return Response(body, media_type=CAPABILITIES_MIME[version],
                    headers=document_headers(request, [*visible_layers(request), *visible_maps(request)]))  # type: ignore[list-item]
