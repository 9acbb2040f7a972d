"""Configurations (`WMTS-TMS`, `WMS-RASTER`, `WFS`, `WMS-VECTOR`): a layer's description, validated
against the stored data it uses, and turned into the shared store's Layer record when offered (WFS
ones in `wfs_configurations`, WMS-VECTOR ones in `wmsv_configurations`).

Layers created through the ROK4 admin API show here too (default datastore, read-only), so both
APIs see the same layers.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.publication.admin import check_layer
from tileserver.publication.model import LAYER_ID, Layer, LayerError, LayerPyramid
from tileserver.publication.status import ConfigurationStatus, StoredDataStatus
from tileserver.storage import StorageError

from .annotations import add_event, annotation_routes, annotations_view
from .endpoints import BY_TYPE
from .entities import Entity
from .errors import ApiError, bad_request, conflict, not_found
from .layer_records import layer_record
from .stored_data import get_stored
from .web import Ctx, json_body, json_response, list_response, no_content, route

KIND = "configuration"
OFFERING = "offering"
SUFFIX = {"WMTS-TMS": "wmts", "WMS-RASTER": "wms", "WFS": "wfs", "WMS-VECTOR": "wmsv"}  # record id of a layer_name taken by the other service
PREFIX = "/api/datastores/{datastore}/configurations"
TYPES = ("WMTS-TMS", "WMS-RASTER", "WFS", "WMS-VECTOR")
INTERPOLATIONS = {"NEAREST-NEIGHBOUR": "nn", "LINEAR": "linear", "BICUBIC": "bicubic", "LANCZOS": "lanczos"}
_FIELDS = {"type", "name", "layer_name", "type_infos", "attribution", "metadata", "getfeatureinfo"}
_TYPE_INFOS = {"title", "abstract", "keywords", "bbox", "used_data", "interpolation", "styles", "getfeatureinfo"}
_FOREIGN = uuid.UUID("0c5e7d1a-2b3f-4d6e-8a9b-1c2d3e4f5a6b")


# --- validation ----------------------------------------------------------------------------------------


def _string(data: dict[str, Any], key: str, where: str, problems: list[str], required: bool = True) -> None:
    value = data.get(key)
    if value is None and not required:
        return
    if not isinstance(value, str) or (required and not value.strip()):
        problems.append(f"{where}{key}: a non-empty string is required")


def _bbox_problems(bbox: Any) -> list[str]:
    if not isinstance(bbox, dict):
        return ["type_infos.bbox: must be an object {west, south, east, north}"]
    values = {k: bbox.get(k) for k in ("west", "south", "east", "north")}
    numbers = {k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    bad = [k for k in values if k not in numbers]
    if bad:
        return [f"type_infos.bbox.{k}: must be a number" for k in bad]
    west, south, east, north = (numbers[k] for k in ("west", "south", "east", "north"))
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        return ["type_infos.bbox: needs -180 ≤ west < east ≤ 180 and -90 ≤ south < north ≤ 90 (degrees)"]
    return []


def web_url(value: Any) -> bool:
    """An absolute http(s) URL with a host: what capabilities may link to (no `javascript:`,
    `data:`, `file:`…, which a client would follow or run)."""
    if not isinstance(value, str) or len(value) > 2048 or any(ord(c) < 33 for c in value):
        return False
    parts = urlsplit(value)
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)


def _link_problems(metadata: Any, attribution: Any) -> list[str]:
    problems = []
    if isinstance(metadata, list):
        problems += [f"metadata[{i}].url: an http(s) URL is required" for i, m in enumerate(metadata)
                     if isinstance(m, dict) and "url" in m and not web_url(m["url"])]
    if isinstance(attribution, dict):
        if "url" in attribution and not web_url(attribution["url"]):
            problems.append("attribution.url: an http(s) URL is required")
        logo = attribution.get("logo")
        if isinstance(logo, dict) and "url" in logo and not web_url(logo["url"]):
            problems.append("attribution.logo.url: an http(s) URL is required")
        elif isinstance(logo, str) and not web_url(logo):
            problems.append("attribution.logo: an http(s) URL is required")
    return problems


def description_problems(infos: dict[str, Any], described: bool = True) -> list[str]:
    """`type_infos` fields every configuration type checks alike: no unknown keys is the caller's;
    title, abstract and keywords when the type is `described`, and the optional bbox."""
    problems: list[str] = []
    if described:
        _string(infos, "title", "type_infos.", problems)
        _string(infos, "abstract", "type_infos.", problems)
        keywords = infos.get("keywords", [])
        if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
            problems.append("type_infos.keywords: must be an array of strings")
    if "bbox" in infos:
        problems += _bbox_problems(infos["bbox"])
    return problems


def metadata_problems(data: dict[str, Any]) -> list[str]:
    """`metadata[]` and `attribution` of any configuration: their shapes, then their links."""
    problems = []
    metadata = data.get("metadata", [])
    if not isinstance(metadata, list) or not all(isinstance(m, dict) and isinstance(m.get("url"), str)
                                                 for m in metadata):
        problems.append("metadata: must be an array of {format, url, type}")
    attribution = data.get("attribution")
    if attribution is not None and not (isinstance(attribution, dict) and isinstance(attribution.get("title", ""), str)):
        problems.append("attribution: must be an object {title, url, logo}")
    return problems + _link_problems(metadata, attribution)


def live_record(ctx: Ctx, offering: Entity) -> str | None:
    """Store id of the layer an offering publishes, while the store's offering (same id) still names
    it; None once the operator removed that layer (the admin API drops its offerings with it), even
    if he published another layer under the same id since: /api never changes an operator's layer."""
    shared = ctx.wh.store.get_offering(offering.id)
    record = str(offering.body.get("layer_id", offering.body.get("layer_name")))
    return record if shared is not None and shared.layer_id == record else None


