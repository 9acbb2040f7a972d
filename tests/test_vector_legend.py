"""GetLegendGraphic of a vector style: a swatch of each rule's look, with its title."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tileserver.render import sld
from tileserver.render.vector_legend import draw_legend, legend_rules
from tileserver.render.vector_map import default_style
from tileserver.vector.base import Relation

SDK_STYLE = next(Path(p) for p in map(str, __import__("sdk_entrepot_gpf").__path__)) / \
    "_data/datasets/1_dataset_vector/CANTON_style.sld"

STYLE = b"""<StyledLayerDescriptor version="1.0.0" xmlns="http://www.opengis.net/sld"
  xmlns:ogc="http://www.opengis.net/ogc"><NamedLayer><Name>t</Name><UserStyle><FeatureTypeStyle>
  <Rule><Name>red</Name><Title>Zones rouges</Title><MaxScaleDenominator>50000</MaxScaleDenominator>
    <PolygonSymbolizer><Fill><CssParameter name="fill">#ff0000</CssParameter></Fill></PolygonSymbolizer></Rule>
  <Rule><Name>road</Name><LineSymbolizer><Stroke><CssParameter name="stroke">#0000ff</CssParameter>
    <CssParameter name="stroke-width">4</CssParameter></Stroke></LineSymbolizer></Rule>
  <Rule><Title>Sites</Title><PointSymbolizer><Graphic><Mark><WellKnownName>circle</WellKnownName><Fill>
    <CssParameter name="fill">#00ff00</CssParameter></Fill></Mark><Size>10</Size></Graphic></PointSymbolizer></Rule>
  <Rule><Title>Labels only</Title><TextSymbolizer><Label><ogc:PropertyName>nom</ogc:PropertyName></Label>
    </TextSymbolizer></Rule>
</FeatureTypeStyle></UserStyle></NamedLayer></StyledLayerDescriptor>"""


def rows(image: np.ndarray, count: int) -> list[np.ndarray]:
    """The swatch (20x20) of each row: rows are max(20, 12 * 1.4) = 20 px high, 2 px apart."""
    return [image[i * 22:i * 22 + 20, :20] for i in range(count)]


def test_a_swatch_of_each_rules_colour_and_its_title() -> None:
    image = draw_legend(sld.parse(STYLE))
    assert image.shape[0] == 4 * 20 + 3 * 2 and image.dtype == np.uint8
    polygon, line, point, text = rows(image, 4)
    assert tuple(polygon[10, 10]) == (255, 0, 0, 255) and (polygon[1:19, 1:19, :3] == (255, 0, 0)).all()
    assert tuple(line[10, 10]) == (0, 0, 255, 255) and line[2, 10, 3] == 0  # a 4 px line across the swatch
    assert tuple(point[10, 10]) == (0, 255, 0, 255) and point[2, 2, 3] == 0
    assert (text[..., 3] == 0).all()  # a text symbolizer has no swatch
    labels = image[:, 26:]
    for index, title in enumerate(["Zones rouges", "road", "Sites", "Labels only"]):
        band = labels[index * 22:index * 22 + 20]
        dark = (band[..., 3] > 128) & (band[..., :3].max(axis=2) < 100)
        assert dark.sum() > 20 * len(title) // 4, title  # black text right of the swatch
    assert image.shape[1] > 26 + 50  # wide enough for "Labels only"


def test_rule_and_scale_select_rows() -> None:
    style = sld.parse(STYLE)
    assert [r.name for r in legend_rules(style, rule="road")] == ["road"]
    assert [r.title for r in legend_rules(style, scale=100000)] == [None, "Sites", "Labels only"]
    only = draw_legend(style, rule="road", labels=False)
    assert only.shape == (20, 20, 4) and tuple(only[10, 10]) == (0, 0, 255, 255)
    with pytest.raises(ValueError, match="no rule named 'nope'"):
        draw_legend(style, rule="nope")


def test_opaque_legend_and_other_swatch_size() -> None:
    image = draw_legend(sld.parse(STYLE), width=30, height=24, transparent=False, bgcolor="#ffff00", labels=False)
    assert image.shape == (4 * 24 + 3 * 2, 30, 4)
    assert tuple(image[12, 15]) == (255, 0, 0, 255) and tuple(image[24 + 2 + 1, 15]) == (255, 255, 0, 255)
    assert (image[..., 3] == 255).all()


def test_sdk_style_and_default_style() -> None:
    style = sld.parse(SDK_STYLE.read_bytes())
    image = draw_legend(style)
    for index, one in enumerate(style.rules):
        polygon = one.symbolizers[0]
        assert isinstance(polygon, sld.PolygonSymbolizer) and polygon.fill is not None
        expected = tuple(int(polygon.fill.color[i:i + 2], 16) for i in (1, 3, 5))
        assert tuple(image[index * 22 + 10, 10, :3]) == expected
    relation = Relation("t", "TABLE", "geom", "MultiPolygon", "EPSG:2154", (), ("fid",), None, 0)
    blue = draw_legend(default_style(relation))
    r, g, b, a = (int(v) for v in blue[10, 10])
    assert a > 0 and b > r and b > g
