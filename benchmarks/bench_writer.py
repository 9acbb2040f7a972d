"""Writer throughput (issue 4): `pyramid build` of a synthetic large source at 1 and N processes.

    .venv/bin/python benchmarks/bench_writer.py [--size 4096] [--processes N] [--compression jpg]

One run writes a synthetic RGB GeoTIFF (EPSG:2154, 1 m pixels, 512×512 deflate tiles, georeferenced by
GeoTIFF tags) into a temporary directory, then builds it into the PM grid (reprojected, bicubic,
16×16-tile slabs, bottom level chosen automatically, 4 levels) once per process count and reports
tiles/s (every encoded tile, all levels), output MB/s and source megapixels/s. The same source and
grid are then given to GDAL's gdal2tiles (XYZ PNG tiles, same levels, same process counts) when it
is installed; it is not on a bare machine, and the table says so. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import format_table, machine_summary  # noqa: E402

from tileserver.settings import Settings  # noqa: E402
from tileserver.storage import Storage  # noqa: E402
from tileserver.writer.build import build_async  # noqa: E402
from tileserver.writer.options import BuildOptions  # noqa: E402

X0, Y0 = 650000.0, 6860000.0  # top-left corner, Lambert-93 (Paris area)


def write_source(path: Path, size: int) -> None:
    """A textured RGB image (gradients, blobs, noise: compresses like an orthophoto, roughly)."""
    import tifffile

    rng = np.random.default_rng(42)
    rows = []
    for y in range(0, size, 512):
        h = min(512, size - y)
        yy, xx = np.mgrid[y : y + h, 0:size].astype(np.float32)
        base = 128 + 60 * np.sin(xx / 97.0) * np.cos(yy / 131.0)
        blobs = 40 * np.sin((xx + yy) / 23.0) * np.sin((xx - yy) / 41.0)
        rgb = np.stack([base + blobs, base - blobs / 2, base * 0.8 + 20], axis=2)
        rgb += rng.normal(0, 8, rgb.shape)
        rows.append(np.clip(rgb, 0, 255).astype(np.uint8))
    pixels = np.concatenate(rows)
    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 2154)
    tifffile.imwrite(path, pixels, tile=(512, 512), compression="zlib", photometric="rgb",
                     extratags=[(33550, "d", 3, (1.0, 1.0, 0.0)), (33922, "d", 6, (0, 0, 0, X0, Y0, 0)),
                                (34735, "H", len(geokeys), geokeys)])


def run_ours(source: Path, work: Path, processes: int, compression: str, levels: int) -> dict:
    out = work / f"out-{processes}"
    shutil.rmtree(out, ignore_errors=True)
    # bottom: automatic; top: `levels` levels up
    first = asyncio.run(build_probe(source))
    options = {"top": str(int(first) - levels + 1)}
    start = time.perf_counter()
    summary = asyncio.run(build_with(source, out, processes, compression, options))
    elapsed = time.perf_counter() - start
    tiles = summary["slabs"] * 256
    return {"elapsed": elapsed, "tiles": tiles, "bytes": summary["size"], "levels": summary["type_infos"]["levels"],
            "slabs": summary["slabs"]}


async def build_probe(source: Path) -> str:
    from tileserver.rok4.tms import load_tms
    from tileserver.writer.plan import select_levels
    from tileserver.writer.sources import open_source

    tms = load_tms("PM", Settings().tms_directory)
    return select_levels(tms, None, None, [open_source(source)])[0].id


async def build_with(source: Path, out: Path, processes: int, compression: str, extra: dict) -> dict:
    options = BuildOptions(tms="PM", compression=compression, interpolation="bicubic", parallelization=processes,
                           **extra)
    async with Storage(Settings()) as storage:
        return await build_async([str(source)], str(out), "BENCH", options, storage)


def run_gdal2tiles(source: Path, work: Path, processes: int, zooms: str) -> dict | None:
    command = shutil.which("gdal2tiles.py") or shutil.which("gdal2tiles")
    if command is None:
        return None
    out = work / f"gdal2tiles-{processes}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([command, "--xyz", "-p", "mercator", "-r", "cubic", "-z", zooms, f"--processes={processes}",
                    "-q", str(source), str(out)], check=True)
    elapsed = time.perf_counter() - start
    files = list(out.rglob("*.png"))
    return {"elapsed": elapsed, "tiles": len(files), "bytes": sum(f.stat().st_size for f in files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="source width and height in pixels")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2, help="N of the second run")
    parser.add_argument("--compression", default="jpg")
    parser.add_argument("--levels", type=int, default=4)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-writer-"))
    try:
        source = work / "source.tif"
        t0 = time.perf_counter()
        write_source(source, args.size)
        print(f"synthetic source {args.size}x{args.size} RGB written in {time.perf_counter() - t0:.1f} s "
              f"({source.stat().st_size / 1e6:.0f} MB)", file=sys.stderr)
        megapixels = args.size * args.size / 1e6
        rows = []
        counts = sorted({1, args.processes})
        levels = None
        for n in counts:
            r = run_ours(source, work, n, args.compression, args.levels)
            levels = r["levels"]
            rows.append([f"tileserver build, {n} process(es)", f"{r['elapsed']:.1f}", str(r["tiles"]),
                         f"{r['tiles'] / r['elapsed']:.0f}", f"{r['bytes'] / 1e6 / r['elapsed']:.1f}",
                         f"{megapixels / r['elapsed']:.1f}", str(r["slabs"])])
        zooms = f"{levels[0]}-{levels[-1]}" if levels else "?"
        for n in counts:
            g = run_gdal2tiles(source, work, n, zooms)
            if g is None:
                rows.append([f"gdal2tiles, {n} process(es)", "GDAL not installed", "", "", "", "", ""])
                continue
            rows.append([f"gdal2tiles, {n} process(es)", f"{g['elapsed']:.1f}", str(g["tiles"]),
                         f"{g['tiles'] / g['elapsed']:.0f}", f"{g['bytes'] / 1e6 / g['elapsed']:.1f}",
                         f"{megapixels / g['elapsed']:.1f}", "-"])
        print(f"\n{machine_summary()}\n")
        print("tiles = every encoded tile of every written slab (256 per 16x16 slab, all levels); "
              "output MB/s = pyramid bytes written per second.\n")
        print(f"Source {args.size}x{args.size} px RGB (EPSG:2154, 1 m) → PM levels {zooms}, "
              f"{args.compression}, bicubic, 16x16-tile slabs:\n")
        print(format_table(["run", "seconds", "tiles", "tiles/s", "output MB/s", "source Mpx/s", "slabs"], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
