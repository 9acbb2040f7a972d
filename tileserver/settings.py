"""Runtime settings: defaults, overridden by a TOML/JSON file, then by the environment, then by CLI flags.

ROK4's own variables (ROK4_S3_URL, ROK4_S3_KEY, ROK4_S3_SECRETKEY, ROK4_TMS_DIRECTORY,
ROK4_STYLES_DIRECTORY) are honoured so a ROK4 installation can point tileserver at its pyramids as is.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent


def data_directory(name: str) -> Path:
    """A data folder tileserver ships (`tms_definitions`, `capabilities_templates`): the source tree
    keeps it at the top, an installed wheel inside the package (pyproject maps one onto the other)."""
    source = PROJECT_DIR / name
    if source.is_dir():
        return source
    return Path(str(importlib.resources.files("tileserver") / name))


def _default_tms_directory() -> str:
    return str(data_directory("tms_definitions"))


@dataclass(frozen=True)
class S3Cluster:
    """One S3-compatible endpoint; `name` is the host[:port] used in `bucket@name` paths."""

    url: str
    key: str
    secret: str
    region: str = "us-east-1"

    @property
    def name(self) -> str:
        return self.url.split("://", 1)[-1].rstrip("/")


@dataclass(frozen=True)
class Settings:
    data_dir: str = "./tileserver-data"
    store_path: str = ""  # default: <data_dir>/store.sqlite
    tms_directory: str = field(default_factory=_default_tms_directory)
    styles_directory: str = ""
    s3_clusters: tuple[S3Cluster, ...] = ()
    s3_ssl_verify: bool = True
    # storage behaviour
    storage_timeout: float = 10.0  # seconds, per request
    storage_connect_timeout: float = 3.0
    storage_retries: int = 3  # attempts after the first on 5xx, throttling or connection errors
    storage_retry_backoff: float = 0.05  # seconds, doubled at each attempt
    storage_max_connections: int = 256
    max_link_depth: int = 4
    # FILE reads up to this many bytes run in the event loop (page-cached pread: ~5 µs for 4 KiB
    # against ~80 µs through a thread); larger ones, or all when 0 (slow network disks), in threads
    file_inline_read_max: int = 1 << 20
    # FILE descriptors kept open for inline reads (0: open and close at each read), and how long
    # one lives: a slab replaced by another process is read from its new file after that
    file_handles: int = 256
    file_handle_ttl: float = 30.0
    s3_list_page_size: int = 1000  # keys per ListObjectsV2 page (S3's maximum)
    # warehouse: where computed pyramids go, a directory or s3://bucket[/prefix] ("": <data_dir>/pyramids)
    warehouse_pyramids: str = ""
    # warehouse: where upload files go, a directory or s3://bucket[/prefix] ("": <data_dir>/uploads)
    warehouse_uploads: str = ""
    # slab-index cache: entries for the whole server, split among `workers` (~20 KiB a 16x16 slab's entry)
    index_cache_size: int = 10000
    index_cache_ttl: float = 300.0
    # server
    host: str = "127.0.0.1"
    port: int = 9000
    workers: int = 1
    admin_token: str = ""
    demo: bool = True
    public_url: str = ""
    cache_control: str = "public, max-age=3600"
    service_title: str = "tileserver"
    service_abstract: str = "ROK4 pyramids served as OGC services"
    provider_name: str = "tileserver"
    provider_site: str = ""
    store_poll_interval: float = 2.0
    render_max_width: int = 4096
    render_max_height: int = 4096
    render_concurrency: int = 8
    request_timeout: float = 30.0
    render_max_tiles: int = 1024  # source tiles one map may read
    render_queue_wait: float = 5.0  # seconds a render waits for a slot before a 503
    wms_crs: tuple[str, ...] = ()  # server-wide WMS CRS list (empty: the built-in list)
    wms_layer_limit: int = 10  # LAYERS per GetMap
    wms_root_title: str = ""
    wms_root_abstract: str = ""
    # --- outbound requests on behalf of /api users (issue 11)
    # hosts (`wms.example.org`, `*.example.org`, `host:port`) or networks (`10.0.0.0/8`, `127.0.0.1:8080`,
    # `[::1]:8080`) those requests may reach even when private or loopback; env: comma-separated
    outbound_allow: tuple[str, ...] = ()
    outbound_allow_public: bool = True  # False: only the hosts outbound_allow names
    outbound_max_redirects: int = 3
    outbound_max_bytes: int = 1 << 20  # a relayed GetFeatureInfo answer
    # --- server process and admin entry (issue 11)
    # where pyramid descriptors published through the admin API may live: directories and
    # s3://bucket[@cluster][/prefix] ("*": anywhere, ROK4's behaviour); empty: `publish_roots`' default
    admin_roots: tuple[str, ...] = ()
    header_timeout: float = 10.0  # seconds a connection may take to send a request's headers (0: no limit)
    # proxies whose X-Forwarded-For/-Proto/-Host are believed (comma-separated addresses or networks,
    # "*": any); ignored for public URLs when public_url is set
    forwarded_allow_ips: str = "127.0.0.1"
    # --- warehouse security and quotas (issue 11)
    warehouse_hash_threads: int = 1  # threads hashing passwords (scrypt), apart from the default pool
    warehouse_hash_queue: int = 8  # logins waiting for those threads beyond which /api/token answers 503
    warehouse_login_failures: int = 10  # failed /api/token attempts per login per window before 429
    warehouse_address_failures: int = 30  # failed /api/token attempts per client address per window
    warehouse_login_window: float = 60.0  # seconds those failures are remembered
    # seconds between two listings of a running execution's output on S3 (its quota check; on disk
    # the output is measured at every 2 s beat)
    warehouse_s3_measure_every: float = 10.0
    # --- storage faults (issue 11)
    # one attempt of a read (tile, slab index, descriptor) may take this long (and never more than
    # storage_timeout): a stalled storage costs a tile this, not storage_timeout × attempts
    storage_read_timeout: float = 2.0
    storage_deadline: float = 6.0  # one storage operation, retries included: no attempt starts past it
    storage_breaker_failures: int = 5  # failed attempts in a row that open an S3 cluster's circuit (0: never)
    storage_breaker_cooldown: float = 5.0  # seconds an open circuit fails fast before letting one probe through
    file_threads: int = 16  # threads for FILE work that may block (opens, reads not in memory, stats)
    layer_retry_interval: float = 5.0  # first retry of layers whose storage failed; doubled each time…
    layer_retry_max_interval: float = 300.0  # …up to this
    # --- memory and time limits of renders and source reads (issue 11)
    # bytes all renders in flight in one worker process may hold together, by their estimate
    # (render.draw.estimate_memory): renders wait for room, a map larger than it alone is a 400
    render_memory_budget: int = 1 << 30
    render_timeout: float = 20.0  # seconds one admitted render may take (fetch, draw, encode): then 503
    # pixels (width x height) a source image may declare: larger ones fail the raster check and builds
    source_max_pixels: int = 1 << 28
    # --- vector services: WFS and OGC API Features (issue 13)
    wfs_max_features: int = 1000  # default and maximum COUNT of a GetFeature; maximum OGC API `limit`
    # --- publication store engine (issue 17): a SQLite path (default: store_path) or postgresql://…
    store_url: str = ""
    # --- tiles at the Python ceiling (issue 16)
    # stored WMTS tiles answered before Starlette (tileserver/fastpath.py); off: every tile takes the
    # route, byte for byte the same answer (tests/test_fastpath.py checks it)
    fast_tiles: bool = True
    # decoded source tiles shared by the renders of a worker process (render/draw.py DecodedTiles):
    # bytes for the whole server, each of `workers` processes holding its 1/N share; 0 turns it off
    decoded_tile_cache_bytes: int = 48 << 20
    # --- observability (issue 17): tileserver/observability.py
    # "json": every log line a JSON object, the access line with method, path, status, duration_ms,
    # request_id, service; "text": the plain lines
    log_format: str = "text"
    # /metrics answered to anyone; False: to operators only (the admin token, as /admin)
    metrics_public: bool = False
    # --- overload and workers (issue 16, goals 3 and 4)
    # renders that may wait for a render slot (or render memory); one more gets 503 + Retry-After at
    # once instead of waiting `render_queue_wait` for nothing; -1: no bound (only the wait)
    render_queue_depth: int = 4
    # --- PostGIS vector bases (issue 17): when set (postgresql://user:password@host/db), every new
    # VECTOR-DB stored data is one schema of this database instead of a GeoPackage file; its
    # descriptor URL names the server and schema, never the password
    vector_db_url: str = ""
    # --- workers anywhere (issue 17): checks and executions run by job processes of any node
    # job processes a server runs itself (env TILESERVER_WAREHOUSE_WORKERS); 0: only `tileserver worker`s run jobs
    warehouse_workers: int = 2
    worker_lease: float = 60.0  # seconds a running job may go without a heartbeat before its worker is declared dead
    worker_attempts: int = 3  # runs of a job whose worker died, after which it ends FAILURE
    worker_node: str = ""  # this node's name in job claims (default: the host name); one per machine or pod
    # an image pyramid build is split into this many shards of its bottom level, run as jobs by any
    # workers (1: one job process builds it all); with FILE uploads every node must see the same paths
    worker_shards: int = 1
    # --- tiles on object storage (issue 16): tile bytes read from S3 kept in memory (hot_tiles.py),
    # bytes for the whole server, each of `workers` processes holding its 1/N share; 0 turns it off.
    # FILE tiles are not kept (the page cache holds them); a tile lives no longer than its slab index
    object_tile_cache_bytes: int = 64 << 20

    @property
    def resolved_store_path(self) -> str:
        return self.store_path or str(Path(self.data_dir) / "store.sqlite")

    @property
    def resolved_store_url(self) -> str:
        """What PublicationStore opens: `store_url` (a SQLite path or a postgresql:// URL), else
        the SQLite file `resolved_store_path`."""
        return self.store_url or self.resolved_store_path

    @property
    def publish_roots(self) -> tuple[str, ...]:
        """Where the admin API may publish from: `admin_roots`, else the pyramid homes this configuration
        names: <data_dir>/pyramids (demo copy, warehouse default), the bundled demo, `warehouse_pyramids`.
        Not all of data_dir: uploads written by /api users, the store and the admin token live there."""
        if self.admin_roots:
            return self.admin_roots
        roots = [str(Path(self.data_dir) / "pyramids"), str(PACKAGE_DIR / "demo" / "pyramids")]
        if self.warehouse_pyramids:
            roots.append(self.warehouse_pyramids)
        return tuple(roots)


def parse_s3_clusters(urls: str, keys: str, secrets: str) -> tuple[S3Cluster, ...]:
    """ROK4's comma-separated lists, one entry per cluster; the first is the default."""
    url_list = [u.strip() for u in urls.split(",") if u.strip()]
    key_list = [k.strip() for k in keys.split(",")]
    secret_list = [s.strip() for s in secrets.split(",")]
    if not url_list:
        return ()
    if len(key_list) != len(url_list) or len(secret_list) != len(url_list):
        raise ValueError("ROK4_S3_URL, ROK4_S3_KEY and ROK4_S3_SECRETKEY must list as many entries")
    return tuple(S3Cluster(u, k, s) for u, k, s in zip(url_list, key_list, secret_list, strict=True))


_TYPED = {f.name: f for f in fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    current = _TYPED[name].type
    if current in ("bool", bool):
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if current in ("int", int):
        return int(value)
    if current in ("float", float):
        return float(value)
    if current == "tuple[str, ...]":
        items = value.split(",") if isinstance(value, str) else value
        return tuple(str(v).strip() for v in items if str(v).strip())
    return value


def load_settings(config_file: str | None = None, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from defaults < config file < environment < explicit overrides (CLI flags)."""
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    config_file = config_file or env.get("TILESERVER_CONFIG")
    if config_file:
        path = Path(config_file)
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
        for key, value in data.items():
            if key == "s3_clusters":
                values[key] = tuple(S3Cluster(**c) for c in value)
            elif key in _TYPED:
                values[key] = _coerce(key, value)
            else:
                raise ValueError(f"{config_file}: unknown setting {key!r}")
    if env.get("ROK4_TMS_DIRECTORY"):
        values["tms_directory"] = env["ROK4_TMS_DIRECTORY"].removeprefix("file://")
    if env.get("ROK4_STYLES_DIRECTORY"):
        values["styles_directory"] = env["ROK4_STYLES_DIRECTORY"].removeprefix("file://")
    if env.get("ROK4_S3_URL"):
        values["s3_clusters"] = parse_s3_clusters(
            env["ROK4_S3_URL"], env.get("ROK4_S3_KEY", ""), env.get("ROK4_S3_SECRETKEY", "")
        )
    if env.get("ROK4_SSL_NO_VERIFY"):
        values["s3_ssl_verify"] = False
    for name in _TYPED:
        env_name = "TILESERVER_" + name.upper()
        if env_name in env and name != "s3_clusters":
            values[name] = _coerce(name, env[env_name])
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
    return replace(Settings(), **values)
