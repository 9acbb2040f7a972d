"""WMS-vector layers in /wms: GetMap drawn by `render/vector_map.py` (mapnik) and composed with raster
layers in LAYERS order, GetFeatureInfo read from the base under the clicked pixel.

A map is drawn as RGBA pictures composited with alpha-over, first LAYERS entry at the bottom: runs of
consecutive raster layers go through the raster pipeline (`render_map`, one render slot each), then
every vector layer, the composite and the encoding run in one worker thread under one more slot of
the same gate (`render/gate.py`), with its memory estimate and deadline: mapnik blocks in C++, so
the event loop never waits for it. Vector layers have no data values: they are served in the
picture formats and as 8-bit RGBA TIFF/GeoTIFF, not as BIL or ASCII grid.

GetFeatureInfo finds, per relation (first drawn on top first), the features whose geometry meets a
square of `TOLERANCE_PIXELS` around the pixel, through the VectorBase bbox query (R-tree), then an
exact shapely test in the relation's CRS; FEATURE_COUNT bounds the features per queried layer.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tileserver.catalog import MapRelationStyle, VectorMap
from tileserver.render.errors import RenderError
from tileserver.render.gate import Deadline, gate_for
from tileserver.render.georef import Grid
from tileserver.render.model import MapLayer, Raster
from tileserver.render.pipeline import render_map
from tileserver.services.ows import XML_DECLARATION
from tileserver.services.policy import BadGateway, render_failure
from tileserver.services.wms_request import PICTURE_FORMATS, MapRequest, wms_error

log = logging.getLogger("tileserver.wms")

VECTOR_FORMATS = (*PICTURE_FORMATS, "image/tiff", "image/geotiff")
TOLERANCE_PIXELS = 3
MAX_FEATURE_COUNT = 50


# --------------------------------------------------------------------------- GetMap


def _rgba(raster: Raster) -> np.ndarray:
    """A raster picture as straight-alpha RGBA uint8 (alpha 0 outside the data)."""
    data = np.asarray(raster.data)
    if data.ndim == 2:
        data = data[..., None]
    bands = data.shape[2]
    colour = data[..., : 3 if bands >= 3 else 1]
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    if bands in (2, 4):
        alpha = data[..., -1]
    else:
        alpha = np.where(raster.valid, 255, 0).astype(np.uint8)
    return np.concatenate([colour.astype(np.uint8), alpha[..., None].astype(np.uint8)], axis=2)


def compose(pictures: list[np.ndarray]) -> np.ndarray:
    """Alpha-over of straight-alpha RGBA pictures, the first at the bottom (fully transparent pictures
    are skipped, and one picture is its own composite)."""
    pictures = [p for p in pictures if p[..., 3].any()] or pictures[:1]
    if len(pictures) == 1:
        return pictures[0]
    first = pictures[0]
    alpha = first[..., 3:4].astype(np.float32) * (1.0 / 255.0)
    colour = first[..., :3] * alpha  # premultiplied: one division at the end
    for picture in pictures[1:]:
        a = picture[..., 3:4].astype(np.float32) * (1.0 / 255.0)
        keep = 1.0 - a
        colour = picture[..., :3] * a + colour * keep
        alpha = a + alpha * keep
    straight = np.divide(colour, alpha, out=np.zeros_like(colour), where=alpha > 0)
    out = np.empty(first.shape, dtype=np.uint8)
    out[..., :3] = np.clip(np.rint(straight), 0, 255)
    out[..., 3:] = np.clip(np.rint(alpha * 255.0), 0, 255)
    return out


def draw_vector(vector: VectorMap, grid: Grid, background: tuple[int, int, int] | None = None) -> np.ndarray:
    """An RGBA picture of a WMS-vector layer on `grid`, transparent or on `background` (blocking: a
    worker thread)."""
    from tileserver.render import vector_map

    layers = [vector_map.VectorLayer(r.relation, r.style) for r in vector.relations]
    if background is None:
        return vector_map.render(vector.path, layers, grid.bbox, grid.crs, grid.width, grid.height, transparent=True)
    colour = "#{:02x}{:02x}{:02x}".format(*background)
    return vector_map.render(vector.path, layers, grid.bbox, grid.crs, grid.width, grid.height, transparent=False,
                             bgcolor=colour)


def _encode(rgba: np.ndarray, req: MapRequest) -> tuple[bytes, str]:
    from tileserver.render.encode import encode_image

    fmt = req.format
    assert fmt is not None
    if fmt in PICTURE_FORMATS:
        quality = int(req.options["quality"]) if "quality" in req.options else None
        return encode_image(rgba, fmt, transparent=req.transparent, bgcolor=req.bgcolor, quality=quality)
    return encode_image(rgba, fmt, transparent=True if req.transparent else False, bgcolor=req.bgcolor,
                        grid=req.grid, tiff_compression=req.options.get("compression"))


async def render_mixed(request: Any, runtime: Any, req: MapRequest) -> tuple[bytes, str]:
    """Raster and vector layers of one GetMap, composed in LAYERS order and encoded."""
    if req.format not in VECTOR_FORMATS:
        raise wms_error("InvalidFormat", "format", f"vector layers are drawn as pictures: use one of "
                        f"{', '.join(VECTOR_FORMATS)}")
    settings = runtime.settings
    gate = gate_for(runtime)
    pictures: list[np.ndarray | VectorMap] = []
    run: list[MapLayer] = []
    try:
        async with asyncio.timeout(settings.request_timeout):
            for entry in (*req.order, None):
                if isinstance(entry, MapLayer):
                    run.append(entry)
                    continue
                if run:
                    raster = await render_map(run, req.grid, picture=True, gate=gate, max_tiles=settings.render_max_tiles)
                    pictures.append(_rgba(raster))
                    run = []
                if entry is not None:
                    pictures.append(entry)
            pixels = req.grid.width * req.grid.height * 4
            reserved = pixels * (len(pictures) + 4)  # the pictures, mapnik's image and the composite's floats
            await gate.acquire(reserved)
            deadline = Deadline(gate.timeout)

            def work() -> tuple[bytes, str]:
                drawn = []
                for index, item in enumerate(pictures):
                    deadline.check()
                    if isinstance(item, VectorMap):  # an opaque map at the bottom: mapnik paints BGCOLOR
                        background = None if req.transparent or index > 0 else req.bgcolor
                        drawn.append(draw_vector(item, req.grid, background))
                    else:
                        drawn.append(item)
                deadline.check()
                picture = compose(drawn)
                if not req.transparent and bool((picture[..., 3] == 255).all()):
                    picture = picture[..., :3]  # nothing to blend: the encoder need not flatten it
                return _encode(picture, req)

            return await gate.run_in_thread(work, reserved, deadline)
    except (RenderError, TimeoutError) as exc:
        raise render_failure(exc, "GetMap", settings.request_timeout) from None
    except (RuntimeError, ValueError) as exc:  # mapnik cannot read the base, or a style it cannot draw
        raise BadGateway("the vector layer could not be drawn", logged=f"vector GetMap: {exc}") from None


# --------------------------------------------------------------------------- GetFeatureInfo


@dataclass(frozen=True)
class FoundFeature:
    relation: MapRelationStyle
    id: Any
    geometry: Any  # shapely, in the relation's CRS
    properties: dict[str, Any]


@dataclass(frozen=True)
class VectorInfo:
    layer: str
    features: list[FoundFeature]


def scale_denominator(grid: Grid) -> float:
    """The map's scale denominator as mapnik judges rules by it (0.28 mm pixels, degrees at the equator)."""
    from tileserver.render.georef import get_crs
    from tileserver.rok4.tms import OGC_PIXEL_SIZE

    metres = grid.res_x * (6378137.0 * 3.141592653589793 / 180.0 if get_crs(grid.crs).is_geographic else 1.0)
    return metres / OGC_PIXEL_SIZE


