"""Core read path (issue 2): tiles/s of `Pyramid.get_tile` on FILE and S3, against the ceilings.

    .venv/bin/python benchmarks/bench_core.py [--seconds N]

One run builds a synthetic JPEG pyramid (64 slabs of 16x16 tiles of 256x256 px, ~15 KB a tile) in a
temporary directory, in both layouts: FILE (descriptor + base-36 paths) and S3 objects
(``<bucket>/<NAME>/DATA_<level>_<col>_<row>``, hard links to the same slabs) served read-only by
nginx on a loopback port. With the slab-index caches warm it then measures, each for N seconds at
64 requests in flight from one event loop, random tiles inside the extent:

- ``Pyramid.get_tile`` on FILE, and on S3 through the project's ``Storage`` (signed GETs, nginx
  ignores the signature), plus ``Storage.read`` of the same ranges (the pyramid's share);
- the ceiling: unsigned aiohttp range GETs of the same bytes (one shared ClientSession);
- the "before": aiobotocore ``get_object(Bucket, Key, Range)`` of the same bytes;
- wrk against nginx for one fixed range (the HTTP ceiling of the box);

then the cost of one SigV4 signature (the project's signer against botocore's) and decode
throughput per format on 256x256 tiles (synthetic, and the real fixtures of tests/data).
nginx and wrk are installed with apt-get when missing. The Markdown tables are printed and written
into the "## Core (issue 2)" section of benchmarks/RESULTS.md, between generated markers (notes
written by hand around them are kept; ``--no-results`` skips this, and so does ``--profile``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import shlex
import shutil
import statistics
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(PROJECT))

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    LoadResult,
    Nginx,
    closed_loop,
    ensure_commands,
    fmt,
    fmt_int,
    format_table,
    loop_name,
    machine_summary,
    merge_results,
    new_event_loop,
    run_wrk,
    system_busy_seconds,
    timed_calls,
    update_results,
)

from tileserver.pyramid import Pyramid, SlabIndexCache  # noqa: E402
from tileserver.rok4.codecs import decode_tile, encode_tile  # noqa: E402
from tileserver.rok4.descriptor import parse_descriptor  # noqa: E402
from tileserver.rok4.slab import build_slab, index_size, parse_index, read_header  # noqa: E402
from tileserver.settings import S3Cluster, Settings  # noqa: E402
from tileserver.storage import Storage  # noqa: E402

TMS_DIR = str(PROJECT / "tms_definitions")
RESULTS = HERE / "RESULTS.md"
SECTION = "## Core (issue 2)"
FIXTURES = PROJECT / "tests" / "data"
NAME = "BENCH"
BUCKET = "bench"
LEVEL = "12"  # PM level 12: 4096 x 4096 tiles of 256 px
TILE = 256
TILES_PER_SLAB_SIDE = 16
SLABS_SIDE = 8  # 8 x 8 = 64 slabs, 16,384 tiles
FIRST_SLAB_COL, FIRST_SLAB_ROW = 128, 88
POOL = 64  # distinct encoded tiles, reused across slabs (reads do not look at the pixels)


# --- synthetic content ----------------------------------------------------------------------------


def _smooth(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Bilinear upsampling of a (cells+1)^2 Gaussian grid: low-frequency structure."""
    grid = rng.normal(size=(cells + 1, cells + 1, channels))
    pos = np.linspace(0, cells, size, endpoint=False)
    i = pos.astype(int)
    f = pos - i
    fy, fx = f[:, None, None], f[None, :, None]
    top = grid[i][:, i] * (1 - fx) + grid[i][:, i + 1] * fx
    bottom = grid[i + 1][:, i] * (1 - fx) + grid[i + 1][:, i + 1] * fx
    return top * (1 - fy) + bottom * fy


