"""WMS GetLegendGraphic: a style's legend, and the LegendURL the capabilities advertise."""

from __future__ import annotations

import asyncio
import io
from typing import Any
from urllib.parse import urlencode, urlparse

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from tileserver.catalog import PublishedLayer, VectorMap
from tileserver.render.styles import Style, legend_image
from tileserver.runtime import get_runtime
from tileserver.services.crs import V130
from tileserver.services.ows import KVP, key_hash
from tileserver.services.policy import map_headers
from tileserver.services.stylebook import layer_styles, style_book
from tileserver.services.wms_request import (
    LEGEND_SIZE,
    pick_style,
    positive_param,
    requested_any,
    requested_layer,
    wms_error,
)

VECTOR_SWATCH = (20, 20)  # a rule's swatch, as GeoServer draws it by default

# --------------------------------------------------------------------------- GetLegendGraphic


def legend_url(base: str, published: PublishedLayer, style: Style, url_key: str | None) -> tuple[str, str, int, int]:
    """(href, format, width, height) of a style's legend: the style's own image URL when it
    names one (a path, not a bare site), else our GetLegendGraphic at the advertised size."""
    legend = style.legend
    if legend is not None and urlparse(legend.url).path not in ("", "/"):
        return legend.url, legend.format, legend.width, legend.height
    width, height = (legend.width, legend.height) if legend is not None else LEGEND_SIZE
    params = {"SERVICE": "WMS", "REQUEST": "GetLegendGraphic", "VERSION": V130, "LAYER": published.id,
              "STYLE": style.identifier, "FORMAT": "image/png", "WIDTH": width, "HEIGHT": height}
    if url_key:
        params["apikey"] = url_key
    return f"{base}/wms?{urlencode(params)}", "image/png", width, height


async def get_legend_graphic(request: Request, kvp: KVP) -> Response:
    runtime = get_runtime(request)
    found = requested_any(runtime.catalog, kvp.require("LAYER", "layer").strip(), key_hash(request), "layer")
    if isinstance(found, VectorMap):
        return await _vector_legend(runtime, found, kvp)
    published = requested_layer(runtime.catalog, found.id, key_hash(request), "layer")
    style = pick_style(published, layer_styles(published, style_book(runtime)), kvp.get("STYLE") or "")
    fmt = (kvp.get("FORMAT") or "image/png").strip().lower()
    if fmt != "image/png":
        raise wms_error("InvalidFormat", "format", "legends are PNG images")
    default_w, default_h = (style.legend.width, style.legend.height) if style.legend else LEGEND_SIZE
    width = positive_param(kvp, "WIDTH", 2048) if kvp.get("WIDTH") else default_w
    height = positive_param(kvp, "HEIGHT", 2048) if kvp.get("HEIGHT") else default_h
    body = await asyncio.to_thread(legend_image, style, width, height)
    return Response(body, media_type="image/png", headers=map_headers((published,), runtime.settings))


async def _vector_legend(runtime: Any, vector: VectorMap, kvp: KVP) -> Response:
    """A WMS-vector layer's legend: a swatch and title per rule of each relation's style (the
    default blue one for a relation without style), relations in drawing order, first on top.
    WIDTH/HEIGHT size the swatches (GeoServer's meaning); RULE picks one rule; SCALE keeps the rules
    drawn at that scale denominator."""
    fmt = (kvp.get("FORMAT") or "image/png").strip().lower()
    if fmt != "image/png":
        raise wms_error("InvalidFormat", "format", "legends are PNG images")
    width = positive_param(kvp, "WIDTH", 512) if kvp.get("WIDTH") else VECTOR_SWATCH[0]
    height = positive_param(kvp, "HEIGHT", 512) if kvp.get("HEIGHT") else VECTOR_SWATCH[1]
    rule = (kvp.get("RULE") or "").strip() or None
    scale_text = (kvp.get("SCALE") or "").strip()
    try:
        scale = float(scale_text) if scale_text else None
    except ValueError:
        raise wms_error("InvalidParameterValue", "scale", "SCALE must be a number") from None
    transparent = (kvp.get("TRANSPARENT") or "TRUE").strip().upper() != "FALSE"

    def draw() -> bytes:
        from PIL import Image

        from tileserver.render.vector_legend import draw_legend
        from tileserver.render.vector_map import default_style

        parts = []
        for item in vector.relations:
            style = item.style if item.style is not None else default_style(item.relation)
            try:
                parts.append(draw_legend(style, width, height, transparent=transparent, rule=rule, scale=scale))
            except ValueError:  # no rule of this style at that scale or of that name
                continue
        if not parts:
            raise wms_error("InvalidParameterValue", "rule" if rule else "scale",
                            "no rule of the layer's styles is left to show")
        canvas = np.zeros((sum(p.shape[0] for p in parts), max(p.shape[1] for p in parts), 4), np.uint8)
        if not transparent:
            canvas[...] = 255
        top = 0
        for part in parts:
            canvas[top:top + part.shape[0], :part.shape[1]] = part
            top += part.shape[0]
        buf = io.BytesIO()
        Image.fromarray(canvas, "RGBA").save(buf, format="PNG", compress_level=6)
        return buf.getvalue()

    body = await asyncio.to_thread(draw)
    return Response(body, media_type="image/png", headers=map_headers((vector,), runtime.settings))