def drawn_filter(style: Any, scale: float) -> tuple[bool, Any]:
    """(whether anything is drawn, the filter selecting what is): the OR of the rules in scale; None
    when a rule without filter, or an ElseFilter rule, draws every feature."""
    from pygeofilter import ast

    if style is None:
        return True, None
    filters = []
    for rule in style.rules:
        if rule.min_scale is not None and scale < rule.min_scale:
            continue
        if rule.max_scale is not None and scale >= rule.max_scale:
            continue
        if not rule.symbolizers:
            continue
        if rule.filter is None or rule.else_filter:
            return True, None
        filters.append(rule.filter)
    if not filters:
        return False, None
    combined = filters[0]
    for other in filters[1:]:
        combined = ast.Or(combined, other)
    return True, combined


def features_at(vector: VectorMap, grid: Grid, i: int, j: int, count: int,
                tolerance: int = TOLERANCE_PIXELS) -> VectorInfo:
    """Features the layer draws within `tolerance` pixels of pixel (i, j), top relation first
    (blocking): as GeoServer, only those a rule of the style draws at this scale."""
    import shapely

    from tileserver.vector import crs
    from tileserver.vector.base import Query, QueryError

    x0 = grid.bbox[0] + (i - tolerance) * grid.res_x
    x1 = grid.bbox[0] + (i + 1 + tolerance) * grid.res_x
    y1 = grid.bbox[3] - (j - tolerance) * grid.res_y
    y0 = grid.bbox[3] - (j + 1 + tolerance) * grid.res_y
    window = shapely.box(x0, y0, x1, y1)
    scale = scale_denominator(grid)
    found: list[FoundFeature] = []
    for item in vector.relations:
        if len(found) >= count:
            break
        relation = item.relation
        drawn, condition = drawn_filter(item.style, scale)
        if not drawn:
            continue
        try:
            local = crs.transform(shapely.segmentize(window, max(x1 - x0, y1 - y0) / 8), grid.crs, relation.srs)
        except Exception:  # noqa: S112 - a point PROJ cannot bring to the relation's CRS holds none of it
            continue
        if local.is_empty or not all(np.isfinite(local.bounds)):
            continue
        query = Query(relation.name, bbox=tuple(local.bounds), filter=condition, limit=None)
        try:
            features = list(vector.base.features(query))
        except QueryError as exc:  # a filter the base cannot evaluate: every feature under the point
            log.warning("layer %s: GetFeatureInfo ignores the style's filter: %s", vector.id, exc)
            features = list(vector.base.features(Query(relation.name, bbox=tuple(local.bounds))))
        for feature in features:
            if feature.geometry is None or not feature.geometry.intersects(local):
                continue
            found.append(FoundFeature(item, feature.id, feature.geometry, feature.properties))
            if len(found) >= count:
                break
    return VectorInfo(vector.id, found)


