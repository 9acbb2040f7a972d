"""Measure (not a test): a bbox of ~1000 features in a 1,000,000-point GeoPackage, GeoPackageBase vs ogr2ogr -spat.

    PYTHONPATH=$PWD python tests/vector_bbox_bench.py [workdir]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyogrio.raw
import shapely

from tileserver.vector.base import Query
from tileserver.vector.geopackage import GeoPackageBase

N = 1_000_000


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    path = work / "million.gpkg"
    if not path.exists():
        rng = np.random.default_rng(0)
        pts = shapely.points(rng.uniform(0, 1e6, N), rng.uniform(0, 1e6, N))
        t = time.perf_counter()
        pyogrio.raw.write(path, shapely.to_wkb(pts), [np.arange(N)], ["v"], layer="pts", driver="GPKG",
                          geometry_type="Point", crs="EPSG:2154")
        print(f"built {N} points in {time.perf_counter() - t:.1f} s")
    side = 1e6 * (1000 / N) ** 0.5
    bbox = (400_000, 400_000, 400_000 + side, 400_000 + side)
    base = GeoPackageBase(path)
    for _ in range(3):
        t = time.perf_counter()
        n = sum(1 for _ in base.features(Query("pts", bbox=bbox)))
        print(f"GeoPackageBase bbox: {n} features in {1000 * (time.perf_counter() - t):.1f} ms")
    t = time.perf_counter()
    full = base.count(Query("pts"))
    print(f"count(*) of {full}: {1000 * (time.perf_counter() - t):.1f} ms")
    base.close()
    if shutil.which("ogr2ogr"):
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run(["ogr2ogr", "-f", "GeoJSON", "/vsistdout/", str(path), "pts", "-spat", *map(str, bbox)],
                           check=True, stdout=subprocess.DEVNULL)
            print(f"ogr2ogr -spat (GeoJSON to /dev/null, process start included): "
                  f"{1000 * (time.perf_counter() - t):.1f} ms")
    t = time.perf_counter()
    _, _, g, _ = pyogrio.raw.read(path, bbox=bbox)
    print(f"pyogrio.raw.read bbox: {len(g)} features in {1000 * (time.perf_counter() - t):.1f} ms")


if __name__ == "__main__":
    main()