def warehouse_records(ctx: Ctx) -> set[str]:
    """Store ids of the layers /api offerings publish; every other layer is the operator's."""
    offerings = {o.id for o in ctx.wh.entities.list(OFFERING)}
    return {o.layer_id for o in ctx.wh.store.list_offerings() if o.id in offerings}


def operator_restricted(ctx: Ctx, descriptor_url: str) -> bool:
    """Whether a pyramid is served by a restricted layer of the operator (admin API): one that no
    warehouse offering published. /api users must not republish its data as an open layer."""
    own = warehouse_records(ctx)
    for layer_id in ctx.wh.store.layers_using(descriptor_url):
        if layer_id in own:
            continue
        layer = ctx.wh.store.get_layer(layer_id)
        if layer is not None and layer.restricted:
            return True
    return False


def used_data(ctx: Ctx, used: Any) -> tuple[list[str], list[LayerPyramid]]:
    if not isinstance(used, list) or not used:
        return ["type_infos.used_data: a non-empty array of {stored_data, bottom_level, top_level} is required"], []
    problems: list[str] = []
    pyramids = []
    for i, item in enumerate(used):
        where = f"type_infos.used_data[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("stored_data"), str):
            problems.append(f"{where}.stored_data: a stored data identifier is required")
            continue
        levels = {}
        for key in ("bottom_level", "top_level"):
            value = item.get(key)
            if isinstance(value, bool) or not isinstance(value, str | int):
                problems.append(f"{where}.{key}: a level identifier is required")
            else:
                levels[key] = str(value)
        try:
            stored, _ = get_stored(ctx, item["stored_data"])
        except ApiError:
            problems.append(f"{where}.stored_data: stored data {item['stored_data']} not found in this datastore")
            continue
        if stored.status != StoredDataStatus.GENERATED:
            problems.append(f"{where}.stored_data: stored data {stored.id} is {stored.status}; it must be GENERATED")
            continue
        if operator_restricted(ctx, stored.descriptor_url):
            problems.append(f"{where}.stored_data: stored data {stored.id} is published by the operator as a"
                            " restricted layer; it cannot be published again through this API")
            continue
        from .stored_data import pyramid_fields

        available = pyramid_fields(stored.summary).get("type_infos", {}).get("levels", [])
        for key, level in levels.items():
            if available and level not in available:
                problems.append(f"{where}.{key}: level {level} is not in stored data {stored.id} "
                                f"(levels {', '.join(available)})")
        if len(levels) == 2:
            pyramids.append(LayerPyramid(stored.descriptor_url, levels["bottom_level"], levels["top_level"]))
    return problems, pyramids


def _is_vector(ctx: Ctx, used: Any) -> bool:
    from tileserver.publication.store import VECTOR_PYRAMID

    stored = ctx.wh.store.get_stored_data(str(used.get("stored_data", "")).lower()) if isinstance(used, dict) else None
    return stored is not None and stored.type == VECTOR_PYRAMID


def _style_problems(ctx: Ctx, styles: Any) -> list[str]:
    from .statics import KIND as STATIC

    if not isinstance(styles, list) or not all(isinstance(s, str) for s in styles):
        return ["type_infos.styles: must be an array of static identifiers (ROK4-STYLE)"]
    problems = []
    for i, ident in enumerate(styles):
        static = ctx.wh.entities.get(STATIC, ident.lower())
        if static is None or static.datastore_id != ctx.datastore.id or static.body.get("type") != "ROK4-STYLE":
            problems.append(f"type_infos.styles[{i}]: no ROK4-STYLE static {ident} in this datastore")
    return problems


def _feature_info(data: dict[str, Any]) -> dict[str, Any] | None:
    gfi = data.get("getfeatureinfo", (data.get("type_infos") or {}).get("getfeatureinfo"))
    if isinstance(gfi, dict) and gfi.get("stored_data") is True:
        return {"type": "PYRAMID"}
    if isinstance(gfi, dict) and isinstance(gfi.get("server_url"), str):
        # guarded: the WMS relay fetches it under the outbound policy (an /api user's URL, not the operator's)
        return {"type": "EXTERNALWMS", "url": gfi["server_url"], "layers": gfi.get("layers", ""),
                "query_layers": gfi.get("query_layers", gfi.get("layers", "")), "guarded": True}
    return None


async def _server_url_problems(ctx: Ctx, data: dict[str, Any]) -> list[str]:
    """The GetFeatureInfo server must be a host the outbound policy allows, checked on the addresses
    its name resolves to now (a name that does not resolve yet is accepted: each relay checks again)."""
    from tileserver.outbound import OutboundPolicy, OutboundRefused

    infos = data.get("type_infos")
    if not isinstance(infos, dict):
        infos = {}
    where = "getfeatureinfo" if "getfeatureinfo" in data else "type_infos.getfeatureinfo"
    gfi = data.get("getfeatureinfo", infos.get("getfeatureinfo"))
    if not isinstance(gfi, dict) or "server_url" not in gfi:
        return []
    if not isinstance(gfi["server_url"], str):
        return [f"{where}.server_url: an http(s) URL is required"]
    try:
        await OutboundPolicy.from_settings(ctx.wh.settings).check_resolved(gfi["server_url"])
    except OutboundRefused as exc:
        return [f"{where}.server_url: {exc}"]
    return []


def build_layer(data: dict[str, Any], pyramids: list[LayerPyramid], restricted: bool = False,
                record_id: str | None = None) -> Layer:
    """The shared store's Layer record a configuration publishes (id `record_id`, shown as layer_name)."""
    infos = data["type_infos"]
    descriptor: dict[str, Any] = {
        "title": infos["title"], "abstract": infos["abstract"], "keywords": list(infos.get("keywords", [])),
        "pyramids": [{"path": p.path, "bottom_level": p.bottom_level, "top_level": p.top_level} for p in pyramids],
        **{s: {"enabled": s in BY_TYPE[data["type"]].services} for s in ("wms", "wmts", "tms", "ogcapi")},
    }
    if infos.get("styles"):
        descriptor["styles"] = [s.lower() for s in infos["styles"]]
    if infos.get("interpolation"):
        descriptor["resampling"] = INTERPOLATIONS[infos["interpolation"]]
    if infos.get("bbox"):
        descriptor["bbox"] = infos["bbox"]
    gfi = _feature_info(data)
    if gfi is not None:
        descriptor["get_feature_info"] = gfi
    return layer_record(descriptor, data, restricted, record_id)


