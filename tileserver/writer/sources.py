"""Georeferenced source images: TIFF/GeoTIFF (tifffile) and JPEG/PNG with world files (Pillow).

`open_source` reads only the metadata and returns a picklable `SourceInfo`; pixels are read by
windows (`SourceInfo.read`) through a per-process cache of open readers, so worker processes
reopen files themselves and a large striped or tiled TIFF is never decoded whole: only the
strips/tiles under the window are.

Memory is bounded whatever an image declares: an image may have at most `source_max_pixels`
(setting; `SOURCE_MAX_PIXELS` by default), absent (sparse) strips/tiles cost nothing, a decimated
read (`step`) keeps only the samples it returns, uncompressed strips are read row by row, a
compressed strip or tile may decode to at most `SEGMENT_MAX_BYTES`, and decoded segments share one
`_SEGMENT_CACHE_BYTES` cache per process.
"""

from __future__ import annotations

import math
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tileserver.render.georef import Grid

from .errors import WriterError

# world-file extensions tried for each image extension (GDAL's conventions), lower case
_WORLD_FILES = {
    ".tif": (".tfw", ".tifw", ".wld"),
    ".tiff": (".tfw", ".tiffw", ".wld"),
    ".jpg": (".jgw", ".jpgw", ".wld"),
    ".jpeg": (".jgw", ".jpegw", ".wld"),
    ".png": (".pgw", ".pngw", ".wld"),
}
_TIFF_EXTENSIONS = (".tif", ".tiff")
# GeoTIFF tags and keys (GeoTIFF 1.1 §7)
_TAG_PIXEL_SCALE = 33550
_TAG_TIEPOINT = 33922
_TAG_TRANSFORMATION = 34264
_TAG_GEOKEYS = 34735
_TAG_GDAL_NODATA = 42113
_KEY_RASTER_TYPE = 1025
_KEY_GEOGRAPHIC = 2048
_KEY_PROJECTED = 3072
_USER_DEFINED = 32767
_PIXEL_IS_POINT = 2
_SEGMENT_CACHE_BYTES = 256 << 20  # decoded strips/tiles kept per process, all readers together
SEGMENT_MAX_BYTES = 256 << 20  # one compressed strip or tile decodes whole: at most this much
_RAW_BAND_BYTES = 16 << 20  # uncompressed rows read from the file at once
SOURCE_MAX_PIXELS = 1 << 28  # default of the setting source_max_pixels (16384 x 16384)
_PILLOW_MAX_PIXELS = 1 << 30


