"""From published pyramids to a raster on any grid: level choice, tile fetch, mosaic, warp, style, composite.

Shared by WMS GetMap/GetFeatureInfo and by the tile services for tiles in another grid or another
format. The shape of one render, and why:

* **Level**: the local resolution the target asks for is measured in the grid's CRS where the
  target overlaps the data (a median of Jacobians on a small lattice, so a world-wide map in
  another CRS is not judged by its degenerate corners); the coarsest published level at most
  `LEVEL_TOLERANCE` coarser than that is used, clamped to the layer's top and bottom levels.
* **Tiles**: the target footprint (plus one pixel for slope/hillshade styles) is transformed to
  the grid CRS, padded by the kernel's reach, clipped to the published limits, and its tiles are
  fetched concurrently (`asyncio.gather`). Decoding, mosaic, warp and style run in one worker
  thread per request: numpy and the codecs release the GIL, so the event loop keeps passing
  native tiles through while maps render.
* **Two kinds of output.** *Data* (TIFF/BIL/ASC, GetFeatureInfo) keeps the sample values, with
  nodata never blended into neighbours (warp's coverage rule). *Picture* (PNG/JPEG) turns an
  unstyled 8-bit layer's nodata into an alpha channel *before* resampling, so antialiased edges
  and thin lines on a nodata-coloured background survive downsampling (a black line on white
  cadastral data would otherwise vanish under the coverage threshold), then composites layers
  with alpha-over in LAYERS order. Pictures are resampled by Pillow in C (`picture_resample`:
  box resize, or a mesh of exact pyproj nodes checked to 1/8 pixel) — 3–5× faster than warp.py
  and within one grey level of it (tested); opaque data stays RGB/L with no alpha band, and at the
  pyramid's own resolution a picture is its pixels snapped to the nearest pixel (SNAP_NATIVE).
* **Strips**: a map larger than `STRIP_PIXELS` is drawn layer after layer, strip after strip of
  rows, into one output array (`draw`): each strip reads the map's level with the map's kernel
  (so strips join exactly), decodes only the tiles under it, and composites per pixel, so the
  working memory of a render is one strip's and the number of layers does not multiply it.
* **Guards**: a per-process gate (`RenderGate`) admits a render by count *and* by its estimated
  memory (`estimate_memory` plus the stored tiles' raw size, trimmed to their real size once
  fetched) against a byte budget shared by all renders in flight; a short wait, then
  `RenderBusy` → 503; a map whose estimate alone exceeds the budget, or that needs more tiles
  than allowed, is `RenderTooLarge` → 400. Both are held until the worker thread finishes, even
  when the request is cancelled. A deadline per admitted render (`Deadline`), checked by the
  thread between strips and layers, stops it with `RenderTimeout` → 503 (also when the caller
  left). Encoding runs in the same thread (`finish`), inside the budget and the deadline.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from tileserver.catalog import PublishedLayer
from tileserver.rok4.codecs import CodecError
from tileserver.rok4.slab import NotASlabError
from tileserver.rok4.tms import TileMatrix, TileMatrixSet
from tileserver.storage import StorageError

from .georef import Grid, crs_equal, get_transformer, reproject_bbox
from .styles import Style, apply_style
from .warp import get_kernel, warp

T = TypeVar("T")

LEVEL_TOLERANCE = 1.2  # accept a level up to 20 % coarser than asked (ROK4 accepts 25 %)
DEFAULT_MAX_TILES = 1024  # source tiles one render may read
DEFAULT_GATE_WAIT = 5.0  # seconds a render waits for a free slot before 503
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes all renders in flight in one process may use together
DEFAULT_RENDER_TIMEOUT = 20.0  # seconds one admitted render may take (fetch, draw, encode)
# Maps are drawn in horizontal strips of about this many pixels, layer after layer, into one
# output array: the working memory of a render is one strip's, whatever the map's size.
STRIP_PIXELS = 1 << 20
# Bytes per strip pixel the drawing of one strip may hold besides its source mosaic: float32
# planes and coordinates of warp, Pillow copies, alpha compositing temporaries (measured, rounded up).
STRIP_BYTES_PER_PIXEL = 96
# Beyond this downsampling factor (a target far coarser than the layer's top level) a stretched
# kernel would need thousands of taps per pixel for data smaller than a pixel: nearest instead.
MAX_STRETCH = 8.0
GEOD_WGS84 = "+proj=longlat +datum=WGS84 +no_defs"


# --------------------------------------------------------------------------- errors


class RenderError(Exception):
    """A render that cannot be done; `status` is the HTTP status it deserves."""

    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class RenderBusy(RenderError):
    """Every render slot stayed busy for the whole wait: try again later."""

    status = 503


class RenderTimeout(RenderBusy):
    """The render ran past its deadline (or its caller left): stopped at the next strip, 503."""


class RenderTooLarge(RenderError):
    """The request needs more source tiles or memory than one render may use: a client mistake."""

    status = 400


class RenderStorageError(RenderError):
    """Storage unavailable (503) or holding unreadable tiles (502)."""


# --------------------------------------------------------------------------- concurrency and memory gate


class RenderGate:
    """Admits renders by count and by estimated memory; both are held until the worker thread ends.

    `memory_budget` bytes are shared by every render in flight in this process: a render waits
    (FIFO, so a large map is not starved by small ones) until its estimate fits, at most `wait`
    seconds in all, then RenderBusy (503). A map whose estimate alone exceeds the budget can never
    run: RenderTooLarge (400). `timeout` is each admitted render's deadline (see `Deadline`)."""

    def __init__(self, concurrency: int, wait: float = DEFAULT_GATE_WAIT, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 timeout: float | None = DEFAULT_RENDER_TIMEOUT) -> None:
        self.concurrency = max(1, int(concurrency))
        self.wait = wait
        self.memory_budget = max(1, int(memory_budget))
        self.timeout = timeout if timeout and timeout > 0 else None
        self._semaphore = asyncio.Semaphore(self.concurrency)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.bytes_in_use = 0
        self.busy_refusals = 0

    @property
    def in_use(self) -> int:
        return self.concurrency - self._semaphore._value  # noqa: SLF001 - read-only gauge

    async def acquire(self, nbytes: int = 0) -> None:
        """A slot and `nbytes` of the memory budget, within `wait` seconds."""
        if nbytes > self.memory_budget:
            raise RenderTooLarge(f"the map needs about {_mib(nbytes)} MiB to render, more than the "
                                 f"{_mib(self.memory_budget)} MiB a render may use; ask fewer pixels or fewer layers")
        loop = asyncio.get_running_loop()
        end = loop.time() + self.wait
        await self._take_bytes(nbytes, end)
        try:
            await asyncio.wait_for(self._semaphore.acquire(), max(0.0, end - loop.time()))
        except TimeoutError:
            self.release_bytes(nbytes)
            self.busy_refusals += 1
            raise RenderBusy(f"all {self.concurrency} render slots busy for {self.wait:g} s; retry later") from None
        except BaseException:
            self.release_bytes(nbytes)
            raise

    async def _take_bytes(self, nbytes: int, end: float) -> None:
        if not self._waiters and self.bytes_in_use + nbytes <= self.memory_budget:
            self.bytes_in_use += nbytes
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, granted)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), max(0.0, end - asyncio.get_running_loop().time()))
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                self.release_bytes(nbytes)  # granted just as we gave up: give it back
            else:
                granted.cancel()
                self._waiters.remove(entry)
                self._wake()  # the head may have been us, blocking smaller renders behind
            if isinstance(exc, TimeoutError):
                self.busy_refusals += 1
                raise RenderBusy(f"renders in flight hold {_mib(self.bytes_in_use)} of the {_mib(self.memory_budget)} "
                                 f"MiB render memory for {self.wait:g} s; retry later") from None
            raise

    def _wake(self) -> None:
        while self._waiters and self.bytes_in_use + self._waiters[0][0] <= self.memory_budget:
            nbytes, granted = self._waiters.popleft()
            self.bytes_in_use += nbytes
            granted.set_result(None)

    def release_bytes(self, nbytes: int) -> None:
        """Give back part of the memory budget (a render that needs less than it reserved, or ended)."""
        if nbytes:
            self.bytes_in_use -= nbytes
            self._wake()

    def release(self, nbytes: int = 0) -> None:
        self._semaphore.release()
        self.release_bytes(nbytes)

    async def run_in_thread(self, func: Callable[[], T], nbytes: int = 0, deadline: Deadline | None = None) -> T:
        """Run CPU work in the default executor; the caller holds a slot and `nbytes`, released
        when the thread ends (not when the request does). A cancelled caller cancels `deadline`,
        so the thread stops at its next check instead of finishing for nobody."""
        future = asyncio.get_running_loop().run_in_executor(None, func)
        future.add_done_callback(lambda _f: self.release(nbytes))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if deadline is not None:
                deadline.cancel()
            raise


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.0f}"


