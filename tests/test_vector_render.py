"""Vector maps drawn by mapnik from SLD styles: pixels checked against the bbox→pixel affine."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pyproj import Transformer
from vectorutil import make_gpkg

from tileserver.render import sld
from tileserver.render.vector_map import VectorLayer, quote_string, render
from tileserver.vector.geopackage import GeoPackageBase

BBOX = (600000.0, 6800000.0, 610000.0, 6805000.0)  # communes i=0..9; box i: x 600000+1000i .. +800


@pytest.fixture(scope="module", params=["gpkg", "postgis"])
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path | str, Any]:
    """make_gpkg's file, then the same delivery integrated into a PostGIS schema (mapnik's postgis input)."""
    tmp = tmp_path_factory.mktemp("vr")
    path = make_gpkg(tmp / "base.gpkg")
    if request.param == "gpkg":
        return path, GeoPackageBase(path)
    from tileserver.vector import pgintegrate, postgis
    from tileserver.vector.delivery import check_delivery

    server = request.getfixturevalue("postgis_url")
    postgis.configure(server)
    url = postgis.descriptor_url(server, postgis.new_schema())
    report = check_delivery([path], None, tmp / "work")
    assert report.ok, report.problems
    pgintegrate.integrate(report, url)
    return url, postgis.PostGISBase(url)


def style(rules: str, layer: str = "communes") -> sld.Style:
    return sld.parse(f"""<StyledLayerDescriptor version="1.0.0" xmlns="http://www.opengis.net/sld"
      xmlns:ogc="http://www.opengis.net/ogc"><NamedLayer><Name>{layer}</Name><UserStyle><FeatureTypeStyle>
      {rules}</FeatureTypeStyle></UserStyle></NamedLayer></StyledLayerDescriptor>""".encode())


def fill(color: str) -> str:
    return f'<PolygonSymbolizer><Fill><CssParameter name="fill">{color}</CssParameter></Fill></PolygonSymbolizer>'


def equal(attribute: str, value: str) -> str:
    return (f"<ogc:Filter><ogc:PropertyIsEqualTo><ogc:PropertyName>{attribute}</ogc:PropertyName>"
            f"<ogc:Literal>{value}</ogc:Literal></ogc:PropertyIsEqualTo></ogc:Filter>")


def pixel(x: float, y: float, bbox: tuple[float, ...], size: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of a map coordinate, from the bbox→pixel affine."""
    width, height = size
    return (int((bbox[3] - y) / (bbox[3] - bbox[1]) * height), int((x - bbox[0]) / (bbox[2] - bbox[0]) * width))


def centre(i: int) -> tuple[float, float]:
    return 600400 + i * 1000, 6800400 + (i % 5) * 1000


def draw(base: tuple[Path, GeoPackageBase], st: sld.Style | None, relation: str = "communes",
         bbox: tuple[float, ...] = BBOX, size: tuple[int, int] = (512, 256), crs: str = "EPSG:2154",
         **kw: object) -> np.ndarray:
    path, gpkg = base
    layer = VectorLayer(gpkg.relation(relation), st)  # type: ignore[arg-type]
    return render(path, [layer], bbox, crs, size[0], size[1], **kw)  # type: ignore[arg-type]


def at(image: np.ndarray, x: float, y: float, bbox: tuple[float, ...] = BBOX) -> tuple[int, ...]:
    row, col = pixel(x, y, bbox, (image.shape[1], image.shape[0]))
    return tuple(int(v) for v in image[row, col])


def test_polygon_fill_inside_and_transparent_outside(base) -> None:
    image = draw(base, style(f"<Rule>{fill('#ff0000')}</Rule>"))
    assert image.shape == (256, 512, 4) and image.dtype == np.uint8
    for i in range(10):
        assert at(image, *centre(i)) == (255, 0, 0, 255)
    assert at(image, 600900, 6800400)[3] == 0  # between two communes
    assert at(image, 600400, 6801400)[3] == 0


def test_bgcolor_when_opaque(base) -> None:
    image = draw(base, style(f"<Rule>{fill('#ff0000')}</Rule>"), transparent=False, bgcolor="#00ff00")
    assert at(image, 600900, 6800400) == (0, 255, 0, 255)
    assert at(image, *centre(1)) == (255, 0, 0, 255)


def test_stroke_on_edges_not_inside(base) -> None:
    image = draw(base, style('<Rule><PolygonSymbolizer><Stroke><CssParameter name="stroke">#0000ff</CssParameter>'
                             '<CssParameter name="stroke-width">3</CssParameter></Stroke></PolygonSymbolizer></Rule>'))
    assert at(image, *centre(2))[3] == 0
    row, col = pixel(602000, 6802400, BBOX, (512, 256))  # the west edge of commune 2
    window = image[row - 1:row + 2, col - 2:col + 3]
    assert (window[..., 2] > 200).any() and (window[..., 3] > 200).any() and (window[..., 0] == 0).all()


