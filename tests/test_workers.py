"""Workers anywhere: `tileserver worker` processes running the warehouse's jobs from a shared store
for servers that run none themselves. Real processes on loopback: two servers (no local workers)
and two workers on one PostgreSQL store, each worker named as its own node, so a dead one is seen
only by its missing heartbeats, as across machines."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from apputil import free_port
from test_warehouse_live import _ended, _processing, _run, _server, _upload
from test_warehouse_support import BASE, LAST_NAME, LOGIN, PASSWORD, api_client, wait_for

from tileserver.publication.store import PublicationStore
from tileserver.warehouse.accounts import Accounts
from tileserver.warehouse.endpoints import WMTS_TMS
from tileserver.warehouse.entities import Entities
from tileserver.warehouse.processings import RASTER_TO_PYRAMID

LEASE = "5"  # seconds: a killed worker's job is back in the queue within seconds; beats every 1.25 s
SLOW = {"tms": "PM", "bottom": "12", "top": "0", "compression": "jpg"}  # seconds of work on one core


@dataclass
class Topology:
    data_dir: Path  # the servers' and workers' shared data directory (unless each has its own)
    store_url: str
    servers: list[str]
    workers: dict[str, subprocess.Popen]  # node name → its `tileserver worker`
    dirs: dict[str, Path]  # "server-1"…, "node-1"… → its data directory (its scratch: `tmp` inside)

    def job(self, kind: str, job_id: str) -> dict:
        store = PublicationStore(self.store_url)
        try:
            entity = Entities(store).get(kind, job_id)
            assert entity is not None
            return entity.body
        finally:
            store.close()


def _env(data_dir: Path, store_url: str) -> dict[str, str]:
    return {**os.environ, "TILESERVER_DATA_DIR": str(data_dir), "TILESERVER_STORE_URL": store_url,
            "TILESERVER_WORKER_LEASE": LEASE}


@contextlib.contextmanager
def _worker(data_dir: Path, store_url: str, node: str, **env: str) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen([sys.executable, "-m", "tileserver.cli", "worker", "--jobs", "1", "--node", node],
                               env={**_env(data_dir, store_url), **env}, start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@contextlib.contextmanager
def topology(tmp_path: Path, store_url: str, servers: int = 2, workers: int = 2, env: dict[str, str] | None = None,
             own_dirs: bool = False, **worker_env: str) -> Iterator[Topology]:
    """`servers` servers (no local workers) and `workers` workers on one store; `env` for all of
    them. With `own_dirs` each process has its own data directory and temporary directory (TMPDIR),
    as on separate machines: what they share must then be in `env` (S3 uploads and pyramids)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store = PublicationStore(store_url)
    try:
        Accounts(store).add_user(LOGIN, PASSWORD, "Jean", LAST_NAME, f"{LOGIN}@example.org", ("default",))
    finally:
        store.close()

    def home(name: str) -> tuple[Path, dict[str, str]]:
        if not own_dirs:
            return data_dir, dict(env or {})
        (tmp_path / name / "tmp").mkdir(parents=True)
        return tmp_path / name, {**(env or {}), "TMPDIR": str(tmp_path / name / "tmp")}

    with contextlib.ExitStack() as stack:
        urls, nodes, dirs = [], {}, {}
        for i in range(servers):
            port = free_port()
            dirs[f"server-{i + 1}"], extra = home(f"server-{i + 1}")
            stack.enter_context(_server(dirs[f"server-{i + 1}"], port, workers=0, store_url=store_url, poll=0.5,
                                        TILESERVER_WORKER_LEASE=LEASE, **extra))
            urls.append(f"http://127.0.0.1:{port}")
        for i in range(workers):
            node = f"node-{i + 1}"
            dirs[node], extra = home(node)
            nodes[node] = stack.enter_context(_worker(dirs[node], store_url, node, **extra, **worker_env))
        yield Topology(data_dir, store_url, urls, nodes, dirs)


