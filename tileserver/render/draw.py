"""A map's pixels from its fetched tiles: the CPU work of a render, run in one worker thread.

Per layer: mosaic of the decoded tiles, resampling (Pillow's fast path for pictures, warp.py
for data), style; then the layers composited in order. A large map is drawn layer after layer,
strip after strip of rows, into one output (`draw`), so a render's working memory is one
strip's, which `estimate_memory` accounts for the gate. No I/O and no asyncio here: numpy,
Pillow and the codecs release the GIL, so the event loop keeps serving while maps are drawn.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from tileserver.budget_cache import BudgetCache
from tileserver.catalog import PublishedLayer
from tileserver.rok4.codecs import CodecError

from .bands import with_alpha
from .errors import RenderError, RenderStorageError
from .gate import Deadline
from .georef import Grid, crs_equal, get_transformer
from .levels import SourcePlan, strip_plan
from .model import MapLayer, Raster
from .styles import apply_style
from .warp import resize_picture, warp

try:
    from . import _mesh
except ImportError:  # built without a C compiler: Pillow's transform does it
    _mesh = None  # type: ignore[assignment]
try:
    from . import _pixels
except ImportError:  # numpy does it band by band
    _pixels = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from PIL import Image

# Maps are drawn in horizontal strips of about this many pixels, layer after layer, into one
# output array: the working memory of a render is one strip's, whatever the map's size.
STRIP_PIXELS = 1 << 20
# Bytes per strip pixel the drawing of one strip may hold besides its source mosaic: float32
# planes and coordinates of warp, Pillow copies, alpha compositing temporaries (measured, rounded up).
STRIP_BYTES_PER_PIXEL = 96
GEOD_WGS84 = "+proj=longlat +datum=WGS84 +no_defs"


# --------------------------------------------------------------------------- decoded tiles


class DecodedTiles(BudgetCache[np.ndarray]):
    """Decoded source tiles shared by the renders of one process, least recently used first out,
    within `budget` bytes: neighbouring maps (a client panning, tiles of a WMS-backed map) read
    the same tiles, and decoding is a large share of a small map's CPU.

    Keyed by the stored bytes' BLAKE2b digest and how they decode (compression, size, bands, type),
    not by position: a tile rewritten in place is a new key, so nothing can be stale. Arrays are
    read-only. One lock; decoding happens outside it."""

    def __init__(self, budget: int) -> None:
        super().__init__(budget, lambda pixels: pixels.nbytes, largest_share=8)

    def keep(self, key: tuple, pixels: np.ndarray) -> np.ndarray:
        """`pixels`, kept read-only (a copy when they are a view) if they fit."""
        if not self.fits(pixels.nbytes):
            return pixels
        pixels = np.array(pixels, copy=not pixels.flags.owndata or pixels.base is not None)
        pixels.flags.writeable = False
        self.put(key, pixels)
        return pixels


# Per worker process, sized at startup (app.share_caches): the setting `decoded_tile_cache_bytes`
# divided by the worker count, so the server holds the setting whatever `--workers N` is (processes
# share no memory). 48 MiB holds ~190 RGBA or ~250 RGB 256² tiles, the sources of several 1024² maps.
DECODED_TILE_CACHE_BYTES = 48 << 20
DECODED_TILES = DecodedTiles(DECODED_TILE_CACHE_BYTES)


def _decode_key(published: PublishedLayer, level: str, blob: bytes) -> tuple:
    m = published.matrix(level)
    return (hashlib.blake2b(blob, digest_size=16).digest(), published.format, m.tile_width, m.tile_height,
            published.channels)


def _decode(published: PublishedLayer, level: str, blob: bytes) -> np.ndarray:
    owner = published.owners[level]
    if DECODED_TILES.budget <= 0:
        return owner.decode(level, blob)
    key = _decode_key(published, level, blob)
    pixels = DECODED_TILES.get(key)
    if pixels is None:
        pixels = DECODED_TILES.keep(key, owner.decode(level, blob))
    return pixels


# Whether a decoded tile holds no nodata pixel, per (decoding key, nodata): scanning a 2048² mosaic
# for nodata costs ~7 ms a map, a tile's answer once is free afterwards. Bounded by emptying it.
_CLEAR_TILES: dict[tuple, bool] = {}
_CLEAR_TILES_MAX = 16384


def known_clear(published: PublishedLayer, plan: SourcePlan, tiles: dict[tuple[int, int], bytes],
                nodata: tuple[float, ...]) -> bool:
    """True when every tile of the plan is present and, decoded (from the decoded-tile cache, after
    `mosaic`), has no pixel whose every band equals `nodata`; False when unknown or not so."""
    assert plan.tiles is not None
    if DECODED_TILES.budget <= 0:
        return False
    c0, r0, c1, r1 = plan.tiles
    for r in range(r0, r1 + 1):
        for c in range(c0, c1 + 1):
            blob = tiles.get((c, r))
            if blob is None:
                return False  # the mosaic holds nodata there
            key = _decode_key(published, plan.level, blob)
            clear = _CLEAR_TILES.get((key, nodata))
            if clear is None:
                pixels = DECODED_TILES.get(key)
                if pixels is None:
                    return False
                clear = nodata_mask(pixels, nodata) is None
                if len(_CLEAR_TILES) >= _CLEAR_TILES_MAX:
                    _CLEAR_TILES.clear()
                _CLEAR_TILES[(key, nodata)] = clear
            if not clear:
                return False
    return True


# --------------------------------------------------------------------------- one layer


def mosaic(published: PublishedLayer, plan: SourcePlan, tiles: dict[tuple[int, int], bytes],
           decoded: dict[tuple[int, int], np.ndarray] | None = None) -> np.ndarray:
    """One array from the plan's tiles (`tiles` may hold more); absent tiles are the pyramid's
    nodata. `decoded` keeps decoded tiles for the next strip, which shares a row of them."""
    assert plan.tiles is not None and plan.grid is not None
    m = plan.matrix
    dtype = np.dtype(published.format.dtype)
    c0, r0, c1, r1 = plan.tiles
    present = [(c, r) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1) if (c, r) in tiles]
    out = np.empty((plan.grid.height, plan.grid.width, published.channels), dtype=dtype)
    if len(present) < plan.tile_count:  # some absent: nodata under them (a full mosaic skips this pass)
        out[...] = np.asarray(published.nodata, dtype=dtype) if published.nodata else 0
    for c, r in present:
        pixels = decoded.get((c, r)) if decoded is not None else None
        if pixels is None:
            try:
                pixels = _decode(published, plan.level, tiles[(c, r)])
            except (CodecError, ValueError) as exc:
                raise RenderStorageError(f"layer {published.id} level {plan.level} tile ({c}, {r}): "
                                         f"unreadable tile ({exc})", 502) from exc
            if decoded is not None:
                decoded[(c, r)] = pixels
        y, x = (r - r0) * m.tile_height, (c - c0) * m.tile_width
        out[y:y + m.tile_height, x:x + m.tile_width] = pixels
    return out


def ground_resolution(grid: Grid) -> tuple[float, float]:
    """Metres on the ground per pixel along x and y at the grid's centre (geodesic, any CRS)."""
    from pyproj import Geod

    cx = (grid.bbox[0] + grid.bbox[2]) / 2
    cy = (grid.bbox[1] + grid.bbox[3]) / 2
    to_geo = get_transformer(grid.crs, GEOD_WGS84)
    lon, lat = to_geo.transform([cx, cx + grid.res_x, cx], [cy, cy, cy + grid.res_y], errcheck=False)
    geod = Geod(ellps="WGS84")
    _, _, dist_x = geod.inv(lon[0], lat[0], lon[1], lat[1])
    _, _, dist_y = geod.inv(lon[0], lat[0], lon[2], lat[2])
    if not (math.isfinite(dist_x) and math.isfinite(dist_y) and dist_x > 0 and dist_y > 0):
        return grid.res_x, grid.res_y
    return float(dist_x), float(dist_y)


