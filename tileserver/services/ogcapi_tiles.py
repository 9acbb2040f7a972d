"""OGC API Tiles tiles: a tile as stored, reprojected to an extra grid, drawn in a style, or a dataset map of every collection."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from tileserver.catalog import PublishedLayer
from tileserver.render.encode import encode_image
from tileserver.render.errors import RenderError
from tileserver.render.gate import gate_for
from tileserver.render.georef import Grid
from tileserver.render.model import MapLayer
from tileserver.render.pipeline import render_map, render_tile
from tileserver.render.styles import Style
from tileserver.runtime import get_runtime
from tileserver.services.numbers import BadIndex, parse_index
from tileserver.services.ogcapi_common import TILE_F, Ctx, Problem, accept_ranges, invalid, not_found, quality
from tileserver.services.ogcapi_grids import extra_grid, grid_ids
from tileserver.services.ogcapi_tilesets import (
    STYLED_F,
    STYLED_MIME,
    Scope,
    grid_levels,
    rendering_style,
    tile_type,
)
from tileserver.services.ows import echo
from tileserver.services.policy import map_headers, render_failure
from tileserver.services.tiles import (
    TileAnswer,
    TileNotFound,
    native_tile,
    rendered_tile,
    tile_response,
)

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
    if header and quality(accept_ranges(header), mime)[0] == 0:
        raise Problem(406, "NotAcceptable", f"the tiles of {echo(published.id)} are {mime} only")


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
        raise render_failure(exc, f"layer {published.id} style {style.identifier} tile ({level}, {col}, {row})") from None
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
    limits = dict(grid_levels(layers, grid)).get(tile_matrix)
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
        raise render_failure(exc, f"dataset tile {grid} ({tile_matrix}, {col}, {row})") from None
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
