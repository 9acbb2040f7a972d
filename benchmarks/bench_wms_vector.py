"""WMS-vector GetMap (issue 15 item 6): our renderer against MapServer on the same GeoPackage.

    .venv/bin/python benchmarks/bench_wms_vector.py [--rounds N] [--no-results]

The data: 100 000 polygons (80 m squares on a 100 m grid, 317 columns, EPSG:2154) in one GeoPackage
with an R-tree, attributes `nom` ("p<i>") and `kind` (i % 3), cached under
~/.cache/tileserver-bench/wms-vector. The style: 3 rules (`kind` = 0/1/2) filling red/green/blue
with a 1 px black outline, each labelling `nom` in DejaVu Sans 10 px with a 1 px white halo to the
right of the polygon's centre — as an SLD 1.0 for us, as the equivalent mapfile (3 CLASSes with
EXPRESSION, LABEL with OUTLINECOLOR/OUTLINEWIDTH, POSITION CR, OGR connection, AGG/PNG RGBA) for
MapServer 8 (`apt-get install -y mapserver-bin`, its `map2img` command line).

Three views of each size (256² and 1024² PNG): the whole layer (100 k polygons in the bbox), a
4 km square (~1 600) and a 1 km square (~100).

How the two are compared, per map:

- ours: `vector_map.render(...)` then `encode.encode_image(..., "image/png")` in this process, the
  way the WMS calls them (a warm map pool: one call first); the median of several calls, wall and
  CPU (`time.process_time`; mapnik draws on the calling thread);
- MapServer: `map2img -m bench.map -o out.png -s W H -e minx miny maxx maxy -c N` draws and writes
  the map N times in one process; one map's cost is (run with N) − (run with 1), divided by N − 1,
  which removes the process start and the mapfile load; wall and the child's CPU
  (`RUSAGE_CHILDREN`). `PROCESSING "CLOSE_CONNECTION=DEFER"` keeps its OGR connection open between
  draws, like a FastCGI mapserv would.

The two alternate in each round; each figure is the minimum over `--rounds` rounds (the least
disturbed by other jobs on the machine). The ratio is MapServer's CPU time over ours (> 1: we are
faster); CPU time is the steadier figure on a shared machine. As a check that both draw the same
thing, the share of pixels mostly of each fill colour (and of pixels drawn at all) is printed for
both images.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(PROJECT))

import numpy as np  # noqa: E402
from common import fmt, format_table, machine_summary, update_results  # noqa: E402

RESULTS = HERE / "RESULTS.md"
SECTION = "## WMS-vector GetMap vs MapServer (issue 15)"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tileserver-bench" / "wms-vector"
COUNT = 100_000
COLUMNS = 317
X0, Y0 = 600000.0, 6800000.0
COLOURS = ("#ff0000", "#00ff00", "#0000ff")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def make_data(path: Path) -> None:
    import shapely
    from pyogrio.raw import write

    index = np.arange(COUNT)
    x = X0 + (index % COLUMNS) * 100.0
    y = Y0 + (index // COLUMNS) * 100.0
    polygons = shapely.box(x, y, x + 80, y + 80)
    tmp = path.with_suffix(".tmp.gpkg")
    tmp.unlink(missing_ok=True)
    write(tmp, np.array(shapely.to_wkb(polygons), dtype=object),
          [np.array([f"p{i}" for i in index], dtype=object), (index % 3).astype(np.int64)], ["nom", "kind"],
          layer="parcels", driver="GPKG", geometry_type="Polygon", crs="EPSG:2154")
    tmp.replace(path)


def sld_document() -> bytes:
    rules = "".join(
        f"""<Rule><Name>kind{k}</Name><ogc:Filter><ogc:PropertyIsEqualTo><ogc:PropertyName>kind</ogc:PropertyName>
        <ogc:Literal>{k}</ogc:Literal></ogc:PropertyIsEqualTo></ogc:Filter>
        <PolygonSymbolizer><Fill><CssParameter name="fill">{colour}</CssParameter></Fill><Stroke>
        <CssParameter name="stroke">#000000</CssParameter><CssParameter name="stroke-width">1</CssParameter></Stroke>
        </PolygonSymbolizer><TextSymbolizer><Label><ogc:PropertyName>nom</ogc:PropertyName></Label><Font>
        <CssParameter name="font-family">DejaVu Sans</CssParameter><CssParameter name="font-size">10</CssParameter>
        </Font><LabelPlacement><PointPlacement><AnchorPoint><AnchorPointX>0</AnchorPointX><AnchorPointY>0.5
        </AnchorPointY></AnchorPoint></PointPlacement></LabelPlacement><Halo><Radius>1</Radius><Fill>
        <CssParameter name="fill">#ffffff</CssParameter></Fill></Halo><Fill><CssParameter name="fill">#000000
        </CssParameter></Fill></TextSymbolizer></Rule>""" for k, colour in enumerate(COLOURS))
    return f"""<StyledLayerDescriptor version="1.0.0" xmlns="http://www.opengis.net/sld"
      xmlns:ogc="http://www.opengis.net/ogc"><NamedLayer><Name>parcels</Name><UserStyle><FeatureTypeStyle>
      {rules}</FeatureTypeStyle></UserStyle></NamedLayer></StyledLayerDescriptor>""".encode()


def mapfile(gpkg: Path, fonts: Path) -> str:
    classes = "".join(
        f"""    CLASS
      EXPRESSION "{k}"
      STYLE COLOR {' '.join(str(int(c[i:i + 2], 16)) for i in (1, 3, 5))} OUTLINECOLOR 0 0 0 WIDTH 1 END
      LABEL TYPE TRUETYPE FONT "dejavu" SIZE 10 COLOR 0 0 0 OUTLINECOLOR 255 255 255 OUTLINEWIDTH 1 POSITION CR END
    END
