"""The "Vérification vecteur" of a VECTOR upload: are the delivered files readable, and what do they hold?

The platform's check "contrôle que les fichiers sont bien lisibles et en extrait l'étendue". Here it
finds the data sets among the pushed files (a GeoPackage of several tables, a shapefile pushed as
`.shp/.shx/.dbf/.prj/.cpg` siblings, GeoJSON, FlatGeobuf, CSV with its `.csvt`, zips of any of
these), reads every feature of every layer in bounded batches through pyogrio (GDAL), decodes every
geometry, and records per layer what the integration and the services need: names (as delivered and
normalised), geometry type, count, attributes, CRS, extent. Reading everything is the point: a
shapefile truncated by one byte has a plausible header and a sane feature count; only reading its
last record shows the damage (GDAL's `Error in fread()`, made a failure by `gdalerrors`).

Files whose name ends in `.update.<ext>` or `.delete.<ext>` are change sets for an existing base
(see `integrate.py`); they are checked the same way and reported with their role.

Zips are extracted into the caller's `workdir` (which must outlive the integration that reads the
layers): at most `MAX_UNCOMPRESSED` bytes in all (a zip bomb stops there, whatever sizes the archive
declares), no member may leave the extraction directory, links are refused.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyogrio
import pyogrio.raw
import shapely
from pyproj import CRS
from pyproj.exceptions import CRSError

from tileserver import transformers
from tileserver.vector import gdalerrors
from tileserver.vector.base import Attribute
from tileserver.vector.names import normalise, normalise_all

MAX_UNCOMPRESSED = 2 * 1024**3  # all zips of one upload together; larger deliveries go unzipped
MAX_ZIP_MEMBERS = 100_000
MAX_ZIP_DEPTH = 2  # a zip in a zip is common (exports); deeper nesting is not
KEY = "fid"  # the primary key column of every base table
GEOMETRY = "geom"  # the geometry column of every base table
BATCH = 50_000  # features per read: ~10 MB of points, bounded whatever the layer's size

CSV_OPTIONS = {  # the platform's CSV geometry columns (VECTOR.md §1.1)
    "GEOM_POSSIBLE_NAMES": "wkt,geom,the_geom,json,wkb",
    "X_POSSIBLE_NAMES": "x,lon,longitude",
    "Y_POSSIBLE_NAMES": "y,lat,latitude",
    "KEEP_GEOM_COLUMNS": "NO",
    "AUTODETECT_TYPE": "YES",  # ignored by GDAL when a .csvt gives the types
    "EMPTY_STRING_AS_NULL": "YES",
}
DATA_SUFFIXES = {".gpkg", ".shp", ".geojson", ".json", ".csv", ".fgb"}
SHAPEFILE_SIBLINGS = {".shx", ".dbf", ".prj", ".cpg", ".qpj", ".sbn", ".sbx", ".qix", ".xml", ".cst"}
ROLES = ("update", "delete")

_OGR_TYPES = {
    "OFTInteger": "integer", "OFTInteger64": "integer", "OFTReal": "real", "OFTString": "string",
    "OFTDate": "date", "OFTDateTime": "datetime", "OFTBinary": "binary", "OFTTime": "string",
}


class DeliveryError(Exception):
    """A delivered file cannot be read; the message names the file and the reason."""


@dataclass(frozen=True)
class Layer:
    """One layer of a delivered data set, as read and checked."""

    source: str  # the file as delivered ("data/roads.zip!roads.shp"), for messages
    path: str  # the file GDAL opens (inside workdir for zip members)
    name: str  # the layer's name in the file
    table: str  # the normalised table name in the base (for change sets: the table they change)
    role: str  # "load", "update" or "delete"
    geometry_type: str | None  # OGC name seen in the data ("Point", "MultiPolygon", "Geometry"); None: no geometry
    has_z: bool
    count: int
    fields: tuple[str, ...]  # attribute names as delivered, in file order (without key_field)
    attributes: tuple[Attribute, ...]  # the same, normalised, with their types
    srs: str  # "EPSG:2154", or the WKT when the CRS has no authority code
    extent: tuple[float, float, float, float] | None  # in `srs`
    extent_4326: tuple[float, float, float, float] | None
    open_options: dict[str, str] = field(default_factory=dict)
    key_field: str | None = None  # an integer column named "fid" (any case): the features' keys
    persistent_fids: bool = False  # GDAL's FIDs are the producer's (GeoPackage), not row numbers


@dataclass
class DeliveryReport:
    ok: bool
    problems: list[str]
    layers: list[Layer]
    extent: tuple[float, float, float, float] | None  # EPSG:4326, over every layer
    srs: str | None  # the upload's declared srs


# --- finding the data sets ---------------------------------------------------------------------


def _safe_member(name: str) -> PurePosixPath | None:
    """The member's relative path, or None when it would land outside the extraction directory."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        return None
    return p