def test_filters_select_features(base) -> None:
    st = style(f"<Rule>{equal('nom', 'commune-02')}{fill('#ff0000')}</Rule>"
               f"<Rule>{equal('population', '700')}{fill('#00ff00')}</Rule>"
               f"<Rule>{equal('nom', 'it' + chr(39) + 's')}{fill('#0000ff')}</Rule>")
    image = draw(base, st)
    populations = [(i * 37) % 101 * 100 for i in range(10)]
    for i in range(10):
        expected = (255, 0, 0, 255) if i == 2 else (0, 255, 0, 255) if populations[i] == 700 else None
        if expected:
            assert at(image, *centre(i)) == expected
        else:
            assert at(image, *centre(i))[3] == 0
    assert quote_string("it's \\") == "'it\\'s \\\\'"


def test_else_filter(base) -> None:
    image = draw(base, style(f"<Rule>{equal('nom', 'commune-02')}{fill('#ff0000')}</Rule>"
                             f"<Rule><ElseFilter/>{fill('#00ff00')}</Rule>"))
    assert at(image, *centre(2)) == (255, 0, 0, 255)
    assert at(image, *centre(3)) == (0, 255, 0, 255)
    assert at(image, 600900, 6800400)[3] == 0


def test_scale_denominators_switch_rules(base) -> None:
    st = style(f"<Rule><MaxScaleDenominator>60000</MaxScaleDenominator>{fill('#ff0000')}</Rule>"
               f"<Rule><MinScaleDenominator>60000</MinScaleDenominator>{fill('#00ff00')}</Rule>")
    # 10 km over 256 px: 1 / 0.00028 m * 39 m ≈ 139 500; over 2048 px ≈ 17 400
    small = draw(base, st, size=(256, 128))
    large = draw(base, st, size=(2048, 1024))
    assert at(small, *centre(4)) == (0, 255, 0, 255)
    assert at(large, *centre(4)) == (255, 0, 0, 255)


def test_point_marks_at_their_pixel(base) -> None:
    bbox = (1.9, 47.9, 3.2, 48.6)
    st = style('<Rule><PointSymbolizer><Graphic><Mark><WellKnownName>square</WellKnownName><Fill>'
               '<CssParameter name="fill">#ff00ff</CssParameter></Fill></Mark><Size>9</Size></Graphic>'
               '</PointSymbolizer></Rule>', "gares")
    image = draw(base, st, "gares", bbox=bbox, size=(520, 280), crs="EPSG:4326")
    for i in range(12):
        assert at(image, 2.0 + i * 0.1, 48.0 + i * 0.05, bbox) == (255, 0, 255, 255)
    assert at(image, 2.05, 48.3, bbox)[3] == 0


def test_label_draws_near_its_point(base) -> None:
    bbox = (1.9, 47.9, 3.2, 48.6)
    st = style('<Rule><TextSymbolizer><Label><ogc:PropertyName>nom</ogc:PropertyName></Label>'
               '<Font><CssParameter name="font-size">12</CssParameter></Font>'
               '<Halo><Radius>1</Radius></Halo></TextSymbolizer></Rule>', "gares")
    image = draw(base, st, "gares", bbox=bbox, size=(520, 280), crs="EPSG:4326")
    row, col = pixel(2.0, 48.0, bbox, (520, 280))
    assert (image[row - 10:row + 10, col - 5:col + 60, 3] > 0).sum() > 30  # text to the right of the point
    assert (image[220:, 300:, 3] == 0).all()  # south-east of every point: no label


def test_default_style_and_reprojection(base) -> None:
    to_3857 = Transformer.from_crs("EPSG:2154", "EPSG:3857", always_xy=True)
    west, south = to_3857.transform(BBOX[0], BBOX[1])
    east, north = to_3857.transform(BBOX[2], BBOX[3])
    bbox = (west, south, east, north)
    image = draw(base, None, bbox=bbox, crs="EPSG:3857")
    x, y = to_3857.transform(*centre(6))
    r, g, b, a = at(image, x, y, bbox)
    assert a > 0 and b > r and b > g  # the platform's default blue


def test_unknown_attribute_refused_at_render(base) -> None:
    with pytest.raises(sld.StyleError, match="insee_dep"):
        draw(base, style(f"<Rule>{equal('insee_dep', '75')}{fill('#ff0000')}</Rule>"))


# --- one symbolizer or filter kind a test, on a base drawn 1 unit = 1 pixel -------------------------------
#
# `pixels.gpkg` (EPSG:2154, coordinates 0..512 x 0..256, drawn over PX_BBOX at 512x256: x is the
# column, 256 - y the row): `zones` 10 squares (codes 0..4 below, 5..9 above), `lines`, `sites`
# 8 points, `twins` 2 points at one place.

