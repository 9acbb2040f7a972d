"""Builds onto moto S3: ROK4's object layout, same bytes as on disk, readable back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_writer_util import SETTINGS, SOURCES, level_tiles

from tileserver.pyramid import Pyramid
from tileserver.rok4.listfile import parse_list
from tileserver.rok4.naming import parse_slab_name
from tileserver.storage import Storage
from tileserver.writer.build import build_async
from tileserver.writer.errors import WriterError
from tileserver.writer.options import BuildOptions

OPTIONS = BuildOptions(tms="PM", bottom="12", top="10", width=2, height=2, compression="jpg", srs="EPSG:2154",
                       mask=True)


@pytest.mark.parametrize("prefix", ["", "/some/prefix"])
async def test_build_on_s3_matches_disk(tmp_path, s3_server, s3_bucket, s3_settings, prefix):
    async with Storage(SETTINGS) as disk:
        await build_async([str(SOURCES / "SCAN1000.tif")], str(tmp_path), "P", OPTIONS, disk)
    root = f"s3://{s3_bucket}{prefix}"
    key_prefix = prefix.strip("/") + "/" if prefix else ""
    async with Storage(s3_settings) as storage:
        summary = await build_async([str(SOURCES / "SCAN1000.tif")], root, "P", OPTIONS, storage)
        pyramid = await Pyramid.open(f"{root}/P.json", storage)
        on_s3 = {lv.id: await level_tiles(pyramid, lv.id) for lv in pyramid.descriptor.levels}
    assert summary["descriptor"] == f"{root}/P.json"
    descriptor = json.loads(s3_server.get(s3_bucket, f"{key_prefix}P.json"))
    for level in descriptor["levels"]:
        assert level["storage"] == {"type": "S3", "bucket_name": s3_bucket,
                                    "image_prefix": f"{key_prefix}P/DATA_{level['id']}",
                                    "mask_prefix": f"{key_prefix}P/MASK_{level['id']}"}
    listing = parse_list(s3_server.get(s3_bucket, f"{key_prefix}P.list").decode())
    assert listing.roots == {0: f"{s3_bucket}/{key_prefix}P"}
    disk_listing = parse_list((tmp_path / "P.list").read_text())
    assert len(listing.entries) == len(disk_listing.entries)
    for _, slab, _ in listing.entries:
        name = parse_slab_name(slab)
        assert slab == f"{name.kind}_{name.level}_{name.col}_{name.row}"
        disk_slab = next(s for _, s, _ in disk_listing.entries if parse_slab_name(s) == name)
        assert s3_server.get(s3_bucket, f"{key_prefix}P/{slab}") == (tmp_path / "P" / disk_slab).read_bytes()
    async with Storage(SETTINGS) as disk:
        local = await Pyramid.open(str(tmp_path / "P.json"), disk)
        for level, tiles in on_s3.items():
            local_tiles = await level_tiles(local, level)
            assert local_tiles.keys() == tiles.keys()
            assert all(np.array_equal(tiles[k], local_tiles[k]) for k in tiles)
    keys = [o["Key"] for o in s3_server.s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert not [k for k in keys if ".work/" in k or k.endswith(".partial")]  # cleaned up


async def test_s3_missing_bucket_fails_before_work(s3_settings):
    async with Storage(s3_settings) as storage:
        with pytest.raises(WriterError, match="no-such-bucket"):
            await build_async([str(SOURCES / "SCAN1000.tif")], "s3://no-such-bucket", "P", OPTIONS, storage)