class Deadline:
    """When a render must stop. The work runs in a thread, which cannot be interrupted: it calls
    `check` between strips and layers, and stops there once the time is up or the caller left."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds if seconds else math.inf
        self.cancelled = False

    def remaining(self) -> float | None:
        return None if self.end == math.inf else max(0.0, self.end - time.monotonic())

    def cancel(self) -> None:
        self.cancelled = True

    def check(self) -> None:
        if self.cancelled:
            raise RenderTimeout("the render was abandoned")
        if time.monotonic() > self.end:
            raise RenderTimeout(f"the map took longer than {self.seconds:g} s to render; "
                                f"ask fewer pixels, fewer layers or a smaller area")


_GATES: weakref.WeakKeyDictionary[Any, RenderGate] = weakref.WeakKeyDictionary()


def gate_for(owner: Any, concurrency: int | None = None, wait: float | None = None) -> RenderGate:
    """The gate of an application (key: its Runtime); built on first use from its settings."""
    gate = _GATES.get(owner)
    if gate is None:
        settings = getattr(owner, "settings", None)
        configured: int = getattr(settings, "render_concurrency", 8)
        gate = RenderGate(
            concurrency or configured,
            wait if wait is not None else getattr(settings, "render_queue_wait", DEFAULT_GATE_WAIT),
            getattr(settings, "render_memory_budget", DEFAULT_MEMORY_BUDGET),
            getattr(settings, "render_timeout", DEFAULT_RENDER_TIMEOUT),
        )
        _GATES[owner] = gate
    return gate


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class MapLayer:
    """One layer of a map: what to draw, with which style (None = as stored) and kernel."""

    published: PublishedLayer
    style: Style | None = None
    interpolation: str | None = None  # None: the style's, else the layer's `resampling`

    @property
    def active_style(self) -> Style | None:
        return None if self.style is None or self.style.is_identity else self.style

    @property
    def kernel_name(self) -> str:
        style = self.active_style
        for part in (style.estompage, style.pente) if style else ():
            if part is not None and part.interpolation:
                return part.interpolation
        return self.interpolation or self.published.layer.resampling or "linear"


@dataclass
class Raster:
    """A rendered image on `grid`: samples (H, W, C), validity (H, W) and the nodata of the samples."""

    data: np.ndarray
    valid: np.ndarray
    nodata: tuple[float, ...] | None
    grid: Grid
    picture: bool = False  # RGBA uint8 composite (alpha = transparency) rather than data values
    levels: dict[str, str] = field(default_factory=dict)  # layer id → level read (diagnostics)

    @property
    def empty(self) -> bool:
        return not bool(self.valid.any())


def style_usable(style: Style, channels: int, sample_format: str | None) -> bool:
    """Whether a style can run on a layer's data (neighbourhood and palette styles need 1 band)."""
    if sample_format is None:
        return style.is_identity
    if style.border or style.palette or style.terrainrgb:
        return channels == 1
    if style.colorize:
        return channels in (3, 4)
    return True