PX_BBOX = (0.0, 0.0, 512.0, 256.0)
RED = (255, 0, 0, 255)


def zone_centre(code: int) -> tuple[float, float]:
    return 60 + 100 * (code % 5), 60 if code < 5 else 180


@pytest.fixture(scope="module")
def pixels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GeoPackageBase]:
    import shapely
    from pyogrio.raw import write

    path = tmp_path_factory.mktemp("px") / "pixels.gpkg"

    def layer(name: str, geoms: list, fields: dict, kind: str, append: bool = True) -> None:
        write(path, np.array(shapely.to_wkb(geoms), dtype=object),
              [np.array(v, dtype=object if isinstance(v[0], str) or None in v else np.int64) for v in fields.values()],
              list(fields), layer=name, driver="GPKG", geometry_type=kind, crs="EPSG:2154", append=append)

    zones = [shapely.box(20 + 100 * (c % 5), 20 if c < 5 else 140, 100 + 100 * (c % 5), 100 if c < 5 else 220)
             for c in range(10)]
    layer("zones", zones, {"name": [f"low-{c}" if c < 5 else f"up-{c - 5}" for c in range(10)],
                           "code": list(range(10)),
                           "label": [None if c in (3, 7) else f"L{c}" for c in range(10)]}, "Polygon", append=False)
    lines = [shapely.LineString([(50, 200), (450, 200)]), shapely.LineString([(300, 20), (350, 120), (400, 20)]),
             shapely.LineString([(40, 80), (260, 80)])]
    layer("lines", lines, {"name": ["straight", "vee", "Rue de la Paix"]}, "LineString")
    sites = [shapely.Point(64 + 128 * i, 64 + 128 * j) for j in range(2) for i in range(4)]
    layer("sites", sites, {"name": [f"s{k}" for k in range(8)]}, "Point")
    layer("twins", [shapely.Point(256, 128), shapely.Point(256, 128)], {"name": ["AAAA", "BBBB"]}, "Point")
    return path, GeoPackageBase(path)


def px(image: np.ndarray, x: float, y: float) -> tuple[int, ...]:
    return tuple(int(v) for v in image[int(256 - y), int(x)])


def paint(pixels, relation: str, rules: str, **kw: object) -> np.ndarray:
    return draw(pixels, style(rules, relation), relation, bbox=PX_BBOX, size=(512, 256), **kw)


def red_codes(image: np.ndarray) -> set[int]:
    out = set()
    for code in range(10):
        value = px(image, *zone_centre(code))
        assert value in (RED, (0, 0, 0, 0)), value
        if value == RED:
            out.add(code)
    return out


def ogc(body: str) -> str:
    return f'<ogc:Filter xmlns:gml="http://www.opengis.net/gml">{body}</ogc:Filter>'


def prop(name: str) -> str:
    return f"<ogc:PropertyName>{name}</ogc:PropertyName>"


def lit(value: object) -> str:
    return f"<ogc:Literal>{value}</ogc:Literal>"


def code_is(op: str, value: int) -> str:
    return f"<ogc:{op}>{prop('code')}{lit(value)}</ogc:{op}>"


GML_POINT = "<gml:Point><gml:coordinates>{},{}</gml:coordinates></gml:Point>"


