"""Status transitions of the warehouse's jobs (check executions and processing executions), shared
by the server (claims, recovery, aborts) and the worker processes (start, heartbeat, end).

A job is WAITING until a server process claims it and starts a worker, PROGRESS while the worker
runs and beats, then SUCCESS, FAILURE or ABORTED. The end of a job updates what it works for:
an upload becomes CLOSED or UNSTABLE once all its checks ended; an execution's output stored data
becomes GENERATED only on SUCCESS, otherwise UNSTABLE with its partial pyramid removed.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from tileserver.publication.store import PublicationStore
from tileserver.settings import Settings

from .accounts import now_iso
from .entities import Entities, Entity, Gone
from .pyramid_home import remove_pyramid

CHECK = "check_execution"
EXECUTION = "processing_execution"
JOB_KINDS = (CHECK, EXECUTION)
FINAL = ("SUCCESS", "FAILURE", "ABORTED")
HOST = socket.gethostname()
STALE_AFTER = 60.0  # seconds without a heartbeat before another process declares a job dead


def log_line(text: str) -> str:
    return f"{now_iso()} {text}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_next(entities: Entities, pid: int) -> Entity | None:
    """Take the oldest unclaimed WAITING job for this server process (atomic across processes)."""
    for kind in JOB_KINDS:
        for candidate in entities.find(kind, "json_extract(body, '$.status') = 'WAITING'"
                                             " AND json_extract(body, '$.job.claim') IS NULL"):
            try:
                entity = entities.update(kind, candidate.id, lambda body: _take(body, pid))
            except Gone:
                continue
            if (entity.body.get("job") or {}).get("claim", {}).get("pid") == pid \
                    and entity.body["job"]["claim"].get("host") == HOST and entity.body.get("status") == "WAITING":
                return entity
    return None


def _take(body: dict[str, Any], pid: int) -> bool:
    job = body.setdefault("job", {})
    if body.get("status") != "WAITING" or job.get("claim"):
        return False
    job["claim"] = {"host": HOST, "pid": pid, "at": time.time()}
    return True


def begin(entities: Entities, kind: str, job_id: str, pid: int) -> Entity | None:
    """Worker side: WAITING → PROGRESS; None when the job was aborted or taken meanwhile."""
    started: list[bool] = []

    def start(body: dict[str, Any]) -> bool:
        ok = body.get("status") == "WAITING"
        if ok:
            body["status"] = "PROGRESS"
            body["start"] = now_iso()
            body.setdefault("job", {}).update(worker={"host": HOST, "pid": pid}, heartbeat=time.time())
        started.append(ok)
        return ok

    try:
        entity = entities.update(kind, job_id, start)
    except Gone:
        return None
    return entity if started and started[0] else None


def beat(entities: Entities, kind: str, job_id: str) -> str:
    """Worker side: record that it is alive; returns the current status (ABORTED means stop)."""
    status: list[str] = []

    def touch(body: dict[str, Any]) -> bool:
        status.append(body.get("status", ""))
        if body.get("status") != "PROGRESS":
            return False
        body.setdefault("job", {})["heartbeat"] = time.time()
        return True

    try:
        entities.update(kind, job_id, touch)
    except Gone:
        return "ABORTED"
    return status[0] if status else "ABORTED"


def finish(store: PublicationStore, entities: Entities, kind: str, job_id: str, status: str, settings: Settings,
           lines: list[str] = (), result: dict[str, Any] | None = None, only_from: tuple[str, ...] = ("PROGRESS",),
           ) -> bool:
    """End a job with `status` if it is still in one of `only_from`; apply the consequences."""
    entities.append_logs(job_id, lines)

    def end(body: dict[str, Any]) -> bool:
        if body.get("status") not in only_from:
            return False
        body["status"] = status
        body["finish"] = now_iso()
        if result:
            body.setdefault("result", {}).update(result)
        return True

    try:
        entity = entities.update(kind, job_id, end)
    except Gone:
        return False
    if entity.body.get("status") != status or entity.body.get("finish") is None:
        return False
    if kind == CHECK:
        _check_ended(entities, entity)
    else:
        execution_ended(store, entities, entity, settings)
    return True


def interrupt(store: PublicationStore, entities: Entities, entity: Entity, reason: str, settings: Settings) -> bool:
    return finish(store, entities, entity.kind, entity.id, "FAILURE", settings, [log_line(reason)],
                  only_from=("WAITING", "PROGRESS"))


def _check_ended(entities: Entities, check: Entity) -> None:
    """The upload is CLOSED when every check of this round passed, UNSTABLE when one failed."""
    upload_id = check.body["upload"]["_id"]
    siblings = [e for e in entities.find(CHECK, "json_extract(body, '$.upload._id') = ?", (upload_id,))
                if e.body.get("round") == check.body.get("round")]
    if any(e.body.get("status") not in FINAL for e in siblings):
        return
    passed = all(e.body.get("status") == "SUCCESS" for e in siblings)
    found: dict[str, Any] = {}
    for e in siblings:
        found.update(e.body.get("result") or {})

    def settle(body: dict[str, Any]) -> bool:
        if body.get("status") != "CHECKING" or body.get("round") != check.body.get("round"):
            return False
        body["status"] = "CLOSED" if passed else "UNSTABLE"
        body.update({k: v for k, v in found.items() if k in ("extent", "type_infos")})
        return True

    try:
        entities.update("upload", upload_id, settle)
    except Gone:
        pass


def execution_ended(store: PublicationStore, entities: Entities, execution: Entity, settings: Settings) -> None:
    """The output stored data follows its execution: GENERATED on success, else UNSTABLE and removed."""
    output = (execution.body.get("output") or {}).get("stored_data") or {}
    stored = store.get_stored_data(output.get("_id", ""))
    if stored is None:
        return
    if execution.body["status"] == "SUCCESS":
        summary = dict((execution.body.get("result") or {}).get("summary") or {})
        store.put_stored_data(stored.descriptor_url, summary, stored.name, "GENERATED", stored.type)
    else:
        remove_pyramid(stored.descriptor_url, settings)
        store.put_stored_data(stored.descriptor_url, {}, stored.name, "UNSTABLE", stored.type)


def release(entities: Entities, job: Entity) -> None:
    """Put a claimed job whose server died back in the queue (it never started)."""

    def unclaim(body: dict[str, Any]) -> bool:
        if body.get("status") != "WAITING":
            return False
        body.setdefault("job", {})["claim"] = None
        return True

    try:
        entities.update(job.kind, job.id, unclaim)
    except Gone:
        pass
