"""Every status change of the warehouse's records — jobs (check executions, processing executions,
pyramid shards), uploads, stored data, offerings — is made here, checked against one transition
table (`TRANSITIONS`; a change it does not list raises `ForbiddenTransition`). Shared by the server
(routes, launch, claims, recovery, aborts) and the worker processes (start, heartbeat, end).
Statuses: `tileserver.publication.status`.

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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tileserver.publication.status import FINAL as _FINAL
from tileserver.publication.status import RUNNING, JobStatus, OfferingStatus, StoredDataStatus, UploadStatus
from tileserver.publication.store import Connection, Offering, PublicationStore, StoredData
from tileserver.settings import Settings

from .accounts import now_iso
from .entities import Entities, Entity, Gone
from .pyramid_home import remove_pyramid
from .usage import PYRAMIDS, holds, release_holder, reserve

CHECK = "check_execution"
EXECUTION = "processing_execution"
SHARD = "pyramid_shard"  # one share of an execution's bottom level (`worker_shards`), run by any worker
UPLOAD = "upload"
STORED_DATA = "stored_data"
OFFERING = "offering"
JOB_KINDS = (CHECK, SHARD, EXECUTION)  # claim order: a shard first, its execution waits for it
FINAL = _FINAL
HOST = socket.gethostname()  # this node's name in claims: `set_node` (settings.worker_node) may rename it
LOST = "LOST"  # what `beat` answers a job process whose job was given to another worker

_J, _U, _S, _O = JobStatus, UploadStatus, StoredDataStatus, OfferingStatus
# kind of record → status (None: not created yet) → the statuses it may go to; nothing else moves
TRANSITIONS: Mapping[str, Mapping[str | None, frozenset[str]]] = {
    EXECUTION: {None: frozenset({_J.CREATED}), _J.CREATED: frozenset({_J.WAITING, _J.ABORTED}),
                _J.WAITING: frozenset({_J.PROGRESS, _J.FAILURE, _J.ABORTED}),
                _J.PROGRESS: frozenset({_J.SUCCESS, _J.FAILURE, _J.ABORTED, _J.WAITING})},
    CHECK: {None: frozenset({_J.WAITING}), _J.WAITING: frozenset({_J.PROGRESS, _J.FAILURE}),
            _J.PROGRESS: frozenset({_J.SUCCESS, _J.FAILURE, _J.WAITING})},
    SHARD: {None: frozenset({_J.WAITING}), _J.WAITING: frozenset({_J.PROGRESS, _J.FAILURE}),
            _J.PROGRESS: frozenset({_J.SUCCESS, _J.FAILURE, _J.WAITING}),
            _J.FAILURE: frozenset({_J.WAITING}), _J.ABORTED: frozenset({_J.WAITING})},  # a rerun of its execution
    UPLOAD: {None: frozenset({_U.OPEN}), _U.OPEN: frozenset({_U.OPEN, _U.CHECKING}),
             _U.CHECKING: frozenset({_U.CLOSED, _U.UNSTABLE}), _U.CLOSED: frozenset({_U.OPEN}),
             _U.UNSTABLE: frozenset({_U.OPEN})},
    # CREATED by an execution, GENERATED when registered (CLI, admin layers); a base changed in place
    # goes GENERATED → GENERATING → GENERATED; a rerun (requeued execution) writes GENERATING again
    STORED_DATA: {None: frozenset({_S.CREATED, _S.GENERATED}), _S.CREATED: frozenset({_S.GENERATING, _S.UNSTABLE}),
                  _S.GENERATING: frozenset({_S.GENERATING, _S.GENERATED, _S.UNSTABLE}),
                  _S.GENERATED: frozenset({_S.GENERATED, _S.GENERATING}),
                  _S.UNSTABLE: frozenset({_S.UNSTABLE, _S.GENERATED})},
    OFFERING: {None: frozenset({_O.PUBLISHING}), _O.PUBLISHING: frozenset({_O.PUBLISHED, _O.UNSTABLE})},
}


class ForbiddenTransition(ValueError):
    """A status change the transition table does not list: a bug of its caller, never user input."""


def allowed(kind: str, current: str | None, new: str) -> bool:
    return new in TRANSITIONS[kind].get(current, frozenset())


def sources(kind: str, new: str) -> frozenset[str | None]:
    """The statuses (None: not created yet) from which a `kind` record may become `new`."""
    return frozenset(current for current, moves in TRANSITIONS[kind].items() if new in moves)


def _move(kind: str, body: dict[str, Any], new: str) -> None:
    """The one place a status is written into a warehouse record's body."""
    current = body.get("status")
    if not allowed(kind, current, new):
        raise ForbiddenTransition(f"a {kind} cannot go from {current or 'nothing'} to {new}")
    body["status"] = new


