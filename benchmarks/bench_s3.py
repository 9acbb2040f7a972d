"""S3 against FILE per core (issue 16, goal 2), two source trees side by side in one run.

    .venv/bin/python benchmarks/bench_s3.py [--baseline DIR] [--seconds N] [--profile SECONDS]

Same pyramid, nginx bucket, wrk scripts and servers as bench_server.py (whose pieces it reuses), but
no ceiling: one ``tileserver serve`` per source tree (this checkout, and ``--baseline DIR``, e.g. a
git worktree of main, put first on PYTHONPATH), each with BENCH_FILE and BENCH_S3 published, driven
in interleaved rounds (FILE REST, S3 REST; the order alternates) so drifting load on a shared box
hits every server alike. Per server and storage it prints tiles/s, server CPU per tile (µs) and
tiles per second of server CPU ("per core"), then S3 ÷ FILE per core and the S3 − FILE µs a tile:
the storage client's cost, the figure this benchmark exists for. ``--profile SECONDS`` ends with a
py-spy record of this tree's server under S3 REST load (top functions by own and inclusive time).
Nothing is written to RESULTS.md: paste the table with the load average it prints.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_server import (  # noqa: E402
    LAYERS,
    Case,
    Run,
    Server,
    check_and_warm,
    drive,
    profile,
    publish,
    pyramid,
    rest_url,
    start_tileserver,
    tile_bytes,
    write_script,
)
from common import Nginx, ensure_commands, fmt, fmt_int, format_table, machine_summary  # noqa: E402


def start(label: str, tree: Path, tmp: Path, nginx: Nginx, log_level: str, settings: list[str]) -> Server:
    """`tileserver serve` with `tree` first on PYTHONPATH (its own data dir and log)."""
    own = tmp / label.replace(" ", "-")
    own.mkdir()
    return start_tileserver(own, nginx, log_level, settings, tree=tree, label=label)


def report(runs: dict[tuple[str, str], Run]) -> str:
    rows = []
    labels = list(dict.fromkeys(label for label, _ in runs))
    for label in labels:
        file, s3 = runs[label, "FILE"], runs[label, "S3"]
        per_core = {k: r.requests / r.server_cpu for k, r in (("FILE", file), ("S3", s3))}
        us = {k: r.server_cpu / r.requests * 1e6 for k, r in (("FILE", file), ("S3", s3))}
        rows.append([label, fmt_int(file.rate), fmt_int(s3.rate), fmt_int(per_core["FILE"]), fmt_int(per_core["S3"]),
                     fmt(per_core["S3"] / per_core["FILE"], 2), fmt(us["FILE"], 1), fmt(us["S3"], 1),
                     fmt(us["S3"] - us["FILE"], 1), fmt(file.server_cpu / file.wall, 2), fmt(s3.server_cpu / s3.wall, 2),
                     fmt(s3.nginx_cpu / s3.requests * 1e6, 1), str(file.errors + s3.errors)])
    return format_table(
        ["tree", "FILE tiles/s", "S3 tiles/s", "FILE tiles/s per core", "S3 tiles/s per core", "S3 ÷ FILE per core",
         "FILE µs/tile", "S3 µs/tile", "S3 − FILE µs", "FILE server cores", "S3 server cores", "nginx µs/tile",
         "errors"],
        rows, "lrrrrrrrrrrrr",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another source tree (e.g. a worktree of main) to compare with")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per server and case (default 20)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed wrk seconds per server and case (default 2)")
    parser.add_argument("--urls", type=int, default=10_000, help="random tiles in each URL list (default 10000)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--workdir", type=Path, help="keep the synthetic pyramid there and reuse it next time")
    parser.add_argument("--profile", type=float, metavar="SECONDS", default=0.0,
                        help="then py-spy record this tree's server under S3 REST for SECONDS")
    parser.add_argument("--keep-profile", metavar="FILE", help="copy py-spy's collapsed stacks there")
    parser.add_argument("--py-spy-path", help="a directory holding the py-spy binary")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a tileserver setting for the served trees, e.g. object_tile_cache_bytes=0 (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    machine = machine_summary()  # with the load average before the run
    tools = ensure_commands({"nginx": "nginx-light", "wrk": "wrk"})
    if not tools["wrk"] or not tools["nginx"]:
        print("!! wrk and nginx are required: apt-get install -y wrk nginx-light", file=sys.stderr)
        return 1
    layout, root, temporary = pyramid(args.workdir, args.urls)
    tmp = Path(tempfile.mkdtemp(prefix="bench-s3-run-"))
    reads = layout.reads[: args.urls]
    payloads = tile_bytes(layout, args.urls)
    cases, expected = [], {}
    for n, storage in enumerate(("FILE", "S3")):
        urls = [rest_url(LAYERS[storage], r.col, r.row) for r in reads]
        expected.update(zip(urls, payloads, strict=True))
        case = Case(storage, "REST", urls)
        case.script = write_script(tmp / f"{storage.lower()}-rest.lua", urls, seed=n + 1)
        cases.append(case)
    trees = [("this tree", PROJECT)]
    if args.baseline is not None:
        trees.insert(0, ("baseline", args.baseline.resolve()))
    nginx = Nginx(layout.s3_root, binary=tools["nginx"]).start()
    servers: list[Server] = []
    runs: dict[tuple[str, str], Run] = {}
    load_before = os.getloadavg()
    profile_text = ""
    try:
        for label, tree in trees:
            server = start(label, tree, tmp, nginx, args.log_level, args.setting)
            servers.append(server)
            publish(server, layout, ["FILE", "S3"])
            check_and_warm([server], cases, expected, layout, args.urls)
            for case in cases:
                runs[label, case.storage] = Run(case, server, False)
        order = list(runs.values())
        for run in order:
            drive(run, args.warmup, args, tools["wrk"], nginx, record=False)
        seconds = args.seconds / args.rounds
        for round_no in range(args.rounds):
            print(f"  round {round_no + 1}/{args.rounds}", file=sys.stderr, flush=True)
            for run in (order if round_no % 2 == 0 else order[::-1]):
                drive(run, seconds, args, tools["wrk"], nginx)
        load_after = os.getloadavg()
        if args.profile:
            profile_text = profile(runs["this tree", "S3"], args.profile, args, tools["wrk"], tmp)
    finally:
        for server in servers:
            server.stop()
        nginx.stop()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    cli = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python benchmarks/bench_s3.py", *map(shlex.quote, map(str, cli))])
    print(f"\nCommand: `{command}` ({time.perf_counter() - started:.0f} s). Machine: {machine}. "
          f"Load average (1/5/15 min) at the start: {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after the measured rounds: {' '.join(f'{x:.2f}' for x in load_after)}. wrk -t{args.threads} -c{args.connections}, "
          f"{args.seconds:g} s per row in {args.rounds} interleaved rounds.\n")
    print(report(runs))
    if profile_text:
        print("\n--- py-spy profile ---\n" + profile_text)
    return 1 if any(run.errors for run in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
