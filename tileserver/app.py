"""Starlette application assembly: routes of every service, lifespan opening storage and store once."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from tileserver.settings import Settings, load_settings

log = logging.getLogger("tileserver.app")

# modules exposing `routes() -> list[BaseRoute]`, mounted in this order
SERVICE_MODULES = (
    "tileserver.services.health",
    "tileserver.services.wmts",
    "tileserver.services.tms",
    "tileserver.services.ogcapi",
    "tileserver.services.wms",
    "tileserver.publication.admin",
    "tileserver.warehouse.api",
    "tileserver.services.home",
)


def collect_routes() -> list[BaseRoute]:
    routes: list[BaseRoute] = []
    for name in SERVICE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that service is not part of this build
            raise
        routes.extend(module.routes())
    return routes


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or load_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        from tileserver.publication.store import PublicationStore
        from tileserver.runtime import Runtime
        from tileserver.storage import Storage

        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        store = PublicationStore(settings.resolved_store_path)
        async with Storage(settings) as storage:
            runtime = Runtime(settings, store, storage)
            if settings.demo:
                from tileserver.demo import ensure_demo

                await ensure_demo(runtime)
            await runtime.refresh(force=True)
            runtime.start_watching()
            app.state.runtime = runtime
            try:
                yield
            finally:
                await runtime.stop()
                store.close()

    from tileserver.http import middleware

    app = Starlette(routes=collect_routes(), lifespan=lifespan, middleware=middleware(settings))
    app.state.settings = settings
    return app
