"""Stored data: the pyramids of the shared store, seen with the fields of the platform's
`ROK4-PYRAMID-RASTER` entries (seed 002), and the vector bases (`VECTOR-DB`, seed 003:
`type_infos.relations`, `srs`, `extent`, `size`). The warehouse's side (datastore, tags, comments) lives
in its entity of the same id; a pyramid registered by the ROK4 admin API or the CLI has none
and belongs to the default datastore.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.publication.store import VECTOR_DB, StoredData

from .annotations import add_event, annotation_routes, annotations_view
from .entities import Entity
from .errors import bad_request, conflict, not_found
from .lifecycle import EXECUTION
from .pyramid_home import remove_pyramid
from .web import Ctx, json_body, json_response, list_response, no_content, route

KIND = "stored_data"
PREFIX = "/api/datastores/{datastore}/stored_data"


def owner(ctx: Ctx, stored: StoredData) -> Entity | None:
    return ctx.wh.entities.get(KIND, stored.id)


def in_datastore(ctx: Ctx, stored: StoredData, side: Entity | None) -> bool:
    if side is not None:
        return side.datastore_id == ctx.datastore.id
    return ctx.datastore.id == ctx.wh.accounts.default_datastore().id


def get_stored(ctx: Ctx, ident: str) -> tuple[StoredData, Entity | None]:
    stored = ctx.wh.store.get_stored_data(ident.lower())
    side = owner(ctx, stored) if stored is not None else None
    if stored is None or not in_datastore(ctx, stored, side):
        raise not_found("stored data", ident)
    return stored, side


def _from_pyramid_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The fields of a pyramid registered from a descriptor (Pyramid.summary())."""
    from tileserver.rok4.formats import get_format

    fmt = get_format(summary["format"])
    west, south, east, north = summary["wgs84_bbox"]
    ring = [[west, north], [east, north], [east, south], [west, south], [west, north]]
    if fmt.is_vector:  # no pixels: the platform's ROK4-PYRAMID-VECTOR has tms and levels only
        return {"srs": summary.get("crs"), "extent": {"type": "Polygon", "coordinates": [ring]},
                "size": summary.get("size", 0), "type_infos": {
                    "tms": summary["tile_matrix_set"], "levels": [lv["id"] for lv in summary.get("levels", [])]}}
    return {
        "srs": summary.get("crs"),
        "extent": {"type": "Polygon", "coordinates": [ring]},
        "size": summary.get("size", 0),
        "type_infos": {
            "tms": summary["tile_matrix_set"],
            "levels": [lv["id"] for lv in summary.get("levels", [])],
            "channels_format": fmt.sample_format,
            "channels_number": summary.get("channels"),
            "compression": fmt.compression.upper(),
            "nodata_value": ",".join(f"{v:g}" for v in summary.get("nodata", [])),
        },
    }


def pyramid_fields(summary: dict[str, Any]) -> dict[str, Any]:
    if "type_infos" in summary:
        return {k: summary[k] for k in ("srs", "extent", "size", "type_infos") if k in summary}
    if "tile_matrix_set" in summary:
        return _from_pyramid_summary(summary)
    return {}


def _storage_type(stored: StoredData) -> str:
    """As the platform names it: a VECTOR-DB is POSTGRESQL there, even though here it is a GeoPackage file."""
    if stored.type == VECTOR_DB:
        return "POSTGRESQL"
    return "S3" if stored.descriptor_url.startswith("s3://") else "FILESYSTEM"


def stored_data_view(stored: StoredData, side: Entity | None) -> dict[str, Any]:
    body = side.body if side is not None else {}
    out: dict[str, Any] = {
        "_id": stored.id,
        "name": stored.name,
        "type": stored.type,
        "status": stored.status,
        "srs": None,
        "contact": body.get("contact", ""),
        "creation": stored.created_at,
        "storage": {"type": _storage_type(stored),
                    "labels": list(body.get("storage_tags", []))},
        "size": 0,
        **annotations_view(body),
    }
    if body.get("extra"):
        out["extra"] = body["extra"]
    out.update(pyramid_fields(stored.summary))
    return out


def summary_view(stored: StoredData) -> dict[str, Any]:
    """What executions show of their input and output stored data."""
    return {"_id": stored.id, "name": stored.name, "type": stored.type, "status": stored.status}


