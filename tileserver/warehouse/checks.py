"""The checks an upload goes through once closed, and what each one does (in a worker process).

`Vérification standard` verifies every md5 the producer gave; `Vérification raster` decodes every
image fully (TIFF/GeoTIFF with tifffile, JPEG/PNG with Pillow, through the writer's readers),
reads its georeferencing (GeoTIFF keys or world file; CRS from the file, else the upload's `srs`)
and records extent and resolution. `Vérification vecteur` reads every feature of every layer of
a VECTOR upload (GeoPackage, Shapefile, GeoJSON, CSV, zips of these; `vector/delivery.py`) and
records the extent; the layers, their tables and feature counts go to the logs. Logs name each bad
file and why.

Uploads are untrusted: an image is read in windows of at most `CHECK_READ_PIXELS`, so the check's
memory does not grow with the size an image declares, and an image declaring more than the
setting `source_max_pixels` is refused by name before any pixel is read.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tileserver.settings import Settings

from .upload_files import UploadFiles

Log = Callable[[str], None]
CHECK_READ_PIXELS = 1 << 22  # pixels decoded at once by the raster check (16 MiB of RGBA)
IMAGE_EXTENSIONS = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
COMPANION_EXTENSIONS = (".tfw", ".tifw", ".tiffw", ".jgw", ".jpgw", ".jpegw", ".pgw", ".pngw", ".wld", ".prj",
                        ".aux.xml", ".ovr", ".md5")
_MD5_LINE = re.compile(r"^(?P<md5>[0-9a-fA-F]{32}) [ *]?(?P<path>.+)$")
_NAMESPACE = uuid.UUID("2f0d6c55-3a41-4f1b-9d8e-7c1e0b5a9f23")


@dataclass(frozen=True)
class Check:
    key: str
    name: str
    description: str
    upload_types: tuple[str, ...]

    @property
    def id(self) -> str:
        return str(uuid.uuid5(_NAMESPACE, self.key))

    def view(self) -> dict[str, Any]:
        return {"_id": self.id, "name": self.name, "description": self.description}


STANDARD = Check("standard", "Vérification standard", "La vérification standard contrôle les signatures MD5 fournies",
                 ("RASTER", "VECTOR"))
RASTER = Check("raster", "Vérification raster",
               "La vérification raster contrôle que les fichiers sont bien lisibles et en extraie le géoréférencement",
               ("RASTER",))
VECTOR = Check("vector", "Vérification vecteur",
               "La vérification vecteur contrôle que les fichiers sont bien lisibles et en extraie l'étendue",
               ("VECTOR",))
CHECKS = (STANDARD, RASTER, VECTOR)
BY_ID = {c.id: c for c in CHECKS}


def checks_for(upload_type: str) -> list[Check]:
    return [c for c in CHECKS if upload_type in c.upload_types]


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def standard_check(files: UploadFiles, log: Log) -> tuple[bool, dict[str, Any]]:
    """Every `md5  path` line of every md5 file must name a data file with that digest."""
    ok = True
    md5_files = files.files("md5")
    if not md5_files:
        log("no md5 file given: nothing to verify")
    data = dict(files.files("data"))
    verified = 0
    for rel, path in md5_files:
        for number, raw in enumerate(path.read_text("utf-8", "replace").splitlines(), start=1):
            line = raw.strip()
            if not line:
                continue
            match = _MD5_LINE.match(line)
            if match is None:
                log(f"{rel}, line {number}: not 'md5  path': {line[:200]!r}")
                ok = False
                continue
            target = match["path"].strip().removeprefix("./")
            if target not in data:
                log(f"{target}: listed in {rel} but not delivered")
                ok = False
            elif _md5(data[target]) != match["md5"].lower():
                log(f"{target}: md5 mismatch (expected {match['md5'].lower()}, got {_md5(data[target])})")
                ok = False
            else:
                verified += 1
    log(f"{verified} file(s) verified")
    return ok, {}


def raster_check(files: UploadFiles, srs: str, log: Log,
                 max_pixels: int | None = None) -> tuple[bool, dict[str, Any]]:
    """Open and decode every image; record each one's georeferencing and the upload's extent.
    `max_pixels`: the largest image accepted (default: the default of `source_max_pixels`)."""
    from tileserver.render.georef import crs_equal, reproject_bbox
    from tileserver.writer.errors import WriterError
    from tileserver.writer.sources import SOURCE_MAX_PIXELS, SourceTooLarge, close_readers, open_source

    max_pixels = SOURCE_MAX_PIXELS if max_pixels is None else max_pixels

    ok = True
    images = []
    for rel, path in files.files("data"):
        lower = rel.lower()
        if lower.endswith(COMPANION_EXTENSIONS):
            continue
        if not lower.endswith(IMAGE_EXTENSIONS):
            log(f"{rel}: not an image (TIFF, GeoTIFF, JPEG or PNG expected)")
            ok = False
            continue
        try:
            try:
                info = open_source(path, max_pixels=max_pixels)
            except SourceTooLarge:
                raise
            except WriterError as exc:
                if "coordinate reference system" not in str(exc):
                    raise
                info = open_source(path, srs, max_pixels=max_pixels)  # no CRS in the file: the upload's applies
            if not crs_equal(info.crs, srs):
                raise WriterError(f"its CRS {info.crs} is not the upload's {srs}")
            _decode_all(info)
        except Exception as exc:  # any decoder failure is the file's fault, reported by name
            reason = str(exc).replace(str(path), rel).removeprefix(f"{rel}: ")
            log(f"{rel}: {'too large' if isinstance(exc, SourceTooLarge) else 'unreadable raster'}: {reason}")
            ok = False
            continue
        finally:
            close_readers()
        west, south, east, north = info.bbox
        log(f"{rel}: {info.width}x{info.height} px, {info.channels} x {info.sample_format}, {info.crs},"
            f" resolution {info.res_x:g} x {info.res_y:g}, extent {west:.2f},{south:.2f},{east:.2f},{north:.2f}")
        images.append(info)
    if not images:
        log("no readable image in the upload")
        return False, {}
    bboxes = [reproject_bbox(i.bbox, i.crs, "EPSG:4326") for i in images]
    west, south = min(b[0] for b in bboxes), min(b[1] for b in bboxes)
    east, north = max(b[2] for b in bboxes), max(b[3] for b in bboxes)
    ring = [[west, north], [east, north], [east, south], [west, south], [west, north]]
    extent = {"type": "Polygon", "coordinates": [[[round(x, 8), round(y, 8)] for x, y in ring]]}
    resolution = min(min(i.res_x, i.res_y) for i in images)
    return ok, {"extent": extent, "type_infos": {"resolution": resolution, "images": len(images)}}


def _decode_all(info: Any) -> None:
    """Decode every strip or tile of a source, one window of at most CHECK_READ_PIXELS at a time."""
    cols = min(info.width, CHECK_READ_PIXELS)
    rows = max(1, CHECK_READ_PIXELS // cols)
    for row in range(0, info.height, rows):
        for col in range(0, info.width, cols):
            info.read(col, row, min(info.width, col + cols), min(info.height, row + rows))


def extent_polygon(west: float, south: float, east: float, north: float) -> dict[str, Any]:
    """A lon/lat bbox as the platform's `extent` (a GeoJSON polygon)."""
    ring = [[west, north], [east, north], [east, south], [west, south], [west, north]]
    return {"type": "Polygon", "coordinates": [[[round(x, 8), round(y, 8)] for x, y in ring]]}


