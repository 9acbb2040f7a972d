"""The `pyramid build` command: success output, and every bad input ending as one clear line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from s3server import KEY, SECRET
from test_writer_util import SOURCES

from tileserver.cli import main

SCAN = str(SOURCES / "SCAN1000.tif")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if not line[:4].isdigit()]  # progress log lines aside
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("tileserver: "), err
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


def no_pyramid(root: Path, name: str = "P") -> bool:
    return not (root / f"{name}.json").exists()


def test_build_prints_summary_json(tmp_path, capsys):
    code, out, _ = run(capsys, "pyramid", "build", SCAN, "--srs", "EPSG:2154", "--output", str(tmp_path),
                       "--name", "P", "--tms", "PM", "--bottom", "11", "--top", "10", "--compression", "jpg",
                       "--width", "2", "--height", "2", "--json", "--quiet")
    assert code == 0
    summary = json.loads(out)
    assert summary["srs"] == "EPSG:3857"
    assert summary["extent"]["type"] == "Polygon"
    ring = summary["extent"]["coordinates"][0]
    assert ring[0] == ring[-1] and all(1 < lon < 3 and 45 < lat < 47 for lon, lat in ring)  # lon, lat
    assert summary["type_infos"] == {"tms": "PM", "levels": ["10", "11"], "channels_format": "UINT8",
                                     "channels_number": 3, "compression": "JPG", "nodata_value": "255,255,255"}
    listed = sum(p.stat().st_size for p in (tmp_path / "P" / "DATA").rglob("*.tif"))
    assert summary["size"] == listed + (tmp_path / "P.json").stat().st_size + (tmp_path / "P.list").stat().st_size
    assert json.loads((tmp_path / "P" / "summary.json").read_text()) == summary


def test_build_prints_readable_summary(tmp_path, capsys):
    code, out, _ = run(capsys, "pyramid", "build", SCAN, "--srs", "EPSG:2154", "--output", f"file://{tmp_path}",
                       "--name", "P", "--tms", "LAMB93", "--bottom", "10", "--top", "10", "--quiet")
    assert code == 0
    assert "IGNF:LAMB93" in out or "EPSG:2154" in out
    assert "levels       10" in out and (tmp_path / "P.json").exists()


@pytest.mark.parametrize(("setup", "argv", "words"), [
    ("garbage", [], ["unreadable"]),
    ("plain", [], ["no georeferencing"]),
    (None, ["--srs", "EPSG:999999"], ["unknown coordinate reference system"]),
    (None, [], ["--srs"]),  # SCAN1000.tif has no GeoKeys: the CRS must be given
    (None, ["--srs", "EPSG:2154", "--tms", "NOPE"], ["unknown tile matrix set"]),
    (None, ["--srs", "EPSG:2154", "--bottom", "5", "--top", "10"], ["above"]),
    (None, ["--srs", "EPSG:2154", "--bottom", "99"], ["no such level"]),
    ("far", ["--srs", "EPSG:2154", "--tms", "LAMB93"], ["outside the grid"]),
    (None, ["--srs", "EPSG:2154", "--compression", "jpg", "--samplesperpixel", "4"], ["3 channels"]),
    (None, ["--srs", "EPSG:2154", "--compression", "gif"], ["--compression"]),
    ("missing", [], ["no such image"]),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, setup, argv, words):
    source = SCAN
    if setup == "garbage":
        source = str(tmp_path / "bad.tif")
        Path(source).write_bytes(b"this is not a tiff at all" * 10)
    elif setup == "plain":
        source = str(tmp_path / "plain.tif")
        tifffile.imwrite(source, np.zeros((10, 10), np.uint8))
    elif setup == "far":
        source = str(tmp_path / "far.tif")
        tifffile.imwrite(source, np.zeros((10, 10), np.uint8))
        (tmp_path / "far.tfw").write_text("1\n0\n0\n-1\n-50000000\n90000000\n")
    elif setup == "missing":
        source = str(tmp_path / "nothing.tif")
    out = tmp_path / "out"
    code, _, err = run(capsys, "pyramid", "build", source, "--output", str(out), "--name", "P", "--top", "10", *argv)
    assert_one_line_error(code, err, *words)
    assert no_pyramid(out)


def test_output_not_writable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    code, _, err = run(capsys, "pyramid", "build", SCAN, "--srs", "EPSG:2154", "--output", str(blocker / "sub"),
                       "--name", "P", "--bottom", "10", "--top", "10")
    assert_one_line_error(code, err, "cannot write")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_directory_without_permission(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run(capsys, "pyramid", "build", SCAN, "--srs", "EPSG:2154", "--output", str(locked),
                       "--name", "P", "--bottom", "10", "--top", "10")
    assert_one_line_error(code, err, "permission")
    assert no_pyramid(locked)


def test_s3_bucket_missing(tmp_path, capsys, monkeypatch, s3_server):
    monkeypatch.setenv("ROK4_S3_URL", s3_server.url)
    monkeypatch.setenv("ROK4_S3_KEY", KEY)
    monkeypatch.setenv("ROK4_S3_SECRETKEY", SECRET)
    monkeypatch.setenv("TILESERVER_STORAGE_RETRIES", "0")
    code, _, err = run(capsys, "pyramid", "build", SCAN, "--srs", "EPSG:2154", "--output", "s3://no-such-bucket-here",
                       "--name", "P", "--bottom", "10", "--top", "10")
    assert_one_line_error(code, err, "no-such-bucket-here")


def test_s3_without_cluster(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ROK4_S3_URL", raising=False)
    code, _, err = run(capsys, "pyramid", "build", SCAN, "--srs", "EPSG:2154", "--output", "s3://bucket",
                       "--name", "P", "--bottom", "10", "--top", "10")
    assert_one_line_error(code, err, "S3")


def test_bad_shard_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pyramid", "build", SCAN, "--output", str(tmp_path), "--name", "P", "--shard", "2/2"])
    assert exit_info.value.code == 2
    assert "K/N" in capsys.readouterr().err


def test_commands_are_under_the_pyramid_group(capsys):
    with pytest.raises(SystemExit):
        main(["pyramid", "--help"])
    help_text = capsys.readouterr().out
    for command in ("info", "tile", "build", "harvest", "update"):
        assert command in help_text


def test_progress_bar_on_a_terminal_and_log_lines_otherwise(caplog):
    import io
    import logging

    from tileserver.writer.progress import Progress

    screen = io.StringIO()
    bar = Progress(stream=screen, tty=True)
    bar.start("level 12", 10, skipped=2)
    for _ in range(8):
        bar.advance()
    bar.end()
    text = screen.getvalue()
    assert "\r" in text and "level 12 [" in text and "10/10 slabs" in text and "ETA" in text
    with caplog.at_level(logging.INFO, logger="tileserver.writer"):
        quiet = Progress(stream=io.StringIO(), tty=False, interval=3600)
        quiet.start("level 12", 100)
        for _ in range(100):
            quiet.advance()
        quiet.end()
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["level 12", "level 12"]  # start and end only
