"""WMS GetFeatureInfo: pixel values of the queried layers, or the answer of the WMS an EXTERNALWMS layer names."""

from __future__ import annotations

import asyncio
import html
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lxml import etree
from starlette.requests import Request
from starlette.responses import Response

from tileserver.catalog import PublishedLayer, VectorMap
from tileserver.render.georef import Grid, get_transformer
from tileserver.render.levels import choose_level, local_resolution
from tileserver.runtime import get_runtime
from tileserver.services.crs import V111, V130, transformable
from tileserver.services.numbers import shortest
from tileserver.services.ows import KVP, XML_DECLARATION, echo, key_hash, xml_text
from tileserver.services.policy import map_headers
from tileserver.services.relay import INFO_ALIASES, relay_feature_info
from tileserver.services.tiles import feature_info
from tileserver.services.wms_request import INFO_FORMATS, parse_map_request, requested_any, wms_error

# --------------------------------------------------------------------------- GetFeatureInfo


def _info_format(kvp: KVP) -> str:
    raw = kvp.require("INFO_FORMAT", "info_format")
    value = "".join(raw.split()).lower()
    value = INFO_ALIASES.get(value, value)
    if value not in INFO_FORMATS:
        raise wms_error("InvalidFormat", "info_format", f"INFO_FORMAT {echo(raw)} is not offered; use one of "
                     f"{', '.join(INFO_FORMATS)}")
    return value


def _point(kvp: KVP, version: str, grid: Grid) -> tuple[int, int]:
    names = ("X", "Y") if version == V111 else ("I", "J")
    out = []
    for name, size in zip(names, (grid.width, grid.height), strict=True):
        raw = kvp.get(name)
        if raw is None or not raw.strip():
            raise wms_error("MissingParameterValue", name.lower(), f"parameter {name} is required")
        text = raw.strip()
        if not re.fullmatch(r"[+-]?\d{1,9}", text) or not 0 <= int(text) < size:
            raise wms_error("InvalidPoint", name.lower(), f"{name} must be an integer within 0..{size - 1}, not {echo(raw)}")
        out.append(int(text))
    return out[0], out[1]


@dataclass(frozen=True)
class PixelInfo:
    layer: str
    values: list[float] | None  # None: no data there
    level: str | None = None


async def pixel_info(published: PublishedLayer, grid: Grid, i: int, j: int) -> PixelInfo:
    """Stored values under the centre of pixel (i, j) at the level GetMap would read."""
    x, y = grid.to_coords(i, j)
    tms = published.tms
    px, py = get_transformer(grid.crs, tms.crs).transform(float(x), float(y), errcheck=False)
    if not (math.isfinite(px) and math.isfinite(py)):
        return PixelInfo(published.id, None)
    area = (float(x) - grid.res_x, float(y) - grid.res_y, float(x) + grid.res_x, float(y) + grid.res_y)
    level = choose_level(published, local_resolution(grid, area, tms.crs, samples=1))
    col, row, pi, pj = published.matrix(level).point_to_pixel(px, py)
    return PixelInfo(published.id, await feature_info(published, level, col, row, pi, pj), level)


def _lonlat(grid: Grid, i: int, j: int) -> list[float] | None:
    if not transformable(grid.crs, "EPSG:4326"):
        return None
    x, y = grid.to_coords(i, j)
    lon, lat = get_transformer(grid.crs, "EPSG:4326").transform(float(x), float(y), errcheck=False)
    return [lon, lat] if math.isfinite(lon) and math.isfinite(lat) else None


def _info_plain(infos: list[PixelInfo], grid: Grid, i: int, j: int) -> bytes:
    """ROK4's text/plain: the bare band values, comma-joined, nothing else (its suite matches the whole
    body against a number); one line per queried layer, in QUERY_LAYERS order; no data is an empty line."""
    return "\n".join(",".join(shortest(v) for v in p.values or ()) for p in infos).encode()


def _info_html(infos: list[PixelInfo], grid: Grid, i: int, j: int) -> bytes:
    """ROK4's text/html opening (its suite checks it), then the values of each queried layer."""
    parts = ["<html><body><b>FeatureInfo :</b><br>"]
    for p in infos:
        parts.append(f"<h3>{html.escape(p.layer)}</h3><ul>")
        parts += [f"<li>{shortest(v)}</li>" for v in p.values or ()] or ["<li>no data</li>"]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "".join(parts).encode()


def _info_json(infos: list[PixelInfo], grid: Grid, i: int, j: int) -> bytes:
    point = _lonlat(grid, i, j)
    features = [{"type": "Feature", "id": p.layer,
                 "geometry": {"type": "Point", "coordinates": point} if point else None,
                 "properties": {"layer": p.layer, "pixel": p.values, "level": p.level}} for p in infos]
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


