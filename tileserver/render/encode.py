"""Encode rendered maps (WMS GetMap, OGC API Maps, re-rendered tiles) into output formats.

Not for slab tiles: ROK4 slab payloads have byte-level constraints (see `tileserver.rok4`).

Formats (`FORMATS`): JPEG (simplejpeg, quality 75 like ROK4, 4:2:0), PNG (written here: the Up
filter on every row and libdeflate level 1 — 3–4× faster than Pillow's zlib level 2 with its
adaptive filters, and no larger on maps; ≤256-colour RGB/RGBA images become palette PNGs,
unfiltered, several times smaller for palette styles), TIFF and GeoTIFF (tifffile; FLOAT32 kept as float; GeoTIFF adds
ModelPixelScale/ModelTiepoint/GeoKeyDirectory and GDAL_NODATA), BIL (raw little-endian float32,
band-interleaved by line) and ESRI ASCII grid. PNG and JPEG need 8-bit data, as in ROK4.

Transparency (`transparent`): None keeps the data as it is (ROK4's behaviour: an alpha band, e.g.
from a palette style, stays); True adds an alpha band from `nodata` (WMS TRANSPARENT=TRUE); False
flattens alpha and nodata onto `bgcolor` (WMS TRANSPARENT=FALSE/BGCOLOR). JPEG always flattens.
"""

from __future__ import annotations

import io
import math
import struct
import textwrap
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import imagecodecs
import numpy as np
import simplejpeg
import tifffile
from PIL import Image, ImageDraw, ImageFont

from tileserver.numbers import integral_text

from .bands import with_alpha
from .georef import Grid, crs_epsg, get_crs, is_geographic

try:
    from . import _pixels
except ImportError:  # built without a C compiler: numpy does it band by band
    _pixels = None  # type: ignore[assignment]

PNG_COMPRESS_LEVEL = 1  # libdeflate level: 1 is ~4× faster than 6 for a few % more bytes
JPEG_QUALITY = 75


@dataclass(frozen=True)
class _Options:
    nodata: tuple[float, ...] | None
    transparent: bool | None
    bgcolor: tuple[int, int, int]
    quality: int | None
    grid: Grid | None
    tiff_compression: str | None


# --------------------------------------------------------------------------- pixel preparation


