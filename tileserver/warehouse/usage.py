"""What a datastore uses and has reserved: bytes of uploads and of pyramids (each measured
against the datastore's quota), offerings per endpoint (what `GET /datastores/{id}` shows).

Room is taken by a *reservation* before any byte is written: a push reserves its announced
length, a launched execution its estimated output. A reservation is a `reservation` entity
inserted in the same write transaction that sums what is used and reserved, so parallel pushes
or launches (in one process or several) never add up past the quota. It is removed when the
work ends, once what it measured counts instead.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tileserver.publication.store import Connection, PublicationStore

from .accounts import Datastore, now_iso
from .errors import bad_request

if TYPE_CHECKING:
    from .service import Warehouse

RESERVATION = "reservation"
UPLOADS, PYRAMIDS = "uploads", "pyramids"
STORAGES = (UPLOADS, PYRAMIDS)
STALE_PUSH = 24 * 3600.0  # seconds after which a push reservation of another host's process is dropped


def _used(db: Connection, datastore_id: str, storage: str, except_holder: str | None = None) -> int:
    """Bytes stored plus bytes reserved (except `except_holder`'s own reservations)."""
    if storage == UPLOADS:
        stored = db.execute("SELECT COALESCE(SUM(CAST(json_extract(body, '$.size') AS INTEGER)), 0) FROM wh_entities"
                            " WHERE kind = 'upload' AND datastore_id = ?", (datastore_id,)).fetchone()[0]
    else:
        stored = db.execute("SELECT COALESCE(SUM(CAST(json_extract(s.summary, '$.size') AS INTEGER)), 0)"
                            " FROM stored_data s JOIN wh_entities e ON e.id = s.id AND e.kind = 'stored_data'"
                            " WHERE e.datastore_id = ?", (datastore_id,)).fetchone()[0]
    reserved = db.execute("SELECT COALESCE(SUM(CAST(json_extract(body, '$.size') AS INTEGER)), 0) FROM wh_entities"
                          " WHERE kind = ? AND datastore_id = ? AND json_extract(body, '$.storage') = ?"
                          " AND COALESCE(json_extract(body, '$.holder'), '') != ?",
                          (RESERVATION, datastore_id, storage, except_holder or "")).fetchone()[0]
    return int(stored) + int(reserved)


def room(store: PublicationStore, datastore: Datastore, storage: str, except_holder: str | None = None) -> int:
    """Bytes the datastore may still take in `storage` (what others reserved is not free)."""
    with store.reading() as db:
        return datastore.quota - _used(db, datastore.id, storage, except_holder)


def reserve(store: PublicationStore, datastore: Datastore, storage: str, size: int, holder: str,
            guard: Callable[[Connection], None] | None = None) -> str:
    """Reserve `size` bytes for `holder` (an upload or an execution id), atomically with the quota
    check and with `guard(db)` (which raises to refuse, e.g. the upload is no longer OPEN).
    Raises ApiError 400 when the quota would be exceeded. Returns the reservation id."""
    reservation_id = str(uuid.uuid4())
    body = {"storage": storage, "size": int(size), "holder": holder, "host": socket.gethostname(),
            "pid": os.getpid(), "at": time.time()}
    now = now_iso()
    with store.transaction(publish=False) as db:
        if guard is not None:
            guard(db)
        used = _used(db, datastore.id, storage)
        if used + size > datastore.quota:
            raise bad_request(f"quota exceeded: {size} bytes asked, the datastore's {storage} may take "
                              f"{max(datastore.quota - used, 0)} more bytes (quota {datastore.quota})")
        db.execute("INSERT INTO wh_entities (id, datastore_id, kind, body, created_at, updated_at)"
                   " VALUES (?, ?, ?, ?, ?, ?)", (reservation_id, datastore.id, RESERVATION, json.dumps(body), now, now))
    return reservation_id


def release(store: PublicationStore, reservation_id: str) -> None:
    with store.transaction(publish=False) as db:
        db.execute("DELETE FROM wh_entities WHERE id = ? AND kind = ?", (reservation_id, RESERVATION))


def release_holder(store: PublicationStore, holder: str) -> None:
    """Drop every reservation of `holder` (an execution that ended)."""
    with store.transaction(publish=False) as db:
        db.execute("DELETE FROM wh_entities WHERE kind = ? AND json_extract(body, '$.holder') = ?",
                   (RESERVATION, holder))


def holds(db: Connection, holder: str) -> bool:
    """Whether `holder` has a reservation (a push into that upload is being received)."""
    return db.execute("SELECT 1 FROM wh_entities WHERE kind = ? AND json_extract(body, '$.holder') = ? LIMIT 1",
                      (RESERVATION, holder)).fetchone() is not None


def reservations(store: PublicationStore) -> list[tuple[str, dict[str, Any]]]:
    with store.reading() as db:
        return [(r[0], json.loads(r[1])) for r in db.execute("SELECT id, body FROM wh_entities WHERE kind = ?",
                                                             (RESERVATION,))]


def datastore_usage(wh: Warehouse, datastore: Datastore) -> dict[str, Any]:
    with wh.store.reading() as db:
        uploads = _used(db, datastore.id, UPLOADS)
        pyramids = _used(db, datastore.id, PYRAMIDS)
    offerings: dict[str, int] = {}
    for entity in wh.entities.list("offering", datastore.id):
        endpoint = entity.body.get("endpoint", "")
        offerings[endpoint] = offerings.get(endpoint, 0) + 1
    return {"uploads": uploads, "pyramids": pyramids, "offerings": offerings}