""" for k, c in enumerate(COLOURS))
    return f"""MAP
  SIZE 256 256
  EXTENT {X0} {Y0} {X0 + COLUMNS * 100} {Y0 + COLUMNS * 100}
  PROJECTION "init=epsg:2154" END
  FONTSET "{fonts}"
  OUTPUTFORMAT NAME "png" DRIVER AGG/PNG MIMETYPE "image/png" IMAGEMODE RGBA TRANSPARENT ON EXTENSION "png" END
  IMAGETYPE "png"
  LAYER
    NAME "parcels"
    TYPE POLYGON
    STATUS DEFAULT
    CONNECTIONTYPE OGR
    CONNECTION "{gpkg}"
    DATA "parcels"
    PROCESSING "CLOSE_CONNECTION=DEFER"
    PROJECTION "init=epsg:2154" END
    CLASSITEM "kind"
    LABELITEM "nom"
{classes}  END
END
"""


def views() -> list[tuple[str, tuple[float, float, float, float]]]:
    rows = -(-COUNT // COLUMNS)
    centre_x, centre_y = X0 + COLUMNS * 50, Y0 + rows * 50
    return [("whole layer (100 k)", (X0, Y0, X0 + COLUMNS * 100, Y0 + rows * 100)),
            ("4 km (~1 600)", (centre_x - 2000, centre_y - 2000, centre_x + 2000, centre_y + 2000)),
            ("1 km (~100)", (centre_x - 500, centre_y - 500, centre_x + 500, centre_y + 500))]


def colour_shares(png: bytes) -> str:
    from io import BytesIO

    from PIL import Image

    rgba = np.asarray(Image.open(BytesIO(png)).convert("RGBA")).astype(np.int16)
    drawn = rgba[..., 3] > 0
    shares = []
    for channel in range(3):  # red, green, blue fills, also where antialiased or mixed with outlines
        others = [c for c in range(3) if c != channel]
        mostly = (rgba[..., channel] > 96) & (rgba[..., channel] > 2 * rgba[..., others].max(axis=2)) & drawn
        shares.append(float(mostly.mean()))
    return "/".join(f"{100 * s:.0f}" for s in shares) + f" ({100 * drawn.mean():.0f})"


def time_ours(path: Path, layers: list, bbox: tuple[float, ...], size: int, seconds: float) -> tuple[float, float, bytes]:
    from tileserver.render.encode import encode_image
    from tileserver.render.vector_map import render

    def once() -> bytes:
        return encode_image(render(path, layers, bbox, "EPSG:2154", size, size), "image/png")[0]

    png = once()  # warm: the map is loaded into the pool
    walls, cpus = [], []
    deadline = time.perf_counter() + seconds
    while len(walls) < 3 or (time.perf_counter() < deadline and len(walls) < 50):
        wall, cpu = time.perf_counter(), time.process_time()
        once()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), png


def run_map2img(command: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def time_mapserver(map2img: str, mapfile_path: Path, bbox: tuple[float, ...], size: int, draws: int,
                   out: Path) -> tuple[float, float, bytes]:
    base = [map2img, "-m", str(mapfile_path), "-o", str(out), "-s", str(size), str(size), "-e",
            *(repr(v) for v in bbox)]
    one = run_map2img([*base, "-c", "1"])
    many = run_map2img([*base, "-c", str(draws)])
    return (max(0.0, (many[0] - one[0]) / (draws - 1)), max(0.0, (many[1] - one[1]) / (draws - 1)),
            out.read_bytes())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds (each figure is the minimum)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of calls of ours a measure")
    parser.add_argument("--no-results", action="store_true", help=f"do not write {RESULTS.name}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    map2img = shutil.which("map2img")
    if map2img is None:
        print("map2img missing: apt-get install -y mapserver-bin", file=sys.stderr)
        return 1
    version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "mapserver-bin"], capture_output=True,
                             text=True).stdout.strip() or "?"
    from tileserver.render import sld
    from tileserver.render.vector_map import VectorLayer
    from tileserver.vector.geopackage import GeoPackageBase

    CACHE.mkdir(parents=True, exist_ok=True)
    gpkg = CACHE / f"parcels-{COUNT}.gpkg"
    if not gpkg.exists():
        make_data(gpkg)
    summary = machine_summary()
    work = Path(tempfile.mkdtemp(prefix="bench-wms-vector-"))
    try:
        fonts = work / "fonts.txt"
        fonts.write_text(f"dejavu {FONT}\n")
        mapfile_path = work / "bench.map"
        mapfile_path.write_text(mapfile(gpkg, fonts))
        base = GeoPackageBase(gpkg)
        layers = [VectorLayer(base.relation("parcels"), sld.parse(sld_document()))]  # type: ignore[arg-type]
        best: dict[tuple[int, str], dict[str, float]] = {}
        shares: dict[tuple[int, str], tuple[str, str]] = {}
        for round_ in range(args.rounds):
            for size in (256, 1024):
                for name, bbox in views():
                    ours = time_ours(gpkg, layers, bbox, size, args.seconds)
                    draws = 3 if name.startswith("whole") else 6
                    theirs = time_mapserver(map2img, mapfile_path, bbox, size, draws, work / "out.png")
                    key = (size, name)
                    figures = {"ours_wall": ours[0], "ours_cpu": ours[1], "ms_wall": theirs[0], "ms_cpu": theirs[1]}
                    previous = best.get(key)
                    best[key] = figures if previous is None else {k: min(v, previous[k]) for k, v in figures.items()}
                    shares[key] = (colour_shares(ours[2]), colour_shares(theirs[2]))
                    print(f"round {round_ + 1} {size}² {name}: ours {ours[0] * 1000:.0f} ms wall "
                          f"{ours[1] * 1000:.0f} ms CPU; MapServer {theirs[0] * 1000:.0f} ms wall "
                          f"{theirs[1] * 1000:.0f} ms CPU", file=sys.stderr)
        rows = []
        for (size, name), f in best.items():
            ratio = f["ms_cpu"] / f["ours_cpu"] if f["ours_cpu"] else float("nan")
            rows.append([f"{size}²", name, fmt(f["ours_wall"] * 1000, 0), fmt(f["ours_cpu"] * 1000, 0),
                         fmt(f["ms_wall"] * 1000, 0), fmt(f["ms_cpu"] * 1000, 0), f"{ratio:.2f}×",
                         f"{shares[(size, name)][0]} · {shares[(size, name)][1]}"])
        table = format_table(["size", "view", "ours wall ms", "ours CPU ms", "MapServer wall ms",
                              "MapServer CPU ms", "CPU ratio MapServer ÷ ours", "% red/green/blue (drawn) ours · MapServer"],
                             rows, "llrrrrrl")
        report = (f"Command: `.venv/bin/python benchmarks/bench_wms_vector.py --rounds {args.rounds}` — "
                  f"MapServer {version} (`map2img`, Debian), mapnik {_mapnik_version()} (PyPI wheel); {summary}.\n"
                  f"Per map, PNG included, minimum over {args.rounds} rounds (see the script's docstring for "
                  "how each side is timed).\n\n" + table)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report)
    if not args.no_results:
        update_results(RESULTS, SECTION, report, "bench_wms_vector.py")
        print(f"\n(written to {RESULTS.relative_to(PROJECT)}, section {SECTION!r})", file=sys.stderr)
    return 0


def _mapnik_version() -> str:
    from importlib.metadata import version

    return version("mapnik")


if __name__ == "__main__":
    sys.exit(main())