def _channels(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or 0 in array.shape:
        raise ValueError(f"expected an (H, W[, 1-4]) image, got shape {array.shape}")
    return array


def _require_uint8(array: np.ndarray, fmt: str) -> None:
    if array.dtype != np.uint8:
        raise ValueError(f"{fmt} needs 8-bit data, got {array.dtype}; "
                         "use image/tiff, image/geotiff, image/x-bil;bits=32 or text/asc for other types")


def _nodata_mask(array: np.ndarray, nodata: tuple[float, ...] | None) -> np.ndarray | None:
    """Pixels whose every band equals its nodata value (None if no nodata given)."""
    if nodata is None:
        return None
    values = nodata if len(nodata) == array.shape[2] else (nodata[0],) * array.shape[2]
    mask = np.ones(array.shape[:2], dtype=bool)
    for band, v in enumerate(values):
        mask &= np.isnan(array[..., band]) if math.isnan(v) else array[..., band] == v
    return mask


BAND_PIXELS = 1 << 20  # pixels per band of rows in whole-image arithmetic (bounded temporaries)


def _row_bands(array: np.ndarray) -> list[slice]:
    rows = max(1, BAND_PIXELS // max(1, array.shape[1]))
    return [slice(r, min(r + rows, array.shape[0])) for r in range(0, array.shape[0], rows)]


def _flatten(array: np.ndarray, opts: _Options) -> np.ndarray:
    """Opaque uint8 image: alpha composited onto bgcolor, nodata pixels painted bgcolor."""
    bands = array.shape[2]
    has_alpha = bands in (2, 4)
    colour = array[..., : bands - 1] if has_alpha else array
    grey_bg = len(set(opts.bgcolor)) == 1
    nodata = _nodata_mask(array, opts.nodata) if not has_alpha else None
    if colour.shape[2] == 1 and not grey_bg and (has_alpha or (nodata is not None and nodata.any())):
        colour = np.repeat(colour, 3, axis=2)
    if has_alpha:
        fused = _compiled_over(array, colour, opts.bgcolor[: colour.shape[2]])
        return fused if fused is not None else _over_background(colour, array[..., -1], opts.bgcolor[: colour.shape[2]])
    if nodata is not None and nodata.any():
        colour = colour.copy()
        colour[nodata] = np.asarray(opts.bgcolor[: colour.shape[2]], dtype=np.uint8)
    return colour


def _compiled_over(array: np.ndarray, colour: np.ndarray, bgcolor: Sequence[int]) -> np.ndarray | None:
    """`_over_background` in one compiled pass over the interleaved pixels (render/_pixels.c: ~4 ms
    a styled 1024² map against ~8 band by band), or None without the extension or for arrays it does not
    take (the alpha is `array`'s last band; `colour` a view of `array` or an array of its own)."""
    if _pixels is None or not array.flags.c_contiguous or len(bgcolor) not in (1, 3):
        return None
    bands = array.shape[2]
    flat = array.reshape(-1)
    if (colour.__array_interface__["data"][0] == array.__array_interface__["data"][0]
            and colour.strides == array.strides):  # its leading bands
        colour_flat, colour_step = flat, bands
    elif colour.flags.c_contiguous:
        colour_flat, colour_step = colour.reshape(-1), colour.shape[2]
    else:
        return None
    out = np.empty(array.shape[:2] + (len(bgcolor),), dtype=np.uint8)
    _pixels.over_background(colour_flat, colour_step, flat[bands - 1:], bands, bytes(bytearray(bgcolor)), out,
                            array.shape[0] * array.shape[1])
    return out


def _over_background(colour: np.ndarray, alpha: np.ndarray, bgcolor: Sequence[int]) -> np.ndarray:
    """round(colour·a/255 + bg·(1 − a/255)) in 16-bit integers: x = c·a + bg·(255 − a) ≤ 65,025 and
    round(x/255) = (x + 128 + ((x + 128) >> 8)) >> 8 (exact there; no ties since 255 is odd). Equal
    to the float formula for every colour, alpha and background (checked exhaustively), several
    times faster; opaque rows are copied, 0/255 alphas are bit masks; bands of rows bound the
    temporaries. Band by band: numpy is several times slower broadcasting (H, W, 1) over (H, W, 3)
    than working on 2-D planes."""
    out = np.empty(colour.shape, dtype=np.uint8)
    bg = np.asarray(bgcolor, dtype=np.uint16)
    for rows in _row_bands(colour):
        a = alpha[rows]
        if a.min() == 255:
            for band in range(colour.shape[2]):
                out[rows, :, band] = colour[rows, :, band]
            continue
        if not ((a != 0) & (a != 255)).any():  # alpha from a validity mask: colour or background
            # a is all ones or all zeros bits: (colour AND a) OR (bg AND NOT a)
            outside = ~a
            for band, value in enumerate(bg.astype(np.uint8)):
                plane = out[rows, :, band]
                np.bitwise_and(colour[rows, :, band], a, out=plane)
                if value:
                    plane |= outside & value
            continue
        a16 = a.astype(np.uint16)
        rest = 255 - a16
        for band, value in enumerate(bg):
            x = colour[rows, :, band].astype(np.uint16)
            x *= a16
            if value:
                x += rest * value
            x += 128
            x += x >> 8
            x >>= 8
            out[rows, :, band] = x
    return out


def _add_alpha(array: np.ndarray, opts: _Options) -> np.ndarray:
    """Alpha band from nodata (transparent where every band equals nodata)."""
    if array.shape[2] in (2, 4):
        return array
    mask = _nodata_mask(array, opts.nodata)
    if mask is None or not mask.any():
        return array
    return with_alpha(array, mask)


def _apply_transparency(array: np.ndarray, opts: _Options) -> np.ndarray:
    if opts.transparent is None:
        return array
    return _add_alpha(array, opts) if opts.transparent else _flatten(array, opts)


# --------------------------------------------------------------------------- encoders


def _jpeg(array: np.ndarray, opts: _Options) -> bytes:
    _require_uint8(array, "image/jpeg")
    image = _flatten(array, opts)
    quality = JPEG_QUALITY if opts.quality is None else int(opts.quality)
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be within 1..100, got {quality}")
    if image.shape[2] == 1:
        return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorspace="GRAY",
                                      colorsubsampling="Gray")
    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorspace="RGB",
                                  colorsubsampling="420")


_PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _as_palette(image: Image.Image, array: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(index (H, W) uint8, colours (N, bands) uint8) when the image has at most 256 colours.

    Each pixel's colour packed in a uint32 (RGBA: a free view of the bytes) is mapped to its
    palette index by a perfect hash — an odd multiplier whose top 16 bits separate the ≤ 256
    colours, found in a few tries — and a 64 Ki-entry table: three array operations instead of a
    binary search per pixel. Exact: every pixel's colour is one of `getcolors`'."""
    colours = image.getcolors(256)  # C loop; stops as soon as there are more than 256
    if colours is None:
        return None
    bands = array.shape[2]
    palette = np.array([c for _, c in colours], dtype=np.uint8).reshape(-1, bands)
    table = _packed(palette[None])[0]
    lut = _perfect_hash(table)
    index = np.empty(array.shape[:2], dtype=np.uint8)
    if lut is None:  # no multiplier found: binary search in the sorted codes
        order = np.argsort(table)
        for rows in _row_bands(array):
            index[rows] = order[np.searchsorted(table[order], _packed(array[rows]))]
        return index, palette
    multiplier, slots = lut
    for rows in _row_bands(array):
        codes = _packed(array[rows])
        codes *= multiplier  # uint32 arithmetic wraps modulo 2**32, as the hash wants
        codes >>= 16
        index[rows] = slots[codes]
    return index, palette


def _packed(array: np.ndarray) -> np.ndarray:
    """(…, 3|4) uint8 colours as (…) uint32 codes, little-endian byte order (a copy: callers modify it)."""
    if array.shape[-1] == 4 and array.flags.c_contiguous:
        return array.view("<u4")[..., 0].astype(np.uint32)
    codes = array[..., 0].astype(np.uint32)
    for band in range(1, array.shape[-1]):
        codes |= array[..., band].astype(np.uint32) << np.uint32(8 * band)
    return codes


_HASH_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646D, 0xFD7046C5,
                     0xB55A4F09, 0x2545F491, 0x61C88647, 0x7FEB352D, 0x846CA68B)


def _perfect_hash(codes: np.ndarray) -> tuple[np.uint32, np.ndarray] | None:
    """(multiplier, 65,536-entry index table) under which `codes` land in distinct slots, or None."""
    for multiplier in _HASH_MULTIPLIERS:
        m = np.uint32(multiplier)
        slots = (codes * m) >> np.uint32(16)
        if np.unique(slots).size == codes.size:
            table = np.zeros(1 << 16, dtype=np.uint8)
            table[slots] = np.arange(codes.size, dtype=np.uint8)
            return m, table
    return None


_PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # bands → grey, grey+alpha, RGB, RGBA


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def _png_rows(pixels: np.ndarray, up: bool) -> np.ndarray:
    """PNG scanlines (H, 1 + W·bands): filter byte then samples; Up (row minus the row above,
    modulo 256) from the second row when `up`, else None. Up is one vectorised subtraction and
    compresses like the adaptive choice on maps."""
    h = pixels.shape[0]
    flat = pixels.reshape(h, -1)
    rows = np.empty((h, flat.shape[1] + 1), dtype=np.uint8)
    rows[:, 0] = 2 if up else 0
    rows[0, 0] = 0
    rows[0, 1:] = flat[0]
    if up:
        np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])
    else:
        rows[1:, 1:] = flat[1:]
    return rows


def write_png(pixels: np.ndarray, palette: np.ndarray | None = None, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """A PNG of (H, W, 1–4) uint8 samples, or of (H, W) palette indexes with `palette` (N, 3|4)
    colours (a 4th column becomes tRNS). Deflate by libdeflate, whose zlib streams any decoder reads."""
    h, w = pixels.shape[:2]
    if palette is not None:
        header = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)
        extra = _chunk(b"PLTE", np.ascontiguousarray(palette[:, :3]).tobytes())
        if palette.shape[1] == 4:
            extra += _chunk(b"tRNS", palette[:, 3].tobytes())
        rows = _png_rows(pixels[..., None], up=False)
    else:
        header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOUR_TYPES[pixels.shape[2]], 0, 0, 0)
        extra = b""
        rows = _png_rows(pixels, up=True)
    data = imagecodecs.deflate_encode(rows, level=level)  # type: ignore[arg-type]  # any buffer
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", bytes(data)) + _chunk(b"IEND", b"")


def _png(array: np.ndarray, opts: _Options) -> bytes:
    _require_uint8(array, "image/png")
    array = np.ascontiguousarray(_apply_transparency(array, opts))
    if array.shape[2] in (3, 4):
        image = Image.frombuffer(_PIL_MODES[array.shape[2]], (array.shape[1], array.shape[0]), array, "raw",
                                 _PIL_MODES[array.shape[2]], 0, 1)
        pal = _as_palette(image, array)
        if pal is not None:
            return write_png(pal[0], pal[1])
    return write_png(array)


_TIFF_COMPRESSION = {None: None, "": None, "raw": None, "none": None, "lzw": "lzw", "deflate": "adobe_deflate",
                     "zip": "adobe_deflate", "adobe_deflate": "adobe_deflate", "packbits": "packbits"}


def _tiff_arguments(array: np.ndarray, opts: _Options) -> dict:
    key = opts.tiff_compression.lower() if opts.tiff_compression else None
    if key not in _TIFF_COMPRESSION:
        raise ValueError(f"unknown TIFF compression {opts.tiff_compression!r}; "
                         "expected raw, lzw, deflate or packbits")
    bands = array.shape[2]
    rgb = array.dtype == np.uint8 and bands >= 3
    args: dict = {"photometric": "rgb" if rgb else "minisblack", "planarconfig": "contig",
                  "compression": _TIFF_COMPRESSION[key], "metadata": None, "software": False}
    if bands in (2, 4) and array.dtype == np.uint8:
        args["extrasamples"] = ["unassalpha"]
    elif bands > 1 and not rgb:
        args["extrasamples"] = ["unspecified"] * (bands - 1)
    return args


def _write_tiff(array: np.ndarray, opts: _Options, extratags: Sequence[tuple] = ()) -> bytes:
    if array.dtype.kind == "f":
        array = array.astype(np.float32, copy=False)
    elif array.dtype != np.uint8:
        raise ValueError(f"TIFF output takes uint8 or float32 data, got {array.dtype}")
    buf = io.BytesIO()
    data = array[..., 0] if array.shape[2] == 1 else array
    tifffile.imwrite(buf, np.ascontiguousarray(data), extratags=list(extratags), **_tiff_arguments(array, opts))
    return buf.getvalue()


def _tiff(array: np.ndarray, opts: _Options) -> bytes:
    if array.dtype == np.uint8:
        array = _apply_transparency(array, opts)
    return _write_tiff(array, opts)


# GeoTIFF 1.0 keys
_GT_MODEL_TYPE, _GT_RASTER_TYPE, _GT_CITATION = 1024, 1025, 1026
_GEOGRAPHIC_TYPE, _PROJECTED_CS_TYPE = 2048, 3072
_MODEL_PROJECTED, _MODEL_GEOGRAPHIC, _RASTER_PIXEL_IS_AREA, _USER_DEFINED = 1, 2, 1, 32767


def geotiff_tags(grid: Grid, nodata: float | None = None) -> list[tuple]:
    """tifffile extratags georeferencing `grid` (north-up, PixelIsArea), plus GDAL_NODATA."""
    geographic = is_geographic(grid.crs)
    epsg = crs_epsg(grid.crs)
    keys: list[tuple[int, int, int, int]] = [
        (_GT_MODEL_TYPE, 0, 1, _MODEL_GEOGRAPHIC if geographic else _MODEL_PROJECTED),
        (_GT_RASTER_TYPE, 0, 1, _RASTER_PIXEL_IS_AREA),
    ]
    ascii_params = ""
    if epsg is None:  # GDAL reads an ESRI WKT from the citation when there is no code
        ascii_params = "ESRI PE String = " + get_crs(grid.crs).to_wkt("WKT1_ESRI") + "|"
        keys.append((_GT_CITATION, 34737, len(ascii_params), 0))
    keys.append((_GEOGRAPHIC_TYPE if geographic else _PROJECTED_CS_TYPE, 0, 1, epsg or _USER_DEFINED))
    keys.sort()
    directory = [1, 1, 0, len(keys)] + [v for key in keys for v in key]
    tags: list[tuple] = [
        (33550, 12, 3, (grid.res_x, grid.res_y, 0.0), True),  # ModelPixelScale
        (33922, 12, 6, (0.0, 0.0, 0.0, grid.bbox[0], grid.bbox[3], 0.0), True),  # ModelTiepoint
        (34735, 3, len(directory), tuple(directory), True),  # GeoKeyDirectory
    ]
    if ascii_params:
        tags.append((34737, "s", 0, ascii_params, True))  # GeoAsciiParams
    if nodata is not None:
        tags.append((42113, "s", 0, integral_text(nodata), True))  # GDAL_NODATA
    return tags


def _geotiff(array: np.ndarray, opts: _Options) -> bytes:
    if opts.grid is None:
        raise ValueError("image/geotiff needs the grid of the image")
    if array.dtype == np.uint8:
        array = _apply_transparency(array, opts)
    nodata = opts.nodata[0] if opts.nodata else None
    return _write_tiff(array, opts, geotiff_tags(opts.grid, nodata))


def _bil(array: np.ndarray, opts: _Options) -> bytes:
    # band interleaved by line: row 0 band 0, row 0 band 1, …
    return np.ascontiguousarray(array.astype("<f4", copy=False).transpose(0, 2, 1)).tobytes()


def _asc(array: np.ndarray, opts: _Options) -> bytes:
    if array.shape[2] != 1:
        raise ValueError(f"text/asc holds one band, got {array.shape[2]}")
    grid = opts.grid
    if grid is None:
        raise ValueError("text/asc needs the grid of the image")
    values = array[..., 0].astype(np.float64)
    nodata = opts.nodata[0] if opts.nodata else None
    if nodata is None and np.isnan(values).any():
        nodata = -99999.0
    if nodata is not None:
        values = np.where(np.isnan(values), nodata, values)
    header = [f"ncols {grid.width}", f"nrows {grid.height}", f"xllcorner {integral_text(grid.bbox[0])}",
              f"yllcorner {integral_text(grid.bbox[1])}"]
    if math.isclose(grid.res_x, grid.res_y, rel_tol=1e-9):
        header.append(f"cellsize {integral_text(grid.res_x)}")
    else:  # GDAL's extension for rectangular cells
        header += [f"dx {integral_text(grid.res_x)}", f"dy {integral_text(grid.res_y)}"]
    if nodata is not None:
        header.append(f"NODATA_value {integral_text(nodata)}")
    integral = array.dtype.kind in "iu" or bool(np.all(values == np.round(values)))
    fmt = "%d" if integral else "%.7g"
    body = io.StringIO()
    np.savetxt(body, values, fmt=fmt, delimiter=" ")
    return ("\n".join(header) + "\n" + body.getvalue()).encode("ascii")


Encoder = Callable[[np.ndarray, _Options], bytes]

FORMATS: dict[str, Encoder] = {
    "image/jpeg": _jpeg,
    "image/png": _png,
    "image/tiff": _tiff,
    "image/geotiff": _geotiff,
    "image/x-bil;bits=32": _bil,
    "text/asc": _asc,
}
_ALIASES = {"image/jpg": "image/jpeg", "image/tiff;subtype=geotiff": "image/geotiff",
            "application/x-bil;bits=32": "image/x-bil;bits=32"}
_FLOAT_FORMATS = {"image/x-bil;bits=32", "text/asc"}


def normalise_format(fmt: str) -> str:
    """Canonical MIME type of an output format (case and spaces ignored); ValueError if unknown."""
    key = "".join(fmt.split()).lower()
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        # tolerate parameters on the simple types, e.g. "image/png; mode=8bit"
        base = key.split(";", 1)[0]
        if base in FORMATS and base not in _FLOAT_FORMATS:
            return base
        raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return key


def _nodata_tuple(nodata: float | Sequence[float] | None) -> tuple[float, ...] | None:
    if nodata is None:
        return None
    return tuple(float(v) for v in np.atleast_1d(np.asarray(nodata, dtype=np.float64)))


def encode_image(array: np.ndarray, format: str, *, nodata: float | Sequence[float] | None = None,
                 transparent: bool | None = None, bgcolor: tuple[int, int, int] = (255, 255, 255),
                 quality: int | None = None, grid: Grid | None = None,
                 tiff_compression: str | None = None) -> tuple[bytes, str]:
    """Encode an (H, W[, C]) image; returns (bytes, content type). ValueError for an unknown format
    or data the format cannot hold (float data as PNG/JPEG, several bands as ASC…)."""
    fmt = normalise_format(format)
    opts = _Options(_nodata_tuple(nodata), transparent, tuple(int(v) for v in bgcolor)[:3],  # type: ignore[arg-type]
                    quality, grid, tiff_compression)
    array = _channels(array)
    if grid is not None and array.shape[:2] != grid.shape:
        raise ValueError(f"image shape {array.shape[:2]} does not match grid {grid.shape}")
    return FORMATS[fmt](array, opts), fmt


def flattened_onto(format: str | None, transparent: bool | None,
                   bgcolor: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """The colour `encode_image(…, format, transparent=…, bgcolor=…)` lays a picture's alpha on, or
    None where the alpha is kept: JPEG always, PNG and TIFF with transparent=False (None for an
    unknown format: `encode_image` words that error). Callers pass it to the renderer, which then
    draws a single data layer straight onto it (`draw.composite`)."""
    try:
        fmt = normalise_format(format or "")
    except ValueError:
        return None
    if fmt == "image/jpeg" or (transparent is False and fmt in ("image/png", "image/tiff", "image/geotiff")):
        return tuple(int(v) for v in bgcolor)[:3]  # type: ignore[return-value]
    return None


# --------------------------------------------------------------------------- WMS exception images


def blank_image(width: int, height: int, format: str, *, transparent: bool = False,
                bgcolor: tuple[int, int, int] = (255, 255, 255), nodata: float | None = None,
                grid: Grid | None = None) -> tuple[bytes, str]:
    """An empty map (WMS EXCEPTIONS=BLANK): bgcolor, fully transparent if asked and possible;
    float formats get `nodata` (0 if None)."""
    fmt = normalise_format(format)
    if fmt in _FLOAT_FORMATS:
        value = 0.0 if nodata is None else nodata
        return encode_image(np.full((height, width, 1), value, dtype=np.float32), fmt, nodata=nodata, grid=grid)
    bands = 4 if transparent and fmt != "image/jpeg" else 3
    pixel = tuple(bgcolor)[:3] + ((0,) if bands == 4 else ())
    array = np.empty((height, width, bands), dtype=np.uint8)
    array[...] = pixel
    return encode_image(array, fmt, grid=grid)


def _wrap(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str,
          width: int) -> list[str]:
    """Greedy word wrap to a pixel width (long words are cut)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while draw.textlength(line, font=font) > width and len(line) > 1:
                cut = max(1, int(len(line) * width / max(draw.textlength(line, font=font), 1)))
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def exception_in_image(message: str, width: int, height: int, format: str, *, transparent: bool = False,
                       bgcolor: tuple[int, int, int] = (255, 255, 255)) -> tuple[bytes, str]:
    """The error message drawn in an image of the requested size (WMS EXCEPTIONS=INIMAGE), in the
    requested format; float formats (BIL, ASC) cannot show text and fall back to PNG."""
    fmt = normalise_format(format)
    if fmt in _FLOAT_FORMATS:
        fmt = "image/png"
    mode = "RGBA" if transparent and fmt != "image/jpeg" else "RGB"
    image = Image.new(mode, (width, height), tuple(bgcolor)[:3] + ((0,) if mode == "RGBA" else ()))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    margin = 4 if width > 16 else 0
    lines = _wrap(draw, font, textwrap.dedent(message).strip(), max(width - 2 * margin, 1))
    draw.multiline_text((margin, margin), "\n".join(lines), fill=(0, 0, 0, 255)[: len(mode)], font=font)
    return encode_image(np.asarray(image), fmt)
