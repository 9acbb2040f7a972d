"""What operators see of a running server: Prometheus metrics at `/metrics` and one log line per
request (plain text, or JSON with `log_format = "json"`). The whole policy lives here.

Metrics, all prefixed `tileserver_`:
- `requests_total{service,status}` and `request_duration_seconds{service}` (histogram): counted by
  `RequestMetrics`, the outermost ASGI layer, so stored tiles answered by the fast path count too;
  `service` is a protocol (wmts, wms, tms, ogcapi, wfs) or a fixed part name (api, admin, health…).
- `slab_index_cache_total{result=hit|miss}`, `storage_errors_total{kind}`, `render_slots_in_use`,
  `render_slots`, `renders_waiting`, `render_memory_bytes`, `render_busy_total`: state the process
  keeps anyway (SlabIndexCache counters, storage.retry.STATS, the render gate), copied into the
  metrics at each scrape and every `SYNC_INTERVAL` s, so the hot paths pay nothing more.
- `jobs{kind,status}` and `job_duration_seconds{kind,status}` (histogram of ended jobs): the
  warehouse's checks and executions, read from the shared store at scrape time (cached
  `JOBS_CACHE_TTL` s). They are the cluster's, not the replica's: every replica reports the same
  values, so dashboards take `max` over instances.

Several worker processes (`tileserver serve --workers N`) use prometheus_client's multiprocess
mode: `serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory (or empties the one given)
before the workers start, and any worker's `/metrics` adds up every process's values.

`/metrics` is for operators (the admin token, as /admin) unless `metrics_public` is set, for a
network where only Prometheus reaches the servers (the proxy then refuses /metrics).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import REGISTRY
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tileserver.storage.retry import STATS as STORAGE_STATS

log = logging.getLogger("tileserver.observability")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SYNC_INTERVAL = 5.0  # seconds between two copies of a process's state into its metrics
JOBS_CACHE_TTL = 10.0  # seconds a scrape reuses the store's job counts
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

# the first path segment → the `service` label (protocols come from services.policy.SERVICES)
_PARTS = {"healthcheck": "health", "admin": "admin", "api": "api", "metrics": "metrics", "static": "static",
          "": "home", "map": "home"}

REQUESTS = Counter("tileserver_requests", "HTTP requests answered, by service and status", ["service", "status"])
LATENCY = Histogram("tileserver_request_duration_seconds", "Time to answer a request (head and body sent)",
                    ["service"], buckets=LATENCY_BUCKETS)
INDEX_CACHE = Counter("tileserver_slab_index_cache", "Slab-index lookups by result", ["result"])
OBJECT_TILES = Counter("tileserver_object_tile_cache", "Lookups of S3 tile bytes kept in memory "
                       "(object_tile_cache_bytes) by result", ["result"])
STORAGE_ERRORS = Counter("tileserver_storage_errors", "Storage failures: attempts retried, operations "
                         "failed after their retries, calls refused by an open circuit", ["kind"])
RENDER_IN_USE = Gauge("tileserver_render_slots_in_use", "Renders running", multiprocess_mode="livesum")
RENDER_SLOTS = Gauge("tileserver_render_slots", "Render slots (render_concurrency per process)",
                     multiprocess_mode="livesum")
RENDER_WAITING = Gauge("tileserver_renders_waiting", "Renders waiting for a slot or for memory",
                       multiprocess_mode="livesum")
RENDER_BYTES = Gauge("tileserver_render_memory_bytes", "Estimated bytes held by renders in flight",
                     multiprocess_mode="livesum")
RENDER_BUSY = Counter("tileserver_render_busy", "Renders refused with a 503 after waiting render_queue_wait")
for _result in ("hit", "miss"):  # shown at 0 before the first event: dashboards see the series
    INDEX_CACHE.labels(_result)
    OBJECT_TILES.labels(_result)
for _kind in STORAGE_STATS:
    STORAGE_ERRORS.labels(_kind)


_labels: dict[str, str] = {}


def service_label(path: str) -> str:
    first = path[1:].partition("/")[0]
    label = _labels.get(first)
    if label is None:
        from tileserver.services.policy import SERVICES

        label = SERVICES.get(first) or _PARTS.get(first, "other")
        if len(_labels) < 256:  # first segments are few; odd ones are not kept
            _labels[first] = label
    return label


class RequestMetrics:
    """Outermost ASGI layer: counts every HTTP answer by service and status, and its duration.

    Answers are tallied in plain ints (a dict entry and a bucket slot each) and added to the
    Prometheus counter and histogram by `flush`, which every scrape and the periodic sync call:
    Prometheus's own `inc` and `observe` take a lock and walk the buckets per call (3.6 µs a
    request, measured in process; 1.45 µs batched); the figures a scrape reads are the same."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._counts: dict[tuple[str, int], int] = {}
        self._latency: dict[str, list[float]] = {}  # per service: a count per bucket, then the sum
        _RECORDERS.add(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        sent = [0]

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.record(scope["path"], sent[0] or 500, time.perf_counter() - started)

    def record(self, path: str, status: int, seconds: float) -> None:
        service = service_label(path)
        key = (service, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        tally = self._latency.get(service)
        if tally is None:
            tally = self._latency[service] = [0.0] * (len(_BOUNDS) + 1)
        tally[bisect.bisect_left(_BOUNDS, seconds)] += 1  # the first bound ≥ seconds, as observe()
        tally[-1] += seconds

    def flush(self) -> None:
        """Add what was tallied since the last flush to the Prometheus metrics."""
        counts, self._counts = self._counts, {}
        latency, self._latency = self._latency, {}
        for (service, status), count in counts.items():
            REQUESTS.labels(service, str(status)).inc(count)
        for service, tally in latency.items():
            child = LATENCY.labels(service)
            # no public bulk observe: the child's per-bucket values and sum, as observe() adds to them
            for bucket, hits in zip(child._buckets, tally[:-1], strict=True):  # noqa: SLF001
                if hits:
                    bucket.inc(hits)
            child._sum.inc(tally[-1])  # noqa: SLF001


_BOUNDS = [*LATENCY_BUCKETS, float("inf")]
_RECORDERS: weakref.WeakSet[RequestMetrics] = weakref.WeakSet()


def flush_request_metrics() -> None:
    for recorder in list(_RECORDERS):
        recorder.flush()


# --- process state copied into the metrics ----------------------------------------------------


class _Synced:
    """Counters kept elsewhere as plain ints (per runtime, or per process), added to the Prometheus
    counters by their increase since the last copy."""

    def __init__(self) -> None:
        self._last: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], int]] = weakref.WeakKeyDictionary()

    def add(self, owner: Any, counter: Any, label: str, value: int) -> None:
        last = self._last.setdefault(owner, {})
        key = (counter._name, label)  # noqa: SLF001 - a name per metric, no API for it
        increase = value - last.get(key, 0)
        if increase > 0:
            (counter.labels(label) if label else counter).inc(increase)
            last[key] = value