@dataclass(frozen=True)
class SourceInfo:
    """One image: where it is, how it is georeferenced and what its pixels are.

    (x0, y0) is the outer top-left corner; pixel (c, r) covers [x0 + c·res_x, x0 + (c+1)·res_x] ×
    [y0 − (r+1)·res_y, y0 − r·res_y] in `crs` (easting/longitude first).
    """

    path: str
    kind: str  # "tiff" or "pillow"
    crs: str
    x0: float
    y0: float
    res_x: float
    res_y: float
    width: int
    height: int
    channels: int
    sample_format: str  # UINT8 or FLOAT32 (what `read` returns)
    nodata: tuple[float, ...] | None
    alpha: bool  # the last channel is an alpha channel (0 = nodata)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0 - self.height * self.res_y, self.x0 + self.width * self.res_x, self.y0)

    @property
    def grid(self) -> Grid:
        return Grid(self.crs, self.bbox, self.width, self.height)

    def window_grid(self, col0: int, row0: int, col1: int, row1: int, step: int = 1) -> Grid:
        """Grid of the pixel window [col0, col1) × [row0, row1) read with a decimation step."""
        width, height = len(range(col0, col1, step)), len(range(row0, row1, step))
        x0 = self.x0 + col0 * self.res_x
        y1 = self.y0 - row0 * self.res_y
        return Grid(self.crs, (x0, y1 - height * step * self.res_y, x0 + width * step * self.res_x, y1),
                    width, height)

    def pixel_window(self, bbox: tuple[float, float, float, float], pad: int) -> tuple[int, int, int, int] | None:
        """(col0, row0, col1, row1) of the source pixels under `bbox` (in the source CRS), padded
        for the interpolation kernel and clipped to the image; None when they do not overlap."""
        col0 = math.floor((bbox[0] - self.x0) / self.res_x) - pad
        col1 = math.ceil((bbox[2] - self.x0) / self.res_x) + pad
        row0 = math.floor((self.y0 - bbox[3]) / self.res_y) - pad
        row1 = math.ceil((self.y0 - bbox[1]) / self.res_y) + pad
        col0, row0 = max(col0, 0), max(row0, 0)
        col1, row1 = min(col1, self.width), min(row1, self.height)
        if col0 >= col1 or row0 >= row1:
            return None
        return col0, row0, col1, row1

    def read(self, col0: int, row0: int, col1: int, row1: int, step: int = 1) -> np.ndarray:
        """Pixels of a window as (h, w, channels) uint8 or float32, every `step`-th pixel (only
        those are held: a decimated read costs the memory of its result, not of its window)."""
        if not (0 <= col0 < col1 <= self.width and 0 <= row0 < row1 <= self.height):
            raise ValueError(f"{self.path}: window {col0},{row0},{col1},{row1} outside the image")
        return _reader(self).read(row0, row1, col0, col1, max(1, int(step)))

    def validity(self, pixels: np.ndarray) -> np.ndarray:
        """Which pixels hold data: not all channels at the source nodata, alpha not 0, not NaN."""
        valid = np.ones(pixels.shape[:2], dtype=bool)
        if self.nodata is not None:
            nodata = np.asarray(self.nodata, dtype=pixels.dtype)
            valid &= ~np.all(pixels == nodata, axis=2)
        if self.alpha:
            valid &= pixels[..., -1] != 0
        if pixels.dtype.kind == "f":
            valid &= ~np.isnan(pixels).any(axis=2)
        return valid


# --- opening ----------------------------------------------------------------------------------


def open_source(path: str | os.PathLike[str], srs: str | None = None,
                nodata: tuple[float, ...] | None = None, max_pixels: int | None = SOURCE_MAX_PIXELS) -> SourceInfo:
    """Metadata and georeferencing of one image; `srs` overrides (or supplies) its CRS and
    `nodata` its nodata value. Raises WriterError naming the file on anything unusable, and on
    an image of more than `max_pixels` pixels (None or 0: no limit)."""
    path = str(path)
    if not os.path.isfile(path):
        raise WriterError(f"{path}: no such image")
    if not os.access(path, os.R_OK):
        raise WriterError(f"{path}: image not readable (permission denied)")
    ext = Path(path).suffix.lower()
    if ext in _TIFF_EXTENSIONS:
        meta = _tiff_metadata(path)
    elif ext in (".jpg", ".jpeg", ".png"):
        meta = _pillow_metadata(path)
    else:
        raise WriterError(f"{path}: unsupported image type {ext or '(no extension)'} (TIFF, JPEG or PNG)")
    check_size(path, meta["width"], meta["height"], max_pixels)
    transform = meta.pop("transform") or _world_file(path)
    if transform is None:
        raise WriterError(f"{path}: no georeferencing (no GeoTIFF tags and no world file)")
    crs = srs or meta.pop("crs") or _prj_file(path)
    meta.pop("crs", None)
    if not crs:
        raise WriterError(f"{path}: no coordinate reference system in the file; give one with --srs")
    crs = check_crs(crs, f"{path}: ")
    file_nodata = meta.pop("nodata")
    x0, y0, res_x, res_y = transform
    return SourceInfo(path=path, crs=crs, x0=x0, y0=y0, res_x=res_x, res_y=res_y,
                      nodata=_nodata_for(nodata if nodata is not None else file_nodata, meta["channels"], path),
                      **meta)


class SourceTooLarge(WriterError):
    """An image declaring more pixels than a source may have."""


def check_size(path: str, width: int, height: int, max_pixels: int | None) -> None:
    """The one place that says how large a source may be (what it declares, not its file size:
    a sparse TIFF of a few kilobytes may declare billions of pixels)."""
    if max_pixels and width * height > max_pixels:
        raise SourceTooLarge(f"{path}: {width}x{height} pixels, more than the {max_pixels} a source image may "
                          f"have (setting source_max_pixels); cut it into smaller images")


