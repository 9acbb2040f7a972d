"""WMTS constants and GetTile: the one validation of a tile request that KVP, REST and the fast path share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from starlette.requests import Request
from starlette.responses import Response

from tileserver.catalog import Catalog, PublishedLayer
from tileserver.rok4.tms import TileMatrix
from tileserver.runtime import get_runtime
from tileserver.services.grids import GridSet, converted_formats, grid_sets
from tileserver.services.numbers import BadIndex, parse_index
from tileserver.services.ows import OWSException, echo
from tileserver.services.stylebook import DEFAULT_STYLE, style_book, tile_styles
from tileserver.services.tiles import (
    TileAnswer,
    TileNotFound,
    empty_tile,
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


def same_mime(a: str, b: str) -> bool:
    """MIME types compare without case or blanks around parameters (`image/x-bil; bits=32`)."""
    return a.replace(" ", "").lower() == b.replace(" ", "").lower()


# --- formats and styles per layer ---------------------------------------------------------------


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


def integer_param(value: str, locator: str) -> int:
    try:
        return parse_index(value.strip())
    except BadIndex:
        raise OWSException(
            "InvalidParameterValue", locator, f"{locator} must be an integer, not {echo(value)}"
        ) from None


def require_params(params: Mapping[str, str | None], names: tuple[str, ...]) -> None:
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
    require_params(params, TILE_PARAMETERS)
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
    mime = next((m for m in offered if same_mime(fmt, m)), None)
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
    row = integer_param(params["TileRow"] or "", "TileRow")
    col = integer_param(params["TileCol"] or "", "TileCol")
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
    return await stored_tile(tile.published, tile.level, tile.col, tile.row, tile.published_level)


async def stored_tile(published: PublishedLayer, level: str, col: int, row: int, published_level: bool) -> TileAnswer:
    """A tile in its pyramid's own grid and format: the stored bytes, else the level's nodata tile,
    else ROK4's 404. The route and the fast path's asynchronous answers (fastpath.py) both read
    through here, so a storage failure raises the same ServiceError whichever path met it."""
    try:
        answer = None
        if published_level:
            answer = await native_tile(published, level, col, row)
        return answer or empty_tile(published, level)
    except TileNotFound:
        raise OWSException("Not Found", None, "No data found", 404) from None


async def get_tile(request: Request, params: Mapping[str, str | None], key: str | None) -> Response:
    runtime = get_runtime(request)
    tile = resolve_tile(runtime.catalog, params, key, book=style_book(runtime))
    answer = await _tile_answer(request, tile)
    return tile_response(answer, tile.published, runtime.settings, request.headers.get("accept-encoding"))
