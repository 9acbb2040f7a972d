"""Server load (issue 3): WMTS GetTile through `tileserver serve` against a bare starlette ceiling.

    .venv/bin/python benchmarks/bench_server.py [--seconds N] [--connections C]

One run:

- builds bench_core's synthetic JPEG pyramid (64 slabs of 16x16 tiles of 256x256 px, ~15 KB a
  tile, 16,384 tiles at PM level 12) in the FILE layout and as S3 objects served read-only by
  nginx (path-style ``<bucket>/<key>``); ``--workdir DIR`` keeps it there and reuses it next time;
- starts ``tileserver serve`` (1 worker, its own process, TILESERVER_DATA_DIR in a temporary
  directory, demo off, an admin token, ROK4_S3_URL pointing at nginx) and publishes two layers
  through the admin API: BENCH_FILE (the FILE descriptor) and BENCH_S3 (``s3://bench/BENCH.json``);
- starts the ceiling: a bare starlette app served by uvicorn the same way (1 worker, uvloop +
  httptools, no access log), one endpoint answering every one of the benchmark's URLs with the
  same tile bytes from a dict in memory;
- writes wrk Lua scripts picking, per request, a random URL among N random tiles inside the
  pyramid's real extent (WMTS REST, and KVP), checks that both servers answer the stored bytes,
  warms the slab-index cache (one tile per slab) and both servers (a short untimed wrk run);
- drives each pair {tileserver, bare} with the same script from wrk (a separate process on
  loopback, 2 threads, 64 connections by default), in interleaved rounds so drifting load on the
  box hits both alike: FILE REST, FILE KVP, S3 REST;
- prints a Markdown table (tiles/s, p50/p99, ratio to the ceiling, server CPU per tile read from
  /proc/<pid>/stat, busy cores of each process) and writes it, with the command, machine and what
  bounds the S3 figure, into the "## Server load (issue 3)" section of benchmarks/RESULTS.md
  (only between its generated markers; notes written by hand around them are kept).

``--profile SECONDS`` adds one more FILE REST wrk run with ``py-spy record`` attached to the
tileserver process (``pip install py-spy``), and prints the top functions by own and total time.
nginx and wrk are installed with apt-get when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from urllib.parse import urlencode

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_core import BUCKET, LEVEL, NAME, TILES_PER_SLAB_SIDE, Layout, prepare  # noqa: E402
from common import (  # noqa: E402
    Nginx,
    WrkResult,
    _proc_cpu_seconds,
    ensure_commands,
    fmt,
    fmt_int,
    format_table,
    free_port,
    machine_summary,
    run_wrk,
    system_busy_seconds,
    wait_for_port,
)

HOST = "127.0.0.1"
TOKEN = "bench-admin-token"
S3_KEY, S3_SECRET = "bench-access-key", "bench-secret-key"
LAYERS = {"FILE": "BENCH_FILE", "S3": "BENCH_S3"}
MIME = "image/jpeg"
RESULTS = HERE / "RESULTS.md"
SECTION = "## Server load (issue 3)"
BEGIN = "<!-- bench_server.py: generated, replaced at each run -->"
END = "<!-- bench_server.py: end of generated part -->"
LAYOUT_VERSION = 1


# --- the pyramid ---------------------------------------------------------------------------------


def pyramid(workdir: Path | None, n_urls: int) -> tuple[Layout, Path, bool]:
    """bench_core's layout; kept in (and reused from) `workdir` when given, else a temporary dir."""
    if workdir is not None:
        stamp = workdir / "layout.pickle"
        if stamp.exists():
            try:
                version, n, layout = pickle.loads(stamp.read_bytes())
            except Exception:  # an older or broken stamp: build again
                version, n, layout = None, 0, None
            if version == LAYOUT_VERSION and n >= n_urls and Path(layout.file_descriptor).exists():
                print(f"reusing the synthetic pyramid in {workdir}", file=sys.stderr, flush=True)
                return layout, workdir, False
        workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("file", "s3"):
            shutil.rmtree(workdir / sub, ignore_errors=True)
    root = workdir or Path(tempfile.mkdtemp(prefix="bench-server-"))
    print(f"building the synthetic pyramid in {root} ...", file=sys.stderr, flush=True)
    layout = prepare(root, n_urls)
    if workdir is not None:
        (workdir / "layout.pickle").write_bytes(pickle.dumps((LAYOUT_VERSION, n_urls, layout)))
    return layout, root, workdir is None


