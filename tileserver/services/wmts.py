"""WMTS 1.0.0 (OGC 07-057r7): KVP and RESTful GetCapabilities, GetTile and GetFeatureInfo.

Every layer is offered in its grid under two ids, as ROK4 does: the full grid (`PM`) and the
published range `<TMS>_<top>_<bottom>` (`PM_0_15`). Inside the advertised TileMatrixSetLimits
every tile is an image (a nodata tile where no slab exists); a TileMatrix listed in a set but
not in the limits is unrestricted by WMTS rules, so its tiles are nodata images too. KVP and
REST go through the same validation, hence identical bytes and errors.
"""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.runtime import get_runtime
from tileserver.services.ows import KVP, OWSException, echo, key_hash, ows_endpoint, render_report
from tileserver.services.policy import register
from tileserver.services.wmts_capabilities import (
    capabilities_document,
    capabilities_response,
    get_capabilities,
)
from tileserver.services.wmts_featureinfo import get_feature_info
from tileserver.services.wmts_tiles import (
    CAPABILITIES_FORMATS,
    CAPABILITIES_PATH,
    EXTENSIONS,
    INFO_EXTENSIONS,
    POLICY,
    REST_PREFIX,
    SERVICE,
    TILE_PARAMETERS,
    VERSION,
    get_tile,
)

# --- endpoints ----------------------------------------------------------------------------------


def _kvp_params(kvp: KVP, names: tuple[str, ...]) -> dict[str, str | None]:
    return {name: kvp.get(name) for name in names}


@ows_endpoint
async def kvp_endpoint(request: Request) -> Response:
    kvp = KVP.from_request(request)
    service = kvp.require("SERVICE", "service")
    if service.strip().lower() != SERVICE:
        raise OWSException("InvalidParameterValue", "service", f"SERVICE must be WMTS, not {echo(service)}")
    operation = kvp.require("REQUEST", "request").strip()
    name = operation.lower()
    if name not in ("getcapabilities", "gettile", "getfeatureinfo"):
        code, locator = POLICY["unknown_request"]
        raise OWSException(code, locator, f"unknown operation {echo(operation)}")
    # AcceptVersions negotiates; a VERSION naming another one is refused, GetCapabilities included (ROK4)
    version = kvp.get("VERSION")
    if version is not None and version.strip() != VERSION:
        raise OWSException(
            "InvalidParameterValue", "version", f"VERSION must be {VERSION}, not {echo(version)}"
        )
    if name == "getcapabilities":
        return await get_capabilities(request, kvp)
    key = key_hash(request, kvp)
    if name == "gettile":
        return await get_tile(request, _kvp_params(kvp, TILE_PARAMETERS), key)
    return await get_feature_info(request, _kvp_params(kvp, TILE_PARAMETERS + ("InfoFormat", "I", "J")), key)


def _accepts_xml(accept: str | None) -> bool:
    if not accept or not accept.strip():
        return True
    for item in accept.split(","):
        media, _, params = item.strip().partition(";")
        quality = re.search(r"q\s*=\s*([0-9.]+)", params)
        if quality and float(quality.group(1) or 0) == 0:
            continue
        if media.strip().lower() in ("*/*", "application/*", "text/*", *CAPABILITIES_FORMATS):
            return True
    return False


@ows_endpoint
async def rest_capabilities(request: Request) -> Response:
    if not _accepts_xml(request.headers.get("accept")):
        raise OWSException("InvalidParameterValue", "Accept", "capabilities are only available as XML", 406)
    return capabilities_response(request, capabilities_document(request))


def _rest_params(request: Request) -> dict[str, str | None]:
    path = request.path_params
    ext = path["ext"].lower()
    return {
        "ext": ext,
        "layer": path["layer"],
        "style": path["style"],
        "format": EXTENSIONS.get(ext, f".{ext}"),
        "TileMatrixSet": path["tms"],
        "TileMatrix": path["z"],
        "TileRow": path["row"],
        "TileCol": path["col"],
    }


@ows_endpoint
async def rest_tile(request: Request) -> Response:
    params = _rest_params(request)
    del params["ext"]
    return await get_tile(request, params, key_hash(request))


@ows_endpoint
async def rest_feature_info(request: Request) -> Response:
    path = request.path_params
    params = _rest_params(request)
    # REST FeatureInfo URLs carry no tile format: take the layer's (an unknown layer fails on `layer` first)
    key = key_hash(request)
    layer = get_runtime(request).catalog.get(path["layer"], SERVICE, key)
    params["format"] = layer.format.mime if layer is not None else "-"
    params["InfoFormat"] = INFO_EXTENSIONS.get(params.pop("ext") or "", f".{path['ext']}")
    params["I"], params["J"] = path["i"], path["j"]
    return await get_feature_info(request, params, key)


def routes() -> list[BaseRoute]:
    register(SERVICE, render_report)
    return [
        Route("/wmts", kvp_endpoint, methods=["GET"]),
        Route(CAPABILITIES_PATH, rest_capabilities, methods=["GET"]),
        Route(
            f"{REST_PREFIX}/{{layer}}/{{style}}/{{tms}}/{{z}}/{{row}}/{{col}}.{{ext}}",
            rest_tile,
            methods=["GET"],
        ),
        Route(
            f"{REST_PREFIX}/{{layer}}/{{style}}/{{tms}}/{{z}}/{{row}}/{{col}}/{{j}}/{{i}}.{{ext}}",
            rest_feature_info,
            methods=["GET"],
        ),
    ]