@pytest.mark.parametrize(("body", "codes"), [
    (code_is("PropertyIsNotEqualTo", 0), set(range(1, 10))),
    (code_is("PropertyIsLessThan", 3), {0, 1, 2}),
    (code_is("PropertyIsLessThanOrEqualTo", 3), {0, 1, 2, 3}),
    (code_is("PropertyIsGreaterThan", 7), {8, 9}),
    (code_is("PropertyIsGreaterThanOrEqualTo", 8), {8, 9}),
    (f'<ogc:PropertyIsLike wildCard="%" singleChar="_" escape="\\">{prop("name")}{lit("up-%")}</ogc:PropertyIsLike>',
     {5, 6, 7, 8, 9}),
    (f'<ogc:PropertyIsLike wildCard="*" singleChar="?" escape="!">{prop("name")}{lit("low-?")}</ogc:PropertyIsLike>',
     {0, 1, 2, 3, 4}),
    (f"<ogc:PropertyIsNull>{prop('label')}</ogc:PropertyIsNull>", {3, 7}),
    (f"<ogc:PropertyIsBetween>{prop('code')}<ogc:LowerBoundary>{lit(2)}</ogc:LowerBoundary>"
     f"<ogc:UpperBoundary>{lit(4)}</ogc:UpperBoundary></ogc:PropertyIsBetween>", {2, 3, 4}),
    (f"<ogc:Or>{code_is('PropertyIsEqualTo', 1)}{code_is('PropertyIsEqualTo', 6)}</ogc:Or>", {1, 6}),
    (f"<ogc:Not>{code_is('PropertyIsLessThan', 5)}</ogc:Not>", {5, 6, 7, 8, 9}),
    (f"<ogc:And>{code_is('PropertyIsGreaterThanOrEqualTo', 2)}<ogc:PropertyIsLike wildCard='%' singleChar='_' "
     f"escape='\\'>{prop('name')}{lit('low%')}</ogc:PropertyIsLike></ogc:And>", {2, 3, 4}),
    # spatial: evaluated by the base, drawn as fid tests
    (f"<ogc:BBOX>{prop('geom')}<gml:Box><gml:coordinates>0,0 250,120</gml:coordinates></gml:Box></ogc:BBOX>",
     {0, 1, 2}),
    (f"<ogc:BBOX>{prop('geom')}<gml:Envelope srsName='EPSG:2154'><gml:lowerCorner>0 130</gml:lowerCorner>"
     f"<gml:upperCorner>150 250</gml:upperCorner></gml:Envelope></ogc:BBOX>", {5, 6}),
    (f"<ogc:Intersects>{prop('geom')}{GML_POINT.format(160, 180)}</ogc:Intersects>", {6}),
    (f"<ogc:Within>{prop('geom')}<gml:Polygon><gml:outerBoundaryIs><gml:LinearRing><gml:coordinates>"
     "0,0 210,0 210,230 0,230 0,0</gml:coordinates></gml:LinearRing></gml:outerBoundaryIs></gml:Polygon>"
     "</ogc:Within>", {0, 1, 5, 6}),
    (f"<ogc:DWithin>{prop('geom')}{GML_POINT.format(250, 60)}<ogc:Distance units='m'>55</ogc:Distance>"
     "</ogc:DWithin>", {1, 2}),
    (f"<ogc:Beyond>{prop('geom')}{GML_POINT.format(250, 60)}<ogc:Distance units='m'>55</ogc:Distance>"
     "</ogc:Beyond>", {0, 3, 4, 5, 6, 7, 8, 9}),
    (f"<ogc:And><ogc:Disjoint>{prop('geom')}{GML_POINT.format(60, 60)}</ogc:Disjoint>"
     f"{code_is('PropertyIsLessThan', 2)}</ogc:And>", {1}),
])
def test_filter_kinds_select_their_features(pixels, body: str, codes: set[int]) -> None:
    image = paint(pixels, "zones", f"<Rule>{ogc(body)}{fill('#ff0000')}</Rule>")
    assert red_codes(image) == codes


def test_spatial_filter_on_an_unknown_column_is_refused(pixels) -> None:
    body = f"<ogc:Intersects>{prop('the_geom')}{GML_POINT.format(160, 180)}</ogc:Intersects>"
    with pytest.raises(sld.StyleError, match="the_geom"):
        paint(pixels, "zones", f"<Rule>{ogc(body)}{fill('#ff0000')}</Rule>")


def test_else_filter_takes_what_no_rule_took(pixels) -> None:
    image = paint(pixels, "zones", f"<Rule>{ogc(code_is('PropertyIsLessThan', 3))}{fill('#ff0000')}</Rule>"
                                   f"<Rule><ElseFilter/>{fill('#0000ff')}</Rule>")
    assert [px(image, *zone_centre(c)) for c in (0, 2, 3, 9)] == [RED, RED, (0, 0, 255, 255), (0, 0, 255, 255)]


@pytest.mark.parametrize(("element", "threshold", "drawn"), [
    # 512 m over 512 px: 1 m a pixel, a 0.28 mm pixel: 1 / 0.00028 = 3571.43
    ("MaxScaleDenominator", 3600, True), ("MaxScaleDenominator", 3550, False),
    ("MinScaleDenominator", 3550, True), ("MinScaleDenominator", 3600, False),
])
def test_scale_denominator_is_ogc_0_28_mm_pixel(pixels, element: str, threshold: float, drawn: bool) -> None:
    image = paint(pixels, "zones", f"<Rule><{element}>{threshold}</{element}>{fill('#ff0000')}</Rule>")
    assert red_codes(image) == (set(range(10)) if drawn else set())


@pytest.mark.parametrize(("threshold", "drawn"), [(1.01, True), (0.99, False)])
def test_scale_denominator_in_degrees(base, threshold: float, drawn: bool) -> None:
    """In a geographic CRS a degree is 2π·6378137/360 m (OGC WMS 1.3 §7.2.4.6.9)."""
    bbox = (1.9, 47.9, 3.2, 48.6)  # 0.0025° a pixel at 520x280
    denominator = 0.0025 * 2 * math.pi * 6378137 / 360 / 0.00028
    st = style(f'<Rule><MaxScaleDenominator>{denominator * threshold}</MaxScaleDenominator><PointSymbolizer>'
               '<Graphic><Mark><Fill><CssParameter name="fill">#ff00ff</CssParameter></Fill></Mark><Size>9</Size>'
               '</Graphic></PointSymbolizer></Rule>', "gares")
    image = draw(base, st, "gares", bbox=bbox, size=(520, 280), crs="EPSG:4326")
    assert (at(image, 2.0, 48.0, bbox) == (255, 0, 255, 255)) is drawn