def _erode3(valid: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 window is entirely valid, for an array with a 1-pixel border (output unbordered)."""
    h, w = valid.shape[0] - 2, valid.shape[1] - 2
    out = np.ones((h, w), dtype=bool)
    for r in range(3):
        for c in range(3):
            out &= valid[r:r + h, c:c + w]
    return out


def nodata_mask(data: np.ndarray, nodata: tuple[float, ...]) -> np.ndarray | None:
    """(H, W) pixels whose every channel equals its nodata value; None without nodata or when none does.

    uint8 nodata of 255 or 0 everywhere (white, black) is found with bitwise AND/OR of the bands:
    two passes over the planes instead of one comparison per band."""
    if not nodata:
        return None
    values = np.resize(np.asarray(nodata, dtype=np.float64), data.shape[2])
    if data.dtype == np.uint8 and values.min() == values.max() and values[0] in (0, 255):
        acc = data[..., 0].copy()
        combine = np.bitwise_and if values[0] == 255 else np.bitwise_or
        for c in range(1, data.shape[2]):
            combine(acc, data[..., c], out=acc)
        mask = acc == values[0]
    else:
        mask = np.ones(data.shape[:2], dtype=bool)
        for c, v in enumerate(values):
            mask &= data[..., c] == v
    return mask if mask.any() else None


# Pillow filters for the picture fast path: (same-CRS resize, reprojection mesh). Lanczos as ROK4
# forces it: Lanczos-3 for pure resampling; for reprojection Pillow has no Lanczos, and its mesh
# transform's cubic (a = -1, not the a = -0.5 of its resize and of warp's bicubic) stands in for
# ROK4's Lanczos-2.
_PIL_FILTERS: dict[str, tuple[int, int]] = {}
_BANDED: dict[int, str] = {}  # Pillow's resize filter → warp's kernel of the same formula (resize_picture)
MESH_STEP = 32  # target pixels between exactly transformed mesh nodes (halved until accurate)
MESH_MAX_ERROR = 0.125  # source pixels: interpolated positions at cell centres vs exact
# Downsampling from which the picture path antialiases before mapping. Below it the cubic kernel
# alone barely aliases, and EPSG:4326 maps of Web Mercator data (1/cos(lat) ≈ 1.4 in France)
# skip a resize of the whole mosaic; warp.py, the data path, stretches from 1.1.
PREFILTER_FROM = 1.5


def _pil_filters(kernel: str) -> tuple[int, int] | None:
    if not _PIL_FILTERS:
        from PIL import Image

        r = Image.Resampling
        _BANDED.update({r.LANCZOS: "lanczos_3", r.BICUBIC: "bicubic", r.BILINEAR: "linear"})
        _PIL_FILTERS.update({"nn": (r.NEAREST, r.NEAREST), "nearest": (r.NEAREST, r.NEAREST),
                             "linear": (r.BILINEAR, r.BILINEAR), "bilinear": (r.BILINEAR, r.BILINEAR),
                             "bicubic": (r.BICUBIC, r.BICUBIC), "cubic": (r.BICUBIC, r.BICUBIC),
                             **{k: (r.LANCZOS, r.BICUBIC) for k in ("lanczos", "lanczos_2", "lanczos_3", "lanczos_4")}})
    return _PIL_FILTERS.get(kernel.strip().lower())


def _mesh_nodes(src_grid: Grid, dst_grid: Grid, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Target pixel-corner node positions (xs, ys) every `step` pixels and their source pixel-corner
    coordinates (sx, sy), transformed exactly."""
    xs = np.unique(np.append(np.arange(0, dst_grid.width, step), dst_grid.width)).astype(np.float64)
    ys = np.unique(np.append(np.arange(0, dst_grid.height, step), dst_grid.height)).astype(np.float64)
    gx, gy = np.meshgrid(dst_grid.bbox[0] + xs * dst_grid.res_x, dst_grid.bbox[3] - ys * dst_grid.res_y)
    tx, ty = get_transformer(dst_grid.crs, src_grid.crs).transform(gx.ravel(), gy.ravel(), errcheck=False)
    sx = ((np.asarray(tx) - src_grid.bbox[0]) / src_grid.res_x).reshape(gx.shape)
    sy = ((src_grid.bbox[3] - np.asarray(ty)) / src_grid.res_y).reshape(gx.shape)
    return xs, ys, sx, sy


def _mesh_error(src_grid: Grid, dst_grid: Grid, xs: np.ndarray, ys: np.ndarray, sx: np.ndarray,
                sy: np.ndarray) -> float:
    """Largest distance (source pixels) between the bilinear guess and the exact position at the
    centres of the mesh cells."""
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
    gx, gy = np.meshgrid(dst_grid.bbox[0] + cx * dst_grid.res_x, dst_grid.bbox[3] - cy * dst_grid.res_y)
    tx, ty = get_transformer(dst_grid.crs, src_grid.crs).transform(gx.ravel(), gy.ravel(), errcheck=False)
    ex = ((np.asarray(tx) - src_grid.bbox[0]) / src_grid.res_x).reshape(gx.shape)
    ey = ((src_grid.bbox[3] - np.asarray(ty)) / src_grid.res_y).reshape(gx.shape)
    guess_x = (sx[:-1, :-1] + sx[:-1, 1:] + sx[1:, :-1] + sx[1:, 1:]) / 4
    guess_y = (sy[:-1, :-1] + sy[:-1, 1:] + sy[1:, :-1] + sy[1:, 1:]) / 4
    err = np.hypot(ex - guess_x, ey - guess_y)
    return float(np.nanmax(err)) if np.isfinite(err).any() else math.inf


def _pixel_aligned(box: tuple[float, float, float, float], width: int, height: int) -> bool:
    """A source box of whole pixels, one per target pixel: no resampling at all."""
    tol = 1e-6
    return (all(abs(v - round(v)) < tol for v in box)
            and round(box[2] - box[0]) == width and round(box[3] - box[1]) == height)


_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# A picture at the pyramid's own resolution (within 1/100 pixel over the map) but off its pixel
# grid is the pyramid's pixels shifted by under half a pixel, not a resampling that would soften
# them (MapProxy does the same). Data formats (TIFF, BIL, ASC) stay exact.
SNAP_NATIVE = True


def _snapped_crop(src: np.ndarray, col: int, row: int, width: int, height: int) -> tuple[np.ndarray, bool]:
    """A window of whole source pixels (zeros — transparent — outside); complete if all inside."""
    out = np.zeros((height, width, src.shape[2]), dtype=src.dtype)
    r0, r1 = max(row, 0), min(row + height, src.shape[0])
    c0, c1 = max(col, 0), min(col + width, src.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - row:r1 - row, c0 - col:c1 - col] = src[r0:r1, c0:c1]
    return out, (r0, r1, c0, c1) == (row, row + height, col, col + width)


def picture_resample(src: np.ndarray, src_grid: Grid, dst_grid: Grid,
                     kernel: str) -> tuple[np.ndarray, bool] | None:
    """uint8 L/LA/RGB/RGBA resampled with Pillow (C; alpha premultiplied): the fast path of PNG/JPEG.

    Same CRS: a snapped crop at the source's resolution (SNAP_NATIVE), else `Image.resize` of the
    target's box (antialiased when downsampling). Other CRS: a
    mesh of exactly transformed nodes every MESH_STEP pixels (refined until the interpolation error
    at cell centres is under MESH_MAX_ERROR source pixels), after an antialiasing resize when the
    target is coarser than the source. Returns (pixels, complete) — complete when every target
    pixel lies on the source, so an opaque source gives an opaque map — or None when Pillow has
    no such kernel, the map is the source's own pixel grid, or the transform degenerates (warp.py
    then does it)."""
    from PIL import Image

    filters = _pil_filters(kernel)
    if filters is None:
        return None
    resize_filter, mesh_filter = filters
    if src.shape[2] == 2:
        src = np.concatenate([np.repeat(src[..., :1], 3, axis=2), src[..., 1:]], axis=2)
    def as_image() -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(src if src.shape[2] > 1 else src[..., 0]), _PIL_MODES[src.shape[2]])

    width, height = dst_grid.width, dst_grid.height

    def pixels(result: Image.Image) -> np.ndarray:
        array = np.asarray(result)
        return array[..., None] if array.ndim == 2 else array

    if crs_equal(src_grid.crs, dst_grid.crs):
        box = ((dst_grid.bbox[0] - src_grid.bbox[0]) / src_grid.res_x, (src_grid.bbox[3] - dst_grid.bbox[3]) / src_grid.res_y,
               (dst_grid.bbox[2] - src_grid.bbox[0]) / src_grid.res_x, (src_grid.bbox[3] - dst_grid.bbox[1]) / src_grid.res_y)
        if _pixel_aligned(box, width, height):
            return None  # the pyramid's own pixels: warp crops them exactly
        if SNAP_NATIVE and abs((box[2] - box[0]) - width) < 0.01 and abs((box[3] - box[1]) - height) < 0.01:
            return _snapped_crop(src, round(box[0]), round(box[1]), width, height)
        eps = 1e-9
        if box[0] >= -eps and box[1] >= -eps and box[2] <= src_grid.width + eps and box[3] <= src_grid.height + eps:
            box = (max(box[0], 0.0), max(box[1], 0.0), min(box[2], src_grid.width), min(box[3], src_grid.height))
            if src.shape[2] in (1, 3) and resize_filter in _BANDED:  # opaque: no alpha to premultiply
                return resize_picture(src, box, width, height, _BANDED[resize_filter]), True
            return pixels(as_image().resize((width, height), resize_filter, box=box, reducing_gap=None)), True
    image = as_image()
    step = MESH_STEP
    xs, ys, sx, sy = _mesh_nodes(src_grid, dst_grid, step)
    if not (np.isfinite(sx).all() and np.isfinite(sy).all()):
        return None
    fx = float(np.median(np.hypot(np.diff(sx, axis=1), np.diff(sy, axis=1)) / np.diff(xs)[None, :]))
    fy = float(np.median(np.hypot(np.diff(sx, axis=0), np.diff(sy, axis=0)) / np.diff(ys)[:, None]))
    # work on the part of the mosaic the map covers (plus the kernel's reach), not whole tiles
    reach = 3 + math.ceil(2 * max(fx, fy, 1.0))
    c0, r0 = max(0, math.floor(sx.min()) - reach), max(0, math.floor(sy.min()) - reach)
    c1, r1 = min(src_grid.width, math.ceil(sx.max()) + reach), min(src_grid.height, math.ceil(sy.max()) + reach)
    if c0 >= c1 or r0 >= r1:
        return None
    if (c1 - c0) * (r1 - r0) < 0.9 * src_grid.width * src_grid.height:
        image = image.crop((c0, r0, c1, r1))
        src_grid = src_grid.subgrid(c0, r0, c1 - c0, r1 - r0)
        sx, sy = sx - c0, sy - r0
    if resize_filter != Image.Resampling.NEAREST and max(fx, fy) > PREFILTER_FROM:
        # antialias first: shrink the source close to the target resolution, then map at scale ~1
        new_w, new_h = max(1, round(src_grid.width / max(fx, 1.0))), max(1, round(src_grid.height / max(fy, 1.0)))
        image = image.resize((new_w, new_h), resize_filter, reducing_gap=None)
        src_grid = Grid(src_grid.crs, src_grid.bbox, new_w, new_h)
        xs, ys, sx, sy = _mesh_nodes(src_grid, dst_grid, step)
    while step > 2 and _mesh_error(src_grid, dst_grid, xs, ys, sx, sy) > MESH_MAX_ERROR:
        step //= 2
        xs, ys, sx, sy = _mesh_nodes(src_grid, dst_grid, step)
    # a bilinear quad stays inside its corners' hull: nodes on the source mean every pixel is
    complete = bool(sx.min() >= 0 and sy.min() >= 0 and sx.max() <= src_grid.width and sy.max() <= src_grid.height)
    return mesh_transform(image, (width, height), xs, ys, sx, sy, mesh_filter), complete