def _info_xml(infos: list[PixelInfo], grid: Grid, i: int, j: int) -> bytes:
    root = etree.Element("FeatureInfoResponse")
    for p in infos:
        layer = etree.SubElement(root, "Layer", name=xml_text(p.layer))
        pixel = etree.SubElement(layer, "Pixel")
        for v in p.values or ():
            etree.SubElement(pixel, "Band").text = shortest(v)
    return XML_DECLARATION + etree.tostring(root, encoding="UTF-8", pretty_print=True)


INFO_WRITERS: dict[str, Callable[[list[PixelInfo], Grid, int, int], bytes]] = {
    "text/plain": _info_plain, "text/html": _info_html, "application/json": _info_json, "text/xml": _info_xml,
}


async def _vector_feature_info(kvp: KVP, runtime: Any, grid: Grid, vectors: list[VectorMap], info_format: str,
                               i: int, j: int) -> Response:
    """Features of WMS-vector layers under the pixel (the base is read in a worker thread)."""
    from tileserver.services.wms_vector import INFO_WRITERS as VECTOR_WRITERS
    from tileserver.services.wms_vector import MAX_FEATURE_COUNT, features_at

    raw = (kvp.get("FEATURE_COUNT") or "1").strip()
    if not re.fullmatch(r"\d{1,6}", raw) or int(raw) < 1:
        raise wms_error("InvalidParameterValue", "feature_count", f"FEATURE_COUNT must be a positive integer, not {echo(raw)}")
    count = min(int(raw), MAX_FEATURE_COUNT)
    infos = [await asyncio.to_thread(features_at, vector, grid, i, j, count) for vector in vectors]
    body = VECTOR_WRITERS[info_format](infos)
    content_type = info_format + ("; charset=utf-8" if info_format.startswith("text/") else "")
    return Response(body, headers={"Content-Type": content_type, **map_headers(vectors, runtime.settings)})


async def get_feature_info(request: Request, kvp: KVP, version: str) -> Response:
    runtime = get_runtime(request)
    key = key_hash(request)
    req = parse_map_request(kvp, runtime, key, version, format_required=False)
    names = [n.strip() for n in kvp.require("QUERY_LAYERS", "query_layers").split(",") if n.strip()]
    if not names:
        raise wms_error("MissingParameterValue", "query_layers", "parameter QUERY_LAYERS is required")
    map_names = {entry.id for entry in req.served}
    queried = []
    vectors: list[VectorMap] = []
    for name in names:
        entry = requested_any(runtime.catalog, name, key, "query_layers")
        if name not in map_names:
            raise wms_error("LayerNotDefined", "query_layers", f"query layer {echo(name)} is not in LAYERS")
        if isinstance(entry, VectorMap):
            vectors.append(entry)
            continue
        if not entry.layer.queryable:
            raise wms_error("LayerNotQueryable", "query_layers", f"layer {echo(name)} is not queryable")
        queried.append(entry)
    info_format = _info_format(kvp)
    i, j = _point(kvp, version, req.grid)
    if vectors:
        if queried:
            raise wms_error("InvalidParameterValue", "query_layers",
                            "vector and raster layers are queried apart: ask one kind per GetFeatureInfo")
        return await _vector_feature_info(kvp, runtime, req.grid, vectors, info_format, i, j)
    external = [p for p in queried if (p.layer.get_feature_info or {}).get("type") == "EXTERNALWMS"]
    if external:
        if len(queried) > 1:
            raise wms_error("InvalidParameterValue", "query_layers",
                         f"layer {echo(external[0].id)} is answered by another WMS and must be queried alone")
        asked = {"FEATURE_COUNT": kvp.get("FEATURE_COUNT") or "1", "INFO_FORMAT": kvp.get("INFO_FORMAT") or info_format}
        if req.version == V130:
            asked["BBOX"] = req.bbox_text  # verbatim: the client's digits, its axis order
        relayed = await relay_feature_info(request, external[0], req.crs.code, req.grid.bbox,
                                           (req.grid.width, req.grid.height), i, j, info_format, asked)
        relayed.headers.update(map_headers(queried, runtime.settings))
        return relayed
    infos = list(await asyncio.gather(*(pixel_info(p, req.grid, i, j) for p in queried)))
    body = INFO_WRITERS[info_format](infos, req.grid, i, j)
    content_type = info_format + ("; charset=utf-8" if info_format.startswith("text/") else "")
    return Response(body, headers={"Content-Type": content_type, **map_headers(queried, runtime.settings)})
