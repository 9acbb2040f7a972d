"""Separable resampling with warp's taps: the compiled kernel when it was built, BLAS bands if not.

`_separable.c` makes each output row from one float line kept in cache (a vertical pass of
contiguous, vectorised sums, then each pixel's taps out of that line, its channels or planes side
by side in one vector), with the GIL released. On a 1024² map it costs about half of BLAS's
banded products (`banded.py`), which carry 3× the useful multiplications and read strided
strips, and it reads and writes uint8 pictures interleaved, with no float planes in between.

The extension is optional at build time (setup.py): without a C compiler the package installs and
the same sums run through `banded` (equal to float32 rounding; pictures to one grey level where
a sum falls on .5).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from . import banded

Taps = tuple[np.ndarray, np.ndarray]  # indices (K, N), weights (K, N) float32: warp._taps

_compiled: ModuleType | None
try:
    from . import _separable as _compiled
except ImportError:  # built without a C compiler
    _compiled = None


def compiled() -> bool:
    """Whether the compiled kernel is in use (the tests require it of an install that built it)."""
    return _compiled is not None


def _per_output(taps: Taps) -> tuple[np.ndarray, np.ndarray, int]:
    """(N, K) int32 indices and float32 weights, as the kernel reads them, and K."""
    idx, w = taps
    return (np.ascontiguousarray(idx.T, dtype=np.int32), np.ascontiguousarray(w.T, dtype=np.float32),
            int(idx.shape[0]))


def resample(planes: np.ndarray, row_taps: Taps, col_taps: Taps, precise: bool = False) -> np.ndarray:
    """(H, P, W) float32 planes resampled along rows and columns: (N_rows, P, N_cols) float32.
    `precise`: sums in double, for data far from 0 (a DEM 1,000 m up has float32 steps of 6e-5 m,
    and a slope is a difference of neighbours; the BLAS fallback sums in float32)."""
    if _compiled is None:
        return banded.resample(planes, row_taps, col_taps)
    banded.one_blas_thread()
    h, p, w = planes.shape
    out = np.empty((row_taps[0].shape[1], p, col_taps[0].shape[1]), dtype=np.float32)
    _compiled.resample_f32(np.ascontiguousarray(planes, dtype=np.float32), h, p, w,
                           *_per_output(row_taps), *_per_output(col_taps), out, precise)
    return out


def resample_picture(src: np.ndarray, row_taps: Taps, col_taps: Taps) -> np.ndarray:
    """An (H, W, C) uint8 picture, C ≤ 4, resampled: (N_rows, N_cols, C) uint8, the sums rounded
    half to even and clipped to 0..255."""
    h, w, c = src.shape
    if _compiled is None or c > 4:
        r0, r1 = int(row_taps[0].min()), int(row_taps[0].max()) + 1
        c0, c1 = int(col_taps[0].min()), int(col_taps[0].max()) + 1
        planes = np.empty((r1 - r0, c, c1 - c0), dtype=np.float32)
        for band in range(c):  # 2-D copies: numpy is slow along a last axis of 3-4
            planes[:, band] = src[r0:r1, c0:c1, band]
        sums = banded.resample(planes, (row_taps[0] - r0, row_taps[1]), (col_taps[0] - c0, col_taps[1]))
        np.rint(sums, out=sums)
        np.clip(sums, 0, 255, out=sums)
        out = np.empty((sums.shape[0], sums.shape[2], c), dtype=np.uint8)
        for band in range(c):
            out[..., band] = sums[:, band]
        return out
    banded.one_blas_thread()
    out = np.empty((row_taps[0].shape[1], col_taps[0].shape[1], c), dtype=np.uint8)
    _compiled.resample_u8(np.ascontiguousarray(src, dtype=np.uint8), h, w, c,
                          *_per_output(row_taps), *_per_output(col_taps), out)
    return out


def finish_u8(planes: np.ndarray, inside: np.ndarray, has_mask: bool, channels: int, threshold: float,
              fill: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """warp's last step for uint8 data in one compiled pass, or None without the extension.

    `planes`: (H, P, W) float32 sums, `channels` bands then (`has_mask`) the coverage; a pixel is
    valid inside the source with a coverage ≥ `threshold`; its bands are divided by the coverage,
    rounded half to even, clipped, else `fill`. Returns (H, W, channels) uint8 and the validity.
    The numpy steps read and write the planes four times over (~11 ms a 1024² map)."""
    if _compiled is None:
        return None
    h, p, w = planes.shape
    out = np.empty((h, w, channels), dtype=np.uint8)
    valid = np.empty((h, w), dtype=bool)
    _compiled.finish_u8(np.ascontiguousarray(planes, dtype=np.float32), h, p, w, channels, has_mask,
                        np.ascontiguousarray(inside, dtype=bool), threshold,
                        np.ascontiguousarray(fill, dtype=np.uint8), out, valid)
    return out, valid


def _window(src: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The C-contiguous uint8 array a (H, W, C) window lies in, flat, and the window's byte offset
    there; None for another type or layout (the kernels read the window where it is, unmoved)."""
    if _compiled is None or src.dtype != np.uint8 or src.ndim != 3 or 0 in src.shape:
        return None
    base = src
    while isinstance(base.base, np.ndarray):
        base = base.base
    h, w, c = src.shape
    if (not base.flags.c_contiguous or base.dtype != np.uint8 or src.strides[2] != 1 or src.strides[1] < c
            or src.strides[0] < w * src.strides[1]):
        return None
    return base.reshape(-1), src.__array_interface__["data"][0] - base.__array_interface__["data"][0]


