"""The async pyramid reader over FILE and S3 (moto on loopback), against ROK4's real fixture pyramids."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tileserver.pyramid import Pyramid, PyramidError, SlabIndexCache
from tileserver.rok4.descriptor import parse_descriptor
from tileserver.rok4.listfile import parse_list
from tileserver.rok4.naming import parse_slab_name
from tileserver.rok4.slab import NotASlabError, index_size, parse_index
from tileserver.settings import Settings, load_settings
from tileserver.storage import Storage

DATA = Path(__file__).parent / "data" / "pyramids"
NAMES = ["BDPARCELLAIRE", "MONTAGNE", "RGEALTI", "SCAN1000"]
TMS_DIR = load_settings(env={}).tms_directory


def slab_tiles_from_file(path: Path, n: int) -> list[bytes | None]:
    """Tiles of a slab read independently of the reader: parse the file's own index."""
    raw = path.read_bytes()
    index = parse_index(raw[: index_size(n)], n, str(path))
    return [raw[o : o + s] if s else None for o, s in zip(index.offsets, index.sizes, strict=True)]


def every_tile(pyramid: Pyramid):
    for level in pyramid.descriptor.levels:
        lim = level.tile_limits
        for row in range(lim.min_row, lim.max_row + 1):
            for col in range(lim.min_col, lim.max_col + 1):
                yield level, col, row


@pytest.mark.parametrize("name", NAMES)
async def test_every_tile_of_the_fixture_pyramids_on_disk(name):
    async with Storage(Settings(tms_directory=TMS_DIR)) as storage:
        pyramid = await Pyramid.open(str(DATA / f"{name}.json"), storage, tms_directory=TMS_DIR)
        count = 0
        for level, col, row in every_tile(pyramid):
            data = await pyramid.get_tile(level.id, col, row)
            slab_col, slab_row, n = level.slab_of(col, row)
            slab_file = Path(pyramid.slab_path(level, slab_col, slab_row))
            expected = slab_tiles_from_file(slab_file, level.tiles_per_slab)[n] if slab_file.exists() else None
            assert data == expected
            if data is None:
                continue
            count += 1
            pixels = pyramid.decode(level.id, data)
            matrix = pyramid.matrix(level.id)
            assert pixels.shape == (matrix.tile_height, matrix.tile_width, pyramid.descriptor.channels)
            assert pixels.dtype == np.dtype(pyramid.format.dtype)
            if pyramid.format.compression == "png":
                with Image.open(__import__("io").BytesIO(data)) as im:
                    reference = np.asarray(im).reshape(pixels.shape)
                assert np.array_equal(reference, pixels)
        assert count > 0


async def test_float32_arrays_and_nodata():
    async with Storage(Settings(tms_directory=TMS_DIR)) as storage:
        pyramid = await Pyramid.open(str(DATA / "RGEALTI.json"), storage, tms_directory=TMS_DIR)
        level = pyramid.bottom_level
        lim = level.tile_limits
        array = await pyramid.get_tile_array(level.id, lim.min_col, lim.min_row)
        assert array.dtype == np.float32 and array.shape[2] == 1
        valid = array[array != -99999]
        assert valid.size and 0 < valid.min() < valid.max() < 5000  # metres of a French DEM
        assert await pyramid.get_tile(level.id, lim.max_col + 1, lim.min_row) is None
        assert await pyramid.get_tile(level.id, -1, -1) is None
        with pytest.raises(PyramidError, match="no level"):
            await pyramid.get_tile("99", 0, 0)
        assert pyramid.nodata_array(level.id).shape == (256, 256, 1)


async def test_open_errors(tmp_path):
    async with Storage(Settings(tms_directory=TMS_DIR)) as storage:
        with pytest.raises(PyramidError, match="no such pyramid"):
            await Pyramid.open(str(tmp_path / "NOPE.json"), storage, tms_directory=TMS_DIR)
        bad = tmp_path / "BAD.json"
        bad.write_text('{"format": "TIFF_PNG_UINT8"}')
        with pytest.raises(PyramidError, match="tile_matrix_set"):
            await Pyramid.open(str(bad), storage, tms_directory=TMS_DIR)
        with pytest.raises(PyramidError, match=".json"):
            await Pyramid.open(str(tmp_path / "x.txt"), storage, tms_directory=TMS_DIR)


def upload_as_objects(s3_server, bucket: str, name: str) -> str:
    """Put a fixture pyramid on S3 with ROK4's object naming; returns the descriptor URL."""
    desc = json.loads((DATA / f"{name}.json").read_text())
    for level in desc["levels"]:
        level["storage"] = {"type": "S3", "bucket_name": bucket, "image_prefix": f"{name}/DATA_{level['id']}"}
    for _, slab, _ in parse_list((DATA / f"{name}.list").read_text()).entries:
        parsed = parse_slab_name(slab)
        s3_server.put(bucket, f"{name}/DATA_{parsed.level}_{parsed.col}_{parsed.row}", (DATA / name / slab).read_bytes())
    s3_server.put(bucket, f"{name}.json", json.dumps(desc).encode())
    return desc


@pytest.mark.parametrize("name", ["SCAN1000", "RGEALTI"])
async def test_s3_reads_equal_disk_reads(name, s3_server, s3_bucket, s3_settings):
    upload_as_objects(s3_server, s3_bucket, name)
    settings = replace(s3_settings, tms_directory=TMS_DIR)
    async with Storage(settings) as storage:
        on_s3 = await Pyramid.open(f"s3://{s3_bucket}/{name}.json", storage, tms_directory=TMS_DIR)
        on_disk = await Pyramid.open(str(DATA / f"{name}.json"), storage, tms_directory=TMS_DIR)
        for level, col, row in every_tile(on_disk):
            assert await on_s3.get_tile(level.id, col, row) == await on_disk.get_tile(level.id, col, row)


