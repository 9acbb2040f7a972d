"""The PostgreSQL store engine's own duties: the dialect layer, migrations run once by whichever
process starts first (advisory lock), change notices (LISTEN/NOTIFY) and a clear refusal when the
database cannot be reached. The shared behaviour runs on both engines in test_store.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest
from apputil import layer_descriptor, live_server, make_settings
from test_warehouse_support import wait_for

from tileserver.publication.backends import postgresql_sql
from tileserver.publication.model import parse_layer
from tileserver.publication.store import MIGRATIONS, SCHEMA_VERSION, PublicationStore, StoreUnavailable

LAYER = {"title": "t", "abstract": "a", "keywords": [],
         "pyramids": [{"path": "file:///p/SCAN.json", "bottom_level": "8", "top_level": "0"}]}


def test_the_dialect_rewrites_sqlite_sql_once_for_all_queries() -> None:
    assert postgresql_sql("SELECT 1 FROM t WHERE a = ? AND b IN (?, ?) AND c LIKE 'x?%'") == (
        "SELECT 1 FROM t WHERE a = %s AND b IN (%s, %s) AND c LIKE 'x?%%'")  # a literal's ? is text
    assert postgresql_sql("SELECT 5 % 2") == "SELECT 5 %% 2"
    assert postgresql_sql("SELECT json_extract(body, '$.job.claim') FROM e WHERE json_extract(s.summary, '$.size')"
                          " IS NULL") == ("SELECT (body::jsonb #>> '{job,claim}') FROM e WHERE"
                                          " (s.summary::jsonb #>> '{size}') IS NULL")
    assert postgresql_sql("FROM k CROSS JOIN json_each(w.body, '$.offerings') g JOIN o ON o.id = g.value") == (
        "FROM k CROSS JOIN jsonb_array_elements_text(w.body::jsonb -> 'offerings') AS g(value)"
        " JOIN o ON o.id = g.value")
    assert postgresql_sql("CREATE TABLE t (q INTEGER NOT NULL, at REAL, CAST(x AS INTEGER))") == (
        "CREATE TABLE t (q BIGINT NOT NULL, at DOUBLE PRECISION, CAST(x AS BIGINT))")


OPEN_SLOWLY = """
import sys, time
from tileserver.publication import store as s
first = s.MIGRATIONS[0]
def slow(db):  # holds the migration long enough for the other process to arrive meanwhile
    time.sleep(1.5)
    first.apply(db)
s.MIGRATIONS = (s.Migration(1, first.description, slow), *s.MIGRATIONS[1:])
print("ready", flush=True)
sys.stdin.readline()
store = s.PublicationStore(sys.argv[1])
print(store.schema_version(), store.revision(), flush=True)
store.close()
"""


def test_migrations_run_once_when_two_processes_start_together(pg_url: str) -> None:
    processes = [subprocess.Popen([sys.executable, "-c", OPEN_SLOWLY, pg_url], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in processes:
        assert p.stdout.readline().strip() == "ready"
    for p in processes:  # both open the empty database at once
        p.stdin.write("go\n")
        p.stdin.flush()
    outputs = [p.communicate(timeout=60) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]
    assert [out.split() for out, _ in outputs] == [[str(SCHEMA_VERSION), "1"]] * 2  # one migration bump
    store = PublicationStore(pg_url)
    try:
        with store.reading() as db:
            versions = [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY version").fetchall()]
            datastores = db.execute("SELECT COUNT(*) FROM wh_datastores").fetchone()[0]
        assert versions == [m.version for m in MIGRATIONS]  # each applied once
        assert datastores == 1  # migration 3's default datastore, not one per process
        assert store.revision() == 1
    finally:
        store.close()


async def test_a_committed_write_notifies_other_replicas(pg_url: str, tmp_path) -> None:
    writer, replica = PublicationStore(pg_url), PublicationStore(pg_url)
    changes = replica.notifications()
    assert changes is not None
    try:
        assert await anext(changes) == -1  # listening
        start = writer.revision()
        with pytest.raises(RuntimeError):  # rolled back: nothing committed, no notice
            with writer.transaction() as db:
                db.execute("INSERT INTO styles (id, style, updated_at) VALUES ('x', '{}', 'now')")
                raise RuntimeError("abandoned")
        await asyncio.to_thread(writer.add_layer, parse_layer("scan", LAYER))
        assert await asyncio.wait_for(anext(changes), 30) == start + 1 == replica.revision()
        await asyncio.to_thread(writer.put_stored_data, "file:///p/SCAN.json", {}, "scan")
        assert await asyncio.wait_for(anext(changes), 30) == start + 2
    finally:
        await changes.aclose()
        writer.close()
        replica.close()
    sqlite = PublicationStore(str(tmp_path / "store.sqlite"))  # a file: nothing to listen to
    try:
        assert sqlite.notifications() is None
    finally:
        sqlite.close()


def test_an_unreachable_database_is_refused_clearly(pg_server) -> None:
    port = pg_server.url.rsplit(":", 1)[-1]
    url = f"postgresql://nobody:hunter2@127.0.0.1:{port}/no_such_database"
    with pytest.raises(StoreUnavailable) as exc:
        PublicationStore(url)
    assert "no_such_database" in str(exc.value) and "hunter2" not in str(exc.value)


def _publish(url: str, name: str) -> None:
    headers = {"Authorization": "Bearer secret"}
    answer = httpx.post(f"{url}/admin/layers/{name}", json=layer_descriptor("SCAN1000"), headers=headers)
    assert answer.status_code in (200, 201, 204), answer.text


def _listening_backends(url: str) -> list[int]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                                           " AND query LIKE 'LISTEN %'").fetchall()]


def test_replicas_see_a_new_layer_by_notify_and_after_losing_their_listener(tmp_path, pg_url: str) -> None:
    """Two servers on one database, polling once an hour: only the notices can show B what A published,
    and B listens again by itself once its listening connection is killed."""
    import psycopg

    settings = [make_settings(tmp_path / name, store_url=pg_url, store_poll_interval=3600.0) for name in "ab"]
    with live_server(settings[0]) as a, live_server(settings[1]) as b:
        _publish(a, "first")
        wait_for(lambda: "first" in httpx.get(f"{b}/tms/1.0.0").text, timeout=20)
        listeners = wait_for(lambda: len(_listening_backends(pg_url)) == 2 and _listening_backends(pg_url))
        with psycopg.connect(pg_url, autocommit=True) as conn:
            for pid in listeners:  # every listener dies: the next change is published meanwhile
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        _publish(a, "second")
        wait_for(lambda: "second" in httpx.get(f"{b}/tms/1.0.0").text, timeout=20)
        _publish(a, "third")  # listening again: at once, as before
        wait_for(lambda: "third" in httpx.get(f"{b}/tms/1.0.0").text, timeout=20)


async def test_a_lost_database_answers_503_and_service_resumes_when_it_is_back(tmp_path, pg_url: str,
                                                                                monkeypatch) -> None:
    import psycopg
    from test_warehouse_support import BASE, app_with_user

    from tileserver.publication import backends

    monkeypatch.setattr(backends, "POOL_WAIT", 1.0)  # how long a call waits for a connection before its 503
    name = pg_url.rsplit("/", 1)[-1]
    admin = psycopg.connect(pg_url.rsplit("/", 1)[0] + "/postgres", autocommit=True)

    def cut(allow: bool) -> None:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}')
        if not allow:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))

    def publish(client):
        return client.post("/admin/layers/x", json=layer_descriptor("SCAN1000"),
                           headers={"Authorization": "Bearer secret"})

    try:
        async with app_with_user(tmp_path, store_url=pg_url) as client:
            assert (await client.get(f"{BASE}/uploads")).status_code == 200
            cut(allow=False)
            down = await client.get(f"{BASE}/uploads")
            assert down.status_code == 503 and down.headers["content-type"].startswith("application/json"), down.text
            refused = await publish(client)
            assert refused.status_code == 503, refused.text
            cut(allow=True)
            for _ in range(60):  # the pool reconnects by itself (with back-off): no restart needed
                if (await client.get(f"{BASE}/uploads")).status_code == 200:
                    break
                await asyncio.sleep(0.5)
            assert (await client.get(f"{BASE}/uploads")).status_code == 200
            published = await publish(client)
            assert published.status_code in (200, 201, 204), published.text
    finally:
        cut(allow=True)
        admin.close()


def test_values_postgresql_cannot_hold_are_refused_as_bad_input(pg_url: str) -> None:
    """A NUL character (SQLite stores it; PostgreSQL text cannot): a StoreError (400), never a 500."""
    from tileserver.publication.store import StoreError

    store = PublicationStore(pg_url)
    try:
        with pytest.raises(StoreError, match="cannot be stored"):
            store.create_key("nul\x00name", ["*"])
        assert store.list_keys() == []  # nothing half-written
    finally:
        store.close()
