"""WMS GetMap throughput and latency against MapProxy serving the same tiles from its cache,
or server CPU per map against ROK4's own C++ server (``--peer rok4``, issue 16's table).

    .venv/bin/python benchmarks/bench_wms.py [--seconds 5] [--concurrency 4] [--workers 2]
    .venv/bin/python benchmarks/bench_wms.py --peer rok4 [--maps 40] [--rounds 2] [--cases png256 ...]

``--peer rok4`` (needs ROK4 built by ../shared/tools/rok4/build.sh into /opt/rok4): builds three
pyramids (benchmarks/rok4_data.py: 3-band JPEG, 4-band PNG, FLOAT32 DEM, same area), serves them
with ``tileserver serve --workers 1`` and with ROK4 (one rok4 process, 4 threads, behind one nginx
worker), and for each row of benchmarks/map_cases.py sends the same maps to both, alternately
(``--rounds``), `concurrency` in flight, and reads each server's CPU time (user + system of its
processes, /proc) before and after: CPU per map, and the ratio tileserver ÷ ROK4. ROK4 7.0 refuses
hillshade/slope/aspect styles for broadcast (server ``is_style_handled``): that row has no peer.

MapProxy mode:

One run:

1. builds a synthetic orthophoto-like JPEG pyramid in the PM grid (levels 13–15 over ~39 km² near
   46°N; level 15 is 32×32 tiles of 256 px, 4.78 m), as ROK4 slabs for tileserver and as a
   MapProxy file cache (``tms`` layout) holding the *same* JPEG bytes;
2. installs MapProxy 7 and gunicorn in their own virtualenv (``~/.cache/tileserver-bench``, reused)
   — MapProxy is not a project dependency;
3. starts ``tileserver serve --workers N`` (the layer published through the admin API, resampling
   bicubic) and MapProxy under ``gunicorn -w N --threads 2`` (resampling bicubic, truecolour PNG);
4. for each case — 256², 512², 1024²; EPSG:3857 (the grid's CRS) and EPSG:4326 (reprojected, same
   ground resolution); image/jpeg and image/png — checks both answer a non-blank image of the right
   size, then runs a closed loop of `concurrency` clients for `seconds` on random BBOXes inside the
   data, tileserver and MapProxy alternately (``--rounds`` A/B alternations, merged);
5. prints a Markdown table: maps/s, p50 and p99 latency of each, and the throughput ratio.

Both servers get the same worker count on the same machine as the load generator (aiohttp, one
event loop): the figures are ratios, not absolute capacities.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(PROJECT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from bench_core import photo_like  # noqa: E402
from common import (  # noqa: E402
    closed_loop,
    fmt,
    format_table,
    free_port,
    machine_summary,
    merge_results,
    wait_for_port,
)
from PIL import Image  # noqa: E402

from tileserver.rok4.codecs import encode_tile  # noqa: E402
from tileserver.rok4.descriptor import parse_descriptor  # noqa: E402
from tileserver.rok4.slab import build_slab  # noqa: E402
from tileserver.rok4.tms import load_tms  # noqa: E402
from tileserver.settings import load_settings  # noqa: E402

NAME = "BENCH"
BOTTOM = 15
LEVELS = (13, 14, 15)
SLAB = 16  # tiles per slab side
SIDE = 32  # tiles per side at the bottom level
CENTRE = (2.35, 46.0)  # lon, lat of the data
POOL = 48  # distinct tiles
MAPPROXY_VERSION = "7.0.0"
VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tileserver-bench" / "mapproxy-venv"
SIZES = (256, 512, 1024)
CRSS = ("EPSG:3857", "EPSG:4326")
FORMATS = ("image/jpeg", "image/png")
ADMIN_TOKEN = "bench-token"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Data:
    descriptor: Path
    cache: Path
    bbox: tuple[float, float, float, float]  # bottom level extent, EPSG:3857
    cell: float


def _first_tile(level: int) -> tuple[int, int]:
    """Slab-aligned top-left tile (col, row) of the data at a level, near CENTRE."""
    n = 2 ** level
    lon, lat = CENTRE
    col = int((lon + 180) / 360 * n)
    row = int((1 - math.log(math.tan(math.radians(lat)) + 1 / math.cos(math.radians(lat))) / math.pi) / 2 * n)
    return col // SLAB * SLAB, row // SLAB * SLAB


def build_data(workdir: Path, seed: int = 3) -> Data:
    """The pyramid (slabs + descriptor) and MapProxy's tile cache, same JPEG bytes in both."""
    rng = np.random.default_rng(seed)
    pool = [encode_tile(photo_like(rng), "jpg") for _ in range(POOL)]
    tms = load_tms("PM", load_settings(env={}).tms_directory)
    bottom_col, bottom_row = _first_tile(BOTTOM)
    levels = []
    cache = workdir / "mapproxy-cache" / "bench_cache_EPSG3857"
    for z in LEVELS:
        shrink = 2 ** (BOTTOM - z)
        c0, r0 = bottom_col // shrink, bottom_row // shrink
        side = SIDE // shrink
        levels.append({"id": str(z), "tiles_per_width": SLAB, "tiles_per_height": SLAB,
                       "tile_limits": {"min_col": c0, "max_col": c0 + side - 1, "min_row": r0, "max_row": r0 + side - 1},
                       "storage": {"type": "FILE", "image_directory": f"{NAME}/DATA/{z}", "path_depth": 2}})
    descriptor = {"format": "TIFF_JPG_UINT8", "tile_matrix_set": "PM", "levels": levels,
                  "raster_specifications": {"channels": 3, "nodata": "255,255,255", "photometric": "rgb",
                                            "interpolation": "bicubic"}}
    parsed = parse_descriptor(descriptor)
    for z in LEVELS:
        level = parsed.level(str(z))
        lim = level.tile_limits
        slabs: dict[tuple[int, int], list[bytes]] = {}
        for sc in range(lim.min_col // SLAB, lim.max_col // SLAB + 1):
            for sr in range(lim.min_row // SLAB, lim.max_row // SLAB + 1):
                slabs[sc, sr] = [pool[int(i)] for i in rng.integers(0, POOL, SLAB * SLAB)]
        for (sc, sr), tiles in slabs.items():
            path = workdir / level.storage.slab_name(sc, sr)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(build_slab(tiles, SLAB, SLAB, 256, 256, 3, "UINT8", "jpg"))
        for col in range(lim.min_col, lim.max_col + 1):
            for row in range(lim.min_row, lim.max_row + 1):
                data = slabs[col // SLAB, row // SLAB][(row % SLAB) * SLAB + col % SLAB]
                # MapProxy's tms layout counts rows from the bottom (grid origin sw)
                tile = cache / f"{z:02d}" / f"{col:03d}" / f"{2 ** z - 1 - row:03d}.jpeg"
                tile.parent.mkdir(parents=True, exist_ok=True)
                tile.write_bytes(data)
    path = workdir / f"{NAME}.json"
    path.write_text(json.dumps(descriptor))
    lim = parsed.level(str(BOTTOM)).tile_limits
    matrix = tms.get(str(BOTTOM))
    return Data(path, workdir / "mapproxy-cache", matrix.range_bbox(lim.min_col, lim.min_row, lim.max_col, lim.max_row),
                matrix.cell_size)


# --------------------------------------------------------------------------- servers


def ensure_mapproxy() -> Path:
    """A virtualenv with MapProxy and gunicorn (created once, reused)."""
    python = VENV / "bin" / "python"
    if not (VENV / "bin" / "gunicorn").exists():
        VENV.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"mapproxy=={MAPPROXY_VERSION}", "gunicorn"],
                       check=True)
    return VENV


MAPPROXY_YAML = """
services:
  wms:
    srs: ['EPSG:3857', 'EPSG:4326']
    image_formats: ['image/jpeg', 'image/png']
    max_output_pixels: [4096, 4096]
layers:
  - name: bench
    title: bench
    sources: [bench_cache]
caches:
  bench_cache:
    grids: [bench_grid]
    sources: []
    format: image/jpeg
    cache:
      type: file
      directory_layout: tms
      directory: {cache}/bench_cache_EPSG3857
grids:
  bench_grid:
    base: GLOBAL_WEBMERCATOR
    origin: sw
globals:
  image:
    resampling_method: bicubic
    paletted: false
    formats:
      image/png:
        mode: RGB
"""


class Server:
    def __init__(self, name: str, args: list[str], port: int, env: dict[str, str], cwd: Path) -> None:
        self.name, self.port = name, port
        self.log = open(cwd / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(args, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", port, timeout=60, process=self.process)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def start_tileserver(workdir: Path, data: Data, workers: int) -> Server:
    port = free_port()
    env = {**os.environ, "TILESERVER_DEMO": "false", "TILESERVER_ADMIN_TOKEN": ADMIN_TOKEN, "TILESERVER_ADMIN_ROOTS": "*",
           "TILESERVER_DATA_DIR": str(workdir / "tileserver-data"), "TILESERVER_PORT": str(port)}
    server = Server("tileserver", [str(PROJECT / ".venv" / "bin" / "tileserver"), "serve", "--workers", str(workers),
                                   "--port", str(port), "--no-demo", "--log-level", "warning"], port, env, workdir)
    layer = {"title": NAME, "abstract": "benchmark", "resampling": "bicubic",
             "pyramids": [{"path": str(data.descriptor), "bottom_level": str(BOTTOM), "top_level": str(LEVELS[0])}]}
    import urllib.request

    request = urllib.request.Request(f"{server.url}/admin/layers/{NAME}", data=json.dumps(layer).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
    urllib.request.urlopen(request).read()
    time.sleep(1.0)  # other workers see the store change within store_poll_interval
    return server


def start_mapproxy(workdir: Path, data: Data, workers: int) -> Server:
    venv = ensure_mapproxy()
    config = workdir / "mapproxy.yaml"
    config.write_text(MAPPROXY_YAML.format(cache=data.cache))
    (workdir / "mapproxy_app.py").write_text(
        "from mapproxy.wsgiapp import make_wsgi_app\n"
        f"application = make_wsgi_app({str(config)!r})\n")
    port = free_port()
    args = [str(venv / "bin" / "gunicorn"), "-w", str(workers), "-k", "gthread", "--threads", "2",
            "-b", f"127.0.0.1:{port}", "--chdir", str(workdir), "--log-level", "warning", "mapproxy_app:application"]
    return Server("mapproxy", args, port, dict(os.environ), workdir)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Case:
    size: int
    crs: str
    format: str

    @property
    def label(self) -> str:
        kind = "native" if self.crs == "EPSG:3857" else "reprojected"
        return f"{self.size}² {self.crs} ({kind}) {self.format.split('/')[1].upper()}"


def _to_lonlat(x: float, y: float) -> tuple[float, float]:
    r = 6378137.0
    return math.degrees(x / r), math.degrees(2 * math.atan(math.exp(y / r)) - math.pi / 2)


def queries(case: Case, data: Data, count: int, layer: str, seed: int) -> list[str]:
    """Random map requests of `case` inside the data, at the bottom level's ground resolution."""
    rng = random.Random(seed)
    x0, y0, x1, y1 = data.bbox
    span = case.size * data.cell
    out = []
    for _ in range(count):
        mx = rng.uniform(x0 + span * 0.2, x1 - span * 1.2)
        my = rng.uniform(y0 + span * 0.2, y1 - span * 1.2)
        if case.crs == "EPSG:3857":
            bbox = f"{mx},{my},{mx + span},{my + span}"
        else:  # same ground size along x: degrees of longitude per PM metre
            lon, lat = _to_lonlat(mx, my)
            deg = span / 6378137.0 * 180 / math.pi
            bbox = f"{lat},{lon},{lat + deg},{lon + deg}"  # WMS 1.3.0: EPSG:4326 is lat/lon
        params = {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": layer, "STYLES": "",
                  "CRS": case.crs, "BBOX": bbox, "WIDTH": case.size, "HEIGHT": case.size, "FORMAT": case.format}
        out.append("/wms?" + urlencode(params) if layer == NAME else "/service?" + urlencode(params))
    return out


async def check(session: aiohttp.ClientSession, base: str, path: str, case: Case) -> None:
    async with session.get(base + path) as answer:
        body = await answer.read()
        if answer.status != 200 or not answer.headers.get("Content-Type", "").startswith(case.format):
            raise RuntimeError(f"{base}{path}: HTTP {answer.status} {answer.headers.get('Content-Type')}: {body[:300]!r}")
    image = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    if image.shape[:2] != (case.size, case.size) or image.std() < 10:
        raise RuntimeError(f"{base}{path}: blank or wrong-sized image {image.shape}, std {image.std():.1f}")


async def measure(base: str, paths: list[str], seconds: float, concurrency: int):
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        errors = 0

        async def op(path: str) -> None:
            nonlocal errors
            async with session.get(base + path) as answer:
                await answer.read()
                if answer.status != 200:
                    errors += 1

        result = await closed_loop(op, paths, seconds, concurrency, warmup=min(1.0, seconds / 4))
        result.extra["errors"] = errors
        return result


async def run(args: argparse.Namespace) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="bench-wms-"))
    print(f"building data in {workdir} …", file=sys.stderr)
    data = build_data(workdir)
    servers = []
    try:
        ours = start_tileserver(workdir, data, args.workers)
        servers.append(ours)
        peer = start_mapproxy(workdir, data, args.workers)
        servers.append(peer)
        cases = [Case(s, c, f) for s in args.sizes for c in CRSS for f in FORMATS]
        rows = []
        async with aiohttp.ClientSession() as session:
            for case in cases:
                for server, layer in ((ours, NAME), (peer, "bench")):
                    for path in queries(case, data, 3, layer, seed=1):
                        await check(session, server.url, path, case)
        for i, case in enumerate(cases):
            runs: dict[str, list] = {ours.name: [], peer.name: []}
            for _ in range(args.rounds):  # A B A B: load from elsewhere hits both alike
                for server, layer in ((ours, NAME), (peer, "bench")):
                    paths = queries(case, data, 200, layer, seed=100 + i)
                    runs[server.name].append(await measure(server.url, paths, args.seconds / args.rounds,
                                                           args.concurrency))
            results = {name: merge_results(r) for name, r in runs.items()}
            for name, result in results.items():
                print(f"{case.label:40s} {name:10s} {result.rate:7.1f}/s", file=sys.stderr)
            a, b = results["tileserver"], results["mapproxy"]
            rows.append([case.label, fmt(a.rate), fmt(a.p(50) * 1000), fmt(a.p(99) * 1000), fmt(b.rate),
                         fmt(b.p(50) * 1000), fmt(b.p(99) * 1000), f"{a.rate / b.rate:.2f}×" if b.rate else "—",
                         str(a.extra["errors"] + b.extra["errors"])])
    finally:
        for server in servers:
            server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    headers = ["case", "tileserver maps/s", "p50 ms", "p99 ms", "MapProxy maps/s", "p50 ms", "p99 ms",
               "throughput ratio", "errors"]
    return (f"WMS GetMap, {args.workers} worker processes each, {args.concurrency} clients, {args.seconds:g} s per "
            f"cell, bicubic, {args.rounds} alternating rounds; {machine_summary()}\n\n" + format_table(headers, rows))


# --------------------------------------------------------------------------- ROK4 peer (issue 16)


def process_cpu(pids: list[int]) -> float:
    """User + system CPU seconds of processes and their children threads (/proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def process_tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += process_tree(int(child))
    except OSError:
        pass
    return out


async def cpu_per_map(base: str, paths: list[str], pids: list[int], concurrency: int) -> tuple[float, int]:
    """Server CPU ms per request over `paths`, and the count of non-200 answers."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    errors = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = list(paths)

        async def client() -> None:
            nonlocal errors
            while queue:
                path = queue.pop()
                async with session.get(base + path) as answer:
                    await answer.read()
                    errors += answer.status != 200

        await asyncio.gather(*(client() for _ in range(min(2, len(paths)))))  # warm-up
        queue[:] = list(paths)
        before = process_cpu(pids)
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return (process_cpu(pids) - before) / len(paths) * 1000, errors


def _rok4_styles(path: str) -> str:
    """ROK4 wants a style per layer (STYLES= empty is refused): `normal` for the default."""
    from urllib.parse import parse_qsl

    query = dict(parse_qsl(path.split("?", 1)[1], keep_blank_values=True))
    styles = [s or "normal" for s in query["STYLES"].split(",")]
    query["STYLES"] = ",".join(styles + ["normal"] * (len(query["LAYERS"].split(",")) - len(styles)))
    return path.split("?", 1)[0] + "?" + urlencode(query)


async def run_rok4(args: argparse.Namespace) -> str:
    import rok4_data
    import rok4_peer
    from map_cases import CASES, map_paths

    if not rok4_peer.available():
        raise SystemExit("ROK4 is not built: run ../shared/tools/rok4/build.sh (root) first")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-rok4-"))
    data = rok4_data.load_or_build(workdir, PROJECT / "tests" / "data" / "styles")
    tms = Path(args.tms or rok4_peer.RECIPE.parents[1] / "fixtures" / "rok4" / "tms")
    layer_styles = {"BENCH3": ["normal"], "BENCH4": ["normal", "torgb"], "BENCHDEM": ["normal", "estompage", "hypso"]}
    peer = rok4_peer.Rok4(workdir / "rok4-run", data.root, tms, data.styles, free_port(), layer_styles,
                          ["EPSG:4326", "EPSG:3857", "CRS:84", "EPSG:2154"], threads=args.rok4_threads)
    rows = []
    try:
        ours = start_tileserver_layers(workdir, data, layer_styles)
        our_pids = process_tree(ours.process.pid)
        for case in CASES:
            if args.cases and case.key not in args.cases:
                continue
            count = max(4, round(args.maps * (256 * 256 * 16) / (case.size * case.size)) if case.size > 256 else args.maps * 4)
            paths = map_paths(case, data, count, "/wms", seed=11)
            peer_ok = "estompage" not in case.styles
            ts, r4 = [], []
            errors = 0
            for _ in range(args.rounds):
                cpu, err = await cpu_per_map(ours.url, paths, our_pids, args.concurrency)
                ts.append(cpu)
                errors += err
                if peer_ok:
                    cpu, err = await cpu_per_map(peer.url, [_rok4_styles(p) for p in paths], peer.pids, args.concurrency)
                    r4.append(cpu)
                    errors += err
            a = min(ts)
            b = min(r4) if r4 else None
            print(f"{case.label:50s} tileserver {a:7.2f} ms  ROK4 {b if b is None else round(b, 2)} ms", file=sys.stderr)
            rows.append([case.label, fmt(b, 2) if b is not None else "— (refused)", fmt(a, 2),
                         f"{a / b:.2f}" if b else "—", str(count), str(errors)])
    finally:
        if "ours" in locals():
            ours.stop()
        peer.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    headers = ["request", "ROK4 CPU/map ms", "tileserver CPU/map ms", "tileserver ÷ ROK4", "maps", "errors"]
    return (f"WMS GetMap, server CPU per map (user+system, /proc), tileserver --workers 1 vs ROK4 "
            f"({args.rok4_threads} threads) + nginx, {args.concurrency} in flight, best of {args.rounds} "
            f"alternating rounds; {machine_summary()}\n\n" + format_table(headers, rows))


def start_tileserver_layers(workdir: Path, data, layer_styles: dict[str, list[str]]) -> Server:
    shutil.rmtree(workdir / "tileserver-data", ignore_errors=True)  # a fresh store: layers are POSTed again
    port = free_port()
    env = {**os.environ, "TILESERVER_DEMO": "false", "TILESERVER_ADMIN_TOKEN": ADMIN_TOKEN, "TILESERVER_ADMIN_ROOTS": "*",
           "TILESERVER_DATA_DIR": str(workdir / "tileserver-data"), "TILESERVER_PORT": str(port),
           "ROK4_STYLES_DIRECTORY": str(data.styles)}
    server = Server("tileserver", [sys.executable, "-m", "tileserver.cli", "serve", "--workers", "1",
                                   "--port", str(port), "--no-demo", "--log-level", "warning"], port, env, workdir)
    try:
        _publish(server, data, layer_styles)
    except BaseException:
        server.stop()
        raise
    time.sleep(1.0)
    return server


def _publish(server: Server, data, layer_styles: dict[str, list[str]]) -> None:
    import urllib.request

    for name, styles in layer_styles.items():
        desc = json.loads((data.root / f"{name}.json").read_text())
        ids = [lv["id"] for lv in desc["levels"]]
        layer = {"title": name, "abstract": "benchmark", "styles": styles,
                 "pyramids": [{"path": str(data.root / f"{name}.json"), "bottom_level": max(ids, key=int),
                               "top_level": min(ids, key=int)}]}
        request = urllib.request.Request(f"{server.url}/admin/layers/{name}", data=json.dumps(layer).encode(),
                                         method="POST", headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                                                 "Content-Type": "application/json"})
        urllib.request.urlopen(request).read()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per case and server")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of each server")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two servers per case")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--peer", choices=("mapproxy", "rok4"), default="mapproxy")
    parser.add_argument("--maps", type=int, default=16, help="rok4: 1024² maps per round (scaled by size)")
    parser.add_argument("--cases", nargs="*", help="rok4: rows of benchmarks/map_cases.py to run")
    parser.add_argument("--rok4-threads", type=int, default=4)
    parser.add_argument("--tms", help="rok4: TMS directory (default: the recipe's fixtures)")
    parser.add_argument("--workdir", help="rok4: working directory (default: a new temporary one)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(asyncio.run(run_rok4(args) if args.peer == "rok4" else run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
