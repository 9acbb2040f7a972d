"""`pyramid update`: a new pyramid = an existing one + new images, by reference (BE4's `UPDATE`).

Slabs the new images do not touch become links to the ancestor's (relative symlinks on disk,
`SYMLINK#bucket/key` objects on S3), always to the real slab named in the ancestor's `.list` (no
chains), and stay listed under the ancestor's root. Touched bottom slabs are recomputed over the
ancestor's pixels (its masks decide what was data, when it has masks); upper slabs are
recomputed only above a recomputed child, from the new children and the ancestor's others.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tileserver.pyramid import Pyramid, PyramidError, normalise_url
from tileserver.rok4.listfile import SlabList, parse_list
from tileserver.rok4.naming import parse_slab_name
from tileserver.rok4.tms import TileMatrix
from tileserver.storage import Scheme, Storage, StorageError, parse_path

from . import tasks
from .build import compute_upper_levels, fingerprint, identity_options, open_sources, source_identity
from .encode import EncodedSlab
from .engine import LinkedSlab, PyramidWriter
from .errors import WriterError
from .journal import SlabRecord
from .options import BuildOptions
from .plan import BBox, parent_slabs, slab_bbox, slabs_for_bbox, source_footprint
from .progress import Progress
from .target import PyramidTarget

Key = tuple[str, int, int]
_LINK_CONCURRENCY = 32


@dataclass(frozen=True)
class UpdateOptions:
    """What an update may choose; everything else is the ancestor's."""

    interpolation: str | None = None
    parallelization: int = 1
    srs: str | None = None
    srcnodata: tuple[float, ...] | None = None


@dataclass
class AncestorSlab:
    root: int  # index in the ancestor's list
    data: str | None = None  # entry relative to that root
    mask: str | None = None


class Ancestor:
    """The pyramid being updated: its descriptor, its list, and where its slabs really are."""

    def __init__(self, pyramid: Pyramid, slab_list: SlabList) -> None:
        self.pyramid = pyramid
        self.list = slab_list
        self.slabs: dict[Key, AncestorSlab] = {}
        for root, entry, _ in slab_list.entries:
            try:
                name = parse_slab_name(entry)
            except ValueError:
                continue
            slab = self.slabs.setdefault((name.level, name.col, name.row), AncestorSlab(root))
            if name.kind == "MASK":
                slab.mask = entry
            else:
                slab.data = entry
                slab.root = root

    def root_path(self, index: int) -> str:
        """Storage path a list root stands for. Root 0 is wherever the ancestor is now (its list
        may name the place it was built at); others are as written, on the ancestor's cluster."""
        p = self.pyramid
        if index == 0:
            if p.descriptor.storage_type == "FILE":
                return f"{p.root}/{p.name}"
            storage = p.bottom_level.storage
            return _s3_path(f"{storage.container}/{storage.image_prefix.rsplit('/', 1)[0]}", p.url)
        root = self.list.roots[index]
        return root if p.descriptor.storage_type == "FILE" else _s3_path(root, p.root)

    async def stored(self, storage: Storage, level: str, col: int, row: int) -> tasks.StoredSlab | None:
        """The ancestor's slab (and mask) bytes, links followed."""
        p = self.pyramid
        lv = p.descriptor.level(level)
        if lv is None:
            return None
        path = p.slab_path(lv, col, row)
        _, data = await storage.read_resolving_links(path)
        if data is None:
            return None
        mask = None
        if p.descriptor.mask_format:
            _, mask = await storage.read_resolving_links(p.slab_path(lv, col, row, mask=True))
        return tasks.StoredSlab(data=data, mask=mask, name=path)


def _s3_path(root: str, like: str) -> str:
    """`bucket/key` list root → s3 path on the cluster of `like`."""
    cluster = parse_path(like).cluster
    bucket, _, key = root.partition("/")
    return f"s3://{bucket}{'@' + cluster if cluster else ''}/{key}"


