"""TMS 1.0.0 (OSGeo Tile Map Service) as ROK4 serves it, plus TileJSON, a GDAL WMS description and XYZ URLs.

Rows are counted **from the top** (the same row as WMTS), not from the bottom as the TMS text says:
that is what ROK4 has always served, so existing ROK4 URLs and XYZ clients (Leaflet, MapLibre with
`scheme: xyz`) keep working. The TileMap says so honestly: its Origin is the grid's top-left corner
and gdal.xml declares `<YOrigin>top</YOrigin>`.

Errors are ROK4's `<TileMapServerError><Message>`: an unknown layer or level, a wrong extension or a
version other than 1.0.0 → 400; a tile outside the published limits or absurd indices → 404; a
failing storage → 502/503. Client input never produces a 5xx.
"""

from __future__ import annotations

import copy
import functools
import html
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from lxml import etree
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.catalog import Catalog, PublishedLayer
from tileserver.runtime import get_runtime
from tileserver.services.grids import extra_grids
from tileserver.services.numbers import BadIndex, parse_index, shortest
from tileserver.services.ows import XML_DECLARATION, base_url, echo, key_hash, xml_text
from tileserver.services.policy import ServiceError, document_headers, error_response, register
from tileserver.services.routing import any_path_route
from tileserver.services.stylebook import style_book, tile_styles
from tileserver.services.tiles import TileNotFound, empty_tile, native_tile, rendered_tile, tile_response
from tileserver.services.tms_common import (
    VERSION,
    XML_TYPE,
    TMSError,
    key_query,
    level_order,
    render_error,
    service_url,
)
from tileserver.services.vectortables import tilejson_type, vector_tables
from tileserver.settings import data_directory

TEMPLATES = data_directory("capabilities_templates")
EXTENSION_ALIASES = {"jpg": "jpeg"}  # accepted besides the pyramid's own extension
MAX_CACHED_BASES = 8  # distinct public URLs whose documents are cached per snapshot


def _serialise(root: etree._Element) -> bytes:
    return XML_DECLARATION + etree.tostring(root, encoding="UTF-8", pretty_print=True)


@functools.lru_cache(maxsize=4)
def _template(name: str) -> etree._Element:
    parser = etree.XMLParser(remove_blank_text=True, remove_comments=True)
    return etree.parse(str(TEMPLATES / f"tms-1.0.0-{name}.xml"), parser).getroot()


def _skeleton(name: str) -> etree._Element:
    """A fresh copy of a template: the cached tree is never modified."""
    return copy.deepcopy(_template(name))


def _set_text(root: etree._Element, tag: str, text: str) -> None:
    node = root.find(tag)
    assert node is not None, tag
    node.text = xml_text(text)


def _keywords(root: etree._Element, keywords: Iterable[str]) -> None:
    """TMS has one KeywordList holding space-separated keywords (OWSLib splits on spaces)."""
    words = [xml_text(k).replace(" ", "_") for k in keywords if k.strip()]
    node = root.find("KeywordList")
    assert node is not None
    if words:
        node.text = " ".join(words)
    else:
        root.remove(node)


# --- URLs ---------------------------------------------------------------------------------------


OSGEO = "osgeo"  # `/tms/osgeo/1.0.0/…`: TMS 1.0.0 to the letter, rows counted from the bottom


def osgeo_url(request: Request) -> str:
    return f"{base_url(request)}/tms/{OSGEO}/{VERSION}"


# --- documents ----------------------------------------------------------------------------------


def services_document(request: Request, osgeo: bool = False) -> bytes:
    """`/tms` (`/tms/osgeo`): the TMS root resource listing the one service version."""
    runtime = get_runtime(request)
    root = etree.Element("Services")
    etree.SubElement(
        root,
        "TileMapService",
        title=xml_text(runtime.settings.service_title),
        version=VERSION,
        href=f"{osgeo_url(request) if osgeo else service_url(request)}/",
    )
    return _serialise(root)


