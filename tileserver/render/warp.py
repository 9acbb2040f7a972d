"""Resample and reproject a georeferenced raster onto another grid (numpy only, no I/O).

Pipeline, and why:

* **Premultiplied planes.** The source becomes float32 planes ``value*valid`` plus one
  ``valid`` plane. Every resampling stage is a linear weighted sum of those planes, so a nodata
  pixel contributes nothing, and the final ``sum(w*valid*value) / sum(w*valid)`` normalises by the
  weight of the *valid* taps only: nodata never bleeds into its neighbours, and stages compose
  without intermediate rounding. A target pixel is valid when that valid weight (its *coverage*,
  0..1) reaches ``min_coverage`` (0.5: the nodata border stays where the source puts it, instead of
  growing or shrinking by the kernel radius); centres outside the source extent are nodata.
* **Kernels** (`KERNELS`): nearest, linear, Catmull-Rom bicubic, Lanczos-2/3/4. Taps falling
  outside the source are dropped and the rest renormalised (as ROK4 does at image edges). When
  downsampling by ``f > 1`` the kernel is stretched by ``f`` (ROK4's rule) so it averages every
  source pixel under the target pixel instead of aliasing; nearest is never stretched.
* **Same CRS** → separable: target x only depends on the column and y on the row, so the 2-D
  kernel is two cheap 1-D passes. Pixel-aligned, same resolution → a plain crop (exact).
* **Other CRS** → the target pixel centres are mapped to source pixel coordinates by exact
  transforms on a coarse lattice (one node every 32 pixels, anchored on the CRS origin so adjacent
  tiles get the same nodes and join seamlessly) and bilinear interpolation in between; every cell
  is checked at its centre and edge midpoints against exact transforms and split in four until the
  interpolation error is below ``max_error`` pixels (ROK4 interpolates every 16 pixels without
  checking). Moderate downsampling stretches the kernel in the point sampler; beyond two extra
  taps per axis (linear > 2x, bicubic > 1.5x, Lanczos-3 > 1.33x) a separable pass first reduces
  the source onto an intermediate grid near the target resolution and the point sampler then uses
  the kernel at scale 1, which keeps Lanczos affordable (36 taps instead of 36·f²). Below 1.1x
  kernels are not stretched (invisible aliasing, one tap per axis saved).

Arithmetic is float32; coordinates are float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np

from . import separable
from .georef import Grid, crs_equal, get_transformer

Nodata = float | Sequence[float] | np.ndarray | None

_CHUNK = 1 << 16  # points per chunk of the point sampler: keeps temporaries in cache
_LATTICE_STEP = 32  # initial spacing, in target pixels, of exactly transformed nodes
_EXACT_CELL = 8  # cells still inaccurate at this size are transformed pixel by pixel
_MIN_STRETCH = 1.1  # downsampling factor from which kernels are widened


# --------------------------------------------------------------------------- kernels


def _linear(d: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(d), 0.0)


def _catmull_rom(d: np.ndarray) -> np.ndarray:
    """Keys cubic, a = -0.5 (Catmull-Rom; ROK4 and GDAL "cubic"): interpolating, exact on quadratics."""
    x = np.abs(d)
    near = (1.5 * x - 2.5) * x * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def _lanczos(a: int) -> Callable[[np.ndarray], np.ndarray]:
    def kernel(d: np.ndarray) -> np.ndarray:
        return np.where(np.abs(d) < a, np.sinc(d) * np.sinc(d / a), 0.0)

    return kernel


@dataclass(frozen=True)
class Kernel:
    """A resampling kernel: support half-width (source pixels at scale 1) and weight function."""

    name: str
    radius: float
    weight: Callable[[np.ndarray], np.ndarray] | None  # None = nearest neighbour
    stretch: bool = True  # widen by the downsampling factor


_NEAREST = Kernel("nn", 0.5, None, stretch=False)
_LINEAR = Kernel("linear", 1.0, _linear)
_BICUBIC = Kernel("bicubic", 2.0, _catmull_rom)
_LANCZOS = {a: Kernel(f"lanczos_{a}", float(a), _lanczos(a)) for a in (2, 3, 4)}

KERNELS: dict[str, Kernel] = {
    "nn": _NEAREST,
    "nearest": _NEAREST,
    "linear": _LINEAR,
    "bilinear": _LINEAR,
    "bicubic": _BICUBIC,
    "cubic": _BICUBIC,
    "lanczos": _LANCZOS[3],
    **{f"lanczos_{a}": k for a, k in _LANCZOS.items()},
}


def get_kernel(interpolation: str) -> Kernel:
    """Kernel for a ROK4/tileserver interpolation name (`nn`, `linear`, `bicubic`, `lanczos[_2|3|4]`)."""
    try:
        return KERNELS[interpolation.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {sorted(KERNELS)}") from None


def _taps(coord: np.ndarray, size: int, kernel: Kernel, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """1-D taps of every coordinate: indices (K, N) clipped into [0, size) and float32 weights (K, N)
    normalised over the taps that fall inside the source (outside ones get weight 0)."""
    coord = np.asarray(coord, dtype=np.float64)
    if kernel.weight is None:
        idx = np.floor(coord + 0.5).astype(np.int64)[None]
        w = ((idx >= 0) & (idx < size)).astype(np.float32)
        return np.clip(idx, 0, size - 1), w
    # below 10 % downsampling aliasing is invisible and stretching would add a tap per axis
    scale = scale if kernel.stretch and scale > _MIN_STRETCH else 1.0
    radius = kernel.radius * scale
    count = max(int(math.ceil(2.0 * radius - 1e-9)), 1)
    first = np.floor(coord - radius).astype(np.int64) + 1
    idx = first[None, :] + np.arange(count, dtype=np.int64)[:, None]
    w = kernel.weight((idx - coord[None, :]) / scale)
    w[(idx < 0) | (idx >= size)] = 0.0
    total = w.sum(axis=0)
    w /= np.where(total != 0.0, total, 1.0)
    return np.clip(idx, 0, size - 1), w.astype(np.float32)


def _tap_span(coord: np.ndarray, size: int, kernel: Kernel, scale: float) -> tuple[int, int]:
    """[first, last + 1) of the indices `_taps` gives these coordinates (clipped into the source),
    from its integer arithmetic alone: the weights (a sinc per tap for Lanczos) are not needed."""
    coord = np.asarray(coord, dtype=np.float64)
    if kernel.weight is None:
        first = np.floor(coord + 0.5).astype(np.int64)
        count = 1
    else:
        scale = scale if kernel.stretch and scale > _MIN_STRETCH else 1.0
        radius = kernel.radius * scale
        count = max(int(math.ceil(2.0 * radius - 1e-9)), 1)
        first = np.floor(coord - radius).astype(np.int64) + 1
    low, high = int(first.min()), int(first.max()) + count - 1
    return min(max(low, 0), size - 1), min(max(high, 0), size - 1) + 1


# --------------------------------------------------------------------------- planes


def _nodata_vector(nodata: Nodata, channels: int) -> np.ndarray | None:
    if nodata is None:
        return None
    values = np.atleast_1d(np.asarray(nodata, dtype=np.float64)).ravel()
    if values.size == 1:
        values = np.repeat(values, channels)
    if values.size != channels:
        raise ValueError(f"{values.size} nodata values for {channels} channels")
    return values


def source_validity(src: np.ndarray, nodata: Nodata) -> np.ndarray | None:
    """Valid-pixel mask (H, W) of a (H, W, C) raster, or None when every pixel is valid.

    A pixel is nodata when *all* its channels equal their nodata value (an RGB pixel with one
    channel at 255 is still data), and, for floats, when any channel is NaN.
    """
    nd = _nodata_vector(nodata, src.shape[2])
    packed = _packed_pixels(src, nd)
    if packed is not None:
        valid = packed[0] != packed[1]
        return None if valid.all() else valid
    invalid = None
    if nd is not None:
        equal = [np.isnan(src[..., c]) if math.isnan(v) else src[..., c] == v for c, v in enumerate(nd)]
        invalid = np.logical_and.reduce(equal)
    if src.dtype.kind == "f":
        nan = np.isnan(src).any(axis=2)
        if nan.any():
            invalid = nan if invalid is None else invalid | nan
    if invalid is None or not invalid.any():
        return None
    return ~invalid


_PACKED = {2: np.uint16, 4: np.uint32}


def _packed_pixels(src: np.ndarray, nd: np.ndarray | None) -> tuple[np.ndarray, np.integer] | None:
    """2- and 4-band uint8 pixels as one uint16/uint32 each, and the nodata pixel packed alike: one
    comparison per pixel instead of one per band and a reduction (a 1024² RGBA mosaic: ~0.2 ms
    instead of 2.5-15). None where that does not apply."""
    packed_type = _PACKED.get(src.shape[2])
    if (packed_type is None or nd is None or src.dtype != np.uint8 or src.strides[2] != 1
            or src.strides[1] != src.shape[2]):
        return None
    if not all(float(v).is_integer() and 0 <= v <= 255 for v in nd):
        return None  # NaN or out of range: no uint8 pixel equals it; the general path says so
    return src.view(packed_type)[..., 0], nd.astype(np.uint8).view(packed_type)[0]


def _planes(src: np.ndarray, valid: np.ndarray | None, planar: bool = False, zeroed: bool = False) -> np.ndarray:
    """float32 planes (H, W, P): premultiplied values, plus the valid plane when some pixels are
    nodata. `planar`: row-interleaved planes in memory (an (H, P, W) array seen as (H, W, P),
    `_row_planar`), which the separable resampler takes as they are. `zeroed`: nodata pixels are
    already 0 in every band (integers whose nodata is 0), so premultiplying is a copy."""
    count = src.shape[2] + (valid is not None)
    if planar and not (valid is not None and src.dtype.kind == "f"):
        compiled = separable.planes_u8(src, valid)
        if compiled is not None:
            return compiled.transpose(0, 2, 1)
    if planar:
        planes = np.empty((src.shape[0], count, src.shape[1]), dtype=np.float32).transpose(0, 2, 1)
    else:
        planes = np.empty(src.shape[:2] + (count,), dtype=np.float32)
    if not planar:
        planes[..., :src.shape[2]] = src
        if valid is not None:
            planes[~valid, :-1] = 0.0  # also clears NaN nodata, which would poison the sums
            planes[..., -1] = valid
        return planes
    if valid is not None:
        planes[..., -1] = valid
    invalid = None if valid is None or src.dtype.kind != "f" else ~valid
    for band in range(src.shape[2]):  # 2-D copies: several times faster than along the last axis
        plane = planes[..., band]
        if valid is None or zeroed:
            plane[...] = src[..., band]
        elif invalid is None:  # integers: times the 0/1 valid plane, one pass
            np.multiply(src[..., band], planes[..., -1], out=plane)
        else:
            plane[...] = src[..., band]
            np.copyto(plane, np.float32(0.0), where=invalid)  # also clears NaN nodata
    return planes


# --------------------------------------------------------------------------- samplers


def _resample_axis(planes: np.ndarray, idx: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Weighted sum of taps along one axis of (H, W, P) planes."""
    shape = [1, 1, 1]
    shape[axis] = -1
    out = np.take(planes, idx[0], axis=axis)
    out *= w[0].reshape(shape)
    for k in range(1, idx.shape[0]):
        tap = np.take(planes, idx[k], axis=axis)
        tap *= w[k].reshape(shape)
        out += tap
    return out