def mesh_transform(image: Image.Image, size: tuple[int, int], xs: np.ndarray, ys: np.ndarray,
                   sx: np.ndarray, sy: np.ndarray, resample: int) -> np.ndarray:
    """The pixels (height, width, bands) of `Image.transform(size, MESH, quads, resample)` for the
    mesh whose target corners are (xs, ys) and source corners (sx, sy), with the same bytes: alpha
    premultiplied around it as Pillow does, each quad's coefficients by Pillow's own float64
    formula, for every quad at once. Bicubic (the reprojected maps' filter) runs in
    render/_mesh.c, ~5x faster than Pillow's generic per-pixel filter; other filters, or an
    install without the compiled part, go through the core's transform one quad at a time (Pillow's
    MESH spends ~10 µs of Python per quad besides: ~19 ms of a 1024² map's 1,024 quads)."""
    from PIL import Image

    if image.mode in ("LA", "RGBA") and resample != Image.Resampling.NEAREST:
        premultiplied = image.convert({"LA": "La", "RGBA": "RGBa"}[image.mode])
        pixels = mesh_transform(premultiplied, size, xs, ys, sx, sy, resample)
        result = Image.frombuffer(premultiplied.mode, size, pixels.tobytes(), "raw", premultiplied.mode, 0, 1)
        return _as_pixels(result.convert(image.mode))
    if image.mode in ("1", "P"):
        resample = Image.Resampling.NEAREST
    # the quad (NW, SW, SE, NE corners) → coefficients, as PIL.Image.__transformer computes them
    x0, y0 = sx[:-1, :-1], sy[:-1, :-1]
    swx, swy, sex, sey, nex, ney = sx[1:, :-1], sy[1:, :-1], sx[1:, 1:], sy[1:, 1:], sx[:-1, 1:], sy[:-1, 1:]
    a_s = 1.0 / np.diff(xs.astype(np.int64)).astype(np.float64)[None, :]
    a_t = 1.0 / np.diff(ys.astype(np.int64)).astype(np.float64)[:, None]
    coefficients = np.stack([x0, (nex - x0) * a_s, (swx - x0) * a_t, (sex - swx - nex + x0) * a_s * a_t,
                             y0, (ney - y0) * a_s, (swy - y0) * a_t, (sey - swy - ney + y0) * a_s * a_t], axis=-1)
    left, top = xs.astype(np.int64), ys.astype(np.int64)
    if _mesh is not None and resample == Image.Resampling.BICUBIC:
        src = _as_pixels(image)
        boxes = np.stack(np.broadcast_arrays(left[None, :-1], top[:-1, None], left[None, 1:], top[1:, None]), axis=-1)
        out = np.zeros((size[1], size[0], src.shape[2]), dtype=np.uint8)
        _mesh.mesh_bicubic(np.ascontiguousarray(src), src.shape[0], src.shape[1], src.shape[2],
                           np.ascontiguousarray(boxes, dtype=np.int32), np.ascontiguousarray(coefficients),
                           out, size[1], size[0])
        return out
    out_image = Image.new(image.mode, size, None)
    image.load()
    core, source, quad = out_image.im, image.im, Image.Transform.QUAD
    rows, lefts, tops = coefficients.tolist(), left.tolist(), top.tolist()
    for j in range(len(tops) - 1):
        for i in range(len(lefts) - 1):
            core.transform((lefts[i], tops[j], lefts[i + 1], tops[j + 1]), source, quad, rows[j][i], resample, True)
    return _as_pixels(out_image)


def _as_pixels(image: Image.Image) -> np.ndarray:
    """A Pillow image's pixels as (height, width, bands) uint8."""
    array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def resampling_kernel(kernel: str, src_grid: Grid, work: Grid) -> str:
    """The kernel a map resamples with: ROK4 resamples a same-CRS map with Lanczos-3 whatever Lanczos
    the layer names (core-cpp Level::getbbox, "Lanczos_3 for resampling only"), reprojection keeps
    the layer's. Following it gives ROK4's pixels, and lets warp hand the pass to Pillow's C
    resampler, which has Lanczos-3 but no Lanczos-2 (the styled maps' cost)."""
    if kernel.strip().lower().startswith("lanczos") and crs_equal(src_grid.crs, work.crs):
        return "lanczos_3"
    return kernel


def _picture_layer(src: np.ndarray, src_grid: Grid, work: Grid, kernel: str, nodata: tuple[float, ...] | None,
                   channels: int, clear: bool = False) -> np.ndarray:
    """An unstyled 8-bit layer as a picture: opaque (1 or 3 bands) when no source pixel is nodata
    and the map lies on the source, else with an alpha band (2 or 4) made from nodata first.
    `clear`: the source is known to hold no nodata pixel (`known_clear`)."""
    if channels not in (2, 4):
        mask = None if clear else nodata_mask(src, nodata or ())
        if mask is None:
            fast = picture_resample(src, src_grid, work, kernel)
            if fast is not None and fast[1]:
                return fast[0]
        src = with_alpha(src, mask)
    fast = picture_resample(src, src_grid, work, kernel)
    if fast is not None:
        pixels = fast[0]
        return pixels if pixels.shape[2] == src.shape[2] else pixels[..., [0, 3]]  # LA went through RGBA
    return warp(src, src_grid, work, None, kernel)


