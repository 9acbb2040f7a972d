"""OGC API – Features Part 1 (core, GeoJSON, HTML) and Part 2 (CRS) over WFS layer records.

Collections are the WFS feature types under the same name, `<layer public name>:<relation public
name>`: the colon is legal in a path segment, so `/ogcapi/collections/bdtopo:commune/items` and its
percent-encoded form `bdtopo%3Acommune` both work (raster layer names never hold a colon, so the two
kinds cannot collide). The collection list, a collection's document and /conformance are
`services.ogcapi`'s; this module hands it its collections through `ogcapi_common.PROVIDERS` and answers
`/items` and `/items/{featureId}`, streaming like WFS GetFeature.
"""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from tileserver.catalog import FeatureType
from tileserver.runtime import get_runtime
from tileserver.services import vectorquery
from tileserver.services.ogcapi_common import (
    HTML,
    JSON,
    PROVIDERS,
    Ctx,
    Problem,
    bbox_param,
    invalid,
    link,
    negotiate,
    not_found,
    render_problem,
    self_links,
)
from tileserver.services.ows import OWSException, echo
from tileserver.services.policy import ServiceError, error_response, map_headers
from tileserver.vector import crs as crslib
from tileserver.vector import geojson
from tileserver.vector.base import Feature, Query

PREFIX = "/ogcapi"
GEOJSON = "application/geo+json"
CONFORMANCE = (
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/html",
    "http://www.opengis.net/spec/ogcapi-features-2/1.0/conf/crs",
)
ITEM_OFFERS = {"json": (GEOJSON, JSON), "html": (HTML,)}
ITEMS_PARAMS = {"f", "limit", "offset", "bbox", "bbox-crs", "crs", "properties", "datetime", "apikey"}
DEFAULT_LIMIT = 10


def _path(feature_type: FeatureType) -> str:
    return f"/collections/{quote(feature_type.name, safe=':')}"


def crs_list(feature_type: FeatureType) -> list[str]:
    return list(dict.fromkeys([crslib.CRS84_URI, crslib.uri(feature_type.relation.srs), crslib.uri("EPSG:4326")]))


class Provider:
    """What `services.ogcapi` asks of this module: conformance classes and collection documents."""

    def conformance(self, ctx: Ctx) -> tuple[str, ...]:
        """Features classes where features are served: not claimed by a server publishing none."""
        return CONFORMANCE if ctx.prefix == PREFIX and ctx.catalog.vector_layers else ()

    @staticmethod
    def types(ctx: Ctx) -> list[FeatureType]:
        if ctx.prefix != PREFIX:
            return []
        return ctx.catalog.feature_types(ctx.key, service="ogcapi")

    def collections(self, ctx: Ctx, bbox: tuple[float, float, float, float] | None) -> list[dict[str, Any]]:
        out = []
        for t in self.types(ctx):
            if bbox is not None and t.wgs84_bbox is not None:
                w, s, e, n = t.wgs84_bbox
                if not (s <= bbox[3] and n >= bbox[1] and w <= bbox[2] and e >= bbox[0]):
                    continue
            out.append(self.document(ctx, t, full_links=False))
        return out

    def collection(self, ctx: Ctx, collection_id: str) -> dict[str, Any] | None:
        found = next((t for t in self.types(ctx) if t.name == collection_id), None)
        return None if found is None else self.document(ctx, found)

    @staticmethod
    def document(ctx: Ctx, t: FeatureType, full_links: bool = True) -> dict[str, Any]:
        path = _path(t)
        title = t.public.title or t.public.public_name
        links = self_links(ctx, path, title) if full_links else [link(ctx.url(path), "self", JSON, title)]
        links += [
            link(ctx.url(path + "/items", f="json"), "items", GEOJSON, f"{title} (GeoJSON)"),
            link(ctx.url(path + "/items", f="html"), "items", HTML, f"{title} (HTML)"),
        ]
        doc: dict[str, Any] = {
            "id": t.name,
            "title": title,
            "description": t.public.abstract,
            "keywords": list(t.public.keywords),
            "itemType": "feature",
            "crs": crs_list(t),
            "storageCrs": crslib.uri(t.relation.srs),
            "links": links,
        }
        if t.wgs84_bbox is not None:
            doc["extent"] = {"spatial": {"bbox": [list(t.wgs84_bbox)], "crs": crslib.CRS84_URI}}
        return doc


