"""Tile matrix sets: loading, math both ways, level choice, quad-tree detection, OGC conversion."""

import json
import math

import pyproj
import pytest

from tileserver.rok4.tms import TMSError, list_tms, load_tms, load_tms_file, parse_tms
from tileserver.settings import load_settings

TMS_DIR = load_settings(env={}).tms_directory


def test_every_shipped_definition_loads_and_is_consistent():
    ids = list_tms(TMS_DIR)
    assert {"PM", "4326", "LAMB93", "LAMB93_1M_MNT", "WGS84G", "UTM20W84MART_1M_MNT"} <= set(ids)
    for tms_id in ids:
        tms = load_tms(tms_id, TMS_DIR)
        assert tms.id == tms_id
        assert pyproj.CRS.from_user_input(tms.crs)
        for m in tms.matrices:
            assert m.cell_size > 0 and m.matrix_width > 0


def test_pm_math_matches_web_mercator():
    pm = load_tms("PM", TMS_DIR)
    assert pm.is_quadtree
    m = pm.get("1")
    assert m.tile_bbox(0, 0) == pytest.approx((-20037508.3427892, 0, 0, 20037508.3427892), abs=1e-6)
    # Paris in level 15
    x, y = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(2.35, 48.85)
    z15 = pm.get("15")
    col, row = z15.point_to_tile(x, y)
    n = 2**15
    assert col == int((2.35 + 180) / 360 * n)
    lat = math.radians(48.85)
    assert row == int((1 - math.asinh(math.tan(lat)) / math.pi) / 2 * n)
    xmin, ymin, xmax, ymax = z15.tile_bbox(col, row)
    assert xmin <= x < xmax and ymin < y <= ymax


def test_bbox_to_tile_range_is_inclusive_and_clamped():
    pm = load_tms("PM", TMS_DIR)
    m = pm.get("2")
    assert m.bbox_to_tile_range(m.tile_bbox(1, 2)) == (1, 2, 1, 2)
    big = (-1e9, -1e9, 1e9, 1e9)
    assert m.bbox_to_tile_range(big) == (0, 0, 3, 3)
    assert m.bbox_to_tile_range((1e9, 1e9, 2e9, 2e9)) is None
    x0, y0, x1, y1 = m.range_bbox(1, 1, 2, 3)
    assert m.bbox_to_tile_range((x0, y0, x1, y1)) == (1, 1, 2, 3)


def test_bbox_to_tile_range_tolerance_is_in_tiles():
    """SCAN1000's extent lies within 1 % of a tile past PM level 1's middle column: it is in tile (1, 0);
    a tolerance of 1e-9 × the tile span in metres (0.02 tile there) lost it."""
    level1 = load_tms("PM", TMS_DIR).get("1")
    scan1000 = (156543.0339281484, 5792092.2553374255, 234814.5508921717, 5831228.013819436)
    assert level1.bbox_to_tile_range(scan1000) == (1, 0, 1, 0)
    edge = level1.tile_bbox(1, 0)
    assert level1.bbox_to_tile_range((edge[0] - 1, edge[1], edge[0], edge[3])) == (0, 0, 0, 0)  # edge: out


@pytest.mark.parametrize("tms_id,quadtree", [("PM", True), ("4326", True), ("WGS84G", True),
                                              ("LAMB93_1M_MNT", False), ("LAMB93", False)])
def test_quadtree_detection(tms_id, quadtree):
    assert load_tms(tms_id, TMS_DIR).is_quadtree is quadtree


def test_level_for_resolution():
    pm = load_tms("PM", TMS_DIR)
    assert pm.level_for_resolution(150).id == "10"  # 152.87 m at level 10
    assert pm.level_for_resolution(100, finest=True).id == "11"
    assert pm.level_for_resolution(150, levels=["3", "4"]).id == "4"


def test_ogc_document_and_morecantile():
    for tms_id in ("PM", "4326", "LAMB93_1M_MNT"):
        tms = load_tms(tms_id, TMS_DIR)
        doc = tms.to_ogc_dict()
        assert doc["crs"].startswith("http://www.opengis.net/def/crs/")
        mc = tms.to_morecantile()
        m = tms.matrices[-1]
        bounds = mc.xy_bounds(3, 4, int(m.id))
        assert tuple(bounds) == pytest.approx(m.tile_bbox(3, 4), rel=1e-9)
    pm = load_tms("PM", TMS_DIR).to_ogc_dict()
    assert pm["tileMatrices"][0]["scaleDenominator"] == pytest.approx(559082264.0287178, rel=1e-6)


def test_4326_axis_order_in_ogc_document():
    tms = load_tms("4326", TMS_DIR)
    doc = tms.to_ogc_dict()
    assert doc["orderedAxes"] == list(tms.ordered_axes)
    first = doc["tileMatrices"][0]
    # easting-first in ROK4's file; the OGC document follows orderedAxes
    if tms.ordered_axes[0].lower().startswith("lat"):
        assert first["pointOfOrigin"] == [90, -180]
    else:
        assert first["pointOfOrigin"] == [-180, 90]


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda d: d.pop("crs"), "'crs'"),
        (lambda d: d["tileMatrices"][0].pop("cellSize"), "tileMatrices[0]: missing field 'cellSize'"),
        (lambda d: d["tileMatrices"][1].update(matrixWidth="2"), "tileMatrices[1]: field 'matrixWidth'"),
        (lambda d: d["tileMatrices"][0].update(pointOfOrigin=[1]), "'pointOfOrigin'"),
        (lambda d: d["tileMatrices"][0].update(id="1_2"), "'id'"),
    ],
)
def test_bad_definition_names_file_and_field(tmp_path, mutate, field):
    data = json.loads((load_settings(env={}).tms_directory + "/PM.json") and open(TMS_DIR + "/PM.json").read())
    mutate(data)
    bad = tmp_path / "BAD.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(TMSError) as err:
        load_tms_file(bad)
    assert str(bad) in str(err.value) and field in str(err.value)


def test_unknown_or_hostile_ids(tmp_path):
    with pytest.raises(TMSError, match="no such"):
        load_tms("NOPE", TMS_DIR)
    with pytest.raises(TMSError):
        load_tms("../etc/passwd", TMS_DIR)
    (tmp_path / "X.json").write_text("{not json")
    with pytest.raises(TMSError, match="X.json"):
        load_tms("X", tmp_path)


def test_directory_from_rok4_environment(tmp_path):
    (tmp_path / "MINE.json").write_text(open(TMS_DIR + "/PM.json").read())
    settings = load_settings(env={"ROK4_TMS_DIRECTORY": f"file://{tmp_path}"})
    assert settings.tms_directory == str(tmp_path)
    assert load_tms("MINE", settings.tms_directory).crs == "EPSG:3857"


def test_parse_minimal():
    tms = parse_tms({"crs": "EPSG:2154", "tileMatrices": [{"id": "0", "cellSize": 2, "pointOfOrigin": [0, 100],
                     "tileWidth": 10, "tileHeight": 10, "matrixWidth": 3, "matrixHeight": 3}]}, "T")
    m = tms.get("0")
    assert m.point_to_pixel(25, 55) == (1, 2, 2, 2)
