"""The GetMap rows of issue 16, as request paths any WMS 1.3.0 server answers (tileserver, ROK4)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from urllib.parse import urlencode

from pyproj import Transformer


@dataclass(frozen=True)
class MapCase:
    key: str
    label: str
    layers: str
    styles: str
    crs: str
    size: int
    mime: str
    zoom_out: float = 1.0  # ground size of a map pixel / bottom level's cell (≥ 1: coarser)

    @property
    def format(self) -> str:
        return self.mime


CASES = [
    MapCase("png256", "256² PNG EPSG:3857 (4-band PNG pyramid)", "BENCH4", "", "EPSG:3857", 256, "image/png"),
    MapCase("png256-4326", "256² PNG EPSG:4326 on a PM pyramid", "BENCH4", "", "EPSG:4326", 256, "image/png"),
    MapCase("png1024", "1024² PNG EPSG:3857", "BENCH4", "", "EPSG:3857", 1024, "image/png", 1.7),
    MapCase("jpeg1024-style", "1024² JPEG, RGBA→RGB style (torgb)", "BENCH4", "torgb", "EPSG:3857", 1024,
            "image/jpeg", 1.7),
    MapCase("jpeg1024-3b", "1024² JPEG of a 3-band pyramid", "BENCH3", "", "EPSG:3857", 1024, "image/jpeg", 1.7),
    MapCase("jpeg2048-3b", "2048² JPEG of a 3-band pyramid", "BENCH3", "", "EPSG:3857", 2048, "image/jpeg", 3.4),
    MapCase("png1024-2154", "1024² PNG reprojected EPSG:2154", "BENCH4", "", "EPSG:2154", 1024, "image/png", 1.7),
    MapCase("png1024-4326", "1024² PNG reprojected EPSG:4326", "BENCH4", "", "EPSG:4326", 1024, "image/png", 1.7),
    MapCase("two-layers", "1024² PNG, two layers (BENCH3 + BENCH4)", "BENCH3,BENCH4", ",", "EPSG:3857", 1024,
            "image/png", 1.7),
    MapCase("dem-hypso", "1024² PNG FLOAT32 DEM, palette style (hypso)", "BENCHDEM", "hypso", "EPSG:3857", 1024,
            "image/png", 1.7),
    MapCase("dem-hillshade", "1024² PNG FLOAT32 DEM, hillshade style", "BENCHDEM", "estompage", "EPSG:3857", 1024,
            "image/png", 1.7),
]
BY_KEY = {c.key: c for c in CASES}
_R = 6378137.0


def _bbox(case: MapCase, x0: float, y0: float, span: float) -> str:
    if case.crs == "EPSG:3857":
        return f"{x0},{y0},{x0 + span},{y0 + span}"
    lon0, lat0 = math.degrees(x0 / _R), math.degrees(2 * math.atan(math.exp(y0 / _R)) - math.pi / 2)
    if case.crs == "EPSG:4326":
        deg = span / _R * 180 / math.pi  # same ground size along x
        return f"{lat0},{lon0},{lat0 + deg},{lon0 + deg}"  # WMS 1.3.0: lat/lon
    t = Transformer.from_crs("EPSG:4326", case.crs, always_xy=True)
    x, y = t.transform(lon0, lat0)
    ground = span * math.cos(math.radians(lat0))
    return f"{x},{y},{x + ground},{y + ground}"


def map_paths(case: MapCase, data, count: int, endpoint: str, seed: int) -> list[str]:
    """`count` random maps of `case` inside the data (data.bbox, data.cell: EPSG:3857)."""
    rng = random.Random(seed)
    x0, y0, x1, y1 = data.bbox
    span = case.size * data.cell * case.zoom_out
    out = []
    for _ in range(count):
        mx = rng.uniform(x0 + (x1 - x0) * 0.05, x1 - span - (x1 - x0) * 0.05)
        my = rng.uniform(y0 + (y1 - y0) * 0.05, y1 - span - (y1 - y0) * 0.05)
        params = {"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": case.layers,
                  "STYLES": case.styles, "CRS": case.crs, "BBOX": _bbox(case, mx, my, span), "WIDTH": case.size,
                  "HEIGHT": case.size, "FORMAT": case.mime}
        out.append(endpoint + "?" + urlencode(params))
    return out
