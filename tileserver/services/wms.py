"""WMS 1.3.0 (OGC 06-042) and 1.1.1: GetCapabilities, GetMap, GetFeatureInfo, GetLegendGraphic.

Maps go through `tileserver.render.pipeline`. Where the standard, the OGC conformance suite and
ROK4 differ, the suite wins (PEERS-AND-TESTS §2.3): StyleNotDefined / InvalidCRS / InvalidFormat
codes (ROK4 says InvalidParameterValue), a BBOX without data is an empty image, GetMap without
VERSION is an exception, EXCEPTIONS=INIMAGE|BLANK are honoured. HTTP status: 400 for client
mistakes, 501 for an unknown operation, 502/503 for storage trouble, 503 when every render
slot is busy (with Retry-After); INIMAGE and BLANK answer 200 with the image, as clients expect.

Axis order: in 1.3.0 a BBOX follows the CRS definition (EPSG:4326, EPSG:4258, EPSG:3035 are
northing first; CRS:84 and IGNF geographic CRSs are lon/lat); in 1.1.1 it is always x/y.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tileserver.runtime import get_runtime
from tileserver.services.crs import V130
from tileserver.services.ows import KVP, OWSException, echo
from tileserver.services.policy import ServiceError, error_response, register
from tileserver.services.wms_capabilities import get_capabilities, negotiate
from tileserver.services.wms_featureinfo import get_feature_info
from tileserver.services.wms_getmap import get_map, image_exception
from tileserver.services.wms_legend import get_legend_graphic
from tileserver.services.wms_request import (
    SERVICE,
    ImageFrame,
    exception_response,
    image_frame,
    render_report,
    version_of,
    wms_error,
)

# --------------------------------------------------------------------------- dispatch


OPERATIONS = {"getcapabilities": "GetCapabilities", "capabilities": "GetCapabilities", "getmap": "GetMap",
              "map": "GetMap", "getfeatureinfo": "GetFeatureInfo", "feature_info": "GetFeatureInfo",
              "getlegendgraphic": "GetLegendGraphic"}


async def endpoint(request: Request) -> Response:
    kvp: KVP | None = None
    version = V130
    frame = ImageFrame("XML")
    try:
        kvp = KVP.from_request(request)
        runtime = get_runtime(request)
        try:
            version = version_of(kvp) or V130
        except OWSException:
            pass  # reported below, by the operation that needs it
        service = kvp.get("SERVICE")
        operation = kvp.require("REQUEST", "request").strip()
        name = OPERATIONS.get(operation.lower())
        if name == "GetCapabilities":
            version = negotiate(kvp.get("VERSION") or kvp.get("WMTVER"))
        # 06-042 §7.2.2 asks SERVICE of GetCapabilities only; §7.3-7.4 list GetMap's and
        # GetFeatureInfo's parameters without it, and OGC's suite and some clients send none
        if service is None or not service.strip():
            if name == "GetCapabilities":
                raise wms_error("MissingParameterValue", "service", "parameter SERVICE is required")
        elif service.strip().upper() != "WMS":
            raise wms_error("InvalidParameterValue", "service", f"SERVICE must be WMS, not {echo(service)}")
        if name is None:
            raise wms_error("OperationNotSupported", "request", f"unknown operation {echo(operation)}", 501)
        if name == "GetCapabilities":
            return await get_capabilities(request, kvp)
        if name == "GetLegendGraphic":
            return await get_legend_graphic(request, kvp)
        asked = version_of(kvp)
        if asked is None:
            raise wms_error("MissingParameterValue", "version", f"parameter VERSION is required for {name}")
        version = asked
        if name == "GetMap":
            frame = image_frame(kvp, runtime.settings)
            return await get_map(request, kvp, version)
        return await get_feature_info(request, kvp, version)
    except ServiceError as exc:
        if frame.mode != "XML" and exc.status < 500:
            return error_response(request, exc, lambda _, error: image_exception(error, frame))
        return error_response(request, exc, lambda _, error: exception_response(error, version))


def routes() -> list[BaseRoute]:
    register(SERVICE, render_report)
    return [Route("/wms", endpoint, methods=["GET"])]
