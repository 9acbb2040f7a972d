"""Vector bases for the WFS / OGC API Features tests: `make_gpkg` writes a GeoPackage with pyogrio
(GDAL), read by the server through `tileserver.vector.geopackage.GeoPackageBase`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import shapely


def make_gpkg(path: Path) -> Path:
    """`communes`: 37 polygons in EPSG:2154 (names, populations, areas, one null); `gares`: 12 points in
    EPSG:4326."""
    from pyogrio.raw import write

    n = 37
    polygons = [shapely.box(600000 + i * 1000, 6800000 + (i % 5) * 1000, 600800 + i * 1000, 6800800 + (i % 5) * 1000)
                for i in range(n)]
    write(
        path, np.array(shapely.to_wkb(polygons), dtype=object),
        [np.array([f"commune-{i:02d} <&>" if i == 3 else f"commune-{i:02d}" for i in range(n)], dtype=object),
         np.array([(i * 37) % 101 * 100 for i in range(n)], dtype=np.int64),
         np.array([0.64 + i / 8 for i in range(n)], dtype=np.float64)],
        ["nom", "population", "surface"],
        layer="communes", driver="GPKG", geometry_type="Polygon", crs="EPSG:2154",
    )
    points = [shapely.Point(2.0 + i * 0.1, 48.0 + i * 0.05) for i in range(12)]
    write(
        path, np.array(shapely.to_wkb(points), dtype=object),
        [np.array([f"gare {i}" for i in range(12)], dtype=object), np.array([i % 2 == 0 for i in range(12)])],
        ["nom", "ouverte"],
        layer="gares", driver="GPKG", geometry_type="Point", crs="EPSG:4326", append=True,
    )
    return path