def _row_planar(planes: np.ndarray) -> bool:
    """Whether (H, W, P) planes are an (H, P, W) array in memory (`_planes(planar=True)`)."""
    return bool(planes.transpose(0, 2, 1).flags.c_contiguous)


def _resample_separable(planes: np.ndarray, cols: np.ndarray, rows: np.ndarray, kernel: Kernel,
                        scale_x: float, scale_y: float, precise: bool = False) -> np.ndarray:
    """Sample planes at the outer product of source columns `cols` and rows `rows` (1-D each).
    Row-planar planes go through `separable` (compiled, or BLAS) and come back row-planar;
    `precise`: float data, summed in double there."""
    h, w = planes.shape[:2]
    if _row_planar(planes) and kernel.weight is not None:
        sampled = separable.resample(planes.transpose(0, 2, 1), _taps(rows, h, kernel, scale_y),
                                     _taps(cols, w, kernel, scale_x), precise)
        return sampled.transpose(0, 2, 1)
    fast = _pillow_separable(planes, cols, rows, kernel, scale_x, scale_y)
    if fast is not None:
        return fast
    ci, cw = _taps(cols, w, kernel, scale_x)
    ri, rw = _taps(rows, h, kernel, scale_y)
    # crop to what the taps touch so the first pass does not work on unused source lines
    r0, r1 = int(ri.min()), int(ri.max()) + 1
    c0, c1 = int(ci.min()), int(ci.max()) + 1
    planes = planes[r0:r1, c0:c1]
    ri, ci = ri - r0, ci - c0
    # the order that does less work first: shrink the larger axis reduction early
    cost_cols_first = ci.shape[0] * planes.shape[0] * cols.size + ri.shape[0] * rows.size * cols.size
    cost_rows_first = ri.shape[0] * rows.size * planes.shape[1] + ci.shape[0] * rows.size * cols.size
    if cost_cols_first <= cost_rows_first:
        return _resample_axis(_resample_axis(planes, ci, cw, 1), ri, rw, 0)
    return _resample_axis(_resample_axis(planes, ri, rw, 0), ci, cw, 1)


