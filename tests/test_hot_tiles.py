"""Tile bytes of S3 pyramids kept in memory (tileserver/hot_tiles.py, `object_tile_cache_bytes`).

Over real HTTP against moto behind the counting proxy: a tile read once is answered again without
an S3 request, by the fast path at once and by the route; FILE tiles are never kept; a slab
rewritten on S3 is served new once its index expires; the budget holds and is split over workers."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from apputil import app_client, layer_descriptor
from prometheus_client.parser import text_string_to_metric_families
from s3proxy import S3Proxy
from s3server import MotoS3Server
from test_fastpath import Raw, _limits, request_bytes
from test_fastpath_s3 import serving
from test_faults import proxied_settings, upload_scan1000

from tileserver.hot_tiles import HotTiles
from tileserver.publication.model import parse_layer
from tileserver.publication.store import PublicationStore
from tileserver.server_cli import FastTileProtocol
from tileserver.settings import Settings


class _Entry:
    """A stand-in slab-index entry: the cache keys tiles by the entry's identity."""


def test_budget_least_recently_used_out_and_identity_keys() -> None:
    tiles = HotTiles(1600)
    a, b = _Entry(), _Entry()
    for n in range(10):
        tiles.keep(a, n, bytes([n]) * 100)
    assert tiles.held == 1000 and len(tiles) == 10
    assert tiles.tile(b, 3) is None  # another index entry's tile 3 is another tile
    assert tiles.tile(a, 0) == bytes([0]) * 100  # 0 is now the most recent
    for n in range(10, 18):
        tiles.keep(a, n, bytes([n]) * 100)
    assert tiles.held == 1600
    assert tiles.tile(a, 1) is None and tiles.tile(a, 2) is None  # the oldest went first
    assert tiles.tile(a, 0) is not None and tiles.tile(a, 17) is not None
    tiles.keep(a, 99, b"x" * 101)  # more than a sixteenth of the budget: never kept
    assert tiles.tile(a, 99) is None
    assert (tiles.hits, tiles.misses) == (3, 4)  # what /metrics reports (tileserver_object_tile_cache)
    tiles.resize(0)
    assert tiles.held == 0 and len(tiles) == 0 and tiles.tile(a, 0) is None
    tiles.keep(a, 0, b"x")
    assert len(tiles) == 0  # a zero budget keeps nothing


def _published(tmp: Path, s3_server: MotoS3Server, proxy: S3Proxy, **overrides: object) -> tuple[Settings, str, str]:
    bucket = s3_server.create_bucket()
    url = upload_scan1000(s3_server, bucket)
    settings = proxied_settings(tmp, proxy, **overrides)
    Path(settings.data_dir).mkdir(parents=True)
    store = PublicationStore(settings.resolved_store_url)
    store.add_layer(parse_layer("S", layer_descriptor("SCAN1000", root=url.rpartition("/")[0])))
    store.close()
    return settings, bucket, url


def test_an_s3_tile_read_once_is_answered_again_without_s3(tmp_path: Path, s3_server: MotoS3Server,
                                                            s3_proxy: S3Proxy) -> None:
    settings, _, _ = _published(tmp_path, s3_server, s3_proxy)
    assert settings.object_tile_cache_bytes > 0  # on by default
    for fast in (True, False):
        with serving(replace(settings, fast_tiles=fast)) as (address, _):
            lim = _limits(address)
            rest = f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png"
            kvp = ("/wmts?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=S&STYLE=normal&TILEMATRIXSET=PM"
                   f"&TILEMATRIX=10&TILEROW={lim.min_row}&TILECOL={lim.min_col}&FORMAT=image%2Fpng")
            raw = Raw(address)
            s3_proxy.clear()
            first = raw.exchange(request_bytes("GET", rest, {}))
            reads = s3_proxy.count()
            assert first[0] == 200 and first[2].startswith(b"\x89PNG") and reads == 2  # the index, the tile
            at_once = FastTileProtocol.answered
            again = [raw.exchange(request_bytes("GET", path, {})) for path in (rest, kvp, rest)]
            assert s3_proxy.count() == reads, s3_proxy.counts()  # no S3 request for the tile again
            assert all(a[0] == 200 and a[2] == first[2] for a in again)
            assert dict(again[0][1])["ETag"] == dict(first[1])["ETag"]
            if fast:  # answered by the protocol at once, as a FILE tile in the page cache is
                assert FastTileProtocol.answered - at_once == 3
            raw.close()
            metrics = Raw(address)
            text = metrics.exchange(request_bytes("GET", "/metrics", {"Authorization": f"Bearer {settings.admin_token}"}))
            metrics.close()
            assert text[0] == 200
            found = {(s.name, s.labels.get("result")): s.value
                     for f in text_string_to_metric_families(text[2].decode()) for s in f.samples}
            assert found[("tileserver_object_tile_cache_total", "hit")] >= 3
            assert found[("tileserver_object_tile_cache_total", "miss")] >= 1


def test_a_rewritten_slab_is_served_new_once_its_index_expires(tmp_path: Path, s3_server: MotoS3Server,
                                                               s3_proxy: S3Proxy) -> None:
    settings, bucket, _ = _published(tmp_path, s3_server, s3_proxy, index_cache_ttl=1.0)
    with serving(settings) as (address, _):
        lim = _limits(address)
        path = f"/wmts/1.0.0/S/normal/PM/10/{lim.min_row}/{lim.min_col}.png"
        raw = Raw(address)
        s3_proxy.clear()
        old = raw.exchange(request_bytes("GET", path, {}))[2]
        key = s3_proxy.requests[-1].key  # the tile's slab
        other = next(k for k in s3_server.list_keys(bucket, "SCAN1000/DATA_") if k != key)
        s3_server.put(bucket, key, s3_server.get(bucket, other) or b"")
        assert raw.exchange(request_bytes("GET", path, {}))[2] == old  # the index and the tile: still the old
        time.sleep(1.2)  # the index expires: it is read again, and the tile with it
        new = raw.exchange(request_bytes("GET", path, {}))[2]
        raw.close()
    with serving(replace(settings, object_tile_cache_bytes=0, fast_tiles=False)) as (fresh, _):
        raw = Raw(fresh)
        expected = raw.exchange(request_bytes("GET", path, {}))[2]
        raw.close()
    assert new == expected != old


async def test_file_tiles_are_not_kept_and_the_budget_is_split_over_workers(tmp_path: Path) -> None:
    from tileserver.settings import load_settings

    settings = replace(load_settings(env={}), data_dir=str(tmp_path / "d"), demo=False, workers=4,
                       object_tile_cache_bytes=8 << 20)
    async with app_client(settings) as client:
        runtime = client.app.state.runtime
        assert runtime.index_cache.tiles.budget == 2 << 20
        runtime.store.add_layer(parse_layer("F", layer_descriptor("SCAN1000")))
        await runtime.refresh()
        lim = runtime.catalog.layers["F"].limits["10"]
        for _ in range(2):
            answer = await client.get(f"/wmts/1.0.0/F/normal/PM/10/{lim.min_row}/{lim.min_col}.png")
            assert answer.status_code == 200
        assert len(runtime.index_cache.tiles) == 0  # FILE: the page cache holds them
