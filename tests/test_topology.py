"""The compose topology (deploy/compose.yaml) without containers: one PostgreSQL database holding
the store and the PostGIS vector bases, a moto S3 server with an uploads and a pyramids bucket, two
servers running no jobs and two `tileserver worker` processes, each process with its own data and
temporary directory as on separate machines, all on loopback. Nothing is shared but the database
and the buckets: a journey through one server is read back through the other."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from s3server import KEY, SECRET, MotoS3Server
from test_warehouse_live import _ended, _processing, _run, _upload
from test_warehouse_support import BASE, SOURCES, api_client, scan_files, wait_for
from test_warehouse_vector import check_logs, endpoint_id, integration, wfs_configuration
from test_workers import SLOW, Topology, _kill, _running_on, topology
from vectorutil import make_gpkg

from tileserver.rok4.naming import parse_slab_name
from tileserver.rok4.slab import parse_index, read_header
from tileserver.settings import S3Cluster, Settings
from tileserver.warehouse.endpoints import WMTS_TMS
from tileserver.warehouse.processings import RASTER_TO_PYRAMID
from tileserver.writer.build import build_pyramid
from tileserver.writer.options import BuildOptions


@pytest.fixture
def compose_db(pg_url: str) -> str:
    """A fresh database with PostGIS: the store and the vector bases, as compose's `db`."""
    import psycopg

    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    except psycopg.Error as e:
        pytest.skip(f"PostGIS is not installed: {e}")
    return pg_url


@dataclass
class Buckets:
    s3: MotoS3Server
    uploads: str
    pyramids: str


@contextlib.contextmanager
def compose(tmp_path: Path, db: str, s3: MotoS3Server, **worker_env: str) -> Iterator[tuple[Topology, Buckets]]:
    buckets = Buckets(s3, s3.create_bucket(), s3.create_bucket())
    env = {"TILESERVER_VECTOR_DB_URL": db, "TILESERVER_WAREHOUSE_UPLOADS": f"s3://{buckets.uploads}",
           "TILESERVER_WAREHOUSE_PYRAMIDS": f"s3://{buckets.pyramids}",
           "ROK4_S3_URL": s3.url, "ROK4_S3_KEY": KEY, "ROK4_S3_SECRETKEY": SECRET}
    with topology(tmp_path, db, env=env, own_dirs=True, **worker_env) as top:
        yield top, buckets


def _local_files(top: Topology, node: str, scratch: bool = False) -> list[Path]:
    """Files a process left in its data directory (outside its temporary directory, or inside)."""
    home = top.dirs[node]
    return [p for p in home.rglob("*") if p.is_file() and p.is_relative_to(home / "tmp") == scratch]


def _journaled(buckets: Buckets) -> bool:
    """Whether the pyramid's journal on S3 records slabs already written."""
    journals = [k for k in buckets.s3.list_keys(buckets.pyramids) if ".list.partial" in k]
    return any(b"\nD " in (buckets.s3.get(buckets.pyramids, k) or b"") for k in journals)


def test_raster_journey_on_s3_and_a_worker_killed_mid_job(tmp_path: Path, compose_db: str,
                                                          s3_server: MotoS3Server) -> None:
    """Upload (to S3) and execution through server A; the worker running it is killed with its job
    process once slabs are journaled on S3, and the other node takes the job over and resumes it
    (the copy of the upload it downloads is named by its S3 object, so the journal is its own);
    the tile served by server B is the bytes the slab on S3 holds."""
    with compose(tmp_path, compose_db, s3_server) as (top, buckets):
        a, b = api_client(top.servers[0]), api_client(top.servers[1])
        upload = _upload(a)
        assert {k.split("/", 1)[1] for k in s3_server.list_keys(buckets.uploads)} == {f"data/{r}" for r in scan_files()}
        execution = _run(a, {"processing": _processing(a, RASTER_TO_PYRAMID), "inputs": {"upload": [upload]},
                             "output": {"stored_data": {"name": "scan"}}, "parameters": {**SLOW, "top": "6"}})
        first = _running_on(top, execution["_id"])
        wait_for(lambda: _journaled(buckets), timeout=60)
        dead_node = first["worker"]["host"]
        _kill(top.workers[dead_node].pid)
        _kill(first["worker"]["pid"])
        ended = _ended(b, execution["_id"], timeout=300)
        logs = b.get(f"{BASE}/processings/executions/{execution['_id']}/logs").json()
        assert ended["status"] == "SUCCESS", logs
        job = top.job("processing_execution", execution["_id"])["job"]
        assert job["attempt"] == 2 and job["worker"]["host"] != dead_node and job["lost"] == first["worker"]
        assert sum("back in the queue after attempt 1 of 3" in line for line in logs) == 1
        assert sum("pyramid written" in line for line in logs) == 1
        assert any("already done" in line for line in logs), logs  # resumed from the dead node's journal
        stored = execution["output"]["stored_data"]["_id"]
        assert b.get(f"{BASE}/stored_data/{stored}").json()["status"] == "GENERATED"

        keys = s3_server.list_keys(buckets.pyramids)
        assert any("/DATA_12_" in k for k in keys)
        assert not any(".list.partial" in k for k in keys)
        survivor = next(n for n in top.workers if n != dead_node)
        for name in top.dirs:  # pyramids and uploads live on S3 only: nothing local but scratch
            assert _local_files(top, name) == [], name
        assert _local_files(top, survivor, scratch=True) == []  # its copy of the upload removed
        assert "scan1000.tif" in {p.name for p in _local_files(top, dead_node, scratch=True)}  # killed amid it

        configuration = a.post(f"{BASE}/configurations", json={
            "type": "WMTS-TMS", "name": "scan", "layer_name": "scan",
            "type_infos": {"title": "t", "abstract": "a",
                           "used_data": [{"stored_data": stored, "bottom_level": "12", "top_level": "6"}]}}).json()
        offering = a.post(f"{BASE}/configurations/{configuration['_id']}/offerings",
                          json={"endpoint": endpoint_id(a, WMTS_TMS), "open": True}).json()
        assert offering["status"] == "PUBLISHED"
        wait_for(lambda: "scan" in httpx.get(f"{top.servers[1]}/tms/1.0.0").text, timeout=30)
        [descriptor] = [k for k in keys if k.endswith(".json") and "/" not in k]
        col, row, expected = _stored_tile(buckets, descriptor, "12")
        answer = httpx.get(f"{top.servers[1]}/tms/1.0.0/scan/12/{col}/{row}.jpeg")
        assert answer.status_code == 200 and answer.content == expected
        assert top.workers[survivor].poll() is None