def photo_like(rng: np.random.Generator, size: int = TILE) -> np.ndarray:
    """Aerial-photo-ish RGB: colour gradients, fine texture, sharp-edged patches, sensor noise.

    JPEG q75 ~15 KB, lossless formats 170-250 KB, like real orthophoto tiles.
    """
    img = 110 + 40 * _smooth(rng, size, 3, 3) + 30 * _smooth(rng, size, 32, 1) + 18 * _smooth(rng, size, 100, 1)
    for _ in range(60):
        y, x = rng.integers(0, size, 2)
        h, w = rng.integers(4, 40, 2)
        img[y : y + h, x : x + w] += rng.normal(0, 35, 3)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def elevation_like(rng: np.random.Generator, size: int = TILE) -> np.ndarray:
    """DEM-ish float32 metres (one channel): relief plus centimetric noise, like RGE ALTI."""
    z = 600 + 300 * _smooth(rng, size, 3, 1) + 40 * _smooth(rng, size, 24, 1) + rng.normal(0, 0.05, (size, size, 1))
    return z.astype("<f4")


# --- the synthetic pyramid ------------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    """One random tile and where its bytes are, for every client."""

    col: int
    row: int
    s3_path: str  # s3://bucket/key
    key: str
    offset: int
    size: int

    @property
    def range(self) -> str:
        return f"bytes={self.offset}-{self.offset + self.size - 1}"


@dataclass
class Layout:
    file_descriptor: str
    s3_root: Path  # nginx serves this directory: <bucket>/<key>
    slabs: list[tuple[int, int]]
    slab_bytes: int
    tile_bytes: float  # mean encoded size
    reads: list[Read]


def _descriptor(storage: dict) -> dict:
    c0, r0 = FIRST_SLAB_COL * TILES_PER_SLAB_SIDE, FIRST_SLAB_ROW * TILES_PER_SLAB_SIDE
    span = SLABS_SIDE * TILES_PER_SLAB_SIDE - 1
    return {
        "format": "TIFF_JPG_UINT8",
        "tile_matrix_set": "PM",
        "raster_specifications": {"channels": 3, "nodata": "255,255,255", "photometric": "rgb",
                                  "interpolation": "bicubic"},
        "levels": [{
            "id": LEVEL,
            "tiles_per_width": TILES_PER_SLAB_SIDE,
            "tiles_per_height": TILES_PER_SLAB_SIDE,
            "tile_limits": {"min_col": c0, "max_col": c0 + span, "min_row": r0, "max_row": r0 + span},
            "storage": storage,
        }],
    }


def prepare(workdir: Path, n_reads: int, seed: int = 2) -> Layout:
    rng = np.random.default_rng(seed)
    pool = [encode_tile(photo_like(rng), "jpg") for _ in range(POOL)]
    file_root, s3_root = workdir / "file", workdir / "s3"
    file_desc = _descriptor({"type": "FILE", "image_directory": f"{NAME}/DATA/{LEVEL}", "path_depth": 2})
    s3_desc = _descriptor({"type": "S3", "bucket_name": BUCKET, "image_prefix": f"{NAME}/DATA_{LEVEL}"})
    file_level = parse_descriptor(file_desc).level(LEVEL)
    s3_level = parse_descriptor(s3_desc).level(LEVEL)
    n_tiles = TILES_PER_SLAB_SIDE**2
    slabs, indexes, total, tile_total = [], {}, 0, 0
    for slab_col in range(FIRST_SLAB_COL, FIRST_SLAB_COL + SLABS_SIDE):
        for slab_row in range(FIRST_SLAB_ROW, FIRST_SLAB_ROW + SLABS_SIDE):
            tiles = [pool[int(i)] for i in rng.integers(0, POOL, n_tiles)]
            data = build_slab(tiles, TILES_PER_SLAB_SIDE, TILES_PER_SLAB_SIDE, TILE, TILE, 3, "UINT8", "jpg")
            path = file_root / file_level.storage.slab_name(slab_col, slab_row)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            key = s3_level.storage.slab_name(slab_col, slab_row)
            obj = s3_root / BUCKET / key
            obj.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, obj)
            except OSError:
                shutil.copyfile(path, obj)
            slabs.append((slab_col, slab_row))
            indexes[slab_col, slab_row] = (key, parse_index(data[: index_size(n_tiles)], n_tiles))
            total += len(data)
            tile_total += sum(map(len, tiles))
    (file_root / f"{NAME}.json").write_text(json.dumps(file_desc))
    (s3_root / BUCKET / f"{NAME}.json").write_text(json.dumps(s3_desc))

    lim = file_level.tile_limits
    picker = random.Random(seed)
    reads = []
    for _ in range(n_reads):
        col, row = picker.randint(lim.min_col, lim.max_col), picker.randint(lim.min_row, lim.max_row)
        slab_col, slab_row, n = file_level.slab_of(col, row)
        key, index = indexes[slab_col, slab_row]
        reads.append(Read(col, row, f"s3://{BUCKET}/{key}", key, index.offsets[n], index.sizes[n]))
    return Layout(str(file_root / f"{NAME}.json"), s3_root, slabs, total, tile_total / (len(slabs) * n_tiles), reads)


