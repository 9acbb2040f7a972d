"""The map page at `/`: every published layer on a Leaflet map, assets served locally (no CDN).

The page must be useful on first sight with nothing but our own layers (no base map): it fits the
view to them, outlines each layer's extent so a layer too small for the current zoom still shows
where it is, lists every layer with zoom-to, opacity and the URLs to use it elsewhere, and asks
the server only for tiles that exist: a tile layer knows each level's tile limits, a WMS layer its
bounds, so the browser log stays free of 404s. A DEM (non-8-bit samples) is no picture until a
style renders it, so it is drawn through one of its rendered styles or not at all. A vector tile
pyramid is drawn with MapLibre GL JS through its client style (the current attached one, else the
default one generated from its tables, `services/vectorstyles.py`), as a Leaflet layer
(`@maplibre/maplibre-gl-leaflet`): one map and one layer list for every kind of layer, stacked and
switched the same way. Each such layer is a WebGL context and browsers keep about 16: past
MAX_GL_SHOWN vector tile layers, the others start hidden (a context is made when one is shown).
Vector layers (WFS, OGC API Features) are listed with their extent and service URLs; the map does
not draw their features yet.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from tileserver.catalog import Catalog, FeatureType, PublishedLayer, VectorLayer
from tileserver.render.georef import get_transformer
from tileserver.runtime import get_runtime
from tileserver.services.crs import layer_crs, server_crs
from tileserver.services.numbers import float_text
from tileserver.services.ows import base_url
from tileserver.services.stylebook import layer_styles, style_book
from tileserver.settings import PACKAGE_DIR

WEB_MERCATOR_ZOOM0 = 156543.03392804097  # metres per pixel of zoom 0 in EPSG:3857 (256-pixel tiles)
PAST_BOTTOM = 3  # zooms past a layer's finest level the map still goes (its tiles stretched)
# Zooms above a tile layer's coarsest level where it is still drawn (its tiles shrunk). Leaflet walks
# every tile slot of the view at the coarsest level, 4^margin per screen tile: keep it small.
ABOVE_TOP = 4
RENDERED_OPACITY = 0.6  # a rendered DEM (hypsometry, hillshade) covers what lies under it otherwise
NATIVE_TILE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg"}  # what a browser draws as stored
VECTOR_FIT_ZOOM = 16  # zoom-to of a vector layer stops here (a single point would go to the deepest zoom)
MAX_GL_SHOWN = 8  # vector tile layers shown (each one a WebGL context) when the page opens
NOT_DRAWN_VECTOR = "not drawn yet (vector features: drawing comes with a later version)"
OUTLINE_COLOURS = ("#d7191c", "#2b83ba", "#1a9641", "#7b3294", "#fdae61", "#008080", "#e7298a", "#636363")

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<link rel="stylesheet" href="static/leaflet/leaflet.css">
{maplibre_css}<link rel="stylesheet" href="static/home.css">
</head>
<body><div id="map"></div><div id="side"><h1>{title}</h1>
<p class="services"><a href="wmts?SERVICE=WMTS&amp;REQUEST=GetCapabilities">WMTS</a> ·
<a href="tms/1.0.0">TMS</a> · <a href="ogcapi">OGC API Tiles</a> ·
<a href="wms?SERVICE=WMS&amp;REQUEST=GetCapabilities">WMS</a> ·
<a href="wfs?SERVICE=WFS&amp;REQUEST=GetCapabilities">WFS</a> · <a href="healthcheck/info">health</a></p>
<p class="hint">{summary}</p>
<ol id="layers">{items}</ol></div>
<script type="application/json" id="layer-data">{layers}</script>
<script src="static/leaflet/leaflet.js"></script>
{maplibre_js}<script src="static/home.js"></script>
</body></html>
"""


@dataclass(frozen=True)
class Drawing:
    """How the map draws a layer: `wmts` tiles of the PM grid within each level's limits, `wms`
    images within the layer's bounds, or `maplibre` (vector tiles) with the client style at `url`;
    `style` the style asked for (a DEM needs a rendered one)."""

    kind: str
    url: str
    style: str
    min_native: int = 0
    max_native: int = 0
    limits: dict[int, tuple[int, int, int, int]] | None = None  # zoom → min_col, min_row, max_col, max_row


