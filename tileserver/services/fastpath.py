"""The hot path: WMTS RESTful GetTile of a stored tile, answered without the router.

Under load the tile itself costs ~15 µs while routing over every service's routes, building
Request/Response objects and parsing an empty query cost several times that (benchmarks/RESULTS.md).
This middleware answers only the plain case — an open layer, its own grid and format, a tile the
pyramid has or a nodata tile — and hands everything else (errors, keys, rendering, storage
failures) to the ordinary route, which then does the full work and gives the protocol's answer.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from tileserver.services.ows import OWSException
from tileserver.services.tiles import TileNotFound, TileStorageError, empty_tile, native_tile
from tileserver.services.wmts import EXTENSIONS, REST_PREFIX, resolve_tile

_PREFIX = REST_PREFIX + "/"
_SEGMENTS = 6  # layer / style / tms / z / row / col.ext


class FastTiles:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and scope["path"].startswith(_PREFIX):
            if await self._answer(scope, send):
                return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, send: Send) -> bool:
        """True when the tile was sent; False hands the request to the ordinary route."""
        if scope["query_string"] or any(k == b"x-api-key" for k, _ in scope["headers"]):
            return False
        parts = scope["path"][len(_PREFIX) :].split("/")
        if len(parts) != _SEGMENTS or "%" in scope.get("raw_path", b"").decode("latin-1"):
            return False
        last, dot, ext = parts[5].rpartition(".")
        if not dot:
            return False
        app = scope.get("app")
        runtime = getattr(getattr(app, "state", None), "runtime", None)
        if runtime is None or not runtime.enabled:
            return False
        params = {
            "layer": parts[0],
            "style": parts[1],
            "format": EXTENSIONS.get(ext.lower(), ""),
            "TileMatrixSet": parts[2],
            "TileMatrix": parts[3],
            "TileRow": parts[4],
            "TileCol": last,
        }
        try:
            tile = resolve_tile(runtime.catalog, params, None)
        except OWSException:
            return False
        if tile.rendered or tile.published.restricted:
            return False
        try:
            answer = None
            if tile.published_level:
                answer = await native_tile(tile.published, tile.level, tile.col, tile.row)
            answer = answer or empty_tile(tile.published, tile.level)
        except (TileNotFound, TileStorageError):
            return False
        headers = [(b"content-type", answer.content_type.encode()), (b"content-length", str(len(answer.body)).encode())]
        cache_control = tile.published.layer.cache_control or runtime.settings.cache_control
        if cache_control:
            headers.append((b"cache-control", cache_control.encode()))
        if answer.content_encoding:
            headers.append((b"content-encoding", answer.content_encoding.encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
        return True

