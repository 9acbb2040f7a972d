"""WMS GetMap: a map drawn by the render pipeline, or an exception in the image when asked."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tileserver.render.encode import blank_image, encode_image, exception_in_image, flattened_onto
from tileserver.render.errors import RenderError
from tileserver.render.gate import gate_for
from tileserver.render.model import Raster
from tileserver.render.pipeline import render_map
from tileserver.runtime import get_runtime
from tileserver.services.ows import KVP, key_hash
from tileserver.services.policy import ServiceError, map_headers, render_failure
from tileserver.services.wms_request import (
    PICTURE_FORMATS,
    ImageFrame,
    MapRequest,
    parse_map_request,
    wms_error,
)

# --------------------------------------------------------------------------- GetMap


def _encode(raster: Raster, req: MapRequest) -> tuple[bytes, str]:
    fmt = req.format
    assert fmt is not None
    quality = int(req.options["quality"]) if "quality" in req.options else None
    if fmt in PICTURE_FORMATS:
        return encode_image(raster.data, fmt, transparent=req.transparent, bgcolor=req.bgcolor, quality=quality)
    return encode_image(raster.data, fmt, nodata=raster.nodata, transparent=True if req.transparent else None,
                        grid=req.grid, tiff_compression=req.options.get("compression"))


async def _render(request: Request, runtime: Any, req: MapRequest) -> tuple[bytes, str]:
    settings = runtime.settings
    try:
        async with asyncio.timeout(settings.request_timeout):
            return await render_map(req.layers, req.grid, picture=req.format in PICTURE_FORMATS,
                                    gate=gate_for(runtime), max_tiles=settings.render_max_tiles,
                                    finish=lambda raster: _encode(raster, req),  # inside budget and deadline
                                    background=flattened_onto(req.format, req.transparent, req.bgcolor))
    except (RenderError, TimeoutError) as exc:
        raise render_failure(exc, "GetMap", settings.request_timeout) from None
    except ValueError as exc:  # the format cannot hold this data (float as ASC with bands…)
        raise wms_error("InvalidFormat", "format", str(exc)) from None


async def get_map(request: Request, kvp: KVP, version: str) -> Response:
    runtime = get_runtime(request)
    req = parse_map_request(kvp, runtime, key_hash(request), version, format_required=True)
    if req.vector_maps:
        from tileserver.services.wms_vector import render_mixed

        body, content_type = await render_mixed(request, runtime, req)
    else:
        body, content_type = await _render(request, runtime, req)
    headers = {"Content-Type": content_type}  # exact: no charset appended to text/asc
    headers.update(map_headers(req.served, runtime.settings))
    return Response(body, headers=headers)


def image_exception(exc: ServiceError, frame: ImageFrame) -> Response:
    assert frame.format is not None
    if frame.mode == "BLANK":
        body, mime = blank_image(frame.width, frame.height, frame.format, transparent=frame.transparent,
                                 bgcolor=frame.bgcolor)
    else:
        body, mime = exception_in_image(f"{exc.code}: {exc.message}", frame.width, frame.height, frame.format,
                                        transparent=frame.transparent, bgcolor=frame.bgcolor)
    return Response(body, media_type=mime)
