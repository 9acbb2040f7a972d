"""Where the publication store keeps its tables: one SQLite file (the default, for one machine) or a
PostgreSQL database (many replicas), chosen by `TILESERVER_STORE_URL`.

Both engines sit behind one small interface: a transaction yields a `Connection` whose `execute`
takes the store's SQL as written for SQLite (`?` placeholders, `json_extract(col, '$.a.b')`,
`json_each`, INTEGER/REAL columns); on PostgreSQL a thin dialect layer rewrites it (`%s`,
`col::jsonb #>> '{a,b}'`, `jsonb_array_elements_text`, BIGINT/DOUBLE PRECISION), so every query
is written once. JSON stays in text columns on both.

Semantics kept from SQLite on PostgreSQL: writers are serialised (each write transaction takes one
transaction-level advisory lock first, as SQLite's BEGIN IMMEDIATE takes the file's write lock), so
the warehouse's read-modify-write updates and quota checks stay atomic across replicas; a read
transaction sees one snapshot (REPEATABLE READ); migrations run under a session advisory lock, by
whichever process starts first. A write that bumps the revision also sends a NOTIFY, which
replicas LISTEN to (polling the revision stays as the fallback).
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("tileserver.store")

SQLITE, POSTGRESQL = "sqlite", "postgresql"
CHANNEL = "tileserver_catalog"  # NOTIFY channel: payload = the new revision
WRITE_LOCK = 0x7469_6C65_7365_7277  # pg_advisory_xact_lock key serialising writers ("tileserw")
MIGRATE_LOCK = 0x7469_6C65_7365_726D  # pg_advisory_lock key held while migrating ("tilesrm")
POOL_SIZE = 8  # connections per process (a write holds one for its transaction only)
CONNECT_TIMEOUT = 10.0  # seconds to reach PostgreSQL at start
POOL_WAIT = 5.0  # seconds a store call waits for a pooled connection (database down: then a 503)


class StoreError(Exception):
    """A store operation refused; `field` names the offending input when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class StoreUnavailable(StoreError):
    """The store cannot take writes now (its file deleted, replaced or made read-only under the
    server, disk full, I/O error; its database unreachable): nothing was saved. A 503, never a 4xx:
    the request was fine."""


class IntegrityError(Exception):
    """A unique or foreign key constraint refused a write (either engine); the message names the
    constraint or index."""


