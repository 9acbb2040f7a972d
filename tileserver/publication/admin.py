"""ROK4-compatible administration API: layers, services on/off, and API keys for restricted layers.

Routes and statuses follow ROK4 server 7 (`POST|PUT|DELETE /admin/layers/{id}`, 204/400/404/409,
`PUT /admin/on|off`, secret in `X-Rok4-Secret`), with three differences users asked for: changes
persist in the store (and reach every process sharing it), a layer is validated by opening its
pyramids *before* anything is stored, and errors are JSON problems naming the offending field.

Store reads are called directly (5–50 µs measured; WAL readers never wait for a writer); writes go
through a thread because they may wait for another process's write lock.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tileserver.catalog import PyramidPool, base_path, open_vector_base, publish_layer, vector_layer
from tileserver.publication.model import Layer, LayerError, parse_layer
from tileserver.publication.store import Conflict, NotFound, StoreError, StoreUnavailable, grant
from tileserver.pyramid import PyramidError
from tileserver.runtime import Runtime, get_runtime
from tileserver.services.policy import is_operator
from tileserver.settings import Settings
from tileserver.storage import InvalidPathError, StorageError
from tileserver.storage.paths import is_within

log = logging.getLogger("tileserver.admin")

MAX_BODY = 1 << 20  # a layer descriptor is a few KiB
PROBLEM_TYPE = "application/problem+json"


class Problem(Exception):
    """An RFC 9457 problem answer, raised anywhere in a handler."""

    def __init__(self, status: int, detail: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.headers = headers

    def response(self) -> Response:
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
        }
        if self.field is not None:
            body["field"] = self.field
        return JSONResponse(body, status_code=self.status, media_type=PROBLEM_TYPE, headers=self.headers)


def _authorize(runtime: Runtime, request: Request) -> None:
    """Bearer token or ROK4's X-Rok4-Secret; with no token configured, only the demo's local clients."""
    allowed = is_operator(runtime.settings, request)
    if allowed:
        return
    if not runtime.settings.admin_token:
        if runtime.settings.demo:
            raise Problem(403, "without an admin token the demo's admin API answers local clients only")
        raise Problem(403, "admin API disabled: set TILESERVER_ADMIN_TOKEN")
    if allowed is None:
        raise Problem(
            401,
            "the admin API needs the admin token: 'Authorization: Bearer <token>' or 'X-Rok4-Secret: <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="tileserver admin"'},
        )
    raise Problem(403, "wrong admin token")


Handler = Callable[[Request, Runtime], Awaitable[Response]]


def _admin(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Every admin route: authorization first, problems rendered as JSON."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        runtime = get_runtime(request)
        try:
            _authorize(runtime, request)
            return await handler(request, runtime)
        except Problem as problem:
            return problem.response()
        except StoreUnavailable as exc:  # a read of a store database that cannot be reached
            return Problem(503, str(exc)).response()

    return endpoint


async def _json_body(request: Request) -> Any:
    """The request's JSON; reading stops past MAX_BODY bytes, so an oversized upload is never buffered."""
    too_large = Problem(413, f"the body must not exceed {MAX_BODY} bytes", "(body)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise too_large
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Problem(400, f"malformed JSON: {exc}", "(body)") from None


async def _changed(runtime: Runtime) -> None:
    """Make this process serve a committed change at once (others see it through their watcher)."""
    try:
        await runtime.refresh()
    except Exception:  # the change is stored; the watcher retries the rebuild
        log.exception("catalog refresh after an admin change failed")


# --- layers -----------------------------------------------------------------------------------


async def _layer_from_body(request: Request) -> Layer:
    return (await _layer_and_body(request))[0]


async def _layer_and_body(request: Request) -> tuple[Layer, Any]:
    data = await _json_body(request)
    try:
        return parse_layer(request.path_params["layer_id"], data), data
    except LayerError as exc:
        raise Problem(400, exc.message, exc.field) from None


_PYRAMID_FIELD = re.compile(r"^(pyramids\[\d+\])")


async def check_layer(layer: Layer, pool: PyramidPool) -> dict[str, dict[str, Any]]:
    """Open a layer's pyramids as the catalog will; LayerError names the field of what cannot be served.

    Returns each pyramid's summary by descriptor path (recorded as stored data). StorageError (the
    storage itself failing, not the layer's fault) propagates.
    """
    summaries: dict[str, dict[str, Any]] = {}
    if layer.wfs is not None:
        await check_vector_layer(layer)
        return summaries
    if layer.vector_map is not None:
        await check_vector_map(layer)
        return summaries
    for i, ref in enumerate(layer.pyramids):
        where = f"pyramids[{i}]"
        try:
            pyramid = await pool.get(ref.path, refresh=True)  # the descriptor may have changed on storage
        except (PyramidError, ValueError) as exc:
            raise LayerError(f"{where}.path", f"cannot open the pyramid: {exc}") from None
        levels = ", ".join(level.id for level in pyramid.descriptor.levels)
        for key in ("bottom_level", "top_level"):
            if pyramid.descriptor.level(getattr(ref, key)) is None:
                raise LayerError(f"{where}.{key}", f"level {getattr(ref, key)} is not in {ref.path} (levels: {levels})")
        if pyramid.matrix(ref.bottom_level).cell_size > pyramid.matrix(ref.top_level).cell_size:
            raise LayerError(f"{where}.bottom_level", "must be a finer level than top_level (or the same)")
        summaries[ref.path] = pyramid.summary()
    try:
        await publish_layer(layer, pool, layer.restricted)
    except (PyramidError, ValueError) as exc:  # InvalidPathError is a StorageError the layer is to blame for
        match = _PYRAMID_FIELD.match(str(exc))
        field = match.group(1) if match else "bbox" if "bbox" in str(exc) else "pyramids"
        raise LayerError(field, str(exc)) from None
    return summaries


async def check_vector_layer(layer: Layer) -> None:
    """Open a WFS layer's base as the catalog will; LayerError when it or a relation is missing."""
    assert layer.wfs is not None
    try:
        base = await asyncio.to_thread(open_vector_base, layer.wfs.base)
    except Exception as exc:  # whatever the reader raises on a missing or unreadable file
        raise LayerError("wfs.base", f"cannot open the vector base: {exc}") from None
    try:
        await asyncio.to_thread(vector_layer, layer, base)
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        raise LayerError(field, message) from None
    finally:
        base.close()


async def check_vector_map(layer: Layer) -> None:
    """Open a WMS-vector layer's base and styles as the catalog will; LayerError names what is wrong."""
    from tileserver.catalog import vector_map

    assert layer.vector_map is not None
    try:
        base = await asyncio.to_thread(open_vector_base, layer.vector_map.base)
    except Exception as exc:  # whatever the reader raises on a missing or unreadable file
        raise LayerError("vector_map.base", f"cannot open the vector base: {exc}") from None
    try:
        await asyncio.to_thread(vector_map, layer, base)
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        raise LayerError(field if field.startswith("vector_map") else "vector_map", message or str(exc)) from None
    finally:
        base.close()


def _outside(settings: Settings, paths: list[tuple[str, str]]) -> Problem | None:
    """The problem for the first (path, field) outside the publish roots, if any."""
    roots = settings.publish_roots
    if "*" in roots:
        return None
    default_cluster = settings.s3_clusters[0].name if settings.s3_clusters else None
    for path, field in paths:
        try:
            if not is_within(path, roots, default_cluster):
                return Problem(400, f"{path} is outside the roots the admin API publishes from (setting admin_roots)", field)
        except InvalidPathError as exc:
            return Problem(400, str(exc), field)
    return None


async def _confine(runtime: Runtime, layer: Layer) -> None:
    """Refuse pyramids outside the publish roots: the token holder may publish pyramids, not make the
    server open any file or bucket it can reach. Descriptors are checked before they are read, then
    where each level's slabs live (a descriptor names its data directories or buckets)."""
    from tileserver.vector import postgis

    descriptors = [(ref.path, f"pyramids[{i}].path") for i, ref in enumerate(layer.pyramids)]
    for source, field in ((layer.wfs, "wfs.base"), (layer.vector_map, "vector_map.base")):
        if source is None:
            continue
        if postgis.is_postgis(source.base):  # a schema of the configured vector database only
            configured = runtime.settings.vector_db_url
            if not configured or postgis.public_url(source.base) != postgis.public_url(configured):
                raise Problem(400, "a PostGIS base must be a schema of the database vector_db_url", field)
            continue
        try:  # a vector base file is confined as a pyramid descriptor is
            descriptors.append((base_path(source.base), field))
        except ValueError as exc:
            raise Problem(400, str(exc), field) from None
    # resolving symlinks touches the disk
    if (problem := await asyncio.to_thread(_outside, runtime.settings, descriptors)) is not None:
        raise problem
    data: list[tuple[str, str]] = []
    for path, field in descriptors:
        try:
            pyramid = await runtime.pool.get(path, refresh=True)
        except (PyramidError, ValueError, StorageError):
            continue  # check_layer reports what cannot be opened, with its field
        for level in pyramid.descriptor.levels:
            data.append((pyramid.slab_path(level, 0, 0), field))
            if level.storage.mask_directory or level.storage.mask_prefix:
                data.append((pyramid.slab_path(level, 0, 0, mask=True), field))
    if (problem := await asyncio.to_thread(_outside, runtime.settings, data)) is not None:
        problem.detail = f"its slabs are outside the publish roots: {problem.detail}"
        raise problem


async def _check(runtime: Runtime, layer: Layer) -> dict[str, dict[str, Any]]:
    await _confine(runtime, layer)
    try:
        return await check_layer(layer, runtime.pool)
    except LayerError as exc:
        raise Problem(400, exc.message, exc.field) from None
    except StorageError as exc:
        raise Problem(503, f"storage unavailable: {exc}", "pyramids") from None


def _stored_layer(runtime: Runtime, request: Request) -> Layer:
    layer = runtime.store.get_layer(request.path_params["layer_id"])
    if layer is None:
        raise Problem(404, f"no layer {request.path_params['layer_id']}", "id")
    return layer


async def list_layers(request: Request, runtime: Runtime) -> Response:
    catalog = runtime.catalog
    return JSONResponse(
        [
            {
                "id": layer.id,
                "title": layer.title,
                "restricted": layer.restricted,
                "services": list(layer.services),
                "served": layer.id in catalog.layers,
                **({"error": catalog.errors[layer.id]} if layer.id in catalog.errors else {}),
            }
            for layer in runtime.store.list_layers()
        ]
    )


async def get_layer(request: Request, runtime: Runtime) -> Response:
    return JSONResponse(_stored_layer(runtime, request).to_descriptor())


async def create_layer(request: Request, runtime: Runtime) -> Response:
    from tileserver.demo import is_demo_layer

    layer = await _layer_from_body(request)
    existing = runtime.store.get_layer(layer.id)
    # the demo borrows ROK4's sample name SCAN1000: a user's own layer of that name takes it over
    replaces_demo = is_demo_layer(existing, runtime.settings.data_dir)
    if existing is not None and not replaces_demo:
        raise Problem(409, f"layer {layer.id} already exists (PUT replaces it)", "id")
    summaries = await _check(runtime, layer)
    if replaces_demo:
        await _store_write(runtime, runtime.store.put_layer, layer, summaries, False)
        log.info("admin: layer %s added in place of the demo layer", layer.id)
    else:
        await _store_write(runtime, runtime.store.add_layer, layer, False, summaries)
        log.info("admin: layer %s added", layer.id)
    return Response(status_code=204)


async def replace_layer(request: Request, runtime: Runtime) -> Response:
    layer, data = await _layer_and_body(request)
    _stored_layer(runtime, request)
    summaries = await _check(runtime, layer)
    keep_access = "restricted" not in data  # absent: the layer stays as open (or restricted) as it was
    await _store_write(runtime, runtime.store.put_layer, layer, summaries, keep_access)
    log.info("admin: layer %s replaced", layer.id)
    return Response(status_code=204)


async def delete_layer(request: Request, runtime: Runtime) -> Response:
    await _store_write(runtime, runtime.store.remove_layer, request.path_params["layer_id"])
    log.info("admin: layer %s removed", request.path_params["layer_id"])
    return Response(status_code=204)


async def _store_write(runtime: Runtime, write: Callable[..., Any], *args: Any, missing: int = 404) -> Any:
    """Writes run in a thread (they may wait for another process's write lock), then refresh.

    `missing` is the status of a NotFound: 404 when it is the URL's resource, 400 when the body names it."""
    try:
        result = await asyncio.to_thread(write, *args)
    except NotFound as exc:
        raise Problem(missing, str(exc), exc.field) from None
    except Conflict as exc:
        raise Problem(409, str(exc), exc.field) from None
    except StoreUnavailable as exc:
        raise Problem(503, str(exc)) from None
    except StoreError as exc:
        raise Problem(400, str(exc), exc.field) from None
    await _changed(runtime)
    return result


# --- services on/off --------------------------------------------------------------------------


def _switch(enabled: bool) -> Handler:
    async def switch(request: Request, runtime: Runtime) -> Response:
        runtime.enabled = enabled
        log.info("admin: broadcast services turned %s", "on" if enabled else "off")
        return Response(status_code=204)

    return switch


# --- API keys -----------------------------------------------------------------------------------


async def create_key(request: Request, runtime: Runtime) -> Response:
    data = await _json_body(request)
    if not isinstance(data, dict):
        raise Problem(400, "the body must be an object {name, layers}", "(root)")
    layers = data.get("layers")
    if isinstance(layers, str):  # "a,b" or "*", as the CLI takes it
        layers = [v.strip() for v in layers.split(",") if v.strip()]
    key_id, secret = await _store_write(runtime, runtime.store.create_key, data.get("name"), layers, missing=400)
    log.info("admin: API key %s created", key_id)
    body = {"id": key_id, "key": secret, "name": data["name"].strip(), "layers": grant(layers)}
    return JSONResponse(body, status_code=201)


async def list_keys(request: Request, runtime: Runtime) -> Response:
    return JSONResponse(runtime.store.list_keys())


async def revoke_key(request: Request, runtime: Runtime) -> Response:
    await _store_write(runtime, runtime.store.revoke_key, request.path_params["key_id"])
    log.info("admin: API key %s revoked", request.path_params["key_id"])
    return Response(status_code=204)


def routes() -> list[BaseRoute]:
    return [
        Route("/admin/layers", _admin(list_layers), methods=["GET"]),
        Route("/admin/layers/{layer_id}", _admin(get_layer), methods=["GET"]),
        Route("/admin/layers/{layer_id}", _admin(create_layer), methods=["POST"]),
        Route("/admin/layers/{layer_id}", _admin(replace_layer), methods=["PUT"]),
        Route("/admin/layers/{layer_id}", _admin(delete_layer), methods=["DELETE"]),
        Route("/admin/on", _admin(_switch(True)), methods=["PUT"]),
        Route("/admin/off", _admin(_switch(False)), methods=["PUT"]),
        Route("/admin/keys", _admin(list_keys), methods=["GET"]),
        Route("/admin/keys", _admin(create_key), methods=["POST"]),
        Route("/admin/keys/{key_id}", _admin(revoke_key), methods=["DELETE"]),
    ]
