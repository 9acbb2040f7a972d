"""OGC API – Tiles 1.0 (with OGC API – Common landing, conformance, OpenAPI) over the published layers.

Served under `/ogcapi` and, identically, under ROK4's older `/ogcapitiles`. Raster layers are `map`
collections (`…/map/tiles`, `…/styles/{style}/map/tiles`), vector pyramids `vector` collections
(`…/tiles`); ROK4's dataset-level forms `/map/tiles/{tms}/{z}/{row}/{col}?collections=ID` and
`/styles/{style}/map/tiles/…?collections=ID` answer the tile of that one collection.

Tiles are the pyramid's own, in its own grid, passed through as stored (see `services.tiles`); only a
style segment naming a style that changes pixels (palette, hillshade…) renders, to PNG, through the
render pipeline. The grids are named by their ROK4 id (`PM`, `LAMB93_1M_MNT`…) and, when the numbers really match an
OGC-registered tile matrix set, also by that id (`WebMercatorQuad`, `WorldCRS84Quad`), because
clients and the OGC suite look for registered grids.

Metadata answers JSON by default and HTML to browsers (`f=json|html` or `Accept`, `Vary: Accept`).
Errors are RFC 7807 problems: 404 for what does not exist (collection, grid, style, tile outside the
published limits, absurd index), 400 for malformed input, 406 when `Accept` excludes every
representation; client input never produces a 5xx.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import orjson
import pyproj
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from tileserver.catalog import Catalog, PublishedLayer
from tileserver.render.encode import encode_image
from tileserver.render.georef import Grid
from tileserver.render.pipeline import MapLayer, RenderError, gate_for, render_map, render_tile, style_usable
from tileserver.render.styles import Style
from tileserver.rok4.descriptor import TileLimits
from tileserver.rok4.tms import TileMatrixSet, crs_uri
from tileserver.runtime import get_runtime
from tileserver.services.grids import extra_grids
from tileserver.services.numbers import BadIndex, parse_index
from tileserver.services.ows import KVP, base_url, bbox_values, echo, key_hash
from tileserver.services.policy import ServiceError, document_headers, error_response, map_headers, register
from tileserver.services.routing import any_path_route
from tileserver.services.stylebook import style_book
from tileserver.services.tiles import (
    TileAnswer,
    TileNotFound,
    TileRenderError,
    native_tile,
    rendered_tile,
    tile_response,
)
from tileserver.services.vectortables import vector_tables

log = logging.getLogger("tileserver.ogcapi")

PREFIXES = ("/ogcapi", "/ogcapitiles")
REL = "http://www.opengis.net/def/rel/ogc/1.0/"
CRS84 = "http://www.opengis.net/def/crs/OGC/1.3/CRS84"
JSON = "application/json"
HTML = "text/html"
OPENAPI = "application/vnd.oai.openapi+json;version=3.0"
PROBLEM = "application/problem+json"

CONFORMANCE = (
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/landing-page",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/json",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/html",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/oas30",
    "http://www.opengis.net/spec/ogcapi-common-2/1.0/conf/collections",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/tileset",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/tilesets-list",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/geodata-tilesets",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/oas30",
)
# tile encodings: a class is declared only while some tileset serves it (PyramidFormat.ogc_f → class)
ENCODING_CLASSES = {
    f: f"http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/{name}"
    for f, name in (("png", "png"), ("jpg", "jpeg"), ("tiff", "tiff"), ("mvt", "mvt"))
}

# other modules' collections and conformance classes (OGC API – Features adds its vector layers):
# objects with `conformance(ctx) -> [uri]`, `collections(ctx, bbox) -> [doc]`, `collection(ctx, id) -> doc | None`
PROVIDERS: list[Any] = []

# OGC-registered grids we may alias, in the 2D-TMS 2.0 definitions morecantile ships
REGISTERED = ("WebMercatorQuad", "WorldCRS84Quad")

# `f` for metadata: value → representation
METADATA_F = {"json": "json", JSON: "json", "html": "html", HTML: "html"}
# `f` for tiles: value → the OGC `f` name of a native format (PyramidFormat.ogc_f)
TILE_F = {
    "png": "png",
    "jpg": "jpg",
    "jpeg": "jpg",
    "tiff": "tiff",
    "tif": "tiff",
    "bil": "bil",
    "mvt": "mvt",
    "pbf": "mvt",
}


# --- errors ---------------------------------------------------------------------------------------


class Problem(ServiceError):
    """An RFC 7807 answer of OGC API's own; `kind` is ROK4's problem type name."""

    TITLES = {
        400: "Bad Request",
        404: "Not Found",
        406: "Not Acceptable",
        502: "Bad Gateway",
        503: "Service Unavailable",
    }

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail, status=status)
        self.kind = kind


def render_problem(request: Request, error: ServiceError) -> Response:
    """The OGC API error handler's format: any service error as an RFC 7807 problem."""
    body = {
        "type": error.kind,
        "title": Problem.TITLES.get(error.status, "Error"),
        "status": error.status,
        "detail": error.message,
    }
    return Response(orjson.dumps(body), error.status, media_type=PROBLEM)


def not_found(detail: str) -> Problem:
    return Problem(404, "ResourceNotFound", detail)


def invalid(detail: str) -> Problem:
    return Problem(400, "InvalidParameter", detail)


# --- content negotiation --------------------------------------------------------------------------