def map_zoom(published: PublishedLayer, level_id: str) -> float:
    """The web map zoom whose resolution is the level's, measured at the layer's centre (any grid)."""
    west, south, east, north = published.native_bbox
    x, y = (west + east) / 2, (south + north) / 2
    cell = published.matrix(level_id).cell_size
    to_map = get_transformer(published.tms.crs, "EPSG:3857")
    x0, y0 = to_map.transform(x, y, errcheck=False)
    x1, y1 = to_map.transform(x + cell, y, errcheck=False)
    resolution = math.hypot(x1 - x0, y1 - y0)
    if not math.isfinite(resolution) or resolution <= 0:
        resolution = cell * published.tms.metres_per_unit
    return math.log2(WEB_MERCATOR_ZOOM0 / resolution)


def rendered_style(published: PublishedLayer, book: dict[str, Any]) -> str | None:
    """The first of the layer's styles that changes pixels, the one a DEM is drawn with."""
    for style in layer_styles(published, book):
        if not style.is_identity:
            return str(style.identifier)
    return None


def _pm_levels(published: PublishedLayer) -> dict[int, str] | None:
    """PM level ids are web map zooms; None when the grid is not PM or a level id is not a zoom."""
    if published.tms.id != "PM" or not all(level.isdigit() for level in published.level_ids):
        return None
    return {int(level): level for level in published.level_ids}


def drawing(published: PublishedLayer, book: dict[str, Any], wms_crs: set[str]) -> tuple[Drawing | None, str]:
    """How the map can draw a layer, or None and why not."""
    if published.format.is_vector:
        if not published.layer.enabled("tms") or published.tms.id != "PM":
            return None, "vector tiles: use the TMS or TileJSON URL in a vector-tile client"
        attached = next((s for s in published.layer.vector_styles if s.get("current")), None)
        attached = attached or next(iter(published.layer.vector_styles), None)
        base = f"tms/1.0.0/{quote(published.id, safe='')}"
        if attached is None:
            return Drawing("maplibre", f"{base}/style.json", "default"), "vector tiles with MapLibre GL, default style"
        name = str(attached["name"])
        return Drawing("maplibre", f"{base}/styles/{quote(name, safe='')}.json", name), \
            f"vector tiles with MapLibre GL, style {name}"
    dem = published.format.sample_format != "UINT8"
    style = rendered_style(published, book) if dem else "normal"
    if style is None:
        return None, "samples are not colours and the layer has no style rendering them"
    zooms = _pm_levels(published)
    # WMTS answers a nodata image for an empty tile inside the limits; a layer that restores ROK4's
    # 404 for them (empty_tile_404) would fill the browser log: WMS never answers 404.
    if zooms is not None and published.layer.enabled("wmts") and not published.layer.empty_tile_404:
        ext = "png" if dem else NATIVE_TILE_FORMATS.get(published.format.mime, "png")
        url = f"wmts/1.0.0/{quote(published.id, safe='')}/{quote(style, safe='')}/PM/{{z}}/{{y}}/{{x}}.{ext}"
        limits = {
            z: (lim.min_col, lim.min_row, lim.max_col, lim.max_row)
            for z, level in zooms.items()
            if (lim := published.limits.get(level)) is not None
        }
        return Drawing("wmts", url, style, min(zooms), max(zooms), limits), "WMTS tiles"
    if published.layer.enabled("wms") and "EPSG:3857" in wms_crs.union(layer_crs(published)):
        return Drawing("wms", "wms", "" if not dem else style), "WMS images"
    return None, "neither WMTS in the PM grid nor WMS in EPSG:3857 is offered for it"