# Pillow's separable resampling (C, double accumulation) has the same kernels as ours — Keys cubic
# a = -0.5, triangle, Lanczos-3 —, the same stretch when downsampling and the same renormalisation
# of the taps inside the image: on float32 planes it gives warp's sums to float rounding, 5–10×
# faster than numpy's gathers. It stretches from any downsampling (we from 1.1) and needs a
# constant scale inside the image, so only those cases go to it.
_PIL_SEPARABLE: dict[str, int] = {}


def _pillow_separable(planes: np.ndarray, cols: np.ndarray, rows: np.ndarray, kernel: Kernel,
                      scale_x: float, scale_y: float) -> np.ndarray | None:
    from PIL import Image

    if not _PIL_SEPARABLE:
        r = Image.Resampling
        _PIL_SEPARABLE.update({"linear": r.BILINEAR, "bicubic": r.BICUBIC, "lanczos_3": r.LANCZOS})
    method = _PIL_SEPARABLE.get(kernel.name)
    if method is None or cols.size < 2 or rows.size < 2:
        return None
    if not all(s > _MIN_STRETCH or s <= 1.0 for s in (scale_x, scale_y)):
        return None  # Pillow would stretch a kernel we do not stretch, or not shrink one we do
    h, w, p = planes.shape
    step_x, step_y = (cols[-1] - cols[0]) / (cols.size - 1), (rows[-1] - rows[0]) / (rows.size - 1)
    if abs(step_x - scale_x) > 1e-9 * max(1.0, scale_x) or abs(step_y - scale_y) > 1e-9 * max(1.0, scale_y):
        return None
    box = (cols[0] + 0.5 - 0.5 * step_x, rows[0] + 0.5 - 0.5 * step_y,
           cols[0] + 0.5 + (cols.size - 0.5) * step_x, rows[0] + 0.5 + (rows.size - 0.5) * step_y)
    if box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h:
        return None  # pixels off the image: numpy's taps handle them
    out = np.empty((p, rows.size, cols.size), dtype=np.float32)  # planar: each result copied whole
    for plane in range(p):
        image = Image.fromarray(np.ascontiguousarray(planes[..., plane]), "F")
        out[plane] = np.asarray(image.resize((cols.size, rows.size), method, box=box, reducing_gap=None))
    return out.transpose(1, 2, 0)


