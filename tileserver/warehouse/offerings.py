"""Offerings: a configuration published on an endpoint. Creating one writes the shared store's
Layer record and offering (PUBLISHING), refreshes this process's catalog and answers PUBLISHED
once the layer is served (other processes follow through the store's revision within seconds);
`open: false` restricts the layer to API keys granted access. Deleting unpublishes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.publication.status import OfferingStatus
from tileserver.services.ows import base_url

from .annotations import add_event, annotations_view
from .configurations import KIND as CONFIGURATION
from .configurations import (
    OFFERING,
    build_layer,
    get_configuration,
    live_record,
    name_taken,
    offerings_of,
    record_id_for,
)
from .configurations import PREFIX as CONFIGURATIONS
from .configurations import used_data as used_pyramids
from .endpoints import find, layer_urls
from .entities import Entity
from .errors import bad_request, conflict, not_found
from .lifecycle import offer, offered
from .web import Ctx, json_body, json_response, list_response, no_content, route
from .wfs_configurations import wfs_layer
from .wmsv_configurations import wmsv_layer

log = logging.getLogger("tileserver.warehouse")
PREFIX = "/api/datastores/{datastore}/offerings"
_EXTENSIONS = {"JPG": "jpeg", "JPG90": "jpeg", "PNG": "png"}


def offering_view(ctx: Ctx, entity: Entity) -> dict[str, Any]:
    body = entity.body
    shared = ctx.wh.store.get_offering(entity.id)
    endpoint = find(body["endpoint"])
    layer = body["layer_name"]
    record = live_record(ctx, entity)
    published = ctx.wh.runtime.catalog.layers.get(record) if record is not None else None
    configuration = ctx.wh.entities.get(CONFIGURATION, body["configuration"]["_id"])
    used = configuration.body["type_infos"]["used_data"] if configuration is not None else []
    if published is not None:
        extension, tms = published.format.tms_extension, published.tms.id
        vector = published.format.is_vector
    else:  # not served (yet): what its stored data say
        vector = body["type"] == "WMTS-TMS" and _uses_vector_pyramid(ctx, used)
        extension, tms = ("pbf" if vector else "tif"), "PM"
    feature_types: tuple[str, ...] = ()
    if body["type"] == "WFS":
        feature_types = tuple(r.get("public_name") or r["native_name"] for u in used for r in u.get("relations", []))
    status = shared.status if shared is not None else OfferingStatus.UNPUBLISHED
    assert endpoint is not None
    return {
        "_id": entity.id, "type": body["type"], "layer_name": layer, "status": status,
        "open": shared.open if shared is not None else body.get("open", True), "available": status == OfferingStatus.PUBLISHED,
        "endpoint": {"_id": endpoint.id, "name": endpoint.name, "technical_name": endpoint.technical_name},
        "configuration": body["configuration"], "creation": entity.created_at,
        "urls": layer_urls(endpoint, base_url(ctx.request), layer, extension, tms, feature_types, vector),
        **annotations_view(body),
    }


def _uses_vector_pyramid(ctx: Ctx, used: list[dict[str, Any]]) -> bool:
    for item in used:
        stored = ctx.wh.store.get_stored_data(str(item.get("stored_data", "")).lower())
        if stored is not None and stored.type == "ROK4-PYRAMID-VECTOR":
            return True
    return False


def get_offering(ctx: Ctx, ident: str) -> Entity:
    entity = ctx.wh.entities.get(OFFERING, ident.lower())
    if entity is None or entity.datastore_id != ctx.datastore.id:
        raise not_found("offering", ident)
    return entity


async def _publish(ctx: Ctx, offering_id: str, layer_id: str, endpoint: str, open_: bool) -> None:
    """Wait for this process's catalog to serve the layer; PUBLISHED, or UNSTABLE with the reason."""
    await ctx.wh.runtime.refresh()
    catalog = ctx.wh.runtime.catalog
    served = layer_id in catalog.layers or layer_id in catalog.vector_layers or layer_id in catalog.vector_maps
    if not served:
        log.warning("offering %s: layer %s not served: %s", offering_id, layer_id, catalog.errors.get(layer_id))
    await asyncio.to_thread(offered, ctx.wh.store, layer_id, endpoint, open_, served)


