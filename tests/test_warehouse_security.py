"""Issue 11, the warehouse (`/api`): list filters in linear time, password checks off the shared
pool and rate-limited, quotas reserved atomically (pushes, executions), executions validated and
stopped at the quota, aborts that clean up, operator layers kept out of reach, layer_name unique
in the store, and no 500 from client input. Over real HTTP (uvicorn on loopback), two users in
two datastores, parallel requests with asyncio.gather."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from apputil import free_port, layer_descriptor, live_server
from test_warehouse_support import (
    LOGIN,
    PASSWORD,
    SOURCES,
    add_user,
    scan_files,
    token,
    wait_for,
    warehouse_settings,
)

from tileserver.publication.store import PublicationStore
from tileserver.settings import Settings
from tileserver.warehouse.accounts import Accounts
from tileserver.warehouse.processings import RASTER_TO_PYRAMID

OTHER, OTHER_PASSWORD = "ana", "ana-pass"
DEFAULT = "/api/datastores/default"
GEO = "/api/datastores/geo"
FAST = {"tms": "PM", "bottom": "10", "top": "9", "compression": "jpg", "width": 2, "height": 2}


@contextlib.contextmanager
def tenants(tmp_path: Path, geo_quota: int = 2 << 20, **overrides) -> Iterator[tuple[str, Settings]]:
    """A server, user jdupont in `default` and user ana in `geo` (quota `geo_quota`)."""
    settings = warehouse_settings(tmp_path, **overrides)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    store = PublicationStore(settings.resolved_store_url)
    try:
        Accounts(store).add_datastore("geo", quota=geo_quota)
    finally:
        store.close()
    add_user(settings)
    add_user(settings, OTHER, OTHER_PASSWORD, "Martin", ("geo",))
    with live_server(settings) as url:
        yield url, settings


@contextlib.asynccontextmanager
async def client_of(url: str, login: str = LOGIN, password: str = PASSWORD) -> AsyncIterator[httpx.AsyncClient]:
    with httpx.Client(base_url=url) as sync:
        bearer = token(sync, login, password)
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 headers={"Authorization": f"Bearer {bearer}"}) as client:
        yield client


async def new_upload(client: httpx.AsyncClient, base: str, name: str = "up") -> str:
    answer = await client.post(f"{base}/uploads", json={"name": name, "srs": "EPSG:2154", "type": "RASTER"})
    assert answer.status_code == 201, answer.text
    return answer.json()["_id"]


async def push(client: httpx.AsyncClient, base: str, upload: str, rel: str, data: bytes) -> httpx.Response:
    return await client.post(f"{base}/uploads/{upload}/data", params={"path": rel}, files={"file": ("f", data)})


async def closed(client: httpx.AsyncClient, base: str) -> str:
    upload = await new_upload(client, base)
    for rel, local in scan_files().items():
        assert (await push(client, base, upload, rel, local.read_bytes())).status_code == 200
    assert (await client.post(f"{base}/uploads/{upload}/close")).status_code == 200
    for _ in range(600):
        status = (await client.get(f"{base}/uploads/{upload}")).json()["status"]
        if status != "CHECKING":
            break
        await asyncio.sleep(0.1)
    assert status == "CLOSED"
    return upload


async def processing(client: httpx.AsyncClient, base: str) -> str:
    return (await client.get(f"{base}/processings", params={"name": RASTER_TO_PYRAMID})).json()[0]["_id"]


async def create_execution(client: httpx.AsyncClient, base: str, upload: str, parameters: dict,
                           name: str = "pyr") -> httpx.Response:
    return await client.post(f"{base}/processings/executions", json={
        "processing": await processing(client, base), "inputs": {"upload": [upload]},
        "output": {"stored_data": {"name": name}}, "parameters": parameters})


async def ended(client: httpx.AsyncClient, base: str, execution: str) -> dict:
    for _ in range(1200):
        body = (await client.get(f"{base}/processings/executions/{execution}")).json()
        if body["status"] in ("SUCCESS", "FAILURE", "ABORTED"):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"execution {execution} did not end")


def admin_layer(url: str, descriptor: dict) -> None:
    """The operator publishes SCAN1000 through the ROK4 admin API."""
    answer = httpx.post(f"{url}/admin/layers/SCAN1000", json=descriptor, headers={"Authorization": "Bearer secret"})
    assert answer.status_code in (200, 201, 204), answer.text


def problems(answer: httpx.Response) -> str:
    body = answer.json()
    assert set(body) == {"error", "error_description"}, body
    return " ".join(body["error_description"])


# --- 3a: list filters -------------------------------------------------------------------------------


async def test_list_filters_match_in_linear_time(tmp_path: Path) -> None:
    with tenants(tmp_path) as (url, _):
        async with client_of(url) as client:
            await new_upload(client, DEFAULT, "a" * 250)
            await new_upload(client, DEFAULT, "SCAN1000 de la Corse")
            started = time.perf_counter()
            # a backtracking regex took 13 s on 500 characters (minutes on 1,000) for this pattern
            found = await client.get(f"{DEFAULT}/uploads", params={"name": "%a%a%a%a%a%a%a%a%a%a%a%a%b"})
            print(f"adversarial filter answered in {time.perf_counter() - started:.3f} s")
            assert found.status_code == 200 and found.json() == []
            hits = await client.get(f"{DEFAULT}/uploads", params={"name": "%CORSE"})
            assert [u["name"] for u in hits.json()] == ["SCAN1000 de la Corse"]
            assert [u["name"] for u in (await client.get(f"{DEFAULT}/uploads",
                                                        params={"name": "scan%de%corse"})).json()] == \
                ["SCAN1000 de la Corse"]
            assert (await client.get(f"{DEFAULT}/uploads", params={"name": "SCAN%x%"})).json() == []
            too_long = await client.get(f"{DEFAULT}/uploads", params={"name": "%a" * 500})
            assert too_long.status_code == 400 and "at most" in problems(too_long)


# --- 3b: password checks ------------------------------------------------------------------------------


def _token_form(login: str, password: str) -> dict:
    return {"grant_type": "password", "username": login, "password": password, "client_id": "x"}


async def test_token_failures_are_rate_limited_per_login_and_address(tmp_path: Path) -> None:
    with tenants(tmp_path, warehouse_login_failures=3, warehouse_address_failures=6) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            statuses = [(await client.post("/api/token", data=_token_form(LOGIN, "wrong"))).status_code
                        for _ in range(3)]
            assert statuses == [401, 401, 401]
            limited = await client.post("/api/token", data=_token_form(LOGIN, PASSWORD))
            assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
            assert "login" in limited.json()["error_description"]
            # another login from the same address still works until the address's own limit
            assert (await client.post("/api/token", data=_token_form(OTHER, OTHER_PASSWORD))).status_code == 200
            for i in range(3):
                assert (await client.post("/api/token", data=_token_form(f"nobody{i}", "x"))).status_code == 401
            by_address = await client.post("/api/token", data=_token_form(OTHER, OTHER_PASSWORD))
            assert by_address.status_code == 429 and "address" in by_address.json()["error_description"]
            assert int(by_address.headers["Retry-After"]) >= 1


async def test_password_hashing_has_its_own_bounded_executor(tmp_path: Path) -> None:
    """A flood of logins waits on the hashing thread (or is told 503), never on the default pool
    that rendering and the rest of /api share."""
    with tenants(tmp_path, warehouse_hash_threads=1, warehouse_hash_queue=1, warehouse_login_failures=100,
                 warehouse_address_failures=100) as (url, settings):
        admin_layer(url, layer_descriptor("SCAN1000"))
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            getmap = {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": "SCAN1000", "STYLES": "",
                      "CRS": "EPSG:3857", "BBOX": "166000,5780000,266000,5880000", "WIDTH": "256", "HEIGHT": "256",
                      "FORMAT": "image/png"}
            flood = [client.post("/api/token", data=_token_form(f"user{i}", "wrong")) for i in range(12)]
            started = time.perf_counter()
            answers = await asyncio.gather(*flood, client.get("/wms", params=getmap))
            *logins, rendered = answers
            print(f"GetMap during a login flood: {time.perf_counter() - started:.3f} s (flood included)")
            assert rendered.status_code == 200
            statuses = sorted(a.status_code for a in logins)
            assert set(statuses) <= {401, 503} and 503 in statuses, statuses
            busy = next(a for a in logins if a.status_code == 503)
            assert busy.headers["Retry-After"] == "1"


# --- 5: quotas ----------------------------------------------------------------------------------------------


async def test_parallel_pushes_never_exceed_the_quota(tmp_path: Path) -> None:
    with tenants(tmp_path, geo_quota=2 << 20) as (url, _):
        async with client_of(url, OTHER, OTHER_PASSWORD) as ana, client_of(url) as jean:
            upload = await new_upload(ana, GEO)
            mine = await new_upload(jean, DEFAULT)
            chunk = os.urandom(1500 << 10)  # 1.5 MB each: one fits in 2 MB, two do not
            answers = await asyncio.gather(*[push(ana, GEO, upload, f"f{i}.bin", chunk) for i in range(6)],
                                           push(jean, DEFAULT, mine, "big.bin", chunk * 2))
            *geo, default = answers
            assert default.status_code == 200  # the other datastore's quota is its own
            assert sorted(a.status_code for a in geo) == [200, 400, 400, 400, 400, 400], [a.text for a in geo]
            assert all("quota" in problems(a) for a in geo if a.status_code == 400)
            datastore = (await ana.get(GEO)).json()
            assert datastore["storages"]["uploads"]["use"] <= 2 << 20
            size = (await ana.get(f"{GEO}/uploads/{upload}")).json()["size"]
            assert size == len(chunk)
            # the refused pushes released their reservations: what is left can be used
            assert (await push(ana, GEO, upload, "small.bin", b"x" * 1000)).status_code == 200


async def _slow_body(boundary: str, data: bytes, started: asyncio.Event, release: asyncio.Event) -> AsyncIterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n").encode()
    started.set()
    await release.wait()
    yield data
    yield f"\r\n--{boundary}--\r\n".encode()


async def _push_in_flight(client: httpx.AsyncClient, upload: str) -> tuple[asyncio.Task, asyncio.Event]:
    """A push of `slow.bin` whose body waits for `release`: the server has its headers and holds the
    reservation when this returns."""
    boundary, data = "b0undary", b"y" * 1000
    started, release = asyncio.Event(), asyncio.Event()
    length = len(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\n"
                 ) + len(data) + len(f"\r\n--{boundary}--\r\n")
    pushing = asyncio.create_task(client.post(
        f"{GEO}/uploads/{upload}/data", params={"path": "slow.bin"},
        content=_slow_body(boundary, data, started, release),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)}))
    await started.wait()
    await asyncio.sleep(0.5)
    return pushing, release


async def test_close_refuses_while_a_push_is_received(tmp_path: Path) -> None:
    with tenants(tmp_path) as (url, _):
        async with client_of(url, OTHER, OTHER_PASSWORD) as ana:
            upload = await new_upload(ana, GEO)
            pushing, release = await _push_in_flight(ana, upload)
            refused = await ana.post(f"{GEO}/uploads/{upload}/close")
            assert refused.status_code == 409 and "pushed" in problems(refused)
            release.set()
            assert (await pushing).status_code == 200
            assert (await ana.post(f"{GEO}/uploads/{upload}/close")).status_code == 200
            late = await push(ana, GEO, upload, "late.bin", b"z" * 10)
            assert late.status_code == 400
            tree = (await ana.get(f"{GEO}/uploads/{upload}/tree")).json()
            assert [n["name"] for n in tree] == ["slow.bin"]


async def test_delete_refuses_while_a_push_is_received(tmp_path: Path) -> None:
    """As close: a push in flight would write into an upload removed under it."""
    with tenants(tmp_path) as (url, _):
        async with client_of(url, OTHER, OTHER_PASSWORD) as ana:
            upload = await new_upload(ana, GEO)
            pushing, release = await _push_in_flight(ana, upload)
            refused = await ana.delete(f"{GEO}/uploads/{upload}")
            assert refused.status_code == 409 and "pushed" in problems(refused)
            release.set()
            assert (await pushing).status_code == 200
            assert (await ana.delete(f"{GEO}/uploads/{upload}")).status_code == 204
            assert (await ana.get(f"{GEO}/uploads/{upload}")).status_code == 404
            assert (await ana.get(GEO)).json()["storages"]["uploads"]["use"] == 0


async def test_executions_are_validated_and_estimated(tmp_path: Path) -> None:
    with tenants(tmp_path, geo_quota=300 << 10) as (url, _):
        async with client_of(url, OTHER, OTHER_PASSWORD) as ana:
            upload = await closed(ana, GEO)
            huge = await create_execution(ana, GEO, upload, {**FAST, "width": 100000, "height": 100000})
            assert huge.status_code == 400 and "parameters.width" in problems(huge) \
                and "parameters.height" in problems(huge)
            oversampled = await create_execution(ana, GEO, upload, {**FAST, "bottom": "16", "top": "9"})
            assert oversampled.status_code == 400 and "parameters.bottom" in problems(oversampled)
            over_quota = await create_execution(ana, GEO, upload, {**FAST, "bottom": "12", "top": "0",
                                                                   "compression": "png"})
            assert over_quota.status_code == 400 and "quota" in problems(over_quota)
            fits = await create_execution(ana, GEO, upload, FAST)
            assert fits.status_code == 201, fits.text
            # nothing was created for the refused ones
            assert len((await ana.get(f"{GEO}/stored_data")).json()) == 1


async def test_an_execution_crossing_the_quota_is_stopped(tmp_path: Path) -> None:
    """The worker measures its output while it runs: past what the datastore may take (here the
    operator lowered the quota after the launch) it stops, FAILURE, its partial output removed."""
    with tenants(tmp_path, geo_quota=1 << 30) as (url, settings):
        async with client_of(url, OTHER, OTHER_PASSWORD) as ana, client_of(url) as jean:
            upload = await closed(ana, GEO)
            created = await create_execution(ana, GEO, upload, {"tms": "PM", "bottom": "12", "top": "0",
                                                                "compression": "png"})
            assert created.status_code == 201, created.text
            execution = created.json()
            stored_id = execution["output"]["stored_data"]["_id"]
            assert (await ana.post(f"{GEO}/processings/executions/{execution['_id']}/launch")).status_code == 200
            pyramids = Path(settings.data_dir) / "pyramids"
            for _ in range(600):
                if pyramids.is_dir() and any(p.is_file() for p in pyramids.rglob("*")):
                    break
                await asyncio.sleep(0.05)
            store = PublicationStore(settings.resolved_store_url)
            try:
                with store.transaction(publish=False) as db:
                    db.execute("UPDATE wh_datastores SET quota = 1000 WHERE name = 'geo'")
            finally:
                store.close()
            done = await ended(ana, GEO, execution["_id"])
            logs = (await ana.get(f"{GEO}/processings/executions/{execution['_id']}/logs")).json()
            assert done["status"] == "FAILURE", logs
            assert any("quota exceeded" in line for line in logs), logs
            await _settled(ana, GEO, stored_id, settings)
            datastore = (await ana.get(GEO)).json()
            assert datastore["storages"]["data"][0]["use"] == 0
            # the other tenant saw none of it
            assert (await jean.get(f"{DEFAULT}/stored_data")).json() == []


async def test_an_execution_on_s3_crossing_the_quota_is_stopped(tmp_path: Path, s3_server, s3_bucket,
                                                                 s3_settings) -> None:
    """On S3 too the worker measures its running output (one listing with sizes, every
    `warehouse_s3_measure_every` seconds) and stops past the quota, before the build ends."""
    with tenants(tmp_path, geo_quota=1 << 30, s3_clusters=s3_settings.s3_clusters,
                 warehouse_pyramids=f"s3://{s3_bucket}/computed", warehouse_s3_measure_every=0.5) as (url, settings):
        async with client_of(url, OTHER, OTHER_PASSWORD) as ana:
            upload = await closed(ana, GEO)
            created = await create_execution(ana, GEO, upload, {"tms": "PM", "bottom": "12", "top": "0",
                                                                "compression": "png"})
            assert created.status_code == 201, created.text
            execution = created.json()
            store = PublicationStore(settings.resolved_store_url)
            try:  # the operator lowers the quota once the build is writing
                assert (await ana.post(f"{GEO}/processings/executions/{execution['_id']}/launch")).status_code == 200
                for _ in range(600):
                    if s3_server.list_keys(s3_bucket, "computed/"):
                        break
                    await asyncio.sleep(0.05)
                with store.transaction(publish=False) as db:
                    db.execute("UPDATE wh_datastores SET quota = 1000 WHERE name = 'geo'")
            finally:
                store.close()
            done = await ended(ana, GEO, execution["_id"])
            logs = (await ana.get(f"{GEO}/processings/executions/{execution['_id']}/logs")).json()
            assert done["status"] == "FAILURE", logs
            assert any("quota exceeded" in line for line in logs), logs
            # stopped while running (the build goes from the bottom level up: level 0 never ended),
            # and nothing is left on S3
            assert not any(" level 0: " in line and " slabs in " in line for line in logs), logs
            stored_id = execution["output"]["stored_data"]["_id"]
            for _ in range(300):
                left = s3_server.list_keys(s3_bucket, f"computed/{stored_id}")
                stored = (await ana.get(f"{GEO}/stored_data/{stored_id}")).json()
                if stored["status"] == "UNSTABLE" and not left:
                    break
                await asyncio.sleep(0.1)
            assert stored["status"] == "UNSTABLE" and not left, (stored["status"], left)


async def _settled(client: httpx.AsyncClient, base: str, stored_id: str, settings: Settings) -> None:
    """The stored data ends UNSTABLE with no file left on disk."""
    pyramids = Path(settings.data_dir) / "pyramids"
    for _ in range(300):
        stored = (await client.get(f"{base}/stored_data/{stored_id}")).json()
        left = list(pyramids.glob(f"{stored_id}*")) if pyramids.is_dir() else []
        if stored["status"] == "UNSTABLE" and not left:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"stored data {stored_id} is {stored['status']}, files left: {left}")


# --- 6: lifecycle -------------------------------------------------------------------------------------


async def test_abort_of_a_running_execution_removes_its_output(tmp_path: Path) -> None:
    with tenants(tmp_path, geo_quota=1 << 30) as (url, settings):
        async with client_of(url, OTHER, OTHER_PASSWORD) as ana:
            upload = await closed(ana, GEO)
            created = await create_execution(ana, GEO, upload, {"tms": "PM", "bottom": "12", "top": "0",
                                                                "compression": "jpg"})
            assert created.status_code == 201, created.text
            execution = created.json()
            stored_id = execution["output"]["stored_data"]["_id"]
            assert (await ana.post(f"{GEO}/processings/executions/{execution['_id']}/launch")).status_code == 200
            for _ in range(600):
                if (await ana.get(f"{GEO}/stored_data/{stored_id}")).json()["status"] == "GENERATING":
                    break
                await asyncio.sleep(0.05)
            aborted = await ana.post(f"{GEO}/processings/executions/{execution['_id']}/abort")
            assert aborted.status_code == 200 and aborted.json()["status"] == "ABORTED"
            await _settled(ana, GEO, stored_id, settings)
            store = PublicationStore(settings.resolved_store_url)
            try:
                from tileserver.warehouse.usage import reservations

                assert reservations(store) == []
            finally:
                store.close()


async def test_operator_restricted_layers_cannot_be_republished(tmp_path: Path) -> None:
    with tenants(tmp_path) as (url, _):
        admin_layer(url, {**layer_descriptor("SCAN1000"), "restricted": True})
        async with client_of(url) as jean:
            stored = next(s for s in (await jean.get(f"{DEFAULT}/stored_data")).json() if s["name"] == "SCAN1000")
            body = {"type": "WMTS-TMS", "name": "copy", "layer_name": "scan_copy",
                    "type_infos": {"title": "t", "abstract": "a", "keywords": [],
                                   "used_data": [{"stored_data": stored["_id"], "bottom_level": "6",
                                                  "top_level": "6"}]}}
            refused = await jean.post(f"{DEFAULT}/configurations", json=body)
            assert refused.status_code == 400 and "restricted" in problems(refused)
            assert httpx.get(f"{url}/wmts/1.0.0/WMTSCapabilities.xml").text.count("scan_copy") == 0


async def test_operator_layers_are_never_changed_through_the_api(tmp_path: Path, monkeypatch, capsys) -> None:
    """Every /api route that could reach an operator's layer leaves it alone: its read-only view in
    the default datastore takes no edit, and an /api offering whose layer the operator removed and
    published again under the same id (restricted) can neither open, rewrite nor unpublish his."""
    import json

    from tileserver.cli import main

    admin = {"Authorization": "Bearer secret"}
    pyramids = Path(__file__).parent / "data" / "pyramids"
    with tenants(tmp_path) as (url, settings):
        monkeypatch.setenv("TILESERVER_DATA_DIR", settings.data_dir)
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["stored-data", "add", str(pyramids / "SCAN1000.json"),
                                              "--datastore", "default", "--json"]) == 0
        scan = json.loads(capsys.readouterr().out)["_id"]
        async with client_of(url) as jean:
            level = (await jean.get(f"{DEFAULT}/stored_data/{scan}")).json()["type_infos"]["levels"][-1]
            body = {"type": "WMTS-TMS", "name": "mine", "layer_name": "mine",
                    "type_infos": {"title": "jean's", "abstract": "a", "keywords": [],
                                   "used_data": [{"stored_data": scan, "bottom_level": level, "top_level": level}]}}
            created = await jean.post(f"{DEFAULT}/configurations", json=body)
            assert created.status_code == 201, created.text
            configuration = created.json()["_id"]
            offered = await jean.post(f"{DEFAULT}/configurations/{configuration}/offerings",
                                      json={"endpoint": "gpf-rok4-server-wmts-tms", "open": True})
            assert offered.status_code == 201, offered.text
            offering = offered.json()["_id"]

            # the operator takes the id: removes jean's layer, publishes his own, restricted
            assert httpx.delete(f"{url}/admin/layers/mine", headers=admin).status_code == 204
            theirs = {**layer_descriptor("BDPARCELLAIRE"), "title": "operator's", "restricted": True}
            assert httpx.post(f"{url}/admin/layers/mine", json=theirs, headers=admin).status_code in (200, 201, 204)
            admin_layer(url, {**layer_descriptor("SCAN1000"), "restricted": True})

            def operator_layer() -> dict:
                answer = httpx.get(f"{url}/admin/layers/mine", headers=admin)
                assert answer.status_code == 200, "the operator's layer was removed through /api"
                return answer.json()

            listed = (await jean.get(f"{DEFAULT}/configurations")).json()
            view = next(c for c in listed if c["layer_name"] == "SCAN1000")  # shown, read-only
            assert (await jean.put(f"{DEFAULT}/configurations/{view['_id']}", json=body)).status_code == 404
            assert (await jean.delete(f"{DEFAULT}/configurations/{view['_id']}")).status_code == 404
            assert (await jean.post(f"{DEFAULT}/configurations/{view['_id']}/offerings",
                                    json={"endpoint": "gpf-rok4-server-wmts-tms", "open": True})).status_code == 404
            assert (await jean.post(f"{DEFAULT}/configurations/{view['_id']}/tags",
                                    json={"k": "v"})).status_code == 404
            assert all(o["layer_name"] != "SCAN1000" for o in (await jean.get(f"{DEFAULT}/offerings")).json())

            opened = await jean.patch(f"{DEFAULT}/offerings/{offering}", json={"open": True})
            assert opened.status_code == 409, opened.text
            assert operator_layer()["restricted"] is True
            assert (await jean.get(f"{DEFAULT}/offerings/{offering}")).json()["status"] == "UNPUBLISHED"
            rewritten = await jean.put(f"{DEFAULT}/configurations/{configuration}",
                                       json={**body, "type_infos": {**body["type_infos"], "title": "taken"}})
            assert rewritten.status_code == 409, rewritten.text  # "mine" is the operator's layer's name now
            assert operator_layer()["title"] == "operator's"
            # his stored data stays his: a stale offering naming his layer's id does not make it jean's
            bdparcellaire = next(s for s in (await jean.get(f"{DEFAULT}/stored_data")).json()
                                 if s["name"] == "BDPARCELLAIRE")
            levels = (await jean.get(f"{DEFAULT}/stored_data/{bdparcellaire['_id']}")).json()["type_infos"]["levels"]
            copy = await jean.post(f"{DEFAULT}/configurations", json={
                **body, "name": "copy", "layer_name": "copy",
                "type_infos": {**body["type_infos"], "used_data": [
                    {"stored_data": bdparcellaire["_id"], "bottom_level": levels[-1], "top_level": levels[-1]}]}})
            assert copy.status_code == 400 and "restricted" in problems(copy)
            assert (await jean.delete(f"{DEFAULT}/offerings/{offering}")).status_code == 204
            assert operator_layer()["restricted"] is True
            assert httpx.get(f"{url}/admin/layers/SCAN1000", headers=admin).json()["restricted"] is True
            capabilities = httpx.get(f"{url}/wmts/1.0.0/WMTSCapabilities.xml").text
            assert "<ows:Identifier>mine</ows:Identifier>" not in capabilities  # still restricted


async def test_layer_name_is_unique_under_racing_creations(tmp_path: Path, monkeypatch, capsys) -> None:
    import json

    from tileserver.cli import main

    with tenants(tmp_path) as (url, settings):
        monkeypatch.setenv("TILESERVER_DATA_DIR", settings.data_dir)
        pyramids = Path(__file__).parent / "data" / "pyramids"
        ids = {}
        for name, datastore in (("SCAN1000", "default"), ("BDPARCELLAIRE", "geo")):
            capsys.readouterr()
            assert await asyncio.to_thread(main, ["stored-data", "add", str(pyramids / f"{name}.json"),
                                                  "--datastore", datastore, "--json"]) == 0
            ids[datastore] = json.loads(capsys.readouterr().out)["_id"]
        async with client_of(url) as jean, client_of(url, OTHER, OTHER_PASSWORD) as ana:
            levels = {"default": "6", "geo": None}
            geo_stored = (await ana.get(f"{GEO}/stored_data/{ids['geo']}")).json()
            levels["geo"] = geo_stored["type_infos"]["levels"][-1]
            default_stored = (await jean.get(f"{DEFAULT}/stored_data/{ids['default']}")).json()
            levels["default"] = default_stored["type_infos"]["levels"][-1]

            def body(datastore: str, type_: str = "WMTS-TMS") -> dict:
                return {"type": type_, "name": "n", "layer_name": "shared_name",
                        "type_infos": {"title": "t", "abstract": "a", "keywords": [],
                                       "used_data": [{"stored_data": ids[datastore], "bottom_level": levels[datastore],
                                                      "top_level": levels[datastore]}]}}

            racing = [jean.post(f"{DEFAULT}/configurations", json=body("default")) for _ in range(4)]
            racing += [ana.post(f"{GEO}/configurations", json=body("geo")) for _ in range(4)]
            answers = await asyncio.gather(*racing)
            statuses = sorted(a.status_code for a in answers)
            assert statuses == [201] + [409] * 7, [a.text for a in answers]
            winner = next(a.json()["_id"] for a in answers if a.status_code == 201)
            for answer in answers:
                if answer.status_code == 409:
                    assert winner not in answer.text or answer.request.url.path.startswith(
                        "/api/datastores/" + ("default" if answer.request.url.path.startswith(DEFAULT) else "geo"))
            # a 409 seen from the other datastore never names the winner's id
            winner_ds = DEFAULT if any(a.status_code == 201 and a.request.url.path.startswith(DEFAULT)
                                       for a in answers) else GEO
            for answer in answers:
                if answer.status_code == 409 and not answer.request.url.path.startswith(winner_ds):
                    assert winner not in answer.text
            # the other service may share the name (commit c6e5052)
            other_service = await (jean if winner_ds == DEFAULT else ana).post(
                f"{winner_ds}/configurations", json=body("default" if winner_ds == DEFAULT else "geo", "WMS-RASTER"))
            assert other_service.status_code == 201, other_service.text


# --- 10: no 500 from input ------------------------------------------------------------------------


async def test_hostile_input_gets_problems_not_500(tmp_path: Path) -> None:
    with tenants(tmp_path) as (url, _):
        async with client_of(url) as jean:
            deep = await jean.post(f"{DEFAULT}/uploads", content=b"[" * 100000 + b"]" * 100000,
                                   headers={"Content-Type": "application/json"})
            assert deep.status_code == 400 and "nests" in problems(deep)
            upload = await new_upload(jean, DEFAULT)
            long_name = await push(jean, DEFAULT, upload, "d/" + "n" * 256, b"x")
            assert long_name.status_code == 400
            accented = await push(jean, DEFAULT, upload, "é" * 128, b"x")  # 256 bytes in UTF-8
            assert accented.status_code == 400
            assert (await push(jean, DEFAULT, upload, "a", b"x")).status_code == 200
            under_file = await push(jean, DEFAULT, upload, "a/b", b"x")
            assert under_file.status_code == 409, under_file.text
            assert (await push(jean, DEFAULT, upload, "c/d", b"x")).status_code == 200
            over_dir = await push(jean, DEFAULT, upload, "c", b"x")
            assert over_dir.status_code == 409, over_dir.text
            upper = upload.upper()
            tagged = await jean.post(f"{DEFAULT}/uploads/{upper}/tags", json={"k": "v"})
            assert tagged.status_code == 200, tagged.text
            comment = await jean.post(f"{DEFAULT}/uploads/{upper}/comments", json={"text": "hello"})
            assert comment.status_code == 200, comment.text
            assert (await jean.get(f"{DEFAULT}/uploads/{upper}/comments")).json()[0]["text"] == "hello"
            removed = await jean.delete(f"{DEFAULT}/uploads/{upper}/comments/{comment.json()['_id'].upper()}")
            assert removed.status_code == 204
            unknown = await jean.post(f"{DEFAULT}/uploads/{'F' * 8}-0000-0000-0000-{'0' * 12}/tags", json={"k": "v"})
            assert unknown.status_code == 404
            gone = await jean.post(f"{DEFAULT}/uploads/not-a-uuid/comments", json={"text": "x"})
            assert gone.status_code == 404


async def test_configuration_links_must_be_web_urls(tmp_path: Path, monkeypatch, capsys) -> None:
    import json

    from tileserver.cli import main

    with tenants(tmp_path) as (url, settings):
        monkeypatch.setenv("TILESERVER_DATA_DIR", settings.data_dir)
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["stored-data", "add", str(Path(__file__).parent / "data" / "pyramids"
                                                                        / "SCAN1000.json"), "--json"]) == 0
        stored_id = json.loads(capsys.readouterr().out)["_id"]
        async with client_of(url) as jean:
            level = (await jean.get(f"{DEFAULT}/stored_data/{stored_id}")).json()["type_infos"]["levels"][-1]
            body = {"type": "WMTS-TMS", "name": "n", "layer_name": "links",
                    "metadata": [{"format": "text/html", "type": "ISO19115:2003", "url": "javascript:alert(1)"}],
                    "attribution": {"title": "t", "url": "data:text/html,<script>x</script>"},
                    "type_infos": {"title": "t", "abstract": "a", "keywords": [],
                                   "used_data": [{"stored_data": stored_id, "bottom_level": level,
                                                  "top_level": level}]}}
            refused = await jean.post(f"{DEFAULT}/configurations", json=body)
            assert refused.status_code == 400
            assert "metadata[0].url" in problems(refused) and "attribution.url" in problems(refused)
            body["metadata"][0]["url"] = "https://example.org/meta.xml"
            body["attribution"]["url"] = "http://example.org"
            assert (await jean.post(f"{DEFAULT}/configurations", json=body)).status_code == 201


# --- 10: a full disk during a push ---------------------------------------------------------------------


def _limited_server(data_dir: Path, port: int, limit: int) -> subprocess.Popen:
    """A server process whose files may not grow past `limit` bytes (RLIMIT_FSIZE, SIGXFSZ ignored:
    a write past it fails with EFBIG, as a full file system fails with ENOSPC)."""
    import resource

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "TILESERVER_DATA_DIR": str(data_dir), "TILESERVER_ADMIN_TOKEN": "secret",
           "TILESERVER_WAREHOUSE_WORKERS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tileserver.cli", "serve", "--port", str(port), "--no-demo",
                             "--log-level", "warning"], env=env, preexec_fn=limit_files, start_new_session=True)


def test_a_full_disk_during_a_push_is_a_507_and_frees_the_reservation(tmp_path: Path) -> None:
    settings = warehouse_settings(tmp_path)
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True)
    add_user(settings)
    port = free_port()
    server = _limited_server(data_dir, port, 4 << 20)
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=30)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            client.headers["Authorization"] = f"Bearer {token(client)}"
            upload = client.post(f"{DEFAULT}/uploads", json={"name": "u", "srs": "EPSG:2154",
                                                             "type": "RASTER"}).json()["_id"]
            full = client.post(f"{DEFAULT}/uploads/{upload}/data", params={"path": "big.bin"},
                               files={"file": ("big.bin", b"\0" * (6 << 20))})
            assert full.status_code == 507, full.text
            assert full.json()["error_description"]
            assert client.get(f"{DEFAULT}/uploads/{upload}/tree").json() == []
            assert client.get(DEFAULT).json()["storages"]["uploads"]["use"] == 0  # reservation released
            small = client.post(f"{DEFAULT}/uploads/{upload}/data", params={"path": "scan.tif"},
                                files={"file": ("scan.tif", (SOURCES / "SCAN1000.tif").read_bytes())})
            assert small.status_code == 200, small.text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