# --- URLs, expected bytes, wrk scripts -----------------------------------------------------------


def rest_url(layer: str, col: int, row: int) -> str:
    return f"/wmts/1.0.0/{layer}/normal/PM/{LEVEL}/{row}/{col}.jpeg"


def kvp_url(layer: str, col: int, row: int) -> str:
    query = urlencode({
        "SERVICE": "WMTS", "REQUEST": "GetTile", "VERSION": "1.0.0", "LAYER": layer, "STYLE": "normal",
        "FORMAT": MIME, "TILEMATRIXSET": "PM", "TILEMATRIX": LEVEL, "TILEROW": row, "TILECOL": col,
    })
    return f"/wmts?{query}"


@dataclass
class Case:
    """One URL list driven against both servers: `storage` × `style` (REST or KVP)."""

    storage: str
    style: str
    urls: list[str]
    script: str = ""

    @property
    def name(self) -> str:
        return f"{self.storage} {self.style}"


def tile_bytes(layout: Layout, n_urls: int) -> list[bytes]:
    """The stored bytes of the first `n_urls` random tiles, identical payloads shared (memory)."""
    unique: dict[bytes, bytes] = {}
    out = []
    handles: dict[str, object] = {}
    try:
        for read in layout.reads[:n_urls]:
            f = handles.get(read.key)
            if f is None:
                f = handles[read.key] = open(layout.s3_root / BUCKET / read.key, "rb")  # noqa: SIM115
            data = os.pread(f.fileno(), read.size, read.offset)  # type: ignore[attr-defined]
            out.append(unique.setdefault(data, data))
    finally:
        for f in handles.values():
            f.close()  # type: ignore[attr-defined]
    return out


LUA = """\
-- generated by benchmarks/bench_server.py: a random URL among {n} per request
local paths = {{
{paths}
}}
local requests = {{}}
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("seed", threads)
end

function init(args)
  math.randomseed({seed} + 7919 * seed)
  for i, path in ipairs(paths) do
    requests[i] = wrk.format("GET", path)
  end
end

function request()
  return requests[math.random(#requests)]
end
"""


def write_script(path: Path, urls: list[str], seed: int) -> str:
    lines = ",\n".join(json.dumps(u) for u in urls)  # JSON strings are valid Lua strings for ASCII
    path.write_text(LUA.format(n=len(urls), paths=lines, seed=seed))
    return str(path)


BARE_APP = '''\
"""The ceiling: the benchmark's URLs answered with the same tile bytes from a dict in memory."""
import pickle

from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

with open({tiles!r}, "rb") as f:
    TILES = pickle.load(f)


async def tile(request):
    scope = request.scope
    query = scope["query_string"]
    key = scope["path"] + ("?" + query.decode("latin-1") if query else "")
    body = TILES.get(key)
    if body is None:
        return Response(b"not found", status_code=404)
    return Response(body, media_type="image/jpeg")


app = Starlette(routes=[Route("/{{path:path}}", tile, methods=["GET"])])
'''


# --- servers -------------------------------------------------------------------------------------


