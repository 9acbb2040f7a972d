"""The claim loop of one node process (a server, or a `tileserver worker` on any machine): a bounded
pool of job processes running the queued jobs (checks and processing executions) outside the event
loop, and recovery of jobs whose worker died (restart, crash, a node gone): a job whose job process
is dead (same node) or silent past the lease goes back to the queue, and ends FAILURE with a log
line after `worker_attempts` runs, never half done.

Any number of servers and workers may share the store: claiming a job is atomic, so each run is
one process's; a server with `warehouse_workers = 0` only recovers, the workers run the jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Protocol

from tileserver.publication.status import FINAL, JobStatus
from tileserver.publication.store import PublicationStore
from tileserver.settings import Settings

from . import lifecycle, usage
from .entities import Entities, Entity
from .worker import SETTINGS_ENV, settings_to_env

log = logging.getLogger("tileserver.warehouse.jobs")

TICK = 1.0  # seconds between looks at the queue when nothing wakes the scheduler
RECOVER_EVERY = 5.0  # or the lease when shorter
DIED = "interrupted: its worker process stopped (restart, crash or node gone)"


class Node(Protocol):
    """What a claim loop needs of its process: the warehouse of a server, or a worker's own."""

    store: PublicationStore
    entities: Entities
    settings: Settings


class Scheduler:
    def __init__(self, wh: Node, workers: int | None = None) -> None:
        self.wh = wh
        self.workers = max(0, wh.settings.warehouse_workers if workers is None else workers)
        lifecycle.set_node(wh.settings.worker_node)
        self.recover_every = min(RECOVER_EVERY, wh.settings.worker_lease)
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
                if time.monotonic() - self._last_recovery >= self.recover_every:
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
                await asyncio.to_thread(self._died, job, process.pid, code)
            await asyncio.to_thread(lifecycle.settle, self.wh.store, self.wh.entities, job.kind, job.id,
                                    self.wh.settings)
        except Exception:
            log.exception("job %s %s", job.kind, job.id)
            await asyncio.to_thread(lifecycle.interrupt, self.wh.store, self.wh.entities, job,
                                    "the worker process could not run", self.wh.settings)
        finally:
            self.running.pop(job.id, None)
            self.wake()

    def _died(self, job: Entity, pid: int, code: int) -> None:
        """The job process ended abnormally: its run is requeued (or failed), or, if it never began,
        the job fails."""
        settings = self.wh.settings
        ended = lifecycle.requeue_or_fail(self.wh.store, self.wh.entities, job, lifecycle.owner(pid),
                                          f"worker process ended with status {code}", settings,
                                          settings.worker_attempts)
        current = self.wh.entities.get(job.kind, job.id)
        if not ended and current is not None and current.body.get("status") == JobStatus.WAITING and \
                (current.body.get("job") or {}).get("claim") == (job.body.get("job") or {}).get("claim"):
            lifecycle.interrupt(self.wh.store, self.wh.entities, current,
                                f"worker process ended with status {code} before it began", settings)

    def recover(self) -> None:
        """Jobs whose worker is gone are requeued (or end FAILURE after their last attempt); claims
        of a dead loop are released; what a dead worker or server left (an aborted output, a push's
        reservation) is cleared."""
        entities, store, settings = self.wh.entities, self.wh.store, self.wh.settings
        lease = settings.worker_lease
        now = time.time()
        self._clear_orphans(now)
        for kind in lifecycle.JOB_KINDS:
            for job in entities.find(kind, "json_extract(body, '$.status') IN ('WAITING', 'PROGRESS')"):
                state = job.body.get("job") or {}
                if job.id in self.running:
                    continue
                if job.body["status"] == JobStatus.PROGRESS:
                    worker = state.get("worker") or {}
                    dead = (worker.get("host") == lifecycle.HOST and not lifecycle.pid_alive(worker.get("pid", 0))) \
                        or now - state.get("heartbeat", 0) > lease
                    if dead:
                        ended = lifecycle.requeue_or_fail(store, entities, job, worker, DIED, settings,
                                                          settings.worker_attempts)
                        log.warning("%s %s: worker %s gone, job %s", kind, job.id, worker,
                                    "requeued" if ended == JobStatus.WAITING else "failed" if ended else "left")
                    continue
                claim = state.get("claim")
                if claim and ((claim.get("host") == lifecycle.HOST and claim.get("pid") != os.getpid()
                               and not lifecycle.pid_alive(claim.get("pid", 0)))
                              or now - claim.get("at", now) > lease * 5):
                    lifecycle.release(entities, job)

    def _clear_orphans(self, now: float) -> None:
        entities, store = self.wh.entities, self.wh.store
        for job in entities.find(lifecycle.EXECUTION, "json_extract(body, '$.status') IN ('FAILURE', 'ABORTED')"
                                                      " AND json_extract(body, '$.job.worker') IS NOT NULL"):
            if job.id in self.running or not _gone((job.body.get("job") or {}).get("worker") or {},
                                                   (job.body.get("job") or {}).get("heartbeat", 0), now,
                                                   self.wh.settings.worker_lease):
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


def _gone(owner: dict, since: float, now: float, stale_after: float) -> bool:
    """Whether the process `owner` ({host, pid}) is dead (same host), or silent for `stale_after`."""
    if owner.get("host") == lifecycle.HOST:
        return not lifecycle.pid_alive(int(owner.get("pid", 0) or 0))
    return now - float(since or 0) > stale_after


@dataclass
class WorkerNode:
    """A `tileserver worker`'s own store handle: the claim loop with no server around it."""

    store: PublicationStore
    entities: Entities
    settings: Settings


async def run_worker(settings: Settings, jobs: int | None = None) -> None:
    """`tileserver worker`: claim and run jobs from the shared store until SIGTERM or SIGINT, then
    stop claiming and let the running jobs end (a deployment gives it the time of its longest job,
    or the lease requeues what it leaves)."""
    store = PublicationStore(settings.resolved_store_url)
    node = WorkerNode(store, Entities(store), settings)
    scheduler = Scheduler(node, jobs if jobs is not None else max(1, settings.warehouse_workers))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.warning("worker node %s: %d job process(es) on store %s", lifecycle.HOST, scheduler.workers, store.path)
    scheduler.start()
    try:
        await stop.wait()
        await scheduler.stop()
        running = list(scheduler.running.values())
        if running:
            log.warning("stopping: waiting for %d running job(s)", len(running))
            await asyncio.gather(*running, return_exceptions=True)
    finally:
        store.close()
