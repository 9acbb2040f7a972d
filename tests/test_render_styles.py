"""ROK4 styles: parsing the fixture files, errors, terrain computations against analytic values,
palettes, Terrain-RGB, legends."""

from __future__ import annotations

import copy
import io
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tileserver.render.styles import (
    Colour,
    Palette,
    Style,
    StyleError,
    apply_style,
    legend_image,
    load_style,
    load_styles_directory,
    palette_colours,
    parse_style,
)

STYLES_DIR = Path(__file__).parent / "data" / "styles"
STYLE_FILES = sorted(p for p in STYLES_DIR.glob("*.json") if not p.name.endswith(".schema.json"))


@pytest.fixture(scope="module")
def styles() -> dict[str, Style]:
    return load_styles_directory(STYLES_DIR)


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", STYLE_FILES, ids=lambda p: p.stem)
def test_every_fixture_style_parses(path: Path) -> None:
    style = load_style(path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert style.id == path.stem
    assert style.identifier == doc["identifier"]
    assert style.title == doc["title"]
    assert style.keywords == tuple(doc.get("keywords", ()))
    assert style.legend is not None and style.legend.url == doc["legend"]["url"]
    if "palette" in doc:
        assert len(style.palette.colours) == len({c["value"] for c in doc["palette"]["colours"]})
        values = [c.value for c in style.palette.colours]
        assert values == sorted(values)


def test_directory_loads_all_styles_keyed_by_file_name(styles: dict[str, Style]) -> None:
    assert set(styles) == {p.stem for p in STYLE_FILES}
    assert styles["inspire"].identifier == "DEFAULT"
    assert styles["colorize"].identifier == "white_to_alpha"
    assert styles["normal"].is_identity and styles["inspire"].is_identity


def test_fixture_parameters(styles: dict[str, Style]) -> None:
    est = styles["estompage"].estompage
    assert (est.zenith, est.azimuth, est.z_factor, est.image_nodata, est.estompage_nodata) == (45, 315, 1, -99999, 0)
    pente = styles["pente"].pente
    assert (pente.algo, pente.unit, pente.slope_nodata, pente.slope_max, pente.image_nodata) == ("H", "degree", 91, 90, -99999)
    expo = styles["aspect"].exposition
    assert (expo.algo, expo.min_slope, expo.aspect_nodata) == ("H", 1, -1)
    trgb = styles["terrainrgb"].terrainrgb
    assert (trgb.min_elevation, trgb.step) == (-10000, 0.1)
    col = styles["colorize"].colorize
    assert (col.source, col.destination, col.tolerance) == ((255, 255, 255), (255, 255, 255, 0), 2)
    hypso = styles["hypso"].palette
    assert hypso.rgb_continuous and hypso.alpha_continuous and not hypso.no_alpha
    assert hypso.colours[0] == Colour(-99999, 255, 255, 255, 0)
    assert styles["montagne"].border == 1 and styles["hypso"].border == 0


def test_output_description(styles: dict[str, Style]) -> None:
    """What the WMS layer needs to pick and check the output format before rendering."""
    cases = {  # style: (bands, dtype, nodata) for 1-band float data with nodata -99999
        "normal": (1, np.float32, (-99999.0,)),
        "hypso": (4, np.uint8, (255, 255, 255, 0)),
        "estompage": (4, np.uint8, (0, 0, 0, 64)),
        "pente": (1, np.float32, (91.0,)),
        "terrainrgb": (3, np.uint8, (0.0, 0.0, 0.0)),
    }
    for name, (bands, dtype, nodata) in cases.items():
        style = styles[name]
        assert style.output_channels(1) == bands, name
        assert style.output_dtype(np.float32) == dtype, name
        assert style.output_nodata((-99999.0,)) == nodata, name
    assert styles["colorize"].output_channels(3) == 4
    assert styles["hypso"].output_channels(3) == 3  # palettes only apply to 1-band data


BASE = json.loads((STYLES_DIR / "estompage.json").read_text(encoding="utf-8"))


def _mutate(path: str, value: object) -> dict:
    doc = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


_DELETE = object()

BAD_STYLES = [  # (field path to change, new value, field named in the message)
    ("identifier", _DELETE, "identifier"),
    ("identifier", "  ", "identifier"),
    ("title", 3, "title"),
    ("keywords", ["MNT", 4], "keywords[1]"),
    ("legend.url", _DELETE, "legend.url"),
    ("legend.width", "100", "legend.width"),
    ("estompage.azimut", 300, "estompage.azimut"),
    ("estompage.zenith", "45", "estompage.zenith"),
    ("estompage.zenith", 120, "estompage.zenith"),
    ("palette.colours.1.red", 300, "palette.colours[1].red"),
    ("palette.colours.0.alpha", _DELETE, "palette.colours[0].alpha"),
    ("palette.colours.0.value", True, "palette.colours[0].value"),
    ("palette.colours", [], "palette.colours"),
    ("palette.no_alpha", "yes", "palette.no_alpha"),
    ("pente", {"unit": "degree"}, "pente"),  # pente and estompage together
    ("colour_map", {}, "colour_map"),
]


@pytest.mark.parametrize(("path", "value", "field"), BAD_STYLES, ids=[b[0] + "-" + str(i) for i, b in enumerate(BAD_STYLES)])
def test_bad_style_names_file_and_field(tmp_path: Path, path: str, value: object, field: str) -> None:
    file = tmp_path / "broken.json"
    file.write_text(json.dumps(_mutate(path, value)), encoding="utf-8")
    with pytest.raises(StyleError) as info:
        load_style(file)
    message = str(info.value)
    assert str(file) in message
    assert f": {field}:" in message, message


@pytest.mark.parametrize(("doc", "field"), [
    ({"identifier": "x", "title": "x", "pente": {"unit": "radian"}}, "pente.unit"),
    ({"identifier": "x", "title": "x", "pente": {"algo": "Q"}}, "pente.algo"),
    ({"identifier": "x", "title": "x", "terrainrgb": {"step": 0}}, "terrainrgb.step"),
    ({"identifier": "x", "title": "x", "terrainrgb": {}, "palette": BASE["palette"]}, "terrainrgb"),
    ({"identifier": "x", "title": "x", "colorize": {"source": [255, 255]}}, "colorize.source"),
    ({"identifier": "x", "title": "x", "exposition": {}, "pente": {}}, "pente"),
    ([], "(root)"),
])
def test_more_invalid_documents(doc: object, field: str) -> None:
    with pytest.raises(StyleError, match=rf"^mem: {re.escape(field)}:"):
        parse_style(doc, "x", "mem")


def test_bad_json_and_bad_file_in_directory(tmp_path: Path) -> None:
    (tmp_path / "ok.json").write_text(json.dumps(BASE), encoding="utf-8")
    (tmp_path / "style.schema.json").write_text("{ not even json", encoding="utf-8")  # skipped
    assert set(load_styles_directory(tmp_path)) == {"ok"}
    (tmp_path / "zz.json").write_text("{ \"identifier\": ", encoding="utf-8")
    with pytest.raises(StyleError, match=r"zz\.json: invalid JSON"):
        load_styles_directory(tmp_path)


def test_pourcent_and_percent_units() -> None:
    for unit in ("pourcent", "percent"):
        style = parse_style({"identifier": "p", "title": "p", "pente": {"unit": unit}}, "p")
        assert style.pente.unit == "percent"
    defaults = parse_style({"identifier": "p", "title": "p", "pente": {}}, "p").pente
    assert (defaults.algo, defaults.unit, defaults.slope_nodata, defaults.slope_max) == ("H", "degree", 0, 90)


# ----------------------------------------------------------------------------- terrain analysis

RES_X, RES_Y = 5.0, 4.0  # deliberately different


def plane(a: float, b: float, h: int = 12, w: int = 14) -> np.ndarray:
    """z = a*x + b*y (x east, y north) sampled with a 1-pixel border, (h+2, w+2, 1) float32."""
    rows, cols = np.indices((h + 2, w + 2), dtype=np.float64)
    x, y = cols * RES_X, -rows * RES_Y
    return (1000 + a * x + b * y).astype(np.float32)[..., None]


def style_with(**kinds: object) -> Style:
    return Style(id="t", identifier="t", title="t", **kinds)  # type: ignore[arg-type]


PLANES = [(0.3, 0.0), (0.0, -0.5), (0.2, 0.2), (-1.5, 0.7), (0.01, -0.02)]


@pytest.mark.parametrize(("a", "b"), PLANES)
def test_slope_and_aspect_of_a_plane(styles: dict[str, Style], a: float, b: float) -> None:
    data = plane(a, b)
    degrees = apply_style(styles["pente"], data, -99999, RES_X, RES_Y)
    assert degrees.shape == (12, 14, 1) and degrees.dtype == np.float32
    np.testing.assert_allclose(degrees, math.degrees(math.atan(math.hypot(a, b))), atol=1e-3)

    percent = apply_style(style_with(pente=replace(styles["pente"].pente, unit="percent", slope_max=1e9)),
                          data, None, RES_X, RES_Y)
    np.testing.assert_allclose(percent, 100 * math.hypot(a, b), rtol=1e-3)  # float32 input

    zt = apply_style(style_with(pente=replace(styles["pente"].pente, algo="Z")), data, None, RES_X, RES_Y)
    np.testing.assert_allclose(zt, degrees, atol=1e-3)  # both exact on a plane

    aspect = apply_style(style_with(exposition=styles["aspect"].exposition), data, None, RES_X, RES_Y)
    if math.degrees(math.atan(math.hypot(a, b))) < 1:  # flatter than min_slope
        assert (aspect == -1).all()
    else:
        expected = math.degrees(math.atan2(-a, -b)) % 360  # compass bearing of the downhill direction
        diff = (aspect - expected + 180) % 360 - 180
        np.testing.assert_allclose(diff, 0, atol=0.05)  # float32 quantisation on gentle slopes


@pytest.mark.parametrize(("a", "b"), PLANES)
def test_hillshade_of_a_plane(styles: dict[str, Style], a: float, b: float) -> None:
    est = styles["estompage"].estompage
    for zenith, azimuth, z_factor in ((45, 315, 1), (30, 90, 2), (60, 200, 0.5)):
        params = replace(est, zenith=zenith, azimuth=azimuth, z_factor=z_factor)
        shade = apply_style(style_with(estompage=params), plane(a, b), None, RES_X, RES_Y)
        assert shade.dtype == np.uint8 and shade.shape == (12, 14, 1)
        p, q = a * z_factor, b * z_factor
        alt, az = math.radians(zenith), math.radians(azimuth)
        sun = (math.sin(az) * math.cos(alt), math.cos(az) * math.cos(alt), math.sin(alt))
        normal = np.array([-p, -q, 1.0]) / math.sqrt(1 + p * p + q * q)
        expected = 255 * max(0.0, float(np.dot(normal, sun)))
        assert np.abs(shade.astype(float) - expected).max() <= 0.5 + 1e-6


def test_hillshade_faces_the_sun() -> None:
    """A slope facing the sun (north-west for azimuth 315) is brighter than one facing away."""
    params = parse_style({"identifier": "e", "title": "e", "estompage": {}}, "e").estompage
    facing = apply_style(style_with(estompage=params), plane(0.5, -0.5), None, 1, 1)  # downhill to NW
    away = apply_style(style_with(estompage=params), plane(-0.5, 0.5), None, 1, 1)
    assert facing.min() > 200 and away.max() < 60


def test_cone(styles: dict[str, Style]) -> None:
    """z = 500 - k*r: slope atan(k) everywhere, aspect pointing away from the apex."""
    k, n = 0.8, 81
    rows, cols = np.indices((n + 2, n + 2), dtype=np.float64)
    x, y = (cols - (n + 1) / 2) * RES_X, -(rows - (n + 1) / 2) * RES_Y
    r = np.hypot(x, y)
    data = (500 - k * r).astype(np.float32)[..., None]
    far = (r[1:-1, 1:-1] > 12 * RES_X)
    slope = apply_style(styles["pente"], data, None, RES_X, RES_Y)[..., 0]
    np.testing.assert_allclose(slope[far], math.degrees(math.atan(k)), atol=0.6)
    aspect = apply_style(style_with(exposition=styles["aspect"].exposition), data, None, RES_X, RES_Y)[..., 0]
    bearing = np.degrees(np.arctan2(x, y))[1:-1, 1:-1] % 360  # outward = downhill
    diff = (aspect - bearing + 180) % 360 - 180
    assert np.abs(diff[far]).max() < 2.0


def test_border_makes_tiles_agree_and_nodata_propagates(styles: dict[str, Style]) -> None:
    rng = np.random.default_rng(3)
    dem = rng.normal(0, 20, (40, 50)).cumsum(axis=0).cumsum(axis=1).astype(np.float32)[..., None]
    whole = apply_style(styles["pente"], dem, None, RES_X, RES_Y)
    part = apply_style(styles["pente"], dem[9:22, 19:33], None, RES_X, RES_Y)  # window + its border
    np.testing.assert_array_equal(part, whole[9:20, 19:31])

    holed = dem.copy()
    holed[10, 10] = -99999  # the style's image_nodata
    holed[30, 30] = 7.0  # the data's own nodata
    out = apply_style(styles["pente"], holed, 7.0, RES_X, RES_Y)[..., 0]
    bad = np.zeros_like(out, dtype=bool)
    bad[8:11, 8:11] = bad[28:31, 28:31] = True  # every output pixel whose 3x3 window holds them
    assert (out[bad] == 91).all() and (out[~bad] != 91).all()


def test_slope_max_and_palette_combination(styles: dict[str, Style]) -> None:
    capped = style_with(pente=replace(styles["pente"].pente, slope_max=30))
    assert (apply_style(capped, plane(1.0, 0), None, RES_X, RES_Y) == 30).all()  # 45 degrees, capped
    # montagne: slope then its stepped-looking ramp; 35 degrees is a stop
    tan35 = math.tan(math.radians(35))
    rgba = apply_style(styles["montagne"], plane(tan35, 0), None, RES_X, RES_Y)
    assert rgba.shape == (12, 14, 4) and rgba.dtype == np.uint8
    assert (rgba == [243, 148, 25, 255]).all()
    nodata = np.full((5, 5, 1), -99999, np.float32)
    assert (apply_style(styles["montagne"], nodata, None, 1, 1) == [255, 255, 255, 0]).all()


def test_neighbourhood_style_needs_border_and_one_band(styles: dict[str, Style]) -> None:
    with pytest.raises(ValueError, match="1-band"):
        apply_style(styles["pente"], np.zeros((5, 5, 3), np.float32), None)
    with pytest.raises(ValueError, match="border"):
        apply_style(styles["pente"], np.zeros((2, 5, 1), np.float32), None)


# ----------------------------------------------------------------------------- palettes


def test_continuous_palette_at_stops_and_between(styles: dict[str, Style]) -> None:
    pal = styles["hypso"].palette
    stops = np.array([c.value for c in pal.colours], dtype=np.float32)
    out = apply_style(styles["hypso"], stops.reshape(1, -1, 1))
    expected = [[c.red, c.green, c.blue, c.alpha] for c in pal.colours]
    np.testing.assert_array_equal(out[0], expected)
    # halfway between 300 (230,230,128) and 600 (220,179,99): the mean, rounded
    mid = apply_style(styles["hypso"], np.array([[[450.0]]], np.float32))
    np.testing.assert_array_equal(mid[0, 0], [225, 204, 114, 255])  # 113.5 rounds to even
    quarter = palette_colours(pal, np.array([375.0]))
    np.testing.assert_array_equal(quarter[0], np.rint([227.5, 217.25, 120.75, 255]))


def test_stepped_palette_and_clamping() -> None:
    pal = Palette((Colour(0, 10, 20, 30, 40), Colour(10, 110, 120, 130, 140), Colour(20, 210, 220, 230, 240)),
                  rgb_continuous=False, alpha_continuous=True)
    values = np.array([-5, 0, 4.9, 5, 10, 15, 20, 99, np.nan])
    out = palette_colours(pal, values)
    np.testing.assert_array_equal(out[:, :3], [[10, 20, 30], [10, 20, 30], [10, 20, 30], [10, 20, 30],
                                               [110, 120, 130], [110, 120, 130], [210, 220, 230],
                                               [210, 220, 230], [10, 20, 30]])
    np.testing.assert_array_equal(out[:, 3], [40, 40, 89, 90, 140, 190, 240, 240, 40])
    no_alpha = palette_colours(replace(pal, no_alpha=True), values)
    assert no_alpha.shape == (9, 3)


def test_palette_maps_data_nodata_to_the_first_colour(styles: dict[str, Style]) -> None:
    data = np.array([[[0.0], [100.0], [200.0]]], np.float32)
    out = apply_style(styles["orange"], data, nodata=100.0)
    np.testing.assert_array_equal(out[0, 1], [255, 132, 0, 255])  # first stop, ROK4's palette nodata
    np.testing.assert_array_equal(out[0, 2], [255, 132, 0, 55])


def test_palette_leaves_multiband_data_alone(styles: dict[str, Style]) -> None:
    rgb = np.zeros((2, 2, 3), np.uint8)
    assert apply_style(styles["hypso"], rgb) is not None
    np.testing.assert_array_equal(apply_style(styles["hypso"], rgb), rgb)


def test_identity_and_colorize(styles: dict[str, Style]) -> None:
    data = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    assert apply_style(styles["normal"], data) is data
    rgb = np.array([[[255, 255, 255], [254, 253, 255], [250, 255, 255], [0, 0, 0]]], np.uint8)
    out = apply_style(styles["colorize"], rgb)
    np.testing.assert_array_equal(out[0], [[255, 255, 255, 0], [255, 255, 255, 0], [250, 255, 255, 255],
                                           [0, 0, 0, 255]])


# ----------------------------------------------------------------------------- terrain rgb


def test_terrainrgb_round_trip(styles: dict[str, Style]) -> None:
    heights = np.array([[-10000.0, -432.1, 0.0, 0.04, 1234.56, 4807.3, 8848.86]], np.float32)[..., None]
    rgb = apply_style(styles["terrainrgb"], heights)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 7, 3)
    np.testing.assert_array_equal(rgb[0, 2], [1, 134, 160])  # the well-known sea level triple
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    decoded = -10000 + (r * 65536 + g * 256 + b) * 0.1
    np.testing.assert_allclose(decoded, heights[..., 0], atol=0.05 + 1e-3)
    nodata = apply_style(styles["terrainrgb"], np.array([[[-99999.0], [np.nan]]], np.float32), nodata=-99999)
    assert (nodata == 0).all()