def mark(name: str, size: int = 40, extra: str = "") -> str:
    return (f'<Rule><PointSymbolizer><Graphic><Mark><WellKnownName>{name}</WellKnownName><Fill>'
            f'<CssParameter name="fill">#ff00ff</CssParameter></Fill></Mark><Size>{size}</Size>{extra}</Graphic>'
            '</PointSymbolizer></Rule>')


@pytest.mark.parametrize(("name", "filled", "empty"), [
    # offsets from the point (x right, y up) of a 40 px mark
    ("square", [(0, 0), (17, 17), (-17, -17)], [(23, 0)]),
    ("circle", [(0, 0), (18, 0), (0, -18)], [(17, 17), (-17, -17)]),
    ("triangle", [(0, 0), (-17, -17), (17, -17)], [(-17, 17), (17, 17)]),
    ("star", [(0, 0), (0, 14)], [(-17, 17), (17, 17), (0, -17)]),
    ("cross", [(0, 0), (17, 0), (0, -17)], [(-17, 17), (17, -17)]),
    ("x", [(0, 0), (15, 15), (-15, -15)], [(0, 17), (17, 0)]),
])
def test_well_known_marks_have_their_shape(pixels, name: str, filled: list, empty: list) -> None:
    image = paint(pixels, "sites", mark(name))
    for dx, dy in filled:
        assert px(image, 64 + dx, 64 + dy) == (255, 0, 255, 255), (name, dx, dy)
    for dx, dy in empty:
        assert px(image, 64 + dx, 64 + dy)[3] == 0, (name, dx, dy)
    assert px(image, 128, 128)[3] == 0


def test_graphic_opacity(pixels) -> None:
    image = paint(pixels, "sites", mark("square", extra="<Opacity>0.5</Opacity>"))
    assert 120 <= px(image, 64, 64)[3] <= 136


def pin(directory: Path) -> Path:
    from PIL import Image

    path = directory / "pin.png"
    Image.new("RGBA", (16, 16), (0, 128, 255, 255)).save(path)
    return path


def external(href: str, size: int = 16) -> str:
    return ('<ExternalGraphic xmlns:xlink="http://www.w3.org/1999/xlink"><OnlineResource xlink:type="simple" '
            f'xlink:href="{href}"/><Format>image/png</Format></ExternalGraphic><Size>{size}</Size>')


def styled(rules: str, layer: str, resolve) -> sld.Style:
    return sld.parse(f"""<StyledLayerDescriptor version="1.0.0" xmlns="http://www.opengis.net/sld"
      xmlns:ogc="http://www.opengis.net/ogc"><NamedLayer><Name>{layer}</Name><UserStyle><FeatureTypeStyle>
      {rules}</FeatureTypeStyle></UserStyle></NamedLayer></StyledLayerDescriptor>""".encode(), resolve)


def test_external_graphic_from_the_styles_files(pixels, tmp_path: Path) -> None:
    pin(tmp_path)
    st = styled(f"<Rule><PointSymbolizer><Graphic>{external('pin.png')}</Graphic></PointSymbolizer></Rule>", "sites",
                sld.local_resolver(tmp_path))
    path, gpkg = pixels
    image = render(path, [VectorLayer(gpkg.relation("sites"), st)], PX_BBOX, "EPSG:2154", 512, 256)  # type: ignore[arg-type]
    assert px(image, 64, 64) == (0, 128, 255, 255) and px(image, 64 + 6, 64 - 6) == (0, 128, 255, 255)
    assert px(image, 64 + 12, 64)[3] == 0


@pytest.mark.parametrize("href", ["http://example.com/pin.png", "https://x/pin.png", "../pin.png", "/etc/passwd",
                                  "missing.png", "file:///etc/passwd"])
def test_external_graphic_never_leaves_the_styles_files(tmp_path: Path, href: str) -> None:
    (tmp_path / "statics").mkdir()
    pin(tmp_path)  # outside the statics directory
    with pytest.raises(sld.StyleError, match="ExternalGraphic"):
        styled(f"<Rule><PointSymbolizer><Graphic>{external(href)}</Graphic></PointSymbolizer></Rule>", "sites",
               sld.local_resolver(tmp_path / "statics"))


def test_external_graphic_by_static_name(tmp_path: Path) -> None:
    pin(tmp_path)
    resolve = sld.local_resolver(tmp_path, {"mon-picto": "pin.png"})
    assert resolve("mon-picto") == str((tmp_path / "pin.png").resolve())


def named(value: str) -> str:
    return ogc(f"<ogc:PropertyIsEqualTo>{prop('name')}{lit(value)}</ogc:PropertyIsEqualTo>")


def line(params: str, name: str = "straight", extra: str = "") -> str:
    return (f"<Rule>{named(name)}<LineSymbolizer><Stroke>{params}</Stroke>{extra}</LineSymbolizer></Rule>")


def css(**values: object) -> str:
    return "".join(f'<CssParameter name="{k.replace("_", "-")}">{v}</CssParameter>' for k, v in values.items())


def test_line_stroke_colour_and_width(pixels) -> None:
    image = paint(pixels, "lines", line(css(stroke="#0000ff", stroke_width=8)))
    assert px(image, 250, 200) == (0, 0, 255, 255) and px(image, 250, 203) == (0, 0, 255, 255)
    assert px(image, 250, 207)[3] == 0 and px(image, 250, 193)[3] == 0
    assert px(image, 350, 100)[3] == 0  # the other lines are not selected


def test_line_dasharray(pixels) -> None:
    solid = paint(pixels, "lines", line(css(stroke="#0000ff", stroke_width=4)))
    dashed = paint(pixels, "lines", line(css(stroke="#0000ff", stroke_width=4, stroke_dasharray="10 10")))
    row = int(256 - 200)
    assert (solid[row, 60:440, 3] == 255).all()
    drawn = dashed[row, 60:440, 3] > 128
    assert 0.4 < drawn.mean() < 0.6  # half dashes, half gaps
    runs = np.flatnonzero(np.diff(drawn.astype(int)))  # dash ends: every ~10 px
    assert len(runs) > 30 and 8 <= np.median(np.diff(runs)) <= 12


@pytest.mark.parametrize(("cap", "beyond"), [("butt", False), ("round", True), ("square", True)])
def test_line_linecap(pixels, cap: str, beyond: bool) -> None:
    image = paint(pixels, "lines", line(css(stroke="#0000ff", stroke_width=10, stroke_linecap=cap)))
    assert (px(image, 453, 200)[3] > 0) is beyond
    assert px(image, 447, 200) == (0, 0, 255, 255)


@pytest.mark.parametrize(("join", "spike"), [("miter", True), ("round", False), ("bevel", False)])
def test_line_linejoin(pixels, join: str, spike: bool) -> None:
    image = paint(pixels, "lines", line(css(stroke="#0000ff", stroke_width=10, stroke_linejoin=join), "vee"))
    assert px(image, 350, 122) == (0, 0, 255, 255)  # every join covers the vertex
    assert (px(image, 350, 130)[3] > 0) is spike  # a miter goes 15.8 px beyond it, a round join 5


def test_line_perpendicular_offset(pixels) -> None:
    image = paint(pixels, "lines", line(css(stroke="#0000ff", stroke_width=2), extra=(
        "<PerpendicularOffset>10</PerpendicularOffset>")))
    assert px(image, 250, 210)[2] == 255 and px(image, 250, 210)[3] > 128  # left of a line drawn eastwards
    assert px(image, 250, 200)[3] == 0 and px(image, 250, 190)[3] == 0


def test_antialiased_edges(pixels) -> None:
    image = paint(pixels, "lines", line(css(stroke="#0000ff", stroke_width=3), "vee"))
    alpha = image[..., 3]
    assert ((alpha > 0) & (alpha < 255)).sum() > 50  # partly covered pixels along the slanted arms


def test_polygon_fill_and_stroke_opacity(pixels) -> None:
    image = paint(pixels, "zones", '<Rule><PolygonSymbolizer><Fill>' + css(fill="#ff0000", fill_opacity=0.5) +
                  '</Fill><Stroke>' + css(stroke="#0000ff", stroke_width=4, stroke_opacity=0.25) +
                  '</Stroke></PolygonSymbolizer></Rule>')
    r, g, b, a = px(image, 60, 60)
    assert (r, g, b) == (255, 0, 0) and 120 <= a <= 136
    _, _, b, a = px(image, 60, 99)  # on the top edge, outside half: the stroke alone
    edge = px(image, 60, 101)
    assert edge[2] == 255 and 56 <= edge[3] <= 72


def test_polygon_graphic_fill(pixels) -> None:
    image = paint(pixels, "zones", '<Rule><PolygonSymbolizer><Fill><GraphicFill><Graphic><Mark>'
                  '<WellKnownName>circle</WellKnownName><Fill>' + css(fill="#00aa00") +
                  '</Fill></Mark><Size>8</Size></Graphic></GraphicFill></Fill></PolygonSymbolizer></Rule>')
    inside = image[256 - 95:256 - 25, 25:95]
    green = (inside[..., 1] == 170) & (inside[..., 3] == 255)
    assert 0.3 < green.mean() < 0.9  # dots and gaps
    assert (inside[..., 3] == 0).any()
    assert (image[256 - 130:256 - 110, :, 3] == 0).all()  # between the rows of zones: nothing