def planes_u8(src: np.ndarray, valid: np.ndarray | None) -> np.ndarray | None:
    """warp's row-planar planes (H, C (+1), W) float32 of a uint8 window (H, W, C) of a C-contiguous
    array (a crop of a mosaic, read where it lies): the bands, times the validity when given, then
    the validity. None without the extension or for another layout. numpy copies band by band
    from strided views (~5 ms for a styled 1024² map's four planes)."""
    window = _window(src)
    if window is None:
        return None
    h, w, c = src.shape
    out = np.empty((h, c + (valid is not None), w), dtype=np.float32)
    mask = b"" if valid is None else np.ascontiguousarray(valid, dtype=bool)
    assert _compiled is not None
    _compiled.planes_u8(window[0], window[1], src.strides[0], src.strides[1], h, w, c, mask, out)
    return out


def warp_u8(src: np.ndarray, valid: np.ndarray | None, row_taps: Taps, col_taps: Taps, inside: np.ndarray,
            threshold: float, fill: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """warp's same-CRS resampling of a uint8 window (H, W, C ≤ 4), `planes_u8` → `resample` →
    `finish_u8` in one compiled pass with the same bytes, or None where those do not apply.

    The three steps write and read 12 MB of source planes and 16 MB of sums for a styled 1024² map
    (~20 ms, a good part of it the kernel zeroing fresh pages); fused, each source row becomes
    float planes once in a cache of a few rows and each output row is finished from one line.
    Taps index the window; `inside`, `threshold` and `fill` are `finish_u8`'s."""
    window = _window(src)
    if window is None or src.shape[2] > 4:
        return None
    h, w, c = src.shape
    rows, cols = row_taps[0].shape[1], col_taps[0].shape[1]
    out = np.empty((rows, cols, c), dtype=np.uint8)
    good = np.empty((rows, cols), dtype=bool)
    mask = b"" if valid is None else np.ascontiguousarray(valid, dtype=bool)
    assert _compiled is not None
    _compiled.warp_u8(window[0], window[1], src.strides[0], src.strides[1], h, w, c, mask,
                      *_per_output(row_taps), *_per_output(col_taps), np.ascontiguousarray(inside, dtype=bool),
                      threshold, np.ascontiguousarray(fill, dtype=np.uint8), out, good)
    return out, good
