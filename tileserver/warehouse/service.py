"""The warehouse of one server process: its repositories, where files go, and its job scheduler.

Created on the first `/api` request (the app mounts routes only), which also starts the
scheduler; `startup(runtime)` does the same at application start so queued work resumes after a
restart even before anyone calls the API.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

from .accounts import Accounts
from .entities import Entities
from .logins import LoginGate
from .pyramid_home import pyramids_root

if TYPE_CHECKING:
    from starlette.requests import Request

    from tileserver.runtime import Runtime

    from .jobs import Scheduler


class Warehouse:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.store = runtime.store
        self.accounts = Accounts(runtime.store)
        self.entities = Entities(runtime.store)
        self.scheduler: Scheduler | None = None
        self.logins = LoginGate(runtime.settings)

    def pyramid_url(self, name: str) -> str:
        """Descriptor of a pyramid this warehouse computes (stored data id = pyramid name)."""
        return f"{pyramids_root(self.settings)}/{name}.json"

    def start(self) -> None:
        if self.scheduler is None:
            from .jobs import Scheduler

            self.scheduler = Scheduler(self)
            self.scheduler.start()

    def wake(self) -> None:
        """New work queued: let the scheduler look now rather than at its next tick."""
        if self.scheduler is not None:
            self.scheduler.wake()


_lock = threading.Lock()


def _of_runtime(runtime: Runtime) -> Warehouse:
    with _lock:
        wh = getattr(runtime, "warehouse", None)
        if wh is None:
            wh = Warehouse(runtime)
            runtime.warehouse = wh  # type: ignore[attr-defined]
    return wh


def warehouse_of(request: Request) -> Warehouse:
    from tileserver.runtime import get_runtime

    wh = _of_runtime(get_runtime(request))
    wh.start()
    return wh


async def startup(runtime: Runtime) -> Warehouse:
    """For the application's lifespan: resume queued jobs without waiting for a request."""
    wh = _of_runtime(runtime)
    wh.start()
    await asyncio.sleep(0)
    return wh


async def shutdown(runtime: Runtime) -> None:
    wh = getattr(runtime, "warehouse", None)
    if wh is not None and wh.scheduler is not None:
        await wh.scheduler.stop()
    if wh is not None:
        wh.logins.close()