def record_id_for(ctx: Ctx, layer_name: str, type_: str) -> str:
    """Store id of the layer a new offering publishes: the layer_name itself when free, else the name
    with its service (`<name>.wms`, `<name>.wmts`), since a name is unique per service only."""
    for candidate in (layer_name, f"{layer_name}.{SUFFIX[type_]}"):
        if ctx.wh.store.get_layer(candidate) is None:
            return candidate
    raise conflict(f"layer_name {layer_name}: records {layer_name} and {layer_name}.{SUFFIX[type_]} both exist")


def name_taken(ctx: Ctx, layer_name: str, type_: str, except_record: str | None = None) -> str | None:
    """Id of a store layer already shown as `layer_name` by one of this type's services, if any
    (vector layers, WFS, apart from raster ones: their names live in other services' lists)."""
    services = set(BY_TYPE[type_].services)
    for layer in ctx.wh.store.list_layers():
        if layer.id == except_record or layer.public_name != layer_name or (layer.wfs is not None) != (type_ == "WFS"):
            continue
        if type_ == "WFS" or services & set(layer.services):
            return layer.id
    return None


async def validate(ctx: Ctx, data: dict[str, Any], replacing: str | None = None) -> Layer:
    """Every problem of a configuration body (400), then its uniqueness (409), then whether its
    layer can be served (the same check as the admin API). Returns the layer it publishes."""
    if data.get("type") == "WFS":
        from .wfs_configurations import validate_wfs

        return await validate_wfs(ctx, data, replacing)
    if data.get("type") == "WMS-VECTOR":
        from .wmsv_configurations import validate_wmsv

        return await validate_wmsv(ctx, data, replacing)
    problems = [f"{k}: unknown field" for k in sorted(set(data) - _FIELDS)]
    if data.get("type") not in TYPES:
        problems.append(f"type: must be one of {', '.join(TYPES)} (got {data.get('type')!r})")
    _string(data, "name", "", problems)
    if not isinstance(data.get("layer_name"), str) or not LAYER_ID.match(data["layer_name"]):
        problems.append("layer_name: 1–128 letters, digits, '_', '-' or '.', starting with a letter or digit")
    infos = data.get("type_infos")
    pyramids: list[LayerPyramid] = []
    if not isinstance(infos, dict):
        problems.append("type_infos: an object {title, abstract, keywords, used_data…} is required")
    else:
        problems += [f"type_infos.{k}: unknown field" for k in sorted(set(infos) - _TYPE_INFOS)]
        problems += description_problems(infos)
        used_problems, pyramids = await asyncio.to_thread(used_data, ctx, infos.get("used_data"))
        problems += used_problems
        if "interpolation" in infos and infos["interpolation"] not in INTERPOLATIONS:
            problems.append(f"type_infos.interpolation: must be one of {', '.join(INTERPOLATIONS)}")
        if "styles" in infos:
            # WMS-RASTER and, as seed 004 sends it, WMTS-TMS (a raster pyramid's legend style)
            if data.get("type") not in ("WMS-RASTER", "WMTS-TMS"):
                problems.append("type_infos.styles: only WMS-RASTER and WMTS-TMS configurations have styles")
            elif data.get("type") == "WMTS-TMS" and any(_is_vector(ctx, u) for u in infos.get("used_data") or []):
                problems.append("type_infos.styles: a vector pyramid's styles are client styles (extra.styles)")
            else:
                problems += _style_problems(ctx, infos["styles"])
    problems += await _server_url_problems(ctx, data)
    problems += metadata_problems(data)
    if problems:
        raise bad_request(*problems)
    try:
        layer = build_layer(data, pyramids)
    except LayerError as exc:
        raise bad_request(f"{exc.field}: {exc.message}") from None
    _check_unique(ctx, data, replacing)
    try:
        await check_layer(layer, ctx.wh.runtime.pool)
    except LayerError as exc:
        raise bad_request(f"type_infos.used_data: {exc.message} ({exc.field})") from None
    except StorageError as exc:
        raise ApiError(503, f"storage unavailable: {exc}") from None
    return layer


