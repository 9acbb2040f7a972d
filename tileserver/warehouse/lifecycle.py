"""Status transitions of the warehouse's jobs (check executions and processing executions), shared
by the server (launch, claims, recovery, aborts) and the worker processes (start, heartbeat,
end): every change of a job's status is made here (statuses: `status.Status`).

A processing execution is CREATED, WAITING once launched (its estimated output reserved in the
datastore's quota), until a claim loop (a server's or a `tileserver worker`'s, on any node) claims
it and starts a job process, PROGRESS while that process runs and beats, then SUCCESS, FAILURE or
ABORTED. A job whose process died goes back to WAITING for another run (`requeue_or_fail`), at most
`worker_attempts` runs in all; a process whose job was requeued meanwhile finds it LOST and stops. The end of a job updates what it works
for: an upload becomes CLOSED or UNSTABLE once all its checks ended; an execution's output stored
data becomes GENERATED only on SUCCESS, otherwise UNSTABLE with its partial pyramid removed (an
existing vector base changed in place goes back to GENERATED: its changes are one transaction), and
its reservation is released. A worker killed mid-run (abort, quota crossed) cannot do that
itself: `settle` does it once its process is gone.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from typing import Any

from tileserver.publication.store import PublicationStore
from tileserver.settings import Settings

from .accounts import now_iso
from .entities import Entities, Entity, Gone
from .pyramid_home import remove_pyramid
from .status import FINAL as _FINAL
from .status import RUNNING, Status
from .usage import PYRAMIDS, holds, release_holder, reserve

CHECK = "check_execution"
EXECUTION = "processing_execution"
SHARD = "pyramid_shard"  # one share of an execution's bottom level (`worker_shards`), run by any worker
JOB_KINDS = (CHECK, SHARD, EXECUTION)  # claim order: a shard first, its execution waits for it
FINAL = _FINAL
HOST = socket.gethostname()  # this node's name in claims: `set_node` (settings.worker_node) may rename it
LOST = "LOST"  # what `beat` answers a job process whose job was given to another worker


def set_node(name: str) -> None:
    """Name this process's node in the claims it makes (one name per machine or pod): on the same
    node a dead process is seen at once by its pid, elsewhere by its missing heartbeats."""
    global HOST
    if name:
        HOST = name


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
    """Take the oldest unclaimed WAITING job for the worker loop `pid` of this node, in one write
    transaction: on SQLite the file's single writer makes it atomic, on PostgreSQL the row is taken
    with `FOR UPDATE SKIP LOCKED` (within the store's serialised writes, so no two loops take it)."""
    for kind in JOB_KINDS:
        entity = entities.take_first(kind, "json_extract(body, '$.status') = 'WAITING'"
                                           " AND json_extract(body, '$.job.claim') IS NULL",
                                     lambda body: _take(body, pid))
        if entity is not None:
            return entity
    return None


def _take(body: dict[str, Any], pid: int) -> bool:
    job = body.setdefault("job", {})
    if body.get("status") != Status.WAITING or job.get("claim"):
        return False
    job["claim"] = {"host": HOST, "pid": pid, "at": time.time()}
    return True


def begin(entities: Entities, kind: str, job_id: str, pid: int) -> Entity | None:
    """Worker side: WAITING → PROGRESS; None when the job was aborted or taken meanwhile."""
    started: list[bool] = []

    def start(body: dict[str, Any]) -> bool:
        ok = body.get("status") == Status.WAITING
        if ok:
            body["status"] = Status.PROGRESS
            body["start"] = now_iso()
            job = body.setdefault("job", {})
            job.update(worker={"host": HOST, "pid": pid}, heartbeat=time.time(), attempt=int(job.get("attempt", 0)) + 1)
        started.append(ok)
        return ok

    try:
        entity = entities.update(kind, job_id, start)
    except Gone:
        return None
    return entity if started and started[0] else None


def owner(pid: int) -> dict[str, Any]:
    """The `job.worker` a job process of this node records."""
    return {"host": HOST, "pid": pid}


def take_over(entities: Entities, kind: str, job_id: str, pid: int) -> bool:
    """Claim and begin an unclaimed WAITING job in the job process `pid` itself (an execution
    running a shard no worker took: none may be free, the execution holding the only one)."""
    taken: list[bool] = []

    def start(body: dict[str, Any]) -> bool:
        job = body.setdefault("job", {})
        ok = body.get("status") == Status.WAITING and not job.get("claim")
        if ok:
            body["status"] = Status.PROGRESS
            body["start"] = now_iso()
            job.update(claim={"host": HOST, "pid": pid, "at": time.time()}, worker=owner(pid), heartbeat=time.time(),
                       attempt=int(job.get("attempt", 0)) + 1)
        taken.append(ok)
        return ok

    try:
        entities.update(kind, job_id, start)
    except Gone:
        return False
    return bool(taken and taken[0])


def beat(entities: Entities, kind: str, job_id: str, pid: int | None = None) -> str:
    """Worker side: record that it is alive; returns the current status (ABORTED means stop), or
    LOST when the job was requeued meanwhile (this process was silent past the lease): stop too."""
    status: list[str] = []

    def touch(body: dict[str, Any]) -> bool:
        if pid is not None and (body.get("job") or {}).get("worker") != owner(pid):
            status.append(LOST)
            return False
        status.append(body.get("status", ""))
        if body.get("status") != Status.PROGRESS:
            return False
        body.setdefault("job", {})["heartbeat"] = time.time()
        return True

    try:
        entities.update(kind, job_id, touch)
    except Gone:
        return Status.ABORTED
    return status[0] if status else Status.ABORTED


def finish(store: PublicationStore, entities: Entities, kind: str, job_id: str, status: str, settings: Settings,
           lines: Iterable[str] = (), result: dict[str, Any] | None = None, only_from: tuple[str, ...] = (Status.PROGRESS,),
           pid: int | None = None) -> bool:
    """End a job with `status` if it is still in one of `only_from` (and, given `pid`, still run by
    that job process of this node); apply the consequences."""
    if pid is None:
        entities.append_logs(job_id, lines)

    def end(body: dict[str, Any]) -> bool:
        if body.get("status") not in only_from:
            return False
        if pid is not None and (body.get("job") or {}).get("worker") != owner(pid):
            return False  # requeued meanwhile: another worker's run counts
        body["status"] = status
        body["finish"] = now_iso()
        if result:
            body.setdefault("result", {}).update(result)
        return True

    try:
        entity = entities.update(kind, job_id, end)
    except Gone:
        return False
    if pid is not None and (entity.body.get("job") or {}).get("worker") == owner(pid):
        entities.append_logs(job_id, lines)
    if entity.body.get("status") != status or entity.body.get("finish") is None:
        return False
    if kind == CHECK:
        _check_ended(entities, entity)
    elif kind == EXECUTION:
        execution_ended(store, entities, entity, settings)
    return True


def interrupt(store: PublicationStore, entities: Entities, entity: Entity, reason: str, settings: Settings) -> bool:
    return finish(store, entities, entity.kind, entity.id, Status.FAILURE, settings, [log_line(reason)],
                  only_from=RUNNING)


def requeue_or_fail(store: PublicationStore, entities: Entities, entity: Entity, worker: dict[str, Any], reason: str,
                    settings: Settings, attempts: int) -> str:
    """A running job whose job process `worker` ({host, pid}) died: back to WAITING (unclaimed)
    while it has run fewer than `attempts` times, else FAILURE; either way with a log line. Returns
    the status it ends in ("" if it was no longer running, or run by another process). A requeued
    execution's rerun overwrites what the dead one wrote."""
    outcome: list[tuple[str, int]] = []

    def back(body: dict[str, Any]) -> bool:
        job = body.setdefault("job", {})
        attempt = int(job.get("attempt", 1) or 1)
        if body.get("status") != Status.PROGRESS or job.get("worker") != worker:
            outcome.append(("", attempt))
            return False
        if attempt >= attempts:
            outcome.append((Status.FAILURE, attempt))
            return False
        body["status"] = Status.WAITING
        body["job"] = {"claim": None, "attempt": attempt, "lost": job.get("worker")}
        outcome.append((Status.WAITING, attempt))
        return True

    try:
        entities.update(entity.kind, entity.id, back)
    except Gone:
        return ""
    if outcome and outcome[0][0] == Status.WAITING:
        entities.append_logs(entity.id, [log_line(f"{reason}: back in the queue after attempt {outcome[0][1]}"
                                                  f" of {attempts}")])
        return Status.WAITING
    if not outcome or outcome[0][0] != Status.FAILURE:
        return ""
    return Status.FAILURE if interrupt(store, entities, entity, f"{reason} (attempt {outcome[0][1]} of {attempts})",
                                       settings) else ""


def _check_ended(entities: Entities, check: Entity) -> None:
    """The upload is CLOSED when every check of this round passed, UNSTABLE when one failed."""
    upload_id = check.body["upload"]["_id"]
    siblings = [e for e in entities.find(CHECK, "json_extract(body, '$.upload._id') = ?", (upload_id,))
                if e.body.get("round") == check.body.get("round")]
    if any(e.body.get("status") not in FINAL for e in siblings):
        return
    passed = all(e.body.get("status") == Status.SUCCESS for e in siblings)
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
    """The output stored data follows its execution: GENERATED on success, else UNSTABLE and removed;
    either way the execution's quota reservation goes (a success's size counts instead)."""
    output = (execution.body.get("output") or {}).get("stored_data") or {}
    stored = store.get_stored_data(output.get("_id", ""))
    if stored is not None:
        if execution.body["status"] == Status.SUCCESS:
            summary = dict((execution.body.get("result") or {}).get("summary") or {})
            store.put_stored_data(stored.descriptor_url, summary, stored.name, "GENERATED", stored.type)
        elif output.get("existing"):  # a base changed in place: its transaction rolled back, it is as it was
            store.put_stored_data(stored.descriptor_url, stored.summary, stored.name, "GENERATED", stored.type)
        else:
            remove_pyramid(stored.descriptor_url, settings)
            store.put_stored_data(stored.descriptor_url, {}, stored.name, "UNSTABLE", stored.type)
    release_holder(store, execution.id)


def launch(store: PublicationStore, entities: Entities, execution: Entity, datastore: Any) -> tuple[Entity, bool]:
    """CREATED → WAITING, with the estimated output reserved in the datastore's pyramid quota
    (400 when it no longer fits). Returns (execution, whether this call launched it)."""
    size = int(execution.body.get("estimate") or 0)

    def still_created(db: Any) -> None:
        row = db.execute("SELECT json_extract(body, '$.status') FROM wh_entities WHERE id = ?",
                         (execution.id,)).fetchone()
        if row is None or row[0] != Status.CREATED:
            raise _NotCreated()

    try:
        reservation = reserve(store, datastore, PYRAMIDS, size, execution.id, still_created)
    except _NotCreated:
        current = entities.get(EXECUTION, execution.id)
        if current is None:
            raise Gone(execution.id) from None
        return current, False
    launched: list[bool] = []

    def queue(body: dict[str, Any]) -> bool:
        ok = body["status"] == Status.CREATED
        if ok:
            body["status"] = Status.WAITING
            body["launch"] = now_iso()
            body["job"] = {"claim": None}
        launched.append(ok)
        return ok

    try:
        updated = entities.update(EXECUTION, execution.id, queue)
    finally:
        if not launched or not launched[0]:
            from .usage import release as release_reservation

            release_reservation(store, reservation)
    if launched[0]:
        entities.append_logs(execution.id, [log_line("launched, waiting for a worker")])
    return updated, launched[0]


class _NotCreated(Exception):
    pass


def abort(store: PublicationStore, entities: Entities, execution: Entity, by: str,
          settings: Settings) -> tuple[Entity, str]:
    """→ ABORTED from any unfinished status; returns (execution, previous status). A WAITING or
    CREATED one ends at once (output removed); a running worker sees ABORTED at its next beat and
    kills itself, and `settle` removes what it wrote once its process is gone."""
    previous: list[str] = []

    def stop(body: dict[str, Any]) -> bool:
        previous.append(body["status"])
        if body["status"] in FINAL:
            return False
        body["status"] = Status.ABORTED
        body["finish"] = now_iso()
        return True

    updated = entities.update(EXECUTION, execution.id, stop)
    if previous[0] in FINAL:
        return updated, previous[0]
    entities.append_logs(execution.id, [log_line(f"aborted by {by}")])
    if previous[0] != Status.PROGRESS:
        execution_ended(store, entities, updated, settings)
    return updated, previous[0]


def stop_running(entities: Entities, kind: str, job_id: str, reason: str) -> bool:
    """Worker side, before it kills its process group: PROGRESS → FAILURE with `reason` logged; the
    consequences are left to `settle` (the writer may still be writing until the kill)."""
    entities.append_logs(job_id, [log_line(reason)])

    def end(body: dict[str, Any]) -> bool:
        if body.get("status") != Status.PROGRESS:
            return False
        body["status"] = Status.FAILURE
        body["finish"] = now_iso()
        return True

    try:
        return entities.update(kind, job_id, end).body.get("status") == Status.FAILURE
    except Gone:
        return False


def settle(store: PublicationStore, entities: Entities, kind: str, job_id: str, settings: Settings) -> None:
    """After a job's worker process is gone: an execution that ended without success but whose
    output is still CREATED or GENERATING (killed on abort or past its quota) has its partial
    pyramid removed, its stored data UNSTABLE and its reservation released."""
    if kind != EXECUTION:
        return
    execution = entities.get(EXECUTION, job_id)
    if execution is None or execution.body.get("status") not in (Status.FAILURE, Status.ABORTED):
        return
    output = (execution.body.get("output") or {}).get("stored_data") or {}
    stored = store.get_stored_data(output.get("_id", ""))
    if stored is not None and stored.status in ("CREATED", "GENERATING"):
        execution_ended(store, entities, execution, settings)
        return
    with store.reading() as db:
        held = holds(db, execution.id)
    if held:  # checked first: recovery calls this for every ended execution, writes only when needed
        release_holder(store, execution.id)


def release(entities: Entities, job: Entity) -> None:
    """Put a claimed job whose server died back in the queue (it never started)."""

    def unclaim(body: dict[str, Any]) -> bool:
        if body.get("status") != Status.WAITING:
            return False
        body.setdefault("job", {})["claim"] = None
        return True

    try:
        entities.update(job.kind, job.id, unclaim)
    except Gone:
        pass