@dataclass
class Server:
    """A server process on loopback: its pid (CPU from /proc), its URL, its log file."""

    label: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def cpu(self) -> float:
        return _proc_cpu_seconds(self.process.pid)

    def ready(self, path: str, timeout: float = 30.0) -> None:
        try:
            wait_for_port(HOST, self.port, timeout, self.process)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    status, _, _ = http("GET", self.url + path)
                    if status == 200:
                        return
                except OSError:
                    pass
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"{path} never answered 200")
                time.sleep(0.05)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{self.label} did not start: {exc}\n{self.tail()}") from None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: uvicorn shuts down gracefully
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _clean_env() -> dict[str, str]:
    """This environment without any TILESERVER_* / ROK4_* setting that would leak into the servers."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TILESERVER_", "ROK4_", "AWS_"))}


def start_tileserver(tmp: Path, nginx: Nginx | None, log_level: str, settings: list[str] | None = None,
                     tree: Path | None = None, label: str = "tileserver") -> Server:
    """`tileserver serve`, one worker, data and log under `tmp`; `tree`: a source tree put first on
    PYTHONPATH (another version of tileserver, measured side by side)."""
    port = free_port(HOST)
    env = _clean_env()
    for setting in settings or []:  # --setting fast_tiles=false → TILESERVER_FAST_TILES=false
        name, _, value = setting.partition("=")
        env["TILESERVER_" + name.strip().upper()] = value.strip()
    env.update(TILESERVER_DATA_DIR=str(tmp / "data"), TILESERVER_ADMIN_TOKEN=TOKEN, TILESERVER_DEMO="false",
               TILESERVER_ADMIN_ROOTS="*")  # the benchmark's own pyramids, wherever --workdir puts them
    if nginx is not None:
        env.update(ROK4_S3_URL=nginx.url, ROK4_S3_KEY=S3_KEY, ROK4_S3_SECRETKEY=S3_SECRET)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    script = Path(sys.executable).parent / "tileserver"
    program = [str(script)] if script.exists() and tree is None else [sys.executable, "-c", "import sys; from tileserver.cli import main; sys.exit(main())"]
    cmd = [*program, "serve", "--host", HOST, "--port", str(port), "--workers", "1", "--no-demo",
           "--log-level", log_level]
    log = tmp / "tileserver.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    server = Server(label, process, port, log)
    server.ready("/healthcheck")
    return server


def start_bare(tmp: Path, tiles: dict[str, bytes]) -> Server:
    port = free_port(HOST)
    pickled = tmp / "bare_tiles.pickle"
    pickled.write_bytes(pickle.dumps(tiles, protocol=pickle.HIGHEST_PROTOCOL))
    (tmp / "bench_bare_app.py").write_text(BARE_APP.format(tiles=str(pickled)))
    cmd = [sys.executable, "-m", "uvicorn", "bench_bare_app:app", "--app-dir", str(tmp), "--host", HOST,
           "--port", str(port), "--workers", "1", "--no-access-log", "--log-level", "warning"]
    log = tmp / "bare.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, env=_clean_env(), stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    server = Server("bare starlette", process, port, log)
    server.ready(next(iter(tiles)))
    return server


def publish(server: Server, layout: Layout, storages: list[str]) -> None:
    paths = {"FILE": f"file://{layout.file_descriptor}", "S3": f"s3://{BUCKET}/{NAME}.json"}
    for storage in storages:
        descriptor = {
            "title": f"bench {storage}", "abstract": "synthetic JPEG pyramid (benchmarks/bench_server.py)",
            "pyramids": [{"path": paths[storage], "bottom_level": LEVEL, "top_level": LEVEL}],
        }
        status, _, body = http("POST", f"{server.url}/admin/layers/{LAYERS[storage]}", json.dumps(descriptor).encode(),
                               {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        if status not in (201, 204):
            raise RuntimeError(f"publishing {LAYERS[storage]}: HTTP {status} {body[:500]!r}\n{server.tail()}")


def check_and_warm(servers: list[Server], cases: list[Case], expected: dict[str, bytes], layout: Layout,
                   n_urls: int) -> None:
    """Both servers give the stored bytes (first 32 URLs of each case); one tile per slab warms the index."""
    for case in cases:
        for url in case.urls[:32]:
            for server in servers:
                status, headers, body = http("GET", server.url + url)
                content_type = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
                if status != 200 or body != expected[url] or not content_type.startswith(MIME):
                    raise SystemExit(f"{server.label} {url}: HTTP {status}, {content_type}, {len(body)} bytes "
                                     f"(expected {len(expected[url])} bytes of {MIME})\n{server.tail()}")
    tileserver = servers[-1]
    seen: set[tuple[str, int, int]] = set()
    for read in layout.reads[:n_urls]:
        slab = (read.col // TILES_PER_SLAB_SIDE, read.row // TILES_PER_SLAB_SIDE)
        for storage in {c.storage for c in cases}:
            if (storage, *slab) not in seen:
                seen.add((storage, *slab))
                status, _, _ = http("GET", tileserver.url + rest_url(LAYERS[storage], read.col, read.row))
                if status != 200:
                    raise SystemExit(f"warming {storage}: HTTP {status}\n{tileserver.tail()}")


# --- measuring -----------------------------------------------------------------------------------


@dataclass
class Run:
    """wrk runs of one case against one server, accumulated over the rounds."""

    case: Case
    server: Server
    ceiling: bool
    results: list[WrkResult] = field(default_factory=list)
    server_cpu: float = 0.0
    nginx_cpu: float = 0.0
    other_cpu: float = 0.0

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.results)

    @property
    def wall(self) -> float:
        return sum(r.seconds for r in self.results)

    @property
    def rate(self) -> float:
        return self.requests / self.wall if self.wall else float("nan")

    @property
    def p50(self) -> float:
        return statistics.median(r.p50 for r in self.results)

    @property
    def p99(self) -> float:
        return statistics.median(r.p99 for r in self.results)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.results)

    @property
    def wrk_cpu(self) -> float:
        return sum(r.cpu for r in self.results)


def drive(run: Run, seconds: float, args: argparse.Namespace, wrk: str, nginx: Nginx | None,
          record: bool = True) -> WrkResult:
    cpu0 = run.server.cpu()
    nginx0 = nginx.cpu_seconds() if nginx else 0.0
    busy0 = system_busy_seconds()
    result = run_wrk(run.server.url, seconds, args.connections, args.threads, binary=wrk, script=run.case.script)
    busy = system_busy_seconds() - busy0
    server = run.server.cpu() - cpu0
    ngx = (nginx.cpu_seconds() - nginx0) if nginx else 0.0
    if result.errors:
        print(f"!! {run.server.label} {run.case.name}: {result.errors} errors\n{result.output}\n{run.server.tail()}",
              file=sys.stderr)
    if record:
        run.results.append(result)
        run.server_cpu += server
        run.nginx_cpu += ngx
        run.other_cpu += max(busy - server - ngx - result.cpu, 0.0)
    return result


def measure(cases: list[Case], bare: Server, tileserver: Server, args: argparse.Namespace, wrk: str,
            nginx: Nginx | None) -> list[tuple[Run, Run]]:
    pairs = [(Run(c, bare, True), Run(c, tileserver, False)) for c in cases]
    print(f"warming both servers ({args.warmup:g} s of wrk per case and server) ...", file=sys.stderr, flush=True)
    for pair in pairs:
        for run in pair:
            drive(run, args.warmup, args, wrk, nginx, record=False)
    seconds = args.seconds / args.rounds
    for round_no in range(args.rounds):
        print(f"  round {round_no + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for pair in pairs:
            # alternate which server goes first, so a drift in the box's load favours neither
            for run in (pair if round_no % 2 == 0 else pair[::-1]):
                drive(run, seconds, args, wrk, nginx)
    return pairs


def table(pairs: list[tuple[Run, Run]]) -> str:
    rows = []
    for bare, ours in pairs:
        for run in (ours, bare):
            storage_cores = run.nginx_cpu / run.wall if run.case.storage == "S3" and not run.ceiling else float("nan")
            rows.append([
                run.case.name, "bare starlette (ceiling)" if run.ceiling else "tileserver",
                fmt_int(run.rate), fmt(run.rate / bare.rate, 2), fmt(run.p50 * 1e3, 2), fmt(run.p99 * 1e3, 2),
                fmt_int(run.server_cpu / run.requests * 1e6), fmt(run.server_cpu / run.wall, 2),
                fmt(storage_cores, 2), fmt(run.wrk_cpu / run.wall, 2), fmt(run.other_cpu / run.wall, 2),
                str(run.errors),
            ])
    return format_table(
        ["URLs", "server", "tiles/s", "× ceiling", "p50 ms", "p99 ms", "server µs CPU/tile", "server cores",
         "nginx cores", "wrk cores", "other busy cores", "errors"],
        rows, "llrrrrrrrrrr",
    )


def s3_paragraph(pairs: list[tuple[Run, Run]]) -> str:
    """What bounds the S3 figure, from the CPU accounting of this run."""
    by_name = {ours.case.name: (bare, ours) for bare, ours in pairs}
    s3 = next((v for k, v in by_name.items() if k.startswith("S3")), None)
    file = by_name.get(s3[1].case.name.replace("S3", "FILE")) if s3 else None
    if s3 is None or file is None:
        return ""
    _, s3_run = s3
    _, file_run = file
    s3_cpu = s3_run.server_cpu / s3_run.requests * 1e6
    file_cpu = file_run.server_cpu / file_run.requests * 1e6
    nginx_cpu = s3_run.nginx_cpu / s3_run.requests * 1e6
    cores = s3_run.server_cpu / s3_run.wall
    wall = s3_run.wall
    others = {"outside the benchmark": s3_run.other_cpu / wall, "wrk": s3_run.wrk_cpu / wall,
              "nginx": s3_run.nginx_cpu / wall}
    total = cores + sum(others.values())
    if cores >= 0.85:
        limit = (f"the worker was saturated ({cores:.2f} of a core), so its CPU per tile is what bounds the rate")
    else:
        busy = ", ".join(f"{v:.2f} {k}" for k, v in sorted(others.items(), key=lambda kv: -kv[1]))
        limit = (f"the worker got only {cores:.2f} of a core because the box was full ({total:.2f} of "
                 f"{os.cpu_count()} cores busy: {busy}), so the rate sits below that bound and CPU per tile "
                 f"is the figure to compare")
    return textwrap.fill(
        f"**What bounds the S3 figure.** Each S3 tile costs the worker one SigV4-signed ranged GET to "
        f"nginx (slab index cached) over kept-alive connections (storage/http1.py): {s3_cpu:,.0f} µs of CPU per tile "
        f"against {file_cpu:,.0f} µs on FILE, so the storage client adds {s3_cpu - file_cpu:,.0f} µs a tile; "
        f"nginx itself spends {nginx_cpu:,.0f} µs. At that cost one worker core tops out near "
        f"{1e6 / s3_cpu:,.0f} tiles/s on S3 ({1e6 / file_cpu:,.0f} on FILE). In this run {limit}; S3 "
        f"reaches {s3_run.rate / file_run.rate:.2f} of the FILE rate. A real S3/Ceph endpoint adds network "
        f"latency to every tile (p50 here {s3_run.p50 * 1e3:.1f} ms on loopback): with enough requests in "
        f"flight that costs latency rather than tiles/s, until the storage connection pool "
        f"(storage_max_connections) or the endpoint's own rate limit binds.",
        100,
    )


# --- profiling -----------------------------------------------------------------------------------


def py_spy_binary() -> str | None:
    for candidate in (shutil.which("py-spy"), str(Path(sys.executable).parent / "py-spy")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def profile(run: Run, seconds: float, args: argparse.Namespace, wrk: str, tmp: Path) -> str:
    """py-spy record (raw collapsed stacks) on the tileserver process under one more wrk run."""
    extra = getattr(args, "py_spy_path", None)  # bench_s3's --py-spy-path DIR
    binary = py_spy_binary() or (shutil.which("py-spy", path=extra) if extra else None)
    if binary is None:
        return "(py-spy not found: `.venv/bin/pip install py-spy`, put it on PATH, or --py-spy-path DIR)"
    out = tmp / "profile.txt"
    cmd = [binary, "record", "--pid", str(run.server.process.pid), "--format", "raw", "--rate", "250",
           "--duration", str(int(seconds) + 1), "--output", str(out), "--nonblocking"]
    spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1.0)  # let it attach
    result = run_wrk(run.server.url, seconds, args.connections, args.threads, binary=wrk, script=run.case.script)
    log = spy.communicate(timeout=seconds + 30)[0].decode(errors="replace")
    if not out.exists():
        return f"(py-spy failed: {log.strip()[-500:]})"
    if args.keep_profile:
        shutil.copyfile(out, args.keep_profile)
    return (f"{run.server.label} {run.case.name} under py-spy: {result.rate:,.0f} tiles/s (sampling slows it)\n"
            "caveat: py-spy samples wall time of non-idle threads; on a box with fewer free cores than busy\n"
            "processes the worker is often preempted right after transport.write wakes wrk, so uvicorn's\n"
            "RequestResponseCycle.send looks far costlier than its CPU. Compare CPU per tile (table) across\n"
            "variants, or profile in-process, before trusting its top lines.\n" + summarize_stacks(out))


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def summarize_stacks(path: Path, top: int = 25) -> str:
    """Own and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        names = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            func, file = (match.group("func"), match.group("file")) if match else (frame, "")
            names.append(f"{func} ({_short(file)})")
        if names:
            own[names[-1]] += n
            for name in set(names):
                inclusive[name] += n
    if not total:
        return "(no samples)"
    lines = [f"{total} samples"]
    lines.append("own time:")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("inclusive time:")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def _short(file: str) -> str:
    for marker in ("site-packages/", "/tileserver/", "/lib/python"):
        if marker in file:
            return file.split(marker, 1)[1] if marker != "/tileserver/" else "tileserver/" + file.split(marker, 1)[1]
    return file