def _check_unique(ctx: Ctx, data: dict[str, Any], replacing: str | None) -> None:
    """A layer_name is unique per service: one WMTS-TMS and one WMS-RASTER configuration may share it."""
    for other in ctx.wh.entities.list(KIND):
        if (other.id != replacing and other.body["layer_name"] == data["layer_name"]
                and other.body["type"] == data["type"]):
            which = f" by configuration {other.id}" if other.datastore_id == ctx.datastore.id else ""
            raise conflict(f"layer_name {data['layer_name']} is already used{which} ({other.body['type']}): a"
                           " layer name is unique per service")
    own = published_record(ctx, replacing) if replacing is not None else None
    taken = name_taken(ctx, data["layer_name"], data["type"], except_record=own)
    if taken is not None:
        raise conflict(f"layer_name {data['layer_name']} is already a published {data['type']} layer")


def published_record(ctx: Ctx, configuration_id: str) -> str | None:
    """Store id of the layer a configuration's offering publishes (None when unpublished)."""
    for offering in offerings_of(ctx, configuration_id):
        return live_record(ctx, offering)
    return None


# --- views ---------------------------------------------------------------------------------------------


def offerings_of(ctx: Ctx, configuration_id: str) -> list[Entity]:
    return ctx.wh.entities.find(OFFERING, "json_extract(body, '$.configuration._id') = ?", (configuration_id,))


def configuration_view(ctx: Ctx, entity: Entity) -> dict[str, Any]:
    body = entity.body
    published = any(ctx.wh.store.get_offering(o.id) is not None for o in offerings_of(ctx, entity.id))
    out = {"_id": entity.id, "type": body["type"], "name": body["name"], "layer_name": body["layer_name"],
           "status": ConfigurationStatus.PUBLISHED if published else ConfigurationStatus.UNPUBLISHED,
           "creation": entity.created_at,
           "type_infos": body["type_infos"], "metadata": body.get("metadata", []), **annotations_view(body)}
    for key in ("attribution", "getfeatureinfo", "extra"):
        if key in body:
            out[key] = body[key]
    return out


def foreign_views(ctx: Ctx) -> list[dict[str, Any]]:
    """Layers of the ROK4 admin API (no configuration of their own), in the default datastore."""
    if ctx.datastore.id != ctx.wh.accounts.default_datastore().id:
        return []
    owned = {e.body["layer_name"] for e in ctx.wh.entities.list(KIND)} | warehouse_records(ctx)
    by_url = {s.descriptor_url: s.id for s in ctx.wh.store.list_stored_data()}
    out = []
    for layer in ctx.wh.store.list_layers():
        if layer.id in owned:
            continue
        infos: dict[str, Any] = {"title": layer.title, "abstract": layer.abstract, "keywords": list(layer.keywords),
                                 "used_data": [{"stored_data": by_url.get(p.path), "bottom_level": p.bottom_level,
                                                "top_level": p.top_level} for p in layer.pyramids]}
        if layer.bbox is not None:
            infos["bbox"] = dict(zip(("west", "south", "east", "north"), layer.bbox, strict=True))
        kind = ("WFS" if layer.wfs is not None else "WMS-VECTOR" if layer.vector_map is not None
                else "WMS-RASTER" if layer.services == ("wms",) else "WMTS-TMS")
        out.append({"_id": str(uuid.uuid5(_FOREIGN, layer.id)), "name": layer.id, "layer_name": layer.id,
                    "type": kind, "status": ConfigurationStatus.PUBLISHED,
                    "type_infos": infos, "metadata": [dict(m) for m in layer.metadata], "tags": {}})
    return out


def get_configuration(ctx: Ctx, ident: str) -> Entity:
    entity = ctx.wh.entities.get(KIND, ident.lower())
    if entity is None or entity.datastore_id != ctx.datastore.id:
        raise not_found("configuration", ident)
    return entity


def _uses(item: dict[str, Any], wanted: str) -> bool:
    return any(u.get("stored_data") == wanted.lower() for u in item["type_infos"].get("used_data", []))


# --- routes ---------------------------------------------------------------------------------------------


@route
async def list_configurations(ctx: Ctx) -> Response:
    def views() -> list[dict[str, Any]]:
        return [configuration_view(ctx, e) for e in ctx.wh.entities.list(KIND, ctx.datastore.id)] + foreign_views(ctx)

    return list_response(ctx.request, await asyncio.to_thread(views), {"stored_data": _uses})


