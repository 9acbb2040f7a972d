"""The warehouse against real server processes: WMS harvesting of the project's own WMS on
loopback, a restart during an execution, and two server processes sharing one store."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from apputil import free_port, layer_descriptor
from test_warehouse_support import (
    BASE,
    add_user,
    api_client,
    scan_files,
    wait_for,
    warehouse_server,
    warehouse_settings,
)

from tileserver.publication.store import PublicationStore
from tileserver.warehouse.endpoints import WMTS_TMS
from tileserver.warehouse.processings import RASTER_TO_PYRAMID, WMS_TO_PYRAMID


def _processing(client: httpx.Client, name: str) -> str:
    return client.get(f"{BASE}/processings", params={"name": name}).json()[0]["_id"]


def _upload(client: httpx.Client) -> str:
    upload = client.post(f"{BASE}/uploads", json={"name": "u", "srs": "EPSG:2154", "type": "RASTER"}).json()
    for rel, local in scan_files().items():
        client.post(f"{BASE}/uploads/{upload['_id']}/data", params={"path": rel},
                    files={"file": (local.name, local.read_bytes())}).raise_for_status()
    client.post(f"{BASE}/uploads/{upload['_id']}/close").raise_for_status()
    wait_for(lambda: client.get(f"{BASE}/uploads/{upload['_id']}").json()["status"] == "CLOSED")
    return upload["_id"]


def _run(client: httpx.Client, body: dict, launch: bool = True) -> dict:
    answer = client.post(f"{BASE}/processings/executions", json=body)
    assert answer.status_code == 201, answer.text
    execution = answer.json()
    if launch:
        client.post(f"{BASE}/processings/executions/{execution['_id']}/launch").raise_for_status()
    return execution


def _ended(client: httpx.Client, execution_id: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (lambda e: e if e["status"] in ("SUCCESS", "FAILURE", "ABORTED") else None)(
        client.get(f"{BASE}/processings/executions/{execution_id}").json()), timeout=timeout)


def test_harvest_own_wms(tmp_path: Path) -> None:
    # the harvested WMS is this server on loopback: the operator allows it (outbound requests of /api
    # users go to public hosts only by default)
    with warehouse_server(tmp_path, outbound_allow=("127.0.0.1",)) as (url, _settings):
        admin = httpx.put(f"{url}/admin/layers/SCAN1000", json=layer_descriptor("SCAN1000"),
                          headers={"Authorization": "Bearer secret"})
        if admin.status_code == 404:
            admin = httpx.post(f"{url}/admin/layers/SCAN1000", json=layer_descriptor("SCAN1000"),
                               headers={"Authorization": "Bearer secret"})
        assert admin.status_code == 204, admin.text
        client = api_client(url)
        execution = _run(client, {
            "processing": _processing(client, WMS_TO_PYRAMID), "inputs": {},
            "output": {"stored_data": {"name": "moisson", "storage_tags": ["PYRAMIDE"]}},
            "parameters": {"tms": "PM", "compression": "png", "harvest_layers": "SCAN1000", "harvest_url": f"{url}/wms",
                           "samplesperpixel": 3, "sampleformat": "UINT8", "bottom": "10", "top": "9",
                           "harvest_levels": ["10"], "width": 2, "height": 2, "harvest_format": "image/png",
                           "harvest_area": "POLYGON((1.5 46.2,2.3 46.2,2.3 46.5,1.5 46.5,1.5 46.2))"}})
        assert execution["inputs"] == {"upload": [], "stored_data": []}
        done = _ended(client, execution["_id"])
        logs = client.get(f"{BASE}/processings/executions/{execution['_id']}/logs").json()
        assert done["status"] == "SUCCESS", logs
        stored = client.get(f"{BASE}/stored_data/{execution['output']['stored_data']['_id']}").json()
        assert stored["status"] == "GENERATED" and stored["type_infos"]["levels"] == ["9", "10"]
        # the ROK4 admin API's pyramid is a stored data of the default datastore too
        assert "SCAN1000" in [s["name"] for s in client.get(f"{BASE}/stored_data").json()]


@contextlib.contextmanager
def _server(data_dir: Path, port: int, workers: int = 1, store_url: str = "",
            poll: float = 0.2, **env_extra: str) -> Iterator[subprocess.Popen]:
    env = {**os.environ, "TILESERVER_DATA_DIR": str(data_dir), "TILESERVER_ADMIN_TOKEN": "secret",
           "TILESERVER_STORE_POLL_INTERVAL": str(poll), "TILESERVER_WAREHOUSE_WORKERS": str(workers),
           "TILESERVER_STORE_URL": store_url, **env_extra}
    process = subprocess.Popen([sys.executable, "-m", "tileserver.cli", "serve", "--port", str(port), "--no-demo",
                                "--log-level", "warning"], env=env, start_new_session=True)
    try:
        wait_for(lambda: _up(port), timeout=30)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_restart_during_an_execution(tmp_path: Path) -> None:
    settings = warehouse_settings(tmp_path)
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True)
    add_user(settings)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    one_run = {"TILESERVER_WORKER_ATTEMPTS": "1"}  # a dead worker's job then fails (tests/test_workers.py: retried)
    with _server(data_dir, port, workers=1, **one_run) as server:
        client = api_client(url)
        upload = _upload(client)
        processing = _processing(client, RASTER_TO_PYRAMID)
        slow = _run(client, {"processing": processing, "inputs": {"upload": [upload]},
                             "output": {"stored_data": {"name": "slow"}},
                             "parameters": {"tms": "PM", "bottom": "12", "top": "0", "compression": "jpg"}})
        queued = _run(client, {"processing": processing, "inputs": {"upload": [upload]},
                               "output": {"stored_data": {"name": "queued"}},
                               "parameters": {"tms": "PM", "bottom": "10", "top": "9", "width": 2, "height": 2}})
        wait_for(lambda: client.get(f"{BASE}/processings/executions/{slow['_id']}").json()["status"] == "PROGRESS")
        assert client.get(f"{BASE}/processings/executions/{queued['_id']}").json()["status"] == "WAITING"
        store = PublicationStore(settings.resolved_store_url)
        worker = wait_for(lambda: store.get_stored_data(slow["output"]["stored_data"]["_id"]).status == "GENERATING")
        assert worker
        from tileserver.warehouse.entities import Entities

        pid = Entities(store).get("processing_execution", slow["_id"]).body["job"]["worker"]["pid"]
        store.close()
        os.killpg(server.pid, signal.SIGKILL)  # the server…
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # …and its worker (its own process group) die together
    with _server(data_dir, port, workers=1, **one_run):
        client = api_client(url)
        failed = _ended(client, slow["_id"])
        assert failed["status"] == "FAILURE"
        logs = client.get(f"{BASE}/processings/executions/{slow['_id']}/logs").json()
        assert "interrupted" in logs[-1]
        stored = client.get(f"{BASE}/stored_data/{slow['output']['stored_data']['_id']}").json()
        assert stored["status"] == "UNSTABLE"
        assert not list((data_dir / "pyramids").glob("*.list.partial*"))
        assert _ended(client, queued["_id"])["status"] == "SUCCESS"


@pytest.mark.usefixtures("store_backend")
def test_two_servers_share_one_store(tmp_path: Path) -> None:
    """On PostgreSQL the second server polls once an hour: LISTEN/NOTIFY is what shows it the layer."""
    with warehouse_server(tmp_path) as (url, settings):
        client = api_client(url)
        upload = _upload(client)
        execution = _run(client, {"processing": _processing(client, RASTER_TO_PYRAMID),
                                   "inputs": {"upload": [upload]}, "output": {"stored_data": {"name": "p"}},
                                   "parameters": {"tms": "PM", "bottom": "10", "top": "9", "width": 2, "height": 2}})
        port = free_port()
        poll = 3600.0 if settings.store_url else 0.2
        with _server(Path(settings.data_dir), port, store_url=settings.store_url, poll=poll):
            other = api_client(f"http://127.0.0.1:{port}")
            assert _ended(other, execution["_id"])["status"] == "SUCCESS"  # run once, by either process
            stored = execution["output"]["stored_data"]["_id"]
            configuration = client.post(f"{BASE}/configurations", json={
                "type": "WMTS-TMS", "name": "shared", "layer_name": "shared",
                "type_infos": {"title": "t", "abstract": "a",
                               "used_data": [{"stored_data": stored, "bottom_level": "10", "top_level": "9"}]}}).json()
            endpoint = next(e["endpoint"]["_id"] for e in client.get(BASE).json()["endpoints"]
                            if e["endpoint"]["technical_name"] == WMTS_TMS)
            offering = client.post(f"{BASE}/configurations/{configuration['_id']}/offerings",
                                   json={"endpoint": endpoint, "open": True}).json()
            assert offering["status"] == "PUBLISHED"
            started = time.monotonic()
            wait_for(lambda: "shared" in httpx.get(f"http://127.0.0.1:{port}/tms/1.0.0").text, timeout=10)
            assert time.monotonic() - started < 10
            assert other.get(f"{BASE}/offerings/{offering['_id']}").json()["status"] == "PUBLISHED"
