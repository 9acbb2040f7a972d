"""The scheduler of one server process: a bounded pool of worker processes running the queued
jobs (checks and processing executions) outside the event loop, and recovery of jobs whose
worker died (server restart, crash): they end FAILURE with a log line, never half done.

Several server processes may share the store: claiming a job is atomic, so each runs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from . import lifecycle, usage
from .entities import Entity
from .status import FINAL, Status
from .worker import SETTINGS_ENV, settings_to_env

if TYPE_CHECKING:
    from .service import Warehouse

log = logging.getLogger("tileserver.warehouse.jobs")

WORKERS = int(os.environ.get("TILESERVER_WAREHOUSE_WORKERS", "2"))  # worker processes per server process
TICK = 1.0  # seconds between looks at the queue when nothing wakes the scheduler
RECOVER_EVERY = 5.0


class Scheduler:
    def __init__(self, wh: Warehouse, workers: int = WORKERS) -> None:
        self.wh = wh
        self.workers = max(1, workers)
        self.running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_recovery = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while not self.wh.store.closed:  # the application shut down
            try:
                if time.monotonic() - self._last_recovery >= RECOVER_EVERY:
                    self._last_recovery = time.monotonic()
                    await asyncio.to_thread(self.recover)
                while len(self.running) < self.workers:
                    job = await asyncio.to_thread(lifecycle.claim_next, self.wh.entities, os.getpid())
                    if job is None:
                        break
                    self.running[job.id] = asyncio.get_running_loop().create_task(self._run(job))
            except asyncio.CancelledError:
                raise
            except Exception:  # a busy or broken store must not stop the scheduler
                log.exception("warehouse scheduler")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)

    async def _run(self, job: Entity) -> None:
        try:
            env = {**os.environ, SETTINGS_ENV: settings_to_env(self.wh.settings)}
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tileserver.warehouse.worker", job.kind, job.id, env=env,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
            code = await process.wait()
            if self.wh.store.closed:  # the application shut down meanwhile: recovery settles it later
                return
            if code != 0:
                await asyncio.to_thread(lifecycle.interrupt, self.wh.store, self.wh.entities, job,
                                        f"worker process ended with status {code}", self.wh.settings)
            await asyncio.to_thread(lifecycle.settle, self.wh.store, self.wh.entities, job.kind, job.id,
                                    self.wh.settings)
        except Exception:
            log.exception("job %s %s", job.kind, job.id)
            await asyncio.to_thread(lifecycle.interrupt, self.wh.store, self.wh.entities, job,
                                    "the worker process could not run", self.wh.settings)
        finally:
            self.running.pop(job.id, None)
            self.wake()

    def recover(self) -> None:
        """Jobs whose worker is gone end FAILURE; claims of a dead server are released; what a dead
        worker or server left (an aborted output, a push's reservation) is cleared."""
        entities, store = self.wh.entities, self.wh.store
        now = time.time()
        self._clear_orphans(now)
        for kind in lifecycle.JOB_KINDS:
            for job in entities.find(kind, "json_extract(body, '$.status') IN ('WAITING', 'PROGRESS')"):
                state = job.body.get("job") or {}
                if job.id in self.running:
                    continue
                if job.body["status"] == Status.PROGRESS:
                    worker = state.get("worker") or {}
                    dead = (worker.get("host") == lifecycle.HOST and not lifecycle.pid_alive(worker.get("pid", 0))) \
                        or now - state.get("heartbeat", 0) > lifecycle.STALE_AFTER
                    if dead:
                        log.warning("%s %s: worker gone, job failed", kind, job.id)
                        lifecycle.interrupt(store, entities, job,
                                            "interrupted: its worker process stopped (server restart or crash)",
                                            self.wh.settings)
                    continue
                claim = state.get("claim")
                if claim and ((claim.get("host") == lifecycle.HOST and claim.get("pid") != os.getpid()
                               and not lifecycle.pid_alive(claim.get("pid", 0)))
                              or now - claim.get("at", now) > lifecycle.STALE_AFTER * 5):
                    lifecycle.release(entities, job)

    def _clear_orphans(self, now: float) -> None:
        entities, store = self.wh.entities, self.wh.store
        for job in entities.find(lifecycle.EXECUTION, "json_extract(body, '$.status') IN ('FAILURE', 'ABORTED')"
                                                      " AND json_extract(body, '$.job.worker') IS NOT NULL"):
            if job.id in self.running or not _gone((job.body.get("job") or {}).get("worker") or {},
                                                   (job.body.get("job") or {}).get("heartbeat", 0), now):
                continue
            lifecycle.settle(store, entities, job.kind, job.id, self.wh.settings)
        for reservation_id, body in usage.reservations(store):
            holder = entities.get(lifecycle.EXECUTION, body.get("holder", ""))
            if holder is not None:
                if holder.body.get("status") in FINAL:
                    usage.release(store, reservation_id)
                continue
            if _gone(body, body.get("at", now), now, usage.STALE_PUSH):  # a push whose server died
                usage.release(store, reservation_id)


def _gone(owner: dict, since: float, now: float, stale_after: float = lifecycle.STALE_AFTER) -> bool:
    """Whether the process `owner` ({host, pid}) is dead (same host), or silent for `stale_after`."""
    if owner.get("host") == lifecycle.HOST:
        return not lifecycle.pid_alive(int(owner.get("pid", 0) or 0))
    return now - float(since or 0) > stale_after
