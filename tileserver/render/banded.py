"""Separable resampling as banded matrix products, run by BLAS.

A separable pass sums a few taps per output pixel (6 for Lanczos-3 at scale ≤ 1). Pillow does it
one output pixel at a time in scalar C (~6 ms per 1024² float plane); numpy's gathers are slower
still. Written as products of each block of B outputs' dense weight band — the source columns
(or rows) the block's taps touch — the same sums go through BLAS's vectorised kernels: ~2.5× less
CPU than Pillow for the five float planes of a styled 1024² map, though each band carries
(B·scale + taps) / taps times the useful multiplications. The taps are warp's own
(`warp._taps`: kernel, stretch and renormalisation at the edges), so only float32 rounding of the
sums differs from warp's numpy path (< 1e-4 of a grey level here).

Planes are laid out (H, P, W) — row-interleaved planes — so both passes are plain products on
2-D views: the column pass is (H·P, W) × (W, B) per block, the row pass (B, H) × (H, P·W'). The
column pass reads a strided strip of every row, which BLAS runs well only for wide bands, so its
blocks are wider than the row pass's (`_column_block`).

BLAS is held to one thread in this process: renders already run one per worker thread, and
OpenBLAS's own threads would spin on the same cores (measured: 2–4× the CPU per map).
"""

from __future__ import annotations

import threading

import numpy as np

BLOCK = 16  # outputs per band of the row pass: 8 wastes calls, 32 and more waste multiplications
COLUMN_SPAN = 48  # source columns a band of the column pass aims to read (see _column_block)

_limited = threading.Event()


def one_blas_thread() -> None:
    """Holds BLAS to one thread, once per process (render.separable calls it too: numpy's other
    products, in styles and transforms, would start OpenBLAS's spinning threads as well)."""
    if _limited.is_set():
        return
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    _limited.set()


def _column_block(idx: np.ndarray) -> int:
    """Outputs per band of the column pass. Its product reads a strided strip of every row, so BLAS
    runs it far below speed for narrow bands: the band is widened until it reads ~COLUMN_SPAN source
    columns (32-48 outputs when enlarging, ~24 when reducing by 1.7: measured fastest, 25-40 %
    less CPU than 16 at 1024² and 2048²), a multiple of 8 between 8 and 64."""
    taps, count = idx.shape
    step = (int(idx[0, -1]) - int(idx[0, 0])) / max(count - 1, 1)  # source columns per output
    block = (COLUMN_SPAN - taps) / max(step, 1e-6)
    return int(min(64, max(8, 8 * round(block / 8))))


def _bands(idx: np.ndarray, w: np.ndarray, block: int = BLOCK) -> list[tuple[int, int, int, int, np.ndarray]]:
    """(out0, out1, src0, src1, weights (src1 - src0, out1 - out0)) per block of `block` outputs,
    all scattered in one call."""
    taps, count = idx.shape
    blocks = -(-count // block)
    block_of = np.arange(count) // block
    padded = np.full(blocks * block, np.iinfo(np.int64).max)
    padded[:count] = idx.min(axis=0)
    first = padded.reshape(blocks, block).min(axis=1)
    local = idx - first[block_of]
    spans = np.zeros(blocks, dtype=np.int64)
    np.maximum.at(spans, block_of, local.max(axis=0) + 1)
    weights = np.zeros((blocks, int(spans.max()), block), dtype=np.float32)
    # taps clipped at an edge repeat an index: add, not assign (their weights are 0 anyway)
    np.add.at(weights, (np.broadcast_to(block_of, idx.shape), local, np.broadcast_to(np.arange(count) % block, idx.shape)), w)
    return [(b * block, min((b + 1) * block, count), int(first[b]), int(first[b] + spans[b]),
             weights[b, :spans[b], :min(block, count - b * block)]) for b in range(blocks)]


def resample(planes: np.ndarray, row_taps: tuple[np.ndarray, np.ndarray],
             col_taps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Resample (H, P, W) float32 planes with 1-D taps (indices (K, N), weights (K, N)) along rows
    and columns; returns (N_rows, P, N_cols) float32."""
    one_blas_thread()
    h, p, w = planes.shape
    ri, rw = row_taps
    ci, cw = col_taps
    r0, r1 = int(ri.min()), int(ri.max()) + 1  # only the rows some tap reads
    rows = np.ascontiguousarray(planes[r0:r1]).reshape((r1 - r0) * p, w)
    across = np.empty(((r1 - r0) * p, ci.shape[1]), dtype=np.float32)
    for j0, j1, s0, s1, band in _bands(ci, cw, _column_block(ci)):
        np.matmul(rows[:, s0:s1], band, out=across[:, j0:j1])
    across = across.reshape(r1 - r0, p * ci.shape[1])
    out = np.empty((ri.shape[1], p * ci.shape[1]), dtype=np.float32)
    for i0, i1, s0, s1, band in _bands(ri - r0, rw):
        np.matmul(band.T, across[s0:s1], out=out[i0:i1])
    return out.reshape(ri.shape[1], p, ci.shape[1])
