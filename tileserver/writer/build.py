"""`pyramid build`: georeferenced images → a ROK4 pyramid (the processing "raster-to-pyramid").

Python API: `build_pyramid(sources, output, name, BuildOptions(...))` returns the summary dict;
`build_async` does the same on an open `Storage`. Sharded runs: each of N workers runs with
`shard=(K, N)` and computes its share of the bottom level; then one run with `finish=N` computes
the upper levels, the `.list` and the descriptor from the shards' journals.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from tileserver.rok4.tms import TileMatrix, TileMatrixSet, TMSError, load_tms
from tileserver.settings import Settings, load_settings
from tileserver.storage import Storage

from . import tasks
from .encode import EncodedSlab
from .engine import PyramidWriter
from .errors import WriterError
from .journal import Journal
from .options import BuildOptions
from .plan import (
    BBox,
    Slab,
    parent_slabs,
    select_levels,
    shard_share,
    slab_bbox,
    slabs_for_bbox,
    source_footprint,
)
from .progress import Progress
from .reduce import child_slabs
from .sources import SourceInfo, open_source
from .target import PyramidTarget

_SHARD_POLL_SECONDS = 5.0


def load_grid(tms_id: str, directory: str | None) -> TileMatrixSet:
    try:
        return load_tms(tms_id, directory)
    except TMSError as exc:
        raise WriterError(f"--tms {tms_id!r}: unknown tile matrix set ({exc})") from None


def check_uniform_tiles(matrices: Sequence[TileMatrix]) -> None:
    """Slabs of every level must have the same pixel size for upper levels to be computed."""
    sizes = {(m.tile_width, m.tile_height) for m in matrices}
    if len(sizes) > 1:
        raise WriterError(f"levels {matrices[0].id}…{matrices[-1].id} mix tile sizes {sorted(sizes)}; not supported")


def open_sources(paths: Sequence[str], options: BuildOptions) -> list[SourceInfo]:
    if not paths:
        raise WriterError("no source image given")
    return [open_source(p, options.srs, options.srcnodata) for p in paths]


def resolve_options(options: BuildOptions, sources: Sequence[SourceInfo]) -> BuildOptions:
    """Channels and sample format from the sources unless given; FLOAT32 sources need FLOAT32."""
    formats = {s.sample_format for s in sources}
    if len(formats) > 1:
        raise WriterError("sources mix 8-bit and floating-point images")
    source_format = formats.pop()
    if source_format == "FLOAT32" and options.sampleformat == "UINT8":
        raise WriterError(f"{sources[0].path}: floating-point data cannot make a UINT8 pyramid")
    return options.resolved(max(s.channels for s in sources), source_format)


def fingerprint(**parts: Any) -> str:
    """Stable digest of what defines a pyramid, so a resumed run cannot mix two different ones."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_identity(sources: Sequence[SourceInfo], origins: Mapping[str, str] | None = None) -> list[tuple[Any, ...]]:
    """What each source is, for the fingerprint: its path, size and mtime; or, for a local copy of
    a file kept elsewhere (`origins`: local path → e.g. its S3 URL), that origin and the size, since
    the copy's path and mtime differ for every run and every worker (shards of one build, a job
    taken over by another node) while the pyramid is the same."""
    named = {os.path.realpath(k): v for k, v in (origins or {}).items()}
    out: list[tuple[Any, ...]] = []
    for s in sources:
        st = os.stat(s.path)
        origin = named.get(os.path.realpath(s.path))
        out.append((origin, st.st_size) if origin else (os.path.abspath(s.path), st.st_size, st.st_mtime_ns))
    return out


def _overlaps(a: BBox, b: BBox) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def identity_options(options: BuildOptions) -> dict[str, Any]:
    """Options that define the pyramid (not how fast it is made)."""
    out = asdict(options)
    out.pop("parallelization")
    return out