def render_layer_sync(layer: MapLayer, target: Grid, plan: SourcePlan, tiles: dict[tuple[int, int], bytes],
                      picture: bool, resolution: tuple[float, float] | None = None,
                      decoded: dict[tuple[int, int], np.ndarray] | None = None) -> Raster:
    """Mosaic, warp, style one layer onto `target` (thread-safe, no I/O). `resolution`: ground
    metres per pixel for bordered styles, the whole map's when `target` is one of its strips."""
    published = layer.published
    style = layer.active_style
    border = style.border if style else 0
    nodata = tuple(published.nodata) if published.nodata else None
    if plan.tiles is None or not tiles:
        return _blank_layer(layer, target, picture)
    src = mosaic(published, plan, tiles, decoded)
    src_grid = plan.grid
    assert src_grid is not None
    work = target.subgrid(-border, -border, target.width + 2 * border, target.height + 2 * border) if border else target
    kernel = plan.kernel
    if picture and style is None and src.dtype == np.uint8:
        # nodata becomes alpha before resampling: edges antialias instead of eroding (pipeline's docstring)
        clear = bool(nodata) and published.channels not in (2, 4) and known_clear(published, plan, tiles, nodata or ())
        pixels = _picture_layer(src, src_grid, work, kernel, nodata, published.channels, clear)
        valid = pixels[..., -1] > 0 if pixels.shape[2] in (2, 4) else np.ones(target.shape, dtype=bool)
        return Raster(pixels, valid, None, target, picture=True, levels={published.id: plan.level})
    bands = style.bands_read(src.shape[2]) if style is not None else None
    pixels, valid = warp(src, src_grid, work, nodata, resampling_kernel(kernel, src_grid, work), return_mask=True,
                         bands=bands)
    out_nodata = nodata
    if style is not None:
        if resolution is not None:
            res_x, res_y = resolution
        else:
            res_x, res_y = ground_resolution(work) if border else (work.res_x, work.res_y)
        pixels = apply_style(style, pixels, nodata, res_x, res_y)
        if border:
            valid = _erode3(valid)
        out_nodata = style.output_nodata(nodata)
        if pixels.dtype == np.uint8 and pixels.shape[2] in (2, 4):
            valid = valid & (pixels[..., -1] > 0)
    return Raster(pixels, valid, out_nodata, target, levels={published.id: plan.level})


