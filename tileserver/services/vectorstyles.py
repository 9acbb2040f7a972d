"""Client styles of vector tile layers: MapLibre / Mapbox GL style JSON next to the layer's TileJSON.

- `/tms/1.0.0/{layer}/style.json`: the default style, generated from the tables the pyramid's
  descriptor lists, so a client draws the layer with nothing else. Its one source is of type
  `vector` and points at the layer's TileJSON (absolute, from the public URL as every document).
  One colour per table (source-layer); polygons as fill + outline, lines as lines, points as
  circles. Every style layer filters on `$type` (which matches Multi* geometries too), so a table
  whose descriptor says `GEOMETRY` (or nothing) gets all three and each draws what it holds.
- `/tms/1.0.0/{layer}/styles.json`: the styles offered, the default first, then those attached to
  the layer record (`vector_styles`, set by the warehouse from `configuration.extra.styles`).
- `/tms/1.0.0/{layer}/styles/{name}.json`: one style; `default` is the generated one, an attached
  one answers 302 to its document (a published annex, or any URL the producer gave).

Mounted before the TMS catch-all; errors are TMS's (`TileMapServerError`), like the TileJSON's.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from tileserver.catalog import PublishedLayer
from tileserver.runtime import get_runtime
from tileserver.services.ows import echo, key_hash
from tileserver.services.policy import ServiceError, document_headers, error_response
from tileserver.services.tms_common import (
    VERSION,
    TMSError,
    key_query,
    level_order,
    render_error,
    service_url,
)
from tileserver.services.vectortables import vector_tables

DEFAULT = "default"
GOLDEN_ANGLE = 137.508  # degrees between successive table hues: neighbours never look alike
FILL_OPACITY = 0.35


def colour(index: int) -> str:
    return f"hsl({round(index * GOLDEN_ANGLE) % 360}, 70%, 42%)"


def _kinds(geometry: str) -> tuple[str, ...]:
    """Which of polygon / line / point a descriptor geometry type holds (all three when unknown)."""
    g = geometry.upper()
    if "POLYGON" in g or "SURFACE" in g:
        return ("polygon",)
    if "LINE" in g or "CURVE" in g:
        return ("line",)
    if "POINT" in g:
        return ("point",)
    return ("polygon", "line", "point")


def style_tables(published: PublishedLayer) -> list[tuple[str, str, int]]:
    """(table, geometry, minzoom) of each table the tiles hold, in first-seen order (top → bottom)."""
    found: dict[str, tuple[str, int]] = {}
    for level, name, geometry, _ in vector_tables(published):
        zoom = level_order(published, level)
        known_geometry, minzoom = found.get(name, (geometry, zoom))
        found[name] = (known_geometry or geometry, min(minzoom, zoom))
    return [(name, geometry, minzoom) for name, (geometry, minzoom) in found.items()]


def tilejson_url(request: Request, published: PublishedLayer) -> str:
    return f"{service_url(request)}/{published.id}/metadata.json" + key_query(request)


def default_style(request: Request, published: PublishedLayer) -> dict[str, Any]:
    """A MapLibre style drawing every table of the layer, each in its own colour."""
    source = published.id
    top = min(level_order(published, level) for level in published.level_ids)
    layers: list[dict[str, Any]] = []
    for index, (table, geometry, minzoom) in enumerate(style_tables(published)):
        c = colour(index)
        common: dict[str, Any] = {"source": source, "source-layer": table}
        if minzoom > top:
            common["minzoom"] = minzoom
        kinds = _kinds(geometry)
        if "polygon" in kinds:
            polygon = ["==", "$type", "Polygon"]
            layers.append({"id": f"{table}-fill", "type": "fill", **common, "filter": polygon,
                           "paint": {"fill-color": c, "fill-opacity": FILL_OPACITY}})
            layers.append({"id": f"{table}-outline", "type": "line", **common, "filter": polygon,
                           "paint": {"line-color": c, "line-width": 1}})
        if "line" in kinds:
            layers.append({"id": f"{table}-line", "type": "line", **common, "filter": ["==", "$type", "LineString"],
                           "layout": {"line-join": "round", "line-cap": "round"},
                           "paint": {"line-color": c, "line-width": 2}})
        if "point" in kinds:
            layers.append({"id": f"{table}-point", "type": "circle", **common, "filter": ["==", "$type", "Point"],
                           "paint": {"circle-color": c, "circle-radius": 4, "circle-stroke-color": "#ffffff",
                                     "circle-stroke-width": 1}})
    west, south, east, north = published.wgs84_bbox
    return {
        "version": 8,
        "name": f"{published.layer.title or published.id} ({DEFAULT})",
        "metadata": {"tileserver:generated": True, "tileserver:layer": published.id},
        "center": [(west + east) / 2, (south + north) / 2],
        "zoom": top,
        "sources": {source: {"type": "vector", "url": tilejson_url(request, published)}},
        "layers": layers,
    }


def style_problems(doc: Any) -> list[str]:
    """Why a document is not a MapLibre / Mapbox GL style (empty when it is one, structurally):
    a JSON object with `version` 8, a `sources` object and a `layers` array of objects with an id
    and a type."""
    if not isinstance(doc, dict):
        return ["a style must be a JSON object"]
    problems = []
    if doc.get("version") != 8:
        problems.append(f"version: must be 8 (got {str(doc.get('version'))[:20]!r})")
    if not isinstance(doc.get("sources"), dict):
        problems.append("sources: must be an object")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        problems.append("layers: must be an array")
    else:
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict) or not isinstance(layer.get("id"), str) or not isinstance(layer.get("type"), str):
                problems.append(f"layers[{i}]: must be an object with a string id and type")
                break
    return problems


def styles_list(request: Request, published: PublishedLayer) -> list[dict[str, Any]]:
    """The default style, then the attached ones (`current`: the one a client should draw)."""
    base = f"{service_url(request)}/{published.id}"
    attached = published.layer.vector_styles
    current = next((s["name"] for s in attached if s.get("current")), None)
    out = [{"name": DEFAULT, "title": "Default style (generated)", "url": f"{base}/style.json",
            "current": not attached}]
    out += [{"name": s["name"], "title": s.get("title", s["name"]), "url": f"{base}/styles/{s['name']}.json",
             "source": s["url"], "current": s["name"] == (current or attached[0]["name"])} for s in attached]
    return out


def _vector_layer(request: Request, layer_id: str) -> PublishedLayer:
    published = get_runtime(request).catalog.get(layer_id, "tms", key_hash(request))
    if published is None:
        raise TMSError(400, f"layer {echo(layer_id)} unknown")
    if not published.format.is_vector:
        raise TMSError(404, f"layer {echo(layer_id)} holds no vector tiles: it has no client style")
    return published


def _json(request: Request, published: PublishedLayer, data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json", headers=document_headers(request, [published]))


async def _answer(request: Request, name: str | None) -> Response:
    try:
        published = _vector_layer(request, request.path_params["layer"])
        if name is None:
            return _json(request, published, styles_list(request, published))
        if name == DEFAULT:
            return _json(request, published, default_style(request, published))
        style = next((s for s in published.layer.vector_styles if s["name"] == name), None)
        if style is None:
            raise TMSError(404, f"layer {echo(published.id)} has no style {echo(name)}")
        return RedirectResponse(style["url"], status_code=302, headers=document_headers(request, [published]))
    except ServiceError as exc:
        return error_response(request, exc, render_error)


async def default_endpoint(request: Request) -> Response:
    return await _answer(request, DEFAULT)


async def list_endpoint(request: Request) -> Response:
    return await _answer(request, None)


async def style_endpoint(request: Request) -> Response:
    return await _answer(request, request.path_params["name"])


def routes() -> list[BaseRoute]:
    prefix = f"/tms/{VERSION}/{{layer}}"
    return [
        Route(f"{prefix}/style.json", default_endpoint, methods=["GET"]),
        Route(f"{prefix}/styles.json", list_endpoint, methods=["GET"]),
        Route(f"{prefix}/styles/{{name}}.json", style_endpoint, methods=["GET"]),
    ]
