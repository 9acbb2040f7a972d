"""WFS GetFeature (GeoJSON, a bbox of ~1000 features) through tileserver against ogr2ogr on the same GeoPackage.

    .venv/bin/python benchmarks/bench_wfs.py [--seconds 8] [--concurrency 2] [--workers 2]

One run:

1. builds (once: cached in ``~/.cache/tileserver-bench/wfs``, ``--workdir`` to change) one GeoPackage
   with a 1,000,000-point table and a 100,000-polygon table (13-vertex polygons, 60–300 m across) in
   EPSG:2154 over a 1000 km square, each written by ``pyogrio`` in one call so that GDAL builds the
   R-tree in bulk;
2. starts ``tileserver serve --workers N`` on loopback with the GeoPackage published as a WFS layer
   through the admin API;
3. for each table, checks that the two answer the same number of features for the same bbox, then
   measures, one after the other and in alternating rounds, ``GET /wfs?…&REQUEST=GetFeature&BBOX=…
   &OUTPUTFORMAT=application/json`` (aiohttp, random bboxes holding ~1000 features) and
   ``ogr2ogr -f GeoJSON /vsistdout/ base.gpkg <table> -spat …`` with the same bboxes (a process per
   request, as a CGI-style export would run): time per request and time to the first byte with one
   request in flight, requests/s with `concurrency` in flight; tileserver also with gzip asked for;
4. prints a Markdown table and writes it into the "## WFS GetFeature (issue 13)" section of
   benchmarks/RESULTS.md (``--no-results`` not to).

Both answers are the table's native CRS (EPSG:2154) with every attribute. ogr2ogr's figure includes
its process start and the opening of the GeoPackage, which a server pays once: the comparison is
the cost of an export per request, not of GDAL's reader alone. ``--profile`` prints a cProfile of the
GeoJSON path run in-process (the app through httpx's ASGI transport) instead of the comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlencode

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(PROJECT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
    LoadResult,
    closed_loop,
    fmt,
    format_table,
    free_port,
    machine_summary,
    merge_results,
    percentile,
    update_results,
    wait_for_port,
)

RESULTS = HERE / "RESULTS.md"
SECTION = "## WFS GetFeature (issue 13)"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tileserver-bench" / "wfs"
ADMIN_TOKEN = "bench-token"
LAYER = "bench"
SIDE = 1_000_000.0  # metres: the data covers [X0, X0 + SIDE] x [Y0, Y0 + SIDE] in EPSG:2154
X0, Y0 = 100_000.0, 6_100_000.0
TARGET = 1000  # features per bbox
MAX_FEATURES = 5000  # the server's COUNT ceiling: above any bbox's count


@dataclass(frozen=True)
class Table:
    name: str
    rows: int
    geometry: str


TABLES = (Table("points", 1_000_000, "Point"), Table("polygons", 100_000, "Polygon"))


# --------------------------------------------------------------------------- data


def _attributes(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[str]]:
    names = np.array([f"feature {i}" for i in range(n)], dtype=object)
    return [names, rng.integers(0, 10_000, n).astype(np.int64), rng.uniform(0, 1000, n).round(3)], \
        ["nom", "code", "valeur"]


def build_data(workdir: Path, seed: int = 7) -> Path:
    """The GeoPackage (reused when present): each table in one `pyogrio.raw.write` call."""
    import pyogrio.raw
    import shapely

    path = workdir / "base.gpkg"
    if path.exists():
        return path
    workdir.mkdir(parents=True, exist_ok=True)
    partial = workdir / "base.partial.gpkg"
    partial.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    for i, table in enumerate(TABLES):
        t0 = time.perf_counter()
        xy = rng.uniform(0, SIDE, (table.rows, 2)) + (X0, Y0)
        geoms = shapely.points(xy)
        if table.geometry == "Polygon":
            geoms = shapely.buffer(geoms, rng.uniform(30, 150, table.rows), quad_segs=3)
        values, names = _attributes(rng, table.rows)
        pyogrio.raw.write(partial, np.array(shapely.to_wkb(geoms), dtype=object), values, names,
                          layer=table.name, driver="GPKG", geometry_type=table.geometry, crs="EPSG:2154",
                          append=i > 0)
        print(f"wrote {table.rows:,} {table.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    partial.rename(path)
    return path


def bboxes(table: Table, count: int, seed: int) -> list[tuple[float, float, float, float]]:
    """Random squares inside the data holding ~TARGET features each (uniform density)."""
    rng = random.Random(seed)
    side = SIDE * math.sqrt(TARGET / table.rows)
    out = []
    for _ in range(count):
        x, y = X0 + rng.uniform(0, SIDE - side), Y0 + rng.uniform(0, SIDE - side)
        out.append((round(x, 1), round(y, 1), round(x + side, 1), round(y + side, 1)))
    return out


# --------------------------------------------------------------------------- the server


class Server:
    def __init__(self, workdir: Path, gpkg: Path, workers: int) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TILESERVER_", "ROK4_"))}
        env.update(TILESERVER_DEMO="false", TILESERVER_ADMIN_TOKEN=ADMIN_TOKEN,
                   TILESERVER_DATA_DIR=str(workdir / "tileserver-data"), TILESERVER_ADMIN_ROOTS=str(gpkg.parent),
                   TILESERVER_WFS_MAX_FEATURES=str(MAX_FEATURES),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")])))
        self.log = open(workdir / "tileserver.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tileserver.cli", "serve", "--workers", str(workers), "--port", str(self.port),
             "--no-demo", "--log-level", "warning"], env=env, cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", self.port, timeout=60, process=self.process)
        self.publish(gpkg, workers)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def publish(self, gpkg: Path, workers: int) -> None:
        import urllib.request

        record = {"title": "WFS benchmark", "abstract": "synthetic points and polygons",
                  "wfs": {"base": f"file://{gpkg}",
                          "relations": [{"native_name": t.name, "public_name": t.name} for t in TABLES]}}
        request = urllib.request.Request(
            f"{self.url}/admin/layers/{LAYER}", data=json.dumps(record).encode(), method="POST",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
        urllib.request.urlopen(request).read()
        # every worker sees the store change within store_poll_interval: wait until all answer
        capabilities = f"{self.url}/wfs?SERVICE=WFS&REQUEST=GetCapabilities"
        deadline, in_a_row = time.monotonic() + 30, 0
        while in_a_row < 8 * workers:
            body = urllib.request.urlopen(capabilities).read()
            in_a_row = in_a_row + 1 if f"{LAYER}:{TABLES[-1].name}".encode() in body else 0
            if time.monotonic() > deadline:
                raise RuntimeError("the published layer does not show in every worker")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def wfs_path(table: Table, bbox: tuple[float, float, float, float]) -> str:
    params = {"SERVICE": "WFS", "VERSION": "2.0.0", "REQUEST": "GetFeature", "TYPENAMES": f"{LAYER}:{table.name}",
              "BBOX": ",".join(map(repr, bbox)) + ",urn:ogc:def:crs:EPSG::2154", "OUTPUTFORMAT": "application/json"}
    return "/wfs?" + urlencode(params)


def ogr_args(gpkg: Path, table: Table, bbox: tuple[float, float, float, float]) -> list[str]:
    return ["ogr2ogr", "-f", "GeoJSON", "/vsistdout/", str(gpkg), table.name, "-spat", *map(repr, bbox)]


# --------------------------------------------------------------------------- clients


async def check(session: aiohttp.ClientSession, server: Server, gpkg: Path, table: Table) -> int:
    """Both answer the same features for the same bboxes; returns the mean count."""
    counts = []
    for bbox in bboxes(table, 3, seed=1):
        async with session.get(server.url + wfs_path(table, bbox)) as answer:
            body = await answer.read()
            if answer.status != 200:
                raise RuntimeError(f"GetFeature {table.name}: HTTP {answer.status}: {body[:300]!r}")
        ours = json.loads(body)
        theirs = json.loads(subprocess.run(ogr_args(gpkg, table, bbox), capture_output=True, check=True).stdout)
        a = sorted(f["properties"]["nom"] for f in ours["features"])
        b = sorted(f["properties"]["nom"] for f in theirs["features"])
        if a != b or ours["numberReturned"] != len(a) or ours["numberMatched"] != len(a):
            raise RuntimeError(f"{table.name} {bbox}: tileserver {len(a)} features "
                               f"(numberMatched {ours['numberMatched']}), ogr2ogr {len(b)}")
        counts.append(len(a))
    return round(sum(counts) / len(counts))


async def measure_server(url: str, paths: list[str], seconds: float, concurrency: int, gzip: bool = False) -> LoadResult:
    """`gzip`: ask for a gzip answer (aiohttp inflates it); else identity, the bytes ogr2ogr writes."""
    first_bytes: list[float] = []
    sizes: list[int] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Accept-Encoding": "gzip" if gzip else "identity"}
    async with aiohttp.ClientSession(connector=connector, headers=headers, auto_decompress=True) as session:
        async def op(path: str) -> None:
            t0 = time.perf_counter()
            async with session.get(url + path) as answer:
                chunk = await answer.content.readany()
                first_bytes.append(time.perf_counter() - t0)
                size = len(chunk) + len(await answer.read())
                if answer.status != 200:
                    raise RuntimeError(f"HTTP {answer.status}")
                sizes.append(size)

        await closed_loop(op, paths, min(1.0, seconds / 4), concurrency)  # warm-up, not counted
        first_bytes.clear()
        sizes.clear()
        result = await closed_loop(op, paths, seconds, concurrency)
    result.extra = {"first_bytes": first_bytes, "sizes": sizes}
    return result


async def measure_ogr(args_of: list[list[str]], seconds: float, concurrency: int) -> LoadResult:
    first_bytes: list[float] = []
    sizes: list[int] = []

    async def op(args: list[str]) -> None:
        t0 = time.perf_counter()
        process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.DEVNULL)
        assert process.stdout is not None
        chunk = await process.stdout.read(65536)
        first_bytes.append(time.perf_counter() - t0)
        size = len(chunk) + len(await process.stdout.read())
        if await process.wait() != 0:
            raise RuntimeError(f"{' '.join(args)} failed")
        sizes.append(size)

    await closed_loop(op, args_of, min(1.0, seconds / 4), concurrency)  # warm-up, not counted
    first_bytes.clear()
    sizes.clear()
    result = await closed_loop(op, args_of, seconds, concurrency)
    result.extra = {"first_bytes": first_bytes, "sizes": sizes}
    return result


def _merged(results: list[LoadResult]) -> LoadResult:
    """The rounds as one: latency percentiles, median first byte and mean size over all requests."""
    merged = merge_results([replace(r, extra={}) for r in results])
    first_bytes = sorted(x for r in results for x in r.extra["first_bytes"])
    sizes = [x for r in results for x in r.extra["sizes"]]
    merged.extra = {"first_byte": percentile(first_bytes, 50), "bytes": sum(sizes) / len(sizes) if sizes else math.nan}
    return merged


async def compare(args: argparse.Namespace, server: Server, gpkg: Path) -> str:
    rows = []
    async with aiohttp.ClientSession() as session:
        counts = {t.name: await check(session, server, gpkg, t) for t in TABLES}
    for i, table in enumerate(TABLES):
        boxes = bboxes(table, 100, seed=100 + i)
        paths = [wfs_path(table, b) for b in boxes]
        commands = [ogr_args(gpkg, table, b) for b in boxes]
        runs: dict[tuple[str, int], list[LoadResult]] = {}
        for _ in range(args.rounds):  # A B A B: load from elsewhere hits both alike
            for concurrency in (1, args.concurrency):
                share = args.seconds / args.rounds / 2
                runs.setdefault(("ts", concurrency), []).append(
                    await measure_server(server.url, paths, share, concurrency))
                runs.setdefault(("ogr", concurrency), []).append(await measure_ogr(commands, share, concurrency))
            runs.setdefault(("gzip", 1), []).append(
                await measure_server(server.url, paths, args.seconds / args.rounds / 2, 1, gzip=True))
        r = {key: _merged(value) for key, value in runs.items()}
        ts1, ogr1, tsn, ogrn = r["ts", 1], r["ogr", 1], r["ts", args.concurrency], r["ogr", args.concurrency]
        gz = r["gzip", 1]
        print(f"{table.name}: tileserver {ts1.p(50) * 1000:.1f} ms, ogr2ogr {ogr1.p(50) * 1000:.1f} ms; "
              f"{tsn.rate:.1f}/s against {ogrn.rate:.1f}/s", file=sys.stderr)
        rows.append([
            f"{table.rows:,} {table.name}, ~{counts[table.name]:,} per bbox ({ts1.extra['bytes'] / 1024:,.0f} KiB)",
            fmt(ts1.p(50) * 1000), fmt(ts1.extra["first_byte"] * 1000), fmt(tsn.rate), fmt(gz.p(50) * 1000),
            fmt(ogr1.p(50) * 1000), fmt(ogr1.extra["first_byte"] * 1000), fmt(ogrn.rate),
            f"{ogr1.p(50) / ts1.p(50):.2f}×", f"{tsn.rate / ogrn.rate:.2f}×" if ogrn.rate else "—",
        ])
    headers = ["table, features per answer", "tileserver ms/request (p50)", "first byte ms", "requests/s",
               "gzip ms/request",
               "ogr2ogr ms/request (p50)", "first byte ms", "requests/s", "time ratio ogr2ogr ÷ tileserver",
               "throughput ratio tileserver ÷ ogr2ogr"]
    command = ".venv/bin/python benchmarks/bench_wfs.py " + " ".join(args.argv)
    return (f"Command: `{command.strip()}` — tileserver `serve --workers {args.workers}` on loopback (aiohttp "
            f"client in the same run) against `ogr2ogr -f GeoJSON /vsistdout/ base.gpkg <table> -spat …` "
            f"(GDAL {ogr_version()}, a process per request), the same GeoPackage and the same random bboxes, "
            f"GeoJSON in EPSG:2154 with every attribute; ms/request and first byte with one request in flight, "
            f"requests/s with {args.concurrency} in flight; tileserver answers uncompressed as ogr2ogr writes (`Accept-"
            f"Encoding: identity`), the gzip column asks for gzip; {args.seconds:g} s per cell in {args.rounds} "
            f"alternating rounds. {machine_summary()}.\n\n" + format_table(headers, rows))


def ogr_version() -> str:
    out = subprocess.run(["ogr2ogr", "--version"], capture_output=True, text=True).stdout
    return out.split(",")[0].removeprefix("GDAL ").strip()


# --------------------------------------------------------------------------- profile


async def profile(args: argparse.Namespace, workdir: Path, gpkg: Path) -> None:
    """cProfile of GetFeature GeoJSON answers served in-process (no network, no other worker)."""
    import cProfile
    import pstats

    import httpx

    from tileserver.app import create_app
    from tileserver.settings import load_settings

    settings = replace(load_settings(env={}), data_dir=str(workdir / "profile-data"), demo=False,
                       admin_token=ADMIN_TOKEN, admin_roots=(str(gpkg.parent),), wfs_max_features=MAX_FEATURES)
    app = create_app(settings)
    record = {"title": "WFS benchmark", "abstract": "", "wfs": {
        "base": f"file://{gpkg}", "relations": [{"native_name": t.name, "public_name": t.name} for t in TABLES]}}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            answer = await client.post(f"/admin/layers/{LAYER}", json=record,
                                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            answer.raise_for_status()
            for table in TABLES:
                if args.profile not in ("all", table.name):
                    continue
                paths = [wfs_path(table, b) for b in bboxes(table, 30, seed=5)]
                for path in paths[:3]:
                    (await client.get(path)).raise_for_status()
                t0, cpu0 = time.perf_counter(), time.process_time()
                for path in paths:
                    (await client.get(path)).raise_for_status()
                print(f"\n{table.name}: {(time.perf_counter() - t0) / len(paths) * 1000:.1f} ms per answer in-process, "
                      f"{(time.process_time() - cpu0) / len(paths) * 1000:.1f} ms CPU (no profiler)", file=sys.stderr)
                profiler = cProfile.Profile()
                t0 = time.perf_counter()
                profiler.enable()
                for path in paths:
                    (await client.get(path)).raise_for_status()
                profiler.disable()
                print(f"{table.name}: {len(paths)} answers, {(time.perf_counter() - t0) / len(paths) * 1000:.1f} "
                      f"ms each under cProfile", file=sys.stderr)
                pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per table, tool and concurrency")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight for requests/s")
    parser.add_argument("--workers", type=int, default=2, help="tileserver worker processes")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two per cell")
    parser.add_argument("--workdir", type=Path, default=CACHE, help="where the GeoPackage is built and kept")
    parser.add_argument("--profile", choices=("points", "polygons", "all"),
                        help="print a cProfile of the in-process GeoJSON path instead of comparing")
    parser.add_argument("--no-results", action="store_true", help=f"do not write {RESULTS.name}")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


async def run(args: argparse.Namespace) -> str | None:
    gpkg = build_data(args.workdir)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-wfs-"))
    try:
        if args.profile:
            await profile(args, run_dir, gpkg)
            return None
        if shutil.which("ogr2ogr") is None:
            raise SystemExit("ogr2ogr is not installed (apt-get install -y gdal-bin)")
        server = Server(run_dir, gpkg, args.workers)
        try:
            return await compare(args, server, gpkg)
        finally:
            server.stop()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    if report is None:
        return 0
    print(report)
    if not args.no_results:
        update_results(RESULTS, SECTION, report, "bench_wfs.py")
        print(f"\n(written to {RESULTS.relative_to(PROJECT)}, section {SECTION!r})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