def service_document(request: Request, visible: list[PublishedLayer], osgeo: bool = False) -> bytes:
    """`/tms/1.0.0`: one TileMap per layer the caller may see (`/tms/osgeo/1.0.0`: per quad-tree layer)."""
    settings = get_runtime(request).settings
    base = osgeo_url(request) if osgeo else service_url(request)
    root = _skeleton("service")
    root.set("services", f"{base_url(request)}/tms" + (f"/{OSGEO}" if osgeo else ""))
    _set_text(root, "Title", settings.service_title)
    _set_text(root, "Abstract", settings.service_abstract)
    _keywords(root, ("TMS", "ROK4", "tiles"))
    contact = root.find("ContactInformation/ContactPersonPrimary/ContactOrganization")
    assert contact is not None
    contact.text = xml_text(settings.provider_name)
    tilemaps = root.find("TileMaps")
    assert tilemaps is not None
    for published in sorted(visible, key=lambda p: p.id):
        if osgeo:
            if osgeo_matrices(published) is not None:
                etree.SubElement(
                    tilemaps, "TileMap", title=xml_text(published.layer.title), srs=published.tms.crs,
                    profile=osgeo_profile(published), extension=published.format.tms_extension,
                    href=f"{base}/{published.id}",
                )
            continue
        for view in views(request, published):
            title = published.layer.title + (f" ({view.grid.id})" if view.grid else "")
            title += f" ({view.style.identifier})" if view.style else ""
            etree.SubElement(
                tilemaps,
                "TileMap",
                title=xml_text(title),
                srs=view.tms.crs,
                profile="none",
                extension=view.extension,
                href=f"{base}/{view.id}",
            )
    return _serialise(root)


def _insert_after(root: etree._Element, anchor_tags: tuple[str, ...], node: etree._Element) -> None:
    """Put `node` after the last present anchor, keeping the TMS element order."""
    for tag in reversed(anchor_tags):
        anchor = root.find(tag)
        if anchor is not None:
            anchor.addnext(node)
            return
    root.insert(0, node)


def _metadata_and_attribution(root: etree._Element, published: PublishedLayer) -> None:
    layer = published.layer
    anchors: tuple[str, ...] = ("Title", "Abstract", "KeywordList")
    for meta in layer.metadata:
        node = etree.Element("Metadata", type=xml_text(str(meta.get("type", "Other"))))
        node.set("mime-type", xml_text(str(meta.get("format", "text/html"))))
        node.set("href", xml_text(str(meta["url"])))
        _insert_after(root, anchors, node)
        anchors = (*anchors, "Metadata")
    attribution = layer.attribution
    if attribution:
        node = etree.Element("Attribution")
        etree.SubElement(node, "Title").text = xml_text(str(attribution.get("title", "")))
        logo = attribution.get("logo")
        if isinstance(logo, dict) and logo.get("url"):
            etree.SubElement(
                node,
                "Logo",
                width=str(logo.get("width", "")),
                height=str(logo.get("height", "")),
                href=xml_text(str(logo["url"])),
            ).set("mime-type", xml_text(str(logo.get("format", "image/png"))))
        _insert_after(root, anchors, node)


EXTRA_GRID_SEPARATOR = "@"  # `/tms/1.0.0/{layer}@{grid}`: a layer in one of its extra grids (never in layer ids)
STYLE_SEPARATOR = ":"  # `/tms/1.0.0/{layer}:{style}`: a layer drawn in one of its styles (never in layer ids)
STYLED_MIME, STYLED_EXTENSION = "image/png", "png"  # what a style that changes pixels draws