# --------------------------------------------------------------------------- level and window


@dataclass(frozen=True)
class SourcePlan:
    """What to read for one layer: a level, the inclusive tile range, and the mosaic grid."""

    level: str
    matrix: TileMatrix
    tiles: tuple[int, int, int, int] | None  # min_col, min_row, max_col, max_row; None = nothing to read
    grid: Grid | None
    kernel: str = "nn"  # the interpolation actually used (see MAX_STRETCH)
    overlap: tuple[float, float, float, float] | None = None  # the target's part with data (target CRS)
    pad: float = 0.0  # grid-CRS margin around the footprint: the kernel's reach and the style border

    @property
    def tile_count(self) -> int:
        if self.tiles is None:
            return 0
        c0, r0, c1, r1 = self.tiles
        return (c1 - c0 + 1) * (r1 - r0 + 1)


def _intersection(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float, float, float] | None:
    box = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box if box[0] < box[2] and box[1] < box[3] else None


def local_resolution(target: Grid, area: tuple[float, float, float, float], grid_crs: str, samples: int = 5) -> float:
    """Grid-CRS units per target pixel over `area` (target CRS): median of the local area scale.

    The square root of the Jacobian determinant at a lattice of points is what a pixel covers in
    the source; the median ignores points where the transform degenerates."""
    if crs_equal(target.crs, grid_crs):
        return math.sqrt(target.res_x * target.res_y)
    t = (np.arange(samples) + 0.5) / samples
    xs = area[0] + t * (area[2] - area[0])
    ys = area[1] + t * (area[3] - area[1])
    x, y = (a.ravel() for a in np.meshgrid(xs, ys))
    dx, dy = target.res_x, target.res_y
    transformer = get_transformer(target.crs, grid_crs)
    px, py = (np.asarray(v) for v in transformer.transform(np.concatenate([x, x + dx, x]),
                                                          np.concatenate([y, y, y + dy]), errcheck=False))
    n = x.size
    jx = (px[n:2 * n] - px[:n], py[n:2 * n] - py[:n])
    jy = (px[2 * n:] - px[:n], py[2 * n:] - py[:n])
    scale = np.sqrt(np.abs(jx[0] * jy[1] - jx[1] * jy[0]))
    scale = scale[np.isfinite(scale) & (scale > 0)]
    if scale.size == 0:
        src = reproject_bbox(area, target.crs, grid_crs)
        cols = target.width * (area[2] - area[0]) / (target.bbox[2] - target.bbox[0])
        rows = target.height * (area[3] - area[1]) / (target.bbox[3] - target.bbox[1])
        return math.sqrt((src[2] - src[0]) / max(cols, 1e-9) * (src[3] - src[1]) / max(rows, 1e-9))
    return float(np.median(scale))


