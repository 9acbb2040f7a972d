"""Process-wide state of a running server: settings, storage, store, and the current Catalog.

The Catalog is rebuilt when the store's revision changes (a write here, or another process
writing the same SQLite file, seen by polling) and swapped in one assignment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from tileserver.catalog import Catalog, PyramidPool, build_catalog
from tileserver.pyramid import SlabIndexCache
from tileserver.settings import Settings
from tileserver.storage import Storage

if TYPE_CHECKING:
    from starlette.requests import Request

    from tileserver.publication.store import PublicationStore

log = logging.getLogger("tileserver.runtime")


class Runtime:
    def __init__(self, settings: Settings, store: PublicationStore, storage: Storage) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.index_cache = SlabIndexCache(settings.index_cache_size, settings.index_cache_ttl)
        self.pool = PyramidPool(storage, self.index_cache, settings.tms_directory)
        self.catalog = Catalog(revision=-1, layers={})
        self.started_at = time.time()
        self._refresh_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self.enabled = True  # PUT /admin/on|off

    async def refresh(self, force: bool = False) -> Catalog:
        """Rebuild the catalog if the store changed since the last build."""
        async with self._refresh_lock:
            revision = await asyncio.to_thread(self.store.revision)
            if revision == self.catalog.revision and not force:
                return self.catalog
            snapshot = await asyncio.to_thread(self.store.snapshot)
            catalog = await build_catalog(
                snapshot.revision,
                snapshot.layers,
                self.pool,
                restricted=snapshot.restricted,
                key_access=snapshot.key_access,
                styles=snapshot.styles,
            )
            self.catalog = catalog
            log.info("catalog revision %s: %d layers served", catalog.revision, len(catalog.layers))
            return catalog

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.store_poll_interval)
            try:
                await self.refresh()
            except Exception:  # a bad store state must not kill the watcher
                log.exception("catalog refresh failed")

    def start_watching(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime
