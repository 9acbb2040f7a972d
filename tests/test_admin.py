"""The ROK4-compatible admin API on the real app: statuses, problems naming fields, auth, keys,
atomic catalog swaps under concurrent writes, and changes made by another process."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from apputil import PYRAMIDS, app_client, layer_descriptor, make_settings

from tileserver.publication.model import parse_layer
from tileserver.publication.store import PublicationStore
from tileserver.runtime import Runtime

AUTH = {"Authorization": "Bearer secret"}
SCAN = layer_descriptor("SCAN1000")


def runtime_of(client: httpx.AsyncClient) -> Runtime:
    return client.app.state.runtime  # type: ignore[attr-defined]


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    if field is not None:
        assert body["field"] == field, body
    return body


@pytest.fixture
async def client(tmp_path: Path):
    async with app_client(make_settings(tmp_path)) as c:
        yield c


async def test_layer_lifecycle(client: httpx.AsyncClient) -> None:
    runtime = runtime_of(client)
    assert (await client.post("/admin/layers/scan", json=SCAN, headers=AUTH)).status_code == 204
    published = runtime.catalog.get("scan", "wmts")  # served at once, no restart, no poll
    assert published is not None and published.level_ids[0] == "0" and published.level_ids[-1] == "10"
    got = await client.get("/admin/layers/scan", headers=AUTH)
    assert got.status_code == 200 and got.json() == parse_layer("scan", SCAN).to_descriptor()
    assert_problem(await client.post("/admin/layers/scan", json=SCAN, headers=AUTH), 409, "id")

    renamed = {**SCAN, "title": "Renamed", "pyramids": [{**SCAN["pyramids"][0], "top_level": "5"}]}
    assert (await client.put("/admin/layers/scan", json=renamed, headers=AUTH)).status_code == 204
    published = runtime.catalog.get("scan", "wmts")
    assert published.layer.title == "Renamed" and published.level_ids[0] == "5"
    listing = (await client.get("/admin/layers", headers=AUTH)).json()
    assert listing == [{"id": "scan", "title": "Renamed", "restricted": False,
                        "services": ["wms", "wmts", "tms", "ogcapi"], "served": True}]

    assert (await client.delete("/admin/layers/scan", headers=AUTH)).status_code == 204
    assert runtime.catalog.get("scan", "wmts") is None
    assert_problem(await client.get("/admin/layers/scan", headers=AUTH), 404)
    assert_problem(await client.delete("/admin/layers/scan", headers=AUTH), 404)
    assert_problem(await client.put("/admin/layers/scan", json=SCAN, headers=AUTH), 404)


async def test_legacy_and_modern_keys_publish_the_same_layer(client: httpx.AsyncClient) -> None:
    legacy = {**SCAN, "wms": {"authorized": True, "crs": ["EPSG:2154"]}, "wmts": {"authorized": True, "tms": ["4326"]},
              "tms": {"authorized": False}}
    modern = {**SCAN, "wms": {"enabled": True}, "wmts": {"enabled": True}, "tms": {"enabled": False},
              "extra_crs": ["EPSG:2154"], "extra_tilematrixsets": ["4326"]}
    for layer_id, body in (("legacy", legacy), ("modern", modern)):
        assert (await client.post(f"/admin/layers/{layer_id}", json=body, headers=AUTH)).status_code == 204
    got = [(await client.get(f"/admin/layers/{i}", headers=AUTH)).json() for i in ("legacy", "modern")]
    assert got[0] == got[1] and got[0]["tms"] == {"enabled": False} and got[0]["extra_crs"] == ["EPSG:2154"]
    catalog = runtime_of(client).catalog
    assert catalog.get("legacy", "tms") is None and catalog.get("legacy", "wmts") is not None


def _pyramid(name: str, bottom: str, top: str) -> dict:
    return {"path": f"file://{PYRAMIDS}/{name}.json", "bottom_level": bottom, "top_level": top}


BAD = [
    (b'{"title": "x",', "(body)"),
    ({**SCAN, "titel": "typo"}, "titel"),
    ({k: v for k, v in SCAN.items() if k != "title"}, "title"),
    ({**SCAN, "pyramids": [{**SCAN["pyramids"][0], "path": f"file://{PYRAMIDS}/NOPE.json"}]}, "pyramids[0].path"),
    ({**SCAN, "pyramids": [{**SCAN["pyramids"][0], "path": f"file://{PYRAMIDS}/SCAN1000.list"}]}, "pyramids[0].path"),
    ({**SCAN, "pyramids": [_pyramid("SCAN1000", "25", "0")]}, "pyramids[0].bottom_level"),
    ({**SCAN, "pyramids": [_pyramid("SCAN1000", "10", "x")]}, "pyramids[0].top_level"),
    ({**SCAN, "pyramids": [_pyramid("SCAN1000", "3", "5")]}, "pyramids[0].bottom_level"),
    ({**SCAN, "pyramids": [_pyramid("SCAN1000", "8", "0"), _pyramid("BDPARCELLAIRE", "12", "9")]}, "pyramids[1]"),
    ({**SCAN, "pyramids": [_pyramid("SCAN1000", "8", "0"), _pyramid("MONTAGNE", "12", "8")]}, "pyramids[1]"),
    ({**SCAN, "wms": {"enabled": "yes"}}, "wms.enabled"),
    ({**SCAN, "bbox": {"west": 3, "south": 46, "east": 2, "north": 47}}, "bbox"),
    ({**SCAN, "bbox": {"west": 1, "south": 46, "east": 2}}, "bbox.north"),
    ({**SCAN, "restricted": "yes"}, "restricted"),
    ([SCAN], "(root)"),
]  # fmt: skip


async def test_bad_descriptors_are_refused_and_nothing_is_lost(client: httpx.AsyncClient) -> None:
    runtime = runtime_of(client)
    await client.post("/admin/layers/scan", json=SCAN, headers=AUTH)
    before = (await client.get("/admin/layers/scan", headers=AUTH)).json()
    revision = runtime.store.revision()
    for body, field in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        assert_problem(await client.post("/admin/layers/other", content=content, headers=AUTH), 400, field)
        assert_problem(await client.put("/admin/layers/scan", content=content, headers=AUTH), 400, field)
    assert_problem(await client.post("/admin/layers/-bad", json=SCAN, headers=AUTH), 400, "id")
    huge = json.dumps({**SCAN, "abstract": "x" * (2 << 20)}).encode()
    assert_problem(await client.put("/admin/layers/scan", content=huge, headers=AUTH), 413, "(body)")
    assert runtime.store.revision() == revision  # nothing written
    assert (await client.get("/admin/layers/scan", headers=AUTH)).json() == before
    assert_problem(await client.get("/admin/layers/other", headers=AUTH), 404)
    published = runtime.catalog.get("scan", "wmts")
    assert published is not None and published.layer.title == SCAN["title"]
    tile = await published.get_tile("10", published.limits["10"].min_col, published.limits["10"].min_row)
    assert tile and tile.startswith(b"\x89PNG")


async def test_two_pyramids_one_layer(client: httpx.AsyncClient) -> None:
    body = {**SCAN, "pyramids": [_pyramid("SCAN1000", "8", "0"), _pyramid("MONTAGNE", "12", "9")]}
    assert (await client.post("/admin/layers/mixed", json=body, headers=AUTH)).status_code == 204
    published = runtime_of(client).catalog.get("mixed", "wmts")
    assert published.level_ids == tuple(str(z) for z in range(13))
    assert published.owners["12"].name == "MONTAGNE" and published.owners["8"].name == "SCAN1000"
    # both pyramids are now known stored data, linked to the layer
    store = runtime_of(client).store
    assert {d.name for d in store.list_stored_data()} == {"SCAN1000", "MONTAGNE"}
    assert store.list_stored_data()[0].summary["tile_matrix_set"] == "PM"


ROUTES = [
    ("GET", "/admin/layers"), ("GET", "/admin/layers/scan"), ("POST", "/admin/layers/scan"),
    ("PUT", "/admin/layers/scan"), ("DELETE", "/admin/layers/scan"), ("PUT", "/admin/on"), ("PUT", "/admin/off"),
    ("GET", "/admin/keys"), ("POST", "/admin/keys"), ("DELETE", "/admin/keys/k"),
]  # fmt: skip


async def test_admin_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token = "tok-7f3e9c1d5a"
    caplog.set_level(logging.DEBUG)
    async with app_client(make_settings(tmp_path, admin_token=token)) as client:
        for method, url in ROUTES:
            missing = assert_problem(await client.request(method, url, json=SCAN), 401)
            assert "Bearer" in (await client.request(method, url)).headers["www-authenticate"]
            assert "TILESERVER" not in missing["detail"]
            for headers in ({"Authorization": "Bearer nope"}, {"X-Rok4-Secret": "nope"},
                            {"Authorization": f"Bearer {token}x"}, {"X-Rok4-Secret": token[:-1]}):
                assert_problem(await client.request(method, url, json=SCAN, headers=headers), 403)
        ok = {"X-Rok4-Secret": token}
        assert (await client.post("/admin/layers/scan", json=SCAN, headers=ok)).status_code == 204
        assert (await client.get("/admin/layers/scan", headers={"authorization": f"bearer {token}"})).status_code == 200
    assert token not in caplog.text


async def test_admin_disabled_without_token_outside_the_demo(tmp_path: Path) -> None:
    async with app_client(make_settings(tmp_path, admin_token="")) as client:
        for method, url in ROUTES:
            body = assert_problem(await client.request(method, url, headers=AUTH), 403)
            assert body["detail"] == "admin API disabled: set TILESERVER_ADMIN_TOKEN"
    async with app_client(make_settings(tmp_path / "demo", admin_token="", demo=True)) as client:
        assert (await client.get("/admin/layers")).status_code == 200


async def test_on_off(client: httpx.AsyncClient) -> None:
    runtime = runtime_of(client)
    assert (await client.put("/admin/off", headers=AUTH)).status_code == 204 and runtime.enabled is False
    assert (await client.put("/admin/on", headers=AUTH)).status_code == 204 and runtime.enabled is True


async def test_restricted_layers_and_api_keys(client: httpx.AsyncClient) -> None:
    runtime = runtime_of(client)
    await client.post("/admin/layers/secret", json={**SCAN, "restricted": True}, headers=AUTH)
    await client.post("/admin/layers/open", json=SCAN, headers=AUTH)
    assert (await client.get("/admin/layers/secret", headers=AUTH)).json()["restricted"] is True
    assert runtime.catalog.get("secret", "wmts") is None  # anonymous: as if it did not exist
    assert [p.id for p in runtime.catalog.visible("wmts")] == ["open"]
    # a ROK4 descriptor says nothing of access: replacing the layer keeps it restricted
    assert (await client.put("/admin/layers/secret", json={**SCAN, "title": "T2"}, headers=AUTH)).status_code == 204
    assert (await client.get("/admin/layers/secret", headers=AUTH)).json()["restricted"] is True
    assert runtime.catalog.get("secret", "wmts") is None and runtime.catalog.layers["secret"].layer.title == "T2"
    # saying it opens (or closes) the layer
    await client.put("/admin/layers/open", json={**SCAN, "restricted": True}, headers=AUTH)
    assert runtime.catalog.get("open", "wmts") is None
    await client.put("/admin/layers/open", json={**SCAN, "restricted": False}, headers=AUTH)
    assert runtime.catalog.get("open", "wmts") is not None

    created = await client.post("/admin/keys", json={"name": "partner", "layers": ["secret"]}, headers=AUTH)
    assert created.status_code == 201
    key_id, key = created.json()["id"], created.json()["key"]
    everything = (await client.post("/admin/keys", json={"name": "all", "layers": "*"}, headers=AUTH)).json()
    assert everything["layers"] == ["*"] and created.json()["layers"] == ["secret"]
    granted, all_hash = PublicationStore.hash_key(key), PublicationStore.hash_key(everything["key"])
    assert runtime.catalog.get("secret", "wmts", granted) is not None
    assert runtime.catalog.get("secret", "wmts", all_hash) is not None
    assert runtime.catalog.get("secret", "wmts", PublicationStore.hash_key("guess")) is None
    assert runtime.catalog.get("open", "wmts") is not None

    listed = (await client.get("/admin/keys", headers=AUTH)).json()
    assert [k["name"] for k in listed] == ["partner", "all"] and key not in json.dumps(listed)
    assert granted not in json.dumps(listed)
    assert (await client.delete(f"/admin/keys/{key_id}", headers=AUTH)).status_code == 204
    assert runtime.catalog.get("secret", "wmts", granted) is None  # revoked: refused at once
    assert runtime.catalog.get("secret", "wmts", all_hash) is not None
    assert_problem(await client.delete("/admin/keys/nope", headers=AUTH), 404)

    for body, field in (({"name": "x", "layers": ["secret", "nope"]}, "layers[1]"), ({"layers": ["secret"]}, "name"),
                        ({"name": "x", "layers": []}, "layers"), ([], "(root)")):
        assert_problem(await client.post("/admin/keys", json=body, headers=AUTH), 400, field)
    assert_problem(await client.post("/admin/keys", content=b"{", headers=AUTH), 400, "(body)")


async def test_concurrent_writes_and_tile_reads_never_see_a_partial_layer(client: httpx.AsyncClient) -> None:
    runtime = runtime_of(client)
    versions = {
        "A": {**SCAN, "title": "A", "keywords": ["a"]},
        "B": {**SCAN, "title": "B", "keywords": ["b", "b"], "pyramids": [_pyramid("SCAN1000", "10", "6")],
              "bbox": {"west": 1.5, "south": 46.1, "east": 2.0, "north": 46.3}},
    }  # fmt: skip
    expected = {title: parse_layer("scan", body) for title, body in versions.items()}
    levels = {"A": tuple(str(z) for z in range(11)), "B": tuple(str(z) for z in range(6, 11))}
    await client.post("/admin/layers/scan", json=versions["A"], headers=AUTH)
    done = asyncio.Event()
    seen: dict[str, int] = {"A": 0, "B": 0}

    async def writer(offset: int) -> None:
        for i in range(12):
            title = "AB"[(i + offset) % 2]
            response = await client.put("/admin/layers/scan", json=versions[title], headers=AUTH)
            assert response.status_code == 204

    async def reader() -> None:
        while not done.is_set():
            published = runtime.catalog.get("scan", "wmts")
            title = published.layer.title
            assert published.layer == expected[title]  # the whole record of one version
            assert published.level_ids == levels[title]  # and the pyramids opened for that version
            lim = published.limits["10"]
            assert await published.get_tile("10", lim.min_col, lim.min_row)
            seen[title] += 1
            await asyncio.sleep(0)

    readers = [asyncio.create_task(reader()) for _ in range(3)]
    await asyncio.gather(*(writer(k) for k in range(2)))
    done.set()
    await asyncio.gather(*readers)
    assert seen["A"] > 10 and seen["B"] > 10, seen


async def test_a_change_by_another_process_is_served_without_restart(client: httpx.AsyncClient, tmp_path: Path) -> None:
    runtime = runtime_of(client)
    descriptor = tmp_path / "other.json"
    descriptor.write_text(json.dumps(layer_descriptor("MONTAGNE")))
    env = {"TILESERVER_DATA_DIR": runtime.settings.data_dir, "PATH": "/usr/bin:/bin"}

    def cli(*argv: str) -> None:
        code = f"import sys; from tileserver.cli import main; sys.exit(main({list(argv)!r}))"
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=60)

    async def until(condition) -> float:
        start = time.monotonic()
        while not condition():
            assert time.monotonic() - start < 5, "not seen within 5 s"
            await asyncio.sleep(0.05)
        return time.monotonic() - start

    await asyncio.to_thread(cli, "layers", "add", "other", str(descriptor), "--restricted")
    await until(lambda: "other" in runtime.catalog.layers)
    assert runtime.catalog.layers["other"].restricted and runtime.catalog.get("other", "wmts") is None
    descriptor.write_text(json.dumps({**layer_descriptor("MONTAGNE"), "title": "updated"}))
    await asyncio.to_thread(cli, "layers", "update", "other", str(descriptor))
    await until(lambda: runtime.catalog.layers["other"].layer.title == "updated")
    assert runtime.catalog.layers["other"].restricted  # the file does not say: access unchanged
    await asyncio.to_thread(cli, "layers", "remove", "other")
    await until(lambda: "other" not in runtime.catalog.layers)


async def test_a_record_may_show_another_name_per_service(tmp_path):
    """`name` (tileserver extension): the WMS record `S.wms` answers as `S` in WMS, beside the WMTS record `S`."""
    headers = {"Authorization": "Bearer secret"}
    async with app_client(make_settings(tmp_path, admin_token="secret")) as client:
        wmts_only = layer_descriptor("SCAN1000", wms={"enabled": False}, title="tiles")
        wms_only = {**layer_descriptor("SCAN1000", wmts={"enabled": False}, tms={"enabled": False},
                                       ogcapi={"enabled": False}, title="map"), "name": "S"}
        assert (await client.post("/admin/layers/S", json=wmts_only, headers=headers)).status_code in (201, 204)
        assert (await client.post("/admin/layers/S.wms", json=wms_only, headers=headers)).status_code in (201, 204)
        bad = await client.post("/admin/layers/X", json={**wms_only, "name": "../x"}, headers=headers)
        assert_problem(bad, 400, "name")
        await runtime_of(client).refresh()
        wms = (await client.get("/wms?SERVICE=WMS&REQUEST=GetCapabilities")).text
        wmts = (await client.get("/wmts?SERVICE=WMTS&REQUEST=GetCapabilities")).text
        assert "<Name>S</Name>" in wms and "S.wms" not in wms and "<Title>map</Title>" in wms
        assert "<ows:Identifier>S</ows:Identifier>" in wmts and "<ows:Title>tiles</ows:Title>" in wmts
        assert "S.wms" not in wmts
        # a second record showing the same name in the same service: the first record id keeps it
        clash = {**layer_descriptor("SCAN1000", title="other"), "name": "S"}
        assert (await client.post("/admin/layers/T", json=clash, headers=headers)).status_code in (201, 204)
        await runtime_of(client).refresh()
        wmts = (await client.get("/wmts?SERVICE=WMTS&REQUEST=GetCapabilities")).text
        assert wmts.count("<ows:Identifier>S</ows:Identifier>") == 1 and "<ows:Title>tiles</ows:Title>" in wmts
        assert (await client.get("/admin/layers/S.wms", headers=headers)).json()["name"] == "S"
