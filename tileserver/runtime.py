"""Process-wide state of a running server: settings, storage, store, and the current Catalog.

The Catalog is rebuilt when the store's revision changes (a write here, or another process
writing the same store: seen by polling, and at once on PostgreSQL through LISTEN/NOTIFY) and
swapped in one assignment. While some layers
cannot be served (their storage failed, a mount is missing…), the watcher rebuilds it again with
back-off, so they come back by themselves once their storage answers; requests never wait for it.
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
        self._listener: asyncio.Task[None] | None = None
        self._dark_catalog: Catalog | None = None  # the catalog whose unserved layers are being retried
        self._dark_retry_at = 0.0
        self._dark_delay = 0.0
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
                await self.retry_dark_layers()
            except Exception:  # a bad store state must not kill the watcher
                log.exception("catalog refresh failed")

    async def retry_dark_layers(self, now: float | None = None) -> bool:
        """Rebuild the catalog when layers are not served and their retry is due; True if it ran.

        The first retry comes `layer_retry_interval` after the catalog was built, then the delay
        doubles up to `layer_retry_max_interval` while some layers stay dark."""
        catalog = self.catalog
        if not catalog.errors:
            self._dark_catalog = None
            return False
        now = time.monotonic() if now is None else now
        s = self.settings
        if catalog is not self._dark_catalog:  # built by a store change (or by the last retry)
            if self._dark_catalog is None or set(catalog.errors) != set(self._dark_catalog.errors):
                self._dark_delay = s.layer_retry_interval
            self._dark_catalog, self._dark_retry_at = catalog, now + self._dark_delay
            return False
        if now < self._dark_retry_at:
            return False
        dark = len(catalog.errors)
        rebuilt = await self.refresh(force=True)
        if rebuilt.errors:
            self._dark_delay = min(self._dark_delay * 2, s.layer_retry_max_interval)
            self._dark_catalog, self._dark_retry_at = rebuilt, time.monotonic() + self._dark_delay
            log.info("%d of %d layers still not served; next retry in %g s", len(rebuilt.errors), dark,
                     self._dark_delay)
        else:
            log.info("every layer is served again")
        return True

    async def _listen(self) -> None:
        """Refresh as soon as any process commits a catalog change (PostgreSQL NOTIFY). A lost
        connection is retried with back-off; polling covers the gap meanwhile."""
        delay = 1.0
        while True:
            changes = self.store.notifications()
            if changes is None:
                return
            try:
                async for _revision in changes:  # the first one: listening (changes before it are read now)
                    delay = 1.0
                    try:
                        await self.refresh()
                    except Exception:
                        log.exception("catalog refresh failed")
            except Exception as exc:
                log.warning("store change notifications lost (%s); polling every %g s until they are back",
                            exc, self.settings.store_poll_interval)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def start_watching(self) -> None:
        loop = asyncio.get_running_loop()
        self._watcher = loop.create_task(self._watch())
        if self.store.dialect == "postgresql":  # SQLite: polling only
            self._listener = loop.create_task(self._listen())

    async def stop(self) -> None:
        for task in (self._watcher, self._listener):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime
