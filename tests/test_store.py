"""The publication store: round trips, revisions across connections, atomic snapshots, keys, migrations.

Every test taking `store` or `store_url` runs on both engines: a SQLite file and a PostgreSQL
database (conftest's throwaway cluster)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from apputil import PYRAMIDS

from tileserver.publication import store as store_module
from tileserver.publication.backends import Connection, SQLiteConnection
from tileserver.publication.model import parse_layer
from tileserver.publication.store import (
    SCHEMA_VERSION,
    Conflict,
    InvalidRecord,
    LayerExists,
    LayerNotFound,
    Migration,
    NotFound,
    PublicationStore,
    StoreError,
)

SCAN = f"file://{PYRAMIDS}/SCAN1000.json"
MONTAGNE = f"file://{PYRAMIDS}/MONTAGNE.json"

# every field a descriptor can carry, in server 7 keys
FULL = {
    "title": "Scan 1000", "abstract": "IGN SCAN 1000", "keywords": ["scan", "IGN"],
    "pyramids": [{"path": SCAN, "bottom_level": "8", "top_level": "0"},
                 {"path": MONTAGNE, "bottom_level": "12", "top_level": "9"}],
    "styles": ["normal", "hypso"], "resampling": "bicubic",
    "wms": {"enabled": False}, "wmts": {"enabled": True}, "tms": {"enabled": True}, "ogcapi": {"enabled": False},
    "extra_crs": ["EPSG:2154", "CRS:84"], "extra_tilematrixsets": ["4326"],
    "get_feature_info": {"type": "EXTERNALWMS", "url": "https://wms.example/ows", "layers": "a,b",
                         "query_layers": "a", "extra_query_params": "x=1"},
    "bbox": {"west": 1.25, "south": 45.5, "east": 2.125, "north": 46.75},
    "metadata": [{"format": "text/xml", "url": "https://md.example/1", "type": "ISO19115:2003"}],
    "attribution": {"title": "IGN", "url": "https://www.ign.fr",
                    "logo": {"format": "image/png", "url": "https://www.ign.fr/logo.png", "width": 10, "height": 12}},
    "empty_tile_404": True, "cache_control": "public, max-age=60", "restricted": True,
}  # fmt: skip
LEGACY = {
    "title": "Scan 1000", "abstract": "IGN SCAN 1000", "keywords": ["scan", "IGN"],
    "pyramids": [{"path": SCAN, "bottom_level": 8, "top_level": 0}],
    "wms": {"authorized": True, "crs": ["EPSG:2154", "CRS:84"]}, "wmts": {"authorized": True, "tms": ["4326"]},
    "tms": {"authorized": False},
}  # fmt: skip
MODERN = {
    "title": "Scan 1000", "abstract": "IGN SCAN 1000", "keywords": ["scan", "IGN"],
    "pyramids": [{"path": SCAN, "bottom_level": "8", "top_level": "0"}],
    "wms": {"enabled": True}, "wmts": {"enabled": True}, "tms": {"enabled": False},
    "extra_crs": ["EPSG:2154", "CRS:84"], "extra_tilematrixsets": ["4326"],
}  # fmt: skip


@pytest.fixture
def store(store_url: str):
    s = PublicationStore(store_url)
    yield s
    s.close()


def _raw(url: str, sql: str) -> list[tuple]:
    """Rows of one query run outside the store (its own connection, either engine)."""
    if url.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(url) as conn:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
    with sqlite3.connect(url) as db:
        return db.execute(sql).fetchall()


def _tables(url: str) -> set[str]:
    if url.startswith("postgresql://"):
        return {r[0] for r in _raw(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    return {r[0] for r in _raw(url, "SELECT name FROM sqlite_master WHERE type = 'table'")}


def layer(layer_id: str = "scan", **changes) -> object:
    return parse_layer(layer_id, {**FULL, **changes})


def test_schema_version_recorded(store: PublicationStore, store_url: str) -> None:
    assert store.schema_version() == SCHEMA_VERSION == len(store_module.MIGRATIONS)
    rows = _raw(store_url, "SELECT version, description, applied_at FROM schema_version ORDER BY version")
    assert [r[0] for r in rows] == [m.version for m in store_module.MIGRATIONS]
    assert all(r[1] and r[2] for r in rows)
    if store.dialect == "sqlite":
        assert _raw(store_url, "PRAGMA journal_mode")[0][0] == "wal"


def test_round_trip_preserves_every_field(store: PublicationStore) -> None:
    original = layer()
    store.add_layer(original)
    assert store.get_layer("scan") == original
    assert store.list_layers() == [original]
    assert store.snapshot().layers == (original,)
    assert parse_layer("scan", original.to_descriptor()) == original  # what GET /admin answers, posted back
    assert original.to_descriptor() == {**FULL, "extra_crs": FULL["extra_crs"]}


def test_legacy_and_modern_keys_give_the_same_layer(store: PublicationStore) -> None:
    legacy, modern = parse_layer("scan", LEGACY), parse_layer("scan", MODERN)
    assert legacy == modern
    store.add_layer(legacy)
    assert store.get_layer("scan").to_descriptor() == modern.to_descriptor()


def test_add_put_remove_and_their_errors(store: PublicationStore) -> None:
    store.add_layer(layer())
    with pytest.raises(LayerExists):
        store.add_layer(layer(title="other"))
    assert store.get_layer("scan").title == "Scan 1000"  # nothing lost
    store.put_layer(layer(title="Renamed", restricted=False))
    assert store.get_layer("scan").title == "Renamed"
    assert not store.get_layer("scan").restricted  # PUT replaces the whole record
    with pytest.raises(LayerNotFound):
        store.put_layer(layer("ghost"))
    with pytest.raises(LayerNotFound):
        store.remove_layer("ghost")
    with pytest.raises(LayerNotFound):
        store.set_restricted("ghost", True)
    store.remove_layer("scan")
    assert store.get_layer("scan") is None and store.list_layers() == []


def test_restricted_flag(store: PublicationStore) -> None:
    store.add_layer(layer(restricted=False), restricted=True)
    assert store.get_layer("scan").restricted and store.snapshot().restricted == {"scan"}
    store.set_restricted("scan", False)
    assert not store.get_layer("scan").restricted and store.snapshot().restricted == set()


def test_revision_counts_writes_of_every_connection(store: PublicationStore, store_url: str) -> None:
    other = PublicationStore(store_url)  # another process's view of the store
    try:
        start = store.revision()
        store.add_layer(layer())
        assert other.revision() == start + 1
        other.put_layer(layer(title="from the other"))
        assert store.revision() == start + 2
        assert store.get_layer("scan").title == "from the other"
        store.snapshot(), store.list_layers(), store.get_layer("scan")
        assert store.revision() == start + 2  # reads do not count
        with pytest.raises(LayerExists):
            other.add_layer(layer())
        assert store.revision() == start + 2  # a refused write changes nothing
    finally:
        other.close()


def test_concurrent_writes_never_show_a_partial_layer(store_url: str) -> None:
    path = store_url
    versions = [
        layer(title="A", keywords=["a"] * 3, pyramids=FULL["pyramids"][:1], restricted=False),
        layer(title="B", keywords=["b"], styles=["hypso"], bbox={"west": 1, "south": 2, "east": 3, "north": 4}),
    ]
    writer_store, reader_store = PublicationStore(path), PublicationStore(path)
    writer_store.add_layer(versions[0])
    stop = threading.Event()
    problems: list[str] = []
    seen: set[str] = set()

    def write(offset: int) -> None:
        for i in range(150):
            writer_store.put_layer(versions[(i + offset) % 2])

    def read() -> None:
        last = -1
        while not stop.is_set():
            snap = reader_store.snapshot()
            if snap.revision < last:
                problems.append(f"revision went back: {snap.revision} < {last}")
            last = snap.revision
            for got in snap.layers:
                if got not in versions:
                    problems.append(f"partial layer {got}")
                seen.add(got.title)
                # restricted set and the layer come from the same transaction
                if got.restricted != ("scan" in snap.restricted):
                    problems.append("restricted set out of step with the layer")

    readers = [threading.Thread(target=read) for _ in range(3)]
    writers = [threading.Thread(target=write, args=(k,)) for k in range(3)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    writer_store.close(), reader_store.close()
    assert not problems, problems[:3]
    assert seen == {"A", "B"}


WRITER = """
import json, sys
from tileserver.publication.model import parse_layer
from tileserver.publication.store import PublicationStore
path, versions = sys.argv[1], json.loads(sys.stdin.read())
store = PublicationStore(path)
for i in range(300):
    store.put_layer(parse_layer("scan", versions[i % 2]))
store.close()
"""


def test_another_process_writing_never_shows_a_partial_layer(store_url: str) -> None:
    path = store_url
    bodies = [{**FULL, "title": "A", "restricted": False}, {**MODERN, "title": "B", "keywords": []}]
    versions = [parse_layer("scan", body) for body in bodies]
    store = PublicationStore(path)
    store.add_layer(versions[0])
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path], stdin=subprocess.PIPE, text=True)
    writer.stdin.write(json.dumps(bodies))
    writer.stdin.close()
    seen, last = set(), -1
    try:
        while writer.poll() is None:
            snap = store.snapshot()
            assert snap.revision >= last and snap.layers[0] in versions
            seen.add(snap.layers[0].title)
            last = snap.revision
    finally:
        writer.wait(30)
        store.close()
    assert writer.returncode == 0 and seen == {"A", "B"}


def test_keys(store: PublicationStore) -> None:
    store.add_layer(layer())
    key_id, secret = store.create_key("partner", ["scan", "scan"])
    assert len(secret) >= 40
    listed = store.list_keys()
    assert listed == [{"id": key_id, "name": "partner", "layers": ["scan"], "created_at": listed[0]["created_at"],
                       "revoked": False, "revoked_at": None}]
    assert secret not in json.dumps(listed) and PublicationStore.hash_key(secret) not in json.dumps(listed)
    assert store.snapshot().key_access == {PublicationStore.hash_key(secret): frozenset({"scan"})}
    all_id, all_secret = store.create_key("all", ["scan", "*"])
    assert store.snapshot().key_access[PublicationStore.hash_key(all_secret)] == {"*"}
    store.revoke_key(key_id)
    store.revoke_key(key_id)  # revoking twice is harmless
    assert set(store.snapshot().key_access) == {PublicationStore.hash_key(all_secret)}
    assert [k["revoked"] for k in store.list_keys()] == [True, False]
    with pytest.raises(NotFound):
        store.revoke_key("nope")
    with pytest.raises(LayerNotFound) as exc:
        store.create_key("typo", ["scan", "sacn"])
    assert exc.value.field == "layers[1]"
    for name, granted, field in (("", ["scan"], "name"), ("x", [], "layers"), ("x", "scan", "layers")):
        with pytest.raises(InvalidRecord) as exc:
            store.create_key(name, granted)
        assert exc.value.field == field


def test_styles(store: PublicationStore) -> None:
    hypso = {"identifier": "hypso", "palette": {"colours": []}}
    store.put_style("hypso", hypso)
    store.put_style("hypso", {**hypso, "title": "v2"})
    assert store.get_style("hypso")["title"] == "v2"
    assert store.list_styles() == store.snapshot().styles == {"hypso": {**hypso, "title": "v2"}}
    assert store.get_style("nope") is None
    with pytest.raises(InvalidRecord):
        store.put_style("../x", hypso)
    store.remove_style("hypso")
    with pytest.raises(NotFound):
        store.remove_style("hypso")


def test_stored_data_and_offerings(store: PublicationStore) -> None:
    data = store.put_stored_data(SCAN, {"tile_matrix_set": "PM"})
    assert data.name == "SCAN1000" and data.status == "GENERATED"
    again = store.put_stored_data(SCAN, {"tile_matrix_set": "PM", "levels": []}, status="GENERATED")
    assert again.id == data.id and again.summary["levels"] == []
    store.add_layer(layer(restricted=False), summaries={MONTAGNE: {"tile_matrix_set": "PM"}})
    assert {d.name for d in store.list_stored_data()} == {"SCAN1000", "MONTAGNE"}  # the layer's pyramids
    assert store.get_stored_data(data.id).summary == again.summary  # a known one is left alone
    assert store.layers_using(SCAN) == ["scan"]
    with pytest.raises(Conflict):
        store.remove_stored_data(data.id)

    offering = store.put_offering("scan", "gpf-rok4-server-wmts-tms", open=False)
    assert store.snapshot().restricted == {"scan"}  # a closed offering restricts the layer
    assert store.list_offerings("scan") == [offering] and store.get_offering(offering.id) == offering
    store.set_restricted("scan", False)  # opens its offerings too
    assert store.get_offering(offering.id).open and store.snapshot().restricted == set()
    with pytest.raises(LayerNotFound):
        store.put_offering("ghost", "gpf-rok4-server-wms-r")

    store.remove_layer("scan")  # cascades to its offerings and pyramid links
    assert store.list_offerings() == [] and store.layers_using(SCAN) == []
    store.remove_stored_data(data.id)
    assert store.get_stored_data(data.id) is None


def test_a_stored_layer_that_no_longer_validates_is_left_out(store: PublicationStore) -> None:
    store.add_layer(layer())
    with store.transaction() as db:
        db.execute("INSERT INTO layers VALUES ('bad', '{\"title\": 1}', 0, 'now', 'now')")
    assert [got.id for got in store.snapshot().layers] == ["scan"]


def _v1_store(path: Path) -> None:
    """A store as the first tileserver release left it: schema version 1 and one layer."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)")
    store_module.MIGRATIONS[0].apply(SQLiteConnection(db))
    db.execute("INSERT INTO schema_version VALUES (1, 'v1', 'then')")
    descriptor = json.dumps(parse_layer("old", MODERN).to_descriptor())
    db.execute("INSERT INTO layers VALUES ('old', ?, 1, 'then', 'then')", (descriptor,))
    db.execute("COMMIT")
    db.close()


