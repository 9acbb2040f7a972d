"""The external GetFeatureInfo relay: a layer whose get_feature_info is EXTERNALWMS is queried on
the WMS it names, for WMS and WMTS alike (a tile is a map of its bbox), under the outbound policy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from urllib.parse import urlencode

import aiohttp
from starlette.requests import Request
from starlette.responses import Response

from tileserver import outbound
from tileserver.catalog import PublishedLayer
from tileserver.runtime import get_runtime
from tileserver.services.crs import V130, axis_ordered, crs_info, normalise_crs
from tileserver.services.numbers import float_text
from tileserver.services.ows import OWSException, echo
from tileserver.services.policy import request_id

log = logging.getLogger("tileserver.wms")

EXTERNAL_TIMEOUT = 10.0  # seconds for a forwarded GetFeatureInfo
# info formats as clients and remote servers spell them → the one each stands for
INFO_ALIASES = {"application/vnd.ogc.gml": "text/xml", "application/xml": "text/xml", "text/json": "application/json",
                "application/geojson": "application/json"}


def _error(message: str) -> OWSException:
    return OWSException("NoApplicableCode", None, message, 502)


async def relay_feature_info(request: Request, published: PublishedLayer, crs: str, box: tuple[float, ...],
                             size: tuple[int, int], i: int, j: int, info_format: str,
                             extra: Mapping[str, str] | None = None) -> Response:
    """Relay a GetFeatureInfo to the WMS the layer names (asked in 1.3.0 axis order), as ROK4 does for a
    layer whose get_feature_info is EXTERNALWMS; WMS and WMTS alike (a tile is a map of its bbox).
    `box` is x/y ordered in `crs`; `extra` overrides parameters (the client's own INFO_FORMAT spelling…).

    A layer made through the warehouse `/api` (its get_feature_info carries `guarded`, set by
    warehouse.configurations; a record with a warehouse offering counts too, for records made before
    that flag) is fetched under the outbound policy: its user cannot make us reach our own network.
    Admin API and CLI layers are the operator's and may name any host. Either way only an answer of
    the requested info format is relayed, capped in size, with `nosniff` and a `sandbox` CSP: even a
    declared text/html (or XML that a browser renders as XHTML) from another host would otherwise
    run scripts on our origin."""
    runtime = get_runtime(request)
    settings = runtime.settings
    gfi = published.layer.get_feature_info or {}
    info = crs_info(normalise_crs(crs))
    if info is None:
        raise _error(f"{echo(crs)} cannot be named to a WMS")
    params = {
        "SERVICE": "WMS", "VERSION": V130, "REQUEST": "GetFeatureInfo", "LAYERS": gfi["layers"],
        "QUERY_LAYERS": gfi.get("query_layers") or gfi["layers"], "STYLES": "", "CRS": info.code,
        "BBOX": ",".join(float_text(v) for v in axis_ordered(box, info, V130)),
        "WIDTH": str(size[0]), "HEIGHT": str(size[1]), "I": str(i), "J": str(j),
        "INFO_FORMAT": info_format, "FEATURE_COUNT": "1", "FORMAT": "image/png", **(extra or {}),
    }
    configured = gfi.get("extra_query_params")
    if isinstance(configured, dict):
        params.update({str(k): str(v) for k, v in configured.items()})
    url = gfi["url"]
    url += ("&" if "?" in url else "?") + urlencode(params)
    if isinstance(configured, str) and configured.strip():
        url += "&" + configured.strip().lstrip("&?")
    guarded = gfi.get("guarded") is True or bool(
        await asyncio.to_thread(runtime.store.list_offerings, published.record_id))
    policy = outbound.OutboundPolicy.from_settings(settings) if guarded else None
    timeout = min(EXTERNAL_TIMEOUT, float(settings.request_timeout))
    remote = f"the remote WMS of layer {echo(published.id)}"
    try:
        async with outbound.client_session(policy, timeout) as session:
            answer = await outbound.fetch(session, url, policy, max_redirects=settings.outbound_max_redirects,
                                          max_bytes=settings.outbound_max_bytes)
    except outbound.OutboundRefused as exc:
        log.warning("%s external GetFeatureInfo of layer %s refused: %s", request_id(request), published.id, exc)
        raise _error(f"{remote} is not an allowed host") from None
    except (outbound.OutboundError, aiohttp.ClientError, TimeoutError) as exc:
        log.warning("%s external GetFeatureInfo %s failed: %s", request_id(request), gfi["url"], exc)
        raise _error(f"{remote} did not answer") from None
    if answer.status != 200:
        raise _error(f"{remote} answered HTTP {answer.status}")
    if INFO_ALIASES.get(answer.media_type, answer.media_type) != info_format:
        log.warning("%s external GetFeatureInfo of layer %s: %s instead of %s", request_id(request), published.id,
                    answer.describe(), info_format)
        raise _error(f"{remote} did not answer in {info_format}")
    content_type = answer.media_type + (f"; charset={answer.charset}" if answer.charset else "")
    return Response(answer.body, headers={"Content-Type": content_type, "X-Content-Type-Options": "nosniff",
                                          "Content-Security-Policy": "sandbox"})
