"""Static files, uploaded as multipart `file` with `name`, `type` and `description` in the query:

* `ROK4-STYLE`: a ROK4 style (JSON), stored as the shared store's styles (usable by WMS-RASTER
  configurations through `type_infos.styles`);
* `GEOSERVER-STYLE`: an SLD 1.0.0 document (also SE/SLD 1.1.0, which QGIS writes) styling a table
  of a WMS-VECTOR configuration; `type_infos.used_attributes` lists the attributes it reads;
* `GEOSERVER-FTL`: a FreeMarker GetFeatureInfo template of a WMS-VECTOR relation.

SLD documents are validated by parsing them into the renderer's model (`render/sld.py`): well-formed
XML, the root, version, NamedLayer, UserStyle, rules, symbolizers, colours and filters; no SLD XSD
ships offline here, so this is structural validation, not XSD validation. Whether a style fits its
table (NamedLayer/Name, attributes) is checked when a configuration uses it, as on the platform.

`PUT statics/{id}` replaces the file (same type, validated again and against every configuration
using it; published layers are redrawn at once), `PATCH` renames or re-describes it, `DELETE` is
refused while a configuration uses it.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid
from typing import Any

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.render import sld
from tileserver.render.styles import StyleError, parse_style

from .annotations import add_event, annotations_view
from .entities import Entity
from .errors import bad_request, conflict, not_found
from .multipart import receive
from .web import Ctx, json_body, json_response, list_response, no_content, route

KIND = "static"
PREFIX = "/api/datastores/{datastore}/statics"
ROK4_STYLE, GEOSERVER_STYLE, GEOSERVER_FTL = "ROK4-STYLE", "GEOSERVER-STYLE", "GEOSERVER-FTL"
TYPES = (ROK4_STYLE, GEOSERVER_STYLE, GEOSERVER_FTL)
MAX_STATIC = 1 << 20
_FTL_ATTRIBUTE = re.compile(r"\bfeature\.([A-Za-z_][A-Za-z0-9_]*)\.(?:value|rawValue)\b")
_FTL_RESERVED = {"attributes", "fid", "type"}
_FTL_BLOCK = re.compile(r"<(/?)#(list|if|macro|function|switch|attempt|compress|escape|noescape|assign)\b[^>]*?(/?)>")


def static_view(entity: Entity) -> dict[str, Any]:
    body = entity.body
    if body["type"] == ROK4_STYLE:
        infos: dict[str, Any] = {"identifier": body["style"].get("identifier", entity.id)}
    else:
        infos = {"used_attributes": list(body.get("used_attributes", []))}
    return {"_id": entity.id, "name": body["name"], "type": body["type"], "description": body.get("description", ""),
            "creation": entity.created_at, "type_infos": infos, **annotations_view(body)}


def get_static(ctx: Ctx, ident: str) -> Entity:
    entity = ctx.wh.entities.get(KIND, ident.lower())
    if entity is None or entity.datastore_id != ctx.datastore.id:
        raise not_found("static", ident)
    return entity


class _Limited(io.BytesIO):
    def write(self, data: Any) -> int:
        if self.tell() + len(data) > MAX_STATIC:
            raise bad_request(f"file: a static file must not exceed {MAX_STATIC} bytes")
        return super().write(data)


# --- validation ----------------------------------------------------------------------------------


def ftl_attributes(template: str) -> list[str]:
    """The attributes a GetFeatureInfo template reads (`feature.NAME.value`), sorted."""
    return sorted({m.group(1) for m in _FTL_ATTRIBUTE.finditer(template)} - _FTL_RESERVED)


def _ftl_problems(template: str) -> list[str]:
    """Directives opened and closed in order (what FreeMarker refuses first)."""
    stack: list[str] = []
    for match in _FTL_BLOCK.finditer(template):
        closing, name, empty = match.group(1), match.group(2), match.group(3)
        if name in ("assign",) or empty:
            continue
        if not closing:
            stack.append(name)
        elif not stack or stack[-1] != name:
            return [f"file: </#{name}> at offset {match.start()} closes no open <#{name}>"]
        else:
            stack.pop()
    if stack:
        return [f"file: <#{stack[-1]}> is never closed"]
    if template.count("${") > template.count("}"):
        return ["file: an interpolation ${…} is not closed"]
    return []


def _ftl_engine_problems(template: str) -> list[str]:
    """What the FreeMarker-subset engine (`render/ftl.py`) says of the template's constructs
    (parsed, not rendered: which attributes exist is the configuration's check, against its table)."""
    import importlib

    try:
        engine = importlib.import_module("tileserver.render.ftl")
    except ImportError:
        return []
    try:
        engine.ftl_attributes(template)
    except Exception as exc:  # the engine's own error, whatever its class: the template's fault
        return [f"file: not a template the GetFeatureInfo engine reads: {exc}"]
    return []


def parse_content(kind: str, data: bytes, name: str, static_id: str) -> tuple[dict[str, Any], list[str]]:
    """(fields to store, problems) of an uploaded file of type `kind`."""
    if kind == ROK4_STYLE:
        try:
            style = json.loads(data)
            parse_style(style, static_id, name or "style")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return {}, [f"file: not JSON: {exc}"]
        except StyleError as exc:
            return {}, [f"file: not a ROK4 style: {exc}"]
        return {"style": style}, []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {}, [f"file: not UTF-8 text: {exc}"]
    if kind == GEOSERVER_STYLE:
        try:
            parsed = sld.parse(data)
        except sld.StyleError as exc:
            return {}, [f"file: not a valid SLD style: {exc}"]
        return {"content": text, "used_attributes": sld.used_attributes(parsed), "layer_name": parsed.layer_name}, []
    if not text.strip():
        return {}, ["file: the template is empty"]
    problems = _ftl_problems(text) or _ftl_engine_problems(text)
    return ({}, problems) if problems else ({"content": text, "used_attributes": ftl_attributes(text)}, [])


async def _read_file(ctx: Ctx) -> bytes:
    buffer = _Limited()
    await receive(ctx.request.stream(), ctx.request.headers.get("content-type", ""), "file", lambda _: buffer)
    return buffer.getvalue()


# --- routes ----------------------------------------------------------------------------------------


@route
async def create_static(ctx: Ctx) -> Response:
    query = ctx.request.query_params
    problems = []
    name, kind = query.get("name", ""), query.get("type", "")
    if not name.strip():
        problems.append("name: required (query parameter)")
    if kind not in TYPES:
        problems.append(f"type: must be one of {', '.join(TYPES)} (got {kind!r})")
    data = await _read_file(ctx)
    static_id = str(uuid.uuid4())
    fields: dict[str, Any] = {}
    if kind in TYPES:
        fields, content_problems = parse_content(kind, data, name, static_id)
        problems += content_problems
    if problems:
        raise bad_request(*problems)
    if kind == ROK4_STYLE:
        await asyncio.to_thread(ctx.wh.store.put_style, static_id, fields["style"])
    body: dict[str, Any] = {"name": name, "type": kind, "description": query.get("description", ""),
                            **fields, "tags": {}}
    add_event(body, "Création", ctx.user)
    entity = await asyncio.to_thread(ctx.wh.entities.create, KIND, ctx.datastore.id, body, static_id)
    if kind == ROK4_STYLE:
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
    body = get_static(ctx, ctx.param("static")).body
    if body["type"] == ROK4_STYLE:
        return json_response(body["style"])
    media = "application/vnd.ogc.sld+xml" if body["type"] == GEOSERVER_STYLE else "text/plain; charset=utf-8"
    return Response(body["content"].encode("utf-8"), media_type=media)


def users_of(ctx: Ctx, static_id: str) -> list[str]:
    """Configurations using a static: as a WMS-RASTER style, or as a WMS-VECTOR relation's style or template."""
    from .configurations import KIND as CONFIGURATION

    out = []
    for configuration in ctx.wh.entities.list(CONFIGURATION):
        infos = configuration.body["type_infos"]
        used = [s.lower() for s in infos.get("styles", [])]
        for item in infos.get("used_data", []) if configuration.body["type"] == "WMS-VECTOR" else []:
            for relation in item.get("relations", []):
                used += [str(relation[k]).lower() for k in ("style", "ftl") if relation.get(k)]
        if static_id in used:
            out.append(configuration.id)
    return out


@route
async def replace_static(ctx: Ctx) -> Response:
    """Replace the file (same type); configurations using it are checked again and their layers redrawn."""
    from .wmsv_configurations import republish_using, static_fits

    entity = get_static(ctx, ctx.param("static"))
    kind = entity.body["type"]
    data = await _read_file(ctx)
    fields, problems = parse_content(kind, data, entity.body["name"], entity.id)
    if problems:
        raise bad_request(*problems)
    users = users_of(ctx, entity.id)
    if kind != ROK4_STYLE:
        problems = await asyncio.to_thread(static_fits, ctx, entity.id, kind, fields, users)
        if problems:
            raise bad_request(*problems)
    if kind == ROK4_STYLE:
        await asyncio.to_thread(ctx.wh.store.put_style, entity.id, fields["style"])

    def change(body: dict[str, Any]) -> None:
        body.update(fields)
        add_event(body, "Remplacement du fichier", ctx.user)

    await asyncio.to_thread(ctx.wh.entities.update, KIND, entity.id, change)
    if kind != ROK4_STYLE:
        await republish_using(ctx, users)
    await ctx.wh.runtime.refresh()
    return json_response(static_view(get_static(ctx, entity.id)))


@route
async def edit_static(ctx: Ctx) -> Response:
    """`{"name"?, "description"?}` (cartes.gouv.fr renames a style once its configuration exists)."""
    entity = get_static(ctx, ctx.param("static"))
    data = await json_body(ctx.request)
    problems = [f"{k}: unknown field (name and description may change)" for k in sorted(set(data) - {"name", "description"})]
    if "name" in data and (not isinstance(data["name"], str) or not data["name"].strip()):
        problems.append("name: a non-empty string is required")
    if "description" in data and not isinstance(data["description"], str):
        problems.append("description: must be a string")
    if not data:
        problems.append("the body must hold name or description")
    if problems:
        raise bad_request(*problems)
    await asyncio.to_thread(ctx.wh.entities.update, KIND, entity.id, lambda b: b.update(data))
    return json_response(static_view(get_static(ctx, entity.id)))


@route
async def delete_static(ctx: Ctx) -> Response:
    entity = get_static(ctx, ctx.param("static"))
    users = users_of(ctx, entity.id)
    if users:
        raise conflict(f"static {entity.id} is used by configurations {', '.join(users)}: change or delete them first")
    if entity.body["type"] == ROK4_STYLE:
        await asyncio.to_thread(ctx.wh.store.remove_style, entity.id)
    await asyncio.to_thread(ctx.wh.entities.delete, entity.id)
    await ctx.wh.runtime.refresh()
    return no_content()


def routes() -> list[BaseRoute]:
    return [
        Route(PREFIX, list_statics, methods=["GET"]),
        Route(PREFIX, create_static, methods=["POST"]),
        Route(PREFIX + "/{static}", get_static_route, methods=["GET"]),
        Route(PREFIX + "/{static}", replace_static, methods=["PUT"]),
        Route(PREFIX + "/{static}", edit_static, methods=["PATCH"]),
        Route(PREFIX + "/{static}", delete_static, methods=["DELETE"]),
        Route(PREFIX + "/{static}/file", static_file, methods=["GET"]),
    ]
