"""WMTS GetFeatureInfo: a pixel's values in a tile, or the answer of the WMS an EXTERNALWMS layer names."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from lxml import etree
from starlette.requests import Request
from starlette.responses import Response

from tileserver import transformers
from tileserver.runtime import get_runtime
from tileserver.services.numbers import shortest
from tileserver.services.ows import XML_DECLARATION, OWSException, echo
from tileserver.services.policy import map_headers
from tileserver.services.relay import relay_feature_info
from tileserver.services.stylebook import style_book
from tileserver.services.tiles import feature_info
from tileserver.services.wmts_tiles import (
    INFO_FORMATS,
    POLICY,
    TILE_PARAMETERS,
    TileRequest,
    integer_param,
    require_params,
    resolve_tile,
    same_mime,
)

# --- GetFeatureInfo -----------------------------------------------------------------------------


def _to_wgs84(crs: str) -> Any:
    return transformers.transformer(crs, "EPSG:4326")


def _pixel_lonlat(tile: TileRequest, i: int, j: int) -> tuple[float, float] | None:
    xmin, _, _, ymax = tile.matrix.tile_bbox(tile.col, tile.row)
    x = xmin + (i + 0.5) * tile.matrix.cell_size
    y = ymax - (j + 0.5) * tile.matrix.cell_size
    lon, lat = _to_wgs84(tile.grid.tms.crs).transform(x, y)
    return (lon, lat) if math.isfinite(lon) and math.isfinite(lat) else None


def _info_body(info_format: str, values: list[float] | None, tile: TileRequest, i: int, j: int) -> bytes:
    """ROK4's four renderings of pixel values; no data gives an empty list, not an error."""
    texts = [shortest(v) for v in values or ()]
    if info_format == "text/plain":
        return ",".join(texts).encode()
    if info_format == "text/html":
        items = "".join(f"<li>{t}</li>" for t in texts)
        return f"<html><body><p><b>Pixel value :</b></p><ul>{items}</ul></body></html>".encode()
    if info_format == "text/xml":
        pixel = etree.Element("Pixel")
        for t in texts:
            etree.SubElement(pixel, "Band").text = t
        return XML_DECLARATION + etree.tostring(pixel, encoding="UTF-8")
    features = []
    if values is not None:
        point = _pixel_lonlat(tile, i, j)
        geometry = {"type": "Point", "coordinates": list(point)} if point else None
        pixel = [v if math.isfinite(v) else None for v in values]  # JSON has no NaN
        features.append({"type": "Feature", "geometry": geometry, "properties": {"pixel": pixel}})
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


async def get_feature_info(request: Request, params: Mapping[str, str | None], key: str | None) -> Response:
    runtime = get_runtime(request)
    require_params(params, TILE_PARAMETERS + ("InfoFormat", "J", "I"))
    tile = resolve_tile(runtime.catalog, params, key, info=True, book=style_book(runtime))
    info_format = params["InfoFormat"] or ""
    info_format = next((f for f in INFO_FORMATS if same_mime(f, info_format)), info_format)
    if info_format not in INFO_FORMATS:
        raise OWSException(
            "InvalidParameterValue", "InfoFormat", f"InfoFormat {echo(info_format)} is not offered"
        )
    bounds = {"I": tile.matrix.tile_width, "J": tile.matrix.tile_height}
    point = {}
    for locator in ("I", "J"):
        value = integer_param(params[locator] or "", locator)
        if not 0 <= value < bounds[locator]:
            raise OWSException(
                POLICY["point_out_of_range"],
                locator,
                f"{locator} {value} is outside [0, {bounds[locator] - 1}]",
            )
        point[locator] = value
    i, j = point["I"], point["J"]
    if (tile.published.layer.get_feature_info or {}).get("type") == "EXTERNALWMS":  # ROK4: the tile as a map
        box = tile.matrix.tile_bbox(tile.col, tile.row)
        size = (tile.matrix.tile_width, tile.matrix.tile_height)
        relayed = await relay_feature_info(request, tile.published, tile.grid.tms.crs, box, size, i, j, info_format)
        relayed.headers.update(map_headers((tile.published,), runtime.settings))
        return relayed
    values = None
    if tile.published_level:
        values = await feature_info(tile.published, tile.level, tile.col, tile.row, i, j)
    media_type = "application/json" if info_format == "application/json" else info_format
    headers = map_headers((tile.published,), runtime.settings)
    return Response(_info_body(info_format, values, tile, i, j), media_type=media_type, headers=headers)
