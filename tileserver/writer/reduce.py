"""Upper-level pixels: one slab computed from the slabs of the level below.

Filters:
* ``auto`` — what ROK4 does: on quad-tree grids each pixel is the mean of its 2×2 children that
  hold data (uint8 truncated, as ``merge4tiff``), elsewhere nearest-neighbour decimation
  (``decimateNtiff``: pixel-centre sampling);
* ``nn`` — nearest-neighbour decimation on any grid;
* ``average`` — area mean of the child pixels (with data) whose centres fall in each pixel, rounded:
  the anti-aliased choice for grids whose levels are not in a 2:1 ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from tileserver.rok4.tms import TileMatrix

from .encode import SlabLayout

FILTERS = ("auto", "nn", "average")
Pixels = tuple[np.ndarray, np.ndarray]
ChildLoader = Callable[[int, int], Pixels | None]


def is_quadtree_step(child: TileMatrix, parent: TileMatrix) -> bool:
    """Parent pixel = exactly 2×2 child pixels, same origin and tile size (ROK4's QTree test)."""
    return (
        abs(parent.cell_size / child.cell_size - 2) < 2e-4
        and abs(parent.origin_x - child.origin_x) < 1e-4 * parent.cell_size
        and abs(parent.origin_y - child.origin_y) < 1e-4 * parent.cell_size
        and parent.tile_width == child.tile_width
        and parent.tile_height == child.tile_height
    )


def child_slabs(parent: TileMatrix, child: TileMatrix, layout: SlabLayout, col: int, row: int) -> list[tuple[int, int]]:
    """Child slabs under a parent slab (the ones whose pixels any parent pixel samples)."""
    sw, sh = layout.width * parent.cell_size, layout.height * parent.cell_size
    x0, y1 = parent.origin_x + col * sw, parent.origin_y - row * sh
    cw, ch = layout.width * child.cell_size, layout.height * child.cell_size
    eps = 1e-9
    c0 = math.floor((x0 - child.origin_x) / cw + eps)
    c1 = math.ceil((x0 + sw - child.origin_x) / cw - eps) - 1
    r0 = math.floor((child.origin_y - y1) / ch + eps)
    r1 = math.ceil((child.origin_y - (y1 - sh)) / ch - eps) - 1
    return [(c, r) for r in range(max(r0, 0), r1 + 1) for c in range(max(c0, 0), c1 + 1)]


def _mean2x2(data: np.ndarray, mask: np.ndarray, nodata: np.ndarray) -> Pixels:
    """ROK4's SubsampledImage: per band, mean of the data children; truncated for uint8."""
    h, w, c = data.shape
    m = mask.reshape(h // 2, 2, w // 2, 2)
    count = m.sum(axis=(1, 3), dtype=np.uint8)
    if data.dtype == np.uint8:
        d = data.reshape(h // 2, 2, w // 2, 2, c).astype(np.uint16)
        d *= m[..., None]
        total = d.sum(axis=(1, 3), dtype=np.uint16)
        out = (total // np.maximum(count, 1)[..., None]).astype(np.uint8)
    else:
        d = data.reshape(h // 2, 2, w // 2, 2, c).astype(np.float64)
        d *= m[..., None]
        out = (d.sum(axis=(1, 3)) / np.maximum(count, 1)[..., None]).astype(data.dtype)
    valid = count > 0
    out[~valid] = nodata
    return out, valid


def _reduce_quadtree(layout: SlabLayout, col: int, row: int, load: ChildLoader) -> Pixels:
    data, mask = layout.empty()
    nodata = np.asarray(layout.nodata, dtype=layout.dtype)
    hh, hw = layout.height // 2, layout.width // 2
    for j in (0, 1):
        for i in (0, 1):
            child = load(2 * col + i, 2 * row + j)
            if child is None:
                continue
            out, valid = _mean2x2(child[0], child[1], nodata)
            data[j * hh : (j + 1) * hh, i * hw : (i + 1) * hw] = out
            mask[j * hh : (j + 1) * hh, i * hw : (i + 1) * hw] = valid
    return data, mask


def _centres(parent: TileMatrix, layout: SlabLayout, col: int, row: int) -> tuple[np.ndarray, np.ndarray]:
    """Map x of the parent slab's pixel columns and y of its rows (centres)."""
    x0 = parent.origin_x + col * layout.width * parent.cell_size
    y1 = parent.origin_y - row * layout.height * parent.cell_size
    xs = x0 + (np.arange(layout.width) + 0.5) * parent.cell_size
    ys = y1 - (np.arange(layout.height) + 0.5) * parent.cell_size
    return xs, ys


def _reduce_nearest(parent: TileMatrix, child: TileMatrix, layout: SlabLayout, col: int, row: int,
                    load: ChildLoader) -> Pixels:
    """Each parent pixel takes the child pixel under its centre (decimateNtiff)."""
    data, mask = layout.empty()
    xs, ys = _centres(parent, layout, col, row)
    ccol = np.floor((xs - child.origin_x) / child.cell_size).astype(np.int64)
    crow = np.floor((child.origin_y - ys) / child.cell_size).astype(np.int64)
    for sc, sr in child_slabs(parent, child, layout, col, row):
        cols = np.nonzero(ccol // layout.width == sc)[0]
        rows = np.nonzero(crow // layout.height == sr)[0]
        if cols.size == 0 or rows.size == 0:
            continue
        pixels = load(sc, sr)
        if pixels is None:
            continue
        cdata, cmask = pixels
        ci = ccol[cols] - sc * layout.width
        ri = crow[rows] - sr * layout.height
        taken = cmask[np.ix_(ri, ci)]
        block = data[np.ix_(rows, cols)]
        block[taken] = cdata[np.ix_(ri, ci)][taken]
        data[np.ix_(rows, cols)] = block
        mask[np.ix_(rows, cols)] |= taken
    return data, mask


def _group_starts(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a non-decreasing index array: start of each run and the run's value."""
    starts = np.flatnonzero(np.diff(index, prepend=index[0] - 1))
    return starts, index[starts]


def _reduce_average(parent: TileMatrix, child: TileMatrix, layout: SlabLayout, col: int, row: int,
                    load: ChildLoader) -> Pixels:
    """Mean of the data child pixels whose centres fall inside each parent pixel."""
    # float32 sums are exact for uint8 (a few hundred values at most) and ample for float data
    total = np.zeros((layout.height, layout.width, layout.channels), dtype=np.float32)
    count = np.zeros((layout.height, layout.width), dtype=np.float32)
    px0 = parent.origin_x + col * layout.width * parent.cell_size
    py1 = parent.origin_y - row * layout.height * parent.cell_size
    for sc, sr in child_slabs(parent, child, layout, col, row):
        cx = child.origin_x + (sc * layout.width + np.arange(layout.width) + 0.5) * child.cell_size
        cy = child.origin_y - (sr * layout.height + np.arange(layout.height) + 0.5) * child.cell_size
        pcol = np.floor((cx - px0) / parent.cell_size).astype(np.int64)
        prow = np.floor((py1 - cy) / parent.cell_size).astype(np.int64)
        cols = np.nonzero((pcol >= 0) & (pcol < layout.width))[0]
        rows = np.nonzero((prow >= 0) & (prow < layout.height))[0]
        if cols.size == 0 or rows.size == 0:
            continue
        pixels = load(sc, sr)
        if pixels is None:
            continue
        cdata, cmask = pixels
        weight = cmask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
        values = cdata[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32) * weight[..., None]
        rstart, rdest = _group_starts(prow[rows])
        cstart, cdest = _group_starts(pcol[cols])
        summed = np.add.reduceat(np.add.reduceat(values, rstart, axis=0), cstart, axis=1)
        counted = np.add.reduceat(np.add.reduceat(weight, rstart, axis=0), cstart, axis=1)
        total[np.ix_(rdest, cdest)] += summed
        count[np.ix_(rdest, cdest)] += counted
    valid = count > 0
    mean = total / np.maximum(count, 1)[..., None]
    if layout.dtype == np.uint8:
        mean = np.clip(np.rint(mean), 0, 255)
    data = mean.astype(layout.dtype)
    data[~valid] = np.asarray(layout.nodata, dtype=layout.dtype)
    return data, valid


def reduce_slab(parent: TileMatrix, child: TileMatrix, layout: SlabLayout, col: int, row: int,
                children: Mapping[tuple[int, int], Pixels] | ChildLoader, upper_filter: str = "auto",
                quadtree_grid: bool = True) -> Pixels:
    """Pixels of parent slab (col, row) from its children (missing children are nodata).

    `quadtree_grid`: whether the whole grid is a quad-tree — ROK4 picks merge4tiff or
    decimateNtiff per grid, not per pair of levels (LAMB93 has 2:1 steps but is no quad-tree).
    """
    load: ChildLoader = children if callable(children) else lambda c, r: children.get((c, r))
    if upper_filter == "auto":
        if quadtree_grid and is_quadtree_step(child, parent):
            return _reduce_quadtree(layout, col, row, load)
        return _reduce_nearest(parent, child, layout, col, row, load)
    if upper_filter == "nn":
        return _reduce_nearest(parent, child, layout, col, row, load)
    if upper_filter == "average":
        return _reduce_average(parent, child, layout, col, row, load)
    raise ValueError(f"unknown upper-level filter {upper_filter!r} ({', '.join(FILTERS)})")