def service_urls(base: str, published: PublishedLayer, style: str = "") -> list[tuple[str, str]]:
    """(label, URL) of the documents and templates other clients use the layer through; `style`: the
    one the GetMap example asks for (a DEM's rendered style)."""
    name = quote(published.id, safe="")
    out: list[tuple[str, str]] = []
    if published.layer.enabled("wmts") and not published.format.is_vector:
        out.append(("WMTS capabilities", f"{base}/wmts?SERVICE=WMTS&REQUEST=GetCapabilities"))
    if published.layer.enabled("tms"):
        ext = published.format.tms_extension
        out.append(("TMS tile template", f"{base}/tms/1.0.0/{name}/{{z}}/{{x}}/{{y}}.{ext}"))
        out.append(("TileJSON", f"{base}/tms/1.0.0/{name}/metadata.json"))
        if published.format.is_vector:
            out.append(("MapLibre style", f"{base}/tms/1.0.0/{name}/style.json"))
            out.append(("MapLibre styles", f"{base}/tms/1.0.0/{name}/styles.json"))
    if published.layer.enabled("wms") and not published.format.is_vector:
        out.append(("WMS capabilities", f"{base}/wms?SERVICE=WMS&REQUEST=GetCapabilities"))
        west, south, east, north = published.wgs84_bbox
        aspect = (north - south) / (east - west) if east > west else 1.0
        query = {
            "SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": published.id, "STYLES": style,
            "CRS": "CRS:84", "BBOX": ",".join(float_text(v) for v in (west, south, east, north)), "WIDTH": "512",
            "HEIGHT": str(max(1, min(2048, round(512 * aspect)))), "FORMAT": "image/png", "TRANSPARENT": "TRUE",
        }  # fmt: skip
        out.append(("WMS GetMap", f"{base}/wms?{urlencode(query, safe=':,')}"))
    return out


@dataclass(frozen=True)
class PageLayer:
    published: PublishedLayer
    drawing: Drawing | None
    how: str  # how it is drawn, or why not
    top_zoom: float
    bottom_zoom: float
    area: float  # of the WGS84 bbox, square degrees: the smaller, the higher in the stack


def page_layers(catalog: Catalog, settings: Any, book: dict[str, Any]) -> list[PageLayer]:
    """The public layers, topmost (smallest) first; computed once per catalog snapshot."""

    def build() -> list[PageLayer]:
        shown = {p.id: p for service in ("wmts", "wms", "tms") for p in catalog.visible(service)}
        wms_crs = set(server_crs(settings))
        out = []
        for published in shown.values():
            west, south, east, north = published.wgs84_bbox
            how, why = drawing(published, book, wms_crs)
            top, bottom = map_zoom(published, published.top_level), map_zoom(published, published.bottom_level)
            out.append(PageLayer(published, how, why, top, bottom, abs((east - west) * (north - south))))
        out.sort(key=lambda entry: (entry.area, entry.published.id))
        return out

    return catalog.document(("home", "layers"), build)


@dataclass(frozen=True)
class VectorEntry:
    """A public vector layer: its feature types (all served by WFS) and those OGC API Features serves."""

    published: VectorLayer
    types: tuple[FeatureType, ...]
    ogcapi: frozenset[str]  # names of the types OGC API Features serves
    wgs84_bbox: tuple[float, float, float, float] | None  # union of the types' extents; None: all empty


def vector_entries(catalog: Catalog) -> list[VectorEntry]:
    """The public vector layers by name; computed once per catalog snapshot."""

    def build() -> list[VectorEntry]:
        ogcapi = frozenset(t.name for t in catalog.feature_types(None, service="ogcapi"))
        by_layer: dict[str, list[FeatureType]] = {}
        for feature_type in catalog.feature_types(None, service="wfs"):
            by_layer.setdefault(feature_type.published.record_id, []).append(feature_type)
        out = []
        for types in by_layer.values():
            boxes = [t.wgs84_bbox for t in types if t.wgs84_bbox is not None]
            union = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                     max(b[3] for b in boxes)) if boxes else None
            out.append(VectorEntry(types[0].published, tuple(types), ogcapi, union))
        out.sort(key=lambda entry: entry.published.id)
        return out

    return catalog.document(("home", "vector"), build)


