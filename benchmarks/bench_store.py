"""Measure (not a test): the publication store on SQLite and on PostgreSQL — write and read latency,
and how long a layer published on one server takes to appear on another (NOTIFY vs polling).

    .venv/bin/python benchmarks/bench_store.py [--url postgresql://…] [--samples N]

Without --url a throwaway PostgreSQL cluster is started (tests/pgserver.py: initdb + pg_ctl on
loopback). Prints a Markdown table; figures go in RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # pgserver: the tests' throwaway cluster

from common import format_table, free_port  # noqa: E402
from pgserver import PostgresServer  # noqa: E402

from tileserver.app import create_app  # noqa: E402
from tileserver.publication.model import parse_layer  # noqa: E402
from tileserver.publication.store import PublicationStore  # noqa: E402
from tileserver.settings import Settings, load_settings  # noqa: E402

NOTIFICATIONS = PublicationStore.notifications
PYRAMID = ROOT / "tests/data/pyramids/SCAN1000.json"
LAYER = {"title": "t", "abstract": "a", "keywords": [],
         "pyramids": [{"path": f"file://{PYRAMID}", "bottom_level": "8", "top_level": "0"}]}


def _ms(values: list[float]) -> str:
    values = sorted(values)
    return f"{1000 * statistics.median(values):.1f} / {1000 * values[int(0.95 * (len(values) - 1))]:.1f}"


def store_latency(url: str, samples: int) -> tuple[str, str, str]:
    store = PublicationStore(url)
    try:
        writes, snapshots, revisions = [], [], []
        for i in range(samples):
            t = time.perf_counter()
            store.add_layer(parse_layer(f"l{i}", LAYER))
            writes.append(time.perf_counter() - t)
            t = time.perf_counter()
            store.snapshot()
            snapshots.append(time.perf_counter() - t)
            t = time.perf_counter()
            store.revision()
            revisions.append(time.perf_counter() - t)
        return _ms(writes), _ms(snapshots), _ms(revisions)
    finally:
        store.close()


@contextlib.contextmanager
def server(settings: Settings) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)


def propagation(store_url: str, poll: float, samples: int, work: Path, listen: bool = True) -> str:
    """From the admin API's answer on server A to the layer in server B's WMTS capabilities.
    Publications are spaced randomly within the poll interval (else each one lands at the same
    phase of B's polling). `listen=False` leaves polling alone on PostgreSQL too."""
    if not listen:
        PublicationStore.notifications = lambda self: None  # type: ignore[method-assign]
    base = replace(load_settings(env={}), demo=False, admin_token="secret", admin_roots=("*",), store_url=store_url,
                   store_poll_interval=poll)
    delays = []
    with server(replace(base, data_dir=str(work / "a"))) as a, server(replace(base, data_dir=str(work / "b"))) as b:
        with httpx.Client(timeout=10) as client:
            for i in range(samples):
                name = f"p{i}"
                answer = client.post(f"{a}/admin/layers/{name}", json=LAYER, headers={"Authorization": "Bearer secret"})
                answer.raise_for_status()
                t = time.perf_counter()
                while f">{name}<" not in client.get(f"{b}/wmts?SERVICE=WMTS&REQUEST=GetCapabilities").text:
                    time.sleep(0.002)
                delays.append(time.perf_counter() - t)
                time.sleep(random.uniform(0, min(poll, 2.0)))
    if not listen:
        PublicationStore.notifications = NOTIFICATIONS  # type: ignore[method-assign]
    return _ms(delays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a PostgreSQL server URL (a database is created in it)")
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    pg = PostgresServer(args.url.rstrip("/") if args.url else None).start()
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        rows = []
        for engine, url in (("SQLite", str(work / "store.sqlite")), ("PostgreSQL", pg.create_database())):
            rows.append([engine, *store_latency(url, args.samples * 5)])
        print(format_table(["engine", "add_layer ms p50/p95", "snapshot ms", "revision ms"], rows))
        print()
        rows = []
        for label, url, poll, listen in (
                ("SQLite, polling every 2 s", str(work / "prop.sqlite"), 2.0, True),
                ("PostgreSQL, polling every 2 s (no LISTEN)", pg.create_database(), 2.0, False),
                ("PostgreSQL, NOTIFY (polling hourly)", pg.create_database(), 3600.0, True)):
            rows.append([label, propagation(url, poll, args.samples, work / f"{len(rows)}", listen)])
        print(format_table(["store", "publish on A → served by B, ms p50/p95"], rows))
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