def resize_picture(src: np.ndarray, box: tuple[float, float, float, float], width: int, height: int,
                   interpolation: str) -> np.ndarray:
    """An opaque uint8 picture (H, W, C): its `box` (pixel edges, inside the source) resized to
    width × height with warp's taps, the sums rounded (`separable.resample_picture`).

    The picture path's same-CRS resize. Pillow's 8-bit resampler does the same sums one pixel at a
    time and clips its first pass to 0..255 (a Lanczos overshoot is cut before the second pass);
    these equal warp's exact sums to one level."""
    kernel = get_kernel(interpolation)
    scale_x, scale_y = (box[2] - box[0]) / width, (box[3] - box[1]) / height
    cols = box[0] + (np.arange(width) + 0.5) * scale_x - 0.5
    rows = box[1] + (np.arange(height) + 0.5) * scale_y - 0.5
    return separable.resample_picture(src, _taps(rows, src.shape[0], kernel, scale_y),
                                      _taps(cols, src.shape[1], kernel, scale_x))


def _sample_points(planes: np.ndarray, sx: np.ndarray, sy: np.ndarray, kernel: Kernel,
                   scale_x: float, scale_y: float) -> np.ndarray:
    """Sample planes at arbitrary source pixel coordinates (N,), in cache-sized chunks."""
    h, w, p = planes.shape
    flat = planes.reshape(h * w, p)
    out = np.empty((sx.size, p), dtype=np.float32)
    for start in range(0, sx.size, _CHUNK):
        stop = min(start + _CHUNK, sx.size)
        xi, xw = _taps(sx[start:stop], w, kernel, scale_x)
        yi, yw = _taps(sy[start:stop], h, kernel, scale_y)
        acc = out[start:stop]
        acc[...] = 0.0
        buf = np.empty((stop - start, p), dtype=np.float32)
        for ky in range(yi.shape[0]):
            base = yi[ky] * w
            for kx in range(xi.shape[0]):
                np.take(flat, base + xi[kx], axis=0, out=buf)
                buf *= (yw[ky] * xw[kx])[:, None]
                acc += buf
    return out


# --------------------------------------------------------------------------- coordinates


