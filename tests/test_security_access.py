"""Grants follow identity, over real HTTP: two users in two datastores publish layers under the same
public name; a key opens only what its owner granted it, and removing a user revokes their keys.
Health details are for the operator. The grant tests run on both store engines (SQLite, PostgreSQL)."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from apputil import PYRAMIDS, layer_descriptor, live_server, make_settings
from test_warehouse_support import api_client, wait_for

from tileserver.publication.store import PublicationStore
from tileserver.settings import Settings
from tileserver.warehouse.accounts import Accounts
from tileserver.warehouse.endpoints import WMS_R, WMTS_TMS

A_KEY, B_KEY = "alpha-user-key-value", "beta-user-key-value"


def _pyramid(root: Path) -> Path:
    shutil.copytree(PYRAMIDS / "SCAN1000", root / "SCAN1000")
    shutil.copy(PYRAMIDS / "SCAN1000.json", root / "SCAN1000.json")
    return root / "SCAN1000.json"


def _register(monkeypatch, capsys, settings, descriptor: Path, datastore: str) -> str:
    from tileserver.cli import main

    monkeypatch.setenv("TILESERVER_DATA_DIR", settings.data_dir)
    monkeypatch.setenv("TILESERVER_STORE_URL", settings.store_url)
    assert main(["stored-data", "add", str(descriptor), "--name", datastore, "--datastore", datastore,
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out)["_id"]


def _publish(api: httpx.Client, datastore: str, stored: str, kind: str, endpoint_name: str) -> str:
    """Configuration `shared` of `kind` on the stored data, offered closed (restricted); the offering id."""
    base = f"/api/datastores/{datastore}"
    levels = api.get(f"{base}/stored_data/{stored}").json()["type_infos"]["levels"]
    config = api.post(f"{base}/configurations", json={
        "type": kind, "name": f"{datastore}-{kind}", "layer_name": "shared",
        "type_infos": {"title": f"{datastore} layer", "abstract": "a", "keywords": ["k"],
                       "used_data": [{"stored_data": stored, "bottom_level": max(levels, key=int),
                                      "top_level": min(levels, key=int)}]}})
    assert config.status_code == 201, config.text
    endpoints = api.get(base).json()["endpoints"]
    endpoint = next(e["endpoint"]["_id"] for e in endpoints if e["endpoint"]["technical_name"] == endpoint_name)
    offering = api.post(f"{base}/configurations/{config.json()['_id']}/offerings",
                        json={"endpoint": endpoint, "open": False})
    assert offering.status_code == 201, offering.text
    return offering.json()["_id"]


def _key(api: httpx.Client, value: str, offering: str) -> None:
    key = api.post("/api/users/me/keys", json={"name": "k", "type": "HASH", "type_infos": {"hash": value}})
    assert key.status_code == 201, key.text
    access = api.post(f"/api/users/me/keys/{key.json()['_id']}/accesses", json={"offerings": [offering]})
    assert access.status_code in (200, 201), access.text


def _lists_shared(document: bytes) -> bool:
    return any(mark in document for mark in (b">shared<", b'"shared"', b'/shared"'))


def _alpha_and_beta(tmp_path: Path) -> tuple[Settings, PublicationStore, Accounts]:
    """Settings and a store with two datastores, alpha and beta (no users yet)."""
    settings = make_settings(tmp_path)
    Path(settings.data_dir).mkdir(parents=True)
    store = PublicationStore(settings.resolved_store_url)
    accounts = Accounts(store)
    for name in ("alpha", "beta"):
        accounts.add_datastore(name)
    return settings, store, accounts


@pytest.mark.usefixtures("store_backend")
def test_a_key_opens_only_what_its_owner_granted(tmp_path, monkeypatch, capsys):
    settings, store, accounts = _alpha_and_beta(tmp_path)
    accounts.add_user("usera", "password-a", datastores=("alpha",))
    accounts.add_user("userb", "password-b", datastores=("beta",))
    a_data = _register(monkeypatch, capsys, settings, _pyramid(tmp_path / "a"), "alpha")
    b_data = _register(monkeypatch, capsys, settings, _pyramid(tmp_path / "b"), "beta")
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=30) as anyone:
        a_api, b_api = api_client(url, "usera", "password-a"), api_client(url, "userb", "password-b")
        # A: a restricted WMTS/TMS/OGC API layer `shared`; B: a restricted WMS layer `shared`
        a_offering = _publish(a_api, "alpha", a_data, "WMTS-TMS", WMTS_TMS)
        b_offering = _publish(b_api, "beta", b_data, "WMS-RASTER", WMS_R)
        _key(a_api, A_KEY, a_offering)
        _key(b_api, B_KEY, b_offering)
        # B cannot grant A's offering to his key
        b_keys = b_api.get("/api/users/me/keys").json()
        stolen = b_api.post(f"/api/users/me/keys/{b_keys[0]['_id']}/accesses", json={"offerings": [a_offering]})
        assert stolen.status_code == 400

        def as_a(path: str, key: str = A_KEY) -> httpx.Response:
            return anyone.get(path, headers={"X-Api-Key": key})

        tilemap = wait_for(lambda: as_a("/tms/1.0.0/shared").status_code == 200 and as_a("/tms/1.0.0/shared"))
        level = ET.fromstring(tilemap.content).find("TileSets/TileSet")
        z, row, col = level.get("order"), level.get("minrow"), level.get("mincol")
        a_routes = {
            "tms tile": f"/tms/1.0.0/shared/{z}/{col}/{row}.png",
            "TileJSON": "/tms/1.0.0/shared/metadata.json",
            "wmts tile": f"/wmts/1.0.0/shared/normal/PM/{z}/{row}/{col}.png",
            "ogcapi collection": "/ogcapi/collections/shared",
        }
        for name, path in a_routes.items():
            assert as_a(path).status_code == 200, name
            refused = as_a(path, B_KEY)
            assert refused.status_code in (400, 404), (name, refused.status_code)
        for path in ("/wmts?SERVICE=WMTS&REQUEST=GetCapabilities", "/tms/1.0.0", "/ogcapi/collections"):
            assert _lists_shared(as_a(path).content), path
            assert not _lists_shared(as_a(path, B_KEY).content), path
        # B's own WMS layer of the same name is his
        bounds = as_a("/tms/1.0.0/shared/metadata.json").json()["bounds"]
        wms = ("/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetMap&LAYERS=shared&STYLES=&CRS=CRS:84&WIDTH=32&HEIGHT=32"
               f"&FORMAT=image/png&BBOX={','.join(map(str, bounds))}")
        assert as_a(wms, B_KEY).status_code == 200 and as_a(wms, B_KEY).content.startswith(b"\x89PNG")
        assert as_a(wms).status_code == 400  # and A's key does not open B's

        # removing user A revokes A's key
        accounts.remove_user("usera")
        wait_for(lambda: as_a(a_routes["tms tile"]).status_code == 400, timeout=10)
        assert as_a(a_routes["TileJSON"]).status_code == 400
        a_api.close()
        b_api.close()
    store.close()


@pytest.mark.usefixtures("store_backend")
def test_leaving_a_datastore_ends_the_grants_given_there(tmp_path, monkeypatch, capsys):
    """A member of alpha and beta grants his key one restricted offering of each; once he leaves
    alpha (`tileserver users leave`), the key opens beta's layer only, and joining alpha again
    reopens nothing: the grant went with the membership."""
    from tileserver.cli import main

    settings, store, accounts = _alpha_and_beta(tmp_path)
    accounts.add_user("usera", "password-a", datastores=("alpha", "beta"))
    a_data = _register(monkeypatch, capsys, settings, _pyramid(tmp_path / "a"), "alpha")
    b_data = _register(monkeypatch, capsys, settings, _pyramid(tmp_path / "b"), "beta")
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=30) as anyone:
        api = api_client(url, "usera", "password-a")
        in_alpha = _publish(api, "alpha", a_data, "WMTS-TMS", WMTS_TMS)
        in_beta = _publish(api, "beta", b_data, "WMS-RASTER", WMS_R)
        _key(api, A_KEY, in_alpha)
        key_id = api.get("/api/users/me/keys").json()[0]["_id"]
        assert api.post(f"/api/users/me/keys/{key_id}/accesses", json={"offerings": [in_beta]}).status_code == 201

        def with_key(path: str) -> httpx.Response:
            return anyone.get(path, headers={"X-Api-Key": A_KEY})

        tilemap = wait_for(lambda: with_key("/tms/1.0.0/shared").status_code == 200 and with_key("/tms/1.0.0/shared"))
        level = ET.fromstring(tilemap.content).find("TileSets/TileSet")
        tile = f"/tms/1.0.0/shared/{level.get('order')}/{level.get('mincol')}/{level.get('minrow')}.png"
        bounds = with_key("/tms/1.0.0/shared/metadata.json").json()["bounds"]
        wms = ("/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetMap&LAYERS=shared&STYLES=&CRS=CRS:84&WIDTH=32&HEIGHT=32"
               f"&FORMAT=image/png&BBOX={','.join(map(str, bounds))}")
        assert with_key(tile).status_code == 200 and with_key(wms).status_code == 200

        assert main(["users", "leave", "usera", "alpha"]) == 0
        wait_for(lambda: with_key(tile).status_code == 400, timeout=10)
        assert with_key("/tms/1.0.0/shared/metadata.json").status_code == 400
        assert with_key(wms).status_code == 200  # beta's grant stays
        assert [a["_id"] for a in api.get(f"/api/users/me/keys/{key_id}/accesses").json()] == [in_beta]
        assert api.get("/api/datastores/alpha/offerings").status_code in (403, 404)

        accounts.join("usera", "alpha")
        assert api.get("/api/datastores/alpha/offerings").status_code == 200
        assert main(["users", "leave", "usera", "alpha"]) == 0 and main(["users", "join", "usera", "alpha"]) == 0
        # a later change seen by the server: its catalog is past the join
        probe = anyone.post("/admin/layers/probe", json=layer_descriptor("SCAN1000"),
                            headers={"Authorization": "Bearer secret"})
        assert probe.status_code in (200, 201, 204), probe.text
        wait_for(lambda: b"probe" in anyone.get("/tms/1.0.0").content, timeout=10)
        assert with_key(tile).status_code == 400  # rejoining reopens nothing
        api.close()
    store.close()


def test_grants_of_a_removed_layer_do_not_pass_to_its_successor(store_url: str):
    """Record ids are reused: a key granted a removed record does not open the next layer stored under it."""
    from apputil import layer_descriptor

    from tileserver.publication.model import parse_layer

    store = PublicationStore(store_url)
    store.add_layer(parse_layer("L", layer_descriptor("SCAN1000")), restricted=True)
    store.add_layer(parse_layer("M", layer_descriptor("SCAN1000")), restricted=True)
    store.create_key("k", ["L", "M"])
    store.remove_layer("L")
    store.add_layer(parse_layer("L", layer_descriptor("SCAN1000")), restricted=True)
    assert list(store.snapshot().key_access.values()) == [{"M"}]  # the other grant stays
    store.close()


def test_warehouse_grants_by_layer_name_are_migrated(tmp_path):
    """Stores written before migration 4 held layer names in warehouse keys' grants: dropped, since
    the key's offerings (kept beside it) are what it was granted."""
    from tileserver.publication import store as store_module

    path = str(tmp_path / "store.sqlite")
    current = store_module.MIGRATIONS
    store_module.MIGRATIONS = current[:3]
    try:
        old = PublicationStore(path)
        user = Accounts(old).add_user("u", "password-u")
        with old.transaction() as db:
            db.execute("INSERT INTO api_keys (id, name, key_hash, layers, created_at) VALUES"
                       " ('k1', 'k', 'h', '[\"shared\"]', 'now')")
            db.execute("INSERT INTO wh_key_owners (key_id, user_id, body) VALUES ('k1', ?, ?)",
                       (user.id, json.dumps({"type": "HASH", "offerings": []})))
        old.close()
    finally:
        store_module.MIGRATIONS = current
    store = PublicationStore(path)
    assert store.schema_version() == store_module.SCHEMA_VERSION
    assert store.snapshot().key_access == {"h": frozenset()}
    store.close()