class _Process:
    """The owner of process-wide counters (storage.retry.STATS) in `_Synced`."""


_synced = _Synced()
_PROCESS = _Process()


def sync_process_state(runtime: Any) -> None:
    """Copy this process's counters and gauges (requests, slab-index cache, S3 tiles kept, storage,
    render gate) into its metrics."""
    from tileserver.render.gate import gate_for

    flush_request_metrics()
    cache = runtime.index_cache
    _synced.add(runtime, INDEX_CACHE, "hit", cache.hits)
    _synced.add(runtime, INDEX_CACHE, "miss", cache.misses)
    _synced.add(runtime, OBJECT_TILES, "hit", cache.tiles.hits)
    _synced.add(runtime, OBJECT_TILES, "miss", cache.tiles.misses)
    for kind, value in STORAGE_STATS.items():
        _synced.add(_PROCESS, STORAGE_ERRORS, kind, value)
    gate = gate_for(runtime)
    RENDER_IN_USE.set(gate.in_use)
    RENDER_SLOTS.set(gate.concurrency)
    waiting = len(gate._waiters) + len(gate._semaphore._waiters or ())  # noqa: SLF001 - read-only gauges
    RENDER_WAITING.set(waiting)
    RENDER_BYTES.set(gate.bytes_in_use)
    _synced.add(gate, RENDER_BUSY, "", gate.busy_refusals)


async def sync_periodically(runtime: Any, interval: float = SYNC_INTERVAL) -> None:
    """Each worker process's own copy loop: another process may answer the scrape."""
    while True:
        await asyncio.sleep(interval)
        try:
            sync_process_state(runtime)
        except Exception:  # metrics must never take the server down
            log.exception("metrics sync failed")


# --- warehouse jobs, from the shared store ------------------------------------------------------

_JOB_KINDS = ("check_execution", "processing_execution")
_jobs_cache: dict[int, tuple[float, list[Metric]]] = {}


def _seconds(start: str | None, finish: str | None) -> float | None:
    if not start or not finish:
        return None
    try:
        delta = datetime.fromisoformat(finish.replace("Z", "+00:00")) - datetime.fromisoformat(start.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, delta.total_seconds())


