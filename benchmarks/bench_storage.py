"""Ranged-read throughput of the storage hot path, against the same server in the same run.

    python benchmarks/bench_storage.py [--server nginx|moto|both] [-n 4000] [-c 32] [--size 4096]

Clients compared, each doing `n` random `size`-byte ranged reads of one 4 MiB object with `c`
concurrent tasks: `Storage.read` (signed SigV4 over its own HTTP/1.1 client, storage/http1.py), aiobotocore `get_object` (signed),
plain aiohttp (unsigned: the HTTP ceiling for Python), and `Storage.read` on a local file. Servers
run in their own processes so they do not share this process's CPU: nginx (read-only stand-in,
path-style GET + Range, `/usr/sbin/nginx`) and moto (``python -m moto.server``; slow, ~1-2k req/s).
Reported: reads/s and client CPU µs per read (process time / reads), the figure that matters.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tileserver.settings import S3Cluster, Settings  # noqa: E402
from tileserver.storage import Storage  # noqa: E402

BUCKET, KEY = "bench", "PYR/DATA_15_100_200"
OBJECT_SIZE = 4 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_nginx(workdir: Path, data: bytes) -> tuple[str, subprocess.Popen[bytes]]:
    (workdir / "www" / BUCKET / os.path.dirname(KEY)).mkdir(parents=True)
    (workdir / "www" / BUCKET / KEY).write_bytes(data)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"daemon off; worker_processes 2; pid {workdir}/nginx.pid; error_log {workdir}/error.log;\n"
        "events { worker_connections 1024; }\n"
        f"http {{ access_log off; client_body_temp_path {workdir}; proxy_temp_path {workdir};\n"
        f"  fastcgi_temp_path {workdir}; uwsgi_temp_path {workdir}; scgi_temp_path {workdir};\n"
        f"  keepalive_requests 1000000; server {{ listen 127.0.0.1:{port}; root {workdir}/www; }} }}\n"
    )
    proc = subprocess.Popen(["/usr/sbin/nginx", "-c", str(conf), "-p", str(workdir)])
    wait_port(port)
    return f"http://127.0.0.1:{port}", proc


def start_moto(data: bytes) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    import botocore.session

    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=data)
    return f"http://127.0.0.1:{port}", proc


async def run(name: str, n: int, concurrency: int, read: Callable[[int], Awaitable[bytes]], size: int) -> None:
    offsets = [random.randrange(0, OBJECT_SIZE - size) for _ in range(n)]
    for off in offsets[:50]:  # warm connections
        await read(off)
    queue = iter(offsets)

    async def worker() -> None:
        for off in queue:
            got = await read(off)
            assert len(got) == size, (name, len(got))

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"  {name:<34} {n / wall:>9,.0f} reads/s   {cpu / n * 1e6:>7.0f} µs CPU/read")


async def bench_server(label: str, url: str, args: argparse.Namespace, plain: bool = True) -> None:
    print(f"{label} ({url}), {args.size}-byte ranges, concurrency {args.c}:")
    settings = Settings(s3_clusters=(S3Cluster(url, "testing", "testing"),),
                        storage_max_connections=args.c)
    path = f"s3://{BUCKET}/{KEY}"
    async with Storage(settings) as storage:
        await run("Storage.read (SigV4 + http1.py)", args.n, args.c,
                  lambda off: storage.read(path, off, args.size), args.size)

    config = AioConfig(s3={"addressing_style": "path"}, max_pool_connections=args.c,
                       retries={"total_max_attempts": 1})
    async with get_session().create_client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
        aws_secret_access_key="testing", config=config,
    ) as client:

        async def boto_read(off: int) -> bytes:
            response = await client.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={off}-{off + args.size - 1}")
            async with response["Body"] as body:
                return await body.read()

        await run("aiobotocore get_object", max(args.n // 4, 200), args.c, boto_read, args.size)

    if not plain:  # moto answers 403 to unsigned requests
        return
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.c)) as http:

        async def plain_read(off: int) -> bytes:
            headers = {"Range": f"bytes={off}-{off + args.size - 1}"}
            async with http.get(f"{url}/{BUCKET}/{KEY}", headers=headers) as response:
                return await response.read()

        await run("plain aiohttp (unsigned)", args.n, args.c, plain_read, args.size)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=("nginx", "moto", "both"), default="both")
    parser.add_argument("-n", type=int, default=4000)
    parser.add_argument("-c", type=int, default=32)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    data = os.urandom(OBJECT_SIZE)
    workdir = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if args.server in ("nginx", "both") and Path("/usr/sbin/nginx").exists():
            url, proc = start_nginx(workdir, data)
            procs.append(proc)
            await bench_server("nginx", url, args)
        if args.server in ("moto", "both"):
            url, proc = start_moto(data)
            procs.append(proc)
            await bench_server("moto", url, args, plain=False)
        local = workdir / "slab.tif"
        local.write_bytes(data)
        print(f"local file, page cache, {args.size}-byte ranges:")
        async with Storage(Settings()) as storage:
            await run("Storage.read (FILE, inline pread)", args.n * 5, args.c,
                      lambda off: storage.read(str(local), off, args.size), args.size)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