def choose_level(published: PublishedLayer, resolution: float) -> str:
    """Coarsest published level no more than LEVEL_TOLERANCE coarser than asked; else the bottom."""
    tms = published.tms
    fine_enough = [lv for lv in published.level_ids if tms.get(lv).cell_size <= resolution * LEVEL_TOLERANCE]  # type: ignore[union-attr]
    return fine_enough[0] if fine_enough else published.bottom_level


def plan_source(published: PublishedLayer, target: Grid, kernel_name: str, border: int = 0) -> SourcePlan:
    """Level, tiles and mosaic grid for drawing `published` on `target` (extended by `border` pixels)."""
    tms = published.tms
    grid_crs = tms.crs
    bottom = published.matrix(published.bottom_level)
    try:
        data_in_target = reproject_bbox(published.native_bbox, grid_crs, target.crs)
    except ValueError:
        data_in_target = target.bbox
    overlap = _intersection(target.bbox, data_in_target)
    if overlap is None:
        return SourcePlan(published.bottom_level, bottom, None, None)
    resolution = local_resolution(target, overlap, grid_crs)
    level = choose_level(published, resolution)
    matrix = published.matrix(level)
    try:
        footprint = reproject_bbox(overlap, target.crs, grid_crs, densify=33)
    except ValueError:
        return SourcePlan(level, matrix, None, None)
    scale = max(1.0, resolution / matrix.cell_size)
    if scale > MAX_STRETCH:
        kernel_name = "nn"
    kernel = get_kernel(kernel_name)
    # reach of the kernel in source pixels (stretched when downsampling), plus the style border
    # and two pixels for the reprojection's curvature between densified edge points
    pad_px = math.ceil(kernel.radius * (scale if kernel.stretch else 1.0)) + 2 + math.ceil(border * scale)
    pad = pad_px * matrix.cell_size
    footprint = (footprint[0] - pad, footprint[1] - pad, footprint[2] + pad, footprint[3] + pad)
    tiles = matrix.bbox_to_tile_range(footprint)
    limits = published.limits.get(level)
    if tiles is None or limits is None:
        return SourcePlan(level, matrix, None, None)
    c0, r0 = max(tiles[0], limits.min_col), max(tiles[1], limits.min_row)
    c1, r1 = min(tiles[2], limits.max_col), min(tiles[3], limits.max_row)
    if c0 > c1 or r0 > r1:
        return SourcePlan(level, matrix, None, None)
    grid = Grid(grid_crs, matrix.range_bbox(c0, r0, c1, r1), (c1 - c0 + 1) * matrix.tile_width,
                (r1 - r0 + 1) * matrix.tile_height)
    return SourcePlan(level, matrix, (c0, r0, c1, r1), grid, kernel_name, overlap, pad)


