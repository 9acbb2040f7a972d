"""Bottom-level pixels: sources resampled (and reprojected) onto one slab with the render warp.

Sources go to `warp` as float32 with NaN where they hold no data, so nodata, alpha and image
edges all become one validity mask and never bleed into data; later sources are painted over
earlier ones where they are valid (ROK4's mosaic order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tileserver.render.georef import Grid, reproject_bbox
from tileserver.render.warp import get_kernel, warp

from .encode import SlabLayout
from .errors import WriterError
from .sources import SourceInfo

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# read at most this many source pixels per slab pixel before decimating the read (very coarse
# bottom levels): the warp's stretched kernels would average them anyway
_MAX_READ_RATIO = 16


def convert_channels(pixels: np.ndarray, src_alpha: bool, channels: int) -> np.ndarray:
    """(h, w, c) float32 → (h, w, channels): gray ↔ colour, alpha added (opaque) or dropped."""
    have = pixels.shape[2]
    if have == channels:
        return pixels
    colour = pixels[..., : have - 1] if src_alpha else pixels
    alpha = pixels[..., -1:] if src_alpha else np.full(pixels.shape[:2] + (1,), 255, np.float32)
    want_alpha = channels in (2, 4)
    want_colour = 3 if channels >= 3 else 1
    if colour.shape[2] != want_colour:
        if want_colour == 3:
            colour = np.repeat(colour, 3, axis=2)
        else:
            colour = (colour @ _LUMA)[..., None]
    return np.concatenate([colour, alpha], axis=2) if want_alpha else colour


def read_for_slab(source: SourceInfo, slab_grid: Grid, interpolation: str,
                  channels: int) -> tuple[np.ndarray, Grid] | None:
    """Float32 window of `source` covering the slab (padded for the kernel), NaN where invalid."""
    try:
        bbox = reproject_bbox(slab_grid.bbox, slab_grid.crs, source.crs)
    except ValueError:
        return None
    # pad: kernel support, stretched when the slab is coarser than the source
    ratio = max((bbox[2] - bbox[0]) / slab_grid.width / source.res_x,
                (bbox[3] - bbox[1]) / slab_grid.height / source.res_y, 1.0)
    pad = int(math.ceil(get_kernel(interpolation).radius * ratio)) + 2
    window = source.pixel_window(bbox, pad)
    if window is None:
        return None
    col0, row0, col1, row1 = window
    step = 1
    read_pixels = (col1 - col0) * (row1 - row0)
    if read_pixels > _MAX_READ_RATIO * slab_grid.width * slab_grid.height:
        step = int(math.sqrt(read_pixels / (_MAX_READ_RATIO * slab_grid.width * slab_grid.height)))
    raw = source.read(col0, row0, col1, row1, step)
    valid = source.validity(raw)
    pixels = convert_channels(raw.astype(np.float32), source.alpha, channels)  # a new array: ours to edit
    if not valid.all():
        pixels[~valid] = np.nan
    return pixels, source.window_grid(col0, row0, col1, row1, step)


def render_sources(sources: Sequence[SourceInfo], slab_grid: Grid, layout: SlabLayout, interpolation: str,
                   background: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mosaic of `sources` (later on top) on the slab grid, over `background` when given."""
    if background is not None:
        data, mask = np.array(background[0], copy=True), np.array(background[1], copy=True)
    else:
        data, mask = layout.empty()
    for source in sources:
        part = covered_part(source, slab_grid)
        if part is None:
            continue
        col0, row0, col1, row1 = part
        target = slab_grid.subgrid(col0, row0, col1 - col0, row1 - row0)
        window = read_for_slab(source, target, interpolation, layout.channels)
        if window is None:
            continue
        pixels, grid = window
        del window
        try:
            out, valid = warp(pixels, grid, target, None, interpolation, return_mask=True)
        except ValueError as exc:
            raise WriterError(f"{source.path}: cannot resample onto the grid ({exc})") from None
        del pixels
        if not valid.any():
            continue
        if layout.sample_format == "UINT8":
            np.rint(out, out=out)
            np.clip(out, 0, 255, out=out)
        view, view_mask = data[row0:row1, col0:col1], mask[row0:row1, col0:col1]
        if valid.all():
            view[...] = out
        else:
            np.copyto(view, out, casting="unsafe", where=valid[..., None])
        view_mask |= valid
    return data, mask


def covered_part(source: SourceInfo, slab_grid: Grid) -> tuple[int, int, int, int] | None:
    """Pixel window (col0, row0, col1, row1) of the slab the source's footprint covers, one pixel
    of margin: slabs on the edge of an image only warp the part that can hold data."""
    try:
        footprint = reproject_bbox(source.bbox, source.crs, slab_grid.crs)
    except ValueError:
        return None
    col0, row0, col1, row1 = slab_grid.pixel_window(footprint, pad=1)
    col0, row0 = max(col0, 0), max(row0, 0)
    col1, row1 = min(col1, slab_grid.width), min(row1, slab_grid.height)
    if col0 >= col1 or row0 >= row1:
        return None
    return col0, row0, col1, row1