@dataclass(frozen=True)
class TileMapView:
    """What one TileMap describes: a layer in its own grid, or reprojected into an extra grid."""

    published: PublishedLayer
    grid: Any = None  # grids.GridSet of an extra grid, None for the pyramid's own
    style: Any = None  # a style that changes pixels (render.styles.Style): PNG tiles drawn with it

    @property
    def id(self) -> str:
        grid = f"{EXTRA_GRID_SEPARATOR}{self.grid.id}" if self.grid else ""
        return self.published.id + grid + (f"{STYLE_SEPARATOR}{self.style.identifier}" if self.style else "")

    @property
    def mime(self) -> str:
        return STYLED_MIME if self.style else self.published.format.mime

    @property
    def extension(self) -> str:
        return STYLED_EXTENSION if self.style else self.published.format.tms_extension

    @property
    def tms(self) -> Any:
        return self.grid.tms if self.grid else self.published.tms

    @property
    def level_ids(self) -> tuple[str, ...]:
        if self.grid:  # an extra grid lists every matrix; a TileMap, those reaching the layer's extent
            return tuple(m.id for m in self.grid.matrices if m.id in self.grid.limits)
        return self.published.level_ids

    @property
    def limits(self) -> Any:
        return self.grid.limits if self.grid else self.published.limits

    def matrix(self, level: str) -> Any:
        return self.tms.get(level)

    @property
    def native_bbox(self) -> tuple[float, float, float, float]:
        if not self.grid:
            return self.published.native_bbox
        bottom = self.level_ids[-1]
        lim = self.limits[bottom]
        return self.matrix(bottom).range_bbox(lim.min_col, lim.min_row, lim.max_col, lim.max_row)

    def order(self, level: str) -> int:
        return int(level) if level.isdigit() else self.level_ids.index(level)


def drawing_styles(request: Request, published: PublishedLayer) -> dict[str, Any]:
    """The layer's styles that change pixels and that its data can take, by identifier: each is a
    TileMap of its own (`{layer}:{style}`, PNG tiles drawn by the render pipeline), since a TileMap
    has one format and no style. A DEM is thus offered as pictures (hypso, hillshade…), not only BIL."""
    if published.format.is_vector:
        return {}
    styles = tile_styles(published, style_book(get_runtime(request)))
    return {name: style for name, style in styles.items() if style is not None}


def views(request: Request, published: PublishedLayer) -> list[TileMapView]:
    """The TileMaps of a layer: as stored, in each drawing style, in each extra grid (as stored)."""
    styled = [TileMapView(published, style=s) for s in drawing_styles(request, published).values()]
    extra = [TileMapView(published, g) for g in extra_grids(published).values()]
    return [TileMapView(published), *styled, *extra]


def tilemap_document(request: Request, view: TileMapView) -> bytes:
    """`/tms/1.0.0/{layer}`: grid, extent, format and one TileSet per published level."""
    base = service_url(request)
    published = view.published
    layer, tms = published.layer, view.tms
    bottom = view.matrix(view.level_ids[-1])
    root = _skeleton("tilemap")
    root.set("tilemapservice", base)
    _set_text(root, "Title", layer.title)
    _set_text(root, "Abstract", layer.abstract)
    _keywords(root, layer.keywords)
    _metadata_and_attribution(root, published)
    _set_text(root, "SRS", tms.crs)
    bbox = root.find("BoundingBox")
    assert bbox is not None
    for name, value in zip(("minx", "miny", "maxx", "maxy"), view.native_bbox, strict=True):
        bbox.set(name, shortest(value))
    origin = root.find("Origin")
    assert origin is not None
    origin.set("x", shortest(bottom.origin_x))
    origin.set("y", shortest(bottom.origin_y))
    tile_format = root.find("TileFormat")
    assert tile_format is not None
    for name, text in (
        ("width", str(bottom.tile_width)),
        ("height", str(bottom.tile_height)),
        ("mime-type", view.mime),
        ("extension", view.extension),
    ):
        tile_format.set(name, text)
    tilesets = root.find("TileSets")
    assert tilesets is not None
    for level in view.level_ids:
        limits = view.limits[level]
        etree.SubElement(
            tilesets,
            "TileSet",
            {
                "href": f"{base}/{view.id}/{level}",
                "units-per-pixel": shortest(view.matrix(level).cell_size),
                "order": str(view.order(level)),
                "minrow": str(limits.min_row),
                "maxrow": str(limits.max_row),
                "mincol": str(limits.min_col),
                "maxcol": str(limits.max_col),
            },
        )
    return _serialise(root)


