"""One pyramid built by 1 and by 2 `tileserver worker`s (issue 17): the bottom level in N shards.

    .venv/bin/python benchmarks/bench_exec_workers.py [--size 8192] [--bottom 17] [--top 15] [--runs 1] [--url postgresql://…]

A server with no local workers and N workers (`--jobs 1`, `worker_shards` N) on one PostgreSQL
store (a throwaway cluster, tests/pgserver.py, unless --url) and one data directory;
bench_writer's synthetic orthophoto (1 m pixels, Lambert-93) is uploaded through the API, then one
execution of "Calcul de pyramide raster" is timed from its launch to SUCCESS. CPU is the job processes' and their
children's, sampled from /proc. Prints a Markdown table.
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

from bench_writer import X0, Y0, write_source  # noqa: E402
from common import format_table, free_port  # noqa: E402
from pgserver import PostgresServer  # noqa: E402

from tileserver.publication.store import PublicationStore  # noqa: E402
from tileserver.warehouse.accounts import Accounts  # noqa: E402
from tileserver.warehouse.processings import RASTER_TO_PYRAMID  # noqa: E402

BASE = "/api/datastores/default"
LOGIN, PASSWORD = "bench", "bench-pass"


class TreeCPU:
    """CPU seconds of the processes below some roots (job processes, the writer's pools), sampled
    from /proc: a pid's last reading counts, so a process gone between samples loses < 0.1 s."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = set(roots)
        self.seen: dict[int, float] = {}

    @staticmethod
    def _stat(pid: str) -> tuple[int, float] | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def sample(self) -> None:
        stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := self._stat(p)) is not None}
        below = set(self.roots)
        grew = True
        while grew:
            more = {pid for pid, (ppid, _) in stats.items() if ppid in below and pid not in below}
            below |= more
            grew = bool(more)
        for pid in below - self.roots:
            if pid in stats:
                self.seen[pid] = stats[pid][1]

    def total(self) -> float:
        return sum(self.seen.values())


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


def make_sources(directory: Path, size: int) -> list[Path]:
    """bench_writer's synthetic orthophoto (EPSG:2154, 1 m pixels) and its world file."""
    image = directory / "ortho.tif"
    write_source(image, size)
    world = directory / "ortho.tfw"
    world.write_text(f"1.0\n0.0\n0.0\n-1.0\n{X0 + 0.5}\n{Y0 - 0.5}\n")
    return [image, world]


def run(store_url: str, workers: int, bottom: str, top: str, sources: list[Path]) -> tuple[float, float]:
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
            for path in sources:
                client.post(f"{BASE}/uploads/{upload['_id']}/data", params={"path": f"data/{path.name}"},
                            files={"file": (path.name, path.read_bytes())}).raise_for_status()
            client.post(f"{BASE}/uploads/{upload['_id']}/close").raise_for_status()
            _wait(lambda: client.get(f"{BASE}/uploads/{upload['_id']}").json()["status"] == "CLOSED")
            processing = client.get(f"{BASE}/processings", params={"name": RASTER_TO_PYRAMID}).json()[0]["_id"]
            execution = client.post(f"{BASE}/processings/executions", json={
                "processing": processing, "inputs": {"upload": [upload["_id"]]},
                "output": {"stored_data": {"name": f"bench{workers}"}},
                "parameters": {"tms": "PM", "bottom": bottom, "top": top, "compression": "jpg"}}).json()
            if "_id" not in execution:
                raise SystemExit(f"execution refused: {execution}")
            cpu = TreeCPU([p.pid for p in loops])
            started = time.monotonic()
            client.post(f"{BASE}/processings/executions/{execution['_id']}/launch").raise_for_status()

            def ended() -> str | None:
                cpu.sample()
                status = client.get(f"{BASE}/processings/executions/{execution['_id']}").json()["status"]
                return status if status in ("SUCCESS", "FAILURE", "ABORTED") else None

            status = _wait(ended)
            elapsed = time.monotonic() - started
            assert status == "SUCCESS", client.get(f"{BASE}/processings/executions/{execution['_id']}/logs").text
            return elapsed, cpu.total()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="source image side, pixels (1 m each)")
    parser.add_argument("--bottom", default="17")
    parser.add_argument("--top", default="15")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--url", help="an existing PostgreSQL server (postgresql://user@host:port)")
    args = parser.parse_args()
    pg = PostgresServer(args.url.rstrip("/") if args.url else None).start()
    rows = []
    scratch = tempfile.TemporaryDirectory()
    sources = make_sources(Path(scratch.name), args.size)
    try:
        for workers in (1, 2):
            for _ in range(args.runs):
                url = pg.create_database()
                try:
                    elapsed, cpu = run(url, workers, args.bottom, args.top, sources)
                finally:
                    pg.drop_database(url)
                rows.append([f"{workers} worker(s), {workers} shard(s)", f"{elapsed:.1f}", f"{cpu:.1f}"])
                print(rows[-1], file=sys.stderr)
    finally:
        pg.stop()
        scratch.cleanup()
    print(f"{args.size}² px source, levels {args.bottom}..{args.top}, load average {os.getloadavg()[0]:.1f}")
    print(format_table(["build", "launch → SUCCESS, s", "job processes CPU, s"], rows))


if __name__ == "__main__":
    main()