async def test_one_index_read_per_cold_slab_then_one_read_per_tile(s3_server, s3_bucket, s3_proxy, s3_proxy_settings):
    upload_as_objects(s3_server, s3_bucket, "MONTAGNE")
    settings = replace(s3_proxy_settings, tms_directory=TMS_DIR)
    async with Storage(settings) as storage:
        pyramid = await Pyramid.open(f"s3://{s3_bucket}/MONTAGNE.json", storage, tms_directory=TMS_DIR)
        # a level whose slab holds several tiles with data
        level = max(pyramid.descriptor.levels, key=lambda lv: lv.tile_limits.max_col - lv.tile_limits.min_col)
        lim = level.tile_limits
        tiles = [(c, r) for r in range(lim.min_row, lim.max_row + 1) for c in range(lim.min_col, lim.max_col + 1)]
        slabs = {level.slab_of(c, r)[:2] for c, r in tiles}
        s3_proxy.clear()
        # 8 concurrent requests per tile, all cold
        results = await asyncio.gather(*(pyramid.get_tile(level.id, c, r) for c, r in tiles for _ in range(8)))
        index_range = f"bytes=0-{index_size(level.tiles_per_slab) - 1}"
        index_reads = [q for q in s3_proxy.requests if q.range == index_range]
        assert len(index_reads) == len(slabs)
        tile_reads = [q for q in s3_proxy.requests if q.range != index_range]
        assert len(tile_reads) == sum(1 for r in results if r is not None)
        # warm: exactly one ranged GET per tile, no index read
        s3_proxy.clear()
        for c, r in tiles:
            await pyramid.get_tile(level.id, c, r)
        with_data = sum(1 for r in results[::8] if r is not None)
        assert len(s3_proxy.requests) == with_data
        assert all(q.range != index_range and q.method == "GET" for q in s3_proxy.requests)


async def test_object_links_are_followed_and_cached(s3_server, s3_bucket, s3_proxy, s3_proxy_settings):
    upload_as_objects(s3_server, s3_bucket, "SCAN1000")
    desc = parse_descriptor((DATA / "SCAN1000.json").read_bytes())
    level = desc.level("5")
    lim = level.tile_limits
    slab_col, slab_row, _ = level.slab_of(lim.min_col, lim.min_row)
    real_key = f"SCAN1000/DATA_5_{slab_col}_{slab_row}"
    moved_key = f"ELSEWHERE/{real_key}"
    s3_server.put(s3_bucket, moved_key, s3_server.get(s3_bucket, real_key))
    s3_server.put(s3_bucket, real_key, f"SYMLINK#{s3_bucket}/{moved_key}".encode())
    settings = replace(s3_proxy_settings, tms_directory=TMS_DIR)
    async with Storage(settings) as storage:
        pyramid = await Pyramid.open(f"s3://{s3_bucket}/SCAN1000.json", storage, tms_directory=TMS_DIR)
        disk = await Pyramid.open(str(DATA / "SCAN1000.json"), storage, tms_directory=TMS_DIR)
        expected = await disk.get_tile("5", lim.min_col, lim.min_row)
        assert await pyramid.get_tile("5", lim.min_col, lim.min_row) == expected
        s3_proxy.clear()
        assert await pyramid.get_tile("5", lim.min_col, lim.min_row) == expected
        assert [q.key for q in s3_proxy.requests] == [moved_key]  # the cached index points at the target


async def test_corrupted_index_names_the_slab(tmp_path):
    copy = tmp_path / "SCAN1000"
    import shutil

    shutil.copytree(DATA / "SCAN1000", copy)
    shutil.copy(DATA / "SCAN1000.json", tmp_path / "SCAN1000.json")
    desc = parse_descriptor((DATA / "SCAN1000.json").read_bytes())
    level = desc.level("3")
    slab_col, slab_row, _ = level.slab_of(level.tile_limits.min_col, level.tile_limits.min_row)
    slab = tmp_path / level.storage.slab_name(slab_col, slab_row)
    raw = bytearray(slab.read_bytes())
    raw[2048:2052] = (16).to_bytes(4, "little")  # first offset inside the header
    slab.write_bytes(bytes(raw))
    async with Storage(Settings(tms_directory=TMS_DIR)) as storage:
        pyramid = await Pyramid.open(str(tmp_path / "SCAN1000.json"), storage, tms_directory=TMS_DIR)
        with pytest.raises(NotASlabError) as err:
            await pyramid.get_tile("3", level.tile_limits.min_col, level.tile_limits.min_row)
        assert str(slab) in str(err.value) and "not a ROK4 slab" in str(err.value)


async def test_single_flight_shares_failures_and_ttl_expiry():
    cache = SlabIndexCache(maxsize=10, ttl=0.05)
    calls = 0

    async def failing():
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise OSError("boom")

    results = await asyncio.gather(*(cache.get("k", failing) for _ in range(5)), return_exceptions=True)
    assert calls == 1 and all(isinstance(r, OSError) for r in results)

    async def loader():
        nonlocal calls
        calls += 1
        return "v"

    calls = 0
    assert await cache.get("k", loader) == "v"
    assert await cache.get("k", loader) == "v"
    assert calls == 1
    await asyncio.sleep(0.06)
    assert await cache.get("k", loader) == "v"
    assert calls == 2