def _extract(archive: Path, dest: Path, budget: list[int], display: str, problems: list[str]) -> list[tuple[Path, str]]:
    """Members of `archive` copied under `dest`, streaming and counting bytes against `budget`."""
    out: list[tuple[Path, str]] = []
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        problems.append(f"{display}: not a readable zip archive ({e})")
        return out
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            problems.append(f"{display}: {len(infos)} members, more than {MAX_ZIP_MEMBERS}")
            return out
        for info in infos:
            if info.is_dir():
                continue
            rel = _safe_member(info.filename)
            if rel is None:
                problems.append(f"{display}: member {info.filename!r} escapes the archive's directory")
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                problems.append(f"{display}: member {info.filename!r} is a link")
                continue
            if rel.parts[0] == "__MACOSX" or rel.name.startswith("."):
                continue
            target = dest.joinpath(*rel.parts)
            if not target.resolve().is_relative_to(dest.resolve()):
                problems.append(f"{display}: member {info.filename!r} escapes the archive's directory")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        budget[0] -= len(chunk)
                        if budget[0] < 0:
                            raise DeliveryError(
                                f"{display}: more than {MAX_UNCOMPRESSED} bytes once uncompressed; refused")
                        dst.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
                problems.append(f"{display}: member {info.filename!r} cannot be extracted ({e})")
                continue
            out.append((target, f"{display}!{rel.as_posix()}"))
    return out


def _expand(files: Sequence[tuple[Path, str]], workdir: Path, budget: list[int], problems: list[str],
            depth: int = 0) -> list[tuple[Path, str]]:
    """Delivered files with zips replaced by their members."""
    out: list[tuple[Path, str]] = []
    for path, display in files:
        if path.suffix.lower() != ".zip":
            out.append((path, display))
            continue
        if depth >= MAX_ZIP_DEPTH:
            problems.append(f"{display}: zips nested more than {MAX_ZIP_DEPTH} deep")
            continue
        dest = Path(tempfile.mkdtemp(prefix=f"{normalise(path.stem)}_", dir=workdir))
        members = _extract(path, dest, budget, display, problems)
        out.extend(_expand(members, workdir, budget, problems, depth + 1))
    return out


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".xml" if name.endswith(".shp.xml") else path.suffix.lower()


