"""tileserver.storage against real parts: the filesystem, moto's S3 server, and a fault proxy."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from s3proxy import S3Proxy
from s3server import KEY, SECRET, MotoS3Server, iam_authentication

from tileserver.settings import S3Cluster, Settings, load_settings
from tileserver.storage import (
    InvalidPathError,
    LinkLoopError,
    Scheme,
    SigV4Signer,
    Storage,
    StorageError,
    StoragePath,
    StorageTimeout,
    dirname,
    is_within,
    join,
    parse_path,
)
from tileserver.storage.sigv4 import Credentials, canonical_uri

DATA = bytes(range(256)) * 40  # 10240 bytes, every offset recognisable


# ---- paths -------------------------------------------------------------------------------------


def test_parse_path_schemes_and_clusters() -> None:
    assert parse_path("/data/PYR.json") == StoragePath(Scheme.FILE, "/data/PYR.json")
    assert parse_path("file:///data/PYR.json") == StoragePath(Scheme.FILE, "/data/PYR.json")
    assert parse_path("s3://pyramids/BDORTHO/DATA_6_1_2") == StoragePath(Scheme.S3, "BDORTHO/DATA_6_1_2", "pyramids")
    p = parse_path("s3://pyramids@S3.storage.fr:9000/PYR.json")
    assert (p.bucket, p.cluster, p.key) == ("pyramids", "s3.storage.fr:9000", "PYR.json")
    for spelled in ("/a/b", "file:///a/b", "s3://b/k/x", "s3://b@h:1/k", "s3://b"):
        assert str(parse_path(spelled)) == spelled
    for bad in ("", "ceph://pool/obj", "s3:///key", "s3://b@/key", "file://"):
        with pytest.raises(InvalidPathError):
            parse_path(bad)


def test_join_and_dirname_keep_scheme_and_cluster() -> None:
    assert dirname("s3://b@h:9000/PYR.json") == "s3://b@h:9000"
    assert join("s3://b@h:9000", "PYR/DATA_1_2_3") == "s3://b@h:9000/PYR/DATA_1_2_3"
    assert join("s3://b/a/c", "../d") == "s3://b/a/d"
    assert join("s3://b/a", "../../../x") == "s3://b/x"  # a key cannot climb out of its bucket
    assert join("s3://b/a", "/root") == "s3://b/root"
    assert join("file:///data/pyr", "../other/PYR/DATA/3") == "file:///data/other/PYR/DATA/3"
    assert join("/data/pyr", "./PYR/DATA/3/00/05/PF.tif") == "/data/pyr/PYR/DATA/3/00/05/PF.tif"
    assert join("/data/pyr", "s3://b/k") == "s3://b/k"
    assert dirname("/data/pyr/PYR.json") == "/data/pyr"


def test_is_within_resolves_dots_and_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "pyr").mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    (root / "escape").symlink_to(tmp_path / "secret")
    assert is_within(str(root / "pyr" / "PYR.json"), [str(root)])
    assert is_within("file://" + str(root / "pyr"), [str(root)])
    assert not is_within(str(root / "pyr" / ".." / ".." / "secret"), [str(root)])
    assert not is_within(str(root / "escape"), [str(root)])
    assert not is_within(str(tmp_path / "rootbis"), [str(root)])
    assert is_within("s3://b/PYR/DATA_1", ["s3://b"])
    assert is_within("s3://b/pyr/x", ["s3://other", "s3://b/pyr"])
    assert not is_within("s3://b/pyr/../x", ["s3://b/pyr"])
    assert not is_within("s3://b/pyramid2/x", ["s3://b/pyr"])
    assert not is_within("s3://b@h2/x", ["s3://b@h1"])
    assert is_within("s3://b/x", ["s3://b@h1"], default_cluster="h1")
    assert not is_within("/data/x", ["s3://b"])


# ---- FILE ---------------------------------------------------------------------------------------


@pytest.fixture
async def file_storage() -> AsyncIterator[Storage]:
    async with Storage(Settings()) as storage:
        yield storage


@pytest.mark.parametrize("inline_max", [1 << 20, 0])
async def test_file_reads(tmp_path: Path, inline_max: int) -> None:
    path = tmp_path / "slab.tif"
    path.write_bytes(DATA)
    async with Storage(Settings(file_inline_read_max=inline_max)) as storage:
        assert await storage.read(str(path)) == DATA
        assert await storage.read_all("file://" + str(path)) == DATA
        assert await storage.read(str(path), 100, 50) == DATA[100:150]
        assert await storage.read(str(path), 10200, 100) == DATA[10200:]  # short read at the end
        assert await storage.read(str(path), 20000, 10) == b""
        assert await storage.read(str(path), 5000) == DATA[5000:]
        assert await storage.read(str(tmp_path / "missing.tif"), 0, 10) is None
        assert await storage.read(str(tmp_path / "nodir" / "x.tif")) is None
        assert await storage.size(str(path)) == len(DATA)
        assert await storage.size(str(tmp_path / "missing")) is None
        with pytest.raises(ValueError):
            await storage.read(str(path), -1, 10)
        assert await storage.read(str(path / "below"), 0, 10) is None  # ENOTDIR: absent
        with pytest.raises(StorageError, match="directory"):
            await storage.read(str(tmp_path), 0, 10)


async def test_file_write_is_atomic_and_creates_directories(tmp_path: Path, file_storage: Storage) -> None:
    target = tmp_path / "PYR" / "DATA" / "3" / "00" / "05" / "PF.tif"
    await file_storage.write(str(target), b"first")
    await file_storage.write(str(target), DATA)
    assert target.read_bytes() == DATA
    assert sorted(os.listdir(target.parent)) == ["PF.tif"]  # no temp file left behind
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    # a failed write (the parent "directory" is a file) raises and leaves nothing behind
    with pytest.raises(StorageError, match="PF.tif"):
        await file_storage.write(str(target / "child"), b"x")
    assert target.read_bytes() == DATA


async def test_file_write_replaces_a_symlink_not_its_target(tmp_path: Path, file_storage: Storage) -> None:
    ancestor = tmp_path / "OLD" / "slab.tif"
    ancestor.parent.mkdir()
    ancestor.write_bytes(b"ancestor")
    link = tmp_path / "NEW" / "slab.tif"
    await file_storage.link(str(ancestor), str(link))
    await file_storage.write(str(link), b"regenerated")
    assert not link.is_symlink() and link.read_bytes() == b"regenerated"
    assert ancestor.read_bytes() == b"ancestor"


async def test_file_exists_delete_list(tmp_path: Path, file_storage: Storage) -> None:
    for rel in ("PYR/DATA/1/00.tif", "PYR/DATA/2/00/01.tif", "PYR/MASK/2/00.tif", "PYRAMID2/x.tif", "PYR.json"):
        await file_storage.write(str(tmp_path / rel), b"x")
    root = str(tmp_path)
    listed = [p async for p in file_storage.list(f"{root}/PYR/")]
    assert listed == [f"{root}/PYR/DATA/1/00.tif", f"{root}/PYR/DATA/2/00/01.tif", f"{root}/PYR/MASK/2/00.tif"]
    by_prefix = sorted([p async for p in file_storage.list(f"file://{root}/PYR")])
    assert by_prefix == sorted(
        f"file://{root}/{rel}" for rel in
        ("PYR/DATA/1/00.tif", "PYR/DATA/2/00/01.tif", "PYR/MASK/2/00.tif", "PYRAMID2/x.tif", "PYR.json")
    )
    assert [p async for p in file_storage.list(f"{root}/PYR/DATA/2")] == [f"{root}/PYR/DATA/2/00/01.tif"]
    assert [p async for p in file_storage.list(f"{root}/nothing/")] == []
    assert await file_storage.exists(f"{root}/PYR.json")
    await file_storage.delete(f"{root}/PYR.json")
    assert not await file_storage.exists(f"{root}/PYR.json")
    await file_storage.delete(f"{root}/PYR.json")  # absent: fine


async def test_file_links(tmp_path: Path, file_storage: Storage) -> None:
    real = tmp_path / "OLD" / "DATA" / "3" / "00.tif"
    real.parent.mkdir(parents=True)
    real.write_bytes(DATA)
    link = tmp_path / "NEW" / "DATA" / "3" / "00.tif"
    await file_storage.link(str(real), str(link))
    assert os.readlink(link) == "../../../OLD/DATA/3/00.tif"  # relative, like ROK4's abs2rel
    assert await file_storage.read(str(link), 0, 16) == DATA[:16]
    assert await file_storage.read_resolving_links(str(link), 0, 16) == (str(link), DATA[:16])
    # link to a link: followed by the kernel
    second = tmp_path / "NEWER" / "00.tif"
    await file_storage.link(str(link), str(second))
    assert await file_storage.read(str(second), 4, 4) == DATA[4:8]
    # re-linking replaces the link atomically
    other = tmp_path / "other.tif"
    other.write_bytes(b"other")
    await file_storage.link(str(other), str(second))
    assert await file_storage.read_all(str(second)) == b"other"
    # dangling = absent; loops = LinkLoopError
    dangling = tmp_path / "dangling.tif"
    dangling.symlink_to(tmp_path / "gone.tif")
    assert await file_storage.read(str(dangling), 0, 10) is None
    assert not await file_storage.exists(str(dangling))
    assert await file_storage.read_resolving_links(str(dangling), 0, 10) == (str(dangling), None)
    loop_a, loop_b = tmp_path / "a.tif", tmp_path / "b.tif"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    with pytest.raises(LinkLoopError, match="a.tif"):
        await file_storage.read(str(loop_a), 0, 10)
    with pytest.raises(LinkLoopError):
        await file_storage.read_resolving_links(str(loop_a), 0, 2048)
    with pytest.raises(LinkLoopError):
        await file_storage.exists(str(loop_a))
    with pytest.raises(InvalidPathError):
        await file_storage.link("s3://bucket/key", str(tmp_path / "x"))


# ---- S3 -----------------------------------------------------------------------------------------


async def test_s3_reads(s3_storage: Storage, s3_server: MotoS3Server, s3_bucket: str) -> None:
    s3_server.put(s3_bucket, "PYR/DATA_3_0_0", DATA)
    path = f"s3://{s3_bucket}/PYR/DATA_3_0_0"
    assert await s3_storage.read(path) == DATA
    assert await s3_storage.read_all(path) == DATA
    assert await s3_storage.read(path, 100, 50) == DATA[100:150]
    assert await s3_storage.read(path, 0, 2048 + 8 * 256) == DATA[: 2048 + 8 * 256]
    assert await s3_storage.read(path, 10200, 100) == DATA[10200:]  # short read
    assert await s3_storage.read(path, 20000, 100) == b""  # 416
    assert await s3_storage.read(path, 5000) == DATA[5000:]
    assert await s3_storage.read(path, 0, 0) == b""
    assert await s3_storage.read(f"s3://{s3_bucket}/PYR/DATA_3_9_9", 0, 100) is None
    assert await s3_storage.read(f"s3://{s3_bucket}/PYR/DATA_3_9_9", 0, 0) is None
    assert await s3_storage.size(path) == len(DATA)
    assert await s3_storage.size(f"s3://{s3_bucket}/nope") is None
    assert await s3_storage.exists(path)
    assert not await s3_storage.exists(f"s3://{s3_bucket}/nope")


async def test_s3_write_list_delete(s3_storage: Storage, s3_server: MotoS3Server, s3_bucket: str) -> None:
    odd = "PYR/odd key+é~(1).json"
    await s3_storage.write(f"s3://{s3_bucket}/{odd}", b"{}")
    assert s3_server.get(s3_bucket, odd) == b"{}"  # checked with an independent client
    for i in range(7):
        await s3_storage.write(f"s3://{s3_bucket}/PYR/DATA_1_{i}_0", DATA[:i])
    await s3_storage.write(f"s3://{s3_bucket}/PYRAMID2/DATA_1_0_0", b"x")
    assert await s3_storage.read(f"s3://{s3_bucket}/PYR/DATA_1_5_0") == DATA[:5]
    assert await s3_storage.read(f"s3://{s3_bucket}/{odd}", 1, 1) == b"}"
    listed = [p async for p in s3_storage.list(f"s3://{s3_bucket}/PYR/")]
    assert listed == sorted([f"s3://{s3_bucket}/PYR/DATA_1_{i}_0" for i in range(7)] + [f"s3://{s3_bucket}/{odd}"])
    assert len([p async for p in s3_storage.list(f"s3://{s3_bucket}/PYR")]) == 9
    assert len([p async for p in s3_storage.list(f"s3://{s3_bucket}")]) == 9
    await s3_storage.delete(f"s3://{s3_bucket}/{odd}")
    assert not await s3_storage.exists(f"s3://{s3_bucket}/{odd}")
    await s3_storage.delete(f"s3://{s3_bucket}/{odd}")  # absent: fine


async def test_s3_list_pages(s3_settings: Settings, s3_bucket: str, s3_proxy: S3Proxy) -> None:
    settings = replace(s3_settings, s3_list_page_size=3, s3_clusters=(S3Cluster(s3_proxy.url, KEY, SECRET),))
    async with Storage(settings) as storage:
        for i in range(8):
            await storage.write(f"s3://{s3_bucket}/L/{i}", b"x")
        s3_proxy.clear()
        listed = [p async for p in storage.list(f"s3://{s3_bucket}/L/")]
    assert listed == [f"s3://{s3_bucket}/L/{i}" for i in range(8)]
    assert s3_proxy.count("GET", f"/{s3_bucket}") == 3


async def test_s3_write_to_missing_bucket_fails(s3_storage: Storage) -> None:
    with pytest.raises(StorageError, match="no-such-bucket"):
        await s3_storage.write("s3://no-such-bucket-here/x", b"x")


# ---- S3 links -----------------------------------------------------------------------------------


async def test_s3_link_objects(s3_storage: Storage, s3_server: MotoS3Server, s3_bucket: str) -> None:
    other = s3_server.create_bucket()
    s3_server.put(other, "OLD/DATA_3_0_0", DATA)
    await s3_storage.link(f"s3://{other}/OLD/DATA_3_0_0", f"s3://{s3_bucket}/NEW/DATA_3_0_0")
    assert s3_server.get(s3_bucket, "NEW/DATA_3_0_0") == f"SYMLINK#{other}/OLD/DATA_3_0_0".encode()
    link = f"s3://{s3_bucket}/NEW/DATA_3_0_0"
    # a plain read returns the link object itself; the resolving read follows it
    assert (await s3_storage.read(link, 0, 2048)).startswith(b"SYMLINK#")
    assert await s3_storage.read_resolving_links(link, 0, 2048) == (f"s3://{other}/OLD/DATA_3_0_0", DATA[:2048])
    assert await s3_storage.read_resolving_links(link) == (f"s3://{other}/OLD/DATA_3_0_0", DATA)
    # a range past the link object's end (416 → b"") is recognised too, by looking at its head
    assert await s3_storage.read_resolving_links(link, 4096, 16) == (f"s3://{other}/OLD/DATA_3_0_0", DATA[4096:4112])
    # real objects come back under the path as given, short reads included
    real = f"s3://{other}/OLD/DATA_3_0_0"
    assert await s3_storage.read_resolving_links(real, 10000, 1000) == (real, DATA[10000:])
    s3_server.put(s3_bucket, "tiny", b"tiny")
    assert await s3_storage.read_resolving_links(f"s3://{s3_bucket}/tiny", 0, 2048) == (f"s3://{s3_bucket}/tiny", b"tiny")
    assert await s3_storage.read_resolving_links(f"s3://{s3_bucket}/absent", 0, 2048) == (f"s3://{s3_bucket}/absent", None)


async def test_s3_link_chains_loops_and_dangling(s3_storage: Storage, s3_server: MotoS3Server, s3_bucket: str) -> None:
    b = s3_bucket
    s3_server.put(b, "real", DATA)
    chain = ["real"] + [f"l{i}" for i in range(1, 6)]
    for previous, name in zip(chain, chain[1:], strict=False):
        await s3_storage.link(f"s3://{b}/{previous}", f"s3://{b}/{name}")
    depth = s3_storage.settings.max_link_depth
    assert depth == 4
    assert await s3_storage.read_resolving_links(f"s3://{b}/l4", 0, 2048) == (f"s3://{b}/real", DATA[:2048])
    with pytest.raises(LinkLoopError, match="more than 4"):
        await s3_storage.read_resolving_links(f"s3://{b}/l5", 0, 2048)
    s3_server.put(b, "loop-a", f"SYMLINK#{b}/loop-b".encode())
    s3_server.put(b, "loop-b", f"SYMLINK#{b}/loop-a".encode())
    s3_server.put(b, "self", f"SYMLINK#{b}/self".encode())
    for start in ("loop-a", "self"):
        with pytest.raises(LinkLoopError, match="loop"):
            await asyncio.wait_for(s3_storage.read_resolving_links(f"s3://{b}/{start}", 0, 2048), 5)
    await s3_storage.link(f"s3://{b}/gone", f"s3://{b}/dangling")
    assert await s3_storage.read_resolving_links(f"s3://{b}/dangling", 0, 2048) == (f"s3://{b}/gone", None)


async def test_s3_link_must_stay_on_its_storage(s3_storage: Storage, s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidPathError):
        await s3_storage.link(str(tmp_path / "x"), f"s3://{s3_bucket}/link")


# ---- multi-cluster and ROK4 environment ---------------------------------------------------------


async def test_clusters_are_chosen_by_host(s3_server: MotoS3Server, s3_proxy: S3Proxy, s3_bucket: str) -> None:
    """Two clusters: moto directly (default) and the proxy; only proxy traffic is counted."""
    settings = Settings(s3_clusters=(S3Cluster(s3_server.url, KEY, SECRET), S3Cluster(s3_proxy.url, KEY, SECRET)))
    s3_server.put(s3_bucket, "real", DATA)
    async with Storage(settings) as storage:
        assert await storage.read(f"s3://{s3_bucket}/real", 0, 10) == DATA[:10]
        assert await storage.read(f"s3://{s3_bucket}@{s3_server.name}/real", 0, 10) == DATA[:10]
        assert s3_proxy.requests == []
        assert await storage.read(f"s3://{s3_bucket}@{s3_proxy.name}/real", 0, 10) == DATA[:10]
        assert s3_proxy.count("GET", f"/{s3_bucket}/real", "bytes=0-9") == 1
        # a link read through a cluster is followed on that same cluster
        await storage.link(f"s3://{s3_bucket}@{s3_proxy.name}/real", f"s3://{s3_bucket}@{s3_proxy.name}/link")
        s3_proxy.clear()
        real, data = await storage.read_resolving_links(f"s3://{s3_bucket}@{s3_proxy.name}/link", 0, 2048)
        assert (real, data) == (f"s3://{s3_bucket}@{s3_proxy.name}/real", DATA[:2048])
        assert [(r.method, r.key) for r in s3_proxy.requests] == [("GET", "link"), ("GET", "real")]
        with pytest.raises(InvalidPathError, match="unknown S3 cluster"):
            await storage.read(f"s3://{s3_bucket}@elsewhere:9000/real")
        with pytest.raises(InvalidPathError, match="share a storage"):
            await storage.link(f"s3://{s3_bucket}/real", f"s3://{s3_bucket}@{s3_proxy.name}/x")


async def test_rok4_environment(s3_server: MotoS3Server, s3_proxy: S3Proxy, s3_bucket: str) -> None:
    env = {"ROK4_S3_URL": f"{s3_proxy.url},{s3_server.url}", "ROK4_S3_KEY": f"{KEY},{KEY}",
           "ROK4_S3_SECRETKEY": f"{SECRET},{SECRET}"}
    settings = load_settings(env=env)
    async with Storage(settings) as storage:
        await storage.write(f"s3://{s3_bucket}/PYR.json", b"{}")
        assert s3_proxy.count("PUT", f"/{s3_bucket}/PYR.json") == 1  # first cluster = default
        assert await storage.read(f"s3://{s3_bucket}@{s3_server.name}/PYR.json") == b"{}"
        assert s3_proxy.count("GET") == 0


async def test_s3_paths_need_a_started_storage(s3_settings: Settings, s3_bucket: str) -> None:
    storage = Storage(s3_settings)
    with pytest.raises(StorageError, match="not started"):
        await storage.read(f"s3://{s3_bucket}/x")
    async with Storage(Settings()) as no_s3:
        with pytest.raises(InvalidPathError, match="no S3 cluster"):
            await no_s3.read(f"s3://{s3_bucket}/x")


# ---- faults, through the proxy -----------------------------------------------------------------


@pytest.fixture
async def proxied(s3_proxy_settings: Settings, s3_server: MotoS3Server, s3_bucket: str) -> AsyncIterator[Storage]:
    s3_server.put(s3_bucket, "slab", DATA)
    async with Storage(s3_proxy_settings) as storage:
        yield storage


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_transient_errors_are_retried(proxied: Storage, s3_proxy: S3Proxy, s3_bucket: str, status: int) -> None:
    s3_proxy.fail_next(2, status)
    assert await proxied.read(f"s3://{s3_bucket}/slab", 0, 16) == DATA[:16]
    assert s3_proxy.count("GET", f"/{s3_bucket}/slab", "bytes=0-15") == 3
    assert [r.status for r in s3_proxy.requests] == [status, status, 206]


async def test_retries_run_out(proxied: Storage, s3_proxy: S3Proxy, s3_bucket: str) -> None:
    s3_proxy.fail_next(3, 503)
    with pytest.raises(StorageError, match=rf"GET s3://{s3_bucket}/slab: HTTP 503 SlowDown \(3 attempts\)") as info:
        await proxied.read(f"s3://{s3_bucket}/slab", 0, 16)
    assert not isinstance(info.value, StorageTimeout)
    assert s3_proxy.count() == 3


async def test_forbidden_is_not_retried(proxied: Storage, s3_proxy: S3Proxy, s3_bucket: str) -> None:
    s3_proxy.fail_next(1, 403)
    with pytest.raises(StorageError, match="access denied"):
        await proxied.read(f"s3://{s3_bucket}/slab", 0, 16)
    assert s3_proxy.count() == 1
    s3_proxy.fail_next(1, 403, method="PUT")
    with pytest.raises(StorageError, match="access denied"):
        await proxied.write(f"s3://{s3_bucket}/new", b"x")
    assert s3_proxy.count("PUT") == 1


async def test_stall_times_out_within_bounds(proxied: Storage, s3_proxy: S3Proxy, s3_bucket: str) -> None:
    s3_proxy.stall_next(1, 2.0)
    assert await proxied.read(f"s3://{s3_bucket}/slab", 0, 16) == DATA[:16]  # retried after 0.5 s
    assert s3_proxy.count("GET") == 2
    s3_proxy.clear()
    s3_proxy.stall_next(3, 3.0)
    started = time.monotonic()
    with pytest.raises(StorageTimeout, match=rf"GET s3://{s3_bucket}/slab: no answer within 0.5 s \(3 attempts\)"):
        await proxied.read(f"s3://{s3_bucket}/slab", 0, 16)
    elapsed = time.monotonic() - started
    assert 1.4 < elapsed < 2.5, elapsed  # 3 × 0.5 s + back-off, never the 3 s stall
    assert s3_proxy.count("GET") == 3


async def test_stalled_write_times_out(proxied: Storage, s3_proxy: S3Proxy, s3_bucket: str) -> None:
    s3_proxy.stall_next(3, 3.0, method="PUT")
    started = time.monotonic()
    with pytest.raises(StorageTimeout, match="PUT"):
        await proxied.write(f"s3://{s3_bucket}/new", b"x")
    assert time.monotonic() - started < 3.0


async def test_connection_resets_are_retried(proxied: Storage, s3_proxy: S3Proxy, s3_bucket: str) -> None:
    s3_proxy.reset_next(2)
    assert await proxied.read(f"s3://{s3_bucket}/slab", 0, 16) == DATA[:16]
    assert s3_proxy.count("GET") == 3
    s3_proxy.reset_next(1, method="PUT")
    await proxied.write(f"s3://{s3_bucket}/new", b"x")
    assert s3_proxy.count("PUT") == 2
    s3_proxy.clear()
    s3_proxy.reset_next(100, method="GET")
    with pytest.raises(StorageError, match="connection failed"):
        await proxied.read(f"s3://{s3_bucket}/slab", 0, 16)
    # 3 attempts; aiohttp itself re-sends once a request that fails on a reused keep-alive
    # connection (RFC 9112 §9.3.1), so an attempt can show up twice
    assert 3 <= s3_proxy.count("GET") <= 6


async def test_listing_and_head_are_retried(proxied: Storage, s3_proxy: S3Proxy, s3_bucket: str) -> None:
    s3_proxy.fail_next(1, 500, method="GET")
    assert [p async for p in proxied.list(f"s3://{s3_bucket}/sl")] == [f"s3://{s3_bucket}/slab"]
    s3_proxy.fail_next(2, 503, method="HEAD")
    assert await proxied.size(f"s3://{s3_bucket}/slab") == len(DATA)
    assert s3_proxy.count("HEAD") == 3


async def test_concurrent_reads_share_the_pool(s3_settings: Settings, s3_server: MotoS3Server, s3_bucket: str) -> None:
    s3_server.put(s3_bucket, "slab", DATA)
    async with Storage(replace(s3_settings, storage_max_connections=4)) as storage:
        results = await asyncio.gather(*(storage.read(f"s3://{s3_bucket}/slab", i * 16, 16) for i in range(64)))
    assert results == [DATA[i * 16 : i * 16 + 16] for i in range(64)]


# ---- SigV4 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["PYR/DATA_6_1121_11181", "a b/c+d=é~%x(1)!*'", "x//y/./z", "ünï/😀"])
@pytest.mark.parametrize("token", [None, "session/token+=="])
@pytest.mark.parametrize(("method", "range_header"), [("GET", "bytes=0-2047"), ("GET", None), ("HEAD", None)])
def test_signer_matches_botocore(key: str, token: str | None, method: str, range_header: str | None) -> None:
    uri = canonical_uri("my-bucket", key)
    url = "http://s3.example.test:9000" + uri
    assert url == "http://s3.example.test:9000/my-bucket/" + quote(key, safe="/~")
    request = AWSRequest(method, url, headers={"Range": range_header} if range_header else {})
    S3SigV4Auth(BotoCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token), "s3", "eu-west-3").add_auth(request)
    head = SigV4Signer("eu-west-3").request_head(
        Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token), method, "s3.example.test:9000", uri,
        range_header, amz_date=request.headers["X-Amz-Date"],
    ).decode("latin-1")
    request_line, *lines = head.split("\r\n")[:-2]
    assert request_line == f"{method} {uri} HTTP/1.1"
    ours = dict(line.split(": ", 1) for line in lines)
    assert ours["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert ours["Authorization"] == request.headers["Authorization"]
    for name in ("X-Amz-Date", "X-Amz-Content-SHA256", "X-Amz-Security-Token", "Range"):
        assert ours.get(name) == request.headers.get(name)


async def test_signatures_are_verified_by_moto(s3_server: MotoS3Server, s3_proxy: S3Proxy, s3_bucket: str) -> None:
    """With IAM authentication on, moto recomputes every signature from what it received."""
    key, secret = s3_server.iam_user()
    odd = "PYR/ünï code+ (1)/DATA_3_0_0"
    s3_server.put(s3_bucket, odd, DATA)
    good = Settings(s3_clusters=(S3Cluster(s3_proxy.url, key, secret),), storage_retries=2, storage_retry_backoff=0.01)
    bad = replace(good, s3_clusters=(S3Cluster(s3_proxy.url, key, "not-the-S3CRET"),))
    with iam_authentication():
        async with Storage(good) as storage:
            assert await storage.read(f"s3://{s3_bucket}/{odd}", 100, 50) == DATA[100:150]
            assert await storage.read(f"s3://{s3_bucket}/{odd}") == DATA
            assert await storage.size(f"s3://{s3_bucket}/{odd}") == len(DATA)
            await storage.write(f"s3://{s3_bucket}/written", b"x")
        assert [r.status for r in s3_proxy.requests] == [206, 200, 200, 200]
        sent = s3_proxy.requests[0].headers
        assert sent["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={key}/")
        assert "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date" in sent["Authorization"]
        s3_proxy.clear()
        async with Storage(bad) as storage:
            with pytest.raises(StorageError, match="access denied.*SignatureDoesNotMatch") as info:
                await storage.read(f"s3://{s3_bucket}/{odd}", 0, 16)
        assert "S3CRET" not in str(info.value)
        assert [r.status for r in s3_proxy.requests] == [403]  # refused once, not retried


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- FILE descriptors kept open -----------------------------------------------------------------


def _open_under(directory: Path) -> int:
    """Descriptors of this process open on files under `directory`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory))
        except OSError:
            pass
    return count