def _accept_ranges(header: str) -> list[tuple[str, float]]:
    """(media range, q) pairs of an Accept header; malformed q counts as 1, parameters are ignored."""
    ranges = []
    for item in header.split(","):
        parts = [p.strip() for p in item.split(";")]
        if not parts[0]:
            continue
        q = 1.0
        for param in parts[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 1.0
        ranges.append((parts[0].lower(), q))
    return ranges


def _quality(ranges: list[tuple[str, float]], media_type: str) -> tuple[float, int]:
    """(q, specificity) the most specific matching range gives a media type; (0, -1) if none."""
    kind = media_type.split(";")[0].strip().lower()
    major = kind.split("/")[0]
    best = (0.0, -1)
    levels = {kind: 2, f"{major}/*": 1, "*/*": 0}
    for media_range, q in ranges:
        specificity = levels.get(media_range, -1)
        if specificity > best[1]:
            best = (q, specificity)
    return best


def negotiate(request: Request, kvp: KVP, offers: dict[str, tuple[str, ...]]) -> str:
    """Pick a representation: `f` first (400 if unknown), else Accept (406 if none fits), JSON by default."""
    f = kvp.get("f")
    if f is not None:
        chosen = METADATA_F.get(f.strip().lower())
        if chosen is None and any(f.strip().lower() == t.lower() for t in offers.get("json", ())):
            chosen = "json"
        if chosen is None or chosen not in offers:
            raise invalid(f"f={echo(f)}: expected one of {', '.join(offers)}")
        return chosen
    header = request.headers.get("accept", "").strip()
    if not header:
        return next(iter(offers))
    ranges = _accept_ranges(header)
    scored = []
    for rank, (name, media_types) in enumerate(offers.items()):
        q, specificity = max(_quality(ranges, t) for t in media_types)
        if q > 0:
            scored.append((q, specificity, -rank, name))
    if not scored:
        raise Problem(
            406,
            "NotAcceptable",
            f"no representation matches Accept: {', '.join(t for v in offers.values() for t in v)}",
        )
    return max(scored)[3]


METADATA_OFFERS: dict[str, tuple[str, ...]] = {"json": (JSON,), "html": (HTML,)}
API_OFFERS: dict[str, tuple[str, ...]] = {"json": (OPENAPI, JSON), "html": (HTML,)}


# --- registered grids -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def registered_definition(name: str) -> dict[str, Any]:
    """The OGC 2D-TMS 2.0 definition of a registered grid, as morecantile ships it."""
    text = (resources.files("morecantile") / "data" / f"{name}.json").read_text()
    return json.loads(text)


def _same(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance


def _matches(tms: TileMatrixSet, name: str) -> bool:
    """Same CRS (axis order aside) and, level by level, same cell size, origin, tile and matrix sizes."""
    definition = registered_definition(name)
    try:
        if not tms.pyproj_crs.equals(pyproj.CRS.from_user_input(definition["crs"]), ignore_axis_order=True):
            return False
    except pyproj.exceptions.CRSError:
        return False
    lat_first = [a.lower() for a in definition.get("orderedAxes", ["x", "y"])][0] in ("lat", "y_lat", "n")
    matrices = {m["id"]: m for m in definition["tileMatrices"]}
    for mine in tms.matrices:
        theirs = matrices.get(mine.id)
        if theirs is None:
            return False
        ox, oy = theirs["pointOfOrigin"][::-1] if lat_first else theirs["pointOfOrigin"]
        pixel = mine.cell_size * 1e-3  # a thousandth of a pixel: ROK4 files carry fewer digits
        if not (
            _same(mine.cell_size, theirs["cellSize"], mine.cell_size * 1e-9)
            and _same(mine.origin_x, ox, pixel)
            and _same(mine.origin_y, oy, pixel)
            and (mine.tile_width, mine.tile_height) == (theirs["tileWidth"], theirs["tileHeight"])
            and (mine.matrix_width, mine.matrix_height) == (theirs["matrixWidth"], theirs["matrixHeight"])
        ):
            return False
    return True


@functools.lru_cache(maxsize=64)
def registered_alias(tms: TileMatrixSet) -> str | None:
    """The registered grid this ROK4 grid is numerically identical to, if any."""
    return next((name for name in REGISTERED if _matches(tms, name)), None)


def native_grid_ids(published: PublishedLayer) -> tuple[str, ...]:
    """Ids of the pyramid's own grid: the ROK4 id, then the registered alias."""
    alias = registered_alias(published.tms)
    return (published.tms.id, alias) if alias and alias != published.tms.id else (published.tms.id,)


def grid_ids(published: PublishedLayer) -> tuple[str, ...]:
    """Ids a layer's tiles answer under: its own grid's, then its extra (reprojected) grids."""
    native = native_grid_ids(published)
    return native + tuple(g for g in extra_grids(published) if g not in native)


def extra_grid(published: PublishedLayer, grid_id: str) -> Any:
    """The extra grid a tileset id names, or None for the pyramid's own grid."""
    return None if grid_id in native_grid_ids(published) else extra_grids(published).get(grid_id)


def grid_crs(published: PublishedLayer, grid_id: str) -> str:
    extra = extra_grid(published, grid_id)
    if extra is not None:
        return crs_uri(extra.tms.crs)
    if grid_id in REGISTERED and grid_id != published.tms.id:
        return registered_definition(grid_id)["crs"]
    return crs_uri(published.tms.crs)


# --- request context ------------------------------------------------------------------------------


@dataclass
class Ctx:
    """One request: where the API is mounted, the snapshot it reads, what the caller may see."""

    request: Request
    prefix: str
    catalog: Catalog
    kvp: KVP
    key: str | None
    root: str = ""
    fmt: str = "json"
    carried: dict[str, str] = field(default_factory=dict)  # query kept on every link (the API key)

    @classmethod
    def of(cls, request: Request, prefix: str) -> Ctx:
        kvp = KVP.from_request(request)
        ctx = cls(request, prefix, get_runtime(request).catalog, kvp, key_hash(request))
        ctx.root = base_url(request) + prefix
        apikey = kvp.get("apikey")
        if apikey:
            ctx.carried["apikey"] = apikey
        return ctx

    def url(self, path: str, **query: str) -> str:
        params = {**{k: v for k, v in query.items() if v}, **self.carried}
        return self.root + path + ("?" + urlencode(params, safe="{}") if params else "")

    def visible(self) -> list[PublishedLayer]:
        return sorted(self.catalog.visible("ogcapi", self.key), key=lambda p: p.id)

    def layer(self, collection_id: str) -> PublishedLayer:
        published = self.catalog.get(collection_id, "ogcapi", self.key)
        if published is None:
            raise not_found(f"collection {echo(collection_id)} does not exist")
        return published


def link(
    href: str, rel: str, media_type: str | None = None, title: str | None = None, **extra: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {"href": href, "rel": rel}
    if media_type:
        out["type"] = media_type
    if title:
        out["title"] = title
    out.update(extra)
    return out


def self_links(ctx: Ctx, path: str, title: str) -> list[dict[str, Any]]:
    """`self` in the representation being served, `alternate` in the other."""
    current, other = (
        (("json", JSON), ("html", HTML)) if ctx.fmt == "json" else (("html", HTML), ("json", JSON))
    )
    return [
        link(ctx.url(path, f=current[0]), "self", current[1], title),
        link(ctx.url(path, f=other[0]), "alternate", other[1], f"{title} ({other[0].upper()})"),
    ]


def data_type(published: PublishedLayer) -> str:
    return "vector" if published.format.is_vector else "map"


# --- tileset scopes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """Whose tilesets: one collection, or the dataset (every visible collection of that data type)."""

    kind: str  # "map" or "vector"
    collection: PublishedLayer | None = None
    style: str | None = None

    def path(self) -> str:
        head = f"/collections/{quote(self.collection.id, safe='')}" if self.collection else ""
        styled = f"/styles/{quote(self.style, safe='')}" if self.style else ""
        return head + styled + ("/map/tiles" if self.kind == "map" else "/tiles")

    def layers(self, ctx: Ctx) -> list[PublishedLayer]:
        """Layers in the scope; 404 when the collection has no such tiles or the style is unknown."""
        if self.collection is not None:
            if data_type(self.collection) != self.kind:
                raise not_found(f"collection {echo(self.collection.id)} has no {self.kind} tiles")
            if self.style is not None and self.style not in collection_styles(ctx, self.collection):
                raise not_found(
                    f"style {echo(self.style)} is not a style of collection {echo(self.collection.id)}"
                )
            return [self.collection]
        layers = [p for p in ctx.visible() if data_type(p) == self.kind]
        if self.style is not None:
            layers = [p for p in layers if self.style in collection_styles(ctx, p)]
            if not layers:
                raise not_found(f"style {echo(self.style)} is not a style of any collection")
        return layers


def collection_styles(ctx: Ctx, published: PublishedLayer) -> list[str]:
    """The layer's styles its data can take: a style segment is advertised only where its tiles are
    served (hypso on an RGB picture would answer 400 for every tile of the tileset). A name without
    a definition (ROK4's `normal`) passes the tiles through, so it stays."""
    book = style_book(get_runtime(ctx.request))
    by_identifier = {s.identifier: s for s in book.values()}
    out = []
    for name in published.layer.styles:
        style = book.get(name) or by_identifier.get(name)
        if style is None or style_usable(style, published.channels, published.format.sample_format):
            out.append(name)
    return out


def _scope(ctx: Ctx, kind: str, collection_id: str | None = None, style_id: str | None = None) -> Scope:
    collection = ctx.layer(collection_id) if collection_id is not None else None
    scope = Scope(kind, collection, style_id)
    scope.layers(ctx)  # validates collection kind and style
    return scope


def _grid_levels(layers: list[PublishedLayer], grid: str) -> list[tuple[str, TileLimits]]:
    """Union of the limits per matrix in a tileset's grid, coarsest first: each layer's published
    ones where the grid is its own, those of its extra (reprojected) grid otherwise. A dataset
    tileset mixes both (`4326` is BDPARCELLAIRE's own grid and an extra grid of MONTAGNE)."""
    merged: dict[str, TileLimits] = {}
    cells: dict[str, float] = {}
    for published in layers:
        extra = extra_grid(published, grid)
        if extra is None:
            found = [(lv, published.limits[lv], published.matrix(lv).cell_size) for lv in published.level_ids]
        else:
            found = [(m.id, extra.limits[m.id], m.cell_size) for m in extra.matrices if m.id in extra.limits]
        for level, limits, cell in found:
            merged[level] = merged[level].union(limits) if level in merged else limits
            cells[level] = cell
    return [(level, merged[level]) for level in sorted(merged, key=lambda lv: -cells[lv])]


def _vector_layers(published: PublishedLayer) -> list[dict[str, Any]]:
    """Tileset `layers` of a vector pyramid: one per table, with the tile matrices holding it."""
    found: dict[str, dict[str, Any]] = {}
    for level, name, geometry, fields in vector_tables(published):
        entry = found.setdefault(name, {"id": name, "dataType": "vector", "minTileMatrix": level})
        entry["maxTileMatrix"] = level  # levels come top → bottom
        if geometry:
            entry["geometryType"] = geometry
        if fields:
            properties = entry.setdefault("propertiesSchema", {"type": "object", "properties": {}})[
                "properties"
            ]
            properties.update({field_name: {"description": kind} for field_name, kind in fields.items()})
    return list(found.values())


def tilesets_document(ctx: Ctx, scope: Scope) -> dict[str, Any]:
    layers = scope.layers(ctx)
    grids: dict[str, PublishedLayer] = {}
    for published in layers:
        for grid in grid_ids(published):
            grids.setdefault(grid, published)
    tilesets = []
    for grid, published in grids.items():
        item: dict[str, Any] = {
            "title": f"{published.layer.title if scope.collection else 'dataset'} ({grid})",
            "dataType": scope.kind,
            "crs": grid_crs(published, grid),
            "links": [
                link(ctx.url(f"{scope.path()}/{grid}", f="json"), "self", JSON, f"tileset in {grid}"),
                link(ctx.url(f"/tileMatrixSets/{grid}"), REL + "tiling-scheme", JSON, grid),
            ],
        }
        if grid in REGISTERED:
            item["tileMatrixSetURI"] = registered_definition(grid)["uri"]
        tilesets.append(item)
    return {"links": self_links(ctx, scope.path(), "tilesets"), "tilesets": tilesets}


def tileset_document(ctx: Ctx, scope: Scope, grid: str) -> dict[str, Any]:
    layers = [p for p in scope.layers(ctx) if grid in grid_ids(p)]
    if not layers:
        raise not_found(f"no tileset in tile matrix set {echo(grid)} here")
    first = layers[0]
    fmt = first.format
    mimes = {tile_type(ctx, p, scope.style)[0] for p in layers} if scope.collection else {STYLED_MIME}
    path = f"{scope.path()}/{grid}"
    template = ctx.url(f"{path}/{{tileMatrix}}/{{tileRow}}/{{tileCol}}")
    doc: dict[str, Any] = {
        "title": f"{first.layer.title if scope.collection else 'dataset'} ({grid})",
        "dataType": scope.kind,
        "crs": grid_crs(first, grid),
        "tileMatrixSetLimits": [
            {
                "tileMatrix": level,
                "minTileRow": lim.min_row,
                "maxTileRow": lim.max_row,
                "minTileCol": lim.min_col,
                "maxTileCol": lim.max_col,
            }
            for level, lim in _grid_levels(layers, grid)
        ],
        "links": [
            *self_links(ctx, path, "tileset"),
            link(ctx.url(f"/tileMatrixSets/{grid}"), REL + "tiling-scheme", JSON, grid),
            link(template, "item", mimes.pop() if len(mimes) == 1 else None, "tiles", templated=True),
        ],
    }
    if scope.collection is not None:
        doc["description"] = first.layer.abstract
        doc["links"].append(
            link(ctx.url(f"/collections/{quote(first.id, safe='')}"), REL + "geodata", JSON, first.id)
        )
        if fmt.is_vector:
            doc["layers"] = _vector_layers(first) or [{"id": first.id, "dataType": "vector"}]
    else:
        doc["description"] = (
            "the collections drawn together (PNG); ?collections=<collection id> for one collection's own tiles"
        )
        doc["links"].append(link(ctx.url(""), REL + "dataset", JSON, "dataset"))
        doc["layers"] = [
            {
                "id": p.id,
                "title": p.layer.title,
                "dataType": scope.kind,
                "links": [link(ctx.url(f"/collections/{quote(p.id, safe='')}"), REL + "geodata", JSON, p.id)],
            }
            for p in layers
        ]
    if grid in REGISTERED:
        doc["tileMatrixSetURI"] = registered_definition(grid)["uri"]
    return doc


# --- tiles ----------------------------------------------------------------------------------------


def _index(text: str, what: str) -> int:
    try:
        return parse_index(text)
    except BadIndex as exc:
        if exc.absurd:
            raise not_found(f"{what} {echo(text)} is outside the tile matrix set limits") from None
        raise invalid(f"{what} {echo(text)} is not an integer") from None


def _check_tile_format(ctx: Ctx, published: PublishedLayer, mime: str, f_name: str) -> None:
    """`f` must name the tiles' format (400 otherwise); an Accept that excludes it gets 406."""
    f = ctx.kvp.get("f")
    if f is not None:
        wanted = f.strip().lower()
        if TILE_F.get(wanted) != f_name and wanted != mime.lower():
            raise invalid(f"f={echo(f)}: the tiles of {echo(published.id)} are {f_name} ({mime})")
    header = ctx.request.headers.get("accept", "").strip()
    if header and _quality(_accept_ranges(header), mime)[0] == 0:
        raise Problem(406, "NotAcceptable", f"the tiles of {echo(published.id)} are {mime} only")


STYLED_MIME, STYLED_F = "image/png", "png"  # what a style that changes pixels renders to


def rendering_style(ctx: Ctx, published: PublishedLayer, name: str | None) -> Style | None:
    """The style tiles must be rendered with; None when they pass through as stored.

    No style segment, a style without a definition (a name only, as ROK4's `normal`) or an identity
    style pass through; a style that changes pixels is rendered (PNG), if the data can take it."""
    if name is None:
        return None
    book = style_book(get_runtime(ctx.request))
    style = book.get(name) or next((s for s in book.values() if s.identifier == name), None)
    if style is None or style.is_identity:
        return None
    if not style_usable(style, published.channels, published.format.sample_format):
        raise invalid(f"style {echo(name)} cannot be applied to the data of {echo(published.id)}")
    return style


def tile_type(ctx: Ctx, published: PublishedLayer, style: str | None) -> tuple[str, str]:
    """(media type, OGC `f` name) of the tiles of a layer in a style."""
    if rendering_style(ctx, published, style) is not None:
        return STYLED_MIME, STYLED_F
    return published.format.mime, published.format.ogc_f


async def styled_tile(
    ctx: Ctx, published: PublishedLayer, style: Style, level: str, col: int, row: int
) -> Response:
    """A tile in a style that changes pixels, rendered in the layer's own grid (render pipeline)."""
    if not published.in_limits(level, col, row):
        raise not_found(f"tile ({level}, {row}, {col}) is outside the limits of {echo(published.id)}")
    runtime = get_runtime(ctx.request)
    try:
        body, media_type = await render_tile(
            published, published.tms, level, col, row, style, STYLED_MIME, gate=gate_for(runtime)
        )
    except RenderError as exc:
        raise TileRenderError(exc.message, exc.status if exc.status in (400, 404, 502, 503) else 503) from None
    return tile_response(TileAnswer(body, media_type, None, False), published, runtime.settings)


async def reprojected_tile(
    ctx: Ctx, published: PublishedLayer, grid: Any, level: str, tile_row: str, tile_col: str, style_name: str | None
) -> Response:
    """A tile of one of the layer's extra grids, rendered (reprojected) from the pyramid."""
    limits = grid.limits.get(level)
    if limits is None:
        raise not_found(f"tile matrix {echo(level)} is not offered in {echo(grid.id)}")
    row, col = _index(tile_row, "tileRow"), _index(tile_col, "tileCol")
    if not limits.contains(col, row):
        raise not_found(f"tile ({level}, {row}, {col}) is outside the limits of {echo(published.id)} in {grid.id}")
    style = rendering_style(ctx, published, style_name)
    mime, f_name = tile_type(ctx, published, style_name)
    _check_tile_format(ctx, published, mime, f_name)
    runtime = get_runtime(ctx.request)
    answer = await rendered_tile(runtime, published, grid.tms, level, col, row, style, mime)
    return tile_response(answer, published, runtime.settings)


async def dataset_tile(ctx: Ctx, scope: Scope, grid: str, tile_matrix: str, tile_row: str, tile_col: str) -> Response:
    """A dataset map tile without `collections` (what the dataset tileset's template gives): every
    map collection of the scope offering the grid, drawn together (first at the bottom) to PNG."""
    layers = [p for p in scope.layers(ctx) if grid in grid_ids(p)]
    limits = dict(_grid_levels(layers, grid)).get(tile_matrix)
    if limits is None:
        raise not_found(f"tile matrix {echo(tile_matrix)} is not offered in {echo(grid)} here")
    row, col = _index(tile_row, "tileRow"), _index(tile_col, "tileCol")
    if not limits.contains(col, row):
        raise not_found(f"tile ({tile_matrix}, {row}, {col}) is outside the limits of the dataset in {echo(grid)}")
    _check_tile_format(ctx, layers[0], STYLED_MIME, STYLED_F)
    extra = extra_grid(layers[0], grid)
    tms = extra.tms if extra is not None else layers[0].tms
    matrix = tms.get(tile_matrix)
    assert matrix is not None
    target = Grid(tms.crs, matrix.tile_bbox(col, row), matrix.tile_width, matrix.tile_height)
    drawn = [MapLayer(p, rendering_style(ctx, p, scope.style)) for p in layers]
    runtime = get_runtime(ctx.request)
    try:
        body, media_type = await render_map(
            drawn, target, picture=True, gate=gate_for(runtime),
            finish=lambda raster: encode_image(raster.data, STYLED_MIME, transparent=True),
        )
    except RenderError as exc:
        raise TileRenderError(exc.message, exc.status if exc.status in (400, 404, 502, 503) else 503) from None
    return Response(body, media_type=media_type, headers=map_headers(layers, runtime.settings))


async def tile(ctx: Ctx, scope: Scope, grid: str, tile_matrix: str, tile_row: str, tile_col: str) -> Response:
    if scope.collection is None:
        wanted = [c for c in (ctx.kvp.get("collections") or "").split(",") if c.strip()]
        if not wanted and scope.kind == "map":
            return await dataset_tile(ctx, scope, grid, tile_matrix, tile_row, tile_col)
        if len(wanted) != 1:
            raise invalid("collections: exactly one collection id is required on this route")
        scope = Scope(scope.kind, ctx.layer(wanted[0].strip()), scope.style)
    published = scope.layers(ctx)[0]
    if grid not in grid_ids(published):
        raise not_found(f"collection {echo(published.id)} has no tiles in tile matrix set {echo(grid)}")
    extra = extra_grid(published, grid)
    if extra is not None:
        return await reprojected_tile(ctx, published, extra, tile_matrix, tile_row, tile_col, scope.style)
    if tile_matrix not in published.limits:
        raise not_found(f"tile matrix {echo(tile_matrix)} is not published for {echo(published.id)}")
    row, col = _index(tile_row, "tileRow"), _index(tile_col, "tileCol")
    style = rendering_style(ctx, published, scope.style)
    _check_tile_format(ctx, published, *tile_type(ctx, published, scope.style))
    if style is not None:
        return await styled_tile(ctx, published, style, tile_matrix, col, row)
    try:
        answer = await native_tile(published, tile_matrix, col, row)
    except TileNotFound:  # the layer asks for ROK4's 404 on empty tiles
        raise not_found(f"no data at tile ({tile_matrix}, {row}, {col}) of {echo(published.id)}") from None
    if answer is None:
        raise not_found(f"tile ({tile_matrix}, {row}, {col}) is outside the limits of {echo(published.id)}")
    return tile_response(answer, published, get_runtime(ctx.request).settings, ctx.request.headers.get("accept-encoding"))


# --- metadata documents ---------------------------------------------------------------------------


def landing_document(ctx: Ctx) -> dict[str, Any]:
    settings = get_runtime(ctx.request).settings
    return {
        "title": settings.service_title,
        "description": settings.service_abstract,
        "links": [
            *self_links(ctx, "", "landing page"),
            link(ctx.url("/api"), "service-desc", OPENAPI, "API definition"),
            link(ctx.url("/api", f="html"), "service-doc", HTML, "API documentation"),
            link(ctx.url("/conformance"), "conformance", JSON, "conformance classes"),
            link(ctx.url("/conformance"), REL + "conformance", JSON, "conformance classes"),
            link(ctx.url("/collections"), "data", JSON, "collections"),
            link(ctx.url("/collections"), REL + "data", JSON, "collections"),
            link(ctx.url("/map/tiles"), REL + "tilesets-map", JSON, "map tilesets"),
            link(ctx.url("/tiles"), REL + "tilesets-vector", JSON, "vector tilesets"),
            link(ctx.url("/tileMatrixSets"), REL + "tiling-schemes", JSON, "tile matrix sets"),
        ],
    }


def served_encodings(ctx: Ctx) -> set[str]:
    """OGC `f` names of the tiles the caller's tilesets serve: each layer's stored format, and PNG
    wherever there is a map collection (dataset map tiles without `collections` are drawn to PNG, as
    are a collection's tiles in a style that changes pixels). OGC's suite tests every class declared."""
    out: set[str] = set()
    for published in ctx.visible():
        out.add(published.format.ogc_f)
        if not published.format.is_vector:
            out.add(STYLED_F)
    return out


def conformance_document(ctx: Ctx) -> dict[str, Any]:
    encodings = served_encodings(ctx)
    extra = [c for provider in PROVIDERS for c in provider.conformance(ctx)]
    classes = [*CONFORMANCE, *(uri for f, uri in ENCODING_CLASSES.items() if f in encodings), *extra]
    return {"conformsTo": list(dict.fromkeys(classes)), "links": self_links(ctx, "/conformance", "conformance")}


def _grids(ctx: Ctx) -> dict[str, tuple[TileMatrixSet, str | None]]:
    """Grid id → (grid, registered alias target or None) for every grid a visible layer uses."""
    out: dict[str, tuple[TileMatrixSet, str | None]] = {}
    for published in ctx.visible():
        for grid in grid_ids(published):
            extra = extra_grid(published, grid)
            if extra is not None:
                out.setdefault(grid, (extra.tms, None))
            else:
                out.setdefault(grid, (published.tms, grid if grid != published.tms.id else None))
    return out


def tile_matrix_set_document(ctx: Ctx, grid: str) -> dict[str, Any]:
    found = _grids(ctx).get(grid)
    if found is None:
        raise not_found(f"tile matrix set {echo(grid)} does not exist")
    tms, registered = found
    doc = dict(registered_definition(registered)) if registered else tms.to_ogc_dict()
    doc["links"] = self_links(ctx, f"/tileMatrixSets/{grid}", grid)
    return doc


def tile_matrix_sets_document(ctx: Ctx) -> dict[str, Any]:
    items = []
    for grid, (tms, registered) in _grids(ctx).items():
        item: dict[str, Any] = {
            "id": grid,
            "title": registered_definition(registered).get("title", grid)
            if registered
            else tms.title or grid,
            "crs": registered_definition(registered)["crs"] if registered else crs_uri(tms.crs),
            "links": [
                link(ctx.url(f"/tileMatrixSets/{grid}", f="json"), "self", JSON, grid),
                link(ctx.url(f"/tileMatrixSets/{grid}"), REL + "tiling-scheme", JSON, grid),
            ],
        }
        if registered:
            item["uri"] = registered_definition(registered)["uri"]
        items.append(item)
    return {"links": self_links(ctx, "/tileMatrixSets", "tile matrix sets"), "tileMatrixSets": items}


def collection_document(ctx: Ctx, published: PublishedLayer, full_links: bool = True) -> dict[str, Any]:
    layer = published.layer
    kind = data_type(published)
    path = f"/collections/{quote(published.id, safe='')}"
    crs = [grid_crs(published, grid) for grid in grid_ids(published)]
    cells = [published.matrix(level).cell_size for level in published.level_ids]
    links = (
        self_links(ctx, path, layer.title) if full_links else [link(ctx.url(path), "self", JSON, layer.title)]
    )
    tiles_scope = Scope(kind, published)
    styles = collection_styles(ctx, published) if kind == "map" else []
    links.append(link(ctx.url(tiles_scope.path()), REL + f"tilesets-{kind}", JSON, f"{kind} tilesets"))
    if kind == "map":
        for style in styles:
            styled = Scope(kind, published, style)
            links.append(
                link(ctx.url(styled.path()), REL + "tilesets-map", JSON, f"map tilesets, style {style}")
            )
    for meta in layer.metadata:
        links.append(
            link(
                str(meta["url"]),
                "describedby",
                str(meta.get("format", "")) or None,
                str(meta.get("type", "")),
            )
        )
    doc: dict[str, Any] = {
        "id": published.id,
        "title": layer.title,
        "description": layer.abstract,
        "keywords": list(layer.keywords),
        "extent": {"spatial": {"bbox": [list(published.wgs84_bbox)], "crs": CRS84}},
        "dataType": kind,
        "crs": list(dict.fromkeys(crs)),
        "storageCrs": crs_uri(published.tms.crs),
        "minCellSize": min(cells),
        "maxCellSize": max(cells),
        "links": links,
    }
    if styles:
        doc["styles"] = [{"id": s, "title": s} for s in styles]
        doc["defaultStyle"] = styles[0]
    if layer.attribution and layer.attribution.get("title"):
        doc["attribution"] = str(layer.attribution["title"])
    return doc


def _bbox_filter(ctx: Ctx) -> tuple[float, float, float, float] | None:
    raw = ctx.kvp.get("bbox")
    if raw is None:
        return None
    values = bbox_values(raw)
    if values is None:
        raise invalid(f"bbox={echo(raw)}: expected west,south,east,north in CRS84")
    return values


def collections_document(ctx: Ctx) -> dict[str, Any]:
    bbox = _bbox_filter(ctx)
    layers = ctx.visible()
    if bbox is not None:
        west, south, east, north = bbox

        def overlaps(p: PublishedLayer) -> bool:
            w, s, e, n = p.wgs84_bbox
            return s <= north and n >= south and (w <= east and e >= west if west <= east else True)

        layers = [p for p in layers if overlaps(p)]
    collections = [collection_document(ctx, p, full_links=False) for p in layers]
    collections += [doc for provider in PROVIDERS for doc in provider.collections(ctx, bbox)]
    return {
        "links": self_links(ctx, "/collections", "collections"),
        "numberMatched": len(collections),
        "numberReturned": len(collections),
        "collections": collections,
    }


# --- the route table, which also writes the OpenAPI document --------------------------------------

Handler = Callable[..., Awaitable[Response] | dict[str, Any]]


@dataclass(frozen=True)
class Operation:
    path: str
    operation_id: str
    summary: str
    handler: Handler
    tile: bool = False  # answers a tile (native format) rather than metadata
    query: tuple[str, ...] = ()  # query parameters besides `f`


def _collection(kind: str, styled: bool = False) -> Callable[..., Scope]:
    def make(ctx: Ctx, collectionId: str, styleId: str | None = None) -> Scope:
        return _scope(ctx, kind, collectionId, styleId if styled else None)

    return make


def _dataset(kind: str, styled: bool = False) -> Callable[..., Scope]:
    def make(ctx: Ctx, styleId: str | None = None) -> Scope:
        return _scope(ctx, kind, None, styleId if styled else None)

    return make


TILE = "/{tileMatrixSetId}/{tileMatrix}/{tileRow}/{tileCol}"
SCOPES: tuple[tuple[str, str, Callable[..., Scope], tuple[str, ...]], ...] = (
    # (path of the tilesets, operation id stem, scope factory, extra tile query parameters)
    ("/collections/{collectionId}/map/tiles", "CollectionMap", _collection("map"), ()),
    (
        "/collections/{collectionId}/styles/{styleId}/map/tiles",
        "CollectionStyleMap",
        _collection("map", True),
        (),
    ),
    ("/collections/{collectionId}/tiles", "CollectionVector", _collection("vector"), ()),
    ("/map/tiles", "DatasetMap", _dataset("map"), ("collections",)),
    ("/styles/{styleId}/map/tiles", "DatasetStyleMap", _dataset("map", True), ("collections",)),
    ("/tiles", "DatasetVector", _dataset("vector"), ("collections",)),
)


def _tilesets_op(make: Callable[..., Scope]) -> Handler:
    def handler(ctx: Ctx, **params: str) -> dict[str, Any]:
        return tilesets_document(ctx, make(ctx, **params))

    return handler


def _tileset_op(make: Callable[..., Scope]) -> Handler:
    def handler(ctx: Ctx, tileMatrixSetId: str, **params: str) -> dict[str, Any]:
        return tileset_document(ctx, make(ctx, **params), tileMatrixSetId)

    return handler


def _tile_op(make: Callable[..., Scope]) -> Handler:
    async def handler(
        ctx: Ctx, tileMatrixSetId: str, tileMatrix: str, tileRow: str, tileCol: str, **scope: str
    ) -> Response:
        return await tile(ctx, make(ctx, **scope), tileMatrixSetId, tileMatrix, tileRow, tileCol)

    return handler


def _operations() -> tuple[Operation, ...]:
    ops = [
        Operation("", "getLandingPage", "Landing page", landing_document),
        Operation("/conformance", "getConformance", "Conformance classes implemented", conformance_document),
        Operation("/api", "getAPI", "This API's OpenAPI 3.0 definition", lambda ctx: openapi_document(ctx)),
        Operation(
            "/tileMatrixSets", "getTileMatrixSetsList", "Tile matrix sets in use", tile_matrix_sets_document
        ),
        Operation(
            "/tileMatrixSets/{tileMatrixSetId}",
            "getTileMatrixSet",
            "A tile matrix set definition",
            lambda ctx, tileMatrixSetId: tile_matrix_set_document(ctx, tileMatrixSetId),
        ),
        Operation(
            "/collections",
            "getCollectionsList",
            "Collections (published layers)",
            collections_document,
            query=("bbox",),
        ),
        Operation(
            "/collections/{collectionId}",
            "getCollection",
            "One collection",
            lambda ctx, collectionId: next(
                (d for p in PROVIDERS if (d := p.collection(ctx, collectionId)) is not None), None
            ) or collection_document(ctx, ctx.layer(collectionId)),
        ),
    ]
    for path, stem, make, tile_query in SCOPES:
        ops += [
            Operation(path, f"get{stem}TileSetsList", f"{stem} tilesets", _tilesets_op(make)),
            Operation(path + "/{tileMatrixSetId}", f"get{stem}TileSet", f"{stem} tileset", _tileset_op(make)),
            Operation(
                path + TILE, f"get{stem}Tile", f"{stem} tile", _tile_op(make), tile=True, query=tile_query
            ),
        ]
    return tuple(ops)


_PARAM = re.compile(r"{(\w+)}")
PARAMETER_DESCRIPTIONS = {
    "collectionId": "collection (layer) id",
    "styleId": "style id, one of the collection's",
    "tileMatrixSetId": "tile matrix set id: the ROK4 grid id or its registered alias",
    "tileMatrix": "tile matrix (level) id",
    "tileRow": "row index, from the top",
    "tileCol": "column index, from the left",
    "collections": "the one collection to serve",
    "bbox": "west,south,east,north in CRS84: only collections intersecting it",
}


def _openapi_operation(op: Operation) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": PARAMETER_DESCRIPTIONS.get(name, name),
            "schema": {"type": "string"},
        }
        for name in _PARAM.findall(op.path)
    ]
    f_values = sorted(set(TILE_F)) if op.tile else ["json", "html"]
    parameters.append(
        {"name": "f", "in": "query", "required": False, "schema": {"type": "string", "enum": f_values}}
    )
    for name in op.query:
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": op.tile and name == "collections",
                "description": PARAMETER_DESCRIPTIONS.get(name, name),
                "schema": {"type": "string"},
            }
        )
    problem = {"content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/problem"}}}}
    if op.tile:
        ok = {
            "description": "a tile in the pyramid's native format",
            "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(_TILE_TYPES)},
        }
    else:
        ok = {
            "description": op.summary,
            "content": {JSON: {"schema": {"type": "object"}}, HTML: {"schema": {"type": "string"}}},
        }
    responses: dict[str, Any] = {"200": ok}
    for status, text in (("400", "invalid parameter"), ("404", "not found"), ("406", "not acceptable")):
        responses[status] = {"description": text, **problem}
    if op.tile:
        for status, text in (("502", "storage returned unreadable data"), ("503", "storage unavailable")):
            responses[status] = {"description": text, **problem}
    return {
        "operationId": op.operation_id,
        "summary": op.summary,
        "parameters": parameters,
        "responses": responses,
    }