def _stored_body(data: dict[str, Any]) -> dict[str, Any]:
    body = {k: data[k] for k in _FIELDS if k in data}
    body["type_infos"] = dict(body["type_infos"])
    body["type_infos"]["used_data"] = [dict(item) for item in body["type_infos"]["used_data"]]
    for item in body["type_infos"]["used_data"]:
        item["stored_data"] = item["stored_data"].lower()
        for key in ("bottom_level", "top_level"):
            if key in item:
                item[key] = str(item[key])
    return body


@route
async def create_configuration(ctx: Ctx) -> Response:
    data = await json_body(ctx.request)
    await validate(ctx, data)
    body = {**_stored_body(data), "tags": {}}
    add_event(body, "Création", ctx.user)
    entity = await asyncio.to_thread(ctx.wh.entities.create, KIND, ctx.datastore.id, body)
    return json_response(configuration_view(ctx, entity), status=201)


@route
async def get_configuration_route(ctx: Ctx) -> Response:
    ident = ctx.param("configuration").lower()
    entity = ctx.wh.entities.get(KIND, ident)
    if entity is None or entity.datastore_id != ctx.datastore.id:
        foreign = next((v for v in foreign_views(ctx) if v["_id"] == ident), None)
        if foreign is None:
            raise not_found("configuration", ident)
        return json_response(foreign)
    return json_response(configuration_view(ctx, entity))


@route
async def replace_configuration(ctx: Ctx) -> Response:
    """Full edit; a published configuration republishes its layer at once."""
    entity = get_configuration(ctx, ctx.param("configuration"))
    data = await json_body(ctx.request)
    if data.get("type", entity.body["type"]) != entity.body["type"]:
        raise bad_request("type: a configuration's type cannot change")
    if data.get("layer_name", entity.body["layer_name"]) != entity.body["layer_name"] and offerings_of(ctx, entity.id):
        raise conflict("layer_name: unpublish the configuration before renaming its layer")
    layer = await validate(ctx, data, replacing=entity.id)
    body = _stored_body(data)
    if entity.body.get("extra"):  # set by PATCH only (client_styles): kept, and published with the layer
        data = {**data, "extra": entity.body["extra"]}
    await asyncio.to_thread(ctx.wh.entities.update, KIND, entity.id, lambda b: b.update(body))
    record = published_record(ctx, entity.id)
    if record is not None and ctx.wh.store.get_layer(record) is not None:
        from dataclasses import replace

        if data["type"] == "WFS":
            from .wfs_configurations import wfs_layer

            layer = await asyncio.to_thread(wfs_layer, ctx, data, False, record)
        elif data["type"] == "WMS-VECTOR":
            from .wmsv_configurations import wmsv_layer

            layer = await asyncio.to_thread(wmsv_layer, ctx, data, False, record)
        else:
            layer = build_layer(data, list(layer.pyramids), record_id=record)
        current = ctx.wh.store.get_layer(record)
        if current is not None:  # else unpublished while the layer was built: not published again
            await asyncio.to_thread(ctx.wh.store.put_layer, replace(layer, restricted=current.restricted))
            await ctx.wh.runtime.refresh()
    return json_response(configuration_view(ctx, get_configuration(ctx, entity.id)))


@route
async def delete_configuration(ctx: Ctx) -> Response:
    entity = get_configuration(ctx, ctx.param("configuration"))
    if offerings_of(ctx, entity.id):
        raise conflict(f"configuration {entity.id} is published: delete its offerings first")
    await asyncio.to_thread(ctx.wh.entities.delete, entity.id)
    return no_content()


async def _ensure(ctx: Ctx, ident: str) -> str:
    get_configuration(ctx, ident)
    return KIND


def routes() -> list[BaseRoute]:
    item = PREFIX + "/{configuration}"
    return [
        Route(PREFIX, list_configurations, methods=["GET"]),
        Route(PREFIX, create_configuration, methods=["POST"]),
        Route(item, get_configuration_route, methods=["GET"]),
        Route(item, replace_configuration, methods=["PUT"]),
        Route(item, delete_configuration, methods=["DELETE"]),
        *annotation_routes(PREFIX, "configuration", _ensure),
    ]