def check_crs(crs: str, where: str = "") -> str:
    """The CRS string as given once PROJ knows it (EPSG:…, IGNF:…, WKT); WriterError otherwise."""
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        CRS.from_user_input(crs)
    except CRSError:
        raise WriterError(f"{where}unknown coordinate reference system {crs!r}") from None
    return crs


def _nodata_for(values: tuple[float, ...] | None, channels: int, path: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    if len(values) == 1:
        return tuple(values) * channels
    if len(values) != channels:
        raise WriterError(f"{path}: {len(values)} nodata values for {channels} channels")
    return tuple(values)


def _sample_format(dtype: np.dtype, path: str) -> str:
    if dtype.kind == "b" or dtype == np.uint8:
        return "UINT8"
    if dtype.kind in "iuf":
        return "FLOAT32"
    raise WriterError(f"{path}: unsupported sample type {dtype}")


def _tiff_metadata(path: str) -> dict[str, Any]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            tags = {tag.code: tag.value for tag in page.tags.values()}
            height, width = int(page.imagelength), int(page.imagewidth)
            samples = int(page.samplesperpixel)
            dtype = np.dtype(page.dtype) if page.dtype is not None else None
            photometric = int(page.photometric)
            extra = tags.get(338, ())
    except (tifffile.TiffFileError, OSError, ValueError, struct.error) as exc:
        raise WriterError(f"{path}: unreadable TIFF ({exc})") from None
    if dtype is None:
        raise WriterError(f"{path}: unsupported TIFF sample layout")
    channels = samples
    if photometric == 3:  # palette: expanded to RGB
        channels = 3
    if not 1 <= channels <= 4:
        raise WriterError(f"{path}: {channels} channels, 1 to 4 supported")
    sample_format = _sample_format(dtype, path)
    if sample_format == "FLOAT32" and channels != 1:
        raise WriterError(f"{path}: non-8-bit images must have one channel (FLOAT32 pyramids), not {channels}")
    geokeys = _geokeys(tags.get(_TAG_GEOKEYS))
    nodata = None
    if _TAG_GDAL_NODATA in tags:
        try:
            nodata = (float(str(tags[_TAG_GDAL_NODATA]).strip("\x00 ")),)
        except ValueError:
            raise WriterError(f"{path}: unreadable GDAL_NODATA tag {tags[_TAG_GDAL_NODATA]!r}") from None
    extra = tuple(extra) if isinstance(extra, tuple | list) else (extra,)
    return {
        "kind": "tiff",
        "width": width,
        "height": height,
        "channels": channels,
        "sample_format": sample_format,
        "alpha": channels in (2, 4) and (not extra or extra[-1] in (1, 2)),
        "transform": _geotiff_transform(tags, geokeys, path),
        "crs": _geokeys_crs(geokeys, path),
        "nodata": nodata,
    }


def _geokeys(raw: Any) -> dict[int, Any]:
    """GeoKeyDirectory (keys with inline SHORT values only: what CRS codes and raster type use)."""
    if not raw:
        return {}
    values = list(raw)
    keys = {}
    for i in range(4, 4 + 4 * int(values[3]), 4):
        key, location, _count, value = values[i : i + 4]
        if location == 0:
            keys[int(key)] = int(value)
    return keys


def _geokeys_crs(keys: dict[int, Any], path: str) -> str | None:
    for key in (_KEY_PROJECTED, _KEY_GEOGRAPHIC):
        code = keys.get(key)
        if code is None or code == 0:
            continue
        if code == _USER_DEFINED:
            return None  # user-defined CRS: only --srs or a .prj file can say which
        return f"EPSG:{code}"
    return None


def _geotiff_transform(tags: dict[int, Any], keys: dict[int, Any],
                       path: str) -> tuple[float, float, float, float] | None:
    """(x0, y0, res_x, res_y) of the outer top-left corner, from the model tags."""
    if _TAG_TRANSFORMATION in tags:
        m = [float(v) for v in tags[_TAG_TRANSFORMATION]]
        if len(m) < 8 or m[1] or m[4]:
            raise WriterError(f"{path}: rotated or sheared georeferencing is not supported")
        x0, y0, res_x, res_y = m[3], m[7], m[0], -m[5]
    elif _TAG_PIXEL_SCALE in tags and _TAG_TIEPOINT in tags:
        sx, sy = (float(v) for v in tags[_TAG_PIXEL_SCALE][:2])
        i, j, _k, x, y = (float(v) for v in tags[_TAG_TIEPOINT][:5])
        x0, y0, res_x, res_y = x - i * sx, y + j * sy, sx, sy
    else:
        return None
    if keys.get(_KEY_RASTER_TYPE) == _PIXEL_IS_POINT:  # tiepoints name pixel centres
        x0, y0 = x0 - res_x / 2, y0 + res_y / 2
    return _checked_transform((x0, y0, res_x, res_y), path)


def _checked_transform(t: tuple[float, float, float, float], path: str) -> tuple[float, float, float, float]:
    x0, y0, res_x, res_y = t
    if not all(math.isfinite(v) for v in t) or res_x <= 0:
        raise WriterError(f"{path}: invalid georeferencing {t}")
    if res_y <= 0:
        raise WriterError(f"{path}: south-up images are not supported (pixel height must be negative)")
    return t


def _world_file(path: str) -> tuple[float, float, float, float] | None:
    """Six lines: x size, rotation, rotation, −y size, x and y of the top-left pixel's centre."""
    base, ext = os.path.splitext(path)
    directory = os.path.dirname(path) or "."
    names = {n.lower(): n for n in os.listdir(directory)}
    for world_ext in _WORLD_FILES.get(ext.lower(), (".wld",)):
        candidate = names.get(os.path.basename(base).lower() + world_ext)
        if candidate is None:
            continue
        world = os.path.join(directory, candidate)
        try:
            values = [float(line) for line in Path(world).read_text().split()[:6]]
        except (OSError, ValueError, UnicodeDecodeError):
            raise WriterError(f"{world}: unreadable world file") from None
        if len(values) != 6:
            raise WriterError(f"{world}: a world file has six numbers")
        a, d, b, e, c, f = values
        if d or b:
            raise WriterError(f"{world}: rotated georeferencing is not supported")
        return _checked_transform((c - a / 2, f - e / 2, a, -e), world)
    return None


def _prj_file(path: str) -> str | None:
    prj = os.path.splitext(path)[0] + ".prj"
    if os.path.isfile(prj):
        try:
            return Path(prj).read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            raise WriterError(f"{prj}: unreadable .prj file") from None
    return None


def _pillow_metadata(path: str) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode, (width, height) = image.mode, image.size
            transparency = "transparency" in image.info
    except (UnidentifiedImageError, OSError) as exc:
        raise WriterError(f"{path}: unreadable image ({exc})") from None
    channels = {"1": 1, "L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "I": 1, "I;16": 1, "F": 1}.get(mode)
    if mode == "P":
        channels = 4 if transparency else 3
    if channels is None:
        raise WriterError(f"{path}: unsupported image mode {mode}")
    return {
        "kind": "pillow",
        "width": width,
        "height": height,
        "channels": channels,
        "sample_format": "FLOAT32" if mode in ("I", "I;16", "F") else "UINT8",
        "alpha": channels in (2, 4),
        "transform": None,
        "crs": None,
        "nodata": None,
    }


# --- pixel readers (one cache per process) ------------------------------------------------------


_SEGMENTS: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()  # (id(reader), index) -> pixels
_segment_bytes = 0


def _cache_put(key: tuple[int, int], seg: np.ndarray) -> None:
    global _segment_bytes
    _SEGMENTS[key] = seg
    _segment_bytes += seg.nbytes
    while _segment_bytes > _SEGMENT_CACHE_BYTES and len(_SEGMENTS) > 1:
        _, old = _SEGMENTS.popitem(last=False)
        _segment_bytes -= old.nbytes


def _cache_drop(owner: int) -> None:
    global _segment_bytes
    for key in [k for k in _SEGMENTS if k[0] == owner]:
        _segment_bytes -= _SEGMENTS.pop(key).nbytes


class _TiffReader:
    """Windowed reads of the first page: decodes only the strips/tiles under a window (LRU-cached)."""

    def __init__(self, info: SourceInfo) -> None:
        import tifffile

        self.info = info
        self.tif = tifffile.TiffFile(info.path)
        self.page = self.tif.pages.first
        page = self.page
        self.planar = int(page.planarconfig) == 2 and page.samplesperpixel > 1
        if page.is_tiled:
            self.seg_h, self.seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self.seg_h, self.seg_w = min(int(page.rowsperstrip or info.height), info.height), info.width
        self.across = -(-info.width // self.seg_w)
        self.down = -(-info.height // self.seg_h)
        self.per_plane = self.across * self.down
        self.samples = 1 if self.planar else int(page.samplesperpixel)
        self.dtype = np.dtype(page.dtype)
        # large uncompressed segments of whole-byte samples: rows are read straight from the file
        # (a band at a time), never a whole strip (small ones are decoded whole and cached)
        self.raw_rows = (int(page.compression) == 1 and int(page.bitspersample) == self.dtype.itemsize * 8
                         and int(getattr(page, "fillorder", 1)) == 1
                         and self.seg_h * self.seg_w * self.samples * self.dtype.itemsize > _RAW_BAND_BYTES)
        self.file_dtype = self.dtype.newbyteorder(self.tif.byteorder)
        self.zeros = np.zeros((1, 1, self.samples), dtype=self.dtype)

    def _rows(self, index: int, r0: int, r1: int) -> tuple[np.ndarray, int]:
        """Rows [r0, r1) of a segment, or all of it: (pixels, first row of `pixels` in the segment).
        Uncompressed segments are read row by row from the file, others decoded whole."""
        page = self.page
        count = page.databytecounts[index]
        if not self.raw_rows or count == 0:
            return self._segment(index), 0
        row_bytes = self.seg_w * self.samples * self.dtype.itemsize
        r1 = min(r1, count // row_bytes)
        fh = self.tif.filehandle
        fh.seek(page.dataoffsets[index] + r0 * row_bytes)
        data = fh.read((r1 - r0) * row_bytes)
        rows = np.frombuffer(data, dtype=self.file_dtype).reshape(-1, self.seg_w, self.samples)
        return rows.astype(self.dtype, copy=False), r0

    def _segment(self, index: int) -> np.ndarray:
        """One whole strip or tile, decoded (cached)."""
        page = self.page
        count = page.databytecounts[index]
        if count == 0:  # sparse TIFF: an absent segment reads as zeros, and costs nothing
            return np.broadcast_to(self.zeros, (self.seg_h, self.seg_w, self.samples))
        key = (id(self), index)
        seg = _SEGMENTS.get(key)
        if seg is not None:
            _SEGMENTS.move_to_end(key)
            return seg
        if self.seg_h * self.seg_w * self.samples * self.dtype.itemsize > SEGMENT_MAX_BYTES:
            raise WriterError(f"{self.info.path}: compressed strips or tiles of {self.seg_w}x{self.seg_h} pixels, too "
                              f"large to decode in bounded memory; rewrite it as a tiled TIFF "
                              f"(e.g. gdal_translate -co TILED=YES)")
        fh = self.tif.filehandle
        fh.seek(page.dataoffsets[index])
        data = fh.read(count)
        try:
            decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:  # codecs raise their own types
            raise WriterError(f"{self.info.path}: cannot decode image data ({exc})") from None
        if decoded is None:
            raise WriterError(f"{self.info.path}: cannot decode image data")
        seg = decoded.reshape(decoded.shape[-3:])
        _cache_put(key, seg)
        return seg

    def read(self, row0: int, row1: int, col0: int, col1: int, step: int = 1) -> np.ndarray:
        page = self.page
        samples = int(page.samplesperpixel)
        out = np.zeros((len(range(row0, row1, step)), len(range(col0, col1, step)), samples), dtype=page.dtype)
        planes = range(samples) if self.planar else range(1)
        for ty in range(row0 // self.seg_h, (row1 - 1) // self.seg_h + 1):
            sy = ty * self.seg_h
            # rows of this segment in the window, cut in bands when read raw from the file
            top, bottom = max(row0, sy), min(row1, sy + self.seg_h)
            band = self.seg_h
            if self.raw_rows:
                row_bytes = self.seg_w * self.samples * self.dtype.itemsize
                band = max(step, _RAW_BAND_BYTES // row_bytes // step * step)
            for start in range(top, bottom, band):
                self._read_band(out, row0, col0, col1, step, ty, start, min(bottom, start + band), planes)
        return self._normalise(out)

    def _read_band(self, out: np.ndarray, row0: int, col0: int, col1: int, step: int, ty: int, top: int,
                   bottom: int, planes: range) -> None:
        """Rows [top, bottom) of segment row `ty` into `out` (the window from row0, col0)."""
        sy = ty * self.seg_h
        r0 = row0 + -(-(top - row0) // step) * step  # first row of the step lattice in the band
        r1 = bottom
        if r0 >= r1:
            return
        for tx in range(col0 // self.seg_w, (col1 - 1) // self.seg_w + 1):
            sx = tx * self.seg_w
            c0 = col0 + -(-(max(col0, sx) - col0) // step) * step
            c1 = min(col1, sx + self.seg_w)
            if c0 >= c1:
                continue
            for plane in planes:
                seg, first = self._rows(plane * self.per_plane + ty * self.across + tx, r0 - sy, r1 - sy)
                part = seg[r0 - sy - first : r1 - sy - first : step, c0 - sx : c1 - sx : step]
                target = out[(r0 - row0) // step : (r0 - row0) // step + part.shape[0],
                             (c0 - col0) // step : (c0 - col0) // step + part.shape[1]]
                if self.planar:
                    target[..., plane] = part[..., 0]
                else:
                    target[...] = part

    def _normalise(self, pixels: np.ndarray) -> np.ndarray:
        """Bilevel → 0/255, MinIsWhite inverted, palette → RGB, other numbers → float32."""
        page = self.page
        photometric = int(page.photometric)
        if photometric == 3 and page.colormap is not None:
            cmap = (np.asarray(page.colormap).T >> 8).astype(np.uint8)
            return cmap[pixels[..., 0]]
        if pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
        if photometric == 0 and pixels.dtype == np.uint8:
            pixels = 255 - pixels
        if self.info.sample_format == "FLOAT32":
            return pixels.astype(np.float32, copy=False)
        return pixels.astype(np.uint8, copy=False)

    def close(self) -> None:
        _cache_drop(id(self))
        self.tif.close()


class _PillowReader:
    """JPEG and PNG have no windowed access worth having: decoded once, then sliced."""

    def __init__(self, info: SourceInfo) -> None:
        from PIL import Image

        self.info = info
        if info.width * info.height > _PILLOW_MAX_PIXELS:
            raise WriterError(f"{info.path}: too large for a JPEG/PNG source; convert it to a tiled TIFF")
        with Image.open(info.path) as opened:
            image: Image.Image = opened  # or its conversion below
            if image.mode == "1":
                image = image.convert("L")
            elif image.mode == "P":
                image = image.convert("RGBA" if info.channels == 4 else "RGB")
            pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        self.pixels = pixels.astype(np.float32 if info.sample_format == "FLOAT32" else np.uint8, copy=False)

    def read(self, row0: int, row1: int, col0: int, col1: int, step: int = 1) -> np.ndarray:
        return self.pixels[row0:row1:step, col0:col1:step]

    def close(self) -> None:
        self.pixels = np.empty((0, 0, 1))


_READERS: OrderedDict[str, _TiffReader | _PillowReader] = OrderedDict()
_MAX_OPEN = 16


def _reader(info: SourceInfo) -> _TiffReader | _PillowReader:
    reader = _READERS.get(info.path)
    if reader is not None and reader.info == info:
        _READERS.move_to_end(info.path)
        return reader
    try:
        reader = _TiffReader(info) if info.kind == "tiff" else _PillowReader(info)
    except WriterError:
        raise
    except Exception as exc:
        raise WriterError(f"{info.path}: unreadable image ({exc})") from None
    _READERS[info.path] = reader
    while len(_READERS) > _MAX_OPEN:
        _, old = _READERS.popitem(last=False)
        old.close()
    return reader


def close_readers() -> None:
    """Close every cached reader of this process (tests, long-lived workers)."""
    while _READERS:
        _, reader = _READERS.popitem()
        reader.close()