def _blank_layer(layer: MapLayer, target: Grid, picture: bool) -> Raster:
    """What a layer without data in the target gives: nodata everywhere, in the styled shape."""
    published = layer.published
    style = layer.active_style
    channels, dtype = published.channels, np.dtype(published.format.dtype)
    nodata = tuple(published.nodata) if published.nodata else None
    if picture and style is None and dtype == np.uint8:
        channels = channels if channels in (2, 4) else channels + 1
        return Raster(np.zeros(target.shape + (channels,), np.uint8), np.zeros(target.shape, bool), None, target,
                      picture=True)
    if style is not None:
        channels = style.output_channels(channels)
        dtype = style.output_dtype(dtype, published.channels)
        nodata = style.output_nodata(nodata)
    fill = np.resize(np.asarray(nodata if nodata else (0,), dtype=np.float64), channels)
    data = np.empty(target.shape + (channels,), dtype=dtype)
    data[...] = fill.astype(dtype)
    return Raster(data, np.zeros(target.shape, bool), nodata, target)


# --------------------------------------------------------------------------- composition


def to_rgba(raster: Raster) -> np.ndarray:
    """RGBA uint8 of one layer's raster; validity (and an alpha band if any) gives the alpha."""
    data = raster.data
    if data.dtype != np.uint8:
        data = np.clip(np.nan_to_num(data, nan=0.0), 0, 255).round().astype(np.uint8)
    channels = data.shape[2]
    out = np.empty(data.shape[:2] + (4,), dtype=np.uint8)
    if _pixels is not None and channels <= 4:  # one compiled pass (render/_pixels.c), ~5x numpy's band copies
        valid = b"" if raster.picture and channels in (2, 4) else np.ascontiguousarray(raster.valid, dtype=bool)
        _pixels.rgba(np.ascontiguousarray(data).reshape(-1), channels, valid, out.reshape(-1),
                     data.shape[0] * data.shape[1])
        return out
    # band by band: numpy broadcasts and concatenates along a last axis of 3 or 4 several times
    # slower than it copies 2-D planes
    for band in range(3):
        out[..., band] = data[..., band if channels >= 3 else 0]
    alpha = out[..., 3]
    if channels in (2, 4):
        alpha[...] = data[..., -1]
        if not raster.picture:
            alpha &= raster.valid.view(np.uint8) * np.uint8(255)
    else:
        np.multiply(raster.valid.view(np.uint8), np.uint8(255), out=alpha)
    return out