def job_metrics(store: Any) -> list[Metric]:
    """`tileserver_jobs{kind,status}` and `tileserver_job_duration_seconds{kind,status}` of ended jobs."""
    counts = GaugeMetricFamily("tileserver_jobs", "Warehouse jobs in the shared store, by kind and status "
                               "(the cluster's: every replica reports the same)", labels=["kind", "status"])
    durations = HistogramMetricFamily("tileserver_job_duration_seconds", "Run time of ended warehouse jobs "
                                      "(start to finish), by kind and final status", labels=["kind", "status"])
    marks = ", ".join("?" * len(_JOB_KINDS))
    with store.reading() as db:
        grouped = db.execute(f"SELECT kind, json_extract(body, '$.status'), COUNT(*) FROM wh_entities"
                             f" WHERE kind IN ({marks}) GROUP BY 1, 2", _JOB_KINDS).fetchall()
        ended = db.execute(f"SELECT kind, json_extract(body, '$.status'), json_extract(body, '$.start'),"
                           f" json_extract(body, '$.finish') FROM wh_entities WHERE kind IN ({marks})"
                           f" AND json_extract(body, '$.finish') IS NOT NULL", _JOB_KINDS).fetchall()
    for kind, status, count in grouped:
        counts.add_metric([kind, str(status)], int(count))
    observed: dict[tuple[str, str], list[float]] = {}
    for kind, status, start, finish in ended:
        seconds = _seconds(start, finish)
        if seconds is not None:
            observed.setdefault((kind, str(status)), []).append(seconds)
    for (kind, status), values in sorted(observed.items()):
        buckets = [(str(float(b)), sum(1 for v in values if v <= b)) for b in JOB_BUCKETS]
        buckets.append(("+Inf", len(values)))
        durations.add_metric([kind, status], buckets, sum(values))
    return [counts, durations]


def cached_job_metrics(store: Any) -> list[Metric]:
    now = time.monotonic()
    cached = _jobs_cache.get(id(store))
    if cached is not None and cached[0] > now:
        return cached[1]
    try:
        metrics = job_metrics(store)
    except Exception as exc:  # no warehouse tables, store unreachable: the other metrics still answer
        log.warning("job metrics unavailable: %s", exc)
        metrics = []
    _jobs_cache.clear()
    _jobs_cache[id(store)] = (now + JOBS_CACHE_TTL, metrics)
    return metrics


# --- /metrics ------------------------------------------------------------------------------------


class _Scrape:
    """What one scrape exposes: this process's (or, in multiprocess mode, every process's) metrics
    and the store's job metrics gathered before."""

    def __init__(self, extra: list[Metric]) -> None:
        directory = os.environ.get(MULTIPROC_ENV)
        if directory:
            registry = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(registry, path=directory)
            self._source: Any = registry
        else:
            self._source = REGISTRY
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        yield from self._source.collect()
        yield from self._extra


async def metrics_endpoint(request: Request) -> Response:
    from tileserver.runtime import get_runtime
    from tileserver.services.policy import is_operator

    runtime = get_runtime(request)
    settings = runtime.settings
    if not settings.metrics_public:
        operator = is_operator(settings, request)
        if not operator:
            status = 401 if operator is None else 403
            return JSONResponse({"error": "metrics are for operators: present the admin token"}, status_code=status,
                                headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"})
    sync_process_state(runtime)
    jobs = await asyncio.to_thread(cached_job_metrics, runtime.store)
    body = await asyncio.to_thread(generate_latest, _Scrape(jobs))
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


def routes() -> list[BaseRoute]:
    return [Route("/metrics", metrics_endpoint)]


# --- worker processes ----------------------------------------------------------------------------


def prepare_multiprocess(workers: int) -> str | None:
    """Before uvicorn starts N > 1 workers: a fresh PROMETHEUS_MULTIPROC_DIR they all inherit (the
    one given, emptied of a previous run's files, else a new temporary directory)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if workers <= 1 and not directory:
        return None
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for stale in Path(directory).glob("*.db"):
            stale.unlink()
    else:
        directory = tempfile.mkdtemp(prefix="tileserver-metrics-")
        os.environ[MULTIPROC_ENV] = directory
    return directory


def process_exit() -> None:
    """A worker process stops: its live gauges leave the sum (counters stay, as Prometheus expects)."""
    if os.environ.get(MULTIPROC_ENV):
        prometheus_multiprocess.mark_process_dead(os.getpid())


def remove_multiprocess_dir(directory: str | None) -> None:
    if directory and Path(directory).name.startswith("tileserver-metrics-"):
        shutil.rmtree(directory, ignore_errors=True)


# --- log lines -----------------------------------------------------------------------------------

_json_logs = False


def use_json_logs(enabled: bool) -> None:
    global _json_logs
    _json_logs = enabled


def json_logs() -> bool:
    return _json_logs


def access_json(request_id: str, method: str, path: str, query: str, status: int, size: int, seconds: float) -> str:
    """One request as one JSON object (no newline)."""
    now = time.time()
    return json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
        "level": "INFO",
        "logger": "tileserver.access",
        "request_id": request_id,
        "method": method,
        "path": path,
        "query": query,
        "status": status,
        "size": size,
        "duration_ms": round(seconds * 1000, 3),
        "service": service_label(path),
    }, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """Every other log record as one JSON object; a request id given in `extra` is kept."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)