async def open_ancestor(url: str, storage: Storage, tms_directory: str | None) -> Ancestor:
    url = normalise_url(url)
    try:
        pyramid = await Pyramid.open(url, storage, tms_directory=tms_directory)
    except (PyramidError, StorageError) as exc:
        raise WriterError(f"--from: {exc}") from None
    if pyramid.format.is_vector:
        raise WriterError(f"--from {url}: a vector pyramid cannot be updated with images")
    raw = await storage.read_all(f"{pyramid.root}/{pyramid.name}.list")
    if raw is None:
        raise WriterError(f"--from {url}: no {pyramid.name}.list beside it; the list names the slabs to share")
    try:
        slab_list = parse_list(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise WriterError(f"--from {url}: unreadable list ({exc})") from None
    return Ancestor(pyramid, slab_list)


def ancestor_options(ancestor: Ancestor, options: UpdateOptions) -> BuildOptions:
    d = ancestor.pyramid.descriptor
    assert d.raster is not None
    sizes = {(lv.tiles_per_width, lv.tiles_per_height) for lv in d.levels}
    if len(sizes) > 1:
        raise WriterError(f"--from {ancestor.pyramid.url}: levels with different slab sizes are not supported")
    width, height = sizes.pop()
    depth = d.levels[0].storage.path_depth if d.storage_type == "FILE" else 2
    return BuildOptions(
        tms=d.tile_matrix_set, compression=d.format.compression, interpolation=options.interpolation or d.raster.interpolation,
        width=width, height=height, nodata=d.raster.nodata, samplesperpixel=d.raster.channels,
        sampleformat=d.format.sample_format, mask=bool(d.mask_format), parallelization=options.parallelization,
        srs=options.srs, srcnodata=options.srcnodata, path_depth=depth,
    ).checked()


class UpdateBackground:
    """What `compute_upper_levels` needs to merge with the ancestor."""

    def __init__(self, ancestor: Ancestor, storage: Storage, recomputed: dict[str, set[tuple[int, int]]]) -> None:
        self.ancestor = ancestor
        self.storage = storage
        self.recomputed = recomputed

    def parents_to_compute(self, child: TileMatrix, parent: TileMatrix, targets: set[tuple[int, int]]) -> set[tuple[int, int]]:
        return self.recomputed.get(parent.id, set())

    async def slab(self, level: str, col: int, row: int) -> tasks.StoredSlab | None:
        return await self.ancestor.stored(self.storage, level, col, row)


async def update_async(ancestor_url: str, sources: Sequence[str], output: str, name: str, options: UpdateOptions,
                       storage: Storage, *, tms_directory: str | None = None, overwrite: bool = False,
                       progress: Progress | None = None, origins: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write the updated pyramid; returns its summary (with `linked_slabs`); `origins` as for
    `build_async`."""
    ancestor = await open_ancestor(ancestor_url, storage, tms_directory)
    build_options = ancestor_options(ancestor, options)
    infos = open_sources(sources, build_options)
    if any(s.sample_format == "FLOAT32" for s in infos) and build_options.sampleformat == "UINT8":
        raise WriterError("floating-point images cannot update a UINT8 pyramid")
    build_options = build_options.resolved(build_options.samplesperpixel or 1, build_options.sampleformat or "UINT8")
    pyramid = ancestor.pyramid
    target = PyramidTarget.make(output, name, build_options.path_depth)
    if target.storage_type != pyramid.descriptor.storage_type:
        raise WriterError(f"the new pyramid must be on the ancestor's storage ({pyramid.descriptor.storage_type}) "
                          "for its slabs to be links")
    if target.descriptor_path == pyramid.url:
        raise WriterError("the updated pyramid needs another name or root than its ancestor")
    if target.storage_type == "S3" and parse_path(target.root).cluster != parse_path(pyramid.url).cluster:
        raise WriterError("the new pyramid must be on the ancestor's S3 cluster for its slabs to be links")

    tms = pyramid.tms
    matrices = sorted((pyramid.matrix(lv.id) for lv in pyramid.descriptor.levels), key=lambda m: m.cell_size)
    bottom = matrices[0]
    footprints = [source_footprint(s, tms.crs) for s in infos]
    recomputed: dict[str, set[tuple[int, int]]] = {bottom.id: set()}
    for footprint in footprints:
        recomputed[bottom.id] |= slabs_for_bbox(bottom, footprint, build_options.width, build_options.height)
    if not recomputed[bottom.id]:
        raise WriterError(f"the new images lie outside the grid {tms.id} at level {bottom.id}")
    for child, parent in zip(matrices, matrices[1:], strict=False):
        recomputed[parent.id] = parent_slabs(child, parent, recomputed[child.id], build_options.width,
                                             build_options.height)

    descriptor_digest = hashlib.sha256(pyramid.descriptor.to_json()).hexdigest()[:16]
    fp = fingerprint(kind="update", ancestor=pyramid.url, ancestor_descriptor=descriptor_digest,
                     sources=source_identity(infos, origins), options=identity_options(build_options),
                     root=target.root, name=name)
    writer = PyramidWriter(storage, target, tms, matrices, build_options, fp, progress,
                           footprints=footprints)
    _prepare_state(writer, ancestor, recomputed)
    async with writer:
        await writer.start(overwrite)
        await _link_unchanged(writer, ancestor, recomputed)
        output_spec = writer.output(bottom)

        async def compute(col: int, row: int) -> EncodedSlab | None:
            bbox = slab_bbox(bottom, col, row, build_options.width, build_options.height)
            chosen = tuple(s for s, f in zip(infos, footprints, strict=True) if _overlaps(f, bbox))
            background = await ancestor.stored(storage, bottom.id, col, row)
            if not chosen and background is None:
                return None
            task = tasks.BottomTask(col, row, bottom, tms.crs, output_spec, chosen, build_options.interpolation,
                                    background)
            return await writer.compute(task)

        await writer.run_level(bottom, recomputed[bottom.id], compute)
        await compute_upper_levels(writer, build_options.upper_filter, UpdateBackground(ancestor, storage, recomputed))
        return await writer.finish(ancestor=pyramid.url)


def _overlaps(a: BBox, b: BBox) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _prepare_state(writer: PyramidWriter, ancestor: Ancestor, recomputed: dict[str, set[tuple[int, int]]]) -> None:
    """List roots (the ancestor's, renumbered after 0), links to make, the ancestor's limits."""
    state = writer.state
    state.ancestor = ancestor.pyramid.url
    index_of = {}
    for i in sorted(ancestor.list.roots):
        index_of[i] = i + 1
        state.extra_roots[i + 1] = ancestor.list.roots[i] if i else ancestor_list_root(ancestor)
    for (level, col, row), slab in ancestor.slabs.items():
        if (col, row) in recomputed.get(level, set()) or slab.data is None:
            continue
        state.linked[(level, col, row)] = LinkedSlab(index_of[slab.root], slab.data, slab.mask)
    for descriptor_level in ancestor.pyramid.descriptor.levels:
        state.ancestor_limits[descriptor_level.id] = descriptor_level.tile_limits


def ancestor_list_root(ancestor: Ancestor) -> str:
    """Root 0 of the ancestor as the new list spells it (where the ancestor really is)."""
    path = parse_path(ancestor.root_path(0))
    return path.key if path.scheme is Scheme.FILE else f"{path.bucket}/{path.key}"


async def _link_unchanged(writer: PyramidWriter, ancestor: Ancestor, recomputed: dict[str, set[tuple[int, int]]]) -> None:
    """Links at the new pyramid's places to the ancestor's real slabs (data and mask)."""
    todo = [key for key in writer.state.linked if writer.journal.get(*key) is None]
    writer.progress.start("links to the ancestor", len(writer.state.linked), len(writer.state.linked) - len(todo))
    queue = iter(todo)

    async def worker() -> None:
        for level, col, row in queue:
            slab = ancestor.slabs[(level, col, row)]
            root = ancestor.root_path(slab.root)
            try:
                assert slab.data is not None
                await writer.storage.link(f"{root}/{slab.data}", writer.target.slab_path(level, col, row))
                if slab.mask:
                    await writer.storage.link(f"{root}/{slab.mask}", writer.target.slab_path(level, col, row, True))
            except StorageError as exc:
                raise WriterError(f"level {level}, slab ({col}, {row}): cannot link to the ancestor: {exc}") from None
            await writer.journal.add(SlabRecord(level, col, row, "L"))
            writer.progress.advance()

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(_LINK_CONCURRENCY, max(len(todo), 1))):
                group.create_task(worker())
    except BaseExceptionGroup as errors:
        await writer.journal.flush()
        raise errors.exceptions[0] from None
    await writer.journal.flush()
    writer.progress.end()