def vector_urls(base: str, entry: VectorEntry) -> list[tuple[str, str]]:
    """(label, URL): the WFS capabilities, then per feature type a GetFeature example and, where OGC
    API Features serves it, its collection and items."""
    out = [("WFS capabilities", f"{base}/wfs?SERVICE=WFS&REQUEST=GetCapabilities")]
    for t in entry.types:
        query = {"SERVICE": "WFS", "VERSION": "2.0.0", "REQUEST": "GetFeature", "TYPENAMES": t.name, "COUNT": "10",
                 "OUTPUTFORMAT": "application/json"}
        out.append((f"WFS GetFeature ({t.name})", f"{base}/wfs?{urlencode(query, safe=':')}"))
        if t.name in entry.ogcapi:
            collection = f"{base}/ogcapi/collections/{quote(t.name, safe=':')}"
            out.append((f"OGC API collection ({t.name})", collection))
            out.append((f"OGC API items ({t.name})", f"{collection}/items"))
    return out


def vector_data(entry: VectorEntry, index: int, max_zoom: int) -> dict[str, Any]:
    """A vector layer for the page script: its extent outlined, nothing drawn."""
    box = entry.wgs84_bbox
    return {
        "id": entry.published.id,
        "kind": "vector",
        "title": entry.published.layer.title or entry.published.id,
        "bounds": [[box[1], box[0]], [box[3], box[2]]] if box is not None else None,
        "colour": OUTLINE_COLOURS[index % len(OUTLINE_COLOURS)],
        "fitZoom": min(max_zoom, VECTOR_FIT_ZOOM),
        "draw": None,
    }


def _vector_item(entry: VectorEntry, index: int, data: dict[str, Any], urls: list[tuple[str, str]]) -> str:
    e = html.escape
    published = entry.published
    links = "".join(
        f'<li>{e(label)}: <a class="url" href="{e(url)}"><code>{e(url)}</code></a></li>' for label, url in urls
    )
    types = ", ".join(
        f"{t.public.public_name} ({t.relation.geometry_type or 'no geometry'}, {t.relation.count:,} features)"
        for t in entry.types
    )
    services = "WFS and OGC API Features" if entry.ogcapi & {t.name for t in entry.types} else "WFS"
    zoom = ' <button type="button" class="zoom-to">zoom to</button>' if data["bounds"] is not None else ""
    return (
        f'<li class="layer vector" data-id="{e(published.id)}" data-index="{index}">'
        f'<div class="head"><span class="swatch" style="border-color:{data["colour"]}"></span>'
        f"<b>{e(published.layer.title or published.id)}</b> <code>{e(published.id)}</code>{zoom}</div>"
        f'<div class="meta">vector ({e(services)}): {e(types)}; drawn: {e(NOT_DRAWN_VECTOR)}</div>'
        f'<ul class="urls">{links}</ul></li>'
    )


def layer_data(entry: PageLayer, index: int, max_zoom: int) -> dict[str, Any]:
    """What the page script needs of a layer (text goes through textContent or Leaflet escapes)."""
    west, south, east, north = entry.published.wgs84_bbox
    data: dict[str, Any] = {
        "id": entry.published.id,
        "kind": "raster",
        "title": entry.published.layer.title or entry.published.id,
        "bounds": [[south, west], [north, east]],
        "colour": OUTLINE_COLOURS[index % len(OUTLINE_COLOURS)],
        "fitZoom": max(0, min(max_zoom, round(entry.bottom_zoom))),
        "draw": None,
    }
    draw = entry.drawing
    if draw is None:
        return data
    attribution = (entry.published.layer.attribution or {}).get("title", "")
    common = {
        "kind": draw.kind,
        "url": draw.url,
        "style": draw.style,
        "maxZoom": max_zoom,
        "opacity": RENDERED_OPACITY if entry.published.format.sample_format != "UINT8" else 1.0,
        "attribution": html.escape(str(attribution)),  # Leaflet shows attributions as HTML
    }
    if draw.kind == "maplibre":
        common.update(minZoom=0)
    elif draw.kind == "wmts":
        common.update(
            minZoom=max(0, draw.min_native - ABOVE_TOP),
            minNativeZoom=draw.min_native,
            maxNativeZoom=draw.max_native,
            limits={str(z): list(lim) for z, lim in (draw.limits or {}).items()},
        )
    else:
        common.update(minZoom=0)
    data["draw"] = common
    return data


