"""Python's share of a tile, in process: `tileserver serve`'s protocol against uvicorn + the bare app.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/profile_tiles.py [--workdir DIR] [--tiles N] [--rounds K]

bench_server.py measures whole servers over sockets, where the kernel's share (~28 % of either
server's CPU on the 2-core VM) and wrk's scheduling blur what the Python code costs. Here raw HTTP
requests for the same synthetic pyramid (bench_server's, built or reused in --workdir) are fed to
each protocol object through a transport that only counts bytes; the figure is process CPU per
request, best of K rounds, with three event-loop turns per request for both (the bare app's ASGI
task needs them; ~5 µs). It also times the fast path's own steps in a tight loop, and the protocol
with a canned answer, which shows how much of a tile is the application and how much the protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import httpx  # noqa: E402
import uvloop  # noqa: E402
from bench_server import LAYERS, pyramid, rest_url  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402
from starlette.routing import Route  # noqa: E402
from uvicorn.config import Config  # noqa: E402
from uvicorn.server import ServerState  # noqa: E402

from tileserver.app import create_app  # noqa: E402
from tileserver.publication.model import parse_layer  # noqa: E402
from tileserver.server_cli import FastTileProtocol, uvicorn_options  # noqa: E402
from tileserver.settings import load_settings  # noqa: E402

TURNS = 3  # event-loop turns after each request: the bare app's task answers within them


class CountingTransport(asyncio.Transport):
    """A connection that takes every byte at once and keeps only their count."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    def write(self, data: Any) -> None:
        self.sent += len(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.sent += len(chunk)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 9000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def per_request(http: Any, app: Any, requests: list[bytes], rounds: int) -> tuple[float, float]:
    """(best µs of process CPU per request, bytes sent per request) over `rounds` passes."""
    config = Config(app, loop="none", lifespan="off", access_log=False, log_level="warning", http=http)
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={},
                                          _loop=asyncio.get_running_loop())
    transport = CountingTransport()
    protocol.connection_made(transport)
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        started = time.process_time()
        for raw in requests:
            protocol.data_received(raw)
            for _ in range(TURNS):
                await asyncio.sleep(0)
        best = min(best, (time.process_time() - started) / len(requests))
    return best * 1e6, transport.sent / len(requests) / rounds


def tight_loop(step: Callable[[int], object], count: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for i in range(count):
            step(i)
        best = min(best, (time.process_time() - started) / count)
    return best * 1e6


async def main(args: argparse.Namespace) -> None:
    layout, _, _ = pyramid(args.workdir, args.tiles)
    reads = layout.reads[: args.tiles]
    paths = [rest_url(LAYERS["FILE"], r.col, r.row) for r in reads]
    bodies = {}
    for read, path in zip(reads, paths, strict=True):
        with open(Path(layout.s3_root) / read.s3_path.removeprefix("s3://"), "rb") as f:
            f.seek(read.offset)
            bodies[path] = f.read(read.size)
    requests = [f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n".encode()
                for p in paths]

    async def tile(request: Request) -> Response:
        return Response(bodies[request.scope["path"]], media_type="image/jpeg")

    bare = Starlette(routes=[Route("/{path:path}", tile, methods=["GET"])])
    settings = replace(load_settings(env={}), data_dir=tempfile.mkdtemp(prefix="profile-tiles-"), demo=False,
                       admin_token="x", admin_roots=("*",))
    app = create_app(settings)
    http = uvicorn_options(settings)["http"]
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        runtime.store.add_layer(parse_layer(LAYERS["FILE"], {
            "title": "bench", "abstract": "bench",
            "pyramids": [{"path": "file://" + layout.file_descriptor, "bottom_level": "12", "top_level": "12"}]}))
        await runtime.refresh()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            for path in paths:  # every slab index read, its descriptor kept open, every tile in the page cache
                assert (await client.get(path)).status_code == 200
        answered = FastTileProtocol.answered
        ours, sent = await per_request(http, app, requests, args.rounds)
        print(f"tileserver (FastTileProtocol)        {ours:6.1f} µs/request  {sent:7.0f} B out  "
              f"({FastTileProtocol.answered - answered} answered at once)")
        theirs, sent = await per_request("httptools", bare, requests, args.rounds)
        print(f"bare starlette (uvicorn's protocol)  {theirs:6.1f} µs/request  {sent:7.0f} B out")
        print(f"tileserver ÷ bare: {ours / theirs:.2f} (Python and the page-cache read; no sockets)")

        # where a fast tile goes: its steps alone, hot in cache, then the protocol around a canned answer
        fast = app._tiles  # fastpath.FastTiles
        headers = [(b"host", b"127.0.0.1:9000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]
        asked = [fast._asked(p, p.encode(), b"", headers) for p in paths]
        stored = [fast._stored_now(a) for a in asked]
        from tileserver import fastpath

        for label, step in (
            ("FastTiles._asked (route, limits)", lambda i: fast._asked(paths[i], paths[i].encode(), b"", headers)),
            ("FastTiles._stored_now (index, read)", lambda i: fast._stored_now(asked[i])),
            ("fastpath._answered (ETag, id, log)", lambda i: fastpath._answered(asked[i], stored[i], "GET", paths[i],
                                                                              b"", 0.0)),
            ("app.answer_tile (all, metrics)", lambda i: app.answer_tile("GET", paths[i], paths[i].encode(), b"",
                                                                       headers, False)),
        ):
            print(f"  {label:40s} {tight_loop(step, len(paths), args.rounds):6.1f} µs (tight loop)")
        canned = app.answer_tile("GET", paths[0], paths[0].encode(), b"", headers, False)
        real = app.answer_tile
        try:
            app.answer_tile = lambda *a, **k: canned
            protocol_only, _ = await per_request(http, app, requests, args.rounds)

            def computed(*a: Any, **k: Any) -> Any:
                real(*a, **k)
                return canned

            app.answer_tile = computed
            in_flow, _ = await per_request(http, app, requests, args.rounds)
        finally:
            app.answer_tile = real
        print(f"  {'protocol around a canned answer':40s} {protocol_only:6.1f} µs")
        print(f"  {'protocol, the real answer computed':40s} {in_flow:6.1f} µs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="bench_server's pyramid, built there or reused")
    parser.add_argument("--tiles", type=int, default=3000, help="random tiles requested (default 3000)")
    parser.add_argument("--rounds", type=int, default=5, help="passes; the best is kept (default 5)")
    uvloop.install()
    asyncio.run(main(parser.parse_args()))