def _vector_layers(published: PublishedLayer) -> list[dict[str, Any]]:
    """TileJSON `vector_layers`: one per table of the descriptor's `tables`, with the zooms of the
    published levels holding it and its fields typed as tippecanoe types them (String, Number, Boolean)."""
    found: dict[str, dict[str, Any]] = {}
    for level, name, geometry, fields in vector_tables(published):
        zoom = level_order(published, level)
        entry = found.setdefault(name, {"id": name, "fields": {}, "minzoom": zoom, "maxzoom": zoom})
        entry["minzoom"], entry["maxzoom"] = min(entry["minzoom"], zoom), max(entry["maxzoom"], zoom)
        entry["fields"].update({field: tilejson_type(kind) for field, kind in fields.items()})
        if geometry:
            entry["geometry"] = geometry
    return list(found.values())


def _attribution_html(attribution: dict[str, Any] | None) -> str:
    """TileJSON attribution may hold HTML: the title, linked to the attribution URL when there is one."""
    title = html.escape(str((attribution or {}).get("title", "")))
    url = str((attribution or {}).get("url", ""))
    return (
        f'<a href="{html.escape(url)}">{title}</a>'
        if title and url.startswith(("http://", "https://"))
        else title
    )


_EDGE = 1e-7  # degrees (about a centimetre)


def _inner_bounds(west: float, south: float, east: float, north: float) -> list[float]:
    """TileJSON bounds a hair inside the extent: it is the limits' tile edges, and MapLibre turns
    bounds back into tile ranges with floor/ceil, so an edge landing 1e-12 outside (two datum
    round trips) made it fetch a row of vector tiles past the limits (404s in its console). Raster
    bounds stay exact: clients compare them with the WMS extent."""
    if east - west > 4 * _EDGE and north - south > 4 * _EDGE:
        west, south, east, north = west + _EDGE, south + _EDGE, east - _EDGE, north - _EDGE
    return [west, south, east, north]