def visible(ctx: Ctx) -> list[tuple[StoredData, Entity | None]]:
    sides = {e.id: e for e in ctx.wh.entities.list(KIND)}
    return [(s, sides.get(s.id)) for s in ctx.wh.store.list_stored_data()
            if in_datastore(ctx, s, sides.get(s.id))]


@route
async def list_stored_data(ctx: Ctx) -> Response:
    items = [stored_data_view(s, side) for s, side in await asyncio.to_thread(visible, ctx)]
    return list_response(ctx.request, items)


@route
async def get_stored_data(ctx: Ctx) -> Response:
    return json_response(stored_data_view(*get_stored(ctx, ctx.param("stored_data"))))


def users_of(ctx: Ctx, stored: StoredData) -> list[str]:
    """What prevents deleting a stored data: configurations, layers and running executions using it."""
    from .configurations import KIND as CONFIGURATION

    users = [f"configuration {e.id}" for e in ctx.wh.entities.list(CONFIGURATION)
             if any(u.get("stored_data") == stored.id for u in e.body.get("type_infos", {}).get("used_data", []))]
    users += [f"layer {layer}" for layer in ctx.wh.store.layers_using(stored.descriptor_url)
              if f"configuration {layer}" not in users]
    for execution in ctx.wh.entities.find(EXECUTION, "json_extract(body, '$.status') IN ('WAITING', 'PROGRESS')"):
        ids = [s["_id"] for s in execution.body.get("inputs", {}).get("stored_data", [])]
        ids.append(execution.body["output"]["stored_data"]["_id"])
        if stored.id in ids:
            users.append(f"processing execution {execution.id}")
    return users


@route
async def delete_stored_data(ctx: Ctx) -> Response:
    stored, side = get_stored(ctx, ctx.param("stored_data"))
    users = await asyncio.to_thread(users_of, ctx, stored)
    if users:
        raise conflict(f"stored data {stored.id} is in use by {', '.join(users)}")
    await asyncio.to_thread(ctx.wh.store.remove_stored_data, stored.id)
    if side is not None:
        await asyncio.to_thread(ctx.wh.entities.delete, stored.id)
    await asyncio.to_thread(remove_pyramid, stored.descriptor_url, ctx.wh.settings)
    return no_content()


@route
async def modify_stored_data(ctx: Ctx) -> Response:
    """`PATCH {extra}`: the client's own notes on the data, merged key by key (cartes.gouv.fr keeps a
    harvested pyramid's legend there, seed 004: `{extra: {legend: {url, annexe_id}}}`). The name and
    the technical fields are the processing's and are not edited here."""
    data = await json_body(ctx.request)
    unknown = sorted(set(data) - {"extra"})
    if unknown:
        raise bad_request(*(f"{k}: cannot be modified (extra only)" for k in unknown))
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise bad_request("extra: must be an object")
    kind = await _ensure(ctx, ctx.param("stored_data"))
    stored, _ = get_stored(ctx, ctx.param("stored_data"))

    def apply(body: dict[str, Any]) -> None:
        body["extra"] = {**(body.get("extra") or {}), **extra}
        add_event(body, "Modification", ctx.user)

    side = await asyncio.to_thread(ctx.wh.entities.update, kind, stored.id, apply)
    return json_response(stored_data_view(stored, side))


async def _ensure(ctx: Ctx, ident: str) -> str:
    """Annotating a stored data registered elsewhere gives it its warehouse side."""
    stored, side = get_stored(ctx, ident)
    if side is None:
        body: dict[str, Any] = {"tags": {}}
        add_event(body, "Enregistrement", None)
        await asyncio.to_thread(ctx.wh.entities.create, KIND, ctx.datastore.id, body, stored.id)
    return KIND


def routes() -> list[BaseRoute]:
    return [
        Route(PREFIX, list_stored_data, methods=["GET"]),
        Route(PREFIX + "/{stored_data}", get_stored_data, methods=["GET"]),
        Route(PREFIX + "/{stored_data}", delete_stored_data, methods=["DELETE"]),
        Route(PREFIX + "/{stored_data}", modify_stored_data, methods=["PATCH"]),
        *annotation_routes(PREFIX, "stored_data", _ensure),
    ]
