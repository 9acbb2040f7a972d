"""The pixel work of one slab, as picklable tasks run in worker processes.

Workers never touch the output storage: the main process reads what a task needs (children work
files, an ancestor's slab, harvested images) and writes what it returns, so one storage client
serves the whole run and workers only burn CPU. Sources are local files workers open themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tileserver.render.georef import Grid
from tileserver.rok4.tms import TileMatrix

from .encode import EncodedSlab, SlabLayout, decode_mask, decode_slab, encode_slab, nodata_mask, unpack_work
from .reduce import Pixels, reduce_slab
from .resample import render_sources
from .sources import SourceInfo


@dataclass(frozen=True)
class StoredSlab:
    """A slab as found in storage: a work file, or a final slab with its mask slab if any."""

    work: bytes | None = None
    data: bytes | None = None
    mask: bytes | None = None
    name: str = ""

    def pixels(self, layout: SlabLayout) -> Pixels:
        if self.work is not None:
            return unpack_work(self.work, self.name)
        assert self.data is not None
        data = decode_slab(self.data, layout, self.name)
        if self.mask is not None:
            return data, decode_mask(self.mask, layout, self.name)
        return data, nodata_mask(data, layout.nodata)


@dataclass(frozen=True)
class Output:
    """How a task's pixels are stored."""

    layout: SlabLayout
    with_mask: bool
    with_work: bool

    def encode(self, pixels: Pixels) -> EncodedSlab | None:
        return encode_slab(pixels[0], pixels[1], self.layout, self.with_mask, self.with_work)


def slab_grid(matrix: TileMatrix, crs: str, layout: SlabLayout, col: int, row: int) -> Grid:
    x0 = matrix.origin_x + col * layout.width * matrix.cell_size
    y1 = matrix.origin_y - row * layout.height * matrix.cell_size
    return Grid(crs, (x0, y1 - layout.height * matrix.cell_size, x0 + layout.width * matrix.cell_size, y1),
                layout.width, layout.height)


@dataclass(frozen=True)
class BottomTask:
    """Resample sources onto a bottom slab, over the slab's previous version when updating."""

    col: int
    row: int
    matrix: TileMatrix
    crs: str
    output: Output
    sources: tuple[SourceInfo, ...]
    interpolation: str
    background: StoredSlab | None = None

    def __call__(self) -> EncodedSlab | None:
        layout = self.output.layout
        background = self.background.pixels(layout) if self.background is not None else None
        grid = slab_grid(self.matrix, self.crs, layout, self.col, self.row)
        return self.output.encode(render_sources(self.sources, grid, layout, self.interpolation, background))


@dataclass(frozen=True)
class UpperTask:
    """Compute a slab from the level below, over its previous version when updating."""

    col: int
    row: int
    parent: TileMatrix
    child: TileMatrix
    output: Output
    children: dict[tuple[int, int], StoredSlab]
    upper_filter: str
    background: StoredSlab | None = None
    quadtree_grid: bool = True

    def __call__(self) -> EncodedSlab | None:
        layout = self.output.layout

        def load(col: int, row: int) -> Pixels | None:
            stored = self.children.get((col, row))
            return stored.pixels(layout) if stored is not None else None

        data, mask = reduce_slab(self.parent, self.child, layout, self.col, self.row, load, self.upper_filter,
                                 self.quadtree_grid)
        if self.background is not None:
            old, old_mask = self.background.pixels(layout)
            keep = old_mask & ~mask
            data[keep] = old[keep]
            mask |= old_mask
        return self.output.encode((data, mask))


def run(task: Callable[[], EncodedSlab | None]) -> EncodedSlab | None:
    """Executor entry point (a module-level function pickles by name)."""
    return task()

