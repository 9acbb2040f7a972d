"""The machinery every kind of run shares (build, harvest, update): slabs computed level by level
by a pool of workers, written, journaled; then the `.list`, the summary and — last — the descriptor.

Order of writes, and why: a slab's work file, mask and data are written (each atomically) before
its journal line, so the journal never names a half-written slab; the descriptor is written after
everything else and removed first when a run starts over, so a failed or running build never
leaves a valid-looking pyramid behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import shutil
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tileserver.rok4.descriptor import Descriptor, Level, RasterSpecifications, TileLimits
from tileserver.rok4.formats import MASK_FORMAT, get_format
from tileserver.rok4.listfile import SlabList, parse_list
from tileserver.rok4.tms import TileMatrix, TileMatrixSet
from tileserver.storage import Storage, StorageError

from . import tasks
from .encode import EncodedSlab, SlabLayout
from .errors import WriterError
from .journal import Journal, SlabRecord
from .options import BuildOptions
from .plan import footprint_tiles
from .progress import Progress
from .summary import pyramid_summary
from .target import PyramidTarget

Slab = tuple[int, int]
BBox = tuple[float, float, float, float]
Compute = Callable[[int, int], Awaitable[EncodedSlab | None]]


@dataclass
class LinkedSlab:
    """An ancestor slab the new pyramid shares (update by reference)."""

    root_index: int  # in the new list
    data: str  # list entry (relative to that root)
    mask: str | None


@dataclass
class RunState:
    """What the list and descriptor are made from at the end."""

    linked: dict[tuple[str, int, int], LinkedSlab] = field(default_factory=dict)
    extra_roots: dict[int, str] = field(default_factory=dict)
    ancestor_limits: dict[str, TileLimits] = field(default_factory=dict)
    ancestor: str = ""


def make_executor(parallelization: int) -> concurrent.futures.Executor:
    """Processes for the pixel work; one thread when not parallel (the event loop keeps writing)."""
    if parallelization <= 1:
        return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
    # forkserver: the main process runs an event loop and storage threads, unsafe to fork
    context = multiprocessing.get_context("forkserver")
    return concurrent.futures.ProcessPoolExecutor(max_workers=parallelization, mp_context=context)


class PyramidWriter:
    """One run writing one pyramid. Use as `async with PyramidWriter(...) as writer`."""

    def __init__(self, storage: Storage, target: PyramidTarget, tms: TileMatrixSet, matrices: Sequence[TileMatrix],
                 options: BuildOptions, fingerprint: str, progress: Progress | None = None,
                 shard: tuple[int, int] | None = None, footprints: Sequence[BBox] = ()) -> None:
        self.storage = storage
        self.target = target
        self.tms = tms
        self.matrices = list(matrices)  # bottom → top
        self.options = options
        self.fingerprint = fingerprint
        self.progress = progress or Progress(enabled=False)
        self.shard = shard
        self.footprints = list(footprints)  # processed area(s) in the grid's CRS: the limits follow it
        self.journal = Journal(storage, target.journal_path(shard), fingerprint)
        self.state = RunState()
        self.executor: concurrent.futures.Executor | None = None

    async def __aenter__(self) -> PyramidWriter:
        self.executor = make_executor(self.options.parallelization)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=exc[0] is None, cancel_futures=True)
            self.executor = None

    # --- geometry ---------------------------------------------------------------------------------

    def layout(self, matrix: TileMatrix) -> SlabLayout:
        o = self.options
        assert o.samplesperpixel is not None and o.sampleformat is not None and o.nodata is not None
        return SlabLayout(o.width, o.height, matrix.tile_width, matrix.tile_height, o.samplesperpixel,
                          o.sampleformat, o.compression, o.nodata)

    def output(self, matrix: TileMatrix) -> tasks.Output:
        """Work files are kept for every level but the top: the level above reads them."""
        return tasks.Output(self.layout(matrix), self.options.mask, matrix is not self.matrices[-1])

    # --- start --------------------------------------------------------------------------------------

    async def start(self, overwrite: bool = False) -> bool:
        """Resume a previous run, or start afresh; True when resuming. Touches the storage early so
        a missing bucket or a read-only directory fails before any pixel work."""
        try:
            resumed = await self.journal.load()
            if not resumed and self.shard is None:
                await self._clear_previous(overwrite)
            if self.shard is None:
                await self.storage.delete(self.target.descriptor_path)
            await self.journal.flush()
        except StorageError as exc:
            raise WriterError(f"cannot write the pyramid to {self.target.root}: {exc}") from None
        return resumed

    async def _clear_previous(self, overwrite: bool) -> None:
        if not await self.storage.exists(self.target.descriptor_path):
            return
        if not overwrite:
            raise WriterError(f"{self.target.descriptor_path} already exists; choose another --name or pass --overwrite")
        raw = await self.storage.read_all(self.target.list_path)
        await self.storage.delete(self.target.descriptor_path)
        if raw is None:
            return
        try:
            old = parse_list(raw.decode())
        except ValueError:
            return
        for index, slab, _ in old.entries:
            if index == 0:
                await self.storage.delete(f"{self.target.data_root}/{slab}")
        await self.storage.delete(self.target.list_path)

    # --- levels -------------------------------------------------------------------------------------

    async def run_level(self, matrix: TileMatrix, slabs: Iterable[Slab], compute: Compute,
                        label: str | None = None) -> None:
        """Compute, write and journal every slab not already done, `2 × parallelization` at a time."""
        ordered = sorted(set(slabs), key=lambda s: (s[1], s[0]))
        todo = [s for s in ordered if self.journal.get(matrix.id, *s) is None]
        self.progress.start(label or f"level {matrix.id}", len(ordered), len(ordered) - len(todo))
        queue = iter(todo)
        with_work = matrix is not self.matrices[-1]

        async def consumer() -> None:
            for col, row in queue:
                try:
                    result = await compute(col, row)
                    await self.store(matrix, col, row, result, with_work)
                except (WriterError, StorageError) as exc:
                    raise WriterError(f"level {matrix.id}, slab ({col}, {row}): {exc}") from None
                self.progress.advance()

        workers = max(2, 2 * self.options.parallelization)
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(workers, max(len(todo), 1))):
                    group.create_task(consumer())
        except BaseExceptionGroup as group_error:
            await self._save_journal()
            first = group_error.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        except BaseException:
            await self._save_journal()
            raise
        await self.journal.flush()
        self.progress.end()

    async def _save_journal(self) -> None:
        """Keep what was finished before a failure, so the rerun resumes from there."""
        try:
            await asyncio.shield(self.journal.flush())
        except (StorageError, asyncio.CancelledError):
            pass

    async def compute(self, task: Callable[[], EncodedSlab | None]) -> EncodedSlab | None:
        """Run one task on the pool; worker failures come back as WriterError."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor, tasks.run, task)
        except WriterError:
            raise
        except concurrent.futures.process.BrokenProcessPool:
            raise WriterError("a worker process died (out of memory?)") from None
        except (ValueError, OSError, MemoryError) as exc:
            raise WriterError(f"{type(exc).__name__}: {exc}") from None

    async def store(self, matrix: TileMatrix, col: int, row: int, result: EncodedSlab | None,
                    with_work: bool) -> SlabRecord:
        level = matrix.id
        if result is None:
            record = SlabRecord(level, col, row, "E")
        else:
            if with_work and result.work is not None:
                await self.storage.write(self.target.work_path(level, col, row), result.work)
            size = len(result.data)
            if result.mask is not None:
                await self.storage.write(self.target.slab_path(level, col, row, mask=True), result.mask)
                size += len(result.mask)
            await self.storage.write(self.target.slab_path(level, col, row), result.data)
            c0, c1, r0, r1 = result.tile_range
            tpw, tph = self.options.width, self.options.height
            tiles = (col * tpw + c0, col * tpw + c1, row * tph + r0, row * tph + r1)
            record = SlabRecord(level, col, row, "D", size, tiles)
        await self.journal.add(record)
        return record

    def written(self, level: str) -> set[Slab]:
        """Slabs of a level holding data in the new pyramid (written now or linked)."""
        return {(r.col, r.row) for r in self.journal.records(level) if r.status in "DL"}

    async def read_work(self, level: str, col: int, row: int) -> tasks.StoredSlab | None:
        raw = await self.storage.read_all(self.target.work_path(level, col, row))
        return None if raw is None else tasks.StoredSlab(work=raw, name=self.target.work_path(level, col, row))

    # --- end ----------------------------------------------------------------------------------------

    def descriptor(self) -> Descriptor:
        o = self.options
        assert o.samplesperpixel is not None and o.nodata is not None
        levels = []
        for matrix in reversed(self.matrices):  # top → bottom, as ROK4 writes them
            limits = None
            for record in self.journal.records(matrix.id):
                if record.tiles is not None and record.status in "DL":
                    found = TileLimits(record.tiles[0], record.tiles[1], record.tiles[2], record.tiles[3])
                    limits = found if limits is None else limits.union(found)
            if limits is not None:
                limits = self._bbox_limits(matrix, limits)
            ancestor = self.state.ancestor_limits.get(matrix.id)
            if ancestor is not None:
                limits = ancestor if limits is None else limits.union(ancestor)
            if limits is None:
                continue  # a level without any data is left out
            levels.append(Level(matrix.id, o.width, o.height, limits, self.target.level_storage(matrix.id, o.mask)))
        if not levels:
            raise WriterError("the sources hold no data inside the grid: every slab came out empty")
        photometric = "rgb" if (o.samplesperpixel or 1) >= 3 else "gray"
        raster = RasterSpecifications(o.samplesperpixel, o.nodata, photometric, o.interpolation)
        return Descriptor(self.tms.id, get_format(o.format_code), tuple(levels), raster,
                          MASK_FORMAT if o.mask else None)

    def _bbox_limits(self, matrix: TileMatrix, data: TileLimits) -> TileLimits:
        """ROK4's limits: the tiles the processed area claims (be4's rule, `footprint_tiles`),
        within the written slabs (the data tiles are always included, even where the area and a
        reprojection disagree by a sliver)."""
        tpw, tph = self.options.width, self.options.height
        area = None
        for bbox in self.footprints:
            found = footprint_tiles(matrix, bbox)
            if found is not None:
                rect = TileLimits(found[0], found[2], found[1], found[3])
                area = rect if area is None else area.union(rect)
        if area is None:
            return data
        slabs = TileLimits(data.min_col // tpw * tpw, (data.max_col // tpw + 1) * tpw - 1,
                           data.min_row // tph * tph, (data.max_row // tph + 1) * tph - 1)
        inter = TileLimits(max(area.min_col, slabs.min_col), min(area.max_col, slabs.max_col),
                           max(area.min_row, slabs.min_row), min(area.max_row, slabs.max_row))
        if inter.min_col > inter.max_col or inter.min_row > inter.max_row:
            return data
        return inter.union(data)

    def slab_list(self) -> SlabList:
        result = SlabList(roots={0: self.target.list_root, **self.state.extra_roots})
        for matrix in self.matrices:
            for record in sorted(self.journal.records(matrix.id), key=lambda r: (r.row, r.col)):
                if record.status == "D":
                    result.entries.append((0, self.target.list_entry(matrix.id, record.col, record.row), ""))
                    if self.options.mask:
                        result.entries.append((0, self.target.list_entry(matrix.id, record.col, record.row, True), ""))
                elif record.status == "L":
                    link = self.state.linked[(matrix.id, record.col, record.row)]
                    result.entries.append((link.root_index, link.data, ""))
                    if link.mask:
                        result.entries.append((link.root_index, link.mask, ""))
        return result

    async def finish(self, **summary_extra: Any) -> dict[str, Any]:
        """List, summary, then the descriptor; work files and journals removed. Returns the summary."""
        descriptor = self.descriptor()
        slab_list = self.slab_list()
        list_bytes = slab_list.to_text().encode()
        descriptor_bytes = descriptor.to_json()
        records = list(self.journal.records())
        size = sum(r.size for r in records) + len(list_bytes) + len(descriptor_bytes)
        summary = pyramid_summary(
            descriptor, self.tms, size,
            descriptor=self.target.descriptor_path,
            slabs=sum(1 for r in records if r.status == "D"),
            linked_slabs=sum(1 for r in records if r.status == "L"),
            **summary_extra,
        )
        try:
            await self.storage.write(self.target.list_path, list_bytes)
            await self.storage.write(self.target.summary_path, json.dumps(summary, indent=2).encode())
            await self.storage.write(self.target.descriptor_path, descriptor_bytes)
        except StorageError as exc:
            raise WriterError(f"cannot write the pyramid to {self.target.root}: {exc}") from None
        await self.cleanup()
        return summary

    async def cleanup(self, shards: int = 0) -> None:
        """Remove work files and journals (this run's and the shards')."""
        if self.target.is_file:
            await asyncio.to_thread(shutil.rmtree, self.target.work_prefix(), True)
        else:
            async for path in self.storage.list(self.target.work_prefix()):
                await self.storage.delete(path)
        await self.journal.delete()
        for k in range(shards):
            await self.storage.delete(self.target.journal_path((k, shards)))