async def compute_upper_levels(writer: PyramidWriter, upper_filter: str, background: Any = None) -> None:
    """Every level above the bottom from the one below, where the level below has data."""
    for child, parent in zip(writer.matrices, writer.matrices[1:], strict=False):
        await compute_upper_level(writer, child, parent, upper_filter, background)


async def compute_upper_level(writer: PyramidWriter, child: TileMatrix, parent: TileMatrix, upper_filter: str,
                              background: Any = None, only: set[Slab] | None = None) -> None:
    """One level from the level below it.

    `background` (updates) says which parent slabs to recompute (`parents_to_compute`) and
    supplies previous versions of slabs (`slab(level, col, row)`): the parent's own, merged under
    the result, and the children this run did not recompute. `only`: the parents a shard owns.
    """
    layout = writer.layout(parent)
    below = writer.written(child.id)
    targets = parent_slabs(child, parent, below, layout.tiles_per_width, layout.tiles_per_height)
    if background is not None:
        targets = background.parents_to_compute(child, parent, targets)
    if only is not None:
        targets &= only

    async def load_child(c: int, r: int) -> tasks.StoredSlab | None:
        record = writer.journal.get(child.id, c, r)
        if record is not None and record.status == "D":
            stored = await writer.read_work(child.id, c, r)
            if stored is None:
                raise WriterError(f"work file of level {child.id} slab ({c}, {r}) is missing; "
                                  "remove the journal and rebuild")
            return stored
        if background is not None and (record is None or record.status == "L"):
            return await background.slab(child.id, c, r)
        return None

    async def compute(col: int, row: int) -> EncodedSlab | None:
        children = {}
        for c, r in child_slabs(parent, child, layout, col, row):
            stored = await load_child(c, r)
            if stored is not None:
                children[(c, r)] = stored
        if not children:
            return None
        old = await background.slab(parent.id, col, row) if background is not None else None
        task = tasks.UpperTask(col, row, parent, child, writer.output(parent), children, upper_filter, old,
                               writer.tms.is_quadtree)
        return await writer.compute(task)

    await writer.run_level(parent, targets, compute)


async def compute_shard_upper_levels(writer: PyramidWriter, bottom: set[Slab], share: Iterable[Slab],
                                     upper_filter: str) -> None:
    """A shard also builds the upper slabs whose every possible child is its own (its blocks' parents),
    so that the finish step only computes what straddles shards: without this the upper levels run
    in one process after the shards, and two workers could not build a pyramid much faster than one.
    A parent is owned when all its candidate children (the slabs the whole build could write there)
    are owned below; the finish step skips the slabs the merged journals already hold."""
    candidates, owned = set(bottom), set(share)
    for child, parent in zip(writer.matrices, writer.matrices[1:], strict=False):
        layout = writer.layout(parent)
        parents = parent_slabs(child, parent, candidates, layout.tiles_per_width, layout.tiles_per_height)
        mine = {p for p in parents
                if all(c in owned for c in child_slabs(parent, child, layout, *p) if c in candidates)}
        if not mine:
            return
        await compute_upper_level(writer, child, parent, upper_filter, only=mine)
        candidates, owned = parents, mine


async def wait_for_shards(writer: PyramidWriter, count: int, wait: float) -> None:
    """Merge the journals of shards 0..count-1 once all say done (polling up to `wait` seconds)."""
    deadline = time.monotonic() + wait
    pending = list(range(count))
    while True:
        still = []
        for k in pending:
            journal = Journal(writer.storage, writer.target.journal_path((k, count)), writer.fingerprint)
            if await journal.load() and journal.finished:
                writer.journal.merge(journal)
            else:
                still.append(k)
        pending = still
        if not pending:
            return
        if time.monotonic() >= deadline:
            names = ", ".join(f"{k}/{count}" for k in pending)
            raise WriterError(f"shard(s) {names} not finished; run them first (or pass --wait SECONDS)")
        writer.progress.message(f"waiting for shard(s) {', '.join(map(str, pending))} of {count}")
        await asyncio.sleep(min(_SHARD_POLL_SECONDS, max(deadline - time.monotonic(), 0.1)))


