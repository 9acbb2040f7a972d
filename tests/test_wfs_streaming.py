"""WFS GetFeature and OGC API Features items stream: a 200,000-feature answer never sits in the server's memory.

A real `tileserver serve` subprocess (one worker) answers the whole table in one request (COUNT/limit
raised by `wfs_max_features`); its peak RSS (VmHWM, reset just before the request through
/proc/<pid>/clear_refs) must grow by far less than the answer, and the answer must be complete: every
feature, in key order, counted as the bytes arrive (the client does not hold the answer either).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import shapely
from apputil import free_port
from pyogrio.raw import write

N = 200_000
TEXT = 600  # characters of text per feature: makes the answer ~150 MB
ADMIN = {"Authorization": "Bearer secret"}
FEATURE = re.compile(rb'\{"type":"Feature","id":(\d+),')
TAIL = 64  # bytes kept between chunks: longer than a partial FEATURE match


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


def _make_table(path: Path) -> None:
    """One pyogrio write (GDAL builds the R-tree in bulk): points over France with a long text each."""
    rng = np.random.default_rng(13)
    points = shapely.points(rng.uniform(-4.5, 8.0, N), rng.uniform(42.5, 51.0, N))
    filler = "é" + "x" * (TEXT - 1)
    texts = np.array([f"{i:07d}{filler}" for i in range(N)], dtype=object)
    write(path, np.array(shapely.to_wkb(points), dtype=object), [texts, np.arange(N, dtype=np.int64)],
          ["texte", "rang"], layer="lieux", driver="GPKG", geometry_type="Point", crs="EPSG:4326")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wfs-stream")
    gpkg = tmp / "big.gpkg"
    _make_table(gpkg)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TILESERVER_", "ROK4_"))}
    env.update(TILESERVER_DATA_DIR=str(tmp / "data"), TILESERVER_DEMO="false", TILESERVER_ADMIN_TOKEN="secret",
               TILESERVER_ADMIN_ROOTS=str(tmp), TILESERVER_WFS_MAX_FEATURES=str(N),
               TILESERVER_REQUEST_TIMEOUT="600")
    process = subprocess.Popen([sys.executable, "-m", "tileserver.cli", "serve", "--port", str(port), "--workers", "1",
                                "--no-demo", "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/healthcheck", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        record = {"title": "Lieux", "abstract": "200,000 points",
                  "wfs": {"base": f"file://{gpkg}", "relations": [{"native_name": "lieux", "public_name": "lieu"}]}}
        answer = httpx.post(f"{base}/admin/layers/big", json=record, headers=ADMIN, timeout=60)
        assert answer.status_code == 204, answer.text
        yield {"url": base, "pid": process.pid}
    finally:
        process.terminate()
        process.wait(30)


def _stream(url: str, params: dict[str, str]) -> tuple[int, int, bytes, bytes]:
    """(features, bytes, head, tail) of an answer read chunk by chunk; asserts ids run 1, 2, 3, …"""
    count = size = 0
    head = b""
    pending = b""
    # identity: the bytes as the server writes them (a gzip answer could not be scanned as it comes)
    with httpx.stream("GET", url, params=params, headers={"Accept-Encoding": "identity"}, timeout=600) as answer:
        assert answer.status_code == 200, answer.read()[:500]
        assert answer.headers["content-type"] == "application/geo+json"
        for chunk in answer.iter_raw():
            size += len(chunk)
            if len(head) < 4096:
                head += chunk[:4096]
            pending += chunk
            end = 0
            for match in FEATURE.finditer(pending):
                count += 1
                assert int(match.group(1)) == count, f"feature {count} has id {match.group(1)!r}"
                end = match.end()
            pending = pending[max(end, len(pending) - TAIL):]
    return count, size, head, pending


@pytest.mark.parametrize("service", ["wfs", "ogcapi"])
def test_a_whole_table_streams_in_little_memory(server, service):
    if service == "wfs":
        path = "/wfs"
        params = {"SERVICE": "WFS", "VERSION": "2.0.0", "REQUEST": "GetFeature", "TYPENAMES": "big:lieu",
                  "OUTPUTFORMAT": "application/json", "COUNT": str(N)}
    else:
        path, params = "/ogcapi/collections/big:lieu/items", {"limit": str(N), "f": "json"}
    url = server["url"] + path
    pid = server["pid"]
    # warm up the path (imports, connection pool, encoders) with a small answer
    count, _, _, _ = _stream(url, {**params, ("COUNT" if service == "wfs" else "limit"): "1000"})
    assert count == 1000
    before = _status_kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    count, size, head, tail = _stream(url, params)
    peak = _status_kib(pid, "VmHWM")
    growth = (peak - before) * 1024
    print(f"{service}: {count} features, {size >> 20} MiB answer, peak RSS +{growth >> 20} MiB")
    assert count == N
    assert b'"numberReturned":200000' in head and b'"numberMatched":200000' in head
    assert tail.endswith(b"]}")
    assert size > 100 << 20  # the answer is large...
    assert growth < size / 4, f"peak RSS grew by {growth >> 20} MiB for a {size >> 20} MiB answer"  # ...its memory not
