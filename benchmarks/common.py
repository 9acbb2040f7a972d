"""Helpers shared by the benchmarks: tools, free ports, nginx over a directory, wrk, timing, tables.

Nothing here imports `tileserver`: a benchmark script imports this module by putting its own
directory first on ``sys.path`` (``sys.path.insert(0, str(Path(__file__).parent))``).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --- tools -------------------------------------------------------------------------------------

_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_command(name: str) -> str | None:
    """Path of a command, also looking in the sbin directories a non-root PATH lacks (nginx)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _apt_get(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", RUNLEVEL="1")  # RUNLEVEL: do not start services
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else [])
    return subprocess.run(prefix + ["apt-get", *args], env=env, capture_output=True, text=True, timeout=600)


def ensure_commands(commands: dict[str, str]) -> dict[str, str | None]:
    """``{command: Debian package}`` → ``{command: path or None}``, installing what is missing.

    Runs ``apt-get install -y`` (then ``apt-get update`` and once more if the first try fails) and
    prints one clear line per command that is still missing; callers skip what needs it.
    """
    found = {cmd: find_command(cmd) for cmd in commands}
    missing = sorted({commands[cmd] for cmd, path in found.items() if path is None})
    if not missing:
        return found
    what = " ".join(missing)
    if shutil.which("apt-get") is None:
        print(f"!! {what} missing and no apt-get on this machine: install {what} by hand", file=sys.stderr)
        return found
    print(f"installing {what} (apt-get install -y {what}) ...", file=sys.stderr, flush=True)
    try:
        result = _apt_get(["install", "-y", "--no-install-recommends", *missing])
        if result.returncode != 0:
            _apt_get(["update"])
            result = _apt_get(["install", "-y", "--no-install-recommends", *missing])
    except (OSError, subprocess.TimeoutExpired) as exc:
        result = subprocess.CompletedProcess([], 1, "", str(exc))
    found = {cmd: find_command(cmd) for cmd in commands}
    for cmd, path in found.items():
        if path is None:
            tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            print(
                f"!! could not install {commands[cmd]} for `{cmd}` (apt-get exit {result.returncode}: {tail}); "
                f"run `apt-get install -y {commands[cmd]}` as root; results needing it are skipped",
                file=sys.stderr,
            )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process exited with code {process.returncode} before listening") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s") from None
            time.sleep(0.02)


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