def test_opening_an_old_store_migrates_it(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    _v1_store(path)
    store = PublicationStore(str(path))
    try:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.get_layer("old") == replace(parse_layer("old", MODERN), restricted=True)
        assert store.layers_using(SCAN) == ["old"]  # links backfilled from the stored descriptors
        assert store.revision() == 1  # the migration counts as a change for running servers
        store.put_offering("old", "gpf-rok4-server-wmts-tms")  # new tables usable
    finally:
        store.close()
    reopened = PublicationStore(str(path))  # nothing left to do: no migration, no revision bump
    assert reopened.revision() == 2 and reopened.schema_version() == SCHEMA_VERSION
    reopened.close()


def test_later_migrations_apply_once_and_failures_roll_back(store_url: str, monkeypatch) -> None:
    path = store_url
    PublicationStore(path).close()
    calls: list[int] = []

    def add_column(db: Connection) -> None:
        calls.append(1)
        db.execute("ALTER TABLE layers ADD COLUMN datastore TEXT")

    def broken(db: Connection) -> None:
        db.execute("CREATE TABLE half_done (x TEXT)")
        raise RuntimeError("migration bug")

    nxt = SCHEMA_VERSION + 1
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, Migration(nxt, "x", broken)))
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", nxt)
    with pytest.raises(RuntimeError):
        PublicationStore(path)
    assert _raw(path, "SELECT MAX(version) FROM schema_version")[0][0] == SCHEMA_VERSION
    assert "half_done" not in _tables(path) and "layers" in _tables(path)

    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS[:-1], Migration(nxt, "x", add_column)))
    for _ in range(2):
        s = PublicationStore(path)
        assert s.schema_version() == nxt
        s.close()
    assert calls == [1]

    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:-1])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", nxt - 1)
    with pytest.raises(StoreError, match="newer"):
        PublicationStore(path)


def test_cli_store_migrate(store_url: str, tmp_path: Path, monkeypatch, capsys) -> None:
    from tileserver.cli import main

    monkeypatch.setenv("TILESERVER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TILESERVER_STORE_URL", store_url)
    assert main(["store", "migrate", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["schema_version"] == SCHEMA_VERSION and info["revision"] == 1
    assert info["engine"] == ("postgresql" if store_url.startswith("postgresql://") else "sqlite")
    assert main(["store", "migrate"]) == 0  # nothing left to do
    assert f"schema version {SCHEMA_VERSION}" in capsys.readouterr().out
    monkeypatch.setenv("TILESERVER_STORE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert main(["store", "migrate"]) == 1  # one line, no traceback
    assert "cannot connect" in capsys.readouterr().err
