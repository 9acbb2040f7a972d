"""Workers scale and overload (issue 16, goals 3 and 4).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_workers.py [--seconds 10] [--connections 32]
        [--overload-seconds 15] [--skip-overload]

Scaling: bench_wms's synthetic 3-band JPEG pyramid (PM levels 13–15) served by
``tileserver serve --workers N`` for N = 1 then 2 (its own process tree, default settings), each
driven by wrk (one thread, `connections` connections, a Lua script cycling 200 URLs) on WMTS
GetTile (KVP, stored JPEG tiles) and WMS GetMap 256² PNG in EPSG:3857. Per run: requests/s, p99,
server CPU seconds (all its processes, /proc) per second of run = busy cores, and requests/s per
busy core; the RSS of every server process after the runs.

Overload: one worker, the map case made heavier (1024² PNG), its capacity measured with wrk
(8 connections), then an open loop from this process (aiohttp) sending maps at twice that rate
for `overload_seconds`, with the default `render_queue_depth` and with no bound (-1, the old
behaviour: every render waits up to `render_queue_wait` for a slot). Per run: answers 200 and
their p50/p99, answers 503 (all with Retry-After?) and their p99, and other answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(PROJECT))

import aiohttp  # noqa: E402
from bench_wms import (  # noqa: E402
    ADMIN_TOKEN,
    BOTTOM,
    LEVELS,
    NAME,
    Case,
    Server,
    build_data,
    process_cpu,
    process_tree,
    queries,
)
from common import format_table, free_port, machine_summary, percentile, run_wrk  # noqa: E402


def start(workdir: Path, descriptor: Path, workers: int, **env_extra: str) -> Server:
    shutil.rmtree(workdir / "tileserver-data", ignore_errors=True)
    port = free_port()
    env = {**os.environ, "TILESERVER_DEMO": "false", "TILESERVER_ADMIN_TOKEN": ADMIN_TOKEN, "TILESERVER_ADMIN_ROOTS": "*",
           "TILESERVER_DATA_DIR": str(workdir / "tileserver-data"), "TILESERVER_PORT": str(port),
           "PYTHONPATH": str(PROJECT), **env_extra}
    server = Server("tileserver", [sys.executable, "-m", "tileserver.cli", "serve", "--workers", str(workers),
                                   "--port", str(port), "--no-demo", "--log-level", "warning"], port, env, workdir)
    import urllib.request

    layer = {"title": NAME, "abstract": "benchmark", "resampling": "bicubic",
             "pyramids": [{"path": str(descriptor), "bottom_level": str(BOTTOM), "top_level": str(LEVELS[0])}]}
    request = urllib.request.Request(f"{server.url}/admin/layers/{NAME}", data=json.dumps(layer).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request).read()
    except BaseException:
        server.stop()
        raise
    time.sleep(3.0)  # the other workers see the store change within store_poll_interval (2 s)
    return server


def tile_paths(descriptor: Path, count: int) -> list[str]:
    desc = json.loads(descriptor.read_text())
    lim = next(lv for lv in desc["levels"] if lv["id"] == str(BOTTOM))["tile_limits"]
    paths = []
    for i in range(count):
        col = lim["min_col"] + (i * 7) % (lim["max_col"] - lim["min_col"] + 1)
        row = lim["min_row"] + (i * 13) % (lim["max_row"] - lim["min_row"] + 1)
        paths.append("/wmts?" + urlencode({"SERVICE": "WMTS", "REQUEST": "GetTile", "VERSION": "1.0.0", "LAYER": NAME,
                                           "STYLE": "normal", "FORMAT": "image/jpeg", "TILEMATRIXSET": "PM",
                                           "TILEMATRIX": str(BOTTOM), "TILEROW": str(row), "TILECOL": str(col)}))
    return paths


def lua(workdir: Path, name: str, paths: list[str]) -> str:
    script = workdir / f"{name}.lua"
    items = ",\n".join(json.dumps(p) for p in paths)
    script.write_text(f"local paths = {{\n{items}\n}}\nlocal i = 0\n"
                      "request = function()\n  i = i % #paths + 1\n  return wrk.format('GET', paths[i])\nend\n")
    return str(script)


def rss_mib(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(int(line.split()[1]) / 1024)
        except OSError:
            pass
    return out


def scaling(args: argparse.Namespace, workdir: Path, descriptor: Path, data) -> str:
    cases = {"WMTS GetTile (stored JPEG)": (tile_paths(descriptor, 200), args.connections),
             "WMS GetMap 256² PNG EPSG:3857": (queries(Case(256, "EPSG:3857", "image/png"), data, 200, NAME, seed=5),
                                               8)}  # no more than the render slots: nothing shed
    rows = []
    for workers in (1, 2):
        server = start(workdir, descriptor, workers)
        try:
            for label, (paths, connections) in cases.items():
                script = lua(workdir, "case", paths)
                run_wrk(server.url + "/", 2, connections=connections, threads=1, script=script)  # warm
                pids = process_tree(server.process.pid)
                cpu0 = process_cpu(pids)
                result = run_wrk(server.url + "/", args.seconds, connections=connections, threads=1, script=script)
                busy = (process_cpu(pids) - cpu0) / result.seconds
                rate = (result.requests - result.errors) / result.seconds  # answered 200
                rows.append([label, str(workers), str(connections), f"{rate:.0f}", f"{result.p99 * 1000:.0f}",
                             f"{busy:.2f}", f"{rate / busy:.0f}" if busy else "—", str(result.errors)])
                print(rows[-1], file=sys.stderr)
            rows[-1].append(" / ".join(f"{m:.0f}" for m in rss_mib(process_tree(server.process.pid))))
        finally:
            server.stop()
    for row in rows:
        if len(row) < 9:
            row.append("")
    headers = ["case", "workers", "wrk connections", "200/s", "p99 ms", "server busy cores", "req/s per busy core", "errors",
               "RSS MiB (parent / workers)"]
    return format_table(headers, rows)


async def open_loop(base: str, paths: list[str], rate: float, seconds: float) -> dict[str, list[float] | int]:
    """Requests sent at `rate`/s whatever the answers (an overload does not wait for the server)."""
    ok: list[float] = []
    shed: list[float] = []
    other = 0
    shed_without_retry = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(path: str) -> None:
            nonlocal other, shed_without_retry
            t0 = time.perf_counter()
            async with session.get(base + path) as answer:
                await answer.read()
                elapsed = time.perf_counter() - t0
                if answer.status == 200:
                    ok.append(elapsed)
                elif answer.status == 503:
                    shed.append(elapsed)
                    shed_without_retry += "Retry-After" not in answer.headers
                else:
                    other += 1

        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(paths[i % len(paths)])))
        await asyncio.gather(*tasks)
    return {"ok": sorted(ok), "shed": sorted(shed), "other": other, "shed_without_retry": shed_without_retry}


def overload(args: argparse.Namespace, workdir: Path, descriptor: Path, data) -> str:
    paths = queries(Case(1024, "EPSG:3857", "image/png"), data, 200, NAME, seed=9)
    rows = []
    capacity = 0.0
    for depth in [str(d) for d in args.queue_depth] + ["-1"]:
        server = start(workdir, descriptor, 1, TILESERVER_RENDER_QUEUE_DEPTH=depth)
        try:
            if not capacity:
                script = lua(workdir, "maps", paths)
                run_wrk(server.url + "/", 2, connections=8, threads=1, script=script)
                capacity = run_wrk(server.url + "/", args.seconds, connections=8, threads=1, script=script).rate
                print(f"capacity {capacity:.1f} maps/s", file=sys.stderr)
            got = asyncio.run(open_loop(server.url, paths, 2 * capacity, args.overload_seconds))
        finally:
            server.stop()
        ok, shed = got["ok"], got["shed"]
        assert isinstance(ok, list) and isinstance(shed, list)
        rows.append([depth if depth != "-1" else "-1 (no bound: waits up to render_queue_wait)", f"{2 * capacity:.1f}", str(len(ok)),
                     f"{percentile(ok, 50) * 1000:.0f}", f"{percentile(ok, 99) * 1000:.0f}", str(len(shed)),
                     f"{percentile(shed, 50) * 1000:.0f}", f"{percentile(shed, 99) * 1000:.0f}",
                     str(got["shed_without_retry"]), str(got["other"])])
        print(rows[-1], file=sys.stderr)
    headers = ["render_queue_depth", "sent maps/s (2× capacity)", "200", "p50 ms", "p99 ms", "503", "503 p50 ms",
               "503 p99 ms", "503 without Retry-After", "other"]
    return (f"WMS GetMap 1024² PNG, 1 worker (render_concurrency 8), capacity {capacity:.1f} maps/s (wrk, 8 "
            f"connections), then an open loop at twice it for {args.overload_seconds:g} s\n\n" + format_table(headers, rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--overload-seconds", type=float, default=15.0)
    parser.add_argument("--skip-overload", action="store_true")
    parser.add_argument("--queue-depth", type=int, nargs="+", default=[4],
                        help="render_queue_depth of the overload runs (then one with no bound)")
    parser.add_argument("--skip-scaling", action="store_true")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    try:
        data = build_data(workdir)
        out = [machine_summary(), ""]
        if not args.skip_scaling:
            out += [scaling(args, workdir, data.descriptor, data), ""]
        if not args.skip_overload:
            out += [overload(args, workdir, data.descriptor, data)]
        print("\n".join(out))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
