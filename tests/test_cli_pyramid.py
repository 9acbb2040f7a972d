"""`tileserver pyramid info|tile` as a user runs them: real processes, exit codes, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

from tileserver.rok4.slab import index_size, parse_index

DATA = Path(__file__).parent / "data" / "pyramids"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tileserver.cli", *args], capture_output=True, text=True, timeout=60)


def test_info_on_the_bundled_demo():
    out = run("pyramid", "info")
    assert out.returncode == 0, out.stderr
    assert "SCAN1000" in out.stdout and "TIFF_PNG_UINT8" in out.stdout and "PM" in out.stdout


def test_info_json_gives_extents_and_slab_count():
    out = run("pyramid", "info", str(DATA / "RGEALTI.json"), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["tile_matrix_set"] == "LAMB93_1M_MNT" and info["crs"] == "IGNF:LAMB93"
    assert info["slab_count"] == len((DATA / "RGEALTI.list").read_text().split("#\n")[1].split())
    west, south, east, north = info["wgs84_bbox"]
    assert -5 < west < east < 10 and 41 < south < north < 52  # metropolitan France
    assert len(info["levels"]) == 9


def test_tile_is_written_byte_for_byte(tmp_path):
    desc = json.loads((DATA / "SCAN1000.json").read_text())
    level = next(lv for lv in desc["levels"] if lv["id"] == "6")
    col, row = level["tile_limits"]["min_col"], level["tile_limits"]["min_row"]
    out_file = tmp_path / "tile.png"
    out = run("pyramid", "tile", f"file://{DATA / 'SCAN1000.json'}", "6", str(col), str(row), "-o", str(out_file))
    assert out.returncode == 0, out.stderr
    tpw, tph = level["tiles_per_width"], level["tiles_per_height"]
    from tileserver.rok4.naming import b36_path

    slab = (DATA / level["storage"]["image_directory"].replace("SCAN1000/", "SCAN1000/", 1)
            / b36_path(col // tpw, row // tph, 2))
    raw = slab.read_bytes()
    n = tpw * tph
    index = parse_index(raw[: index_size(n)], n)
    i = (row % tph) * tpw + col % tpw
    assert out_file.read_bytes() == raw[index.offsets[i] : index.offsets[i] + index.sizes[i]]


def test_user_mistakes_give_one_line_and_non_zero_exit(tmp_path):
    cases = [
        ("pyramid", "info", str(tmp_path / "missing.json")),
        ("pyramid", "tile", str(DATA / "SCAN1000.json"), "6", "0", "0", "-o", str(tmp_path / "x")),
        ("pyramid", "tile", str(DATA / "SCAN1000.json"), "42", "0", "0", "-o", str(tmp_path / "x")),
        ("pyramid", "info", str(DATA / "SCAN1000.list")),
    ]
    for args in cases:
        out = run(*args)
        assert out.returncode != 0
        assert "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "x").exists()