def _role(path: Path) -> tuple[str, str]:
    """("update"|"delete"|"load", stem without the role): `roads.update.gpkg` → ("update", "roads")."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    for role in ROLES:
        if stem.lower().endswith("." + role):
            return role, stem[: -len(role) - 1]
    return "load", stem


def _datasets(files: list[tuple[Path, str]], problems: list[str]) -> list[tuple[Path, str]]:
    """The files GDAL should open: data files, shapefiles once their mandatory siblings are there."""
    by_stem: dict[tuple[Path, str], set[str]] = {}
    for path, _ in files:
        by_stem.setdefault((path.parent, path.name[: -len(path.suffix)].lower()), set()).add(_suffix(path))
    out = []
    for path, display in files:
        suffix = _suffix(path)
        stem = (path.parent, path.name[: -len(path.suffix)].lower())
        if suffix == ".xml":
            stem = (path.parent, path.name[: -len(".shp.xml")].lower())
        if suffix == ".shp":
            missing = [s for s in (".shx", ".dbf") if s not in by_stem[stem]]
            if missing:
                problems.append(f"{display}: shapefile without its {' and '.join(missing)}")
                continue
        if suffix in DATA_SUFFIXES:
            out.append((path, display))
        elif suffix in SHAPEFILE_SIBLINGS:
            if ".shp" not in by_stem.get(stem, ()) and not (suffix == ".prj" and by_stem.get(stem, set()) & {".csv"}):
                problems.append(f"{display}: shapefile part without its .shp")
        elif suffix == ".csvt":
            if ".csv" not in by_stem.get(stem, ()):
                problems.append(f"{display}: .csvt without its .csv")
        elif suffix == ".sql":
            problems.append(f"{display}: SQL deliveries are not supported by a GeoPackage base")
        elif suffix == ".md5":
            continue
        else:
            problems.append(f"{display}: unsupported file type {suffix or '(no extension)'!r}")
    return out


# --- reading -------------------------------------------------------------------------------------


def srs_name(crs: CRS) -> str:
    """"EPSG:2154" when the CRS has an authority code (a shapefile's ESRI WKT usually does), else WKT."""
    auth = crs.to_authority(min_confidence=70)
    return f"{auth[0]}:{auth[1]}" if auth else crs.to_wkt()


def same_crs(a: CRS, b: CRS) -> bool:
    if a.equals(b, ignore_axis_order=True):
        return True
    auth_a, auth_b = a.to_authority(min_confidence=70), b.to_authority(min_confidence=70)
    return auth_a is not None and auth_a == auth_b


def iter_batches(layer: Layer, *, batch: int = BATCH, columns: Sequence[str] | None = None,
                 fids: bool = False) -> Iterator[tuple[np.ndarray | None, np.ndarray | None, list[np.ndarray]]]:
    """(fids, WKB geometries, field arrays) of `layer` in batches of at most `batch` features.

    A GDAL failure during a read raises DeliveryError naming the file: pyogrio alone would return
    the damaged features with null geometries."""
    skip = 0
    while True:
        with gdalerrors.collect() as errors:
            try:
                meta, fid, geom, data = pyogrio.raw.read(
                    layer.path, layer=layer.name, skip_features=skip, max_features=batch,
                    columns=list(columns) if columns is not None else None, return_fids=fids,
                    **layer.open_options)
            except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, ValueError) as e:
                raise DeliveryError(f"{layer.source}: layer {layer.name!r} cannot be read ({e})") from e
        if errors:
            raise DeliveryError(f"{layer.source}: layer {layer.name!r}: {errors[0]}")
        if columns is not None:  # GDAL returns fields in file order, callers want theirs
            position = {str(name): i for i, name in enumerate(meta["fields"])}
            data = [data[position[c]] for c in columns]
        n = len(geom) if geom is not None else (len(data[0]) if data else len(fid) if fid is not None else 0)
        if n == 0:
            return
        yield fid, geom, data
        skip += n
        if n < batch:
            return


def _geometry_type(types: set[str]) -> str | None:
    """One OGC type for the layer: a mix of X and MultiX is MultiX (promoted at integration)."""
    if not types:
        return None
    if len(types) == 1:
        return next(iter(types))
    multis = {t if t.startswith("Multi") else "Multi" + t for t in types}
    if len(multis) == 1 and "MultiGeometryCollection" not in multis:
        return next(iter(multis))
    return "Geometry"


def _gdal_geometry_type(name: str | None) -> str | None:
    if not name or name == "Unknown":
        return None
    base = name.replace(" Z", "").replace(" M", "").replace("25D", "").strip()
    return {"Unknown": None, "None": None}.get(base, base)