def strip_plan(published: PublishedLayer, plan: SourcePlan, strip: Grid) -> SourcePlan:
    """The part of a map's plan one strip of the map reads: same level and kernel (a strip must
    not choose its own, or strips would not join), tiles under the strip's footprint only."""
    if plan.tiles is None or plan.overlap is None:
        return plan
    overlap = _intersection(strip.bbox, plan.overlap)
    if overlap is None:
        return SourcePlan(plan.level, plan.matrix, None, None, plan.kernel)
    try:
        footprint = reproject_bbox(overlap, strip.crs, published.tms.crs, densify=33)
    except ValueError:
        return plan
    pad = plan.pad
    tiles = plan.matrix.bbox_to_tile_range((footprint[0] - pad, footprint[1] - pad, footprint[2] + pad,
                                            footprint[3] + pad))
    if tiles is None:
        return SourcePlan(plan.level, plan.matrix, None, None, plan.kernel)
    c0, r0 = max(tiles[0], plan.tiles[0]), max(tiles[1], plan.tiles[1])
    c1, r1 = min(tiles[2], plan.tiles[2]), min(tiles[3], plan.tiles[3])
    if c0 > c1 or r0 > r1:
        return SourcePlan(plan.level, plan.matrix, None, None, plan.kernel)
    m = plan.matrix
    grid = Grid(plan.grid.crs if plan.grid else published.tms.crs, m.range_bbox(c0, r0, c1, r1),
                (c1 - c0 + 1) * m.tile_width, (r1 - r0 + 1) * m.tile_height)
    return SourcePlan(plan.level, m, (c0, r0, c1, r1), grid, plan.kernel, plan.overlap, pad)


# --------------------------------------------------------------------------- fetch