async def build_async(sources: Sequence[str], output: str, name: str, options: BuildOptions, storage: Storage, *,
                      tms_directory: str | None = None, shard: tuple[int, int] | None = None,
                      finish: int | None = None, wait: float = 0.0, overwrite: bool = False,
                      progress: Progress | None = None, origins: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Build (or resume building) a pyramid; returns the summary (or a shard report). `origins`
    names sources that are local copies by where they come from (see `source_identity`)."""
    options = options.checked()
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise WriterError(f"--shard {shard[0]}/{shard[1]}: expected K/N with 0 <= K < N")
    infos = open_sources(sources, options)
    options = resolve_options(options, infos)
    tms = load_grid(options.tms, tms_directory)
    matrices = select_levels(tms, options.bottom, options.top, infos)
    check_uniform_tiles(matrices)
    bottom = matrices[0]
    footprints = [source_footprint(s, tms.crs) for s in infos]
    slabs: set[tuple[int, int]] = set()
    for footprint in footprints:
        slabs |= slabs_for_bbox(bottom, footprint, options.width, options.height)
    if not slabs:
        raise WriterError(f"the sources lie outside the grid {tms.id} at level {bottom.id}")
    target = PyramidTarget.make(output, name, options.path_depth)
    fp = fingerprint(kind="build", sources=source_identity(infos, origins), options=identity_options(options),
                     levels=[m.id for m in matrices], root=target.root, name=name)
    writer = PyramidWriter(storage, target, tms, matrices, options, fp, progress, shard, footprints)
    async with writer:
        await writer.start(overwrite)
        if finish is not None:
            await wait_for_shards(writer, finish, wait)
        else:
            share = shard_share(slabs, *shard) if shard is not None else slabs
            output_spec = writer.output(bottom)

            async def compute(col: int, row: int) -> EncodedSlab | None:
                bbox = slab_bbox(bottom, col, row, options.width, options.height)
                chosen = tuple(s for s, f in zip(infos, footprints, strict=True) if _overlaps(f, bbox))
                if not chosen:
                    return None
                task = tasks.BottomTask(col, row, bottom, tms.crs, output_spec, chosen, options.interpolation)
                return await writer.compute(task)

            await writer.run_level(bottom, share, compute)
            if shard is not None:
                await compute_shard_upper_levels(writer, slabs, share, options.upper_filter)
        if shard is not None:
            await writer.journal.finish()
            records = list(writer.journal.records())
            return {"shard": f"{shard[0]}/{shard[1]}", "level": bottom.id,
                    "slabs": sum(1 for r in records if r.status == "D" and r.level == bottom.id),
                    "upper_slabs": sum(1 for r in records if r.status == "D" and r.level != bottom.id),
                    "empty": sum(1 for r in records if r.status == "E"),
                    "size": sum(r.size for r in records)}
        await compute_upper_levels(writer, options.upper_filter)
        summary = await writer.finish()
        if finish is not None:
            await writer.cleanup(finish)
        return summary


def run_with_storage(settings: Settings | None, action: Any) -> Any:
    """Run `action(storage, settings)` in a fresh event loop with a started Storage."""
    settings = settings or load_settings()

    async def main() -> Any:
        async with Storage(settings) as storage:
            return await action(storage, settings)

    return asyncio.run(main())


def build_pyramid(sources: Sequence[str], output: str, name: str, options: BuildOptions | None = None, *,
                  settings: Settings | None = None, **kwargs: Any) -> dict[str, Any]:
    """Synchronous entry point (scripts, the warehouse's worker processes)."""
    return run_with_storage(settings, lambda storage, s: build_async(
        sources, output, name, options or BuildOptions(), storage, tms_directory=s.tms_directory, **kwargs))
