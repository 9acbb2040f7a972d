"""Integration speed of one delivered layer: GeoPackage base vs PostGIS (COPY), and COPY vs batched
INSERTs (executemany) for the PostGIS load. Needs PostgreSQL + PostGIS server binaries (a throwaway
cluster, as the tests start) or TILESERVER_TEST_PG_URL.

    PYTHONPATH=$PWD:tests python benchmarks/bench_vector_postgis.py [features]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
import pyogrio.raw
import shapely
from pgserver import PostgresServer

from tileserver.vector import pgintegrate, postgis
from tileserver.vector.base import Query
from tileserver.vector.delivery import check_delivery
from tileserver.vector.geopackage import GeoPackageBase
from tileserver.vector.integrate import integrate


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    rng = np.random.default_rng(1)
    server = PostgresServer().start()
    try:
        url = server.create_database()
        with psycopg.connect(url, autocommit=True) as con:
            con.execute("CREATE EXTENSION postgis")
        postgis.configure(url)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "src.gpkg"
            pts = shapely.points(rng.uniform(0, 1e6, n), rng.uniform(6e6, 7e6, n))
            pyogrio.raw.write(src, shapely.to_wkb(pts), [np.array([f"n{i}" for i in range(n)], dtype=object),
                                                         rng.integers(0, 1000, n), rng.uniform(0, 1, n)],
                              ["nom", "population", "surface"], layer="pts", driver="GPKG",
                              geometry_type="Point", crs="EPSG:2154")
            report = check_delivery([src], "EPSG:2154", Path(tmp) / "work")
            t = time.perf_counter()
            integrate(report, Path(tmp) / "base.gpkg")
            gpkg = time.perf_counter() - t
            t = time.perf_counter()
            descriptor = postgis.descriptor_url(url, postgis.new_schema())
            pgintegrate.integrate(report, descriptor)
            copy = time.perf_counter() - t
            # a bbox page read (~1000 features) from each base, median of 20
            side = 1e6 * (1000 / n) ** 0.5
            reads = {}
            for name, base in (("GeoPackage", GeoPackageBase(Path(tmp) / "base.gpkg")),
                               ("PostGIS", postgis.PostGISBase(descriptor))):
                times = []
                for k in range(20):
                    x0 = 1000.0 * k
                    t = time.perf_counter()
                    got = sum(1 for _ in base.features(Query("pts", bbox=(x0, 6e6, x0 + side, 6e6 + side))))
                    times.append(time.perf_counter() - t)
                reads[name] = (sorted(times)[10], got)
                base.close()
            # the same rows through executemany INSERTs (psycopg 3 pipelines them), load only
            wkb = shapely.to_wkb(shapely.set_srid(pts, 2154), hex=True, include_srid=True).tolist()
            with psycopg.connect(url) as con:
                con.execute("CREATE TABLE ins (fid bigint PRIMARY KEY, geom geometry(Point, 2154), nom text, "
                            "population bigint, surface double precision)")
                rows = list(zip(range(1, n + 1), wkb, [f"n{i}" for i in range(n)],
                                rng.integers(0, 1000, n).tolist(), rng.uniform(0, 1, n).tolist(), strict=True))
                t = time.perf_counter()
                with con.cursor() as cur:
                    cur.executemany("INSERT INTO ins VALUES (%s, %s, %s, %s, %s)", rows)
                insert = time.perf_counter() - t
                con.execute("CREATE TABLE cp (LIKE ins)")
                t = time.perf_counter()
                with con.cursor() as cur, cur.copy("COPY cp FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(row)
                copy_only = time.perf_counter() - t
        print(f"{n} points: GeoPackage integration {gpkg:.2f} s ({n / gpkg:,.0f}/s); PostGIS integration "
              f"{copy:.2f} s ({n / copy:,.0f}/s, read + COPY + GiST + ANALYZE)")
        print(f"load alone: COPY {copy_only:.2f} s ({n / copy_only:,.0f} rows/s), executemany INSERT "
              f"{insert:.2f} s ({n / insert:,.0f} rows/s)")
        for name, (median, got) in reads.items():
            print(f"bbox read of {got} features from the {name} base: {median * 1000:.1f} ms (median of 20)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