def is_postgresql(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """The connection a store transaction yields (SQLite's SQL, either engine)."""

    dialect: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


# --- SQLite ---------------------------------------------------------------------------------------


class SQLiteConnection:
    dialect = SQLITE

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        try:
            return self.db.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self.db.executemany(sql, rows)
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc


# --- PostgreSQL dialect ---------------------------------------------------------------------------

_TOKENS = re.compile(r"'(?:[^']|'')*'|\?\d*|%")
_JSON_EXTRACT = re.compile(r"json_extract\(\s*([\w.]+)\s*,\s*'\$\.([\w.]+)'\s*\)")
_JSON_EACH = re.compile(r"json_each\(\s*([\w.]+)\s*,\s*'\$\.(\w+)'\s*\)\s+(\w+)")
_TYPES = ((re.compile(r"\bINTEGER\b"), "BIGINT"), (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"))


@functools.lru_cache(maxsize=512)
def postgresql_sql(sql: str) -> str:
    """The store's SQLite SQL as PostgreSQL runs it (placeholders, JSON functions, column types).

    INTEGER becomes BIGINT (quotas and sizes pass 2³¹), REAL becomes DOUBLE PRECISION (token
    expiry times need more than float4); `%` is escaped for psycopg. A `?` in a literal is kept."""
    sql = _JSON_EXTRACT.sub(lambda m: f"({m[1]}::jsonb #>> '{{{m[2].replace('.', ',')}}}')", sql)
    sql = _JSON_EACH.sub(lambda m: f"jsonb_array_elements_text({m[1]}::jsonb -> '{m[2]}') AS {m[3]}(value)", sql)
    for pattern, replacement in _TYPES:
        sql = pattern.sub(replacement, sql)

    def token(m: re.Match[str]) -> str:
        text = m[0]
        if text.startswith("'"):
            return text.replace("%", "%%")  # psycopg reads % even in literals; ? there is text
        return "%%" if text == "%" else "%s"

    return _TOKENS.sub(token, sql)


class PostgresConnection:
    dialect = POSTGRESQL

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        import psycopg

        try:
            return self.raw.execute(postgresql_sql(sql), list(params))
        except psycopg.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except psycopg.DataError as exc:  # a NUL character in a text (SQLite takes it), a number out of range
            raise StoreError(f"a value cannot be stored: {str(exc).splitlines()[0]}") from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        import psycopg

        rows = [list(r) for r in rows]
        if not rows:
            return
        try:
            with self.raw.cursor() as cur:
                cur.executemany(postgresql_sql(sql), rows)
        except psycopg.IntegrityError as exc:
            raise IntegrityError(str(exc)) from exc
        except psycopg.DataError as exc:
            raise StoreError(f"a value cannot be stored: {str(exc).splitlines()[0]}") from exc


class PostgresBackend:
    """A pool of autocommit connections; transactions are explicit, as the SQLite side does."""

    dialect = POSTGRESQL

    def __init__(self, url: str, pool_size: int = POOL_SIZE) -> None:
        import psycopg
        import psycopg_pool

        self.url = url
        self.name = redact(url)
        self._local = threading.local()
        try:  # one plain connection first: a wrong URL fails at once, with libpq's reason
            psycopg.connect(url, connect_timeout=int(CONNECT_TIMEOUT)).close()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to the store database {self.name}: {exc}") from None
        self.pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=pool_size, kwargs={"autocommit": True}, open=False,
            timeout=POOL_WAIT, name="tileserver-store",
            # a pooled connection is checked before use: after a database restart or failover, the
            # dead ones are replaced instead of failing one request each
            check=psycopg_pool.ConnectionPool.check_connection,
        )
        try:
            self.pool.open(wait=True, timeout=CONNECT_TIMEOUT)
        except psycopg_pool.PoolTimeout as exc:
            self.pool.close()
            raise StoreUnavailable(f"cannot connect to the store database {self.name}") from exc

    @contextmanager
    def _connection(self) -> Iterator[tuple[PostgresConnection, bool]]:
        """This thread's connection: (connection, whether a transaction of this thread holds it).
        Nested use in one thread shares the transaction, as SQLite's per-thread connection does."""
        import psycopg
        import psycopg_pool

        current: PostgresConnection | None = getattr(self._local, "conn", None)
        if current is not None:
            yield current, True
            return
        try:
            with self.pool.connection() as raw:
                conn = PostgresConnection(raw)
                self._local.conn = conn
                try:
                    yield conn, False
                finally:
                    self._local.conn = None
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            log.error("store %s: %s", self.name, exc)
            raise StoreUnavailable(f"the store database cannot be reached now ({exc}); nothing was saved") from exc

    @contextmanager
    def transaction(self, begin: str | None, lock: bool = False,
                    before_commit: Callable[[PostgresConnection], None] | None = None) -> Iterator[PostgresConnection]:
        """`begin` None: statements autocommit (single reads). `lock`: take the writers' lock first."""
        with self._connection() as (conn, nested):
            if nested or begin is None:
                yield conn
                return
            with self._begun(conn, begin, lock, before_commit):
                yield conn

    @staticmethod
    @contextmanager
    def _begun(conn: PostgresConnection, begin: str, lock: bool,
               before_commit: Callable[[PostgresConnection], None] | None = None) -> Iterator[None]:
        # one round trip: no parameters, so psycopg sends both statements as one simple query
        conn.raw.execute(f"{begin}; SELECT pg_advisory_xact_lock({WRITE_LOCK})" if lock else begin)
        try:
            yield
            if before_commit is not None:
                before_commit(conn)
            conn.raw.execute("COMMIT")
        except BaseException:
            if not conn.raw.closed:
                try:
                    conn.raw.execute("ROLLBACK")
                except Exception:  # the connection broke: the pool drops it
                    pass
            raise

    def migrate(self, run: Callable[[PostgresConnection], None]) -> None:
        """Run `run` in one transaction under the migration lock: replicas starting together wait
        for the first one, then find nothing to do."""
        with self._connection() as (conn, _):
            conn.raw.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
            try:
                with self._begun(conn, "BEGIN", lock=True):
                    run(conn)
            finally:
                if not conn.raw.closed:
                    conn.raw.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))

    @staticmethod
    def bump(conn: PostgresConnection) -> int:
        """Count a change and queue its notice (the new revision), in one statement; PostgreSQL
        delivers the notice at COMMIT, never for a rolled back write."""
        return int(conn.raw.execute(
            "WITH r AS (UPDATE revision SET value = value + 1 WHERE id = 1 RETURNING value)"
            " SELECT value, pg_notify(%s, value::text) FROM r", (CHANNEL,)).fetchone()[0])

    async def notifications(self) -> AsyncIterator[int]:
        """The revisions other writers commit, as they commit (raises when the connection drops)."""
        import psycopg

        # TCP keepalives: a connection silently cut (a partition, a NAT timeout) fails within ~1 min
        # instead of listening to nothing for good
        async with await psycopg.AsyncConnection.connect(
            self.url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT),
            keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
        ) as aconn:
            await aconn.execute(f"LISTEN {CHANNEL}")
            yield -1  # listening: what changed before this is read by the caller now
            async for notice in aconn.notifies():
                try:
                    yield int(notice.payload)
                except ValueError:
                    yield -1

    def close(self) -> None:
        self.pool.close()
