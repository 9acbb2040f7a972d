"""Pyramid descriptors, slab naming and list files against the real ROK4 fixtures."""

import json
from pathlib import Path

import pytest

from tileserver.rok4.descriptor import DescriptorError, check_against_tms, parse_descriptor
from tileserver.rok4.formats import FORMATS, format_code, get_format
from tileserver.rok4.listfile import parse_list
from tileserver.rok4.naming import b36_path, b36_path_decode, parse_slab_name
from tileserver.rok4.tms import load_tms
from tileserver.settings import load_settings

DATA = Path(__file__).parent / "data" / "pyramids"
NAMES = ["BDPARCELLAIRE", "MONTAGNE", "RGEALTI", "SCAN1000"]
TMS_DIR = load_settings(env={}).tms_directory


@pytest.mark.parametrize("name", NAMES)
def test_fixture_descriptors_round_trip(name):
    raw = json.loads((DATA / f"{name}.json").read_text())
    desc = parse_descriptor(json.dumps(raw))
    check_against_tms(desc, load_tms(desc.tile_matrix_set, TMS_DIR))
    again = json.loads(desc.to_json())
    assert again == raw  # same semantics: same keys and values (key order aside)
    assert parse_descriptor(desc.to_json()) == desc


@pytest.mark.parametrize("name", NAMES)
def test_list_names_match_descriptor_naming(name):
    desc = parse_descriptor((DATA / f"{name}.json").read_bytes())
    slabs = parse_list((DATA / f"{name}.list").read_text())
    assert slabs.entries
    for _, slab, _ in slabs.entries:
        parsed = parse_slab_name(slab)
        level = desc.level(parsed.level)
        assert level is not None
        assert f"{name}/{slab}" == level.storage.slab_name(parsed.col, parsed.row).replace(
            level.storage.image_directory, f"{name}/DATA/{level.id}"
        )
        assert (DATA / name / slab).exists()


def test_b36_paths_from_the_spec():
    assert b36_path(25, 195, 2) == "00/05/PF.tif"
    assert b36_path(159, 367, 2) == "00/4A/F7.tif"
    assert b36_path(272102, 61673, 2) == "51TB/YL/E5.tif"
    assert b36_path(0, 0, 0) == "00.tif"
    for col, row in [(25, 195), (159, 367), (272102, 61673), (0, 0), (35, 36)]:
        assert b36_path_decode(b36_path(col, row, 2)) == (col, row)


def test_slab_names_both_directions():
    assert parse_slab_name("DATA/19/04/RR/R2.tif").level == "19"
    s = parse_slab_name("ALTI/DATA_6_1121_11181")
    assert (s.kind, s.level, s.col, s.row) == ("DATA", "6", 1121, 11181)
    assert parse_slab_name("PYR/MSK_3_1_2").kind == "MASK"
    assert parse_slab_name("IMAGE/3/00/00/12.tif").kind == "DATA"
    with pytest.raises(ValueError):
        parse_slab_name("whatever.txt")


def test_object_storage_levels():
    d = {"tile_matrix_set": "PM", "format": "TIFF_JPG_UINT8",
         "raster_specifications": {"channels": 3, "nodata": "255,255,255", "photometric": "rgb",
                                   "interpolation": "bicubic"},
         "mask_format": "TIFF_ZIP_UINT8",
         "levels": [{"id": "12", "tiles_per_width": 16, "tiles_per_height": 16,
                     "tile_limits": {"min_col": 0, "max_col": 3, "min_row": 0, "max_row": 3},
                     "storage": {"type": "S3", "bucket_name": "pyramids", "image_prefix": "NAME/DATA_12",
                                 "mask_prefix": "NAME/MASK_12"}}]}
    desc = parse_descriptor(d)
    level = desc.level("12")
    assert level.storage.slab_name(65, 42) == "NAME/DATA_12_65_42"
    assert level.storage.slab_name(65, 42, mask=True) == "NAME/MASK_12_65_42"
    assert json.loads(desc.to_json()) == d
    ceph = json.loads(json.dumps(d))
    ceph["levels"][0]["storage"] = {"type": "CEPH", "pool_name": "p", "image_prefix": "N/DATA_12"}
    assert parse_descriptor(ceph).level("12").storage.container == "p"


def test_vector_descriptor():
    d = {"tile_matrix_set": "PM", "format": "TIFF_PBF_MVT",
         "levels": [{"id": "4", "tiles_per_width": 16, "tiles_per_height": 16, "tables": [],
                     "tile_limits": {"min_col": 0, "max_col": 1, "min_row": 0, "max_row": 1},
                     "storage": {"type": "FILE", "image_directory": "V/DATA/4", "path_depth": 2}}]}
    desc = parse_descriptor(d)
    assert desc.format.is_vector and desc.raster is None
    assert json.loads(desc.to_json()) == d


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda d: d.pop("tile_matrix_set"), "tile_matrix_set"),
        (lambda d: d.update(format="TIFF_GIF_UINT8"), "format"),
        (lambda d: d["raster_specifications"].update(channels=7), "channels"),
        (lambda d: d["raster_specifications"].update(nodata="a,b"), "nodata"),
        (lambda d: d["levels"][0].pop("tile_limits"), "levels[0]: missing field 'tile_limits'"),
        (lambda d: d["levels"][1]["tile_limits"].update(min_col="x"), "levels[1].tile_limits"),
        (lambda d: d["levels"][0]["storage"].update(type="FTP"), "levels[0].storage"),
        (lambda d: d["levels"][0].update(id="1_2"), "levels[0]: field 'id'"),
        (lambda d: d.update(levels=[]), "levels"),
    ],
)
def test_bad_descriptors_name_the_field(mutate, field):
    d = json.loads((DATA / "SCAN1000.json").read_text())
    mutate(d)
    with pytest.raises(DescriptorError) as err:
        parse_descriptor(d)
    assert field in str(err.value)


def test_not_json():
    with pytest.raises(DescriptorError, match="JSON"):
        parse_descriptor(b"{oops")


def test_formats_table():
    assert len(FORMATS) == 12
    assert get_format("TIFF_ZIP_FLOAT32").content_encoding == "deflate"
    assert get_format("TIFF_PNG_INT8").code == "TIFF_PNG_UINT8"
    assert format_code("none", "FLOAT32") == "TIFF_RAW_FLOAT32"
    with pytest.raises(ValueError):
        format_code("jpg", "FLOAT32")


def test_list_round_trip():
    text = "0=/p/V2\n1=/p/V1\n#\n1/DATA/19/04/RR/R2.tif\n0/DATA/19/04/VZ/JV.tif abc123\n"
    parsed = parse_list(text)
    assert parsed.roots == {0: "/p/V2", 1: "/p/V1"}
    assert parsed.slabs()[0] == "/p/V1/DATA/19/04/RR/R2.tif"
    assert parsed.to_text() == text
    with pytest.raises(ValueError, match="line 3"):
        parse_list("0=/a\n#\n7/DATA/1/00.tif\n")