def _on_background(data: np.ndarray, valid: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """RGB uint8: the layer's 1 or 3 bands where valid (grey replicated), `background` elsewhere."""
    out = np.empty(data.shape[:2] + (3,), dtype=np.uint8)
    if _pixels is not None:
        _pixels.on_background(np.ascontiguousarray(data).reshape(-1), data.shape[2],
                              np.ascontiguousarray(valid, dtype=bool).reshape(-1), bytes(bytearray(background)),
                              out.reshape(-1), data.shape[0] * data.shape[1])
        return out
    for band, value in enumerate(background):
        np.copyto(out[..., band], data[..., band if data.shape[2] == 3 else 0])
        np.copyto(out[..., band], np.uint8(value), where=~valid)
    return out


def alpha_over(below: np.ndarray, above: np.ndarray) -> np.ndarray:
    """`above` composited over `below`, both RGBA uint8 with straight (unpremultiplied) alpha.

    Map layers are mostly opaque or empty: those pixels are copied (what the formula gives them
    exactly: `above`, or `below` with no colour where nothing is left), the formula runs on the others."""
    top = above[..., 3]
    out = below.copy()
    opaque = top == 255
    np.copyto(out, above, where=opaque[..., None])  # masked copies: boolean fancy indexing is several times slower
    np.copyto(out[..., :3], 0, where=((top == 0) & (below[..., 3] == 0))[..., None])
    partial = (top != 0) & ~opaque
    if partial.any():
        out[partial] = _alpha_over(below[partial], above[partial])
    return out


def _alpha_over(below: np.ndarray, above: np.ndarray) -> np.ndarray:
    """Porter-Duff "over" of (..., 4) uint8 pixels, in float32."""
    a_top = above[..., 3:4].astype(np.float32) / 255.0
    a_bot = below[..., 3:4].astype(np.float32) / 255.0
    a_out = a_top + a_bot * (1.0 - a_top)
    colour = above[..., :3] * a_top + below[..., :3] * (a_bot * (1.0 - a_top))
    colour = np.divide(colour, a_out, out=np.zeros_like(colour), where=a_out > 0)
    out = np.empty_like(above)
    out[..., :3] = np.clip(np.rint(colour), 0, 255)
    out[..., 3:] = np.clip(np.rint(a_out * 255.0), 0, 255)
    return out


def composite(rasters: Sequence[Raster], target: Grid, picture: bool,
              background: tuple[int, int, int] | None = None) -> Raster:
    """Layers drawn in order (first at the bottom). Data: later valid pixels replace earlier ones.
    `background`: the encoder lays the picture on that colour anyway (JPEG, TRANSPARENT=FALSE), so
    one 8-bit data layer becomes RGB on it at once instead of an RGBA copy flattened later (the
    same bytes: its alpha would be 0 or 255)."""
    levels = {k: v for r in rasters for k, v in r.levels.items()}
    if picture and len(rasters) == 1 and rasters[0].picture:
        return rasters[0]  # L, LA, RGB or RGBA as rendered: encoders take them all
    if picture and background is not None and len(rasters) == 1:
        raster = rasters[0]
        if raster.data.dtype == np.uint8 and raster.data.shape[2] in (1, 3):
            return Raster(_on_background(raster.data, raster.valid, background), raster.valid, None, target,
                          picture=True, levels=levels)
    if picture:
        rgba = to_rgba(rasters[0])
        for raster in rasters[1:]:
            rgba = alpha_over(rgba, to_rgba(raster))
        return Raster(rgba, rgba[..., 3] > 0, None, target, picture=True, levels=levels)
    first = rasters[0]
    if len(rasters) == 1:
        return first
    data, valid = first.data.copy(), first.valid.copy()
    for raster in rasters[1:]:
        if raster.data.shape != data.shape or raster.data.dtype != data.dtype:
            raise RenderError(f"layers of {data.shape[2]} {data.dtype} and {raster.data.shape[2]} "
                              f"{raster.data.dtype} bands cannot be merged in this format", 400)
        data[raster.valid] = raster.data[raster.valid]
        valid |= raster.valid
    return Raster(data, valid, first.nodata, target, levels=levels)


# --------------------------------------------------------------------------- strips


def _output_bytes_per_pixel(layers: Sequence[MapLayer], picture: bool) -> int:
    if picture:
        return 4
    out = 1
    for layer in layers:
        published, style = layer.published, layer.active_style
        channels, dtype = published.channels, np.dtype(published.format.dtype)
        if style is not None:
            channels, dtype = style.output_channels(channels), style.output_dtype(dtype, published.channels)
        out = max(out, channels * np.dtype(dtype).itemsize)
    return out


def estimate_memory(layers: Sequence[MapLayer], plans: Sequence[SourcePlan], target: Grid, picture: bool) -> int:
    """Bytes a render may hold at once besides its stored tiles (the caller adds those).

    The output (samples and validity) and its encoding (an encoder's flattened copy, its palette
    or Pillow copy and the encoded body, each at most the raw size), one strip's working set, and the largest strip mosaic of a layer (decoded
    tiles under one strip, as float32 planes for warp plus a copy): strips are drawn one layer at a
    time, so the number of layers adds tiles, not working memory."""
    pixels = target.width * target.height
    per_pixel = _output_bytes_per_pixel(layers, picture)
    output = pixels * (per_pixel + 1) + 3 * pixels * per_pixel
    rows = _strip_rows(target)
    strip = min(pixels, rows * target.width)
    mosaic_bytes = 0
    for layer, plan in zip(layers, plans, strict=True):
        if plan.tiles is None:
            continue
        m = plan.matrix
        cols = plan.tiles[2] - plan.tiles[0] + 1
        # tile rows under one strip: its share of the map's rows, plus the two it straddles
        share = math.ceil((plan.tiles[3] - plan.tiles[1] + 1) * rows / target.height) + 2
        tiles = min(plan.tile_count, cols * share)
        mosaic_bytes = max(mosaic_bytes, tiles * m.tile_width * m.tile_height * (layer.published.channels + 1) * 4 * 2)
    return output + strip * STRIP_BYTES_PER_PIXEL + mosaic_bytes


def _strip_rows(target: Grid, strip_pixels: int = STRIP_PIXELS) -> int:
    return max(1, min(target.height, strip_pixels // max(1, target.width)))


def draw(layers: Sequence[MapLayer], plans: Sequence[SourcePlan], fetched: list[dict[tuple[int, int], bytes]],
         target: Grid, picture: bool, deadline: Deadline | None = None, strip_pixels: int = STRIP_PIXELS,
         background: tuple[int, int, int] | None = None) -> Raster:
    """The map from its fetched tiles (worker thread): layer after layer, strip after strip, into one
    output, so its working memory is one strip's. The same result as `composite` of the layers
    drawn whole (per-pixel operations; a strip reads the map's level with the map's kernel);
    `fetched` is emptied layer by layer to free the stored tiles as soon as they are drawn;
    `background`: `composite`'s (maps drawn whole only)."""
    deadline = deadline or Deadline(None)
    rows = _strip_rows(target, strip_pixels)
    if rows >= target.height:
        rasters = []
        for layer, plan, tiles in zip(layers, plans, fetched, strict=True):
            deadline.check()
            rasters.append(render_layer_sync(layer, target, plan, tiles, picture))
        return composite(rasters, target, picture, background)
    canvas = _Canvas(target, picture, len(layers))
    for index, (layer, plan) in enumerate(zip(layers, plans, strict=True)):
        style = layer.active_style
        border = style.border if style else 0
        resolution = None
        if border:
            resolution = ground_resolution(target.subgrid(-border, -border, target.width + 2 * border,
                                                          target.height + 2 * border))
        decoded: dict[tuple[int, int], np.ndarray] = {}
        for row0 in range(0, target.height, rows):
            deadline.check()
            strip = target.subgrid(0, row0, target.width, min(rows, target.height - row0))
            sub = strip_plan(layer.published, plan, strip)
            if sub.tiles is not None:  # keep decoded tiles the strip shares with the previous one
                c0, r0, c1, r1 = sub.tiles
                for c, r in [k for k in decoded if not (c0 <= k[0] <= c1 and r0 <= k[1] <= r1)]:
                    del decoded[(c, r)]
            raster = render_layer_sync(layer, strip, sub, fetched[index], picture, resolution, decoded)
            canvas.paint(index, row0, raster)
        fetched[index] = {}
    return canvas.raster()


class _Canvas:
    """The output of a map drawn in strips: `composite`'s rules, applied strip by strip."""

    def __init__(self, target: Grid, picture: bool, layer_count: int) -> None:
        self.target, self.picture, self.layer_count = target, picture, layer_count
        self.data: np.ndarray | None = None
        self.valid = np.zeros(target.shape, dtype=bool)
        self.nodata: tuple[float, ...] | None = None
        self.own_bands = False  # a single unstyled 8-bit picture layer keeps its bands (L, LA, RGB, RGBA)
        self.levels: dict[str, str] = {}

    def _allocate(self, channels: int, dtype: np.dtype) -> np.ndarray:
        self.data = np.zeros(self.target.shape + (channels,), dtype=dtype)
        return self.data

    def paint(self, index: int, row0: int, raster: Raster) -> None:
        rows = slice(row0, row0 + raster.data.shape[0])
        self.levels.update(raster.levels)
        if self.picture and self.layer_count == 1 and raster.picture:
            self._paint_own_bands(rows, raster)
        elif self.picture:
            rgba = to_rgba(raster)
            out = self.data if self.data is not None else self._allocate(4, np.dtype(np.uint8))
            out[rows] = rgba if index == 0 else alpha_over(out[rows], rgba)
        else:
            if self.data is None:
                out = self._allocate(raster.data.shape[2], raster.data.dtype)
                self.nodata = raster.nodata
            else:
                out = self.data
            if raster.data.shape[2] != out.shape[2] or raster.data.dtype != out.dtype:
                raise RenderError(f"layers of {out.shape[2]} {out.dtype} and {raster.data.shape[2]} "
                                  f"{raster.data.dtype} bands cannot be merged in this format", 400)
            if index == 0:
                out[rows] = raster.data
            else:
                view = out[rows]
                view[raster.valid] = raster.data[raster.valid]
            self.valid[rows] |= raster.valid

    def _paint_own_bands(self, rows: slice, raster: Raster) -> None:
        """Strips of one picture layer may differ in alpha (opaque here, nodata there): the map
        gets an alpha band if any strip has one, opaque strips at 255."""
        pixels = raster.data
        if self.data is None:
            self._allocate(pixels.shape[2], pixels.dtype)
        out = self.data
        assert out is not None
        if pixels.shape[2] == out.shape[2] + 1:
            widened = np.empty(out.shape[:2] + (pixels.shape[2],), dtype=out.dtype)
            widened[..., :-1] = out
            widened[..., -1] = 255
            self.data = out = widened
        if pixels.shape[2] + 1 == out.shape[2]:
            out[rows, :, :-1] = pixels
            out[rows, :, -1] = 255
        else:
            out[rows] = pixels
        self.valid[rows] = raster.valid
        self.own_bands = True

    def raster(self) -> Raster:
        data = self.data
        assert data is not None
        if self.own_bands:
            return Raster(data, self.valid, None, self.target, picture=True, levels=self.levels)
        if self.picture:
            return Raster(data, data[..., 3] > 0, None, self.target, picture=True, levels=self.levels)
        return Raster(data, self.valid, self.nodata, self.target, levels=self.levels)
