"""Measure (not a test): the vector pyramid processing ("Calcul de pyramide vecteur", issue 14).

    .venv/bin/python benchmarks/bench_vector_pyramid.py [--workdir DIR] [--points N] [--polygons N]
        [--top Z] [--bottom Z] [--options "-ac -an -S10"] [--parallelization 1,2] [--no-results]
        [--pack TILES_DIR]   (only the packing of a kept tippecanoe output, with --workdir)

A seeded synthetic GeoPackage in Lambert 93 (EPSG:2154, as producers' bases are) holding a
`points` table (1 M points by default) and a `polygons` table (100 k octagons), over a 150 km square
around Paris; each table is built into a PM vector pyramid to level 14 with the writer function the
processing runs (`build_vector_pyramid`: export → tippecanoe → slab packing, descriptor last), then
tippecanoe alone is run on the very GeoJSON text sequence the export wrote, with the same options:
our share is the build's time outside tippecanoe (export, packing, temporary files); tippecanoe alone
shows how much the machine's load moved tippecanoe's own time between the two runs. Each at every `--parallelization` value. When
`ogr2ogr` is on PATH, 4ALAMO's export (ogr2ogr to GeoJSON, reprojected) is timed for comparison.
Writes its section of RESULTS.md unless `--no-results`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyogrio.raw
import shapely
from pyproj import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table, machine_summary, update_results  # noqa: E402

from tileserver.settings import load_settings  # noqa: E402
from tileserver.vector.geopackage import GeoPackageBase  # noqa: E402
from tileserver.writer.vector_pyramid import (  # noqa: E402
    Composition,
    VectorPyramidOptions,
    build_vector_pyramid,
    export,
    parse_area,
    plan,
    tippecanoe_command,
)

SECTION = "## Vector pyramids (issue 14)"
WEST, SOUTH, EAST, NORTH = 1.35, 48.20, 3.40, 49.55  # ~150 km around Paris


def make_base(path: Path, points: int, polygons: int, seed: int = 14) -> None:
    """Both tables, seeded; coordinates drawn in lon/lat, stored in Lambert 93."""
    rng = np.random.default_rng(seed)
    to_l93 = Transformer.from_crs("EPSG:4326", "EPSG:2154", always_xy=True)
    x, y = to_l93.transform(rng.uniform(WEST, EAST, points), rng.uniform(SOUTH, NORTH, points))
    geoms = shapely.points(x, y)
    pyogrio.raw.write(path, shapely.to_wkb(geoms),
                      [np.arange(points, dtype=np.int64), np.array([f"pt {i}" for i in range(points)], dtype=object),
                       rng.uniform(0, 100, points)],
                      ["n", "name", "value"], layer="points", driver="GPKG", geometry_type="Point", crs="EPSG:2154")
    x, y = to_l93.transform(rng.uniform(WEST, EAST, polygons), rng.uniform(SOUTH, NORTH, polygons))
    shapes = shapely.buffer(shapely.points(x, y), rng.uniform(20.0, 150.0, polygons), quad_segs=2)  # octagons
    pyogrio.raw.write(path, shapely.to_wkb(shapes),
                      [np.arange(polygons, dtype=np.int64), np.array([f"pg {i}" for i in range(polygons)], dtype=object),
                       rng.uniform(0, 100, polygons)],
                      ["n", "name", "value"], layer="polygons", driver="GPKG", geometry_type="Polygon", crs="EPSG:2154",
                      append=True)


def timed_build(base: Path, out: Path, table: str, options: VectorPyramidOptions) -> dict[str, float]:
    """The writer function's wall time and its phases, read from its own log lines."""
    messages: list[str] = []
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = build_vector_pyramid(base, str(out), table, options, settings=load_settings(env={}),
                                   emit=messages.append)
    total = time.perf_counter() - started
    phases = {"total": total, "slabs": float(summary["slabs"])}
    for key, pattern in (("export", r"exported .* in ([\d.]+) s"), ("tippecanoe", r"^tippecanoe done in ([\d.]+) s"),
                         ("packing", r"^packed .* in ([\d.]+) s")):
        phases[key] = sum(float(m.group(1)) for line in messages if (m := re.search(pattern, line)))
    return phases