def _stored_tile(buckets: Buckets, descriptor_key: str, level: str) -> tuple[int, int, bytes]:
    """Column, row and bytes (read from its slab on S3) of the first tile of `level` in the
    descriptor's limits."""
    descriptor = json.loads(buckets.s3.get(buckets.pyramids, descriptor_key) or b"{}")
    found = next(lv for lv in descriptor["levels"] if lv["id"] == level)
    col, row = found["tile_limits"]["min_col"], found["tile_limits"]["min_row"]
    width, height = found["tiles_per_width"], found["tiles_per_height"]
    key = f"{descriptor_key.removesuffix('.json')}/DATA_{level}_{col // width}_{row // height}"
    slab = buckets.s3.get(buckets.pyramids, key)
    assert slab is not None, key
    header = read_header(slab, key)
    assert (header.tiles_per_width, header.tiles_per_height) == (width, height)
    index = parse_index(slab, header.n_tiles, key)
    i = (row % height) * width + col % width
    assert index.sizes[i] > 0
    return col, row, slab[index.offsets[i]:index.offsets[i] + index.sizes[i]]


def test_vector_journey_into_postgis(tmp_path: Path, compose_db: str, s3_server: MotoS3Server) -> None:
    """A GeoPackage uploaded to S3 through server A, integrated by a worker into a PostGIS schema
    of the shared database, configured and offered as WFS through A: server B serves its features."""
    import pyogrio.raw

    meta, _, geometry, fields = pyogrio.raw.read(make_gpkg(tmp_path / "both.gpkg"), layer="communes")
    gpkg = tmp_path / "communes.gpkg"  # one layer: the upload declares one SRS (`gares` is in EPSG:4326)
    pyogrio.raw.write(gpkg, geometry, fields, meta["fields"], layer="communes", driver="GPKG",
                      geometry_type="Polygon", crs=meta["crs"])
    count = len(geometry)
    with compose(tmp_path, compose_db, s3_server) as (top, buckets):
        a = api_client(top.servers[0])
        upload = a.post(f"{BASE}/uploads", json={"name": "communes", "description": "d", "type": "VECTOR",
                                                 "srs": "EPSG:2154"}).json()
        a.post(f"{BASE}/uploads/{upload['_id']}/data", params={"path": "communes.gpkg"},
               files={"file": ("communes.gpkg", gpkg.read_bytes())}).raise_for_status()
        a.post(f"{BASE}/uploads/{upload['_id']}/close").raise_for_status()
        closed = wait_for(lambda: (u := a.get(f"{BASE}/uploads/{upload['_id']}").json())["status"]
                          in ("CLOSED", "UNSTABLE") and u)
        assert closed["status"] == "CLOSED", check_logs(a, upload["_id"])
        assert s3_server.list_keys(buckets.uploads) == [f"{upload['_id']}/data/communes.gpkg"]
        execution = _run(a, {"processing": integration(a), "inputs": {"upload": [upload["_id"]]},
                             "output": {"stored_data": {"name": "base", "storage_tags": ["VECTEUR"]}},
                             "parameters": {}})
        ended = _ended(a, execution["_id"], timeout=120)
        assert ended["status"] == "SUCCESS", a.get(f"{BASE}/processings/executions/{execution['_id']}/logs").text
        stored = execution["output"]["stored_data"]["_id"]
        summary = a.get(f"{BASE}/stored_data/{stored}").json()
        assert summary["type"] == "VECTOR-DB" and summary["status"] == "GENERATED"
        assert "communes" in {r["name"] for r in summary["type_infos"]["relations"]}
        assert _in_postgis(top, stored)
        configuration = a.post(f"{BASE}/configurations", json=wfs_configuration(
            stored, "topo", native="communes", public="communes"))
        assert configuration.status_code == 201, configuration.text
        offering = a.post(f"{BASE}/configurations/{configuration.json()['_id']}/offerings",
                          json={"endpoint": endpoint_id(a, "gpf-geoserver-wfs"), "open": True})
        assert offering.status_code == 201 and offering.json()["status"] == "PUBLISHED", offering.text
        query = {"SERVICE": "WFS", "VERSION": "2.0.0", "REQUEST": "GetFeature", "TYPENAMES": "topo:communes",
                 "OUTPUTFORMAT": "application/json"}
        served = wait_for(lambda: (r := httpx.get(f"{top.servers[1]}/wfs", params=query)).status_code == 200 and r,
                          timeout=30)
        features = served.json()["features"]
        assert len(features) == count == 37
        assert sorted(f["properties"]["nom"] for f in features)[:2] == ["commune-00", "commune-01"]
        for name in top.dirs:
            assert _local_files(top, name) == [], name