# ----------------------------------------------------------------------------- legends


@pytest.mark.parametrize(("width", "height"), [(100, 20), (20, 100)])
def test_legend_image(styles: dict[str, Style], width: int, height: int) -> None:
    png = legend_image(styles["hypso"], width, height)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (width, height)
    pixels = np.asarray(image.convert("RGBA"))
    last = styles["hypso"].palette.colours[-1]
    high = pixels[0, 0] if height > width else pixels[0, -1]
    np.testing.assert_array_equal(high, [last.red, last.green, last.blue, last.alpha])
    grey = np.asarray(Image.open(io.BytesIO(legend_image(styles["normal"], 64, 8))).convert("RGBA"))
    assert grey[0, 0, 0] == 0 and grey[0, -1, 0] == 255



@pytest.mark.parametrize("bands", [3, 4])
@pytest.mark.parametrize("compiled", [True, False])
def test_colorize_of_uint8_equals_the_float_path(monkeypatch: pytest.MonkeyPatch, bands: int, compiled: bool) -> None:
    """The integer colorize (compiled in one pass, or band by band with masked copies) gives the
    float64 formula's pixels: tolerances around the steps of the data, negative, sources off 0..255,
    alpha compared or not, an alpha band gained or dropped."""
    from tileserver.render import styles
    from tileserver.render.styles import Colorize, colorize

    if compiled:
        assert styles._pixels is not None  # the install builds render/_pixels.c (README)
    else:
        monkeypatch.setattr(styles, "_pixels", None)
    rng = np.random.default_rng(5)
    data = (rng.integers(0, 4, (64, 70, bands)) * 85).astype(np.uint8)
    data[::7, ::3] += rng.integers(0, 3, data[::7, ::3].shape).astype(np.uint8)
    for rule in (Colorize((0, 0, 0), (255, 255, 255), 0), Colorize((255, 255, 255), (255, 255, 255, 0), 0),
                 Colorize((85, 85, 85), (1, 2, 3), 90.5), Colorize((85, 170, 0), (9, 8, 7, 6), 1),
                 Colorize((0, 0, 0, 0), (255, 255, 255), 2.9), Colorize((-3, 300, 0), (0, 0, 0), 300),
                 Colorize((170, 170, 170), (1, 1, 1), -1)):
        if len(rule.source) > bands:
            continue
        assert np.array_equal(colorize(data, rule), colorize(data.astype(np.float32), rule)), rule


