"""The warehouse API in-process: accounts, uploads and checks, processings and executions, stored
data, configurations and offerings, with the seeds' requests replayed and each client mistake
answered by the documented error. Every test runs on both store engines (SQLite, PostgreSQL)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from test_warehouse_support import (
    BASE,
    SOURCES,
    app_with_user,
    closed_upload,
    poll,
    scan_files,
    write_geotiff,
)

from tileserver.warehouse.endpoints import WFS, WFS_PRIVATE, WMS_R, WMS_V, WMS_V_PRIVATE, WMTS_TMS
from tileserver.warehouse.processings import (
    RASTER_TO_PYRAMID,
    RASTER_TO_PYRAMID_OR_UPDATE,
    VECTOR_TO_BASE,
    VECTOR_TO_PYRAMID,
    WMS_TO_PYRAMID,
)

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
FAST = {"tms": "PM", "bottom": "10", "top": "9", "compression": "jpg", "width": 2, "height": 2}

pytestmark = pytest.mark.usefixtures("store_backend")


def _problems(answer) -> list[str]:
    body = answer.json()
    assert set(body) == {"error", "error_description"} and isinstance(body["error_description"], list), body
    return body["error_description"]


async def _processing(client, name: str) -> dict:
    [found] = (await client.get(f"{BASE}/processings", params={"name": name})).json()
    return found


async def _endpoint(client, technical_name: str) -> str:
    datastore = (await client.get(BASE)).json()
    return next(e["endpoint"]["_id"] for e in datastore["endpoints"] if e["endpoint"]["technical_name"] == technical_name)


async def _execute(client, upload_id: str, parameters: dict, name: str = "pyr") -> dict:
    processing = await _processing(client, RASTER_TO_PYRAMID)
    answer = await client.post(f"{BASE}/processings/executions", json={
        "processing": processing["_id"], "inputs": {"upload": [upload_id]},
        "output": {"stored_data": {"name": name, "storage_tags": ["PYRAMIDE"]}}, "parameters": parameters})
    assert answer.status_code == 201, answer.text
    return answer.json()


async def _generated(client, tmp_path: Path) -> dict:
    upload = await closed_upload(client, scan_files())
    execution = await _execute(client, upload["_id"], FAST)
    assert (await client.post(f"{BASE}/processings/executions/{execution['_id']}/launch")).status_code == 200
    done = await poll(client, f"{BASE}/processings/executions/{execution['_id']}",
                      lambda e: e["status"] in ("SUCCESS", "FAILURE"))
    assert done["status"] == "SUCCESS", (await client.get(f"{BASE}/processings/executions/{done['_id']}/logs")).json()
    return (await client.get(f"{BASE}/stored_data/{execution['output']['stored_data']['_id']}")).json()


# --- accounts ---------------------------------------------------------------------------------------


async def test_token_and_identity(tmp_path: Path) -> None:
    async with app_with_user(tmp_path) as client:
        bad = await client.post("/api/token", data={"grant_type": "password", "username": "jdupont", "password": "no"})
        assert bad.status_code == 401 and bad.json()["error"] == "invalid_grant" and bad.json()["error_description"]
        good = await client.post("/api/token", data={"grant_type": "client_credentials", "client_id": "jdupont",
                                                     "client_secret": "s3cret-pass"})
        assert good.status_code == 200 and good.json()["token_type"] == "Bearer" and good.json()["expires_in"] > 0
        assert (await client.get("/api/users/me", headers={"Authorization": ""})).status_code == 401
        assert (await client.get("/api/users/me", headers={"Authorization": "Bearer nope"})).status_code == 401
        me = (await client.get("/api/users/me", headers={"Content-Type": "application/json"})).json()
        assert me["last_name"] == "Dupont" and UUID.match(me["_id"])
        [member] = me["communities_member"]
        datastore = (await client.get(f"/api/datastores/{member['community']['datastore']}")).json()
        assert datastore["name"] == "default"
        names = {e["endpoint"]["technical_name"] for e in datastore["endpoints"]}
        assert names == {WMTS_TMS, WMS_R, WFS, WFS_PRIVATE, WMS_V, WMS_V_PRIVATE}
        assert {"quota", "use"} <= set(datastore["storages"]["uploads"])


async def test_other_datastores_are_forbidden(tmp_path: Path) -> None:
    from tileserver.publication.store import PublicationStore
    from tileserver.warehouse.accounts import Accounts

    async with app_with_user(tmp_path) as client:
        store = PublicationStore(client.settings.resolved_store_url)
        other = Accounts(store).add_datastore("other")
        store.close()
        assert (await client.get(f"/api/datastores/{other.id}/uploads")).status_code == 403
        assert (await client.get("/api/datastores/nope/uploads")).status_code == 404
        assert (await client.get(f"{BASE}/uploads/{'0' * 8}-0000-0000-0000-{'0' * 12}")).status_code == 404


def test_cli_users_and_datastores(tmp_path: Path, capsys, monkeypatch) -> None:
    import json

    import apputil

    from tileserver.cli import main

    monkeypatch.setenv("TILESERVER_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TILESERVER_STORE_URL", apputil.STORE_URL)  # the engine this test runs on
    assert main(["datastores", "add", "geo", "--quota", "1000"]) == 0
    assert main(["users", "add", "ana", "--password", "pw", "--last-name", "Martin", "--datastore", "geo"]) == 0
    assert main(["users", "add", "ana", "--password", "pw"]) == 1
    capsys.readouterr()
    assert main(["datastores", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(d["name"] for d in listed) == ["default", "geo"] and set(listed[0]) == {"_id", "name", "technical_name"}
    assert main(["users", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["datastores"] == ["geo"]
    assert main(["users", "remove", "ana"]) == 0 and main(["users", "remove", "ana"]) == 1


# --- uploads and checks -------------------------------------------------------------------------------


async def test_upload_paths_quota_and_conventions(tmp_path: Path) -> None:
    async with app_with_user(tmp_path) as client:
        bad = await client.post(f"{BASE}/uploads", json={"name": "", "type": "ARCHIVE", "srs": "EPSG:0"})
        assert bad.status_code == 400 and len(_problems(bad)) == 3
        assert (await client.post(f"{BASE}/uploads", content=b"{nope")).status_code == 400
        upload = (await client.post(f"{BASE}/uploads", json={"name": "u", "srs": "EPSG:2154", "type": "RASTER"})).json()
        assert UUID.match(upload["_id"]) and (await client.get(f"{BASE}/uploads/{upload['_id']}")).json()["status"] == "OPEN"
        data = f"{BASE}/uploads/{upload['_id']}/data"
        for path in ("../x", "/etc/x", "a/../../x", "a\\b"):
            answer = await client.post(data, params={"path": path}, files={"file": ("x", b"1")})
            assert answer.status_code == 400, path
        assert not any((Path(client.settings.data_dir).parent).glob("x"))
        assert (await client.post(data, params={"path": "a/b.tif"}, files={"file": ("b.tif", b"12")})).status_code == 200
        again = await client.post(data, params={"path": "a/b.tif"}, files={"file": ("b.tif", b"12")})
        assert again.status_code == 409
        tree = (await client.get(f"{BASE}/uploads/{upload['_id']}/tree")).json()
        assert tree == [{"name": "a", "type": "directory", "size": 2, "children": [{"name": "b.tif", "type": "file",
                                                                                  "size": 2}]}]
        assert (await client.delete(data, params={"path": "a/b.tif"})).status_code == 204
        # listing: filters, wildcards, tags, pagination with the exact filtered total
        for i in range(3):
            made = (await client.post(f"{BASE}/uploads", json={"name": f"lot-{i}", "srs": "EPSG:2154",
                                                               "type": "RASTER"})).json()
            await client.post(f"{BASE}/uploads/{made['_id']}/tags", json={"lot": str(i % 2)})
        page = await client.get(f"{BASE}/uploads", params={"name": "lot-%", "limit": 2, "page": 2})
        assert page.headers["content-range"] == "2-2/3" and [u["name"] for u in page.json()] == ["lot-2"]
        tagged = await client.get(f"{BASE}/uploads", params={"tags[lot]": "0"})
        assert sorted(u["name"] for u in tagged.json()) == ["lot-0", "lot-2"]
        assert tagged.headers["content-range"] == "0-1/2"
        assert (await client.get(f"{BASE}/uploads", params={"page": "-1"})).status_code == 400


async def test_quota_exceeded_stores_nothing(tmp_path: Path) -> None:
    from tileserver.publication.store import PublicationStore

    async with app_with_user(tmp_path) as client:
        store = PublicationStore(client.settings.resolved_store_url)
        with store.transaction() as db:
            db.execute("UPDATE wh_datastores SET quota = 1000")
        store.close()
        upload = (await client.post(f"{BASE}/uploads", json={"name": "u", "srs": "EPSG:2154", "type": "RASTER"})).json()
        answer = await client.post(f"{BASE}/uploads/{upload['_id']}/data", params={"path": "big.tif"},
                                   files={"file": ("big.tif", b"x" * 5000)})
        assert answer.status_code == 400 and "quota" in _problems(answer)[0]
        assert (await client.get(f"{BASE}/uploads/{upload['_id']}/tree")).json() == []
        assert (await client.get(f"{BASE}/uploads/{upload['_id']}")).json()["size"] == 0


async def test_checks_name_bad_files(tmp_path: Path) -> None:
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes((SOURCES / "SCAN1000.tif").read_bytes()[:60000])
    good = hashlib.md5((SOURCES / "SCAN1000.tif").read_bytes()).hexdigest()
    async with app_with_user(tmp_path) as client:
        files = {**scan_files(), "ain/cut.tif": truncated, "ain/cut.tfw": SOURCES / "SCAN1000.tfw"}
        md5 = f"{good}  ain/scan1000.tif\n{'0' * 32}  ain/cut.tif\n"
        upload = await closed_upload(client, files, md5=md5, wait_for="UNSTABLE")
        checks = (await client.get(f"{BASE}/uploads/{upload['_id']}/checks")).json()
        assert checks["asked"] == checks["in_progress"] == checks["passed"] == []
        logs = {}
        for failed in checks["failed"]:
            logs[failed["check"]["name"]] = (await client.get(f"{BASE}/checks/executions/{failed['_id']}/logs")).json()
        assert any("ain/cut.tif: md5 mismatch" in line for line in logs["Vérification standard"])
        raster = logs["Vérification raster"]
        assert any("ain/cut.tif: unreadable raster" in line for line in raster)
        assert any(line.endswith("extent 600000.00,6560000.00,620000.00,6580000.00") for line in raster)
        # reopened, the bad file removed: the upload passes
        assert (await client.post(f"{BASE}/uploads/{upload['_id']}/open")).json()["status"] == "OPEN"
        for section, rel in (("data", "ain/cut.tif"), ("data", "ain/cut.tfw"), ("md5", "x.md5")):
            assert (await client.delete(f"{BASE}/uploads/{upload['_id']}/{section}", params={"path": rel})).status_code == 204
        await client.post(f"{BASE}/uploads/{upload['_id']}/close")
        done = await poll(client, f"{BASE}/uploads/{upload['_id']}", lambda u: u["status"] != "CHECKING")
        assert done["status"] == "CLOSED" and done["extent"]["type"] == "Polygon"


# --- processings, executions, stored data -----------------------------------------------------------


async def test_processings_are_the_seeds(tmp_path: Path) -> None:
    async with app_with_user(tmp_path) as client:
        listed = (await client.get(f"{BASE}/processings")).json()
        assert {p["name"] for p in listed} == {RASTER_TO_PYRAMID, RASTER_TO_PYRAMID_OR_UPDATE, WMS_TO_PYRAMID,
                                               VECTOR_TO_BASE, VECTOR_TO_PYRAMID}
        vector = await _processing(client, VECTOR_TO_BASE)
        assert vector["input_types"] == {"upload": ["VECTOR"], "stored_data": []}
        assert vector["output_type"] == {"stored_data": "VECTOR-DB", "storage": ["POSTGRESQL"]}
        assert [p["name"] for p in vector["parameters"]] == ["srs", "update", "delete"]
        assert {c["name"] for c in vector["required_checks"]} == {"Vérification vecteur", "Vérification standard"}
        raster = (await client.get(f"{BASE}/processings/{(await _processing(client, RASTER_TO_PYRAMID))['_id']}")).json()
        assert raster["input_types"] == {"upload": ["RASTER"], "stored_data": ["ROK4-PYRAMID-RASTER"]}
        assert [p["name"] for p in raster["parameters"]] == ["bottom", "tms", "width", "compression", "interpolation",
                                                              "parallelization", "top", "mask", "height"]
        assert {c["name"] for c in raster["required_checks"]} == {"Vérification raster", "Vérification standard"}
        harvest = await _processing(client, WMS_TO_PYRAMID)
        mandatory = {p["name"] for p in harvest["parameters"] if p["mandatory"]}
        assert mandatory == {"harvest_layers", "harvest_levels", "harvest_area", "harvest_format", "harvest_url",
                             "bottom"}
        assert (await client.get(f"{BASE}/processings/{'1' * 8}-1111-1111-1111-{'1' * 12}")).status_code == 404


async def test_execution_mistakes_are_all_listed(tmp_path: Path) -> None:
    async with app_with_user(tmp_path) as client:
        upload = (await client.post(f"{BASE}/uploads", json={"name": "u", "srs": "EPSG:2154", "type": "RASTER"})).json()
        processing = await _processing(client, RASTER_TO_PYRAMID)
        unknown = await client.post(f"{BASE}/processings/executions", json={"processing": "nope"})
        assert unknown.status_code == 400 and "unknown processing" in _problems(unknown)[0]
        answer = await client.post(f"{BASE}/processings/executions", json={
            "processing": processing["_id"], "inputs": {"upload": [upload["_id"]]}, "output": {"stored_data": {}},
            "parameters": {"tms": "NOPE", "compression": "gif", "width": 0, "bottom": "99", "extra": 1}})
        assert answer.status_code == 400
        problems = "\n".join(_problems(answer))
        for expected in ("is OPEN; it must be CLOSED", "parameters.extra: unknown", "parameters.tms: must be one of",
                         "parameters.compression", "parameters.width", "output.stored_data.name"):
            assert expected in problems, problems
        harvest = await _processing(client, WMS_TO_PYRAMID)
        missing = await client.post(f"{BASE}/processings/executions", json={
            "processing": harvest["_id"], "inputs": {}, "output": {"stored_data": {"name": "h"}},
            "parameters": {"tms": "PM", "bottom": "30", "harvest_levels": "14", "harvest_area": "POLYGON((1 2"}})
        text = "\n".join(_problems(missing))
        assert "parameters.harvest_url: mandatory parameter missing" in text
        assert "parameters.harvest_levels: must be of type array" in text
        assert "parameters.bottom: level 30 is not in grid PM" in text
        assert "parameters.harvest_area:" in text
        assert (await client.get(f"{BASE}/stored_data")).json() == []  # nothing stored half-way


async def test_execution_stored_data_configuration_offering(tmp_path: Path) -> None:
    async with app_with_user(tmp_path) as client:
        upload = await closed_upload(client, scan_files())
        execution = await _execute(client, upload["_id"], {"tms": "PM", "compression": "jpg", "interpolation": "bicubic",
                                                           "bottom": "10", "top": "9", "width": 2, "height": 2})
        # seed 002's answer: CREATED, parameters echoed with defaults, the output already created
        assert execution["status"] == "CREATED" and execution["processing"]["name"] == RASTER_TO_PYRAMID
        assert execution["parameters"] == {"tms": "PM", "compression": "jpg", "interpolation": "bicubic",
                                           "bottom": "10", "top": "9", "width": 2, "height": 2,
                                           "parallelization": 1, "mask": "false"}
        assert execution["inputs"]["upload"][0] == {"_id": upload["_id"], "type": "RASTER", "name": "up",
                                                    "status": "CLOSED", "srs": "EPSG:2154"}
        output = execution["output"]["stored_data"]
        assert output["status"] == "CREATED" and output["type"] == "ROK4-PYRAMID-RASTER"
        base = f"{BASE}/processings/executions/{execution['_id']}"
        assert (await client.post(f"{base}/launch", headers={"Content-Type": "application/json"})).status_code == 200
        assert (await client.post(f"{base}/launch")).status_code == 409
        done = await poll(client, base, lambda e: e["status"] in ("SUCCESS", "FAILURE"))
        assert done["status"] == "SUCCESS" and {"launch", "start", "finish"} <= set(done)
        logs = await client.get(f"{base}/logs", params={"page": 1, "limit": 2})
        assert len(logs.json()) == 2 and re.match(r"^0-1/\d+$", logs.headers["content-range"])
        listed = await client.get(f"{BASE}/processings/executions", params={"output_stored_data": output["_id"]})
        assert [e["_id"] for e in listed.json()] == [execution["_id"]]

        stored = (await client.get(f"{BASE}/stored_data/{output['_id']}")).json()
        for field in ("name", "type", "srs", "contact", "extent", "last_event", "tags", "storage", "size", "status",
                      "_id", "type_infos"):
            assert field in stored, field
        assert stored["status"] == "GENERATED" and stored["srs"] == "EPSG:3857" and stored["size"] > 0
        assert stored["type_infos"] == {"tms": "PM", "levels": ["9", "10"], "channels_format": "UINT8",
                                        "channels_number": 3, "compression": "JPG", "nodata_value": "255,255,255"}

        config = {"type": "WMTS-TMS", "name": "scan", "layer_name": "scan_wmts",
                  "type_infos": {"title": "Scan", "abstract": "Scan 1000", "keywords": ["t"],
                                 "used_data": [{"stored_data": output["_id"], "bottom_level": "12", "top_level": "9"}]}}
        outside = await client.post(f"{BASE}/configurations", json=config)
        assert outside.status_code == 400 and "level 12 is not in stored data" in _problems(outside)[0]
        config["type_infos"]["used_data"][0]["bottom_level"] = "10"
        created = await client.post(f"{BASE}/configurations", json=config)
        assert created.status_code == 201 and created.json()["status"] == "UNPUBLISHED"
        duplicate = await client.post(f"{BASE}/configurations", json={**config, "name": "x"})
        assert duplicate.status_code == 409 and "unique per service" in _problems(duplicate)[0]
        # a layer_name is unique per service: the same name as a WMS layer is another configuration
        wms_config = await client.post(f"{BASE}/configurations", json={**config, "type": "WMS-RASTER", "name": "x"})
        assert wms_config.status_code == 201, wms_config.text
        configuration = created.json()["_id"]
        wrong = await client.post(f"{BASE}/configurations/{configuration}/offerings",
                                  json={"endpoint": await _endpoint(client, WMS_R), "open": True})
        assert wrong.status_code == 400
        bogus = await client.post(f"{BASE}/configurations/{configuration}/offerings", json={"endpoint": "nope"})
        assert bogus.status_code == 400 and "unknown endpoint" in _problems(bogus)[0]
        offering = await client.post(f"{BASE}/configurations/{configuration}/offerings",
                                     json={"endpoint": await _endpoint(client, WMTS_TMS), "open": False})
        assert offering.status_code == 201
        offer = offering.json()
        assert offer["status"] == "PUBLISHED" and offer["urls"] and not offer["open"]

        # the same layer record as the ROK4 admin API's
        admin = await client.get("/admin/layers/scan_wmts", headers={"Authorization": "Bearer secret"})
        assert admin.status_code == 200 and admin.json()["title"] == "Scan"
        # restricted: absent from anonymous capabilities, refused without a key, served with one
        anonymous = {"Authorization": ""}
        capabilities = await client.get("/wmts", params={"SERVICE": "WMTS", "REQUEST": "GetCapabilities"},
                                        headers=anonymous)
        assert "scan_wmts" not in capabilities.text
        limits = client.app.state.runtime.catalog.layers["scan_wmts"].limits["10"]
        tile = f"/tms/1.0.0/scan_wmts/10/{limits.min_col}/{limits.min_row}.jpeg"
        refused = await client.get(tile, headers=anonymous)
        assert refused.status_code in (400, 404) and "unknown" in refused.text  # invisible without a key
        key = await client.post("/api/users/me/keys", json={"name": "k", "type": "HASH",
                                                            "type_infos": {"hash": "my-own-key-value"}})
        assert key.status_code == 201, key.text
        access = await client.post(f"/api/users/me/keys/{key.json()['_id']}/accesses",
                                   json={"offerings": [offer["_id"]]})
        assert access.status_code in (200, 201), access.text
        await client.app.state.runtime.refresh()
        served = await client.get(tile, params={"apikey": "my-own-key-value"}, headers=anonymous)
        assert served.status_code == 200 and served.content.startswith(b"\xff\xd8")
        keyed = await client.get("/wmts", params={"SERVICE": "WMTS", "REQUEST": "GetCapabilities",
                                                  "apikey": "my-own-key-value"}, headers=anonymous)
        assert "scan_wmts" in keyed.text

        # the WMS configuration of the same layer_name, offered open on the WMS endpoint: its own record
        wms_offer = await client.post(f"{BASE}/configurations/{wms_config.json()['_id']}/offerings",
                                      json={"endpoint": await _endpoint(client, WMS_R), "open": True})
        assert wms_offer.status_code == 201 and wms_offer.json()["status"] == "PUBLISHED", wms_offer.text
        record = await client.get("/admin/layers/scan_wmts.wms", headers={"Authorization": "Bearer secret"})
        assert record.status_code == 200 and record.json()["name"] == "scan_wmts"
        wms_capabilities = await client.get("/wms", params={"SERVICE": "WMS", "REQUEST": "GetCapabilities"},
                                            headers=anonymous)
        assert "<Name>scan_wmts</Name>" in wms_capabilities.text and "scan_wmts.wms" not in wms_capabilities.text
        wms_map = await client.get("/wms", headers=anonymous, params={
            "SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": "scan_wmts", "STYLES": "",
            "CRS": "EPSG:3857", "BBOX": ",".join(map(str, client.app.state.runtime.catalog.layers["scan_wmts.wms"]
                                                      .native_bbox)),
            "WIDTH": "64", "HEIGHT": "64", "FORMAT": "image/png"})
        assert wms_map.status_code == 200 and wms_map.content.startswith(b"\x89PNG"), wms_map.text[:300]
        # the WMTS layer stays restricted: the open WMS record does not open it
        assert "scan_wmts" not in (await client.get("/wmts", params={"SERVICE": "WMTS", "REQUEST": "GetCapabilities"},
                                                    headers=anonymous)).text
        assert (await client.get(tile, headers=anonymous)).status_code in (400, 404)
        assert (await client.delete(f"{BASE}/offerings/{wms_offer.json()['_id']}")).status_code == 204
        assert (await client.delete(f"{BASE}/configurations/{wms_config.json()['_id']}")).status_code == 204

        # in use: stored data and configuration cannot go; unpublished, they can
        assert (await client.delete(f"{BASE}/stored_data/{output['_id']}")).status_code == 409
        assert (await client.delete(f"{BASE}/configurations/{configuration}")).status_code == 409
        assert (await client.delete(f"{BASE}/offerings/{offer['_id']}")).status_code == 204
        assert (await client.get(f"{BASE}/offerings/{offer['_id']}")).status_code == 404
        assert (await client.get("/admin/layers/scan_wmts", headers={"Authorization": "Bearer secret"})).status_code == 404
        assert (await client.delete(f"{BASE}/configurations/{configuration}")).status_code == 204
        assert (await client.delete(f"{BASE}/stored_data/{output['_id']}")).status_code == 204
        assert not list((Path(client.settings.data_dir) / "pyramids").glob("*.json"))


async def test_stored_data_not_generated_and_abort(tmp_path: Path) -> None:
    async with app_with_user(tmp_path) as client:
        upload = await closed_upload(client, scan_files())
        execution = await _execute(client, upload["_id"], FAST)
        output = execution["output"]["stored_data"]["_id"]
        config = {"type": "WMTS-TMS", "name": "c", "layer_name": "c",
                  "type_infos": {"title": "t", "abstract": "a",
                                 "used_data": [{"stored_data": output, "bottom_level": "10", "top_level": "9"}]}}
        refused = await client.post(f"{BASE}/configurations", json=config)
        assert refused.status_code == 400 and "must be GENERATED" in _problems(refused)[0]
        aborted = await client.post(f"{BASE}/processings/executions/{execution['_id']}/abort")
        assert aborted.json()["status"] == "ABORTED"
        assert (await client.get(f"{BASE}/stored_data/{output}")).json()["status"] == "UNSTABLE"
        assert (await client.post(f"{BASE}/processings/executions/{execution['_id']}/launch")).status_code == 409


async def test_statics_are_wms_styles(tmp_path: Path) -> None:
    style = (Path(__file__).parent / "data/styles/hypso.json").read_bytes()
    async with app_with_user(tmp_path) as client:
        bad = await client.post(f"{BASE}/statics", params={"name": "s", "type": "ROK4-STYLE"},
                                files={"file": ("s.json", b"{}")})
        assert bad.status_code == 400
        made = await client.post(f"{BASE}/statics", params={"name": "hypso", "type": "ROK4-STYLE", "description": "d"},
                                 files={"file": ("hypso.json", style)})
        assert made.status_code == 201, made.text
        static = made.json()
        assert (await client.get(f"{BASE}/statics", params={"name": "hypso"})).json()[0]["_id"] == static["_id"]
        assert static["_id"] in client.app.state.runtime.catalog.styles


def test_geotiff_helper(tmp_path: Path) -> None:
    from tileserver.writer.sources import open_source

    write_geotiff(tmp_path / "g.tif", 0.0, 100.0, 1.0, size=10)
    info = open_source(tmp_path / "g.tif")
    assert info.crs.endswith("2154") and info.bbox == (0.0, 90.0, 10.0, 100.0)


async def test_cli_registers_a_pyramid_as_stored_data(tmp_path: Path, monkeypatch, capsys) -> None:
    import json

    from tileserver.cli import main

    async with app_with_user(tmp_path) as client:
        monkeypatch.setenv("TILESERVER_DATA_DIR", client.settings.data_dir)
        monkeypatch.setenv("TILESERVER_STORE_URL", client.settings.store_url)
        descriptor = Path(__file__).parent / "data/pyramids/SCAN1000.json"
        import asyncio

        assert await asyncio.to_thread(main, ["stored-data", "add", str(descriptor), "--name", "scan", "--json"]) == 0
        registered = json.loads(capsys.readouterr().out)
        stored = (await client.get(f"{BASE}/stored_data/{registered['_id']}")).json()
        assert stored["name"] == "scan" and stored["status"] == "GENERATED"
        assert stored["type_infos"]["tms"] == "PM" and stored["type_infos"]["compression"] == "PNG"
        assert stored["extent"]["type"] == "Polygon"


@pytest.mark.parametrize("store_backend", ["sqlite"], indirect=True)  # S3 is what it tests: one engine
async def test_uploads_and_pyramids_on_s3(tmp_path: Path, s3_server, s3_bucket, s3_settings) -> None:
    """`warehouse_uploads` and `warehouse_pyramids` on S3: files pushed there are checked and built
    from, executions write there, offerings serve it, deletes remove the objects."""
    async with app_with_user(tmp_path, s3_clusters=s3_settings.s3_clusters,
                             warehouse_uploads=f"s3://{s3_bucket}/uploads",
                             warehouse_pyramids=f"s3://{s3_bucket}/computed/") as client:
        datastore = (await client.get(BASE)).json()
        assert datastore["storages"]["data"][0]["storage"]["type"] == "S3"
        files = {**scan_files(), "extra/readme.txt": SOURCES / "SCAN1000.tfw"}
        md5 = "".join(f"{hashlib.md5(p.read_bytes()).hexdigest()}  {rel}\n" for rel, p in scan_files().items())
        upload = (await client.post(f"{BASE}/uploads", json={"name": "up", "description": "d", "srs": "EPSG:2154",
                                                             "type": "RASTER"})).json()
        for rel, local in files.items():
            pushed = await client.post(f"{BASE}/uploads/{upload['_id']}/data", params={"path": rel},
                                       files={"file": (local.name, local.read_bytes())})
            assert pushed.status_code == 200, pushed.text
        pushed = await client.post(f"{BASE}/uploads/{upload['_id']}/md5", files={"file": ("x.md5", md5.encode())})
        assert pushed.status_code == 200, pushed.text
        keys = s3_server.list_keys(s3_bucket, "uploads/")
        assert f"uploads/{upload['_id']}/data/ain/scan1000.tif" in keys
        assert s3_server.get(s3_bucket, f"uploads/{upload['_id']}/data/ain/scan1000.tif") == (
            SOURCES / "SCAN1000.tif").read_bytes()
        tree = (await client.get(f"{BASE}/uploads/{upload['_id']}/tree")).json()
        ain = next(entry for entry in tree if entry["name"] == "ain")
        assert {c["name"] for c in ain["children"]} == {"scan1000.tif", "scan1000.tfw"}
        assert ain["size"] == sum(p.stat().st_size for p in scan_files().values())
        again = await client.post(f"{BASE}/uploads/{upload['_id']}/data", params={"path": "ain/scan1000.tfw"},
                                  files={"file": ("x", b"1")})
        assert again.status_code == 409
        gone = await client.delete(f"{BASE}/uploads/{upload['_id']}/data", params={"path": "extra/readme.txt"})
        assert gone.status_code == 204
        assert f"uploads/{upload['_id']}/data/extra/readme.txt" not in s3_server.list_keys(s3_bucket, "uploads/")
        assert (await client.post(f"{BASE}/uploads/{upload['_id']}/close")).status_code == 200
        closed = await poll(client, f"{BASE}/uploads/{upload['_id']}", lambda u: u["status"] not in ("OPEN", "CHECKING"))
        checks = (await client.get(f"{BASE}/uploads/{upload['_id']}/checks")).json()
        assert closed["status"] == "CLOSED", checks
        assert len(checks["passed"]) == 2 and not checks["failed"]  # md5 and raster checks on the S3 files
        execution = await _execute(client, upload["_id"], FAST)
        output = execution["output"]["stored_data"]["_id"]
        await client.post(f"{BASE}/processings/executions/{execution['_id']}/launch")
        done = await poll(client, f"{BASE}/processings/executions/{execution['_id']}",
                          lambda e: e["status"] in ("SUCCESS", "FAILURE"))
        assert done["status"] == "SUCCESS", (await client.get(
            f"{BASE}/processings/executions/{execution['_id']}/logs")).text
        stored = (await client.get(f"{BASE}/stored_data/{output}")).json()
        assert stored["status"] == "GENERATED" and stored["storage"]["type"] == "S3"
        keys = s3_server.list_keys(s3_bucket)
        [descriptor] = [k for k in keys if k.endswith(".json") and k.count("/") == 1]
        name = descriptor.removeprefix("computed/").removesuffix(".json")
        assert f"computed/{name}.list" in keys and any(k.startswith(f"computed/{name}/DATA_10_") for k in keys)
        assert not (Path(client.settings.data_dir) / "pyramids").exists()

        config = {"type": "WMTS-TMS", "name": "s3", "layer_name": "on_s3",
                  "type_infos": {"title": "t", "abstract": "a",
                                 "used_data": [{"stored_data": output, "bottom_level": "10", "top_level": "9"}]}}
        created = await client.post(f"{BASE}/configurations", json=config)
        assert created.status_code == 201, created.text
        offer = await client.post(f"{BASE}/configurations/{created.json()['_id']}/offerings",
                                  json={"endpoint": await _endpoint(client, WMTS_TMS), "open": True})
        assert offer.status_code == 201 and offer.json()["status"] == "PUBLISHED", offer.text
        published = client.app.state.runtime.catalog.layers["on_s3"]
        limits = published.limits["10"]
        stored_tile = await published.get_tile("10", limits.min_col, limits.min_row)
        tile = await client.get(f"/wmts/1.0.0/on_s3/normal/PM/10/{limits.min_row}/{limits.min_col}.jpeg")
        assert tile.status_code == 200 and stored_tile and tile.content == stored_tile

        assert (await client.delete(f"{BASE}/offerings/{offer.json()['_id']}")).status_code == 204
        assert (await client.delete(f"{BASE}/configurations/{created.json()['_id']}")).status_code == 204
        assert (await client.delete(f"{BASE}/stored_data/{output}")).status_code == 204
        assert s3_server.list_keys(s3_bucket, "computed/") == []
        assert (await client.delete(f"{BASE}/uploads/{upload['_id']}")).status_code == 204
        assert s3_server.list_keys(s3_bucket) == []
