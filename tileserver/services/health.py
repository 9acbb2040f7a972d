"""Health routes as ROK4 has them: liveness, what is loaded, event-loop state, storage reachability."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tileserver import __version__
from tileserver.render import compiled_kernels
from tileserver.runtime import get_runtime
from tileserver.services.policy import is_operator
from tileserver.storage import StorageError

NO_STORE = {"Cache-Control": "no-store"}


def _json(data: object, status: int = 200) -> Response:
    return JSONResponse(data, status_code=status, headers=NO_STORE)


async def health(request: Request) -> Response:
    runtime = get_runtime(request)
    return _json(
        {
            "status": "OK" if runtime.enabled else "DISABLED",
            "version": __version__,
            "pid": os.getpid(),
            "time": int(runtime.started_at),
        }
    )


def _operator(request: Request) -> bool:
    """Layer names (restricted ones too), storage paths and buckets are for the operator only."""
    return bool(is_operator(get_runtime(request).settings, request))


async def info(request: Request) -> Response:
    runtime = get_runtime(request)
    catalog = runtime.catalog
    cache = runtime.index_cache
    if not _operator(request):
        return _json(
            {
                "catalog_revision": catalog.revision,
                "layers": len(catalog.layers),
                "layers_not_served": len(catalog.errors),
            }
        )
    return _json(
        {
            "catalog_revision": catalog.revision,
            "layers": sorted(catalog.layers),
            "layers_not_served": catalog.errors,
            "pyramids": sorted({p.url for layer in catalog.layers.values() for p in layer.owners.values()}),
            "tile_matrix_sets": sorted({layer.tms.id for layer in catalog.layers.values()}),
            "styles": sorted(catalog.styles),
            "caches": {"slab_index": {"entries": len(cache), "hits": cache.hits, "misses": cache.misses}},
            "compiled_kernels": compiled_kernels(),
        }
    )


async def threads(request: Request) -> Response:
    loop = asyncio.get_running_loop()
    before = time.perf_counter()
    await asyncio.sleep(0)
    lag_ms = (time.perf_counter() - before) * 1000
    return _json(
        {
            "pid": os.getpid(),
            "event_loop": {"running": loop.is_running(), "tasks": len(asyncio.all_tasks(loop)), "lag_ms": round(lag_ms, 3)},
            "number": threading.active_count(),
            "threads": [{"name": t.name, "daemon": t.daemon, "alive": t.is_alive()} for t in threading.enumerate()],
        }
    )


async def depends(request: Request) -> Response:
    """Every pyramid descriptor of the published layers must be readable."""
    runtime = get_runtime(request)
    urls = sorted({p.url for layer in runtime.catalog.layers.values() for p in layer.owners.values()})

    async def check(url: str) -> tuple[str, str]:
        try:
            ok = await asyncio.wait_for(runtime.storage.exists(url), runtime.settings.storage_timeout)
        except (StorageError, TimeoutError) as exc:
            return url, f"unreachable: {exc}"
        return url, "OK" if ok else "missing"

    results = dict(await asyncio.gather(*(check(u) for u in urls)))
    storages: dict[str, dict[str, int]] = {}
    for url, state in results.items():
        kind = url.split("://", 1)[0] if "://" in url else "file"
        bucket = storages.setdefault(kind, {"ok": 0, "failing": 0})
        bucket["ok" if state == "OK" else "failing"] += 1
    healthy = all(state == "OK" for state in results.values())
    status = 200 if healthy else 503
    if not _operator(request):
        failing = sum(1 for state in results.values() if state != "OK")
        return _json({"status": "OK" if healthy else "DEGRADED", "pyramids": len(results), "failing": failing},
                     status)
    return _json({"status": "OK" if healthy else "DEGRADED", "storage": storages, "pyramids": results}, status)


def routes() -> list[BaseRoute]:
    return [
        Route("/healthcheck", health),
        Route("/healthcheck/info", info),
        Route("/healthcheck/threads", threads),
        Route("/healthcheck/depends", depends),
    ]