def test_health_details_are_for_the_operator(tmp_path):
    from apputil import layer_descriptor

    with live_server(make_settings(tmp_path)) as url, httpx.Client(base_url=url, timeout=30) as http:
        answer = http.post("/admin/layers/HIDDEN", json=layer_descriptor("SCAN1000", restricted=True),
                           headers={"Authorization": "Bearer secret"})
        assert answer.status_code == 204
        for path in ("/healthcheck/info", "/healthcheck/depends"):
            anonymous = http.get(path)
            assert anonymous.status_code == 200 and b"HIDDEN" not in anonymous.content
            assert b"SCAN1000" not in anonymous.content and b"file://" not in anonymous.content, path
            wrong = http.get(path, headers={"Authorization": "Bearer nope"})
            assert b"SCAN1000" not in wrong.content, path
            operator = http.get(path, headers={"Authorization": "Bearer secret"})
            assert b"SCAN1000" in operator.content, path
        assert http.get("/healthcheck/info").json()["layers"] == 1


@pytest.mark.usefixtures("store_backend")
def test_key_values_are_never_confirmed(tmp_path):
    """A taken key value is refused exactly like a weak one: no answer tells another user's key exists."""
    settings = make_settings(tmp_path)
    Path(settings.data_dir).mkdir(parents=True)
    accounts = Accounts(PublicationStore(settings.resolved_store_url))
    accounts.add_datastore("alpha")
    accounts.add_datastore("beta")
    accounts.add_user("usera", "password-a", datastores=("alpha",))
    accounts.add_user("userb", "password-b", datastores=("beta",))
    with live_server(settings) as url:
        a_api, b_api = api_client(url, "usera", "password-a"), api_client(url, "userb", "password-b")

        def create(api: httpx.Client, value: str) -> httpx.Response:
            return api.post("/api/users/me/keys", json={"name": "k", "type": "HASH", "type_infos": {"hash": value}})

        assert create(a_api, A_KEY).status_code == 201
        taken, weak = create(b_api, A_KEY), create(b_api, "aaaaaaaaaaaaaaaaaaaa")
        assert taken.status_code == weak.status_code == 400
        assert taken.json() == weak.json()
        assert create(b_api, B_KEY).status_code == 201
