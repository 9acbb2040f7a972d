"""Pyramids for the side-by-side GetMap benchmark with ROK4's own server (bench_wms.py --peer rok4).

Three ROK4 pyramids over the same Web Mercator area, written once into a directory both servers
read: BENCH3 (3-band JPEG, aerial-photo-like), BENCH4 (4-band PNG, scanned-map-like with
transparent holes, like SCAN1000) and BENCHDEM (FLOAT32 ZIP elevations, for the hillshade style),
and a styles directory with the fixtures' styles plus `torgb` (RGBA → RGB: ROK4 refuses JPEG on
4 bands, so styled JPEG maps of BENCH4 go through it).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_core import elevation_like, photo_like

from tileserver.rok4.codecs import encode_tile
from tileserver.rok4.descriptor import parse_descriptor
from tileserver.rok4.slab import build_slab

BOTTOM = 15
LEVELS = (12, 13, 14, 15)
SLAB = 16  # tiles per slab side
SIDE = 32  # tiles per side at the bottom level
CENTRE = (2.35, 46.0)
POOL = 24
TORGB = {"identifier": "torgb", "title": "RGBA to RGB", "abstract": "transparent black becomes white, alpha dropped",
         "colorize": {"source": [0, 0, 0], "destination": [255, 255, 255], "tolerance": 0}}


@dataclass(frozen=True)
class BenchData:
    root: Path  # descriptors and slabs
    styles: Path
    bbox: tuple[float, float, float, float]  # bottom-level extent, EPSG:3857
    cell: float


def _first_tile(level: int) -> tuple[int, int]:
    n = 2 ** level
    lon, lat = CENTRE
    col = int((lon + 180) / 360 * n)
    row = int((1 - math.log(math.tan(math.radians(lat)) + 1 / math.cos(math.radians(lat))) / math.pi) / 2 * n)
    return col // SLAB * SLAB, row // SLAB * SLAB


def map_like(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Scanned-map-ish RGBA: flat colour areas, lines, a transparent (0,0,0,0) corner now and then."""
    palette = rng.integers(0, 256, (12, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    field = (np.sin(xx / rng.uniform(8, 40) + rng.uniform(0, 6)) + np.cos(yy / rng.uniform(8, 40))) * 3 + 6
    rgb = palette[np.clip(field.astype(int), 0, 11)].astype(np.uint8)
    for _ in range(6):
        r = int(rng.integers(0, size))
        rgb[r:r + 2, :] = (30, 30, 30)
    out = np.concatenate([rgb, np.full((size, size, 1), 255, np.uint8)], axis=2)
    if rng.random() < 0.3:
        out[: size // 3, : size // 3] = 0
    return out


def _write(root: Path, name: str, fmt: str, channels: int, nodata: str, photometric: str, pool: list[bytes],
           rng: np.random.Generator, sample: str, compression: str, interpolation: str) -> None:
    bottom_col, bottom_row = _first_tile(BOTTOM)
    levels = []
    for z in LEVELS:
        shrink = 2 ** (BOTTOM - z)
        c0, r0 = bottom_col // shrink, bottom_row // shrink
        side = max(1, SIDE // shrink)
        levels.append({"id": str(z), "tiles_per_width": SLAB, "tiles_per_height": SLAB,
                       "tile_limits": {"min_col": c0, "max_col": c0 + side - 1, "min_row": r0, "max_row": r0 + side - 1},
                       "storage": {"type": "FILE", "image_directory": f"{name}/DATA/{z}", "path_depth": 2}})
    descriptor = {"format": fmt, "tile_matrix_set": "PM", "levels": levels,
                  "raster_specifications": {"channels": channels, "nodata": nodata, "photometric": photometric,
                                            "interpolation": interpolation}}
    parsed = parse_descriptor(descriptor)
    for z in LEVELS:
        level = parsed.level(str(z))
        lim = level.tile_limits
        for sc in range(lim.min_col // SLAB, lim.max_col // SLAB + 1):
            for sr in range(lim.min_row // SLAB, lim.max_row // SLAB + 1):
                tiles = [pool[int(i)] for i in rng.integers(0, len(pool), SLAB * SLAB)]
                path = root / level.storage.slab_name(sc, sr)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(build_slab(tiles, SLAB, SLAB, 256, 256, channels, sample, compression))
    (root / f"{name}.json").write_text(json.dumps(descriptor))


def build(workdir: Path, fixture_styles: Path, seed: int = 5) -> BenchData:
    rng = np.random.default_rng(seed)
    root = workdir / "pyramids"
    root.mkdir(parents=True, exist_ok=True)
    _write(root, "BENCH3", "TIFF_JPG_UINT8", 3, "255,255,255", "rgb",
           [encode_tile(photo_like(rng), "jpg") for _ in range(POOL)], rng, "UINT8", "jpg", "bicubic")
    _write(root, "BENCH4", "TIFF_PNG_UINT8", 4, "0,0,0,0", "rgb",
           [encode_tile(map_like(rng), "png") for _ in range(POOL)], rng, "UINT8", "png", "bicubic")
    _write(root, "BENCHDEM", "TIFF_ZIP_FLOAT32", 1, "-99999", "gray",
           [encode_tile(elevation_like(rng), "zip") for _ in range(POOL)], rng, "FLOAT32", "zip", "linear")
    styles = workdir / "styles"
    if styles.exists():
        shutil.rmtree(styles)
    shutil.copytree(fixture_styles, styles)
    (styles / "torgb.json").write_text(json.dumps(TORGB))
    from tileserver.rok4.tms import load_tms
    from tileserver.settings import load_settings

    lim = parsed_limits(root / "BENCH3.json")
    matrix = load_tms("PM", load_settings(env={}).tms_directory).get(str(BOTTOM))
    return BenchData(root, styles, matrix.range_bbox(*lim), matrix.cell_size)


def load_or_build(workdir: Path, fixture_styles: Path) -> BenchData:
    """The pyramids of an earlier run in `workdir` when there, else built."""
    if not (workdir / "pyramids" / "BENCHDEM.json").exists() or not (workdir / "styles" / "torgb.json").exists():
        return build(workdir, fixture_styles)
    from tileserver.rok4.tms import load_tms
    from tileserver.settings import load_settings

    lim = parsed_limits(workdir / "pyramids" / "BENCH3.json")
    matrix = load_tms("PM", load_settings(env={}).tms_directory).get(str(BOTTOM))
    return BenchData(workdir / "pyramids", workdir / "styles", matrix.range_bbox(*lim), matrix.cell_size)


def parsed_limits(path: Path) -> tuple[int, int, int, int]:
    lim = parse_descriptor(json.loads(path.read_text())).level(str(BOTTOM)).tile_limits
    return lim.min_col, lim.min_row, lim.max_col, lim.max_row