# --- read benchmarks ------------------------------------------------------------------------------


class _RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that only understands Content-Length answers."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.end = -1  # end of the answer being read, once its head is parsed
        self.body_at = 0
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.end < 0:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = bytes(self.buffer[:head_end]).lower()
            length = head.find(b"\r\ncontent-length:")
            if length < 0:
                self._fail(RuntimeError("answer without Content-Length"))
                return
            self.status = int(head[9:12])
            self.body_at = head_end + 4
            self.end = self.body_at + int(head[length + 17 : head.find(b"\r\n", length + 2)])
        if len(self.buffer) >= self.end:
            body = bytes(self.buffer[self.body_at : self.end])
            del self.buffer[: self.end]
            self.end = -1
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result((self.status, body))

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._fail(exc or ConnectionResetError("connection closed"))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter


class RawHttpPool:
    """The least a Python client can do per ranged GET: one write, one parse, pooled connections.

    Not a client for the project (no chunked bodies, no errors, no timeouts): a floor showing how
    much of a read's CPU is aiohttp's own.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_RawConnection] = []
        self.all: list[_RawConnection] = []

    async def get(self, path: str, range_header: str) -> tuple[int, bytes]:
        if self.idle:
            connection = self.idle.pop()
        else:
            _, connection = await asyncio.get_running_loop().create_connection(_RawConnection, self.host, self.port)
            self.all.append(connection)
        answer = await connection.request(
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nRange: {range_header}\r\n\r\n".encode())
        self.idle.append(connection)
        return answer

    def close(self) -> None:
        for connection in self.all:
            if connection.transport is not None:
                connection.transport.close()


@dataclass
class Row:
    what: str
    rate: float
    p50: float  # seconds
    p99: float
    client_cpu_per_read: float  # seconds
    server_cpu_per_read: float = float("nan")  # nginx
    other_cores: float = float("nan")  # busy cores outside client and nginx during the run
    note: str = ""
    ceiling: bool = False


class Profiler:
    """cProfile around the read path named by --profile (every round); the report goes to stderr."""

    def __init__(self, wanted: str | None = None) -> None:
        self.wanted = wanted
        self.profile = cProfile.Profile() if wanted else None

    def active(self, name: str) -> cProfile.Profile | None:
        return self.profile if name == self.wanted else None

    def report(self) -> str:
        if self.profile is None:
            return ""
        out = io.StringIO()
        pstats.Stats(self.profile, stream=out).strip_dirs().sort_stats("tottime").print_stats(30)
        return f"--- cProfile of `{self.wanted}` (own time; profiling slows the run) ---\n{out.getvalue()}"


@dataclass
class ReadPath:
    """One way of reading the same tiles, accumulated over the rounds."""

    name: str
    op: Callable[[Read], Awaitable[object]]
    note: str = ""
    ceiling: bool = False
    http: bool = True  # goes to nginx (FILE does not: no server column)

    def __post_init__(self) -> None:
        self.runs: list[LoadResult] = []
        self.server_cpu = 0.0
        self.other_cpu = 0.0

    def row(self) -> Row:
        r = merge_results(self.runs)
        return Row(self.name, r.rate, r.p(50), r.p(99), r.cpu_per_op,
                   self.server_cpu / r.count if r.count and self.http else float("nan"), self.other_cpu / r.wall,
                   self.note, self.ceiling)


async def _run_rounds(paths: list[ReadPath], reads: list[Read], args, nginx: Nginx | None, wrk: str | None,
                      profiler: Profiler) -> list[Row]:
    """Every path `args.rounds` times, interleaved, so drifting load on the box hits them alike."""
    seconds = args.seconds / args.rounds
    wrk_runs: list = []
    wrk_server = wrk_other = 0.0
    for round_no in range(args.rounds):
        print(f"  round {round_no + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for path in paths:
            if round_no == 0:
                await closed_loop(path.op, reads, args.warmup, args.concurrency)
            server0 = nginx.cpu_seconds() if nginx else 0.0
            busy0 = system_busy_seconds()
            profile = profiler.active(path.name)
            if profile:
                profile.enable()
            result = await closed_loop(path.op, reads, seconds, args.concurrency)
            if profile:
                profile.disable()
            server = nginx.cpu_seconds() - server0 if nginx else 0.0
            path.runs.append(result)
            path.server_cpu += server
            path.other_cpu += max(system_busy_seconds() - busy0 - result.cpu - server, 0.0)
        if wrk and nginx:
            read = reads[0]
            server0, busy0 = nginx.cpu_seconds(), system_busy_seconds()
            result = run_wrk(f"{nginx.url}/{BUCKET}/{read.key}", seconds, args.concurrency, threads=2,
                             headers=[f"Range: {read.range}"], binary=wrk)
            if result.errors:
                print(f"!! wrk saw {result.errors} errors:\n{result.output}", file=sys.stderr)
            server = nginx.cpu_seconds() - server0
            wrk_runs.append(result)
            wrk_server += server
            wrk_other += max(system_busy_seconds() - busy0 - result.cpu - server, 0.0)
    rows = [path.row() for path in paths]
    if wrk_runs:
        requests = sum(r.requests for r in wrk_runs)
        wall = sum(r.seconds for r in wrk_runs)
        rows.append(Row(
            f"wrk -t2 -c{args.concurrency}, one fixed range (box ceiling)", requests / wall,
            statistics.median(r.p50 for r in wrk_runs), max(r.p99 for r in wrk_runs),
            sum(r.cpu for r in wrk_runs) / requests, wrk_server / requests, wrk_other / wall,
            "C client, 2 threads",
        ))
    return rows


async def _check_same_bytes(reads: list[Read], paths: list[ReadPath]) -> None:
    """Every path returns the same bytes for the same tile before anything is timed."""
    for read in reads[:32]:
        got = [await path.op(read) for path in paths]
        if any(g != got[0] for g in got) or len(got[0]) != read.size:
            sizes = [len(g) if g is not None else None for g in got]
            raise SystemExit(f"read paths disagree on tile {read.col},{read.row}: sizes {sizes}")


async def read_benchmarks(layout: Layout, args, nginx: Nginx | None, wrk: str | None,
                          profiler: Profiler) -> tuple[list[Row], dict]:
    import aiohttp
    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession

    clusters = (S3Cluster(nginx.url, "bench-access-key", "bench-secret-key"),) if nginx else ()
    settings = Settings(tms_directory=TMS_DIR, s3_clusters=clusters)
    async with AsyncExitStack() as stack:
        storage = await stack.enter_async_context(Storage(settings))
        pyramids = {"FILE": await Pyramid.open(layout.file_descriptor, storage, SlabIndexCache(), TMS_DIR)}
        if nginx:
            pyramids["S3"] = await Pyramid.open(f"s3://{BUCKET}/{NAME}.json", storage, SlabIndexCache(), TMS_DIR)
        for pyramid in pyramids.values():  # warm the index caches
            level = pyramid.level(LEVEL)
            await asyncio.gather(*(pyramid.slab_index(level, c, r) for c, r in layout.slabs))
        file_pyramid = pyramids["FILE"]

        async def file_tile(read: Read) -> bytes | None:
            return await file_pyramid.get_tile(LEVEL, read.col, read.row)

        paths = [ReadPath("FILE: Pyramid.get_tile", file_tile, "page-cached slabs", http=False)]
        if nginx:
            s3_pyramid = pyramids["S3"]

            async def s3_tile(read: Read) -> bytes | None:
                return await s3_pyramid.get_tile(LEVEL, read.col, read.row)

            async def s3_read(read: Read) -> bytes | None:
                return await storage.read(read.s3_path, read.offset, read.size)

            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
            http = await stack.enter_async_context(aiohttp.ClientSession(connector=connector, auto_decompress=False))

            async def plain(read: Read) -> bytes:
                url = f"{nginx.url}/{BUCKET}/{read.key}"
                async with http.get(url, headers={"Range": read.range}) as response:
                    if response.status != 206:
                        raise RuntimeError(f"GET {url}: HTTP {response.status}")
                    return await response.read()

            raw_pool = RawHttpPool(nginx.host, nginx.port)
            stack.callback(raw_pool.close)

            async def raw(read: Read) -> bytes:
                status, body = await raw_pool.get(f"/{BUCKET}/{read.key}", read.range)
                if status != 206:
                    raise RuntimeError(f"GET {read.key}: HTTP {status}")
                return body

            config = AioConfig(
                s3={"addressing_style": "path"}, max_pool_connections=args.concurrency,
                retries={"total_max_attempts": 1},
                request_checksum_calculation="when_required", response_checksum_validation="when_required",
            )
            client = await stack.enter_async_context(AioSession().create_client(
                "s3", endpoint_url=nginx.url, region_name="us-east-1", aws_access_key_id="bench-access-key",
                aws_secret_access_key="bench-secret-key", config=config,
            ))

            async def boto(read: Read) -> bytes:
                response = await client.get_object(Bucket=BUCKET, Key=read.key, Range=read.range)
                async with response["Body"] as body:
                    return await body.read()

            paths += [
                ReadPath("S3 (nginx): Pyramid.get_tile", s3_tile),
                ReadPath("S3 (nginx): Storage.read, same ranges", s3_read, "signed GET, no pyramid"),
                ReadPath("S3 (nginx): plain aiohttp GET (ceiling)", plain, "unsigned, one ClientSession", True),
                ReadPath("S3 (nginx): minimal asyncio HTTP/1.1 client", raw, "unsigned; floor for Python, not a client"),
                ReadPath("S3 (nginx): aiobotocore get_object (before)", boto, "signed by botocore"),
            ]
        if profiler.wanted and profiler.wanted not in [p.name for p in paths]:
            match = [p.name for p in paths if p.name.startswith(profiler.wanted)]
            if not match:
                raise SystemExit(f"--profile {profiler.wanted!r} names none of: {'; '.join(p.name for p in paths)}")
            profiler.wanted = match[0]
        await _check_same_bytes(layout.reads, paths)
        rows = await _run_rounds(paths, layout.reads, args, nginx, wrk, profiler)
        info = {k: (len(p.cache), p.cache.misses) for k, p in pyramids.items()}
    return rows, info


def read_table(rows: list[Row]) -> str:
    ceiling = next((r.rate for r in rows if r.ceiling), float("nan"))
    out = [
        [r.what, fmt_int(r.rate), fmt(r.rate / ceiling, 2), fmt(r.p50 * 1e3, 2), fmt(r.p99 * 1e3, 2),
         fmt_int(r.client_cpu_per_read * 1e6), fmt_int(1 / r.client_cpu_per_read), fmt_int(r.server_cpu_per_read * 1e6),
         fmt(r.other_cores, 2), r.note]
        for r in rows
    ]
    return format_table(
        ["read path (warm index)", "reads/s", "× aiohttp ceiling", "p50 ms", "p99 ms", "client µs CPU/read",
         "reads/s per client core", "nginx µs CPU/read", "other busy cores", "note"],
        out, "lrrrrrrrrl",
    )


# --- signing --------------------------------------------------------------------------------------


def signing_table(seconds: float) -> str:
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    from tileserver.storage.sigv4 import Credentials, SigV4Signer, canonical_uri

    uri = canonical_uri(BUCKET, f"{NAME}/DATA_{LEVEL}_130_90")
    signer = SigV4Signer("us-east-1")
    creds = Credentials("bench-access-key", "bench-secret-key")

    def ours() -> None:
        signer.request_head(creds, "GET", "127.0.0.1:8080", uri, "bytes=4096-19999")

    boto_creds = BotoCredentials("bench-access-key", "bench-secret-key")

    def botocore() -> None:
        request = AWSRequest(method="GET", url="http://127.0.0.1:8080" + uri, headers={"Range": "bytes=4096-19999"})
        S3SigV4Auth(boto_creds, "s3", "us-east-1").add_auth(request)

    rows = []
    for what, fn in (("tileserver SigV4Signer.request_head", ours), ("botocore S3SigV4Auth.add_auth (+ AWSRequest)", botocore)):
        calls, _wall, cpu = timed_calls(fn, seconds, batch=200)
        rows.append([what, fmt(cpu / calls * 1e6, 1), fmt_int(calls / cpu)])
    return format_table(["signing one ranged GET", "µs CPU/call", "calls/s (one core)"], rows)


# --- decoding -------------------------------------------------------------------------------------


def _decode_row(label: str, tiles: list[bytes], decode, seconds: float, out_bytes: int) -> list[str]:
    decode(tiles[0])  # check it works before timing
    it = iter(range(1 << 62))

    def one() -> None:
        decode(tiles[next(it) % len(tiles)])

    calls, _wall, cpu = timed_calls(one, seconds, batch=10)
    rate = calls / cpu
    mean = sum(map(len, tiles)) / len(tiles)
    return [label, fmt_int(rate), fmt_int(rate * out_bytes / 1e6), fmt(1e6 / rate, 0), fmt(mean / 1024, 1),
            fmt(out_bytes / mean, 1)]


def decode_table(seconds: float) -> str:
    from PIL import Image

    rng = np.random.default_rng(5)
    photos = [photo_like(rng) for _ in range(8)]
    dems = [elevation_like(rng) for _ in range(8)]
    rows = []
    cases = [
        ("JPEG q75 (simplejpeg)", "jpg", photos), ("JPEG q90 (simplejpeg)", "jpg90", photos),
        ("PNG, ROK4 layout (fast path)", "png", photos),
        ("ZIP uint8", "zip", photos), ("LZW uint8", "lzw", photos), ("PackBits uint8", "pkb", photos),
        ("RAW uint8", "raw", photos),
        ("ZIP float32", "zip", dems), ("LZW float32", "lzw", dems), ("PackBits float32", "pkb", dems),
        ("RAW float32", "raw", dems),
    ]
    for label, compression, images in cases:
        h, w, c = images[0].shape
        tiles = [encode_tile(img, compression) for img in images]
        dtype = images[0].dtype

        def decode(data: bytes, compression=compression, w=w, h=h, c=c, dtype=dtype) -> None:
            decode_tile(data, compression, w, h, c, dtype)

        rows.append(_decode_row(f"{label}, {w}x{h}x{c}", tiles, decode, seconds, images[0].nbytes))
        if compression in ("zip", "png"):
            rows.append(_zlibng_row(tiles, compression, seconds, images[0].nbytes))
        if compression == "png":
            rows.append(_decode_row(f"PNG via Pillow (comparison), {w}x{h}x{c}", tiles,
                                    lambda data: np.asarray(Image.open(io.BytesIO(data))), seconds,
                                    images[0].nbytes))
    rows.extend(_fixture_rows(seconds))
    return format_table(["decode (one core)", "tiles/s", "MB/s pixels", "µs/tile", "KB/tile", "ratio"], rows)


def _zlib_stream(data: bytes, compression: str) -> bytes:
    """The zlib stream of a ZIP tile (the tile itself) or of a PNG tile (its IDAT chunks)."""
    if compression != "png":
        return data
    pos, parts = 8, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            parts.append(data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    return b"".join(parts)


def _zlibng_row(tiles: list[bytes], compression: str, seconds: float, out_bytes: int) -> list[str]:
    """Inflating the same streams with zlib-ng (imagecodecs, already a dependency) instead of zlib."""
    import imagecodecs

    streams = [_zlib_stream(t, compression) for t in tiles]
    size = len(zlib.decompress(streams[0]))
    if bytes(imagecodecs.zlibng_decode(streams[0], out=size)) != zlib.decompress(streams[0]):
        raise SystemExit("zlib-ng and zlib disagree")
    return _decode_row("  the same inflated by imagecodecs.zlibng_decode (comparison)", streams,
                       lambda stream: imagecodecs.zlibng_decode(stream, out=size), seconds, out_bytes)


def _fixture_rows(seconds: float) -> list[list[str]]:
    """Real tiles: the JPEG slab, SCAN1000 (PNG RGBA) and RGEALTI (ZIP float32) from tests/data."""
    rows = []
    slab = FIXTURES / "slabs" / "ORTHOHR.tif"
    if slab.exists():
        data = slab.read_bytes()
        header = read_header(data)
        index = parse_index(data, header.n_tiles)
        tiles = [data[o : o + s] for o, s in zip(index.offsets, index.sizes, strict=True) if s]
        w, h = header.tile_width, header.tile_height
        rows.append(_decode_row(f"fixture ORTHOHR.tif (JPEG), {w}x{h}x3", tiles,
                                lambda t: decode_tile(t, "jpg", w, h, 3, "uint8"), seconds, w * h * 3))
    for name in ("SCAN1000", "MONTAGNE", "RGEALTI"):
        if (FIXTURES / "pyramids" / f"{name}.json").exists():
            rows.extend(asyncio.run(_fixture_pyramid_rows(name, seconds)))
    return rows


async def _fixture_pyramid_rows(name: str, seconds: float) -> list[list[str]]:
    async with Storage(Settings(tms_directory=TMS_DIR)) as storage:
        pyramid = await Pyramid.open(str(FIXTURES / "pyramids" / f"{name}.json"), storage, tms_directory=TMS_DIR)
        tiles: list[tuple[str, bytes]] = []
        for level in pyramid.descriptor.levels:
            lim = level.tile_limits
            for row in range(lim.min_row, lim.max_row + 1):
                for col in range(lim.min_col, lim.max_col + 1):
                    data = await pyramid.get_tile(level.id, col, row)
                    if data:
                        tiles.append((level.id, data))
    by_data = {data: level for level, data in tiles}
    matrix = pyramid.matrix(tiles[0][0])
    out = matrix.tile_width * matrix.tile_height * pyramid.descriptor.channels * np.dtype(pyramid.format.dtype).itemsize
    label = (f"fixture {name} ({pyramid.format.code}, {len(tiles)} tiles), "
             f"{matrix.tile_width}x{matrix.tile_height}x{pyramid.descriptor.channels}")
    rows = [_decode_row(label, list(by_data), lambda d: pyramid.decode(by_data[d], d), seconds, out)]
    if pyramid.format.compression in ("zip", "png"):
        rows.append(_zlibng_row(list(by_data), pyramid.format.compression, seconds, out))
    return rows


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per read path (default 6)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds sharing --seconds per path (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="untimed seconds per path before round 1")
    parser.add_argument("--decode-seconds", type=float, default=0.5, help="per decode format (default 0.5)")
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                        help="event loop (auto: uvloop when installed, as uvicorn does)")
    parser.add_argument("--profile", metavar="RUN", help="cProfile one read run, named by the start of its "
                        "label (e.g. 'S3 (nginx): Pyramid'); the report goes to stderr")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode and signing tables")
    parser.add_argument("--no-results", action="store_true",
                        help="do not write the figures into benchmarks/RESULTS.md")
    parser.add_argument("--workdir", help="where to build the pyramid (default: a temporary directory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    machine = machine_summary()
    tools = ensure_commands({"nginx": "nginx-light", "wrk": "wrk"})
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-core-"))
    loop = new_event_loop(args.loop)
    status = 0
    try:
        n_reads = 50_000
        print(f"building the synthetic pyramid in {workdir} ...", file=sys.stderr, flush=True)
        layout = prepare(workdir, n_reads)
        nginx = None
        if tools["nginx"]:
            try:
                nginx = Nginx(layout.s3_root, binary=tools["nginx"]).start()
            except RuntimeError as exc:
                print(f"!! {exc}\n!! S3 and HTTP rows skipped", file=sys.stderr)
        if nginx is None:
            status = 1
        profiler = Profiler(args.profile)
        try:
            print("reading (warm-up, then interleaved rounds) ...", file=sys.stderr, flush=True)
            rows, info = loop.run_until_complete(
                read_benchmarks(layout, args, nginx, tools["wrk"] if nginx else None, profiler))
        finally:
            if nginx:
                nginx.stop()
        sign = decode = ""
        if not args.no_decode:
            print("signing and decoding ...", file=sys.stderr, flush=True)
            sign = signing_table(max(args.decode_seconds, 0.5))
            decode = decode_table(args.decode_seconds)
    finally:
        loop.close()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    cli = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python benchmarks/bench_core.py", *map(shlex.quote, cli)])
    parts = [
        f"Date: {date.today().isoformat()}. Machine: {machine}. Client and nginx share these cores.",
        f"Command: `{command}` ({time.perf_counter() - started:.0f} s in all). Event loop: {loop_name(loop)}; "
        f"{args.concurrency} requests in flight; {args.seconds:g} s per read path in {args.rounds} interleaved "
        f"rounds, after {args.warmup:g} s of warm-up.",
        f"Pyramid: {len(layout.slabs)} JPEG slabs of {TILES_PER_SLAB_SIDE}x{TILES_PER_SLAB_SIDE} tiles "
        f"({layout.slab_bytes / 2**20:.0f} MiB, mean tile {layout.tile_bytes / 1024:.1f} KB), random tiles over "
        "the whole extent; index caches warmed first ("
        + ", ".join(f"{k}: {n} slabs cached, {m} misses in all" for k, (n, m) in info.items()) + ").",
        read_table(rows),
    ]
    if not nginx:
        parts.append("(nginx missing: S3 and HTTP rows skipped)")
    if sign:
        parts += [sign, decode]
    report = "\n\n".join(parts)
    print("\n" + report)
    if not args.no_results and not args.profile:
        update_results(RESULTS, SECTION, report, "bench_core.py")
        print(f"\n(figures written to {RESULTS.relative_to(PROJECT)}, section {SECTION!r})", file=sys.stderr)
    if profiler.profile:
        print("\n" + profiler.report(), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