@pytest.mark.parametrize("source,destination", [
    ([0, 0, 0], [255, 255, 255]),  # torgb: alpha never read
    ([0, 0, 0, 0], [255, 255, 255]),  # alpha compared: kept
    ([255, 255, 255], [255, 255, 255, 0]),  # alpha copied to the output: kept
    ([9], [1, 2, 3]),
])
def test_a_style_sees_the_same_through_the_bands_it_reads(source: list[int], destination: list[int]) -> None:
    """The renderer resamples only `bands_read` leading bands; the style's answer must not change."""
    from tileserver.render.styles import Colorize

    style = style_with(colorize=Colorize(source=tuple(source), destination=tuple(destination), tolerance=1))
    rng = np.random.default_rng(len(source) * 10 + len(destination))
    rgba = rng.integers(0, 3, (20, 30, 4)).astype(np.uint8)
    rgba[..., 3] = rng.choice([0, 255, 9], (20, 30))
    rgba[:4, :4] = 0
    read = style.bands_read(4)
    assert 3 <= read <= 4
    np.testing.assert_array_equal(apply_style(style, rgba[..., :read]), apply_style(style, rgba))
    if len(source) < 4 and len(destination) < 4:
        assert read == 3  # RGBA → RGB without looking at alpha: one plane less to resample
    assert style.bands_read(3) == 3 and style_with().bands_read(4) == 4