class _Mapper:
    """Exact target-pixel → source-pixel mapping through pyproj, for arbitrary index arrays."""

    def __init__(self, src_grid: Grid, dst_grid: Grid) -> None:
        self.src, self.dst = src_grid, dst_grid
        self.transformer = get_transformer(dst_grid.crs, src_grid.crs)

    def __call__(self, cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.dst.to_coords(cols, rows)
        shape = x.shape
        xs, ys = self.transformer.transform(x.ravel(), y.ravel(), errcheck=False)
        sx, sy = self.src.to_pixel(np.asarray(xs).reshape(shape), np.asarray(ys).reshape(shape))
        bad = ~(np.isfinite(sx) & np.isfinite(sy))
        if bad.any():
            sx[bad] = np.nan
            sy[bad] = np.nan
        return sx, sy


def _bilinear_fill(nodes: np.ndarray, ncol: np.ndarray, nrow: np.ndarray, width: int, height: int) -> np.ndarray:
    """Separable bilinear interpolation of node values (R, C, 2), at pixel positions ncol/nrow, to
    the pixels [ncol[0], ncol[0] + width) x [nrow[0], nrow[0] + height)."""
    cols = ncol[0] + np.arange(width, dtype=np.float64)
    rows = nrow[0] + np.arange(height, dtype=np.float64)
    i = np.clip(np.searchsorted(ncol, cols, side="right") - 1, 0, ncol.size - 2)
    j = np.clip(np.searchsorted(nrow, rows, side="right") - 1, 0, nrow.size - 2)
    fx = ((cols - ncol[i]) / (ncol[i + 1] - ncol[i]))[None, :, None]
    fy = ((rows - nrow[j]) / (nrow[j + 1] - nrow[j]))[:, None, None]
    along = nodes[:, i] * (1.0 - fx) + nodes[:, i + 1] * fx  # (R, width, 2)
    return along[j] * (1.0 - fy) + along[j + 1] * fy


def _cell_errors(corners: np.ndarray, nine: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """Max distance between exact values and bilinear predictions from the corners, at the centre
    and four edge midpoints of each cell, in `unit` (x, y) pixels. corners (N, 2, 2, 2), nine
    (N, 3, 3, 2); non-finite → inf."""
    c00, c01, c10, c11 = corners[:, 0, 0], corners[:, 0, 1], corners[:, 1, 0], corners[:, 1, 1]
    predicted = {
        (1, 1): (c00 + c01 + c10 + c11) / 4.0,
        (0, 1): (c00 + c01) / 2.0,
        (2, 1): (c10 + c11) / 2.0,
        (1, 0): (c00 + c10) / 2.0,
        (1, 2): (c01 + c11) / 2.0,
    }
    err = np.zeros(corners.shape[0])
    for (a, b), guess in predicted.items():
        d = np.hypot(*((nine[:, a, b] - guess) / unit).T)
        err = np.maximum(err, np.where(np.isfinite(d), d, np.inf))
    return err


def source_coordinates(src_grid: Grid, dst_grid: Grid, max_error: float = 0.125,
                       step: int = _LATTICE_STEP) -> tuple[np.ndarray, np.ndarray]:
    """Source pixel coordinates (cols, rows), each (height, width) float64, of every target pixel
    centre; NaN where the transform fails.

    Exact transforms on a lattice of nodes every `step` pixels, bilinear in between; each cell is
    checked at its centre and edge midpoints and split in four while the interpolation error
    exceeds `max_error` pixels — source pixels, or target pixels when downsampling (an error far
    below what the output can show is wasted work); cells still bad at 8 pixels are transformed
    pixel by pixel (cheaper than splitting further).
    """
    if step < 1 or step & (step - 1):
        raise ValueError(f"lattice step must be a power of two, got {step}")
    mapper = _Mapper(src_grid, dst_grid)
    w, h = dst_grid.width, dst_grid.height
    if w * h <= 4 * step * step or w < 2 or h < 2:
        cols, rows = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
        return mapper(cols, rows)
    # lattice anchored on the CRS origin so that adjacent, aligned grids share their nodes; the
    # work buffer covers whole cells (pixel ncol[0], nrow[0] first) so cells are block views of it
    g0c = int(math.floor(dst_grid.bbox[0] / dst_grid.res_x + 0.5))
    g0r = int(math.floor(-dst_grid.bbox[3] / dst_grid.res_y + 0.5))
    ncol = np.arange(-(g0c % step), w + step, step, dtype=np.float64)
    nrow = np.arange(-(g0r % step), h + step, step, dtype=np.float64)
    pad_c, pad_r = int(-ncol[0]), int(-nrow[0])
    nodes = np.stack(mapper(*np.meshgrid(ncol, nrow)), axis=-1)  # (R, C, 2)
    buf = _bilinear_fill(nodes, ncol, nrow, (ncol.size - 1) * step, (nrow.size - 1) * step)
    scale = _mean_scale(nodes[..., 0], nodes[..., 1], stride=1)
    unit = np.maximum(np.array(scale) / step, 1.0)

    # cells, as (row, col) indices in units of the current step, with their corner values
    cj, ci = (a.ravel() for a in np.meshgrid(np.arange(nrow.size - 1), np.arange(ncol.size - 1), indexing="ij"))
    corners = np.stack([np.stack([nodes[cj, ci], nodes[cj, ci + 1]], 1),
                        np.stack([nodes[cj + 1, ci], nodes[cj + 1, ci + 1]], 1)], 1)
    top = step
    while cj.size:
        blocks = buf.reshape(buf.shape[0] // step, step, buf.shape[1] // step, step, 2)
        half = step // 2
        offs = np.array([0, half, step], dtype=np.float64)
        cc = (ci * step - pad_c)[:, None, None] + offs[None, None, :]
        rr = (cj * step - pad_r)[:, None, None] + offs[None, :, None]
        nine = np.stack(mapper(*np.broadcast_arrays(cc, rr)), axis=-1)  # (N, 3, 3, 2)
        bad = _cell_errors(corners, nine, unit) > max_error
        if step < top:  # top-level cells were already filled by _bilinear_fill
            good = ~bad
            blocks[cj[good], :, ci[good], :] = _interpolate_cells(corners[good], step)
        nine, cj, ci = nine[bad], cj[bad], ci[bad]
        if step <= _EXACT_CELL:  # transform these cells pixel by pixel
            px = np.arange(step, dtype=np.float64)
            cols = (ci * step - pad_c)[:, None, None] + px[None, None, :]
            rows = (cj * step - pad_r)[:, None, None] + px[None, :, None]
            blocks[cj, :, ci, :] = np.stack(mapper(*np.broadcast_arrays(cols, rows)), axis=-1)
            break
        # split the bad cells in four; their corners are among the nine evaluated points
        corners = np.concatenate([nine[:, a:a + 2, b:b + 2] for a in (0, 1) for b in (0, 1)])
        cj = np.concatenate([2 * cj + a for a in (0, 1) for b in (0, 1)])
        ci = np.concatenate([2 * ci + b for a in (0, 1) for b in (0, 1)])
        keep = (ci * half < pad_c + w) & (cj * half < pad_r + h) & ((ci + 1) * half > pad_c) & ((cj + 1) * half > pad_r)
        corners, cj, ci = corners[keep], cj[keep], ci[keep]
        step = half
    out = buf[pad_r:pad_r + h, pad_c:pad_c + w]
    return out[..., 0], out[..., 1]


def _interpolate_cells(corners: np.ndarray, step: int) -> np.ndarray:
    """Bilinear interpolation of each cell's corners (N, 2, 2, 2) over its step x step pixels."""
    f = np.arange(step, dtype=np.float64) / step
    fu = f[None, None, :, None]
    fv = f[None, :, None, None]
    c = corners[:, None, None]  # (N, 1, 1, 2, 2, 2)
    return ((c[..., 0, 0, :] * (1 - fu) + c[..., 0, 1, :] * fu) * (1 - fv)
            + (c[..., 1, 0, :] * (1 - fu) + c[..., 1, 1, :] * fu) * fv)  # (N, step, step, 2)


def _mean_scale(sx: np.ndarray, sy: np.ndarray, stride: int = 16) -> tuple[float, float]:
    """Median source pixels per (`stride` apart) target pixel along the source x and y axes
    (norms of the rows of the Jacobian), from finite differences on a sample of the arrays."""
    h, w = sx.shape
    if h < 2 or w < 2:
        return 1.0, 1.0
    s = max(1, min(stride, (min(h, w) - 1) // 2))
    a, b = sx[::s, ::s], sy[::s, ::s]
    fx = np.hypot(np.diff(a, axis=1)[:-1], np.diff(a, axis=0)[:, :-1]) / s
    fy = np.hypot(np.diff(b, axis=1)[:-1], np.diff(b, axis=0)[:, :-1]) / s
    fx, fy = fx[np.isfinite(fx)], fy[np.isfinite(fy)]
    if fx.size == 0 or fy.size == 0:
        return 1.0, 1.0
    return float(np.median(fx)), float(np.median(fy))


# --------------------------------------------------------------------------- public entry point


def _needs_prefilter(kernel: Kernel, factor: float) -> bool:
    """Whether stretching the kernel in the 2-D point sampler would cost more than two extra taps
    per axis (linear beyond 2x, bicubic beyond 1.5x, Lanczos-3 beyond 1.33x): then a separable
    pre-pass is far cheaper than the (2·r·f)² taps per target pixel."""
    if not kernel.stretch:
        return False
    base = math.ceil(2 * kernel.radius - 1e-9)
    return math.ceil(2 * kernel.radius * factor - 1e-9) > base + 2


def _aligned_offset(src_grid: Grid, dst_grid: Grid) -> tuple[int, int] | None:
    """(col, row) offset of dst in src when both are the same lattice (same CRS, same resolution,
    integer shift), else None: such a warp is a crop, exact for every kernel."""
    tol = 1e-6
    if abs(dst_grid.res_x / src_grid.res_x - 1) > 1e-9 or abs(dst_grid.res_y / src_grid.res_y - 1) > 1e-9:
        return None
    fc = (dst_grid.bbox[0] - src_grid.bbox[0]) / src_grid.res_x
    fr = (src_grid.bbox[3] - dst_grid.bbox[3]) / src_grid.res_y
    if abs(fc - round(fc)) > tol or abs(fr - round(fr)) > tol:
        return None
    return round(fc), round(fr)


def _crop(src: np.ndarray, valid: np.ndarray | None, col: int, row: int, w: int, h: int,
          fill: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = np.empty((h, w, src.shape[2]), dtype=src.dtype)
    out[...] = fill
    mask = np.zeros((h, w), dtype=bool)
    sr0, sr1 = max(row, 0), min(row + h, src.shape[0])
    sc0, sc1 = max(col, 0), min(col + w, src.shape[1])
    if sr1 > sr0 and sc1 > sc0:
        dr, dc = sr0 - row, sc0 - col
        out[dr:dr + sr1 - sr0, dc:dc + sc1 - sc0] = src[sr0:sr1, sc0:sc1]
        mask[dr:dr + sr1 - sr0, dc:dc + sc1 - sc0] = True if valid is None else valid[sr0:sr1, sc0:sc1]
    if valid is not None:
        out[~mask] = fill
    return out, mask


def _threshold(min_coverage: float) -> np.float32:
    """The coverage a valid pixel reaches, in float32: numpy compares float32 planes in float32."""
    return np.float32(max(min_coverage, 1e-6) - 1e-6)


def _uint8_fill(fill: np.ndarray) -> bool:
    """Whether nodata fill values are bytes (the compiled uint8 steps write them as such)."""
    return bool(np.all((fill >= 0) & (fill <= 255) & (fill == np.floor(fill))))


def _finish(planes: np.ndarray, inside: np.ndarray, has_mask: bool, channels: int, dtype: np.dtype,
            fill: np.ndarray, min_coverage: float) -> tuple[np.ndarray, np.ndarray]:
    """Normalise premultiplied planes, decide validity, cast to the source type."""
    # the arrays in their memory order: row-planar planes (`_planes`) give the value planes as an
    # (H, C, W) view, which alone needs dividing, rounding and clipping
    planar = _row_planar(planes)
    threshold = _threshold(min_coverage)
    if planar and dtype == np.uint8 and _uint8_fill(fill):
        fused = separable.finish_u8(planes.transpose(0, 2, 1), inside, has_mask, channels, float(threshold),
                                    fill.astype(np.uint8))
        if fused is not None:
            return fused
    whole = planes.transpose(0, 2, 1)[:, :channels] if planar else planes
    if has_mask:
        coverage = planes[..., channels]
        valid = inside & (coverage >= threshold)
        # every plane, coverage too (not read again): on the whole contiguous array the division,
        # rounding and clipping are ~3x faster than on the strided view of the value planes
        # planar integers filled with 0: dividing invalid pixels by infinity is their filling
        zero_fill = planar and dtype.kind in "iub" and not fill.any()
        divisor = np.where(valid, coverage, np.float32(np.inf if zero_fill else 1.0))
        whole /= divisor[:, None, :] if planar else divisor[..., None]
    else:
        valid = inside
        zero_fill = False
    if dtype.kind in "iub":
        info = np.iinfo(dtype) if dtype.kind != "b" else np.iinfo(np.uint8)
        np.rint(whole, out=whole)
        np.clip(whole, info.min, info.max, out=whole)
    fill = fill.astype(dtype) if dtype.kind != "f" else fill
    if not planar:
        out = planes[..., :channels].astype(dtype, copy=False)
        out[~valid] = fill
        return out, valid
    # interleaved band by band: numpy is several times slower along a last axis of 3 or 4 than on planes
    invalid = ~valid
    fill32 = np.asarray(fill, dtype=np.float32)
    with np.errstate(invalid="ignore"):  # e.g. int32's 2**31 - 1 is no float32
        exact = np.array_equal(fill32.astype(dtype), fill, equal_nan=dtype.kind == "f")
    if not zero_fill and exact and invalid.any():  # on the (H, C, W) floats: masked copies of 2-D bands are slow
        np.copyto(whole, fill32[None, :, None], where=invalid[:, None, :])
    out = np.empty(planes.shape[:2] + (channels,), dtype=dtype)
    for band in range(channels):
        out[..., band] = whole[:, band]
        if not exact:
            np.copyto(out[..., band], fill[band], where=invalid)
    return out, valid


@overload
def warp(src: np.ndarray, src_grid: Grid, dst_grid: Grid, nodata: Nodata = None,
         interpolation: str = "linear", *, max_error: float = 0.125, min_coverage: float = 0.5,
         return_mask: Literal[False] = False, bands: int | None = None) -> np.ndarray: ...
@overload
def warp(src: np.ndarray, src_grid: Grid, dst_grid: Grid, nodata: Nodata = None,
         interpolation: str = "linear", *, max_error: float = 0.125, min_coverage: float = 0.5,
         return_mask: Literal[True], bands: int | None = None) -> tuple[np.ndarray, np.ndarray]: ...


def warp(src: np.ndarray, src_grid: Grid, dst_grid: Grid, nodata: Nodata = None,
         interpolation: str = "linear", *, max_error: float = 0.125, min_coverage: float = 0.5,
         return_mask: bool = False, bands: int | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Resample/reproject `src` ((H, W, C) or (H, W), uint8/float32/…) from `src_grid` onto `dst_grid`.

    `nodata`: one value per channel (or one for all), or None when the source has none; NaN
    pixels of a float source are always nodata. Target pixels without enough valid source
    (coverage < `min_coverage`) or outside the source get `nodata` (0 for integers / NaN for
    floats when `nodata` is None). Output has the source's dtype and layout; integers are rounded
    and clipped. With `return_mask`, also returns the (height, width) bool validity mask.
    `bands`: only that many leading bands are resampled and returned (a style that drops alpha);
    which pixels are nodata is still decided on every band.
    """
    squeeze = src.ndim == 2
    src3 = src[..., None] if squeeze else src
    if src3.ndim != 3 or src3.shape[:2] != (src_grid.height, src_grid.width):
        raise ValueError(f"source shape {src.shape} does not match grid {src_grid.width}x{src_grid.height}")
    kernel = get_kernel(interpolation)
    nd = _nodata_vector(nodata, src3.shape[2])
    channels = src3.shape[2] if bands is None else min(bands, src3.shape[2])
    dtype = src3.dtype
    fill = nd[:channels] if nd is not None else np.full(channels, np.nan if dtype.kind == "f" else 0.0)
    h, w = dst_grid.height, dst_grid.width

    if crs_equal(src_grid.crs, dst_grid.crs):
        offset = _aligned_offset(src_grid, dst_grid)
        if offset is not None:
            out, mask = _crop(src3[..., :channels], source_validity(src3, nodata), offset[0], offset[1], w, h, fill)
        else:
            cols, _ = src_grid.to_pixel(dst_grid.x_centres(), 0.0)
            _, rows = src_grid.to_pixel(0.0, dst_grid.y_centres())
            scale_x, scale_y = dst_grid.res_x / src_grid.res_x, dst_grid.res_y / src_grid.res_y
            # only the source the taps reach (a mosaic is whole tiles, often twice the map's pixels);
            # taps cut by the crop are the ones cut by the source's own edges, so the sums are unchanged
            c0, c1 = _tap_span(cols, src_grid.width, kernel, scale_x)
            r0, r1 = _tap_span(rows, src_grid.height, kernel, scale_y)
            part = src3[r0:r1, c0:c1]
            valid_part = source_validity(part, nodata)
            inside = (_inside(rows, src_grid.height)[:, None] & _inside(cols, src_grid.width)[None, :])
            fused = None
            if dtype == np.uint8 and kernel.weight is not None and _uint8_fill(fill):
                fused = separable.warp_u8(part[..., :channels], valid_part,
                                          _taps(rows - r0, part.shape[0], kernel, scale_y),
                                          _taps(cols - c0, part.shape[1], kernel, scale_x), inside,
                                          float(_threshold(min_coverage)), fill.astype(np.uint8))
            if fused is not None:
                out, mask = fused
            else:
                zeroed = dtype.kind in "iub" and nd is not None and not nd.any()
                planes = _resample_separable(_planes(part[..., :channels], valid_part,
                                                     planar=kernel.weight is not None, zeroed=zeroed),
                                             cols - c0, rows - r0, kernel, scale_x, scale_y, dtype.kind == "f")
                out, mask = _finish(planes, inside, valid_part is not None, channels, dtype, fill, min_coverage)
    else:
        valid_src = source_validity(src3, nodata)
        sx, sy = source_coordinates(src_grid, dst_grid, max_error)
        inside = _inside(sx, src_grid.width) & _inside(sy, src_grid.height)
        planes = _planes(src3[..., :channels], valid_src)
        fx, fy = _mean_scale(sx, sy)
        if _needs_prefilter(kernel, max(fx, fy)):
            # anti-alias first: separable pass onto a same-CRS grid close to the target resolution
            iw = max(1, round(src_grid.width / max(fx, 1.0)))
            ih = max(1, round(src_grid.height / max(fy, 1.0)))
            gx, gy = src_grid.width / iw, src_grid.height / ih
            cols = (np.arange(iw) + 0.5) * gx - 0.5
            rows = (np.arange(ih) + 0.5) * gy - 0.5
            planes = _resample_separable(planes, cols, rows, kernel, gx, gy)
            px, py = (sx + 0.5) / gx - 0.5, (sy + 0.5) / gy - 0.5
            fx, fy = fx / gx, fy / gy
        else:
            px, py = sx, sy
        px = np.where(inside, px, -1e9).ravel()
        py = np.where(inside, py, -1e9).ravel()
        sampled = _sample_points(planes, px, py, kernel, fx, fy).reshape(h, w, -1)
        out, mask = _finish(sampled, inside, valid_src is not None, channels, dtype, fill, min_coverage)

    if squeeze:
        out = out[..., 0]
    return (out, mask) if return_mask else out


def _inside(coord: np.ndarray, size: int) -> np.ndarray:
    """Pixel-centre coordinates that fall on the source (its extent is [-0.5, size - 0.5])."""
    with np.errstate(invalid="ignore"):
        return (coord >= -0.5 - 1e-9) & (coord <= size - 0.5 + 1e-9)
