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
  with alpha-over in LAYERS order. `picture_resample`: an opaque picture in its pyramid's CRS is
  resized with warp's own taps as banded matrix products through BLAS (`banded`), one with alpha
  by Pillow's premultiplied resize, a reprojected one by Pillow's mesh of exact pyproj nodes
  checked to 1/8 pixel — each within one grey level of warp.py (tested); opaque data stays RGB/L
  with no alpha band, and at the pyramid's own resolution a picture is its pixels snapped to the
  nearest pixel (SNAP_NATIVE). Same-CRS data and styled maps (warp) resample row-planar float
  planes through `banded` too, from the part of the mosaic their taps reach.
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

Each step has its module, and they depend downward in this order: `errors`, `gate` (admission
and deadline), `model` (MapLayer, Raster), `levels` (level and tile window), `fetch` (the I/O),
`draw` (the worker thread's pixels); this module puts them together for the services.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tileserver.catalog import PublishedLayer
from tileserver.rok4.tms import TileMatrixSet

from .draw import draw, estimate_memory
from .encode import encode_image, flattened_onto
from .errors import RenderError, RenderTooLarge
from .fetch import fetch_tiles
from .gate import Deadline, RenderGate
from .georef import Grid
from .levels import SourcePlan, plan_source
from .model import MapLayer, Raster
from .styles import Style

__all__ = ["DEFAULT_MAX_TILES", "TILE_FORMATS", "WHITE", "TileFormat", "render_map", "render_tile"]

DEFAULT_MAX_TILES = 1024  # source tiles one render may read


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
    background: tuple[int, int, int] | None = None,
) -> Any:
    """Render layers (first at the bottom) onto `target`; with `finish` (e.g. encoding), its
    result, computed in the same worker thread under the same memory budget and deadline.

    `picture`: RGBA composite for PNG/JPEG, else the data values (TIFF/BIL/ASC, feature info).
    `background`: the colour `finish` flattens the picture onto (JPEG, TRANSPARENT=FALSE), when it
    does: a single data layer is then drawn on it directly (`draw.composite`).
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
        raster = draw(map_layers, plans, fetched, target, picture, deadline, background=background)
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

    return await render_map([MapLayer(published, style)], target, picture=kind.picture, gate=gate, finish=encode,
                            background=flattened_onto(fmt, kind.transparent, background) if kind.picture else None)