def _scan_layer(layer: Layer, declared: CRS | None, read_features: bool) -> Layer:
    """The layer with its CRS checked and its count, geometry type and extent measured."""
    with gdalerrors.collect() as errors:
        try:
            info = pyogrio.read_info(layer.path, layer=layer.name, force_feature_count=True, **layer.open_options)
        except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError) as e:
            raise DeliveryError(f"{layer.source}: cannot be opened ({e})") from e
    if errors:
        raise DeliveryError(f"{layer.source}: layer {layer.name!r}: {errors[0]}")
    if info.get("crs"):
        try:
            crs = CRS.from_user_input(info["crs"])
        except CRSError as e:
            raise DeliveryError(f"{layer.source}: layer {layer.name!r} has an unreadable CRS ({e})") from e
        if declared is not None and not same_crs(crs, declared):
            raise DeliveryError(
                f"{layer.source}: layer {layer.name!r} is in {srs_name(crs)[:80]}, the upload declares "
                f"{srs_name(declared)}")
    elif declared is not None:
        crs = declared
    else:
        raise DeliveryError(f"{layer.source}: layer {layer.name!r} has no CRS and the upload declares none")

    fields, types, key_field = [], [], None
    for name, ogr_type, subtype in zip(info["fields"], info["ogr_types"], info["ogr_subtypes"], strict=True):
        kind = "boolean" if subtype == "OFSTBoolean" else _OGR_TYPES.get(ogr_type, "string")
        if key_field is None and kind == "integer" and normalise(str(name)) == KEY:
            key_field = str(name)  # the delivered key becomes the base's primary key
            continue
        fields.append(str(name))
        types.append(kind)
    normalised = normalise_all(fields, taken={KEY, GEOMETRY})
    attributes = tuple(Attribute(n, t) for n, t in zip(normalised, types, strict=True))

    count, seen, has_z = 0, set(), False
    bounds = np.array([np.inf, np.inf, -np.inf, -np.inf])
    if read_features:
        for _, geom, data in iter_batches(layer):
            n = len(geom) if geom is not None else len(data[0])
            count += n
            if geom is None:
                continue
            try:
                geoms = shapely.from_wkb(geom, on_invalid="raise")
            except shapely.errors.GEOSException as e:
                raise DeliveryError(f"{layer.source}: layer {layer.name!r}: unreadable geometry near feature "
                                    f"{count - n} ({e})") from e
            present = geoms[~shapely.is_missing(geoms) & ~shapely.is_empty(geoms)]
            if len(present):
                seen.update(shapely.get_type_id(present).tolist())
                has_z = has_z or bool(shapely.has_z(present).any())
                b = shapely.bounds(present)
                bounds = np.concatenate([np.minimum(bounds[:2], b[:, :2].min(axis=0)),
                                         np.maximum(bounds[2:], b[:, 2:].max(axis=0))])
        if info["features"] >= 0 and count != info["features"]:
            raise DeliveryError(f"{layer.source}: layer {layer.name!r} announces {info['features']} features, "
                                f"{count} could be read")
        geometry_type = _geometry_type({_SHAPELY_TYPES[t] for t in seen}) or _gdal_geometry_type(info["geometry_type"])
    else:
        count = max(info["features"], 0)
        geometry_type = _gdal_geometry_type(info["geometry_type"])
        has_z = " Z" in (info["geometry_type"] or "") or "25D" in (info["geometry_type"] or "")
        if info.get("total_bounds") is not None:
            bounds = np.array(info["total_bounds"], dtype=float)
    if info.get("geometry_type") is None and not seen:
        geometry_type = None

    extent = extent_4326 = None
    if np.isfinite(bounds).all():
        minx, miny, maxx, maxy = (float(v) for v in bounds)
        extent = (minx, miny, maxx, maxy)
        try:
            t = transformers.transformer(crs, "EPSG:4326")
            extent_4326 = t.transform_bounds(minx, miny, maxx, maxy, densify_pts=21)
        except Exception as e:  # pyproj raises ProjError and plain errors alike for impossible transforms
            raise DeliveryError(f"{layer.source}: layer {layer.name!r}: extent cannot be expressed in "
                                f"EPSG:4326 ({e})") from e
        if not np.isfinite(extent_4326).all():
            raise DeliveryError(f"{layer.source}: layer {layer.name!r}: extent {extent} is outside "
                                f"{srs_name(crs)}'s domain")
    return Layer(layer.source, layer.path, layer.name, layer.table, layer.role, geometry_type, has_z, count,
                 tuple(fields), attributes, srs_name(crs), extent, extent_4326, layer.open_options, key_field,
                 info.get("driver") == "GPKG")


