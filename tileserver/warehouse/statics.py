"""Static files: ROK4 styles (`ROK4-STYLE`), uploaded as multipart `file` with `name`, `type` and
`description` in the query, validated, and stored as the shared store's styles (usable by
WMS-RASTER configurations through `type_infos.styles`)."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from typing import Any

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.render.styles import StyleError, parse_style

from .annotations import add_event, annotations_view
from .entities import Entity
from .errors import bad_request, conflict, not_found
from .multipart import receive
from .web import Ctx, json_response, list_response, no_content, route

KIND = "static"
PREFIX = "/api/datastores/{datastore}/statics"
TYPES = ("ROK4-STYLE",)
MAX_STATIC = 1 << 20


def static_view(entity: Entity) -> dict[str, Any]:
    body = entity.body
    return {"_id": entity.id, "name": body["name"], "type": body["type"], "description": body.get("description", ""),
            "creation": entity.created_at, "type_infos": {"identifier": body["style"].get("identifier", entity.id)},
            **annotations_view(body)}


def get_static(ctx: Ctx, ident: str) -> Entity:
    entity = ctx.wh.entities.get(KIND, ident.lower())
    if entity is None or entity.datastore_id != ctx.datastore.id:
        raise not_found("static", ident)
    return entity


class _Limited(io.BytesIO):
    def write(self, data: Any) -> int:
        if self.tell() + len(data) > MAX_STATIC:
            raise bad_request(f"file: a style must not exceed {MAX_STATIC} bytes")
        return super().write(data)


@route
async def create_static(ctx: Ctx) -> Response:
    query = ctx.request.query_params
    problems = []
    name, kind = query.get("name", ""), query.get("type", "")
    if not name.strip():
        problems.append("name: required (query parameter)")
    if kind not in TYPES:
        problems.append(f"type: must be one of {', '.join(TYPES)} (got {kind!r})")
    buffer = _Limited()
    await receive(ctx.request.stream(), ctx.request.headers.get("content-type", ""), "file", lambda _: buffer)
    static_id = str(uuid.uuid4())
    style: Any = None
    try:
        style = json.loads(buffer.getvalue())
        parse_style(style, static_id, name or "style")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"file: not JSON: {exc}")
    except StyleError as exc:
        problems.append(f"file: not a ROK4 style: {exc}")
    if problems:
        raise bad_request(*problems)
    await asyncio.to_thread(ctx.wh.store.put_style, static_id, style)
    body: dict[str, Any] = {"name": name, "type": kind, "description": query.get("description", ""),
                            "style": style, "tags": {}}
    add_event(body, "Création", ctx.user)
    entity = await asyncio.to_thread(ctx.wh.entities.create, KIND, ctx.datastore.id, body, static_id)
    await ctx.wh.runtime.refresh()
    return json_response(static_view(entity), status=201)


@route
async def list_statics(ctx: Ctx) -> Response:
    return list_response(ctx.request, [static_view(e) for e in ctx.wh.entities.list(KIND, ctx.datastore.id)])


@route
async def get_static_route(ctx: Ctx) -> Response:
    return json_response(static_view(get_static(ctx, ctx.param("static"))))


@route
async def static_file(ctx: Ctx) -> Response:
    return json_response(get_static(ctx, ctx.param("static")).body["style"])


@route
async def delete_static(ctx: Ctx) -> Response:
    from .configurations import KIND as CONFIGURATION

    entity = get_static(ctx, ctx.param("static"))
    users = [c.id for c in ctx.wh.entities.list(CONFIGURATION)
             if entity.id in [s.lower() for s in c.body["type_infos"].get("styles", [])]]
    if users:
        raise conflict(f"static {entity.id} is a style of configurations {', '.join(users)}")
    await asyncio.to_thread(ctx.wh.store.remove_style, entity.id)
    await asyncio.to_thread(ctx.wh.entities.delete, entity.id)
    await ctx.wh.runtime.refresh()
    return no_content()


def routes() -> list[BaseRoute]:
    return [
        Route(PREFIX, list_statics, methods=["GET"]),
        Route(PREFIX, create_static, methods=["POST"]),
        Route(PREFIX + "/{static}", get_static_route, methods=["GET"]),
        Route(PREFIX + "/{static}", delete_static, methods=["DELETE"]),
        Route(PREFIX + "/{static}/file", static_file, methods=["GET"]),
    ]