def tippecanoe_alone(geojsons: Path, layer: str, out: Path, top: int, bottom: int, options: list[str],
                     parallelization: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    command = tippecanoe_command([(layer, geojsons)], out, top, bottom, options, parallelization)
    env = dict(os.environ, TIPPECANOE_MAX_THREADS=str(parallelization))
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def pack_only(tiles: Path, work: Path, top: int, bottom: int, parallelizations: list[int]) -> list[str]:
    """The packing step alone over a tippecanoe output directory (`-e`), as the writer runs it."""
    import asyncio

    from tileserver.storage import Storage
    from tileserver.writer.target import PyramidTarget
    from tileserver.writer.vector_pyramid import _pack

    settings = load_settings(env={})
    base = GeoPackageBase(next(work.glob("base-*.gpkg")))
    try:
        from tileserver.writer.build import load_grid

        tms = load_grid("PM", settings.tms_directory)
        [p] = plan(base, tms, VectorPyramidOptions((Composition("points", str(top), str(bottom)),)))
    finally:
        base.close()
    out = []
    for par in parallelizations:
        shutil.rmtree(work / "packed", ignore_errors=True)
        options = VectorPyramidOptions((p.item,), parallelization=par)

        async def run(options: VectorPyramidOptions = options) -> dict:
            async with Storage(settings) as storage:
                return await _pack(storage, PyramidTarget.make(str(work / "packed"), "P"), tms, [(p, None)], tiles,
                                   top, bottom, options, True, lambda m: None)

        started = time.perf_counter()
        summary = asyncio.run(run())
        count = sum(1 for _ in tiles.rglob("*.pbf"))
        out.append(f"packing alone, parallelization {par}: {count} tiles into {summary['slabs']} slabs in "
                   f"{time.perf_counter() - started:.1f} s")
        print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--polygons", type=int, default=100_000)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--bottom", type=int, default=14)
    parser.add_argument("--options", default="-ac -an -S10", help="tippecanoe_options (a cartes.gouv.fr preset)")
    parser.add_argument("--parallelization", default="1,2")
    parser.add_argument("--tables", default="polygons,points")
    parser.add_argument("--no-results", action="store_true")
    parser.add_argument("--pack", type=Path, help="only time the packing of this tippecanoe -e directory "
                        "(of the points table) at each parallelization")
    args = parser.parse_args()
    if args.pack:
        pack_only(args.pack, args.workdir, args.top, args.bottom, [int(v) for v in args.parallelization.split(",")])
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-vector-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"base-{args.points}-{args.polygons}.gpkg"
    if not base.exists():
        started = time.perf_counter()
        make_base(base, args.points, args.polygons)
        print(f"base written in {time.perf_counter() - started:.1f} s: {base}", flush=True)
    machine = machine_summary()
    levels = [str(args.top), str(args.bottom)]
    rows, notes = [], []
    from tileserver.writer.vector_pyramid import tippecanoe_options as parse_options

    arguments = parse_options(args.options)
    for table in args.tables.split(","):
        count = args.points if table == "points" else args.polygons
        # the very GeoJSON our export writes, for tippecanoe alone
        reader = GeoPackageBase(base)
        try:
            from tileserver.writer.build import load_grid

            [p] = plan(reader, load_grid("PM", load_settings(env={}).tms_directory), VectorPyramidOptions((Composition(table, *levels),)))
            geojsons = work / f"{table}.geojsons"
            started = time.perf_counter()
            export(reader, p, parse_area(""), geojsons)
            print(f"{table}: export alone {time.perf_counter() - started:.1f} s", flush=True)
        finally:
            reader.close()
        if shutil.which("ogr2ogr"):
            target = work / f"{table}-ogr.geojson"
            target.unlink(missing_ok=True)
            started = time.perf_counter()
            subprocess.run(["ogr2ogr", "-f", "GeoJSONSeq", "-t_srs", "EPSG:4326", str(target), str(base), table],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            notes.append(f"{table}: ogr2ogr -f GeoJSONSeq -t_srs EPSG:4326 (4ALAMO's export) "
                         f"{time.perf_counter() - started:.1f} s")
            print(notes[-1], flush=True)
        for par in (int(v) for v in args.parallelization.split(",")):
            options = VectorPyramidOptions((Composition(table, *levels),), tippecanoe_options=args.options,
                                           parallelization=par)
            load = os.getloadavg()[0]
            ours = timed_build(base, work / "out", table, options)
            print(f"{table} P={par}: ours {ours}", flush=True)
            alone = tippecanoe_alone(geojsons, table, work / "alone", args.top, args.bottom, arguments, par)
            print(f"{table} P={par}: tippecanoe alone {alone:.1f} s", flush=True)
            share = ours["total"] - ours["tippecanoe"]  # export, packing, files: what is not tippecanoe's
            rows.append([f"{count:,} {table}", par, f"{load:.1f}", f"{ours['total']:.1f}", f"{ours['export']:.1f}",
                         f"{ours['tippecanoe']:.1f}", f"{ours['packing']:.1f}", f"{int(ours['slabs'])}",
                         f"{count / ours['total']:,.0f}", f"{alone:.1f}", f"{count / alone:,.0f}",
                         f"{share:.1f} ({100 * share / ours['total']:.0f} %)"])
    table_text = format_table(
        ["table", "parallelization", "load before", "ours s", "export s", "tippecanoe s", "packing s", "slabs",
         "ours features/s", "tippecanoe alone s", "alone features/s", "our share s (not tippecanoe)"], rows)
    text = (f"Command: `.venv/bin/python benchmarks/bench_vector_pyramid.py "
            f"--points {args.points} --polygons {args.polygons} --top {args.top} --bottom {args.bottom} "
            f"--options '{args.options}' --parallelization {args.parallelization}` — a seeded GeoPackage in "
            f"EPSG:2154 over a 150 km square, built into PM levels {args.top}–{args.bottom} (16×16-tile slabs, on "
            f"disk) by `build_vector_pyramid` (the processing's code path), then tippecanoe alone on the GeoJSON "
            f"text sequence the export wrote, same options (`TIPPECANOE_MAX_THREADS` and `-P` from "
            f"parallelization). {machine}.\n\n{table_text}\n\n" + "".join(f"- {n}\n" for n in notes))
    print(text)
    if not args.no_results:
        update_results(Path(__file__).parent / "RESULTS.md", SECTION, text, "bench_vector_pyramid.py")


if __name__ == "__main__":
    main()