def _value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _text(value: Any) -> str:
    value = _value(value)
    return "" if value is None else str(value)


def info_plain(infos: list[VectorInfo]) -> bytes:
    """GeoServer's text/plain: a block per relation, `name = value` lines per feature."""
    lines = []
    for info in infos:
        if not info.features:
            lines.append(f"no features were found in layer '{info.layer}'")
        for feature in info.features:
            lines.append(f"Results for FeatureType '{info.layer}:{feature.relation.relation.name}':")
            lines.append("-" * 44)
            lines.append(f"fid = {feature.relation.relation.name}.{feature.id}")
            lines += [f"{name} = {_text(value)}" for name, value in feature.properties.items()]
            lines.append("-" * 44)
    return ("\n".join(lines) + "\n").encode()


def info_json(infos: list[VectorInfo]) -> bytes:
    """A GeoJSON FeatureCollection, geometries in CRS84 (RFC 7946), ids `table.fid`."""
    import shapely

    from tileserver.vector import crs

    features = []
    for info in infos:
        for feature in info.features:
            relation = feature.relation.relation
            geometry = None
            if feature.geometry is not None:
                geometry = shapely.geometry.mapping(crs.transform(feature.geometry, relation.srs, "OGC:CRS84"))
            features.append({"type": "Feature", "id": f"{relation.name}.{feature.id}", "geometry": geometry,
                             "properties": {k: _value(v) for k, v in feature.properties.items()},
                             "layer": info.layer, "table": relation.name})
    return json.dumps({"type": "FeatureCollection", "features": features}, default=str).encode()


def info_xml(infos: list[VectorInfo]) -> bytes:
    """GML 3.2 features in a `wfs:FeatureCollection`-like envelope, geometries in the relation's CRS."""
    from tileserver.vector import gml

    parts = [XML_DECLARATION.decode(), f'<FeatureInfoResponse xmlns:gml="{gml.GML_NS}" xmlns:layer="urn:tileserver:wms-vector">']
    for info in infos:
        parts.append(f"<Layer name={gml.attr(info.layer)}>")
        for feature in info.features:
            relation = feature.relation.relation
            parts.append(gml.feature("layer", relation, relation.name, feature.id, feature.properties,
                                     feature.geometry, relation.srs, None))
        parts.append("</Layer>")
    parts.append("</FeatureInfoResponse>")
    return "".join(parts).encode()


def _ftl_renderer() -> Callable[[str, list[dict[str, Any]]], str] | None:
    """The FreeMarker-subset engine (`render/ftl.py`, written beside this), when this build has it."""
    import importlib

    try:
        module = importlib.import_module("tileserver.render.ftl")
    except ImportError:
        return None
    render: Callable[[str, list[dict[str, Any]]], str] | None = getattr(module, "render_ftl", None)
    return render


def info_html(infos: list[VectorInfo]) -> bytes:
    """A table per relation, or the relation's FreeMarker template when it has one and the engine is here."""
    render_ftl = _ftl_renderer()
    parts = ["<html><head><title>GetFeatureInfo</title></head><body>"]
    for info in infos:
        groups: dict[str, list[FoundFeature]] = {}
        for feature in info.features:
            groups.setdefault(feature.relation.relation.name, []).append(feature)
        if not groups:
            parts.append(f"<p>no features were found in layer {html.escape(info.layer)}</p>")
        for table, features in groups.items():
            template = features[0].relation.template
            rows = [{"fid": f"{table}.{f.id}", **{k: _value(v) for k, v in f.properties.items()}} for f in features]
            if template and render_ftl is not None:
                parts.append(render_ftl(template, rows))
                continue
            names = list(rows[0])
            parts.append(f'<table class="featureInfo"><caption class="featureInfo">{html.escape(table)}</caption><tr>')
            parts += [f"<th>{html.escape(n)}</th>" for n in names]
            parts.append("</tr>")
            for row in rows:
                parts.append("<tr>" + "".join(f"<td>{html.escape(_text(row[n]))}</td>" for n in names) + "</tr>")
            parts.append("</table><br/>")
    parts.append("</body></html>")
    return "".join(parts).encode()


INFO_WRITERS: dict[str, Callable[[list[VectorInfo]], bytes]] = {
    "text/plain": info_plain, "text/html": info_html, "application/json": info_json, "text/xml": info_xml,
}