def _in_postgis(top: Topology, stored_id: str) -> bool:
    from tileserver.publication.store import PublicationStore

    store = PublicationStore(top.store_url)
    try:
        found = store.get_stored_data(stored_id)
        return found is not None and found.descriptor_url.startswith("postgresql://")
    finally:
        store.close()


def test_a_build_in_shards_across_nodes_on_s3(tmp_path: Path, compose_db: str, s3_server: MotoS3Server) -> None:
    """An image pyramid built in two shards by the two workers, from an S3 upload onto S3: each
    shard downloads its own copy of the upload, yet they write one pyramid (one fingerprint),
    slab for slab the one a single writer run makes of the same image."""
    parameters = {"tms": "PM", "bottom": "11", "top": "8", "compression": "jpg", "width": 1, "height": 1}
    with compose(tmp_path, compose_db, s3_server, TILESERVER_WORKER_SHARDS="2") as (top, buckets):
        client = api_client(top.servers[0])
        upload = _upload(client)
        execution = _run(client, {"processing": _processing(client, RASTER_TO_PYRAMID),
                                  "inputs": {"upload": [upload]}, "output": {"stored_data": {"name": "sharded"}},
                                  "parameters": parameters})
        ended = _ended(api_client(top.servers[1]), execution["_id"], timeout=300)
        logs = client.get(f"{BASE}/processings/executions/{execution['_id']}/logs").json()
        assert ended["status"] == "SUCCESS", logs
        assert sum("shard 0/2 written" in line for line in logs) == 1
        assert sum("shard 1/2 written by node" in line for line in logs) == 1
        shard = top.job("pyramid_shard", f"{execution['_id']}.shard-1")
        executor = top.job("processing_execution", execution["_id"])["job"]["worker"]
        assert shard["status"] == "SUCCESS" and shard["job"]["worker"]["host"] != executor["host"]
        for name in top.dirs:
            assert _local_files(top, name) == [], name

    settings = Settings(s3_clusters=(S3Cluster(s3_server.url, KEY, SECRET),))
    reference = s3_server.create_bucket()
    build_pyramid([str(SOURCES / "SCAN1000.tif")], f"s3://{reference}", "P", BuildOptions(
        tms="PM", bottom="11", top="8", compression="jpg", width=1, height=1, srs="EPSG:2154",
        interpolation="bicubic"),
        settings=settings)
    one = {parse_slab_name(k): k for k in s3_server.list_keys(reference) if k.startswith("P/") and not k.endswith(".json")}
    keys = s3_server.list_keys(buckets.pyramids)
    [descriptor] = [k for k in keys if k.endswith(".json") and "/" not in k]
    name = descriptor.removesuffix(".json")
    many = {parse_slab_name(k): k for k in keys if k.startswith(f"{name}/") and not k.endswith(".json")}
    assert one and set(many) == set(one)
    assert {k.level for k in many} == {"8", "9", "10", "11"} and sum(k.level == "11" for k in many) == 6
    for slab, key in one.items():
        assert s3_server.get(buckets.pyramids, many[slab]) == s3_server.get(reference, key), slab
    assert not any(".list.partial" in k for k in keys)
    levels = json.loads(s3_server.get(buckets.pyramids, descriptor) or b"{}")["levels"]
    reference_levels = json.loads(s3_server.get(reference, "P.json") or b"{}")["levels"]
    assert [lv["tile_limits"] for lv in levels] == [lv["tile_limits"] for lv in reference_levels]