def _running_on(top: Topology, execution_id: str) -> dict:
    """The execution's job state once its job process has begun writing (PROGRESS)."""
    return wait_for(lambda: (lambda b: b["job"] if b["status"] == "PROGRESS" and (b.get("job") or {}).get("worker")
                             else None)(top.job("processing_execution", execution_id)), timeout=60)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def test_journey_across_nodes_and_a_worker_killed_mid_job(tmp_path: Path, pg_url: str) -> None:
    """Upload, check, execution and offering through server A, tiles through server B; the worker
    running the execution dies (SIGKILL, its job process with it: a node lost) and the other worker
    runs it again once the lease expired: one completion, on the surviving node."""
    with topology(tmp_path, pg_url) as top:
        a, b = api_client(top.servers[0]), api_client(top.servers[1])
        upload = _upload(a)  # its checks ran on a worker: the servers run none
        store = PublicationStore(pg_url)
        checks = Entities(store).list("check_execution")
        store.close()
        assert checks and {c.body["job"]["worker"]["host"] for c in checks} <= set(top.workers)
        execution = _run(a, {"processing": _processing(a, RASTER_TO_PYRAMID), "inputs": {"upload": [upload]},
                             "output": {"stored_data": {"name": "scan"}}, "parameters": SLOW})
        first = _running_on(top, execution["_id"])
        dead_node = first["worker"]["host"]
        _kill(top.workers[dead_node].pid)  # the worker loop…
        _kill(first["worker"]["pid"])  # …and its job process (its own process group): the node is gone
        ended = _ended(b, execution["_id"], timeout=300)
        assert ended["status"] == "SUCCESS", b.get(f"{BASE}/processings/executions/{execution['_id']}/logs").text
        job = top.job("processing_execution", execution["_id"])["job"]
        assert job["attempt"] == 2 and job["worker"]["host"] != dead_node and job["lost"] == first["worker"]
        logs = b.get(f"{BASE}/processings/executions/{execution['_id']}/logs").json()
        assert sum("back in the queue after attempt 1 of 3" in line for line in logs) == 1
        assert sum("pyramid written" in line for line in logs) == 1  # one completion
        stored = execution["output"]["stored_data"]["_id"]
        assert b.get(f"{BASE}/stored_data/{stored}").json()["status"] == "GENERATED"

        configuration = a.post(f"{BASE}/configurations", json={
            "type": "WMTS-TMS", "name": "scan", "layer_name": "scan",
            "type_infos": {"title": "t", "abstract": "a",
                           "used_data": [{"stored_data": stored, "bottom_level": "12", "top_level": "0"}]}}).json()
        endpoint = next(e["endpoint"]["_id"] for e in a.get(BASE).json()["endpoints"]
                        if e["endpoint"]["technical_name"] == WMTS_TMS)
        offering = a.post(f"{BASE}/configurations/{configuration['_id']}/offerings",
                          json={"endpoint": endpoint, "open": True}).json()
        assert offering["status"] == "PUBLISHED"
        descriptor = b.get(f"{BASE}/stored_data/{stored}").json()
        assert descriptor["type_infos"]["levels"]
        wait_for(lambda: "scan" in httpx.get(f"{top.servers[1]}/tms/1.0.0").text, timeout=30)
        layer = httpx.get(f"{top.servers[1]}/tms/1.0.0/scan").text
        assert "TileMap" in layer
        tile = _some_tile(top, stored)
        answer = httpx.get(f"{top.servers[1]}/tms/1.0.0/scan/{tile}.jpeg")
        assert answer.status_code == 200 and answer.content[:2] == b"\xff\xd8"
        assert top.workers[next(n for n in top.workers if n != dead_node)].poll() is None  # still serving