def _item(entry: PageLayer, index: int, data: dict[str, Any], urls: list[tuple[str, str]]) -> str:
    published = entry.published
    e = html.escape
    links = "".join(
        f'<li>{e(label)}: <a class="url" href="{e(url)}"><code>{e(url)}</code></a></li>' for label, url in urls
    )
    draw = entry.drawing
    rendered = draw is not None and published.format.sample_format != "UINT8"
    style = f", style {e(draw.style)}" if draw is not None and rendered else ""
    controls = (
        f'<label><input type="checkbox" class="visible"{" checked" if data["draw"].get("shown", True) else ""}>'
        f" shown</label> "
        f'<label>opacity <input type="range" class="opacity" min="0" max="100" '
        f'value="{round(100 * data["draw"]["opacity"])}"></label>'
        if data["draw"] is not None
        else ""
    )
    return (
        f'<li class="layer" data-id="{e(published.id)}" data-index="{index}">'
        f'<div class="head"><span class="swatch" style="border-color:{data["colour"]}"></span>'
        f"<b>{e(published.layer.title or published.id)}</b> <code>{e(published.id)}</code>"
        f' <button type="button" class="zoom-to">zoom to</button></div>'
        f'<div class="meta">{e(published.tms.id)}, {e(published.format.code)}, levels {e(published.top_level)}'
        f" to {e(published.bottom_level)}; drawn: {e(entry.how)}{style}</div>"
        f'<div class="controls">{controls}</div><ul class="urls">{links}</ul></li>'
    )


async def home(request: Request) -> Response:
    runtime = get_runtime(request)
    catalog = runtime.catalog
    entries = page_layers(catalog, runtime.settings, style_book(runtime))
    max_zoom = min(24, max((round(e.bottom_zoom) + PAST_BOTTOM for e in entries), default=18))
    vectors = vector_entries(catalog)
    data = [layer_data(entry, i, max_zoom) for i, entry in enumerate(entries)]
    gl = [d for d in data if d["draw"] is not None and d["draw"]["kind"] == "maplibre"]
    for rank, d in enumerate(gl):
        d["draw"]["shown"] = rank < MAX_GL_SHOWN
    data += [vector_data(entry, len(entries) + i, max_zoom) for i, entry in enumerate(vectors)]
    base = base_url(request)
    items = "".join(
        _item(entry, i, d, service_urls(base, entry.published, entry.drawing.style if entry.drawing else ""))
        for i, (entry, d) in enumerate(zip(entries, data, strict=False))
    ) + "".join(
        _vector_item(entry, len(entries) + i, d, vector_urls(base, entry))
        for i, (entry, d) in enumerate(zip(vectors, data[len(entries):], strict=True))
    )
    drawn = sum(1 for d in data if d["draw"] is not None)
    vector_note = f" ({len(vectors)} vector, listed after the others)" if vectors else ""
    summary = (
        f"{len(data)} layers{vector_note}, {drawn} drawn, topmost (smallest) first; outlines show each extent."
        if data
        else "No public layer is published."
    )
    # JSON inside <script>: '<' escaped so no value can close the element
    payload = orjson.dumps({"maxZoom": max_zoom, "layers": data}).decode().replace("<", "\\u003c")
    title = html.escape(runtime.settings.service_title)
    page = PAGE.format(
        title=title, summary=html.escape(summary), items=items, layers=payload,
        maplibre_css='<link rel="stylesheet" href="static/maplibre/maplibre-gl.css">\n' if gl else "",
        maplibre_js='<script src="static/maplibre/maplibre-gl.js"></script>\n'
                    '<script src="static/maplibre/leaflet-maplibre-gl.js"></script>\n' if gl else "",
    )
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


def routes() -> list[BaseRoute]:
    return [
        Route("/", home),
        Mount("/static", app=StaticFiles(directory=str(PACKAGE_DIR / "static")), name="static"),
    ]
