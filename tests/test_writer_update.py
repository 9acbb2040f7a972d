"""Update by reference, on disk and on moto S3: links, merged slabs, reads through links."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_writer_util import SETTINGS, SOURCES, Reference, level_tiles

from tileserver.pyramid import Pyramid
from tileserver.rok4.listfile import parse_list
from tileserver.storage import Storage
from tileserver.writer.build import build_async
from tileserver.writer.errors import WriterError
from tileserver.writer.options import BuildOptions
from tileserver.writer.update import UpdateOptions, update_async

PATCH_VALUE = 7
ANCESTOR = BuildOptions(tms="LAMB93_12.5m", bottom="10", top="8", width=2, height=2, compression="png",
                        interpolation="nn", srs="EPSG:2154", mask=True)


def write_patch(directory: Path, x: float = 610000, y: float = 6570000, size: int = 30) -> str:
    """A uniform image on the 100 m lattice of SCAN1000, `size` pixels square, top-left at (x, y)."""
    path = directory / "patch.tif"
    tifffile.imwrite(path, np.full((size, size, 3), PATCH_VALUE, np.uint8))
    (directory / "patch.tfw").write_text(f"100\n0\n0\n-100\n{x + 50}\n{y - 50}\n")
    return str(path)


def in_patch(matrix, col: int, row: int, x0=610000, y0=6570000, size=30) -> np.ndarray:
    xmin, _, _, ymax = matrix.tile_bbox(col, row)
    xs = xmin + (np.arange(256) + 0.5) * matrix.cell_size
    ys = ymax - (np.arange(256) + 0.5) * matrix.cell_size
    gx, gy = np.meshgrid(xs, ys)
    return (gx > x0) & (gx < x0 + size * 100) & (gy < y0) & (gy > y0 - size * 100)


async def check_update(storage: Storage, root: str, old_tiles: dict, linked_expected: bool = True) -> None:
    ancestor = await Pyramid.open(f"{root}/V1.json", storage)
    updated = await Pyramid.open(f"{root}/V2.json", storage)
    assert updated.descriptor.format == ancestor.descriptor.format
    assert updated.descriptor.mask_format == "TIFF_ZIP_UINT8"
    matrix = updated.matrix("10")
    ref = Reference("SCAN1000.tif", "EPSG:2154")
    new_tiles = await level_tiles(updated, "10")
    assert new_tiles.keys() == old_tiles.keys()
    for (col, row), tile in new_tiles.items():
        patch = in_patch(matrix, col, row)
        expected, inside = ref.nearest(matrix, updated.tms.crs, col, row)
        assert np.all(tile[patch] == PATCH_VALUE)
        assert np.array_equal(tile[inside & ~patch], expected[inside & ~patch])  # the ancestor's data kept
        assert np.array_equal(tile[~patch], old_tiles[(col, row)][~patch])
    # upper levels: recomputed above the patch, the same elsewhere
    for level in ("9", "8"):
        old, new = await level_tiles(ancestor, level), await level_tiles(updated, level)
        assert old.keys() == new.keys()
        changed = [key for key in new if not np.array_equal(new[key], old[key])]
        assert changed and len(changed) < len(new) or level == "8"


async def test_update_on_disk(tmp_path):
    storage = Storage(SETTINGS)
    await storage.start()
    try:
        await build_async([str(SOURCES / "SCAN1000.tif")], str(tmp_path), "V1", ANCESTOR, storage)
        old_tiles = await level_tiles(await Pyramid.open(str(tmp_path / "V1.json"), storage), "10")
        summary = await update_async(str(tmp_path / "V1.json"), [write_patch(tmp_path)], str(tmp_path), "V2",
                                     UpdateOptions(srs="EPSG:2154"), storage)
        await check_update(storage, str(tmp_path), old_tiles)
    finally:
        await storage.close()
    listing = parse_list((tmp_path / "V2.list").read_text())
    old_listing = parse_list((tmp_path / "V1.list").read_text())
    assert {s for _, s, _ in listing.entries} == {s for _, s, _ in old_listing.entries}  # data and masks
    assert listing.roots == {0: str(tmp_path / "V2"), 1: str(tmp_path / "V1")}
    linked = [slab for root, slab, _ in listing.entries if root == 1]
    own = [slab for root, slab, _ in listing.entries if root == 0]
    assert linked and own and summary["linked_slabs"] * 2 == len(linked)
    for slab in linked:
        path = tmp_path / "V2" / slab
        assert path.is_symlink() and not os.path.isabs(os.readlink(path))  # relative, as ROK4's tools make them
        assert path.resolve() == (tmp_path / "V1" / slab).resolve()
    for slab in own:
        assert (tmp_path / "V2" / slab).is_file() and not (tmp_path / "V2" / slab).is_symlink()


async def test_update_of_an_update_links_to_the_real_slabs(tmp_path):
    storage = Storage(SETTINGS)
    await storage.start()
    try:
        await build_async([str(SOURCES / "SCAN1000.tif")], str(tmp_path), "V1", ANCESTOR, storage)
        await update_async(str(tmp_path / "V1.json"), [write_patch(tmp_path)], str(tmp_path), "V2",
                           UpdateOptions(srs="EPSG:2154"), storage)
        far = tmp_path / "far"
        far.mkdir()
        await update_async(str(tmp_path / "V2.json"), [write_patch(far, 600000, 6580000, 10)], str(tmp_path), "V3",
                           UpdateOptions(srs="EPSG:2154"), storage)
        v3 = await Pyramid.open(str(tmp_path / "V3.json"), storage)
        assert await level_tiles(v3, "10")
    finally:
        await storage.close()
    roots = parse_list((tmp_path / "V3.list").read_text()).roots
    assert roots == {0: str(tmp_path / "V3"), 1: str(tmp_path / "V2"), 2: str(tmp_path / "V1")}
    for link in (tmp_path / "V3").rglob("*.tif"):
        if link.is_symlink():
            target = link.parent / os.readlink(link)
            assert target.is_file() and not target.is_symlink()  # never a link to a link


async def test_update_refuses_other_storage_and_same_name(tmp_path):
    storage = Storage(SETTINGS)
    await storage.start()
    try:
        await build_async([str(SOURCES / "SCAN1000.tif")], str(tmp_path), "V1", ANCESTOR, storage)
        patch = write_patch(tmp_path)
        with pytest.raises(WriterError, match="another name"):
            await update_async(str(tmp_path / "V1.json"), [patch], str(tmp_path), "V1", UpdateOptions(srs="EPSG:2154"),
                               storage)
        with pytest.raises(WriterError, match="ancestor's storage"):
            await update_async(str(tmp_path / "V1.json"), [patch], "s3://bucket", "V2", UpdateOptions(srs="EPSG:2154"),
                               storage)
        with pytest.raises(WriterError, match="--from"):
            await update_async(str(tmp_path / "NOPE.json"), [patch], str(tmp_path), "V2",
                               UpdateOptions(srs="EPSG:2154"), storage)
    finally:
        await storage.close()


async def test_update_on_s3(tmp_path, s3_server, s3_bucket, s3_settings):
    async with Storage(s3_settings) as storage:
        root = f"s3://{s3_bucket}/pyramids"
        await build_async([str(SOURCES / "SCAN1000.tif")], root, "V1", ANCESTOR, storage)
        old_tiles = await level_tiles(await Pyramid.open(f"{root}/V1.json", storage), "10")
        summary = await update_async(f"{root}/V1.json", [write_patch(tmp_path)], root, "V2",
                                     UpdateOptions(srs="EPSG:2154"), storage)
        await check_update(storage, root, old_tiles)
    assert summary["linked_slabs"] > 0
    listing = parse_list(s3_server.get(s3_bucket, "pyramids/V2.list").decode())
    assert listing.roots == {0: f"{s3_bucket}/pyramids/V2", 1: f"{s3_bucket}/pyramids/V1"}
    links = 0
    for root, slab, _ in listing.entries:
        body = s3_server.get(s3_bucket, f"pyramids/V2/{slab}")
        if root == 1:
            assert body == f"SYMLINK#{s3_bucket}/pyramids/V1/{slab}".encode()
            links += 1
        else:
            assert body[:4] == b"II*\x00"
    assert links == 2 * summary["linked_slabs"]  # data and mask