def test_polygon_graphic_fill_with_an_external_image(pixels, tmp_path: Path) -> None:
    pin(tmp_path)
    st = styled(f"<Rule><PolygonSymbolizer><Fill><GraphicFill><Graphic>{external('pin.png')}</Graphic></GraphicFill>"
                "</Fill></PolygonSymbolizer></Rule>", "zones", sld.local_resolver(tmp_path))
    path, gpkg = pixels
    image = render(path, [VectorLayer(gpkg.relation("zones"), st)], PX_BBOX, "EPSG:2154", 512, 256)  # type: ignore[arg-type]
    assert px(image, 60, 60) == (0, 128, 255, 255) and px(image, 110, 60)[3] == 0


def label(extra: str = "", font: int = 14, halo: str = "") -> str:
    return (f"<TextSymbolizer><Label>{prop('name')}</Label><Font>{css(font_size=font)}</Font>{extra}{halo}"
            f"<Fill>{css(fill='#000000')}</Fill></TextSymbolizer>")


def one_site(symbolizer: str, name: str = "s0") -> str:
    return f"<Rule>{named(name)}{symbolizer}</Rule>"


def ink(image: np.ndarray) -> tuple[float, float]:
    """Centre (x, y map units) of the drawn pixels."""
    rows, cols = np.nonzero(image[..., 3])
    return float(cols.mean()), float(256 - rows.mean())


def test_label_with_halo(pixels) -> None:
    image = paint(pixels, "sites", one_site(label(halo=f"<Halo><Radius>2</Radius><Fill>{css(fill='#00ff00')}</Fill>"
                                                       "</Halo>")))
    window = image[256 - 64 - 15:256 - 64 + 15, 40:140]
    black = (window[..., :3].max(axis=2) < 40) & (window[..., 3] == 255)
    green = (window[..., 1] == 255) & (window[..., 0] == 0) & (window[..., 3] == 255)
    assert black.sum() > 20 and green.sum() > 20
    assert (image[..., 3] > 0).sum() == (window[..., 3] > 0).sum()  # nothing elsewhere


def test_label_anchor_and_displacement(pixels) -> None:
    def placement(ax: float, dx: float) -> str:
        return (f"<LabelPlacement><PointPlacement><AnchorPoint><AnchorPointX>{ax}</AnchorPointX><AnchorPointY>0.5"
                f"</AnchorPointY></AnchorPoint><Displacement><DisplacementX>{dx}</DisplacementX><DisplacementY>30"
                "</DisplacementY></Displacement></PointPlacement></LabelPlacement>")

    x0, y0 = ink(paint(pixels, "sites", one_site(label(placement(0, 0)), "s5")))  # s5 at (192, 192)
    x1, _ = ink(paint(pixels, "sites", one_site(label(placement(1, 0)), "s5")))
    x2, _ = ink(paint(pixels, "sites", one_site(label(placement(0, 100)), "s5")))
    assert x0 > 192 > x1  # anchored at its start: right of the point; at its end: left of it
    assert abs(x2 - x0 - 100) < 2
    assert abs(y0 - 222) < 4  # 30 px up


def test_label_along_a_line(pixels) -> None:
    rule = f"<Rule>{named('Rue de la Paix')}{label('<LabelPlacement><LinePlacement/></LabelPlacement>')}</Rule>"
    image = paint(pixels, "lines", rule)
    rows, cols = np.nonzero(image[..., 3])
    assert len(rows) > 50
    assert (abs((256 - rows) - 80) < 14).all()  # on the line
    assert cols.min() >= 38 and cols.max() <= 262 and cols.max() - cols.min() > 60


def test_labels_avoid_each_other(pixels) -> None:
    both = paint(pixels, "twins", f"<Rule>{label()}</Rule>")
    first = paint(pixels, "twins", one_site(label(), "AAAA"))
    second = paint(pixels, "twins", one_site(label(), "BBBB"))
    assert not np.array_equal(first, second)
    assert np.array_equal(both, first) or np.array_equal(both, second)


def test_transparent_or_bgcolor(pixels) -> None:
    rules = f"<Rule>{fill('#ff0000')}</Rule>"
    clear = paint(pixels, "zones", rules)
    opaque = paint(pixels, "zones", rules, transparent=False, bgcolor="#123456")
    assert px(clear, 110, 60) == (0, 0, 0, 0) and px(opaque, 110, 60) == (0x12, 0x34, 0x56, 255)
    assert px(clear, 60, 60) == RED == px(opaque, 60, 60)