_SHAPELY_TYPES = {0: "Point", 1: "LineString", 2: "LineString", 3: "Polygon", 4: "MultiPoint",
                  5: "MultiLineString", 6: "MultiPolygon", 7: "GeometryCollection"}


def _layers_of(path: Path, display: str) -> list[Layer]:
    """The layers of one data file, with provisional table names."""
    role, stem = _role(path)
    options = dict(CSV_OPTIONS) if path.suffix.lower() == ".csv" else {}
    with gdalerrors.collect() as errors:
        try:
            names = [str(row[0]) for row in pyogrio.list_layers(path)]
        except pyogrio.errors.DataSourceError as e:
            raise DeliveryError(f"{display}: cannot be opened ({e})") from e
    if errors:
        raise DeliveryError(f"{display}: {errors[0]}")
    multi = path.suffix.lower() == ".gpkg"
    out = []
    for name in names:
        table = name if multi else stem
        out.append(Layer(display, str(path), name, table, role, None, False, 0, (), (), "", None, None, options))
    return out


def check_delivery(files: Sequence[str | os.PathLike[str]], srs: str | None, workdir: str | os.PathLike[str],
                   *, names: Sequence[str] | None = None, read_features: bool = True) -> DeliveryReport:
    """Check the files of a VECTOR upload and describe its layers.

    `files` are on local disk; `names` are how they were delivered ("data/roads.shp"), for messages
    (default: the paths). `srs` is the upload's declared CRS: a layer without one takes it, a layer
    with another fails. `workdir` receives extracted zips and must outlive any integration of the
    report's layers. `read_features=False` trusts headers (counts, extents): for an integration
    that reads every feature anyway, never for the check itself."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    declared = None
    if srs:
        try:
            declared = CRS.from_user_input(srs)
        except CRSError:
            return DeliveryReport(False, [f"the upload's srs {srs!r} is not a known CRS"], [], None, srs)
    delivered = [(Path(f), str(n)) for f, n in zip(files, names or [str(f) for f in files], strict=True)]
    budget = [MAX_UNCOMPRESSED]
    try:
        expanded = _expand(delivered, workdir, budget, problems)
    except DeliveryError as e:
        return DeliveryReport(False, [str(e)], [], None, srs)
    layers: list[Layer] = []
    for path, display in _datasets(expanded, problems):
        try:
            for layer in _layers_of(path, display):
                layers.append(_scan_layer(layer, declared, read_features))
        except DeliveryError as e:
            problems.append(str(e))
    if not layers and not problems:
        problems.append("no vector data in the delivery")

    # table names: normalised, unique among loaded layers; change sets name the table they change
    loads = [i for i, layer in enumerate(layers) if layer.role == "load"]
    for i, table in zip(loads, normalise_all([layers[i].table for i in loads], fallback="table"), strict=True):
        layers[i] = _with_table(layers[i], table)
    for i, layer in enumerate(layers):
        if layer.role != "load":
            layers[i] = _with_table(layer, normalise(layer.table, fallback="table"))

    extents = [layer.extent_4326 for layer in layers if layer.extent_4326 is not None]
    extent = None
    if extents:
        boxes = np.array(extents)
        extent = (float(boxes[:, 0].min()), float(boxes[:, 1].min()), float(boxes[:, 2].max()),
                  float(boxes[:, 3].max()))
    return DeliveryReport(not problems, problems, layers, extent, srs)


def _with_table(layer: Layer, table: str) -> Layer:
    return replace(layer, table=table)


def clear_workdir(workdir: str | os.PathLike[str]) -> None:
    """Remove what `check_delivery` extracted (once the integration is done)."""
    shutil.rmtree(workdir, ignore_errors=True)


def describe(layer: Layer) -> dict[str, Any]:
    """A JSON-able summary of a checked layer, for the upload's check report."""
    return {
        "file": layer.source, "layer": layer.name, "table": layer.table, "role": layer.role,
        "geometry_type": layer.geometry_type, "count": layer.count, "srs": layer.srs,
        "attributes": {a.name: a.type for a in layer.attributes},
        "extent": list(layer.extent) if layer.extent else None,
        "extent_4326": list(layer.extent_4326) if layer.extent_4326 else None,
    }
