"""The publication store: one SQLite file (default) or a PostgreSQL database holding what the
server publishes (`TILESERVER_STORE_URL`; the engines differ only in backends.py).

Every write goes through this module, in one transaction that also bumps a revision counter, so a
reader never sees half a layer and any process sharing the store notices a change by polling
`revision()` (one indexed read) — on PostgreSQL at once too, by LISTEN/NOTIFY. On SQLite, WAL mode
lets readers run while a writer commits; each thread gets its own connection because sqlite3
connections must not be shared by concurrent threads.

The schema is versioned: `schema_version` records every migration applied, and `MIGRATIONS` lists
them in order. The warehouse API (users, datastores, uploads, configurations…) adds its tables as
later migrations; layers, offerings and stored data are the records both APIs share.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tileserver.publication.backends import (
    POSTGRESQL,
    SQLITE,
    Connection,
    IntegrityError,
    PostgresBackend,
    SQLiteConnection,
    StoreError,
    StoreUnavailable,
    is_postgresql,
    redact,
)
from tileserver.publication.model import LAYER_ID, Layer, LayerError, parse_layer
from tileserver.publication.status import OfferingStatus, StoredDataStatus

__all__ = ["IntegrityError", "StoreError", "StoreUnavailable", "Connection"]

log = logging.getLogger("tileserver.store")

BUSY_TIMEOUT = 10.0  # seconds a writer waits for another process's write lock
# SQLite result codes meaning "cannot write now" rather than a bad request: BUSY, READONLY, IOERR,
# FULL, CANTOPEN
_UNAVAILABLE = frozenset({5, 8, 10, 13, 14})
ALL_LAYERS = "*"  # key grant meaning every restricted layer
RASTER_PYRAMID = "ROK4-PYRAMID-RASTER"  # the warehouse's stored data type
VECTOR_DB = "VECTOR-DB"  # a vector base: one GeoPackage file (its URL ends with .gpkg) or postgresql://…#schema
VECTOR_PYRAMID = "ROK4-PYRAMID-VECTOR"  # a pyramid of vector tiles (format TIFF_PBF_MVT)


def pyramid_type(summary: dict[str, Any]) -> str:
    """The stored data type of a pyramid from its summary (Pyramid.summary() or a writer's)."""
    if summary.get("type") in (RASTER_PYRAMID, VECTOR_PYRAMID):
        return str(summary["type"])
    return VECTOR_PYRAMID if summary.get("format") == "TIFF_PBF_MVT" else RASTER_PYRAMID


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class LayerExists(Conflict):
    pass


class LayerNotFound(NotFound):
    pass


class StatusConflict(Conflict):
    """A status change refused because the record is no longer in a state it may leave that way
    (checked inside the writing transaction: `only_from`)."""


class InvalidRecord(StoreError):
    """Input the store refuses (empty name, malformed id…)."""


@dataclass(frozen=True)
class StoreSnapshot:
    """Everything the services need, read in one transaction."""

    revision: int
    layers: tuple[Layer, ...]
    restricted: frozenset[str]  # ids of layers served only with a key
    key_access: dict[str, frozenset[str]]  # key hash → granted layer ids ("*" = all)
    styles: dict[str, dict]


@dataclass(frozen=True)
class StoredData:
    """A pyramid known to the store (the warehouse's ROK4-PYRAMID-RASTER stored data)."""

    id: str
    name: str
    descriptor_url: str
    type: str
    status: StoredDataStatus
    summary: dict[str, Any] = field(default_factory=dict)  # tms, format, levels, extent, size…
    created_at: str = ""
    updated_at: str = ""


@dataclass(frozen=True)
class Offering:
    """A layer published on an endpoint, open to all or restricted to keys."""

    id: str
    layer_id: str
    endpoint: str
    open: bool
    status: OfferingStatus
    created_at: str = ""
    updated_at: str = ""


# --- schema ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One schema step. `apply` runs inside the migrating transaction: plain `execute` only
    (`executescript` would commit half-way), so a failed migration leaves the previous version intact."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _migrate_1(db: Connection) -> None:
    for statement in (
        "CREATE TABLE revision (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL)",
        "INSERT INTO revision (id, value) VALUES (1, 0)",
        # ROK4 layer descriptor (modern keys, without "restricted") + the access flag as a column
        """CREATE TABLE layers (
            id TEXT PRIMARY KEY,
            descriptor TEXT NOT NULL,
            restricted INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            layers TEXT NOT NULL,
            created_at TEXT NOT NULL,
            revoked_at TEXT)""",
    ):
        db.execute(statement)
    if db.dialect == POSTGRESQL:  # SQLite's implicit rowid orders keys by creation
        db.execute("ALTER TABLE api_keys ADD COLUMN rowid BIGSERIAL")


def _migrate_2(db: Connection) -> None:
    """Records shared with the warehouse API; layer → pyramid links backfilled from descriptors."""
    for statement in (
        """CREATE TABLE stored_data (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            descriptor_url TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            status TEXT NOT NULL,
            summary TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        """CREATE TABLE layer_pyramids (
            layer_id TEXT NOT NULL REFERENCES layers (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            descriptor_url TEXT NOT NULL,
            bottom_level TEXT NOT NULL,
            top_level TEXT NOT NULL,
            PRIMARY KEY (layer_id, position))""",
        "CREATE INDEX layer_pyramids_url ON layer_pyramids (descriptor_url)",
        """CREATE TABLE offerings (
            id TEXT PRIMARY KEY,
            layer_id TEXT NOT NULL REFERENCES layers (id) ON DELETE CASCADE,
            endpoint TEXT NOT NULL,
            open INTEGER NOT NULL,
            status TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (layer_id, endpoint))""",
        "CREATE TABLE styles (id TEXT PRIMARY KEY, style TEXT NOT NULL, updated_at TEXT NOT NULL)",
    ):
        db.execute(statement)
    for layer_id, descriptor in db.execute("SELECT id, descriptor FROM layers").fetchall():
        _link_pyramids(db, layer_id, json.loads(descriptor).get("pyramids", []))


def _migrate_3(db: Connection) -> None:
    """The warehouse API's own records: accounts, datastores, its entities (uploads, executions,
    configurations…, one JSON document each) and their log lines. Stored data and offerings stay
    in the shared tables; `wh_entities` only adds the warehouse's side of them (datastore, tags…)."""
    for statement in (
        """CREATE TABLE wh_datastores (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            technical_name TEXT NOT NULL UNIQUE,
            quota INTEGER NOT NULL,
            created_at TEXT NOT NULL)""",
        """CREATE TABLE wh_users (
            id TEXT PRIMARY KEY,
            login TEXT NOT NULL UNIQUE,
            password_hash TEXT NOT NULL,
            first_name TEXT NOT NULL,
            last_name TEXT NOT NULL,
            email TEXT NOT NULL,
            created_at TEXT NOT NULL)""",
        """CREATE TABLE wh_members (
            user_id TEXT NOT NULL REFERENCES wh_users (id) ON DELETE CASCADE,
            datastore_id TEXT NOT NULL REFERENCES wh_datastores (id) ON DELETE CASCADE,
            PRIMARY KEY (user_id, datastore_id))""",
        """CREATE TABLE wh_tokens (
            token_hash TEXT PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES wh_users (id) ON DELETE CASCADE,
            expires_at REAL NOT NULL)""",
        """CREATE TABLE wh_entities (
            id TEXT PRIMARY KEY,
            datastore_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            body TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        "CREATE INDEX wh_entities_kind ON wh_entities (kind, datastore_id)",
        """CREATE TABLE wh_logs (
            entity_id TEXT NOT NULL,
            line INTEGER NOT NULL,
            text TEXT NOT NULL,
            PRIMARY KEY (entity_id, line))""",
        """CREATE TABLE wh_key_owners (
            key_id TEXT PRIMARY KEY REFERENCES api_keys (id) ON DELETE CASCADE,
            user_id TEXT NOT NULL REFERENCES wh_users (id) ON DELETE CASCADE,
            body TEXT NOT NULL)""",
    ):
        db.execute(statement)
    db.execute(
        "INSERT INTO wh_datastores (id, name, technical_name, quota, created_at) VALUES (?, 'default', 'default', ?, ?)",
        (str(uuid.uuid4()), 10 << 30, _now()),
    )


def _migrate_4(db: Connection) -> None:
    """Warehouse keys granted the public *names* of their offerings' layers, which another tenant's
    layer could share; their grants are now their offerings (resolved to records in `snapshot`)."""
    db.execute("UPDATE api_keys SET layers = '[]' WHERE id IN (SELECT key_id FROM wh_key_owners)")


def _migrate_5(db: Connection) -> None:
    """A warehouse configuration's layer_name is unique per service (its type: WMTS-TMS or
    WMS-RASTER), enforced by the store so racing creations cannot both pass a check-then-insert.
    Duplicates an older version let through keep their names on the oldest; the later ones get
    `<layer_name>.<8 first characters of their id>` and a warning."""
    rows = db.execute("SELECT id, body FROM wh_entities WHERE kind = 'configuration' ORDER BY created_at, id").fetchall()
    seen: set[tuple[str, str]] = set()
    for entity_id, text in rows:
        body = json.loads(text)
        key = (str(body.get("layer_name")), str(body.get("type")))
        if key in seen:
            body["layer_name"] = f"{key[0]}.{entity_id[:8]}"
            log.warning("configuration %s: duplicate layer_name %s (%s) renamed %s", entity_id, key[0], key[1],
                        body["layer_name"])
            db.execute("UPDATE wh_entities SET body = ? WHERE id = ?", (json.dumps(body, ensure_ascii=False),
                                                                       entity_id))
        seen.add((str(body.get("layer_name")), key[1]))
    db.execute("CREATE UNIQUE INDEX wh_configurations_layer_name ON wh_entities"
               " (json_extract(body, '$.layer_name'), json_extract(body, '$.type')) WHERE kind = 'configuration'")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "layers, API keys, revision counter (ROK4 admin API)", _migrate_1),
    Migration(2, "stored data, offerings, styles, layer → pyramid links (shared with the warehouse)", _migrate_2),
    Migration(3, "warehouse API: accounts, datastores, entities, logs, user keys", _migrate_3),
    Migration(4, "warehouse keys grant offerings, not layer names", _migrate_4),
    Migration(5, "warehouse: a configuration's layer_name unique per service (type)", _migrate_5),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def _link_pyramids(db: Connection, layer_id: str, pyramids: list[dict[str, Any]]) -> None:
    db.execute("DELETE FROM layer_pyramids WHERE layer_id = ?", (layer_id,))
    db.executemany(
        "INSERT INTO layer_pyramids (layer_id, position, descriptor_url, bottom_level, top_level)"
        " VALUES (?, ?, ?, ?, ?)",
        [(layer_id, i, p["path"], str(p["bottom_level"]), str(p["top_level"])) for i, p in enumerate(pyramids)],
    )


def grant(layers: Any) -> list[str]:
    """The layer ids a key is granted, as stored: duplicates dropped, ["*"] when "*" is among them."""
    if not isinstance(layers, list) or not layers or not all(isinstance(v, str) and v for v in layers):
        raise InvalidRecord('must be a non-empty array of layer ids, or ["*"]', "layers")
    return [ALL_LAYERS] if ALL_LAYERS in layers else list(dict.fromkeys(layers))


def _only_from(allowed: Collection[Any], current: Any, new: Any, what: str) -> None:
    if current not in allowed:
        raise StatusConflict(f"{what} is {current or 'not registered'}: it cannot become {new}", "status")


def _default_name(descriptor_url: str) -> str:
    return descriptor_url.rsplit("/", 1)[-1].rsplit("#", 1)[-1].removesuffix(".json").removesuffix(".gpkg")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _stored_descriptor(layer: Layer) -> str:
    """The descriptor column: the access flag lives in its own column, the one source of truth."""
    descriptor = layer.to_descriptor()
    descriptor.pop("restricted", None)
    return json.dumps(descriptor, ensure_ascii=False, sort_keys=True)


class PublicationStore:
    """`path`: a SQLite file path, or a `postgresql://` URL (TILESERVER_STORE_URL)."""

    def __init__(self, path: str) -> None:
        self.path = str(path)  # for messages: a URL's password is left out
        self._pg: PostgresBackend | None = None
        self.dialect = SQLITE
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file the connections use
        if is_postgresql(self.path):
            url, self.path, self.dialect = self.path, redact(self.path), POSTGRESQL
            self._pg = PostgresBackend(url)
            try:
                self._migrate()
            except BaseException:
                self.close()
                raise
            return
        if not self.path or self.path == ":memory:" or self.path.startswith("file:"):
            raise StoreError("the publication store needs a file path (every thread opens its own connection)")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._migrate()
            stat = os.stat(self.path)
            self._identity = (stat.st_dev, stat.st_ino)
        except BaseException:
            self.close()
            raise

    # --- connections and transactions -------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError("the publication store is closed")
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None:
            return db
        if self._identity is not None:
            self._check_file("open")  # else sqlite would create an empty store in place of a deleted one
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE for writes)
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints, never corrupt, in WAL mode
        db.execute("PRAGMA foreign_keys = ON")
        self._local.db = db
        with self._connections_lock:
            self._connections.append(db)
        return db

    @contextmanager
    def _write(self, bump: bool = True) -> Iterator[Connection]:
        """One write transaction; the revision bump commits with the change or not at all.

        `bump=False` is for records the services never read (job progress, logs): they must not
        make every server process rebuild its catalog."""
        if self._pg is not None:
            pg = self._pg

            def publish(conn: Any) -> None:
                if bump:
                    pg.bump(conn)

            self._open()
            with pg.transaction("BEGIN", lock=True, before_commit=publish) as conn:
                yield conn
            return
        db = self._db()
        self._check_file("write")
        try:
            db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock with readers
            yield SQLiteConnection(db)
            if bump:
                db.execute("UPDATE revision SET value = value + 1 WHERE id = 1")
            self._check_file("write")  # deleted meanwhile: the commit would go to a file nobody reopens
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode & 0xFF in _UNAVAILABLE:
                log.error("store %s: write failed, nothing saved: %s", self.path, exc)
                raise StoreUnavailable(f"the store cannot save changes now ({exc})") from exc
            raise

    def _check_file(self, doing: str) -> None:
        """Refuse to write unless the file at the path is the one the connections opened, writable.

        A connection keeps writing to a deleted (or replaced) file's inode, so without this a write
        would answer success and vanish at the next restart; a file made read-only (even for root:
        the operator's intent) or on a read-only mount must refuse writes too, loudly."""
        try:
            stat = os.stat(self.path)
            if (stat.st_dev, stat.st_ino) != self._identity:
                problem = "was replaced by another file (restart the server to use it)"
            elif not stat.st_mode & 0o222 or not os.access(self.path, os.W_OK):
                problem = "is read-only"
            else:
                return
        except FileNotFoundError:
            problem = "was deleted or moved"
        except OSError as exc:
            problem = f"cannot be checked ({exc.strerror or exc})"
        log.error("store %s %s while the server runs: %s refused, nothing saved", self.path, problem, doing)
        raise StoreUnavailable(f"the store file {problem}; nothing was saved")

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """One read transaction: every SELECT inside sees the same committed state."""
        if self._pg is not None:
            self._open()
            with self._pg.transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") as conn:
                yield conn
            return
        db = self._db()
        db.execute("BEGIN")
        try:
            yield SQLiteConnection(db)
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")

    @contextmanager
    def _query(self) -> Iterator[Connection]:
        """A connection for one read statement (no transaction around it)."""
        if self._pg is not None:
            self._open()
            with self._pg.transaction(None) as conn:
                yield conn
            return
        yield SQLiteConnection(self._db())

    def _open(self) -> None:
        if self._closed:
            raise StoreError("the publication store is closed")

    def transaction(self, publish: bool = True) -> AbstractContextManager[Connection]:
        """A write transaction for modules keeping their own tables here (the warehouse API);
        `publish=False` when nothing the services serve changes (no catalog rebuild)."""
        return self._write(bump=publish)

    def reading(self) -> AbstractContextManager[Connection]:
        """A consistent read transaction for modules keeping their own tables here."""
        return self._read()

    @property
    def closed(self) -> bool:
        """Whether `close()` ran (background tasks sharing the store stop then)."""
        return self._closed

    def close(self) -> None:
        """Close this thread's connection; the others close when their threads let go of them.

        Closing a connection another thread is executing on crashes sqlite (a segfault seen in CI
        when a refresh still ran in an executor thread at shutdown), so only new use is refused."""
        with self._connections_lock:
            self._closed = True
            self._connections = []
        if self._pg is not None:
            self._pg.close()
            return
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None:
            self._local.db = None
            db.close()

    # --- migrations -----------------------------------------------------------------------------

    def _migrate(self) -> None:
        if self._pg is not None:
            self._pg.migrate(self._apply_migrations)  # under pg_advisory_lock: the first process migrates
            return
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # two processes starting together: the second waits, then finds nothing to do
        try:
            self._apply_migrations(SQLiteConnection(db))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _apply_migrations(self, db: Connection) -> None:
        """Inside the migrating transaction: every pending migration, or none."""
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        current = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: store schema version {current} is newer than this tileserver's ({SCHEMA_VERSION})"
            )
        pending = [m for m in MIGRATIONS if m.version > current]
        for migration in pending:
            log.info("store %s: migrating to schema version %d (%s)", self.path, migration.version,
                     migration.description)
            migration.apply(db)
            db.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.description, _now()),
            )
        if pending:
            db.execute("UPDATE revision SET value = value + 1 WHERE id = 1")

    def schema_version(self) -> int:
        with self._query() as db:
            return int(db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])

    # --- revision and snapshot ----------------------------------------------------------------

    def revision(self) -> int:
        with self._query() as db:
            return int(db.execute("SELECT value FROM revision WHERE id = 1").fetchone()[0])

    def notifications(self) -> AsyncIterator[int] | None:
        """Revisions as other writers commit them (-1 first, once listening), or None when the
        engine cannot tell (SQLite: polling `revision()` is the way)."""
        return None if self._pg is None else self._pg.notifications()

    def snapshot(self) -> StoreSnapshot:
        with self._read() as db:
            revision = db.execute("SELECT value FROM revision WHERE id = 1").fetchone()[0]
            layers = self._layers(db)
            closed = {row[0] for row in db.execute("SELECT DISTINCT layer_id FROM offerings WHERE open = 0")}
            key_access = self._key_access(db)
            styles = {sid: json.loads(style) for sid, style in db.execute("SELECT id, style FROM styles")}
        restricted = frozenset(layer.id for layer in layers if layer.restricted) | closed
        return StoreSnapshot(revision, tuple(layers), restricted, key_access, styles)

    # --- layers ---------------------------------------------------------------------------------

    @staticmethod
    def _layer(layer_id: str, descriptor: str, restricted: int) -> Layer:
        return replace(parse_layer(layer_id, json.loads(descriptor)), restricted=bool(restricted))

    def _layers(self, db: Connection) -> list[Layer]:
        """Every stored layer; one that no longer validates (stricter model) is skipped, not fatal."""
        layers = []
        for layer_id, descriptor, restricted in db.execute(
            "SELECT id, descriptor, restricted FROM layers ORDER BY id"
        ):
            try:
                layers.append(self._layer(layer_id, descriptor, restricted))
            except (LayerError, ValueError) as exc:
                log.error("stored layer %s is invalid and left out: %s", layer_id, exc)
        return layers

    def get_layer(self, layer_id: str) -> Layer | None:
        with self._query() as db:
            row = db.execute("SELECT descriptor, restricted FROM layers WHERE id = ?", (layer_id,)).fetchone()
        return None if row is None else self._layer(layer_id, *row)

    def list_layers(self) -> list[Layer]:
        with self._read() as db:
            return self._layers(db)

    def add_layer(
        self, layer: Layer, restricted: bool = False, summaries: dict[str, dict[str, Any]] | None = None
    ) -> None:
        """Add a layer; `summaries` (descriptor path → pyramid summary) registers its pyramids as stored data."""
        now = _now()
        with self._write() as db:
            if db.execute("SELECT 1 FROM layers WHERE id = ?", (layer.id,)).fetchone():
                raise LayerExists(f"layer {layer.id} already exists", "id")
            db.execute(
                "INSERT INTO layers (id, descriptor, restricted, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (layer.id, _stored_descriptor(layer), int(restricted or layer.restricted), now, now),
            )
            self._link_layer(db, layer, summaries)

    def put_layer(
        self, layer: Layer, summaries: dict[str, dict[str, Any]] | None = None, keep_access: bool = False
    ) -> None:
        """Replace a layer: the descriptor is the whole record, as in ROK4. `keep_access` keeps the
        stored access flag (a ROK4 descriptor says nothing of it: replacing must not open a layer);
        otherwise the layer's flag is set, and its offerings follow it."""
        with self._write() as db:
            if keep_access:
                updated = db.execute(
                    "UPDATE layers SET descriptor = ?, updated_at = ? WHERE id = ?",
                    (_stored_descriptor(layer), _now(), layer.id),
                ).rowcount
            else:
                updated = db.execute(
                    "UPDATE layers SET descriptor = ?, restricted = ?, updated_at = ? WHERE id = ?",
                    (_stored_descriptor(layer), int(layer.restricted), _now(), layer.id),
                ).rowcount
                db.execute("UPDATE offerings SET open = ? WHERE layer_id = ?", (int(not layer.restricted), layer.id))
            if not updated:
                raise LayerNotFound(f"no layer {layer.id}", "id")
            self._link_layer(db, layer, summaries)

    def _link_layer(self, db: Connection, layer: Layer, summaries: dict[str, dict[str, Any]] | None) -> None:
        """Record which pyramids the layer publishes; unknown ones become stored data (known ones are
        left alone: their status and summary belong to whoever registered them)."""
        _link_pyramids(db, layer.id, [vars(p) for p in layer.pyramids])
        now = _now()
        for url, summary in (summaries or {}).items():
            db.execute(
                "INSERT INTO stored_data (id, name, descriptor_url, type, status, summary, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (descriptor_url) DO NOTHING",
                (str(uuid.uuid4()), _default_name(url), url, pyramid_type(summary), StoredDataStatus.GENERATED.value,
                 json.dumps(summary), now, now),
            )

    def remove_layer(self, layer_id: str) -> None:
        with self._write() as db:
            if not db.execute("DELETE FROM layers WHERE id = ?", (layer_id,)).rowcount:
                raise LayerNotFound(f"no layer {layer_id}", "id")
            # record ids are reused (the warehouse names a record after its layer_name when free):
            # a grant must not pass to the next layer stored under this id
            for key_id, text in db.execute("SELECT id, layers FROM api_keys").fetchall():
                granted = json.loads(text)
                if layer_id in granted:
                    db.execute("UPDATE api_keys SET layers = ? WHERE id = ?",
                               (json.dumps([g for g in granted if g != layer_id]), key_id))

    def set_restricted(self, layer_id: str, restricted: bool) -> None:
        """Set the layer's access flag and open or close every offering of it accordingly."""
        with self._write() as db:
            if not db.execute(
                "UPDATE layers SET restricted = ?, updated_at = ? WHERE id = ?", (int(restricted), _now(), layer_id)
            ).rowcount:
                raise LayerNotFound(f"no layer {layer_id}", "id")
            db.execute("UPDATE offerings SET open = ? WHERE layer_id = ?", (int(not restricted), layer_id))

    def layers_using(self, descriptor_url: str) -> list[str]:
        """Ids of the layers publishing a pyramid (a stored data in use cannot be removed)."""
        with self._query() as db:
            rows = db.execute(
                "SELECT DISTINCT layer_id FROM layer_pyramids WHERE descriptor_url = ? ORDER BY layer_id",
                (descriptor_url,),
            ).fetchall()
        return [row[0] for row in rows]

    # --- API keys -----------------------------------------------------------------------------

    # A warehouse key opens the layer record of each offering its owner granted it, while that
    # offering exists and its owner is still a member of the offering's datastore.
    _OFFERING_GRANTS = """
        SELECT k.key_hash, o.layer_id FROM api_keys k
        JOIN wh_key_owners w ON w.key_id = k.id
        CROSS JOIN json_each(w.body, '$.offerings') g
        JOIN offerings o ON o.id = g.value
        JOIN wh_entities e ON e.id = o.id
        JOIN wh_members m ON m.user_id = w.user_id AND m.datastore_id = e.datastore_id
        WHERE k.revoked_at IS NULL"""

    def _key_access(self, db: Connection) -> dict[str, frozenset[str]]:
        """Key hash → granted layer record ids ("*" = all): admin grants name records, warehouse
        grants name offerings; never a public layer name."""
        granted: dict[str, set[str]] = {}
        for key_hash, layers in db.execute("SELECT key_hash, layers FROM api_keys WHERE revoked_at IS NULL"):
            granted.setdefault(key_hash, set()).update(json.loads(layers))
        for key_hash, layer_id in db.execute(self._OFFERING_GRANTS):
            granted[key_hash].add(layer_id)
        return {key_hash: frozenset(layers) for key_hash, layers in granted.items()}

    @staticmethod
    def hash_key(secret: str) -> str:
        """Keys are 256-bit random: a plain SHA-256 is enough (no dictionary to defend against)."""
        return hashlib.sha256(secret.encode()).hexdigest()

    def create_key(self, name: str, layers: list[str]) -> tuple[str, str]:
        """A new key granting `layers` (["*"] = every restricted layer): (id, secret shown once)."""
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise InvalidRecord("must be a non-empty string of at most 200 characters", "name")
        granted = grant(layers)
        key_id, secret = str(uuid.uuid4()), secrets.token_urlsafe(32)
        with self._write() as db:
            for layer_id in granted:
                if layer_id != ALL_LAYERS and not db.execute("SELECT 1 FROM layers WHERE id = ?", (layer_id,)).fetchone():
                    raise LayerNotFound(f"no layer {layer_id}", f"layers[{layers.index(layer_id)}]")
            db.execute(
                "INSERT INTO api_keys (id, name, key_hash, layers, created_at) VALUES (?, ?, ?, ?, ?)",
                (key_id, name.strip(), self.hash_key(secret), json.dumps(granted), _now()),
            )
        return key_id, secret

    def list_keys(self) -> list[dict]:
        with self._query() as db:
            rows = db.execute(
                "SELECT id, name, layers, created_at, revoked_at FROM api_keys ORDER BY rowid"  # creation order
            ).fetchall()
        return [
            {"id": kid, "name": name, "layers": json.loads(granted), "created_at": created,
             "revoked": revoked is not None, "revoked_at": revoked}
            for kid, name, granted, created, revoked in rows
        ]

    def revoke_key(self, key_id: str) -> None:
        """Revoked keys stay listed (who had access, until when) but grant nothing."""
        with self._write() as db:
            row = db.execute("SELECT revoked_at FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"no API key {key_id}", "id")
            if row[0] is None:
                db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (_now(), key_id))

    # --- styles -------------------------------------------------------------------------------

    def put_style(self, style_id: str, style: dict[str, Any]) -> None:
        """Create or replace a ROK4 style (the JSON of a style file), by id."""
        if not isinstance(style_id, str) or not LAYER_ID.match(style_id):
            raise InvalidRecord("must be 1–128 letters, digits, '_', '-' or '.'", "id")
        if not isinstance(style, dict):
            raise InvalidRecord("a style must be a JSON object", "(root)")
        with self._write() as db:
            db.execute(
                "INSERT INTO styles (id, style, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET style = excluded.style, updated_at = excluded.updated_at",
                (style_id, json.dumps(style, ensure_ascii=False), _now()),
            )

    def get_style(self, style_id: str) -> dict[str, Any] | None:
        with self._query() as db:
            row = db.execute("SELECT style FROM styles WHERE id = ?", (style_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def list_styles(self) -> dict[str, dict[str, Any]]:
        with self._query() as db:
            rows = db.execute("SELECT id, style FROM styles ORDER BY id").fetchall()
        return {sid: json.loads(style) for sid, style in rows}

    def remove_style(self, style_id: str) -> None:
        with self._write() as db:
            if not db.execute("DELETE FROM styles WHERE id = ?", (style_id,)).rowcount:
                raise NotFound(f"no style {style_id}", "id")

    # --- stored data --------------------------------------------------------------------------

    _STORED_DATA = "SELECT id, name, descriptor_url, type, status, summary, created_at, updated_at FROM stored_data"

    @staticmethod
    def _stored_data(row: tuple) -> StoredData:
        sid, name, url, kind, status, summary, created, updated = row
        return StoredData(sid, name, url, kind, StoredDataStatus(status), json.loads(summary), created, updated)

    def put_stored_data(
        self,
        descriptor_url: str,
        summary: dict[str, Any],
        name: str = "",
        status: StoredDataStatus = StoredDataStatus.GENERATED,
        type: str = RASTER_PYRAMID,
        only_from: Collection[str | None] | None = None,
    ) -> StoredData:
        """Register or update a pyramid by its descriptor URL; its id stays stable across updates.
        Given `only_from`, refused (StatusConflict) unless its current status is one of them (None:
        not registered yet) — `lifecycle` passes what its transition table allows."""
        suffix = ".gpkg" if type == VECTOR_DB else ".json"
        postgis = type == VECTOR_DB and isinstance(descriptor_url, str) and descriptor_url.startswith("postgresql://")
        if not postgis and (not isinstance(descriptor_url, str) or not descriptor_url.endswith(suffix)):
            raise InvalidRecord(f"must be a {'vector base' if type == VECTOR_DB else 'pyramid descriptor'} path"
                                f" ending with {suffix}", "descriptor_url")
        name = name or _default_name(descriptor_url)
        now = _now()
        with self._write() as db:
            if only_from is not None:
                row = db.execute("SELECT status FROM stored_data WHERE descriptor_url = ?", (descriptor_url,)).fetchone()
                _only_from(only_from, None if row is None else StoredDataStatus(row[0]), status,
                           f"stored data {descriptor_url}")
            db.execute(
                "INSERT INTO stored_data (id, name, descriptor_url, type, status, summary, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (descriptor_url) DO UPDATE SET name = excluded.name,"
                " type = excluded.type, status = excluded.status, summary = excluded.summary,"
                " updated_at = excluded.updated_at",
                (str(uuid.uuid4()), name, descriptor_url, type, StoredDataStatus(status).value, json.dumps(summary),
                 now, now),
            )
            row = db.execute(self._STORED_DATA + " WHERE descriptor_url = ?", (descriptor_url,)).fetchone()
        return self._stored_data(row)

    def get_stored_data(self, stored_data_id: str) -> StoredData | None:
        with self._query() as db:
            row = db.execute(self._STORED_DATA + " WHERE id = ?", (stored_data_id,)).fetchone()
        return None if row is None else self._stored_data(row)

    def list_stored_data(self) -> list[StoredData]:
        with self._query() as db:
            rows = db.execute(self._STORED_DATA + " ORDER BY name, id").fetchall()
        return [self._stored_data(row) for row in rows]

    def remove_stored_data(self, stored_data_id: str) -> None:
        """Refused while a layer publishes the pyramid (Conflict), as the warehouse does."""
        with self._write() as db:
            row = db.execute("SELECT descriptor_url FROM stored_data WHERE id = ?", (stored_data_id,)).fetchone()
            if row is None:
                raise NotFound(f"no stored data {stored_data_id}", "id")
            users = [r[0] for r in db.execute(
                "SELECT DISTINCT layer_id FROM layer_pyramids WHERE descriptor_url = ?", (row[0],)
            )]
            if users:
                raise Conflict(f"stored data {stored_data_id} is used by layers {', '.join(sorted(users))}")
            db.execute("DELETE FROM stored_data WHERE id = ?", (stored_data_id,))

    # --- offerings ----------------------------------------------------------------------------

    _OFFERINGS = "SELECT id, layer_id, endpoint, open, status, created_at, updated_at FROM offerings"

    @staticmethod
    def _offering(row: tuple) -> Offering:
        oid, layer_id, endpoint, is_open, status, created, updated = row
        return Offering(oid, layer_id, endpoint, bool(is_open), OfferingStatus(status), created, updated)

    def put_offering(self, layer_id: str, endpoint: str, open: bool = True,
                     status: OfferingStatus = OfferingStatus.PUBLISHED,
                     only_from: Collection[str | None] | None = None) -> Offering:
        """Offer a layer on an endpoint (create or update); a closed offering restricts the layer.
        `only_from` as for `put_stored_data`."""
        if not isinstance(endpoint, str) or not endpoint:
            raise InvalidRecord("must be a non-empty string", "endpoint")
        now = _now()
        with self._write() as db:
            if not db.execute("SELECT 1 FROM layers WHERE id = ?", (layer_id,)).fetchone():
                raise LayerNotFound(f"no layer {layer_id}", "layer_id")
            if only_from is not None:
                row = db.execute("SELECT status FROM offerings WHERE layer_id = ? AND endpoint = ?",
                                 (layer_id, endpoint)).fetchone()
                _only_from(only_from, None if row is None else OfferingStatus(row[0]), status,
                           f"the offering of {layer_id} on {endpoint}")
            db.execute(
                "INSERT INTO offerings (id, layer_id, endpoint, open, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (layer_id, endpoint) DO UPDATE SET"
                " open = excluded.open, status = excluded.status, updated_at = excluded.updated_at",
                (str(uuid.uuid4()), layer_id, endpoint, int(open), OfferingStatus(status).value, now, now),
            )
            row = db.execute(self._OFFERINGS + " WHERE layer_id = ? AND endpoint = ?", (layer_id, endpoint)).fetchone()
        return self._offering(row)

    def get_offering(self, offering_id: str) -> Offering | None:
        with self._query() as db:
            row = db.execute(self._OFFERINGS + " WHERE id = ?", (offering_id,)).fetchone()
        return None if row is None else self._offering(row)

    def list_offerings(self, layer_id: str | None = None) -> list[Offering]:
        with self._query() as db:
            if layer_id is None:
                rows = db.execute(self._OFFERINGS + " ORDER BY layer_id, endpoint").fetchall()
            else:
                rows = db.execute(self._OFFERINGS + " WHERE layer_id = ? ORDER BY endpoint", (layer_id,)).fetchall()
        return [self._offering(row) for row in rows]

    def remove_offering(self, offering_id: str) -> None:
        with self._write() as db:
            if not db.execute("DELETE FROM offerings WHERE id = ?", (offering_id,)).rowcount:
                raise NotFound(f"no offering {offering_id}", "id")
