"""Source images are read in bounded memory whatever they declare (issue 11): the raster check of
an upload refuses an image larger than `source_max_pixels` by name, checks a large one in windows,
and the writer's windowed reads (decimated or not, every TIFF layout) return exactly the pixels."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_warehouse_support import BASE, SOURCES, app_with_user, closed_upload, scan_files

from tileserver.writer import sources

GEOKEYS = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 2154)


def georef(x0: float = 600000.0, y0: float = 6580000.0, res: float = 1.0) -> list[tuple]:
    return [(33550, "d", 3, (res, res, 0.0), True), (33922, "d", 6, (0.0, 0.0, 0.0, x0, y0, 0.0), True),
            (34735, "H", len(GEOKEYS), GEOKEYS, True)]


def sparse_tiff(path: Path, width: int, height: int, tile: int = 256) -> Path:
    """A tiled, compressed RGB GeoTIFF declaring width x height pixels with no tile stored: kilobytes on disk."""
    count = -(-width // tile) * -(-height // tile)
    tifffile.imwrite(path, (b"" for _ in range(count)), shape=(height, width, 3), dtype="uint8", tile=(tile, tile),
                     photometric="rgb", compression="zlib", extratags=georef())
    return path


def hollow_strip_tiff(path: Path, width: int, height: int) -> Path:
    """An uncompressed RGB GeoTIFF in one strip of width x height pixels, its data a hole in the file."""
    tifffile.imwrite(path, shape=(height, width, 3), dtype="uint8", photometric="rgb", extratags=georef())
    return path


CHECK = textwrap.dedent("""
    import json, resource, sys
    from dataclasses import replace
    from pathlib import Path
    from tileserver.settings import Settings
    from tileserver.warehouse.checks import RASTER, run_check
    from tileserver.warehouse.upload_files import UploadFiles

    root, max_pixels = Path(sys.argv[1]), int(sys.argv[2])
    lines = []
    ok, found = run_check(RASTER, UploadFiles(root), "EPSG:2154", lines.append,
                          replace(Settings(), source_max_pixels=max_pixels))
    print(json.dumps({"ok": ok, "log": lines, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def run_check_process(tmp_path: Path, files: dict[str, Path], max_pixels: int = sources.SOURCE_MAX_PIXELS) -> dict:
    """The raster check of an upload holding `files`, in its own process: its result and peak RSS."""
    root = tmp_path / f"upload{len(list(tmp_path.glob('upload*')))}"
    for rel, local in files.items():
        target = root / "data" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(local)
    answer = subprocess.run([sys.executable, "-c", CHECK, str(root), str(max_pixels)], capture_output=True,
                            text=True, timeout=600)
    assert answer.returncode == 0, answer.stderr[-3000:]
    return json.loads(answer.stdout.strip().splitlines()[-1])


def test_an_image_declaring_too_many_pixels_fails_the_check_by_name_in_bounded_memory(tmp_path):
    giant = sparse_tiff(tmp_path / "giant.tif", 20000, 20000)  # 400 Mpx, 1.2 GB decoded
    assert giant.stat().st_size < 200_000
    baseline = run_check_process(tmp_path, scan_files())
    assert baseline["ok"], baseline["log"]
    result = run_check_process(tmp_path, {**scan_files(), "ain/giant.tif": giant})
    assert not result["ok"]
    refusal = [line for line in result["log"] if line.startswith("ain/giant.tif: ")]
    assert refusal == [f"ain/giant.tif: too large: 20000x20000 pixels, more than the {sources.SOURCE_MAX_PIXELS} "
                       f"a source image may have (setting source_max_pixels); cut it into smaller images"]
    assert any(line.startswith("ain/scan1000.tif: ") and "extent" in line for line in result["log"])
    growth = (result["maxrss_kib"] - baseline["maxrss_kib"]) * 1024
    assert growth < 64 << 20, f"the refused image cost {growth >> 20} MiB"


@pytest.mark.parametrize("make", [sparse_tiff, hollow_strip_tiff], ids=["sparse-tiled", "one-uncompressed-strip"])
def test_a_large_image_within_the_maximum_checks_in_bounded_memory(tmp_path, make):
    large = make(tmp_path / "large.tif", 12000, 12000)  # 144 Mpx: 432 MB if decoded whole
    baseline = run_check_process(tmp_path, scan_files())
    result = run_check_process(tmp_path, {**scan_files(), "ain/large.tif": large})
    assert result["ok"], result["log"]
    assert any(line.startswith("ain/large.tif: 12000x12000 px, 3 x UINT8, EPSG:2154") for line in result["log"])
    growth = (result["maxrss_kib"] - baseline["maxrss_kib"]) * 1024
    assert growth < 150 << 20, f"checking a 432 MB image cost {growth >> 20} MiB"


def test_the_maximum_is_a_setting(tmp_path):
    result = run_check_process(tmp_path, scan_files(), max_pixels=1000)
    assert not result["ok"]
    assert any(line.startswith("ain/scan1000.tif: too large: ") and "more than the 1000" in line
               for line in result["log"]), result["log"]


async def test_the_upload_check_names_the_refused_image(tmp_path):
    giant = sparse_tiff(tmp_path / "giant.tif", 20000, 20000)
    async with app_with_user(tmp_path) as client:
        upload = await closed_upload(client, {**scan_files(), "ain/giant.tif": giant}, wait_for="UNSTABLE")
        checks = (await client.get(f"{BASE}/uploads/{upload['_id']}/checks")).json()
        failed = {c["check"]["name"]: c for c in checks["failed"]}
        logs = (await client.get(f"{BASE}/checks/executions/{failed['Vérification raster']['_id']}/logs")).json()
        assert any(" ain/giant.tif: too large: 20000x20000 pixels" in line for line in logs), logs


# --------------------------------------------------------------------------- windowed reads


LAYOUTS = {
    "one-strip": {},
    "strips": {"rowsperstrip": 7},
    "zip-strips": {"compression": "zlib", "rowsperstrip": 16},
    "tiled": {"tile": (32, 48)},
    "zip-tiled": {"tile": (32, 32), "compression": "zlib"},
    "planar": {"planarconfig": "separate", "rowsperstrip": 10},
    "big-endian": {"byteorder": ">", "rowsperstrip": 50},
}
WINDOWS = [(0, 0, 257, 301, 1), (5, 3, 200, 290, 3), (100, 17, 101, 300, 7), (0, 0, 257, 301, 16),
           (13, 250, 256, 301, 2)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_windowed_and_decimated_reads_are_exact(tmp_path, layout):
    image = np.random.default_rng(0).integers(0, 255, (301, 257, 3), dtype=np.uint8)
    path = tmp_path / f"{layout}.tif"
    data = np.moveaxis(image, 2, 0) if layout == "planar" else image
    tifffile.imwrite(path, data, photometric="rgb", extratags=georef(), **LAYOUTS[layout])
    info = sources.open_source(path)
    try:
        for col0, row0, col1, row1, step in WINDOWS:
            got = info.read(col0, row0, col1, row1, step)
            assert np.array_equal(got, image[row0:row1:step, col0:col1:step]), (col0, row0, col1, row1, step)
    finally:
        sources.close_readers()


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_a_large_uncompressed_strip_is_read_by_rows_exactly(tmp_path, byteorder):
    image = np.random.default_rng(1).integers(0, 255, (2600, 2500, 3), dtype=np.uint8)  # one 19.5 MB strip
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, image, photometric="rgb", extratags=georef(), byteorder=byteorder)
    info = sources.open_source(path)
    try:
        for col0, row0, col1, row1, step in [(0, 0, 2500, 2600, 1), (7, 3, 2411, 2590, 3), (0, 0, 2500, 2600, 17),
                                             (1000, 2000, 1001, 2600, 1)]:
            got = info.read(col0, row0, col1, row1, step)
            assert np.array_equal(got, image[row0:row1:step, col0:col1:step]), (col0, row0, col1, row1, step)
    finally:
        sources.close_readers()


def test_open_source_refuses_what_exceeds_the_maximum(tmp_path):
    giant = sparse_tiff(tmp_path / "giant.tif", 20000, 20000)
    with pytest.raises(sources.SourceTooLarge, match="20000x20000 pixels"):
        sources.open_source(giant)
    assert sources.open_source(giant, max_pixels=None).width == 20000
    with pytest.raises(sources.SourceTooLarge):
        sources.open_source(SOURCES / "SCAN1000.tif", max_pixels=100)