_TILE_TYPES = {"image/png", "image/jpeg", "image/tiff", "image/x-bil;bits=32", "application/x-protobuf"}


def openapi_document(ctx: Ctx) -> dict[str, Any]:
    settings = get_runtime(ctx.request).settings
    return {
        "openapi": "3.0.3",
        "info": {
            "title": settings.service_title,
            "description": settings.service_abstract,
            "version": "1.0.0",
        },
        "servers": [{"url": ctx.root}],
        "paths": {op.path or "/": {"get": _openapi_operation(op)} for op in OPERATIONS},
        "components": {
            "schemas": {
                "problem": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                }
            }
        },
    }


# --- HTML -----------------------------------------------------------------------------------------

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:sans-serif;margin:1em 2em;max-width:70em}}dt{{font-weight:bold}}
dd{{margin:0 0 .4em 1.5em}}ul{{margin:.2em 0}}code{{word-break:break-all}}</style></head>
<body><h1>{title}</h1>{body}</body></html>
"""


def _html_value(value: Any) -> str:
    """Any JSON value as nested HTML lists; link objects become anchors (templates stay text)."""
    if isinstance(value, dict):
        if "href" in value and "rel" in value:
            label = html.escape(str(value.get("title") or value["rel"]))
            href = html.escape(str(value["href"]))
            rel = html.escape(str(value["rel"]))
            linkable = str(value["href"]).lower().startswith(("http://", "https://")) and not value.get("templated")
            target = f'<a href="{href}">{href}</a>' if linkable else f"<code>{href}</code>"
            return f"{label} <small>({rel})</small>: {target}"
        items = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{_html_value(v)}</dd>" for k, v in value.items())
        return f"<dl>{items}</dl>"
    if isinstance(value, list):
        if value and all(not isinstance(v, dict | list) for v in value):
            return html.escape(", ".join(str(v) for v in value))
        return "<ul>" + "".join(f"<li>{_html_value(v)}</li>" for v in value) + "</ul>"
    return html.escape(str(value))


def html_page(doc: dict[str, Any], fallback_title: str) -> str:
    title = str(doc.get("title") or doc.get("id") or fallback_title)
    return PAGE.format(title=html.escape(title), body=_html_value(doc))


# --- endpoints ------------------------------------------------------------------------------------


def _endpoint(op: Operation, prefix: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            ctx = Ctx.of(request, prefix)
            if op.tile:
                return await op.handler(ctx, **request.path_params)  # type: ignore[misc]
            offers = API_OFFERS if op.operation_id == "getAPI" else METADATA_OFFERS
            ctx.fmt = negotiate(request, ctx.kvp, offers)
            doc = op.handler(ctx, **request.path_params)
            assert isinstance(doc, dict)
            headers = document_headers(request, vary=("Accept",))  # what is listed depends on the key too
            if ctx.fmt == "html":
                return Response(html_page(doc, op.summary), media_type=HTML, headers=headers)
            media_type = OPENAPI if op.operation_id == "getAPI" else JSON
            return Response(orjson.dumps(doc), media_type=media_type, headers=headers)
        except ServiceError as error:
            return error_response(request, error, render_problem)

    endpoint.__name__ = op.operation_id
    return endpoint


OPERATIONS = _operations()


async def _unknown(request: Request) -> Response:
    """Anything else under the prefix: a problem too (a trailing slash is dropped, as ROK4 does)."""
    path = request.url.path
    if path.endswith("/") and path.rstrip("/"):
        query = request.url.query
        return RedirectResponse(path.rstrip("/") + (f"?{query}" if query else ""), status_code=307)
    return error_response(request, not_found("no such resource in this API"), render_problem)


def routes() -> list[BaseRoute]:
    register("ogcapi", render_problem)
    out: list[BaseRoute] = []
    for prefix in PREFIXES:
        for op in OPERATIONS:
            out.append(Route(prefix + op.path, _endpoint(op, prefix), methods=["GET"]))
            if op.path == "":
                out.append(Route(prefix + "/", _endpoint(op, prefix), methods=["GET"]))
        out.append(any_path_route(prefix + "/{rest:path}", _unknown))
    return out
