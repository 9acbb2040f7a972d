"""Vector maps drawn by mapnik from SLD styles: pixels checked against the bbox→pixel affine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pyproj import Transformer
from vectorutil import make_gpkg

from tileserver.render import sld
from tileserver.render.vector_map import VectorLayer, quote_string, render
from tileserver.vector.geopackage import GeoPackageBase

BBOX = (600000.0, 6800000.0, 610000.0, 6805000.0)  # communes i=0..9; box i: x 600000+1000i .. +800


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GeoPackageBase]:
    path = make_gpkg(tmp_path_factory.mktemp("vr") / "base.gpkg")
    return path, GeoPackageBase(path)


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
