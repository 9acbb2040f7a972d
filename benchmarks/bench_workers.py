"""One pyramid built by 1 and by 2 `tileserver worker`s (issue 17): the bottom level in N shards.

    .venv/bin/python benchmarks/bench_workers.py [--bottom 13] [--top 11] [--runs 1] [--url postgresql://…]

A server with no local workers and N workers (`--jobs 1`, `worker_shards` N) on one PostgreSQL
store (a throwaway cluster, tests/pgserver.py, unless --url) and one data directory; the test
rasters of tests/data/sources are uploaded through the API, then one execution of "Calcul de
pyramide raster" is timed from its launch to SUCCESS. CPU is the job processes' (children reaped
by the worker loops, from /proc). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # pgserver: the tests' throwaway cluster

from common import format_table, free_port  # noqa: E402
from pgserver import PostgresServer  # noqa: E402

from tileserver.publication.store import PublicationStore  # noqa: E402
from tileserver.warehouse.accounts import Accounts  # noqa: E402
from tileserver.warehouse.processings import RASTER_TO_PYRAMID  # noqa: E402

BASE = "/api/datastores/default"
SOURCES = ROOT / "tests" / "data" / "sources"
LOGIN, PASSWORD = "bench", "bench-pass"


def _children_cpu(pid: int) -> float:
    """User + system seconds of the reaped children of `pid` (its job processes and theirs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _process(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen([sys.executable, "-m", "tileserver.cli", *args], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def _wait(predicate, timeout: float = 600.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            value = predicate()
            if value:
                return value
        time.sleep(0.2)
    raise TimeoutError


def run(store_url: str, workers: int, bottom: str, top: str) -> tuple[float, float]:
    store = PublicationStore(store_url)
    try:
        Accounts(store).add_user(LOGIN, PASSWORD, "B", "Bench", "bench@example.org", ("default",))
    finally:
        store.close()
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "TILESERVER_DATA_DIR": data, "TILESERVER_STORE_URL": store_url,
               "TILESERVER_ADMIN_TOKEN": "secret", "TILESERVER_WAREHOUSE_WORKERS": "0",
               "TILESERVER_WORKER_SHARDS": str(workers)}
        port = free_port()
        with contextlib.ExitStack() as stack:
            stack.enter_context(_process(["serve", "--port", str(port), "--no-demo", "--log-level", "warning"], env))
            loops = [stack.enter_context(_process(["worker", "--jobs", "1", "--node", f"n{i}"], env))
                     for i in range(workers)]
            url = f"http://127.0.0.1:{port}"
            _wait(lambda: httpx.get(f"{url}/healthcheck").status_code == 200, 30)
            client = httpx.Client(base_url=url, timeout=60)
            token = client.post("/api/token", data={"grant_type": "password", "username": LOGIN,
                                                    "password": PASSWORD, "client_id": "x"}).json()["access_token"]
            client.headers["Authorization"] = f"Bearer {token}"
            upload = client.post(f"{BASE}/uploads", json={"name": "u", "srs": "EPSG:2154", "type": "RASTER"}).json()
            for name in ("SCAN1000.tif", "SCAN1000.tfw"):
                client.post(f"{BASE}/uploads/{upload['_id']}/data", params={"path": f"data/{name}"},
                            files={"file": (name, (SOURCES / name).read_bytes())}).raise_for_status()
            client.post(f"{BASE}/uploads/{upload['_id']}/close").raise_for_status()
            _wait(lambda: client.get(f"{BASE}/uploads/{upload['_id']}").json()["status"] == "CLOSED")
            processing = client.get(f"{BASE}/processings", params={"name": RASTER_TO_PYRAMID}).json()[0]["_id"]
            execution = client.post(f"{BASE}/processings/executions", json={
                "processing": processing, "inputs": {"upload": [upload["_id"]]},
                "output": {"stored_data": {"name": f"bench{workers}"}},
                "parameters": {"tms": "PM", "bottom": bottom, "top": top, "compression": "jpg"}}).json()
            cpu0 = sum(_children_cpu(p.pid) for p in loops)
            started = time.monotonic()
            client.post(f"{BASE}/processings/executions/{execution['_id']}/launch").raise_for_status()
            status = _wait(lambda: (lambda s: s if s in ("SUCCESS", "FAILURE", "ABORTED") else None)(
                client.get(f"{BASE}/processings/executions/{execution['_id']}").json()["status"]))
            elapsed = time.monotonic() - started
            assert status == "SUCCESS", client.get(f"{BASE}/processings/executions/{execution['_id']}/logs").text
            time.sleep(0.5)  # the job processes reaped by their loops
            return elapsed, sum(_children_cpu(p.pid) for p in loops) - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bottom", default="13")
    parser.add_argument("--top", default="11")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--url", help="an existing PostgreSQL server (postgresql://user@host:port)")
    args = parser.parse_args()
    pg = PostgresServer(args.url.rstrip("/") if args.url else None).start()
    rows = []
    try:
        for workers in (1, 2):
            for _ in range(args.runs):
                url = pg.create_database()
                try:
                    elapsed, cpu = run(url, workers, args.bottom, args.top)
                finally:
                    pg.drop_database(url)
                rows.append([f"{workers} worker(s), {workers} shard(s)", f"{elapsed:.1f}", f"{cpu:.1f}"])
                print(rows[-1], file=sys.stderr)
    finally:
        pg.stop()
    print(f"levels {args.bottom}..{args.top}, load average {os.getloadavg()[0]:.1f}")
    print(format_table(["build", "launch → SUCCESS, s", "job processes CPU, s"], rows))


if __name__ == "__main__":
    main()