# --- items ----------------------------------------------------------------------------------------


def _type(ctx: Ctx, collection_id: str) -> FeatureType:
    found = ctx.catalog.feature_type(collection_id, ctx.key, service="ogcapi")
    if found is None:
        raise not_found(f"collection {echo(collection_id)} does not exist")
    return found


def _number(ctx: Ctx, name: str, default: int, maximum: int | None = None) -> int:
    raw = ctx.kvp.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid(f"{name}={echo(raw)}: expected an integer") from None
    if value < (1 if name == "limit" else 0):
        raise invalid(f"{name} is too small")
    return min(value, maximum) if maximum is not None else value


def _crs(ctx: Ctx, t: FeatureType, name: str) -> crslib.RequestCrs:
    raw = ctx.kvp.get(name)
    if raw is None:
        return crslib.parse_crs(crslib.CRS84_URI)
    if raw.strip() not in crs_list(t):
        raise invalid(f"{name}={echo(raw)}: expected one of {', '.join(crs_list(t))}")
    return crslib.parse_crs(raw)


def _bbox(ctx: Ctx, t: FeatureType) -> tuple[float, float, float, float] | None:
    values = bbox_param(ctx, "minx,miny,maxx,maxy")
    if values is None:
        return None
    return vectorquery.bbox_in(t.relation, list(values), _crs(ctx, t, "bbox-crs"))


def _properties(ctx: Ctx, t: FeatureType) -> tuple[str, ...] | None:
    try:
        return vectorquery.property_names(ctx.kvp.get("properties"), t.relation, "properties")
    except OWSException as exc:
        raise invalid(exc.message) from None


def _query(ctx: Ctx, t: FeatureType, **extra: Any) -> Query:
    unknown = sorted(set(ctx.kvp.names()) - ITEMS_PARAMS)
    if unknown:
        raise invalid(f"unknown parameter {echo(unknown[0])}")
    maximum = get_runtime(ctx.request).settings.wfs_max_features
    return Query(
        relation=t.relation.name,
        bbox=_bbox(ctx, t),
        properties=_properties(ctx, t),
        offset=_number(ctx, "offset", 0),
        limit=_number(ctx, "limit", min(DEFAULT_LIMIT, maximum), maximum),
        **extra,
    )


def _item_request(request: Request) -> tuple[Ctx, FeatureType, crslib.RequestCrs, dict[str, str]]:
    """What `/items` and `/items/{featureId}` read first: the collection, the format, the output CRS,
    and the answer's headers."""
    ctx = Ctx.of(request, PREFIX)
    t = _type(ctx, request.path_params["collectionId"])
    ctx.fmt = negotiate(request, ctx.kvp, ITEM_OFFERS)
    out = _crs(ctx, t, "crs")
    headers = {**map_headers([t.published], get_runtime(request).settings, vary=("Accept",)),
               "Content-Crs": f"<{out.text}>"}
    return ctx, t, out, headers