def test_renders_from_threads_share_pooled_maps(pixels) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tileserver.render import vector_map

    rules = f"<Rule>{fill('#ff0000')}{label()}</Rule>"
    expected = paint(pixels, "zones", rules)
    loads = vector_map._POOL.loads
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(lambda _: paint(pixels, "zones", rules), range(16)))
    assert all(np.array_equal(image, expected) for image in images)
    assert vector_map._POOL.loads - loads <= 4  # at most one map a thread, reused afterwards
    small = draw(pixels, style(rules, "zones"), "zones", bbox=PX_BBOX, size=(256, 128))  # the same map, resized
    assert small.shape == (128, 256, 4) and tuple(small[128 - 30, 30]) == RED


def test_a_replaced_base_is_not_drawn_from_a_stale_map(tmp_path: Path) -> None:
    import shutil

    import shapely
    from pyogrio.raw import write

    def base_with(x: float) -> Path:
        path = tmp_path / f"b{x}.gpkg"
        write(path, np.array(shapely.to_wkb([shapely.box(x, 10, x + 50, 60)]), dtype=object), [np.array([1])], ["v"],
              layer="t", driver="GPKG", geometry_type="Polygon", crs="EPSG:2154")
        return path

    live = tmp_path / "live.gpkg"
    shutil.copy(base_with(10), live)
    st = style(f"<Rule>{fill('#ff0000')}</Rule>", "t")
    layer = [VectorLayer(GeoPackageBase(live).relation("t"), st)]  # type: ignore[arg-type]
    before = render(live, layer, PX_BBOX, "EPSG:2154", 512, 256)
    base_with(200).replace(live)
    after = render(live, layer, PX_BBOX, "EPSG:2154", 512, 256)
    assert px(before, 30, 30) == RED and px(before, 220, 30)[3] == 0
    assert px(after, 220, 30) == RED and px(after, 30, 30)[3] == 0


def test_labels_are_drawn_above_every_shape(pixels) -> None:
    """SLD draws labels on top: not covered by the shapes of features drawn later, nor by the
    shapes of a layer above."""
    image = paint(pixels, "zones", f"<Rule>{fill('#ff0000')}{label(font=30)}</Rule>")
    inside_next = image[256 - 75:256 - 45, 121:135]  # zone 0's label runs into zone 1
    assert ((inside_next[..., :3].max(axis=2) < 60) & (inside_next[..., 3] == 255)).sum() > 5
    path, gpkg = pixels
    zones = VectorLayer(gpkg.relation("zones"), style(f"<Rule>{fill('#ff0000')}</Rule>", "zones"))  # type: ignore[arg-type]
    sites = VectorLayer(gpkg.relation("sites"), style(f"<Rule>{label()}</Rule>", "sites"))  # type: ignore[arg-type]
    stacked = render(path, [zones, sites], PX_BBOX, "EPSG:2154", 512, 256)  # zones on top of sites
    under = stacked[256 - 75:256 - 55, 66:99]  # s0's label, inside zone 0
    assert ((under[..., :3].max(axis=2) < 60) & (under[..., 3] == 255)).sum() > 10
    assert px(stacked, 30, 30) == RED


def test_a_graphic_that_is_not_a_local_file_is_refused(pixels) -> None:
    point = sld.PointSymbolizer(sld.Graphic(mark=None, href="http://example.com/pin.png"))
    rule = sld.Rule(None, None, None, False, None, None, (point,))
    st = sld.Style("sites", None, None, (sld.FeatureTypeStyle((rule,)),), "1.0.0")
    with pytest.raises(sld.StyleError, match="not a local file"):
        draw(pixels, st, "sites", bbox=PX_BBOX)


def test_polygons_of_a_pixel_or_so_get_no_label(pixels) -> None:
    """A label cannot fit a polygon of a pixel or two (GeoServer's goodnessOfFit drops it too)."""
    rules = f"<Rule>{label(font=10)}</Rule>"
    tiny = draw(pixels, style(rules, "zones"), "zones", bbox=(0.0, 0.0, 51200.0, 25600.0))  # 100 units a pixel
    small = draw(pixels, style(rules, "zones"), "zones", bbox=(0.0, 0.0, 5120.0, 2560.0))  # 10: zones are 8 px
    assert (tiny[..., 3] == 0).all()
    assert (small[..., 3] > 0).sum() > 50


def test_sql_label_layer_keeps_spatial_filters_and_else(pixels) -> None:
    body = f"<ogc:Intersects>{prop('geom')}{GML_POINT.format(160, 180)}</ogc:Intersects>"
    rules = (f"<Rule>{ogc(body)}{fill('#ff0000')}{label(font=10)}</Rule>"
             f"<Rule><ElseFilter/>{fill('#0000ff')}</Rule>")
    image = paint(pixels, "zones", rules)
    assert px(image, *zone_centre(6)) != (0, 0, 255, 255) and px(image, *zone_centre(1)) == (0, 0, 255, 255)
    text = image[256 - 195:256 - 165, 150:200]  # up-1's label at zone 6's centre
    assert ((text[..., :3].max(axis=2) < 60) & (text[..., 3] == 255)).sum() > 10