async def test_file_handles_are_bounded_and_follow_this_process_writes(tmp_path):
    from tileserver.storage.file import FileBackend
    from tileserver.storage.paths import parse_path

    backend = FileBackend(handles=4, handle_ttl=0.2)
    paths = []
    for i in range(10):
        (tmp_path / f"s{i}.tif").write_bytes(bytes([i]) * 64)
        paths.append(parse_path(str(tmp_path / f"s{i}.tif")))
    for p in paths:
        assert await backend.read(p, 8, 4) == bytes([int(p.key[-5])]) * 4
    assert len(backend.handles) == 4 and _open_under(tmp_path) == 4  # never more than the bound
    # this process's write replaces the file: the next read sees it, not the old open file
    await backend.write(paths[-1], b"new content")
    assert await backend.read(paths[-1], 0, 3) == b"new"
    await backend.delete(paths[-1])
    assert await backend.read(paths[-1], 0, 3) is None
    # another writer replaces a file: seen once the descriptor's time is up
    assert await backend.read(paths[-2], 0, 2) == bytes([8, 8])
    replacement = tmp_path / "other.tmp"
    replacement.write_bytes(b"zz" * 8)
    os.replace(replacement, tmp_path / "s8.tif")
    await asyncio.sleep(0.25)
    assert await backend.read(paths[-2], 0, 2) == b"zz"
    # a short read at the end of a file comes back short, past the end empty
    assert await backend.read(paths[0], 60, 10) == bytes([0]) * 4
    assert await backend.read(paths[0], 100, 10) == b""
    await backend.close()
    assert len(backend.handles) == 0 and _open_under(tmp_path) == 0  # every descriptor closed


async def test_file_handles_off_opens_at_each_read(tmp_path):
    from tileserver.storage.file import FileBackend
    from tileserver.storage.paths import parse_path

    (tmp_path / "a").write_bytes(b"abcdef")
    backend = FileBackend(handles=0)
    assert await backend.read(parse_path(str(tmp_path / "a")), 2, 2) == b"cd"
    assert len(backend.handles) == 0