def _some_tile(top: Topology, stored_id: str) -> str:
    """z/x/y of a tile the pyramid holds at its bottom level (from its descriptor)."""
    import json

    store = PublicationStore(top.store_url)
    try:
        stored = store.get_stored_data(stored_id)
        assert stored is not None
        url = stored.descriptor_url
    finally:
        store.close()
    descriptor = json.loads(Path(url.removeprefix("file://")).read_text())
    level = descriptor["levels"][0]
    limits = level["tile_limits"]
    return f"{level['id']}/{limits['min_col']}/{limits['min_row']}"


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_abort_reaches_the_worker(tmp_path: Path, engine: str, request: pytest.FixtureRequest) -> None:
    """An abort through a server stops the job process of the worker running it (another node's
    process, reached through the store); the worker loop lives on and runs the next job."""
    store_url = str(tmp_path / "store.sqlite") if engine == "sqlite" else request.getfixturevalue("pg_url")
    with topology(tmp_path, store_url, servers=1, workers=1) as top:
        client = api_client(top.servers[0])
        upload = _upload(client)
        processing = _processing(client, RASTER_TO_PYRAMID)
        slow = _run(client, {"processing": processing, "inputs": {"upload": [upload]},
                             "output": {"stored_data": {"name": "slow"}}, "parameters": SLOW})
        job = _running_on(top, slow["_id"])
        answer = client.post(f"{BASE}/processings/executions/{slow['_id']}/abort")
        assert answer.status_code == 200 and answer.json()["status"] == "ABORTED"
        wait_for(lambda: not _alive(job["worker"]["pid"]), timeout=30)  # killed at its next heartbeat
        stored = slow["output"]["stored_data"]["_id"]
        wait_for(lambda: client.get(f"{BASE}/stored_data/{stored}").json()["status"] == "UNSTABLE", timeout=30)
        logs = client.get(f"{BASE}/processings/executions/{slow['_id']}/logs").json()
        assert any("aborted" in line for line in logs) and not any("pyramid written" in line for line in logs)
        assert next(iter(top.workers.values())).poll() is None
        quick = _run(client, {"processing": processing, "inputs": {"upload": [upload]},
                              "output": {"stored_data": {"name": "quick"}},
                              "parameters": {"tms": "PM", "bottom": "10", "top": "9", "width": 2, "height": 2}})
        assert _ended(client, quick["_id"])["status"] == "SUCCESS"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie until its worker loop reaps it: dead all the same
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_a_build_in_shards_across_workers(tmp_path: Path, pg_url: str, workers: int) -> None:
    """With `worker_shards` 2 an image pyramid's bottom level is built in two shards, by two
    workers when there are two, by the execution's own job process alone when it is the only one;
    then the upper levels from the shards' journals: one pyramid, served."""
    with topology(tmp_path, pg_url, servers=1, workers=workers, TILESERVER_WORKER_SHARDS="2") as top:
        client = api_client(top.servers[0])
        upload = _upload(client)
        execution = _run(client, {"processing": _processing(client, RASTER_TO_PYRAMID), "inputs": {"upload": [upload]},
                                  "output": {"stored_data": {"name": "sharded"}},
                                  "parameters": {"tms": "PM", "bottom": "10", "top": "8", "compression": "jpg"}})
        ended = _ended(client, execution["_id"], timeout=300)
        logs = client.get(f"{BASE}/processings/executions/{execution['_id']}/logs").json()
        assert ended["status"] == "SUCCESS", logs
        assert sum("shard 0/2 written" in line for line in logs) == 1
        shard1 = [line for line in logs if "shard 1/2 written" in line]
        assert len(shard1) == 1
        shard = top.job("pyramid_shard", f"{execution['_id']}.shard-1")
        assert shard["status"] == "SUCCESS"
        executor = top.job("processing_execution", execution["_id"])["job"]["worker"]
        if workers == 2:  # the other worker took shard 1 (the execution's process waits for it)
            assert "by node" in shard1[0] and shard["job"]["worker"]["host"] != executor["host"]
        else:
            assert "written here" in shard1[0] and shard["job"]["worker"] == executor
        stored = execution["output"]["stored_data"]["_id"]
        summary = client.get(f"{BASE}/stored_data/{stored}").json()
        assert summary["status"] == "GENERATED" and set(summary["type_infos"]["levels"]) == {"8", "9", "10"}
        assert list(top.data_dir.rglob("*.list"))
        assert not list(top.data_dir.rglob("*.list.partial*"))  # the shards' journals merged and removed