@route
async def create_offering(ctx: Ctx) -> Response:
    configuration = get_configuration(ctx, ctx.param("configuration"))
    data = await json_body(ctx.request)
    problems = [f"{k}: unknown field" for k in sorted(set(data) - {"endpoint", "open", "visibility"})]
    endpoint = find(data["endpoint"]) if isinstance(data.get("endpoint"), str) else None
    if endpoint is None:
        problems.append(f"endpoint: unknown endpoint {data.get('endpoint')!r} (GET /datastores/{{id}} lists them)")
    elif endpoint.type != configuration.body["type"]:
        problems.append(f"endpoint: {endpoint.technical_name} publishes {endpoint.type} configurations, not "
                        f"{configuration.body['type']}")
    open_ = data.get("open", True)
    if not isinstance(open_, bool):
        problems.append("open: must be true or false")
    elif open_ and endpoint is not None and not endpoint.open:
        problems.append(f"open: {endpoint.technical_name} is a private endpoint: its offerings are restricted"
                        " (open: false)")
    if problems:
        raise bad_request(*problems)
    assert endpoint is not None
    if offerings_of(ctx, configuration.id):
        raise conflict(f"configuration {configuration.id} already has an offering")
    body = configuration.body
    layer_name = body["layer_name"]
    taken = name_taken(ctx, layer_name, body["type"])
    if taken is not None:
        raise conflict(f"a {body['type']} layer {layer_name} is already published (store record {taken})")
    record = record_id_for(ctx, layer_name, body["type"])
    if body["type"] == "WFS":
        layer = await asyncio.to_thread(wfs_layer, ctx, body, not open_, record)
    elif body["type"] == "WMS-VECTOR":
        layer = await asyncio.to_thread(wmsv_layer, ctx, body, not open_, record)
    else:
        used_problems, pyramids = await asyncio.to_thread(used_pyramids, ctx, body["type_infos"]["used_data"])
        if used_problems:
            raise bad_request(*used_problems)
        layer = build_layer(body, pyramids, restricted=not open_, record_id=record)
    await asyncio.to_thread(ctx.wh.store.add_layer, layer, not open_)
    shared = await asyncio.to_thread(offer, ctx.wh.store, record, endpoint.technical_name, open_)
    side: dict[str, Any] = {"configuration": {"_id": configuration.id, "name": body["name"]},
                            "endpoint": endpoint.technical_name, "layer_name": layer_name, "layer_id": record,
                            "type": body["type"], "open": open_, "tags": {}}
    add_event(side, "Publication", ctx.user)
    entity = await asyncio.to_thread(ctx.wh.entities.create, OFFERING, ctx.datastore.id, side, shared.id)
    await _publish(ctx, entity.id, record, endpoint.technical_name, open_)
    return json_response(offering_view(ctx, entity), status=201)


def _filters() -> dict[str, Any]:
    def stored_data(ctx: Ctx):  # noqa: ANN202
        def match(item: dict[str, Any], wanted: str) -> bool:
            configuration = ctx.wh.entities.get(CONFIGURATION, item["configuration"]["_id"])
            return configuration is not None and any(
                u.get("stored_data") == wanted.lower() for u in configuration.body["type_infos"]["used_data"])
        return match

    return {"stored_data": stored_data}


@route
async def list_offerings(ctx: Ctx) -> Response:
    items = [offering_view(ctx, e) for e in ctx.wh.entities.list(OFFERING, ctx.datastore.id)]
    filters = {k: f(ctx) for k, f in _filters().items()}
    return list_response(ctx.request, items, filters)


@route
async def configuration_offerings(ctx: Ctx) -> Response:
    configuration = get_configuration(ctx, ctx.param("configuration"))
    return list_response(ctx.request, [offering_view(ctx, e) for e in offerings_of(ctx, configuration.id)])


@route
async def get_offering_route(ctx: Ctx) -> Response:
    return json_response(offering_view(ctx, get_offering(ctx, ctx.param("offering"))))


@route
async def edit_offering(ctx: Ctx) -> Response:
    """`{"open": bool}`: open to all, or restricted to keys granted access."""
    entity = get_offering(ctx, ctx.param("offering"))
    data = await json_body(ctx.request)
    if set(data) - {"open", "visibility"} or not isinstance(data.get("open"), bool):
        raise bad_request("the body must be {\"open\": true|false}")
    endpoint = find(entity.body["endpoint"])
    if data["open"] and endpoint is not None and not endpoint.open:
        raise bad_request(f"open: {endpoint.technical_name} is a private endpoint: its offerings are restricted")
    record = live_record(ctx, entity)
    if record is None:
        raise conflict(f"offering {entity.id}: its layer was removed by the operator; delete the offering")
    if ctx.wh.store.get_layer(record) is not None:
        await asyncio.to_thread(ctx.wh.store.set_restricted, record, not data["open"])
    await asyncio.to_thread(ctx.wh.entities.update, OFFERING, entity.id, lambda b: b.update(open=data["open"]))
    await ctx.wh.runtime.refresh()
    return json_response(offering_view(ctx, entity))


async def unpublish(ctx: Ctx, entity: Entity) -> None:
    """The offering and, when it was the last one, its layer: only while the store's offering still
    names it (a layer the operator put in its place is his)."""
    layer = live_record(ctx, entity)
    if layer is not None:
        await asyncio.to_thread(ctx.wh.store.remove_offering, entity.id)
        if ctx.wh.store.get_layer(layer) is not None and not ctx.wh.store.list_offerings(layer):
            await asyncio.to_thread(ctx.wh.store.remove_layer, layer)
    await asyncio.to_thread(ctx.wh.entities.delete, entity.id)
    await ctx.wh.runtime.refresh()


@route
async def delete_offering(ctx: Ctx) -> Response:
    await unpublish(ctx, get_offering(ctx, ctx.param("offering")))
    return no_content()


def routes() -> list[BaseRoute]:
    return [
        Route(CONFIGURATIONS + "/{configuration}/offerings", configuration_offerings, methods=["GET"]),
        Route(CONFIGURATIONS + "/{configuration}/offerings", create_offering, methods=["POST"]),
        Route(PREFIX, list_offerings, methods=["GET"]),
        Route(PREFIX + "/{offering}", get_offering_route, methods=["GET"]),
        Route(PREFIX + "/{offering}", edit_offering, methods=["PATCH"]),
        Route(PREFIX + "/{offering}", delete_offering, methods=["DELETE"]),
    ]