async def fetch_tiles(published: PublishedLayer, plan: SourcePlan) -> dict[tuple[int, int], bytes]:
    """Stored bytes of every tile of the plan that has data, read concurrently."""
    if plan.tiles is None:
        return {}
    c0, r0, c1, r1 = plan.tiles
    keys = [(c, r) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
    try:
        blobs = await asyncio.gather(*(published.get_tile(plan.level, c, r) for c, r in keys))
    except NotASlabError as exc:
        raise RenderStorageError(f"layer {published.id}: stored data is unreadable ({exc})", 502) from exc
    except (StorageError, OSError) as exc:
        raise RenderStorageError(f"layer {published.id}: storage unavailable ({exc})", 503) from exc
    return {key: blob for key, blob in zip(keys, blobs, strict=True) if blob is not None}


# --------------------------------------------------------------------------- CPU work (worker thread)


def mosaic(published: PublishedLayer, plan: SourcePlan, tiles: dict[tuple[int, int], bytes],
           decoded: dict[tuple[int, int], np.ndarray] | None = None) -> np.ndarray:
    """One array from the plan's tiles (`tiles` may hold more); absent tiles are the pyramid's
    nodata. `decoded` keeps decoded tiles for the next strip, which shares a row of them."""
    assert plan.tiles is not None and plan.grid is not None
    owner = published.owners[plan.level]
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
                pixels = owner.decode(plan.level, tiles[(c, r)])
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


def _alpha_band(mask: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    """uint8 alpha (H, W, 1): 0 under the mask, 255 elsewhere."""
    if mask is None:
        return np.full(shape + (1,), 255, dtype=np.uint8)
    alpha = (~mask).astype(np.uint8)
    alpha *= 255
    return alpha[..., None]


# Pillow filters for the picture fast path: (same-CRS resize, reprojection mesh). Lanczos as ROK4
# forces it: Lanczos-3 for pure resampling; for reprojection Pillow has no Lanczos, its Keys cubic
# (the same kernel as warp's bicubic) stands in for ROK4's Lanczos-2.
_PIL_FILTERS: dict[str, tuple[int, int]] = {}
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
    image = Image.fromarray(np.ascontiguousarray(src if src.shape[2] > 1 else src[..., 0]), _PIL_MODES[src.shape[2]])
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
            return pixels(image.resize((width, height), resize_filter, box=box, reducing_gap=None)), True
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
    mesh = [((int(xs[i]), int(ys[j]), int(xs[i + 1]), int(ys[j + 1])),
             (sx[j, i], sy[j, i], sx[j + 1, i], sy[j + 1, i], sx[j + 1, i + 1], sy[j + 1, i + 1], sx[j, i + 1], sy[j, i + 1]))
            for j in range(len(ys) - 1) for i in range(len(xs) - 1)]
    return pixels(image.transform((width, height), Image.Transform.MESH, mesh, resample=mesh_filter)), complete


def _picture_layer(src: np.ndarray, src_grid: Grid, work: Grid, kernel: str, nodata: tuple[float, ...] | None,
                   channels: int) -> np.ndarray:
    """An unstyled 8-bit layer as a picture: opaque (1 or 3 bands) when no source pixel is nodata
    and the map lies on the source, else with an alpha band (2 or 4) made from nodata first."""
    if channels not in (2, 4):
        mask = nodata_mask(src, nodata or ())
        if mask is None:
            fast = picture_resample(src, src_grid, work, kernel)
            if fast is not None and fast[1]:
                return fast[0]
        src = np.concatenate([src, _alpha_band(mask, src.shape[:2])], axis=2)
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
        # nodata becomes alpha before resampling: edges antialias instead of eroding (module docstring)
        pixels = _picture_layer(src, src_grid, work, kernel, nodata, published.channels)
        valid = pixels[..., -1] > 0 if pixels.shape[2] in (2, 4) else np.ones(target.shape, dtype=bool)
        return Raster(pixels, valid, None, target, picture=True, levels={published.id: plan.level})
    pixels, valid = warp(src, src_grid, work, nodata, kernel, return_mask=True)
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
    colour = data[..., :3] if channels >= 3 else np.repeat(data[..., :1], 3, axis=2)
    if channels in (2, 4):
        alpha = data[..., -1]
        if not raster.picture:
            alpha = np.where(raster.valid, alpha, 0).astype(np.uint8)
    else:
        alpha = np.where(raster.valid, 255, 0).astype(np.uint8)
    return np.concatenate([colour, alpha[..., None]], axis=2)


def alpha_over(below: np.ndarray, above: np.ndarray) -> np.ndarray:
    """`above` composited over `below`, both RGBA uint8 with straight (unpremultiplied) alpha.

    Map layers are mostly opaque or empty: those pixels are copied (what the formula gives them
    exactly: `above`, or `below` with no colour where nothing is left), the formula runs on the others."""
    top = above[..., 3]
    out = below.copy()
    opaque = top == 255
    out[opaque] = above[opaque]
    out[(top == 0) & (below[..., 3] == 0), :3] = 0
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


def composite(rasters: Sequence[Raster], target: Grid, picture: bool) -> Raster:
    """Layers drawn in order (first at the bottom). Data: later valid pixels replace earlier ones."""
    levels = {k: v for r in rasters for k, v in r.levels.items()}
    if picture and len(rasters) == 1 and rasters[0].picture:
        return rasters[0]  # L, LA, RGB or RGBA as rendered: encoders take them all
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


# --------------------------------------------------------------------------- entry points


def _as_map_layers(layers: Sequence[MapLayer | tuple[PublishedLayer, Style | None]],
                   interpolation: str | None) -> list[MapLayer]:
    out = []
    for item in layers:
        layer = item if isinstance(item, MapLayer) else MapLayer(item[0], item[1])
        if interpolation and layer.interpolation is None:
            layer = MapLayer(layer.published, layer.style, interpolation)
        out.append(layer)
    return out


async def render_map(
    layers: Sequence[MapLayer | tuple[PublishedLayer, Style | None]],
    target: Grid,
    *,
    interpolation: str | None = None,
    picture: bool = True,
    gate: RenderGate | None = None,
    max_tiles: int = DEFAULT_MAX_TILES,
    finish: Callable[[Raster], Any] | None = None,
) -> Any:
    """Render layers (first at the bottom) onto `target`; with `finish` (e.g. encoding), its
    result, computed in the same worker thread under the same memory budget and deadline.

    `picture`: RGBA composite for PNG/JPEG, else the data values (TIFF/BIL/ASC, feature info).
    Raises RenderTooLarge (too many tiles, or more memory than the gate's budget), RenderBusy (no
    slot or memory within the wait), RenderTimeout (past the gate's deadline), RenderStorageError,
    RenderError."""
    if not layers:
        raise RenderError("no layer to render", 400)
    map_layers = _as_map_layers(layers, interpolation)
    plans = []
    for layer in map_layers:
        style = layer.active_style
        plans.append(plan_source(layer.published, target, layer.kernel_name, style.border if style else 0))
    total = sum(p.tile_count for p in plans)
    if total > max_tiles:
        raise RenderTooLarge(f"the request needs {total} source tiles, more than the {max_tiles} allowed; "
                             f"ask a smaller BBOX or fewer pixels")
    stored_bound = sum(_tile_bytes(layer.published, plan) * plan.tile_count
                       for layer, plan in zip(map_layers, plans, strict=True))
    reserved = estimate_memory(map_layers, plans, target, picture) + stored_bound
    if gate is not None:
        await gate.acquire(reserved)
    deadline = Deadline(gate.timeout if gate is not None else None)  # from admission: the queue has its own wait
    try:
        fetches = asyncio.gather(*(fetch_tiles(layer.published, plan)
                                   for layer, plan in zip(map_layers, plans, strict=True)))
        try:
            fetched = list(await asyncio.wait_for(fetches, deadline.remaining()))
        except TimeoutError:
            deadline.check()
            raise
        if gate is not None:  # stored tiles are usually far smaller than their raw size: free the rest
            held = sum(len(blob) for tiles in fetched for blob in tiles.values())
            gate.release_bytes(max(0, stored_bound - held))
            reserved -= max(0, stored_bound - held)
    except BaseException:
        if gate is not None:
            gate.release(reserved)
        raise

    def work() -> Any:
        raster = draw(map_layers, plans, fetched, target, picture, deadline)
        if finish is None:
            return raster
        deadline.check()
        return finish(raster)

    if gate is not None:
        return await gate.run_in_thread(work, reserved, deadline)
    return await asyncio.to_thread(work)


def _tile_bytes(published: PublishedLayer, plan: SourcePlan) -> int:
    """Raw bytes of one tile of the plan's level."""
    m = plan.matrix
    return m.tile_width * m.tile_height * published.channels * np.dtype(published.format.dtype).itemsize


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
         target: Grid, picture: bool, deadline: Deadline | None = None, strip_pixels: int = STRIP_PIXELS) -> Raster:
    """The map from its fetched tiles (worker thread): layer after layer, strip after strip, into one
    output, so its working memory is one strip's. The same result as `composite` of the layers
    drawn whole (per-pixel operations; a strip reads the map's level with the map's kernel);
    `fetched` is emptied layer by layer to free the stored tiles as soon as they are drawn."""
    deadline = deadline or Deadline(None)
    rows = _strip_rows(target, strip_pixels)
    if rows >= target.height:
        rasters = []
        for layer, plan, tiles in zip(layers, plans, fetched, strict=True):
            deadline.check()
            rasters.append(render_layer_sync(layer, target, plan, tiles, picture))
        return composite(rasters, target, picture)
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


# --------------------------------------------------------------------------- tiles in other grids


@dataclass(frozen=True)
class TileFormat:
    """An output format of a converted tile: MIME type and whether it is a picture or data."""

    mime: str
    picture: bool
    transparent: bool


TILE_FORMATS: dict[str, TileFormat] = {
    "image/png": TileFormat("image/png", True, True),
    "image/jpeg": TileFormat("image/jpeg", True, False),
    "image/tiff": TileFormat("image/tiff", False, False),
    "image/x-bil;bits=32": TileFormat("image/x-bil;bits=32", False, False),
}
WHITE = (255, 255, 255)


async def render_tile(
    published: PublishedLayer,
    tms: TileMatrixSet,
    level: str,
    col: int,
    row: int,
    style: Style | None,
    fmt: str,
    *,
    gate: RenderGate | None = None,
    background: tuple[int, int, int] = WHITE,
) -> tuple[bytes, str]:
    """A tile of any grid (`tms`, e.g. a layer's extra_tilematrixsets) in any output format.

    Used for tiles the pyramid cannot pass through: another grid (reprojected), another format
    (PNG from JPEG, JPEG/PNG from FLOAT32 through a style). Returns (body, content type)."""
    from .encode import encode_image

    matrix = tms.get(level)
    if matrix is None:
        raise RenderError(f"no level {level!r} in {tms.id}", 400)
    if fmt not in TILE_FORMATS:
        raise RenderError(f"format {fmt!r} cannot be produced for tiles", 400)
    kind = TILE_FORMATS[fmt]
    target = Grid(tms.crs, matrix.tile_bbox(col, row), matrix.tile_width, matrix.tile_height)

    def encode(raster: Raster) -> tuple[bytes, str]:
        if kind.picture:
            return encode_image(raster.data, fmt, transparent=kind.transparent, bgcolor=background)
        return encode_image(raster.data, fmt, nodata=raster.nodata, grid=target)

    return await render_map([MapLayer(published, style)], target, picture=kind.picture, gate=gate, finish=encode)
