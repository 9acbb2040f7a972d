"""Source images: georeferencing from GeoTIFF keys, world files and .prj; windowed reads."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_writer_util import SOURCES

from tileserver.writer import sources
from tileserver.writer.errors import WriterError
from tileserver.writer.sources import open_source

GEOKEYS_2154 = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 2154)


def geotiff(path, pixels, x0=650000.0, y0=6860000.0, res=2.0, keys=GEOKEYS_2154, **kw) -> None:
    tifffile.imwrite(path, pixels, extratags=[(33550, "d", 3, (res, res, 0.0)), (33922, "d", 6, (0, 0, 0, x0, y0, 0)),
                                              (34735, "H", len(keys), keys)], **kw)


def test_crs_and_corner_from_geokeys(tmp_path):
    geotiff(tmp_path / "a.tif", np.zeros((10, 20, 3), np.uint8))
    info = open_source(tmp_path / "a.tif")
    assert (info.crs, info.x0, info.y0, info.res_x, info.width, info.height) == ("EPSG:2154", 650000, 6860000, 2, 20, 10)
    assert open_source(tmp_path / "a.tif", srs="IGNF:LAMB93").crs == "IGNF:LAMB93"  # --srs wins


def test_pixel_is_point_moves_the_corner_half_a_pixel(tmp_path):
    keys = (1, 1, 0, 2, 1025, 0, 1, 2, 3072, 0, 1, 2154)
    geotiff(tmp_path / "p.tif", np.zeros((4, 4), np.float32), keys=keys)
    info = open_source(tmp_path / "p.tif")
    assert (info.x0, info.y0) == (649999.0, 6860001.0)
    assert info.sample_format == "FLOAT32"


def test_geographic_crs_and_prj_file(tmp_path):
    geotiff(tmp_path / "g.tif", np.zeros((4, 4), np.uint8), x0=2.0, y0=47.0, res=0.001, keys=(1, 1, 0, 1, 2048, 0, 1, 4326))
    assert open_source(tmp_path / "g.tif").crs == "EPSG:4326"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "j.jpg")
    (tmp_path / "j.jgw").write_text("0.5\n0\n0\n-0.5\n100.25\n199.75\n")
    (tmp_path / "j.prj").write_text('PROJCS["RGF93 v1 / Lambert-93",GEOGCS["RGF93 v1",DATUM["Reseau_Geodesique_Francais_1993_v1",'
                                    'SPHEROID["GRS 1980",6378137,298.257222101]],PRIMEM["Greenwich",0],UNIT["degree",'
                                    '0.0174532925199433]],PROJECTION["Lambert_Conformal_Conic_2SP"],PARAMETER["latitude_of_origin",46.5],'
                                    'PARAMETER["central_meridian",3],PARAMETER["standard_parallel_1",49],PARAMETER["standard_parallel_2",44],'
                                    'PARAMETER["false_easting",700000],PARAMETER["false_northing",6600000],UNIT["metre",1]]')
    info = open_source(tmp_path / "j.jpg")
    assert (info.x0, info.y0, info.res_x, info.kind, info.channels) == (100.0, 200.0, 0.5, "pillow", 3)
    assert "Lambert" in info.crs


def test_world_file_names_are_case_insensitive(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "X.PGW").write_text("1\n0\n0\n-1\n0.5\n9.5\n")
    assert open_source(tmp_path / "x.png", srs="EPSG:2154").y0 == 10.0


def test_real_fixtures_metadata():
    dem = open_source(SOURCES / "RGEALTI.tif", srs="EPSG:2154")
    assert (dem.nodata, dem.sample_format, dem.channels) == ((-99999.0,), "FLOAT32", 1)
    parcels = open_source(SOURCES / "BDPARCELLAIRE.tif", srs="EPSG:2154")  # 1-bit, georeferenced by .tfw
    assert (parcels.x0, parcels.y0, parcels.res_x) == (988000.0, 6735000.0, 0.1)
    assert set(np.unique(parcels.read(0, 0, 100, 100))) <= {0, 255}


@pytest.mark.parametrize("layout", [{"tile": (64, 128), "compression": "zlib"}, {"rowsperstrip": 7},
                                    {"tile": (32, 32), "planarconfig": "separate"}])
def test_windowed_reads_decode_only_what_they_need(tmp_path, layout):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)
    data = pixels.transpose(2, 0, 1).copy() if layout.get("planarconfig") == "separate" else pixels
    geotiff(tmp_path / "w.tif", data, photometric="rgb", **layout)
    info = open_source(tmp_path / "w.tif")
    assert np.array_equal(info.read(101, 37, 433, 299), pixels[37:299, 101:433])
    sources.close_readers()
    decoded = []
    real = sources._TiffReader._segment

    def counting(self, index):
        decoded.append(index)
        return real(self, index)

    sources._TiffReader._segment = counting
    try:
        assert np.array_equal(info.read(10, 10, 30, 20), pixels[10:20, 10:30])
    finally:
        sources._TiffReader._segment = real
        sources.close_readers()
    total = len(tifffile.TiffFile(tmp_path / "w.tif").pages.first.dataoffsets)
    assert 0 < len(set(decoded)) <= max(3, total // 10)


def test_palette_tiff_becomes_rgb(tmp_path):
    index = np.arange(16, dtype=np.uint8).reshape(4, 4)
    colormap = np.zeros((3, 256), np.uint16)
    colormap[0, :16] = np.arange(16) * 4096
    geotiff(tmp_path / "pal.tif", index, photometric="palette", colormap=colormap)
    info = open_source(tmp_path / "pal.tif")
    assert info.channels == 3
    assert info.read(0, 0, 4, 4)[..., 0].tolist() == (index * 16).tolist()


@pytest.mark.parametrize(("content", "words"), [(b"GIF89a", "unsupported image type"), (None, "no such image")])
def test_unusable_files(tmp_path, content, words):
    path = tmp_path / ("x.gif" if content else "none.tif")
    if content:
        path.write_bytes(content)
    with pytest.raises(WriterError, match=words):
        open_source(path)


def test_rotated_world_file_is_refused(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "r.png")
    (tmp_path / "r.pgw").write_text("1\n0.1\n0\n-1\n0.5\n9.5\n")
    with pytest.raises(WriterError, match="rotated"):
        open_source(tmp_path / "r.png", srs="EPSG:2154")