# --- RESULTS.md ----------------------------------------------------------------------------------


def write_results(text: str, path: Path = RESULTS) -> None:
    """Replace the generated part of this benchmark's section, keeping everything else in the file."""
    block = f"{BEGIN}\n{text.strip()}\n{END}"
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    start = current.find(f"\n{SECTION}\n") + 1 if f"\n{SECTION}\n" in current else (0 if current.startswith(f"{SECTION}\n") else -1)
    if start < 0:
        path.write_text(current.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n")
        return
    nxt = re.search(r"^## ", current[start + len(SECTION):], re.M)
    end = start + len(SECTION) + nxt.start() if nxt else len(current)
    section = current[start:end]
    if BEGIN in section and END in section:
        a, b = section.index(BEGIN), section.index(END) + len(END)
        section = section[:a] + block + section[b:]
    else:
        section = section.rstrip("\n") + f"\n\n{block}\n\n"
    path.write_text(current[:start] + section + current[end:])


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0,
                        help="measured seconds per case and server, split over the rounds (default 15)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed wrk seconds per case and server (default 2)")
    parser.add_argument("--urls", type=int, default=10_000, help="random tiles in each URL list (default 10000)")
    parser.add_argument("--cases", default="FILE REST,FILE KVP,S3 REST",
                        help="comma-separated among FILE REST, FILE KVP, S3 REST, S3 KVP (default: the first three)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="tileserver's --log-level (default info, as `tileserver serve`: one access-log line a tile)")
    parser.add_argument("--profile", type=float, metavar="SECONDS", default=0.0,
                        help="also run FILE REST under py-spy for SECONDS and print the top functions")
    parser.add_argument("--keep-profile", metavar="FILE", help="copy py-spy's collapsed stacks there")
    parser.add_argument("--workdir", type=Path, help="keep the synthetic pyramid there and reuse it next time")
    parser.add_argument("--no-results", action="store_true", help=f"do not write {RESULTS.name}")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a tileserver setting for the served process, e.g. fast_tiles=false (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    machine = machine_summary()
    tools = ensure_commands({"nginx": "nginx-light", "wrk": "wrk"})
    if not tools["wrk"]:
        print("!! wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 1
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    for name in wanted:
        if name not in ("FILE REST", "FILE KVP", "S3 REST", "S3 KVP"):
            raise SystemExit(f"unknown case {name!r}")
    if not tools["nginx"]:
        print("!! nginx missing: S3 cases skipped", file=sys.stderr)
        wanted = [c for c in wanted if not c.startswith("S3")]

    layout, root, temporary = pyramid(args.workdir, args.urls)
    tmp = Path(tempfile.mkdtemp(prefix="bench-server-run-"))
    reads = layout.reads[: args.urls]
    payloads = tile_bytes(layout, args.urls)
    cases, expected = [], {}
    for name in wanted:
        storage, style = name.split()
        make = rest_url if style == "REST" else kvp_url
        urls = [make(LAYERS[storage], r.col, r.row) for r in reads]
        expected.update(zip(urls, payloads, strict=True))
        case = Case(storage, style, urls)
        case.script = write_script(tmp / f"{storage}-{style}.lua".lower(), urls, seed=len(cases) + 1)
        cases.append(case)

    nginx = bare = tileserver = None
    pairs: list[tuple[Run, Run]] = []
    profile_text = ""
    status = 0
    try:
        if any(c.storage == "S3" for c in cases):
            nginx = Nginx(layout.s3_root, binary=tools["nginx"]).start()
        print("starting tileserver serve and the bare starlette app ...", file=sys.stderr, flush=True)
        tileserver = start_tileserver(tmp, nginx, args.log_level, args.setting)
        publish(tileserver, layout, sorted({c.storage for c in cases}))
        bare = start_bare(tmp, expected)
        check_and_warm([bare, tileserver], cases, expected, layout, args.urls)
        pairs = measure(cases, bare, tileserver, args, tools["wrk"], nginx)
        if args.profile:
            file_rest = next((ours for _, ours in pairs if ours.case.name == "FILE REST"), pairs[0][1])
            print(f"profiling {file_rest.case.name} with py-spy ({args.profile:g} s) ...", file=sys.stderr, flush=True)
            profile_text = profile(file_rest, args.profile, args, tools["wrk"], tmp)
    finally:
        for server in (bare, tileserver):
            if server is not None:
                server.stop()
        if nginx is not None:
            nginx.stop()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)

    if any(run.errors for pair in pairs for run in pair):
        status = 1
    cli = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python benchmarks/bench_server.py", *map(shlex.quote, cli)])
    lines = [
        f"Date: {date.today().isoformat()}. Machine: {machine}. wrk, both servers and nginx share these cores.",
        "",
        f"Command: `{command}` ({time.perf_counter() - started:.0f} s in all). wrk -t{args.threads} "
        f"-c{args.connections} --latency with a Lua script picking a random URL per request among "
        f"{args.urls:,} random tiles inside the pyramid's extent; {args.seconds:g} s per row in {args.rounds} "
        f"interleaved rounds after {args.warmup:g} s of warm-up; slab-index cache warm.",
        "",
        f"Pyramid: bench_core's synthetic JPEG pyramid, {len(layout.slabs)} slabs of {TILES_PER_SLAB_SIDE}x"
        f"{TILES_PER_SLAB_SIDE} tiles of 256x256 px ({layout.slab_bytes / 2**20:.0f} MiB, mean tile "
        f"{layout.tile_bytes / 1024:.1f} KB), FILE layout on local disk (page-cached) and the same slabs as "
        "S3 objects served by nginx (path style; the signature is ignored).",
        "",
        f"Servers: `tileserver serve --workers 1 --no-demo --log-level {args.log_level}` (uvicorn, uvloop, "
        "httptools; every middleware on: access log, ETag, CORS, gzip of text) with layers BENCH_FILE and "
        "BENCH_S3 published through `POST /admin/layers/{id}`; the ceiling is a bare starlette app under "
        "uvicorn (1 worker, no access log) with one endpoint answering the same URLs with the same bytes from "
        "a dict. p50/p99: median over rounds of wrk's figures. CPU from /proc/<pid>/stat.",
        "",
        table(pairs) if pairs else "(no results)",
    ]
    paragraph = s3_paragraph(pairs)
    if paragraph:
        lines += ["", paragraph]
    text = "\n".join(lines)
    print("\n" + text)
    if profile_text:
        print("\n--- py-spy profile ---\n" + profile_text)
    if pairs and not args.no_results:
        write_results(text)
        print(f"\n(written to {RESULTS.relative_to(PROJECT)}, section {SECTION!r})", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