def tilejson(request: Request, view: TileMapView) -> bytes:
    """TileJSON 3.0.0; zooms are the level ids (ROK4's grids number them), `crs` names the grid's CRS."""
    published = view.published
    layer, fmt = published.layer, published.format
    zooms = [level_order(published, level) for level in published.level_ids]
    west, south, east, north = published.wgs84_bbox
    minzoom, maxzoom = min(zooms), max(zooms)
    doc: dict[str, Any] = {
        "tilejson": "3.0.0",
        "name": layer.title,
        "description": layer.abstract,
        "version": "1.0.0",
        "attribution": _attribution_html(layer.attribution),
        "scheme": "xyz",
        "tiles": [f"{service_url(request)}/{view.id}/{{z}}/{{x}}/{{y}}.{view.extension}" + key_query(request)],
        "minzoom": minzoom,
        "maxzoom": maxzoom,
        "bounds": _inner_bounds(west, south, east, north) if fmt.is_vector else [west, south, east, north],
        "center": [(west + east) / 2, (south + north) / 2, (minzoom + maxzoom) // 2],
        "format": view.extension,
        "crs": published.tms.crs,
        "tilematrixset": published.tms.id,
        "quadtree": published.tms.is_quadtree,
    }
    if layer.keywords:
        doc["keywords"] = list(layer.keywords)
    if fmt.is_vector:
        doc["vector_layers"] = _vector_layers(published)
    return orjson.dumps(doc)


def _gdal_zoom_chain(published: PublishedLayer) -> bool:
    """GDAL's TMS driver derives level z from the bottom one by halving: ids must be z numbers."""
    bottom_id = published.bottom_level
    if not bottom_id.isdigit():
        return False
    bottom = published.matrix(bottom_id)
    for level in published.level_ids:
        if not level.isdigit():
            return False
        expected = bottom.cell_size * 2 ** (int(bottom_id) - int(level))
        if abs(published.matrix(level).cell_size / expected - 1) > 2e-4:
            return False
    return True


def gdal_document(request: Request, view: TileMapView) -> bytes:
    """GDAL WMS driver description (TMS minidriver) for quad-tree raster layers, as ROK4 writes it."""
    published = view.published
    if published.format.is_vector:
        raise TMSError(400, f"layer {echo(published.id)} is a vector layer: no GDAL description")
    if not published.tms.is_quadtree or not _gdal_zoom_chain(published):
        raise TMSError(
            400, f"the grid {echo(published.tms.id)} of layer {echo(published.id)} is not a quad tree"
        )
    bottom_id = published.bottom_level
    bottom = published.matrix(bottom_id)
    tile_level = int(bottom_id)
    # the whole grid, from its zoom-0 matrix when it has one (exact numbers), else from the bottom one:
    # GDAL counts tile indices from the window's corner, so the window starts at the grid origin
    ulx, lry, lrx, uly = (published.tms.get("0") or bottom).bbox
    root = etree.Element("GDAL_WMS")
    service = etree.SubElement(root, "Service", name="TMS")
    template = f"{service_url(request)}/{view.id}/${{z}}/${{x}}/${{y}}.{view.extension}"
    etree.SubElement(service, "ServerUrl").text = xml_text(template)
    window = etree.SubElement(root, "DataWindow")
    fields = (
        ("UpperLeftX", shortest(ulx)),
        ("UpperLeftY", shortest(uly)),
        ("LowerRightX", shortest(lrx)),
        ("LowerRightY", shortest(lry)),
        ("TileLevel", str(tile_level)),
        ("TileCountX", str(max(1, math.ceil(bottom.matrix_width / 2**tile_level)))),
        ("TileCountY", str(max(1, math.ceil(bottom.matrix_height / 2**tile_level)))),
        ("YOrigin", "top"),
    )
    for tag, text in fields:
        etree.SubElement(window, tag).text = text
    for tag, text in (
        ("Projection", published.tms.crs),
        ("BlockSizeX", str(bottom.tile_width)),
        ("BlockSizeY", str(bottom.tile_height)),
        ("BandsCount", "4" if view.style else str(published.channels)),  # a drawn tile is RGBA
        *((("DataType", "Float32"),) if published.format.sample_format == "FLOAT32" and not view.style else ()),
        ("ZeroBlockHttpCodes", "204,404"),
    ):
        etree.SubElement(root, tag).text = text
    # no XML declaration: GDAL (and QGIS through it) recognises the file only when it starts with <GDAL_WMS>
    return etree.tostring(root, encoding="unicode", pretty_print=True).encode()


# --- TMS 1.0.0 to the letter (`/tms/osgeo/1.0.0`) ------------------------------------------------
#
# ROK4's TileMap counts rows from the top and gives the data's extent as BoundingBox. Readers of the
# standard (GDAL's TileMap reader, hence QGIS) count rows from the bottom of the BoundingBox, take
# it as the origin of the tile indices, and take `order` as the zoom from 0. This flavour is what
# they read: the grid's whole extent, Origin at its lower-left corner, TileSets z = 0 … bottom,
# rows from the bottom. It exists for quad-tree grids whose level ids are their zoom (PM, 4326).


def osgeo_matrices(published: PublishedLayer) -> list[Any] | None:
    """Matrices z = 0 … bottom when the grid is a quad tree numbered by zoom from one top matrix
    covering the grid, None otherwise (the TMS 1.0.0 reading would be wrong)."""
    if not published.tms.is_quadtree or not _gdal_zoom_chain(published):
        return None
    matrices = [published.tms.get(str(z)) for z in range(int(published.bottom_level) + 1)]
    top = matrices[0]
    if top is None or any(
        m is None or (m.matrix_width, m.matrix_height) != (top.matrix_width << z, top.matrix_height << z)
        for z, m in enumerate(matrices)
    ):
        return None
    return matrices


def osgeo_profile(published: PublishedLayer) -> str:
    """The TMS profile the grid is: global-mercator (1 tile at z 0), global-geodetic (2 × 1), or local."""
    top = published.tms.get("0")
    size = (top.matrix_width, top.matrix_height) if top else None
    if published.tms.crs == "EPSG:3857" and size == (1, 1):
        return "global-mercator"
    if published.tms.crs == "EPSG:4326" and size == (2, 1):
        return "global-geodetic"
    return "local"


def _osgeo_layer(published: PublishedLayer) -> list[Any]:
    matrices = osgeo_matrices(published)
    if matrices is None:
        raise TMSError(
            400,
            f"the grid {echo(published.tms.id)} of layer {echo(published.id)} is not a quad tree numbered "
            f"by zoom: use /tms/{VERSION}/{published.id}",
        )
    return matrices


def osgeo_tilemap(request: Request, published: PublishedLayer) -> bytes:
    """`/tms/osgeo/1.0.0/{layer}`: the grid's extent, lower-left Origin, one TileSet per zoom 0 … bottom."""
    matrices = _osgeo_layer(published)
    base = osgeo_url(request)
    layer, fmt = published.layer, published.format
    root = _skeleton("tilemap")
    root.set("tilemapservice", f"{base}/")
    _set_text(root, "Title", layer.title)
    _set_text(root, "Abstract", layer.abstract)
    _keywords(root, layer.keywords)
    _metadata_and_attribution(root, published)
    _set_text(root, "SRS", published.tms.crs)
    minx, miny, maxx, maxy = matrices[0].bbox
    bbox = root.find("BoundingBox")
    assert bbox is not None
    for name, value in zip(("minx", "miny", "maxx", "maxy"), (minx, miny, maxx, maxy), strict=True):
        bbox.set(name, shortest(value))
    origin = root.find("Origin")
    assert origin is not None
    origin.set("x", shortest(minx))
    origin.set("y", shortest(miny))
    tile_format = root.find("TileFormat")
    assert tile_format is not None
    bottom = matrices[-1]
    for name, value in (
        ("width", bottom.tile_width),
        ("height", bottom.tile_height),
        ("mime-type", fmt.mime),
        ("extension", fmt.tms_extension),
    ):
        tile_format.set(name, str(value))
    tilesets = root.find("TileSets")
    assert tilesets is not None
    tilesets.set("profile", osgeo_profile(published))
    for z, matrix in enumerate(matrices):
        etree.SubElement(
            tilesets,
            "TileSet",
            {"href": f"{base}/{published.id}/{z}", "units-per-pixel": shortest(matrix.cell_size), "order": str(z)},
        )
    return _serialise(root)


async def osgeo_tile(request: Request, published: PublishedLayer, z: str, x: str, y_ext: str) -> Response:
    """`{z}/{x}/{y}.{ext}` with y from the bottom. Anywhere in the grid the answer is an image
    (a nodata tile outside the data): the TileMap covers the whole grid, and GDAL's reader takes only
    204 as "no tile"."""
    matrices = _osgeo_layer(published)
    y, dot, ext = y_ext.rpartition(".")
    if not dot or not y:
        raise TMSError(400, "a tile is requested as {z}/{x}/{y}.{extension}")
    if not z.isdigit() or z != str(int(z)) or int(z) >= len(matrices):
        raise TMSError(400, f"level {echo(z)} is not published by layer {echo(published.id)}")
    wanted = published.format.tms_extension
    if EXTENSION_ALIASES.get(ext, ext) != wanted:
        raise TMSError(400, f"extension {echo(ext)} is not the layer's ({wanted})")
    matrix = matrices[int(z)]
    col, from_bottom = _index(x, "column"), _index(y, "row")
    if not (0 <= col < matrix.matrix_width and 0 <= from_bottom < matrix.matrix_height):
        raise TMSError(404, "No data found")
    row = matrix.matrix_height - 1 - from_bottom
    try:
        answer = await native_tile(published, z, col, row) if z in published.limits else None
        answer = answer or empty_tile(published, z)
    except TileNotFound:
        raise TMSError(404, "No data found") from None
    return tile_response(answer, published, get_runtime(request).settings, request.headers.get("accept-encoding"))


async def _dispatch_osgeo(request: Request, catalog: Catalog, parts: list[str]) -> Response:
    if not parts:
        body = _cached(request, catalog, (OSGEO, "services"), lambda: services_document(request, osgeo=True))
        return _xml_bytes(request, body)
    if parts[0] != VERSION:
        raise TMSError(400, f"TMS version {echo(parts[0])} is not supported (only {VERSION})")
    if len(parts) == 1:
        visible = catalog.visible("tms", key_hash(request))
        key = (OSGEO, "service", tuple(sorted(p.id for p in visible)))
        body = _cached(request, catalog, key, lambda: service_document(request, visible, osgeo=True))
        return _xml_bytes(request, body, visible)
    published = _layer(request, catalog, parts[1])
    if len(parts) == 2:
        body = _cached(request, catalog, (OSGEO, "tilemap", published.id), lambda: osgeo_tilemap(request, published))
        return _xml_bytes(request, body, [published])
    if len(parts) == 5:
        return await osgeo_tile(request, published, parts[2], parts[3], parts[4])
    raise TMSError(404, "no such TMS resource")


# --- tiles --------------------------------------------------------------------------------------


def _index(text: str, what: str) -> int:
    """A tile index; not a number → 400, a number no grid can hold → 404 (absurd, not malformed)."""
    try:
        return parse_index(text)
    except BadIndex as exc:
        if exc.absurd:
            raise TMSError(404, f"{what} {echo(text)} is outside the layer") from None
        raise TMSError(400, f"{what} {echo(text)} is not an integer") from None


async def tile(request: Request, view: TileMapView, level: str, x: str, y_ext: str) -> Response:
    """`{level}/{x}/{y}.{ext}`: the stored tile, its row counted from the top as WMTS and ROK4 do."""
    published = view.published
    y, dot, ext = y_ext.rpartition(".")
    if not dot or not y:
        raise TMSError(400, "a tile is requested as {z}/{x}/{y}.{extension}")
    if view.tms.get(level) is None or level not in view.limits:
        raise TMSError(400, f"level {echo(level)} is not published by layer {echo(view.id)}")
    wanted = view.extension
    if EXTENSION_ALIASES.get(ext, ext) != wanted:
        raise TMSError(400, f"extension {echo(ext)} is not the layer's ({wanted})")
    col, row = _index(x, "column"), _index(y, "row")
    if view.grid is not None:
        return await _reprojected_tile(request, view, level, col, row)
    if view.style is not None:
        return await _styled_tile(request, view, level, col, row)
    try:
        answer = await native_tile(published, level, col, row)
    except TileNotFound:
        answer = None
    if answer is None:
        raise TMSError(404, "No data found")
    return tile_response(answer, published, get_runtime(request).settings, request.headers.get("accept-encoding"))


async def _reprojected_tile(request: Request, view: TileMapView, level: str, col: int, row: int) -> Response:
    """A tile of an extra grid, rendered from the pyramid in the layer's own format."""
    if not view.limits[level].contains(col, row):
        raise TMSError(404, "No data found")
    runtime = get_runtime(request)
    answer = await rendered_tile(runtime, view.published, view.tms, level, col, row, None, view.published.format.mime)
    return tile_response(answer, view.published, runtime.settings)


async def _styled_tile(request: Request, view: TileMapView, level: str, col: int, row: int) -> Response:
    """A tile of a style TileMap: the stored tile drawn with the style to PNG (render pipeline), inside
    the same limits as the stored tiles."""
    if not view.published.in_limits(level, col, row):
        raise TMSError(404, "No data found")
    runtime = get_runtime(request)
    answer = await rendered_tile(runtime, view.published, view.tms, level, col, row, view.style, STYLED_MIME)
    return tile_response(answer, view.published, runtime.settings)


# --- dispatch -----------------------------------------------------------------------------------

LayerHandler = Callable[[Request, TileMapView], bytes]
LAYER_DOCUMENTS: dict[str, tuple[LayerHandler, str]] = {
    "metadata.json": (tilejson, "application/json"),
    "gdal.xml": (gdal_document, XML_TYPE),
}


def _layer(request: Request, catalog: Catalog, layer_id: str) -> PublishedLayer:
    published = catalog.get(layer_id, "tms", key_hash(request))
    if published is None:
        raise TMSError(400, f"layer {echo(layer_id)} unknown")
    return published


def _cached(request: Request, catalog: Catalog, key: tuple[Any, ...], build: Callable[[], bytes]) -> bytes:
    """Per-snapshot cache. Documents embed the public URL, which follows the Host header unless
    `public_url` is set: past a few distinct hosts, build without caching so forged hosts cannot grow it."""
    base = base_url(request)
    bases: set[str] = catalog.document(("tms", "bases"), set)
    if base not in bases:
        if len(bases) >= MAX_CACHED_BASES:
            return build()
        bases.add(base)
    return catalog.document(("tms", base, *key), build)


async def _dispatch(request: Request, parts: list[str]) -> Response:
    catalog = get_runtime(request).catalog  # one snapshot for the whole request
    if not parts:
        return _xml_bytes(request, _cached(request, catalog, ("services",), lambda: services_document(request)))
    if parts[0] == OSGEO:
        return await _dispatch_osgeo(request, catalog, parts[1:])
    if parts[0] != VERSION:
        raise TMSError(400, f"TMS version {echo(parts[0])} is not supported (only {VERSION})")
    if len(parts) == 1:
        visible = catalog.visible("tms", key_hash(request))
        # keyed by what the caller sees, not by the key: random keys cannot grow the cache
        key = ("service", tuple(sorted(p.id for p in visible)))
        body = _cached(request, catalog, key, lambda: service_document(request, visible))
        return _xml_bytes(request, body, visible)
    name, _, style_id = parts[1].partition(STYLE_SEPARATOR)
    layer_id, _, grid_id = name.partition(EXTRA_GRID_SEPARATOR)
    published = _layer(request, catalog, layer_id)
    view = TileMapView(published)
    if style_id:
        style = drawing_styles(request, published).get(style_id)
        if style is None or grid_id:
            raise TMSError(400, f"layer {echo(layer_id)} is not offered in style {echo(style_id)}")
        view = TileMapView(published, style=style)
    elif grid_id:
        grid = extra_grids(published).get(grid_id)
        if grid is None:
            raise TMSError(400, f"layer {echo(layer_id)} is not offered in grid {echo(grid_id)}")
        view = TileMapView(published, grid)
    if len(parts) == 2:
        body = _cached(request, catalog, ("tilemap", view.id), lambda: tilemap_document(request, view))
        return _xml_bytes(request, body, [published])
    if len(parts) == 5:
        return await tile(request, view, parts[2], parts[3], parts[4])
    if view.grid is not None:
        raise TMSError(404, "no such TMS resource")
    if len(parts) == 3 and parts[2] in LAYER_DOCUMENTS:
        build, media_type = LAYER_DOCUMENTS[parts[2]]
        # the URL key is part of the document (TileJSON's template repeats it): never served to another
        # caller from the cache; only valid keys reach the key, so the cache stays bounded
        body = _cached(request, catalog, (parts[2], view.id, key_query(request)), lambda: build(request, view))
        return Response(body, media_type=media_type, headers=document_headers(request, [published]))
    if len(parts) == 3 and parts[2] not in published.limits:
        raise TMSError(400, f"level {echo(parts[2])} is not published by layer {echo(published.id)}")
    raise TMSError(404, "no such TMS resource")


def _xml_bytes(request: Request, body: bytes, layers: Iterable[PublishedLayer] = ()) -> Response:
    return Response(body, media_type=XML_TYPE, headers=document_headers(request, layers))


def _segments(path: str) -> list[str] | None:
    """Path segments after the prefix; ROK4 ignores one trailing slash. None: not under the prefix."""
    if path and not path.startswith("/"):
        return None
    path = path.rstrip("/")
    return path.split("/")[1:] if path else []


async def tms_endpoint(request: Request) -> Response:
    parts = _segments(request.path_params.get("path", ""))
    try:
        if parts is None or any(p == "" for p in parts):
            raise TMSError(404, "no such TMS resource")
        return await _dispatch(request, parts)
    except ServiceError as exc:
        return error_response(request, exc, render_error)


async def xyz_endpoint(request: Request) -> Response:
    """`/xyz/{layer}/{z}/{x}/{y}.{ext}`: the same tiles under a URL shape Leaflet users expect."""
    p = request.path_params
    try:
        published = _layer(request, get_runtime(request).catalog, p["layer"])
        return await tile(request, TileMapView(published), p["z"], p["x"], p["y"])
    except ServiceError as exc:
        return error_response(request, exc, render_error)


def routes() -> list[BaseRoute]:
    register("tms", render_error)
    return [
        any_path_route("/tms{path:path}", tms_endpoint),
        Route("/xyz/{layer}/{z}/{x}/{y}", xyz_endpoint, methods=["GET"]),
    ]
