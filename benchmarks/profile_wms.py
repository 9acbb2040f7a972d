"""CPU per GetMap of each issue-16 row, in process (httpx over ASGI), optionally under cProfile.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/profile_wms.py [--rows ROW ...] [--count N] [--passes K] [--profile ROW]

The CPU figure is the process's (user + system) over N requests, client included (~0.3 ms);
bench_wms.py --peer rok4 measures the server alone against ROK4.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(PROJECT))

import httpx  # noqa: E402
import rok4_data  # noqa: E402
from map_cases import CASES, map_paths  # noqa: E402

from tileserver.app import create_app  # noqa: E402
from tileserver.settings import load_settings  # noqa: E402

FIXTURE_STYLES = PROJECT / "tests" / "data" / "styles"


_PROFILE: list[cProfile.Profile | None] = [None]


def _profile_render_threads() -> None:
    """Renders run in worker threads, out of a main-thread profiler's sight: profile them there."""
    from tileserver.render.gate import RenderGate

    original = RenderGate.run_in_thread

    async def run_in_thread(self, func, nbytes=0, deadline=None):  # type: ignore[no-untyped-def]
        prof = _PROFILE[0]
        if prof is None:
            return await original(self, func, nbytes, deadline)

        def profiled():  # type: ignore[no-untyped-def]
            return prof.runcall(func)

        return await original(self, profiled, nbytes, deadline)

    RenderGate.run_in_thread = run_in_thread  # type: ignore[method-assign]


async def main(args: argparse.Namespace) -> None:
    _profile_render_threads()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="prof-wms-"))
    data = rok4_data.load_or_build(workdir, FIXTURE_STYLES)
    settings = replace(load_settings(env={}), data_dir=str(workdir / "ts-data"), demo=False, admin_token="x",
                       admin_roots=("*",), styles_directory=str(data.styles),
                       decoded_tile_cache_bytes=0 if args.no_cache else 48 << 20)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        from tileserver.publication.model import parse_layer

        for name in ("BENCH3", "BENCH4", "BENCHDEM"):
            desc = {"title": name, "abstract": name, "styles": ["normal", "torgb", "estompage"],
                    "pyramids": [{"path": str(data.root / f"{name}.json"), "bottom_level": "15", "top_level": "12"}]}
            if name == "BENCHDEM":
                desc["styles"] = ["estompage", "normal", "hypso"]
            elif name == "BENCH3":
                desc["styles"] = ["normal"]
            else:
                desc["styles"] = ["normal", "torgb"]
            if runtime.store.get_layer(name) is None:
                runtime.store.add_layer(parse_layer(name, desc))
            else:
                runtime.store.put_layer(parse_layer(name, desc))
        await runtime.refresh(force=True)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for case in CASES:
                if args.rows and case.key not in args.rows:
                    continue
                paths = map_paths(case, data, args.count, "/wms", seed=7)
                first = await client.get(paths[0])
                if first.status_code != 200 or not first.headers["content-type"].startswith(case.mime):
                    print(case.key, first.status_code, first.content[:300])
                    continue
                prof = cProfile.Profile() if args.profile == case.key else None
                cpu = wall = float("inf")
                for _ in range(args.passes):  # the best pass: warm caches, least disturbed by neighbours
                    _PROFILE[0] = prof
                    t0, c0 = time.perf_counter(), time.process_time()
                    for p in paths:
                        r = await client.get(p)
                        assert r.status_code == 200, r.content[:200]
                    _PROFILE[0] = None
                    cpu = min(cpu, (time.process_time() - c0) / len(paths) * 1000)
                    wall = min(wall, (time.perf_counter() - t0) / len(paths) * 1000)
                print(f"{case.key:14s} {case.label:58s} cpu {cpu:7.2f} ms/req  wall {wall:7.2f}", flush=True)
                if prof:
                    pstats.Stats(prof).sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="*")
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--passes", type=int, default=1, help="runs of the maps; the best is printed")
    parser.add_argument("--profile")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "tileserver-bench-rok4"),
                        help="pyramids (built there once, then reused)")
    parser.add_argument("--no-cache", action="store_true", help="decoded_tile_cache_bytes=0")
    asyncio.run(main(parser.parse_args()))
