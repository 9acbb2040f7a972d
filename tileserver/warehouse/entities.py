"""The warehouse's own entities (uploads, executions, checks, configurations, statics…), one JSON
document per entity, and the log lines of executions.

Each update is a read-modify-write inside one write transaction, so two server processes (or a
worker and a server) never lose each other's changes. These writes do not bump the store's
revision unless asked: the services never read them.
"""

from __future__ import annotations

import builtins
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tileserver.publication.backends import POSTGRESQL
from tileserver.publication.store import Conflict, Connection, IntegrityError, PublicationStore

from .accounts import now_iso


@dataclass(frozen=True)
class Entity:
    id: str
    datastore_id: str
    kind: str
    body: dict[str, Any]
    created_at: str
    updated_at: str


class Gone(Exception):
    """The entity disappeared between reading and updating it."""


def _conflict_text(kind: str, exc: IntegrityError) -> str:
    """The store's unique indexes as the API says them; never which other entity holds the value."""
    if "layer_name" in str(exc) or kind == "configuration":
        return "layer_name is already used by another configuration of this type: a layer name is unique per service"
    return f"this {kind.replace('_', ' ')} already exists"


_SELECT = "SELECT id, datastore_id, kind, body, created_at, updated_at FROM wh_entities"


def _entity(row: tuple) -> Entity:
    eid, datastore_id, kind, body, created, updated = row
    return Entity(eid, datastore_id, kind, json.loads(body), created, updated)


class Entities:
    def __init__(self, store: PublicationStore) -> None:
        self.store = store

    def create(self, kind: str, datastore_id: str, body: dict[str, Any], entity_id: str | None = None,
               publish: bool = False) -> Entity:
        entity_id = entity_id or str(uuid.uuid4())
        now = now_iso()
        try:
            with self.store.transaction(publish) as db:
                db.execute("INSERT INTO wh_entities (id, datastore_id, kind, body, created_at, updated_at)"
                           " VALUES (?, ?, ?, ?, ?, ?)",
                           (entity_id, datastore_id, kind, json.dumps(body, ensure_ascii=False), now, now))
        except IntegrityError as exc:
            raise Conflict(_conflict_text(kind, exc)) from None
        return Entity(entity_id, datastore_id, kind, body, now, now)

    def get(self, kind: str, entity_id: str) -> Entity | None:
        with self.store.reading() as db:
            row = db.execute(_SELECT + " WHERE id = ? AND kind = ?", (entity_id, kind)).fetchone()
        return None if row is None else _entity(row)

    # below this method, `list` in an annotation names the method: later ones spell `builtins.list`
    def list(self, kind: str | Iterable[str], datastore_id: str | None = None) -> list[Entity]:
        kinds = [kind] if isinstance(kind, str) else list(kind)
        marks = ",".join("?" * len(kinds))
        query, args = _SELECT + f" WHERE kind IN ({marks})", list(kinds)
        if datastore_id is not None:
            query += " AND datastore_id = ?"
            args.append(datastore_id)
        with self.store.reading() as db:
            return [_entity(r) for r in db.execute(query + " ORDER BY created_at, id", args)]

    def find(self, kind: str, where: str, args: tuple = ()) -> builtins.list[Entity]:
        """Entities whose JSON matches an SQL condition on `body` (json_extract), e.g. pending jobs."""
        with self.store.reading() as db:
            return [_entity(r) for r in db.execute(_SELECT + f" WHERE kind = ? AND ({where}) ORDER BY created_at",
                                                   (kind, *args))]

    def update(self, kind: str, entity_id: str, change: Callable[[dict[str, Any]], Any],
               publish: bool = False, guard: Callable[[Connection], None] | None = None) -> Entity:
        """Apply `change(body)` (mutating it) atomically; if it returns False nothing is written.
        `guard(db)` runs first in the same transaction and raises to refuse the change."""
        with self.store.transaction(publish) as db:
            row = db.execute(_SELECT + " WHERE id = ? AND kind = ?", (entity_id, kind)).fetchone()
            if row is None:
                raise Gone(entity_id)
            if guard is not None:
                guard(db)
            entity = _entity(row)
            if change(entity.body) is False:
                return entity
            now = now_iso()
            try:
                db.execute("UPDATE wh_entities SET body = ?, updated_at = ? WHERE id = ?",
                           (json.dumps(entity.body, ensure_ascii=False), now, entity_id))
            except IntegrityError as exc:
                raise Conflict(_conflict_text(kind, exc)) from None
        return Entity(entity.id, entity.datastore_id, kind, entity.body, entity.created_at, now)

    def take_first(self, kind: str, where: str, change: Callable[[dict[str, Any]], Any]) -> Entity | None:
        """The oldest entity matching `where`, changed by `change(body)` in the same transaction (a
        queue's claim); None when none matches or `change` returns False. On PostgreSQL the row is
        read `FOR UPDATE SKIP LOCKED`, the queue idiom (the store's writes are serialised besides)."""
        lock = " FOR UPDATE SKIP LOCKED" if self.store.dialect == POSTGRESQL else ""
        with self.store.transaction(publish=False) as db:
            row = db.execute(_SELECT + f" WHERE kind = ? AND ({where}) ORDER BY created_at, id LIMIT 1" + lock,
                             (kind,)).fetchone()
            if row is None:
                return None
            entity = _entity(row)
            if change(entity.body) is False:
                return None
            now = now_iso()
            db.execute("UPDATE wh_entities SET body = ?, updated_at = ? WHERE id = ?",
                       (json.dumps(entity.body, ensure_ascii=False), now, entity.id))
        return Entity(entity.id, entity.datastore_id, kind, entity.body, entity.created_at, now)

    def delete(self, entity_id: str, publish: bool = False,
               guard: Callable[[Connection], None] | None = None) -> bool:
        """Remove an entity and its logs; `guard(db)` runs first in the same transaction and raises
        to refuse."""
        with self.store.transaction(publish) as db:
            if guard is not None:
                guard(db)
            db.execute("DELETE FROM wh_logs WHERE entity_id = ?", (entity_id,))
            return bool(db.execute("DELETE FROM wh_entities WHERE id = ?", (entity_id,)).rowcount)

    # --- logs ---------------------------------------------------------------------------------

    def append_logs(self, entity_id: str, lines: Iterable[str]) -> None:
        lines = list(lines)
        if not lines:
            return
        with self.store.transaction(publish=False) as db:
            start = db.execute("SELECT COALESCE(MAX(line), 0) FROM wh_logs WHERE entity_id = ?",
                               (entity_id,)).fetchone()[0]
            db.executemany("INSERT INTO wh_logs (entity_id, line, text) VALUES (?, ?, ?)",
                           [(entity_id, start + i + 1, text) for i, text in enumerate(lines)])

    def logs(self, entity_id: str, offset: int = 0,
             limit: int | None = None) -> tuple[builtins.list[str], int]:
        """Lines [offset, offset+limit) and the total number of lines."""
        with self.store.reading() as db:
            total = db.execute("SELECT COUNT(*) FROM wh_logs WHERE entity_id = ?", (entity_id,)).fetchone()[0]
            rows = db.execute("SELECT text FROM wh_logs WHERE entity_id = ? ORDER BY line LIMIT ? OFFSET ?",
                              (entity_id, 1 << 62 if limit is None else limit, offset)).fetchall()
        return [r[0] for r in rows], total