def _initial(kind: str) -> str:
    (first,) = TRANSITIONS[kind][None]
    return first


def create(entities: Entities, kind: str, datastore_id: str, body: dict[str, Any],
           entity_id: str | None = None) -> Entity:
    """A new upload or job record, in its kind's first status (an upload OPEN, an execution CREATED,
    a check or a shard WAITING and unclaimed)."""
    body = dict(body)
    body.pop("status", None)
    _move(kind, body, _initial(kind))
    if kind in JOB_KINDS:
        body.setdefault("job", {"claim": None})
    return entities.create(kind, datastore_id, body, entity_id)


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
    if body.get("status") != JobStatus.WAITING or job.get("claim"):
        return False
    job["claim"] = {"host": HOST, "pid": pid, "at": time.time()}
    return True


def begin(entities: Entities, kind: str, job_id: str, pid: int) -> Entity | None:
    """Worker side: WAITING → PROGRESS; None when the job was aborted or taken meanwhile."""
    started: list[bool] = []

    def start(body: dict[str, Any]) -> bool:
        ok = body.get("status") == JobStatus.WAITING
        if ok:
            _move(kind, body, JobStatus.PROGRESS)
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
        ok = body.get("status") == JobStatus.WAITING and not job.get("claim")
        if ok:
            _move(kind, body, JobStatus.PROGRESS)
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
        if body.get("status") != JobStatus.PROGRESS:
            return False
        body.setdefault("job", {})["heartbeat"] = time.time()
        return True

    try:
        entities.update(kind, job_id, touch)
    except Gone:
        return JobStatus.ABORTED
    return status[0] if status else JobStatus.ABORTED


