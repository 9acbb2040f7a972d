"""`--shard K/N` + `--finish N`: N workers and a finishing step make the same pyramid as one run."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from test_writer_build import _tree
from test_writer_util import SETTINGS, SOURCES

from tileserver.cli import main
from tileserver.storage import Storage
from tileserver.writer.build import build_async
from tileserver.writer.errors import WriterError
from tileserver.writer.options import BuildOptions
from tileserver.writer.plan import shard_share

OPTIONS = BuildOptions(tms="PM", bottom="13", top="10", width=1, height=1, compression="png", srs="EPSG:2154")
SOURCE = [str(SOURCES / "SCAN1000.tif")]


def test_shares_partition_the_slabs():
    slabs = {(c, r) for c in range(40) for r in range(30)}
    shares = [shard_share(slabs, k, 3) for k in range(3)]
    assert sorted(s for share in shares for s in share) == sorted(slabs)
    assert all(len(share) > 300 for share in shares)
    assert shard_share(slabs, 1, 3) == shares[1]  # deterministic


def test_shares_keep_quadtree_parents_whole():
    """Blocks are aligned squares of 2^k slabs: every parent's four children fall in one share (so
    the shard builds the parent too), even with as few as 16 slabs for 2 shards."""
    slabs = {(c, r) for c in range(8, 12) for r in range(4, 8)}
    owner = {s: k for k in range(2) for s in shard_share(slabs, k, 2)}
    assert sorted(Counter(owner.values()).values()) == [8, 8]
    for pc in range(4, 6):
        for pr in range(2, 4):
            assert len({owner[(2 * pc + dc, 2 * pr + dr)] for dc in (0, 1) for dr in (0, 1)}) == 1


async def test_shards_and_finish_equal_a_single_run(tmp_path):
    async with Storage(SETTINGS) as storage:
        await build_async(SOURCE, str(tmp_path / "one"), "P", OPTIONS, storage)
        out = str(tmp_path / "many")
        with pytest.raises(WriterError, match="not finished"):
            await build_async(SOURCE, out, "P", OPTIONS, storage, finish=3)
        reports = await asyncio.gather(*(build_async(SOURCE, out, "P", OPTIONS, storage, shard=(k, 3))
                                         for k in range(3)))
        assert all(r["slabs"] > 0 for r in reports)
        # each shard also built the upper slabs whose every child is its own; the finish step
        # (which skips what the merged journals hold) does only what straddles shards
        assert all(r["upper_slabs"] > 0 for r in reports)
        assert not (tmp_path / "many" / "P.json").exists()  # only the finishing step writes it
        await build_async(SOURCE, out, "P", OPTIONS, storage, finish=3)
    assert _tree(tmp_path / "many") == _tree(tmp_path / "one")
    assert (tmp_path / "many" / "P.list").read_text().replace("many", "one").splitlines()[2:] == \
        (tmp_path / "one" / "P.list").read_text().splitlines()[2:]
    assert not list((tmp_path / "many").glob("P.list.partial*"))


def test_finish_waits_for_shards_from_the_cli(tmp_path, capsys):
    args = ["pyramid", "build", *SOURCE, "--srs", "EPSG:2154", "--tms", "PM", "--bottom", "12", "--top", "11",
            "--width", "1", "--height", "1", "--output", str(tmp_path), "--name", "P", "--quiet"]
    for k in range(2):
        assert main([*args, "--shard", f"{k}/2"]) == 0
    assert "shard=" in capsys.readouterr().out
    assert main([*args, "--finish", "2", "--wait", "1", "--json"]) == 0
    assert (tmp_path / "P.json").exists()


async def test_shards_from_copies_of_one_source_named_by_origin(tmp_path):
    """Shards run on other machines read their own copy of the source (an S3 upload downloaded to
    a temporary directory): named by its origin, the copies make one pyramid, the single run's;
    named by their paths, a shard's rerun refuses its journal as another pyramid's."""
    import shutil

    def copy(k: int) -> list[str]:
        directory = tmp_path / f"copy-{k}"
        directory.mkdir()
        for suffix in (".tif", ".tfw"):
            shutil.copy(SOURCES / f"SCAN1000{suffix}", directory / f"SCAN1000{suffix}")
        return [str(directory / "SCAN1000.tif")]

    origin = "s3://uploads/u1/data/SCAN1000.tif"
    async with Storage(SETTINGS) as storage:
        await build_async(SOURCE, str(tmp_path / "one"), "P", OPTIONS, storage)
        out = str(tmp_path / "many")
        for k in range(2):
            copied = copy(k)
            await build_async(copied, out, "P", OPTIONS, storage, shard=(k, 2), origins={copied[0]: origin})
        with pytest.raises(WriterError, match="other parameters or sources"):
            await build_async(copy(2), out, "P", OPTIONS, storage, shard=(0, 2))
        last = copy(3)
        await build_async(last, out, "P", OPTIONS, storage, finish=2, origins={last[0]: origin})
    assert _tree(tmp_path / "many") == _tree(tmp_path / "one")
