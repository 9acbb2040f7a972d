"""WMS GetLegendGraphic: a style's legend, and the LegendURL the capabilities advertise."""

from __future__ import annotations

import asyncio
from urllib.parse import urlencode, urlparse

from starlette.requests import Request
from starlette.responses import Response

from tileserver.catalog import PublishedLayer
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
    requested_layer,
    wms_error,
)

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
    published = requested_layer(runtime.catalog, kvp.require("LAYER", "layer").strip(), key_hash(request), "layer")
    style = pick_style(published, layer_styles(published, style_book(runtime)), kvp.get("STYLE") or "")
    fmt = (kvp.get("FORMAT") or "image/png").strip().lower()
    if fmt != "image/png":
        raise wms_error("InvalidFormat", "format", "legends are PNG images")
    default_w, default_h = (style.legend.width, style.legend.height) if style.legend else LEGEND_SIZE
    width = positive_param(kvp, "WIDTH", 2048) if kvp.get("WIDTH") else default_w
    height = positive_param(kvp, "HEIGHT", 2048) if kvp.get("HEIGHT") else default_h
    body = await asyncio.to_thread(legend_image, style, width, height)
    return Response(body, media_type="image/png", headers=map_headers((published,), runtime.settings))