def finish(store: PublicationStore, entities: Entities, kind: str, job_id: str, status: JobStatus, settings: Settings,
           lines: Iterable[str] = (), result: dict[str, Any] | None = None, only_from: tuple[str, ...] = (JobStatus.PROGRESS,),
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
        _move(kind, body, status)
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
    return finish(store, entities, entity.kind, entity.id, JobStatus.FAILURE, settings, [log_line(reason)],
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
        if body.get("status") != JobStatus.PROGRESS or job.get("worker") != worker:
            outcome.append(("", attempt))
            return False
        if attempt >= attempts:
            outcome.append((JobStatus.FAILURE, attempt))
            return False
        _move(entity.kind, body, JobStatus.WAITING)
        body["job"] = {"claim": None, "attempt": attempt, "lost": job.get("worker")}
        outcome.append((JobStatus.WAITING, attempt))
        return True

    try:
        entities.update(entity.kind, entity.id, back)
    except Gone:
        return ""
    if outcome and outcome[0][0] == JobStatus.WAITING:
        entities.append_logs(entity.id, [log_line(f"{reason}: back in the queue after attempt {outcome[0][1]}"
                                                  f" of {attempts}")])
        return JobStatus.WAITING
    if not outcome or outcome[0][0] != JobStatus.FAILURE:
        return ""
    return JobStatus.FAILURE if interrupt(store, entities, entity, f"{reason} (attempt {outcome[0][1]} of {attempts})",
                                       settings) else ""


def _check_ended(entities: Entities, check: Entity) -> None:
    """The upload is CLOSED when every check of this round passed, UNSTABLE when one failed."""
    upload_id = check.body["upload"]["_id"]
    siblings = [e for e in entities.find(CHECK, "json_extract(body, '$.upload._id') = ?", (upload_id,))
                if e.body.get("round") == check.body.get("round")]
    if any(e.body.get("status") not in FINAL for e in siblings):
        return
    passed = all(e.body.get("status") == JobStatus.SUCCESS for e in siblings)
    found: dict[str, Any] = {}
    for e in siblings:
        found.update(e.body.get("result") or {})

    def settle(body: dict[str, Any]) -> bool:
        if body.get("status") != UploadStatus.CHECKING or body.get("round") != check.body.get("round"):
            return False
        _move(UPLOAD, body, UploadStatus.CLOSED if passed else UploadStatus.UNSTABLE)
        body.update({k: v for k, v in found.items() if k in ("extent", "type_infos")})
        return True

    try:
        entities.update(UPLOAD, upload_id, settle)
    except Gone:
        pass


def execution_ended(store: PublicationStore, entities: Entities, execution: Entity, settings: Settings) -> None:
    """The output stored data follows its execution: GENERATED on success, else UNSTABLE and removed;
    either way the execution's quota reservation goes (a success's size counts instead)."""
    output = (execution.body.get("output") or {}).get("stored_data") or {}
    stored = store.get_stored_data(output.get("_id", ""))
    if stored is not None:
        if execution.body["status"] == JobStatus.SUCCESS:
            summary = dict((execution.body.get("result") or {}).get("summary") or {})
            _stored(store, stored, StoredDataStatus.GENERATED, summary)
        elif output.get("existing"):  # a base changed in place: its transaction rolled back, it is as it was
            _stored(store, stored, StoredDataStatus.GENERATED, stored.summary)
        else:
            remove_pyramid(stored.descriptor_url, settings)
            _stored(store, stored, StoredDataStatus.UNSTABLE, {})
    release_holder(store, execution.id)


def launch(store: PublicationStore, entities: Entities, execution: Entity, datastore: Any) -> tuple[Entity, bool]:
    """CREATED → WAITING, with the estimated output reserved in the datastore's pyramid quota
    (400 when it no longer fits). Returns (execution, whether this call launched it)."""
    size = int(execution.body.get("estimate") or 0)

    def still_created(db: Any) -> None:
        row = db.execute("SELECT json_extract(body, '$.status') FROM wh_entities WHERE id = ?",
                         (execution.id,)).fetchone()
        if row is None or row[0] != JobStatus.CREATED:
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
        ok = body["status"] == JobStatus.CREATED
        if ok:
            _move(EXECUTION, body, JobStatus.WAITING)
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
        _move(EXECUTION, body, JobStatus.ABORTED)
        body["finish"] = now_iso()
        return True

    updated = entities.update(EXECUTION, execution.id, stop)
    if previous[0] in FINAL:
        return updated, previous[0]
    entities.append_logs(execution.id, [log_line(f"aborted by {by}")])
    if previous[0] != JobStatus.PROGRESS:
        execution_ended(store, entities, updated, settings)
    return updated, previous[0]


def stop_running(entities: Entities, kind: str, job_id: str, reason: str) -> bool:
    """Worker side, before it kills its process group: PROGRESS → FAILURE with `reason` logged; the
    consequences are left to `settle` (the writer may still be writing until the kill)."""
    entities.append_logs(job_id, [log_line(reason)])

    def end(body: dict[str, Any]) -> bool:
        if body.get("status") != JobStatus.PROGRESS:
            return False
        _move(kind, body, JobStatus.FAILURE)
        body["finish"] = now_iso()
        return True

    try:
        return entities.update(kind, job_id, end).body.get("status") == JobStatus.FAILURE
    except Gone:
        return False


def settle(store: PublicationStore, entities: Entities, kind: str, job_id: str, settings: Settings) -> None:
    """After a job's worker process is gone: an execution that ended without success but whose
    output is still CREATED or GENERATING (killed on abort or past its quota) has its partial
    pyramid removed, its stored data UNSTABLE and its reservation released."""
    if kind != EXECUTION:
        return
    execution = entities.get(EXECUTION, job_id)
    if execution is None or execution.body.get("status") not in (JobStatus.FAILURE, JobStatus.ABORTED):
        return
    output = (execution.body.get("output") or {}).get("stored_data") or {}
    stored = store.get_stored_data(output.get("_id", ""))
    if stored is not None and stored.status in (StoredDataStatus.CREATED, StoredDataStatus.GENERATING):
        execution_ended(store, entities, execution, settings)
        return
    with store.reading() as db:
        held = holds(db, execution.id)
    if held:  # checked first: recovery calls this for every ended execution, writes only when needed
        release_holder(store, execution.id)


def release(entities: Entities, job: Entity) -> None:
    """Put a claimed job whose server died back in the queue (it never started)."""

    def unclaim(body: dict[str, Any]) -> bool:
        if body.get("status") != JobStatus.WAITING:
            return False
        body.setdefault("job", {})["claim"] = None
        return True

    try:
        entities.update(job.kind, job.id, unclaim)
    except Gone:
        pass


# --- stored data and offerings (rows of the shared store, changed atomically with their check) -----


def _stored(store: PublicationStore, stored: StoredData, new: StoredDataStatus, summary: dict[str, Any]) -> StoredData:
    return store.put_stored_data(stored.descriptor_url, summary, stored.name, new, stored.type,
                                 only_from=sources(STORED_DATA, new))


def new_output(store: PublicationStore, descriptor_url: str, name: str, type_: str) -> StoredData:
    """The stored data an execution will write: CREATED, empty, until its worker starts."""
    return store.put_stored_data(descriptor_url, {}, name, StoredDataStatus.CREATED, type_,
                                 only_from=sources(STORED_DATA, StoredDataStatus.CREATED))


def generating(store: PublicationStore, stored: StoredData, keep_summary: bool) -> StoredData:
    """Worker side: the output is being written (a base changed in place keeps its summary meanwhile)."""
    return _stored(store, stored, StoredDataStatus.GENERATING, stored.summary if keep_summary else {})


def register(store: PublicationStore, descriptor_url: str, summary: dict[str, Any], name: str,
             type_: str) -> StoredData:
    """A pyramid the operator registers (CLI): GENERATED, unless an execution is writing it
    (StatusConflict)."""
    held = {StoredDataStatus.CREATED, StoredDataStatus.GENERATING}  # an execution's output, until it ends
    return store.put_stored_data(descriptor_url, summary, name, StoredDataStatus.GENERATED, type_,
                                 only_from=sources(STORED_DATA, StoredDataStatus.GENERATED) - held)


def offer(store: PublicationStore, layer_id: str, endpoint: str, open_: bool) -> Offering:
    """A new offering of a layer record: PUBLISHING until this process's catalog serves it."""
    return store.put_offering(layer_id, endpoint, open_, OfferingStatus.PUBLISHING,
                              only_from=sources(OFFERING, OfferingStatus.PUBLISHING))


def offered(store: PublicationStore, layer_id: str, endpoint: str, open_: bool, served: bool) -> Offering:
    """PUBLISHING → PUBLISHED once served, UNSTABLE when the catalog could not serve the layer."""
    new = OfferingStatus.PUBLISHED if served else OfferingStatus.UNSTABLE
    return store.put_offering(layer_id, endpoint, open_, new, only_from=sources(OFFERING, new))


# --- uploads -------------------------------------------------------------------------------------


def close_upload(entities: Entities, upload_id: str, checks: Iterable[tuple[str, str]],
                 on_change: Callable[[dict[str, Any]], Any], guard: Callable[[Connection], None]) -> tuple[Entity, bool]:
    """OPEN → CHECKING in a new round, with one WAITING check execution per (id, name) of `checks`;
    `on_change(body)` adds to the same write (the event), `guard(db)` may refuse it. Returns the
    upload and whether this call closed it (False: it was no longer OPEN)."""
    rounds: list[int] = []

    def start_checks(body: dict[str, Any]) -> bool:
        if body["status"] != UploadStatus.OPEN:
            return False
        _move(UPLOAD, body, UploadStatus.CHECKING)
        body["round"] = int(body.get("round", 0)) + 1
        rounds.append(body["round"])
        on_change(body)
        return True

    updated = entities.update(UPLOAD, upload_id, start_checks, False, guard)
    if not rounds:
        return updated, False
    for check_id, check_name in checks:
        create(entities, CHECK, updated.datastore_id, {
            "check": {"_id": check_id, "name": check_name}, "upload": {"_id": upload_id, "name": updated.body["name"]},
            "round": rounds[0], "creation": updated.updated_at})
    return updated, True


def reopen_upload(entities: Entities, upload_id: str, on_change: Callable[[dict[str, Any]], Any]) -> tuple[Entity, bool]:
    """CLOSED, UNSTABLE (or OPEN) → OPEN; returns the upload and whether it is OPEN now."""
    opened: list[bool] = []

    def open_(body: dict[str, Any]) -> bool:
        if not allowed(UPLOAD, body.get("status"), UploadStatus.OPEN):
            return False
        _move(UPLOAD, body, UploadStatus.OPEN)
        on_change(body)
        opened.append(True)
        return True

    updated = entities.update(UPLOAD, upload_id, open_)
    return updated, bool(opened)


def requeue_shard(entities: Entities, shard_id: str) -> None:
    """A shard of an earlier run that ended without success, queued again for this run."""

    def again(body: dict[str, Any]) -> bool:
        _move(SHARD, body, JobStatus.WAITING)
        body.update(job={"claim": None}, queued=time.time())
        return True

    entities.update(SHARD, shard_id, again)