proc_cpu_seconds = _proc_cpu_seconds  # public name; the private one stays for existing callers


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        pass
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def system_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: all but idle, iowait, steal)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq = values[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


# --- nginx ---------------------------------------------------------------------------------------


class Nginx:
    """nginx serving `root` read-only on a loopback port, tuned as a static-file ceiling.

    keepalive (1M requests per connection), sendfile, open_file_cache, access_log off, one worker
    per core. Range requests work out of the box, so a directory ``<root>/<bucket>/<key>`` answers
    path-style S3 GETs (signatures ignored). Use as a context manager or start()/stop().
    """

    def __init__(self, root: str | os.PathLike[str], port: int | None = None, workers: str | int = "auto",
                 binary: str | None = None, host: str = "127.0.0.1") -> None:
        self.root = os.path.abspath(root)
        self.host = host
        self.port = port or free_port(host)
        self.workers = workers
        self.binary = binary or find_command("nginx")
        self.process: subprocess.Popen[bytes] | None = None
        self._prefix: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _config(self, prefix: str) -> str:
        assert self.binary
        build = subprocess.run([self.binary, "-V"], capture_output=True, text=True).stderr
        temp_paths = [f"client_body_temp_path {prefix}/body;"]
        for module in ("proxy", "fastcgi", "uwsgi", "scgi"):  # only the modules this build has
            if f"--without-http_{module}_module" not in build:
                temp_paths.append(f"{module}_temp_path {prefix}/{module};")
        # a root master starts workers as `nobody`, who may not read a private temp dir: run them
        # as the owner of the served directory instead
        user = f"user {pwd.getpwuid(os.stat(self.root).st_uid).pw_name};" if os.geteuid() == 0 else ""
        return f"""
{user}
worker_processes {self.workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
daemon off;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    open_file_cache max=10000 inactive=120s;
    open_file_cache_valid 120s;
    default_type application/octet-stream;
    server_tokens off;
    {" ".join(temp_paths)}
    server {{
        listen {self.host}:{self.port} backlog=4096;
        root {self.root};
        location / {{ }}
    }}
}}
"""

    def start(self) -> Nginx:
        if self.binary is None:
            raise RuntimeError("nginx is not installed (apt-get install -y nginx-light)")
        self._prefix = tempfile.mkdtemp(prefix="bench-nginx-")
        conf = os.path.join(self._prefix, "nginx.conf")
        Path(conf).write_text(self._config(self._prefix))
        error_log = os.path.join(self._prefix, "error.log")
        self.process = subprocess.Popen(
            [self.binary, "-p", self._prefix, "-c", conf, "-e", error_log],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(self.host, self.port, process=self.process)
        except (RuntimeError, TimeoutError) as exc:
            stderr = self.process.stderr.read().decode(errors="replace") if self.process.poll() is not None else ""
            log = Path(error_log).read_text(errors="replace") if os.path.exists(error_log) else ""
            self.stop()
            raise RuntimeError(f"nginx did not start: {exc}\n{stderr}{log}".strip()) from None
        return self

    def worker_pids(self) -> list[int]:
        return _children(self.process.pid) if self.process else []

    def cpu_seconds(self) -> float:
        """CPU time used so far by the master and its workers."""
        if self.process is None:
            return 0.0
        return sum(_proc_cpu_seconds(p) for p in [self.process.pid, *self.worker_pids()])

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            if self.process.stderr:
                self.process.stderr.close()
            self.process = None
        if self._prefix:
            shutil.rmtree(self._prefix, ignore_errors=True)
            self._prefix = None

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- wrk -----------------------------------------------------------------------------------------

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _duration(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unparsable wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rate: float
    p50: float  # seconds
    p99: float
    cpu: float  # CPU seconds used by wrk itself
    errors: int
    output: str


def run_wrk(url: str, seconds: float, connections: int = 64, threads: int = 2,
            headers: Iterable[str] = (), binary: str | None = None, script: str | None = None) -> WrkResult:
    """Run wrk once (``--latency``) and parse its figures; non-2xx answers count as errors.

    `script` is a wrk Lua script (``-s``), e.g. one picking a random URL per request.
    """
    binary = binary or find_command("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    cmd = [binary, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    for header in headers:
        cmd += ["-H", header]
    if script:
        cmd += ["-s", script]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    total = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)\s*$", out, re.M))  # "1.19s " is padded
    errors = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if not (total and rate and lat):
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    n_errors = int(errors.group(1)) if errors else 0
    if socket_errors:
        n_errors += sum(int(g) for g in socket_errors.groups())
    return WrkResult(int(total.group(1)), _duration(total.group(2)), float(rate.group(1)),
                     _duration(lat["50"]), _duration(lat["99"]), cpu, n_errors, out)


# --- timing --------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class LoadResult:
    """What one closed-loop run measured; CPU is this process's (all threads)."""

    count: int
    wall: float
    cpu: float
    latencies: list[float] = field(repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.count / self.wall if self.wall else 0.0

    @property
    def cpu_per_op(self) -> float:
        return self.cpu / self.count if self.count else math.nan

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)


async def closed_loop(op: Callable[[Any], Awaitable[Any]], items: Sequence[Any], seconds: float,
                      concurrency: int = 64, warmup: float = 0.0) -> LoadResult:
    """`concurrency` coroutines in this event loop call ``await op(item)`` back to back for
    `seconds`, items taken in turn from `items` (cycled); latencies in seconds, sorted.

    A warm-up of `warmup` seconds runs first and is not counted (connections, caches). An
    exception in `op` stops the run and propagates.
    """
    if warmup > 0:
        await closed_loop(op, items, warmup, concurrency)
    source = itertools.cycle(items)
    latencies: list[float] = []
    clock = time.perf_counter
    deadline = 0.0

    async def worker() -> None:
        record = latencies.append
        while clock() < deadline:
            item = next(source)
            t0 = clock()
            await op(item)
            record(clock() - t0)

    cpu0, t0 = time.process_time(), clock()
    deadline = t0 + seconds
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    wall, cpu = clock() - t0, time.process_time() - cpu0
    latencies.sort()
    return LoadResult(len(latencies), wall, cpu, latencies)


def merge_results(results: Sequence[LoadResult]) -> LoadResult:
    """Several runs of the same work (e.g. interleaved rounds) as one."""
    latencies = sorted(x for r in results for x in r.latencies)
    extra: dict[str, Any] = {}
    for r in results:
        for key, value in r.extra.items():
            extra[key] = extra.get(key, 0) + value
    return LoadResult(sum(r.count for r in results), sum(r.wall for r in results),
                      sum(r.cpu for r in results), latencies, extra)


def timed_calls(fn: Callable[[], Any], seconds: float, batch: int = 0) -> tuple[int, float, float]:
    """Call `fn()` repeatedly for about `seconds`: (calls, wall seconds, CPU seconds)."""
    batch = batch or 1
    clock = time.perf_counter
    calls = 0
    cpu0, t0 = time.process_time(), clock()
    deadline = t0 + seconds
    while clock() < deadline:
        for _ in range(batch):
            fn()
        calls += batch
    return calls, clock() - t0, time.process_time() - cpu0


# --- reporting -----------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A Markdown pipe table with padded columns (readable in a terminal as well).

    `align` has one letter per column, ``l`` or ``r`` (default: first column left, others right).
    """
    text_rows = [[str(c) for c in row] for row in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max([len(h)] + [len(r[i]) for r in text_rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align, strict=True)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in text_rows)])


def fmt_int(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:,.0f}"


def fmt(value: float, digits: int = 1) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def machine_summary() -> str:
    """One line: cores, CPU model, memory, kernel, Python and the load average right now."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = math.nan
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores ({model or platform.machine()}), {mem:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}; load average before the run {load}")


RESULTS_HEADER = "# Benchmark results\n"


def update_results(path: str | os.PathLike[str], section: str, text: str, generator: str) -> None:
    """Put `text` in `section` (a ``## …`` heading) of a results file, between markers named after
    `generator`; only the previous generated part is replaced, hand-written notes and other
    sections are kept. The file (with a one-line header) and the section are created if absent.
    """
    begin = f"<!-- {generator}: generated, replaced at each run -->"
    end = f"<!-- {generator}: end of generated part -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    path = Path(path)
    current = path.read_text() if path.exists() else RESULTS_HEADER
    lines = current.splitlines(keepends=True)
    heading = next((i for i, line in enumerate(lines) if line.rstrip("\n") == section), None)
    if heading is None:
        path.write_text(current.rstrip("\n") + f"\n\n{section}\n\n{block}\n")
        return
    stop = next((i for i in range(heading + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    body = "".join(lines[heading + 1 : stop])
    if begin in body and end in body:
        head, rest = body.split(begin, 1)
        body = head + block + rest.split(end, 1)[1]
    else:
        body = f"\n{block}\n" + body
    path.write_text("".join(lines[: heading + 1]) + body + "".join(lines[stop:]))


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """uvloop when asked or, for "auto", when installed (uvicorn picks it the same way)."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