async def items(request: Request) -> Response:
    try:
        ctx, t, out, headers = _item_request(request)
        query = _query(ctx, t)
        plan = vectorquery.Plan(t, query, "json", out)
        matched = await vectorquery.count_matched(plan)
        returned = max(0, min(query.limit or 0, matched - query.offset))
        stream = (await vectorquery.open_stream(plan))[0] if returned else None
        path = _path(t) + "/items"
        params = {k: ctx.kvp.get(k) or "" for k in ctx.kvp.names() if k not in ("offset", "f", "apikey")}
        links = self_links(ctx, path, "items")
        if query.offset + returned < matched:
            links.append(link(ctx.url(path, **params, offset=str(query.offset + (query.limit or 0)), f=ctx.fmt),
                              "next", GEOJSON if ctx.fmt == "json" else HTML, "next page"))
        if query.offset > 0:
            links.append(link(ctx.url(path, **params, offset=str(max(0, query.offset - (query.limit or 0))),
                                      f=ctx.fmt), "prev", GEOJSON if ctx.fmt == "json" else HTML, "previous page"))
        links.append(link(ctx.url(_path(t)), "collection", JSON, t.public.title or t.name))
        if ctx.fmt == "html":
            rows = [f async for batch in vectorquery.batches(stream) for f in batch]
            page = _html(t, rows, matched, links)
            return Response(page, media_type=HTML, headers=headers)
        head = {"type": "FeatureCollection", "timeStamp": vectorquery.timestamp(), "numberMatched": matched,
                "numberReturned": returned, "links": links}

        async def body() -> AsyncIterator[bytes]:
            yield orjson.dumps(head)[:-1] + b',"features":['
            sep = b""
            async for batch in vectorquery.batches(stream):
                yield sep + vectorquery.features_json(t.relation, batch, out, query.properties)
                sep = b","
            yield b"]}"

        return StreamingResponse(body(), media_type=GEOJSON, headers=headers)
    except ServiceError as error:
        return error_response(request, _problem(error), render_problem)


async def item(request: Request) -> Response:
    try:
        ctx, t, out, headers = _item_request(request)
        fid = vectorquery.key_value(t.relation, request.path_params["featureId"])
        query = Query(relation=t.relation.name, ids=(fid,), properties=_properties(ctx, t), limit=1)
        stream, first = await vectorquery.open_stream(vectorquery.Plan(t, query, "json", out))
        stream.close()
        if not first:
            raise not_found(f"feature {echo(request.path_params['featureId'])} does not exist")
        path = f"{_path(t)}/items/{quote(str(first[0].id), safe='')}"
        links = [*self_links(ctx, path, "feature"), link(ctx.url(_path(t)), "collection", JSON, t.name)]
        if ctx.fmt == "html":
            return Response(_html(t, first, 1, links), media_type=HTML, headers=headers)
        geom = vectorquery.written(first[0].geometry, t.relation, out)
        body = geojson.feature(first[0].id, first[0].properties, geom, query.properties, links=links)
        return Response(body, media_type=GEOJSON, headers=headers)
    except ServiceError as error:
        return error_response(request, _problem(error), render_problem)


def _problem(error: ServiceError) -> ServiceError:
    """WFS helpers raise OWS exceptions; here they are problems with the same status."""
    if isinstance(error, OWSException):
        return Problem(error.status, "InvalidParameter" if error.status == 400 else error.kind, error.message)
    return error


def _html(t: FeatureType, rows: list[Feature], matched: int, links: list[dict[str, Any]]) -> str:
    names = [a.name for a in t.relation.attributes]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["id", *names])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in [f.id, *(f.properties.get(n, "") for n in names)])
        + "</tr>" for f in rows
    )
    nav = " ".join(f'<a href="{html.escape(str(lk["href"]))}">{html.escape(str(lk["rel"]))}</a>' for lk in links)
    title = html.escape(t.public.title or t.name)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title></head><body>'
            f"<h1>{title}</h1><p>{matched} features. {nav}</p><table><tr>{head}</tr>{body}</table></body></html>")


def routes() -> list[BaseRoute]:
    if not any(isinstance(p, Provider) for p in PROVIDERS):
        PROVIDERS.append(Provider())
    return [
        Route(PREFIX + "/collections/{collectionId}/items", items, methods=["GET"]),
        Route(PREFIX + "/collections/{collectionId}/items/{featureId}", item, methods=["GET"]),
    ]
