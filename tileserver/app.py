"""Starlette application assembly: routes of every service, lifespan opening storage and store once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from tileserver.services.policy import apply_forwarded
from tileserver.settings import Settings, load_settings

if TYPE_CHECKING:
    from tileserver.fastpath import Answer

log = logging.getLogger("tileserver.app")

# modules exposing `routes() -> list[BaseRoute]`, mounted in this order
SERVICE_MODULES = (
    "tileserver.services.health",
    "tileserver.services.wmts",
    "tileserver.services.vectorstyles",  # before tms: its /tms{path} catches what is left
    "tileserver.services.tms",
    "tileserver.services.wfs",
    "tileserver.services.features",  # before ogcapi: its /ogcapi/{rest:path} catches what is left
    "tileserver.services.ogcapi",
    "tileserver.services.wms",
    "tileserver.publication.admin",
    "tileserver.warehouse.api",
    "tileserver.observability",  # /metrics
    "tileserver.services.home",
)


def _optional(name: str) -> ModuleType | None:
    """A module of an optional part; None when that part is not in this build."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            return None
        raise


def collect_routes() -> list[BaseRoute]:
    routes: list[BaseRoute] = []
    for name in SERVICE_MODULES:
        module = _optional(name)
        if module is not None:
            routes.extend(module.routes())
    return routes


class TileServerApp(Starlette):
    """The Starlette application, with stored WMTS tiles answered before its middleware stack."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from tileserver.fastpath import FastTiles
        from tileserver.observability import RequestMetrics

        self._tiles = FastTiles(super().__call__, self.state)
        self._fast = RequestMetrics(self._tiles)  # fast tiles are counted too

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            apply_forwarded(scope, self.state.settings)
        await self._fast(scope, receive, send)

    def answer_tile(self, method: str, path: str, raw_path: bytes, query: bytes, headers: list[tuple[bytes, bytes]],
                    later: bool = True) -> Answer | Coroutine[Any, Any, Answer] | None:
        """A stored tile answered by the server's HTTP protocol without an ASGI cycle: at once, or
        as a coroutine reading it (None: the cycle takes it), counted in the metrics as the ASGI
        path counts it."""
        started = time.perf_counter()
        answer = self._tiles.answer_tile(method, path, raw_path, query, headers, later)
        if answer is None:
            return None
        if isinstance(answer, tuple):  # an Answer
            self._fast.record(path, answer.status, time.perf_counter() - started)
            return answer
        return self._recorded(answer, path, started)

    async def _recorded(self, pending: Coroutine[Any, Any, Answer], path: str, started: float) -> Answer:
        answer = await pending
        self._fast.record(path, answer.status, time.perf_counter() - started)
        return answer


def share_caches(runtime: Any, settings: Settings) -> None:
    """Size this worker's caches. `index_cache_size`, `decoded_tile_cache_bytes` and
    `object_tile_cache_bytes` are budgets of the whole server: with `--workers N` (no memory shared
    between worker processes) each worker holds 1/N of them, so the server's cache memory stays what
    the settings say whatever N is."""
    from tileserver.render.draw import DECODED_TILES

    workers = max(1, settings.workers)
    DECODED_TILES.resize(settings.decoded_tile_cache_bytes // workers)
    runtime.index_cache.tiles.resize(settings.object_tile_cache_bytes // workers)
    if settings.index_cache_size > 0:
        runtime.index_cache.maxsize = max(1, settings.index_cache_size // workers)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or load_settings()
    from tileserver.vector import postgis

    postgis.configure(settings.vector_db_url)  # PostGIS bases' credentials: never in the catalog

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        from tileserver.publication.store import PublicationStore
        from tileserver.runtime import Runtime
        from tileserver.storage import Storage

        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        store = PublicationStore(settings.resolved_store_url)
        async with Storage(settings) as storage:
            runtime = Runtime(settings, store, storage)
            share_caches(runtime, settings)
            if settings.demo:
                from tileserver.demo import ensure_demo

                await ensure_demo(runtime)
            await runtime.refresh(force=True)
            runtime.start_watching()
            app.state.runtime = runtime
            access = buffered_access_log()
            flusher = asyncio.get_running_loop().create_task(flush_periodically(access)) if access else None
            from tileserver import observability

            syncer = asyncio.get_running_loop().create_task(observability.sync_periodically(runtime))
            warehouse = _optional("tileserver.warehouse.service")
            if warehouse is not None:
                await warehouse.startup(runtime)  # queued executions resume without waiting for a request
            # startup objects (modules, grids, catalog) move out of the collector's sight: a full
            # collection over them took ~37 ms, a pause every request in flight then waits for
            gc.collect()
            gc.freeze()
            try:
                yield
            finally:
                if warehouse is not None:
                    await warehouse.shutdown(runtime)
                syncer.cancel()
                observability.process_exit()
                if flusher is not None and access is not None:
                    flusher.cancel()
                    access.flush()
                await runtime.stop()
                store.close()

    from tileserver.http import buffered_access_log, configure_server_logging, flush_periodically, middleware

    configure_server_logging(settings)

    app = TileServerApp(routes=collect_routes(), lifespan=lifespan, middleware=middleware(settings))
    app.state.settings = settings
    return app