def vector_data(files: UploadFiles) -> list[tuple[str, Path]]:
    """The delivered files a vector check or integration reads (md5 files are the standard check's)."""
    return [(rel, path) for rel, path in files.files("data") if not rel.lower().endswith(".md5")]


def vector_check(files: UploadFiles, srs: str, log: Log) -> tuple[bool, dict[str, Any]]:
    """Read every feature of every delivered layer; log each layer (table, count, extent) and each problem."""
    import tempfile

    from tileserver.vector.delivery import check_delivery

    data = vector_data(files)
    with tempfile.TemporaryDirectory(prefix="vector-check-") as workdir:
        report = check_delivery([p for _, p in data], srs or None, workdir, names=[rel for rel, _ in data])
    for layer in report.layers:
        extent = ",".join(f"{v:.6g}" for v in layer.extent) if layer.extent else "none"
        role = "" if layer.role == "load" else f" ({layer.role} of table {layer.table})"
        log(f"{layer.source}: layer {layer.name} → table {layer.table}{role}: {layer.count} feature(s), "
            f"{layer.geometry_type or 'no geometry'}, {layer.srs[:80]}, extent {extent}, attributes "
            f"{', '.join(f'{a.name} ({a.type})' for a in layer.attributes) or 'none'}")
    for problem in report.problems:
        log(problem)
    if not report.ok:
        return False, {}
    log(f"{len(report.layers)} layer(s), {sum(layer.count for layer in report.layers)} feature(s)")
    if report.extent is None:
        return True, {}
    log("extent (EPSG:4326) " + ",".join(f"{v:.6f}" for v in report.extent))
    return True, {"extent": extent_polygon(*report.extent)}


def run_check(check: Check, files: UploadFiles, srs: str, log: Log,
              settings: Settings | None = None) -> tuple[bool, dict[str, Any]]:
    if check is STANDARD:
        return standard_check(files, log)
    if check is VECTOR:
        return vector_check(files, srs, log)
    return raster_check(files, srs, log, settings.source_max_pixels if settings is not None else None)
