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

import html
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from tileserver.runtime import get_runtime
from tileserver.services.ogcapi_common import (
    API_OFFERS,
    HTML,
    JSON,
    METADATA_OFFERS,
    OPENAPI,
    PREFIXES,
    PROBLEM,
    PROVIDERS,
    TILE_F,
    Ctx,
    negotiate,
    not_found,
    render_problem,
)
from tileserver.services.ogcapi_documents import (
    collection_document,
    collections_document,
    conformance_document,
    landing_document,
    tile_matrix_set_document,
    tile_matrix_sets_document,
)
from tileserver.services.ogcapi_tiles import tile
from tileserver.services.ogcapi_tilesets import Scope, make_scope, tileset_document, tilesets_document
from tileserver.services.policy import ServiceError, document_headers, error_response, register
from tileserver.services.routing import any_path_route

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
        return make_scope(ctx, kind, collectionId, styleId if styled else None)

    return make


def _dataset(kind: str, styled: bool = False) -> Callable[..., Scope]:
    def make(ctx: Ctx, styleId: str | None = None) -> Scope:
        return make_scope(ctx, kind, None, styleId if styled else None)

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
