"""SLD reading: the SDK's own style, SE 1.1 as QGIS writes it, used attributes, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pygeofilter import ast

from tileserver.render import sld

SDK_STYLE = next(Path(p) for p in map(str, __import__("sdk_entrepot_gpf").__path__)) / \
    "_data/datasets/1_dataset_vector/CANTON_style.sld"

SE_STYLE = b"""<?xml version="1.0" encoding="UTF-8"?>
<StyledLayerDescriptor xmlns="http://www.opengis.net/sld" xmlns:ogc="http://www.opengis.net/ogc"
  xmlns:se="http://www.opengis.net/se" xmlns:xlink="http://www.w3.org/1999/xlink" version="1.1.0">
  <NamedLayer><se:Name>routes</se:Name>
    <UserStyle><se:Name>routes</se:Name>
      <se:FeatureTypeStyle>
        <se:Rule><se:Name>big</se:Name><se:Description><se:Title>Big roads</se:Title></se:Description>
          <ogc:Filter><ogc:And>
            <ogc:PropertyIsGreaterThan><ogc:PropertyName>lanes</ogc:PropertyName><ogc:Literal>2</ogc:Literal></ogc:PropertyIsGreaterThan>
            <ogc:PropertyIsLike wildCard="%" singleChar="_" escape="\\"><ogc:PropertyName>name</ogc:PropertyName><ogc:Literal>A%</ogc:Literal></ogc:PropertyIsLike>
          </ogc:And></ogc:Filter>
          <se:MaxScaleDenominator>50000</se:MaxScaleDenominator>
          <se:LineSymbolizer><se:Stroke>
            <se:SvgParameter name="stroke">#FF0000</se:SvgParameter>
            <se:SvgParameter name="stroke-width">3</se:SvgParameter>
            <se:SvgParameter name="stroke-dasharray">4 2</se:SvgParameter>
            <se:SvgParameter name="stroke-linecap">round</se:SvgParameter>
          </se:Stroke><se:PerpendicularOffset>2</se:PerpendicularOffset></se:LineSymbolizer>
          <se:TextSymbolizer><se:Label>N <ogc:PropertyName>ref</ogc:PropertyName></se:Label>
            <se:Font><se:SvgParameter name="font-family">Serif</se:SvgParameter><se:SvgParameter name="font-size">12</se:SvgParameter></se:Font>
            <se:LabelPlacement><se:LinePlacement/></se:LabelPlacement>
            <se:Halo><se:Radius>2</se:Radius><se:Fill><se:SvgParameter name="fill">#ffffff</se:SvgParameter></se:Fill></se:Halo>
          </se:TextSymbolizer>
        </se:Rule>
        <se:Rule><se:ElseFilter/>
          <se:PointSymbolizer><se:Graphic><se:ExternalGraphic>
            <se:OnlineResource xlink:type="simple" xlink:href="pin.png"/><se:Format>image/png</se:Format>
          </se:ExternalGraphic><se:Size>12</se:Size></se:Graphic></se:PointSymbolizer>
        </se:Rule>
      </se:FeatureTypeStyle>
    </UserStyle>
  </NamedLayer>
</StyledLayerDescriptor>"""


def test_sdk_canton_style_parses() -> None:
    style = sld.parse(SDK_STYLE.read_bytes())
    assert style.layer_name == "CANTON" and style.version == "1.0.0"
    first = style.rules[0]
    assert first.name == "75"
    assert first.filter == ast.Equal(ast.Attribute("insee_dep"), "75")
    polygon = first.symbolizers[0]
    assert isinstance(polygon, sld.PolygonSymbolizer)
    assert polygon.fill is not None and polygon.fill.color == "#e94a4c"
    assert polygon.stroke is not None and polygon.stroke.linejoin == "bevel" and polygon.stroke.width == 1
    assert sld.used_attributes(style) == ["insee_dep"]
    sld.check_for_table(style, "canton", ["insee_dep", "nom", "geom"])  # the table's name is lower-cased


def test_missing_attribute_is_refused_by_name() -> None:
    style = sld.parse(SDK_STYLE.read_bytes())
    with pytest.raises(sld.StyleError, match="insee_dep") as info:
        sld.check_for_table(style, "canton", ["nom", "geom"])
    assert "lacks" in str(info.value) and "canton" in str(info.value)


def test_named_layer_must_name_the_table() -> None:
    style = sld.parse(SDK_STYLE.read_bytes())
    with pytest.raises(sld.StyleError, match="NamedLayer/Name is 'CANTON'"):
        sld.check_for_table(style, "communes", ["insee_dep"])


def test_se_11_as_qgis_writes_it() -> None:
    resolved: list[str] = []

    def resolve(href: str) -> str:
        resolved.append(href)
        return "/statics/pin.png"

    style = sld.parse(SE_STYLE, resolve)
    assert style.version == "1.1.0" and style.layer_name == "routes"
    big, other = style.rules
    assert big.name == "big" and big.title == "Big roads" and big.max_scale == 50000 and big.min_scale is None
    assert isinstance(big.filter, ast.And)
    line, text = big.symbolizers
    assert isinstance(line, sld.LineSymbolizer)
    assert line.stroke == sld.Stroke("#ff0000", 3, 1, (4, 2), "round", "miter") and line.offset == 2
    assert isinstance(text, sld.TextSymbolizer)
    assert text.label == (("text", "N"), ("attribute", "ref"))
    assert text.placement == "line" and text.halo_radius == 2 and text.font.size == 12
    assert other.else_filter and other.filter is None
    point = other.symbolizers[0]
    assert isinstance(point, sld.PointSymbolizer)
    assert point.graphic.href == "/statics/pin.png" and point.graphic.size == 12 and resolved == ["pin.png"]
    assert sld.used_attributes(style) == ["lanes", "name", "ref"]


def test_external_graphic_without_resolver_is_refused() -> None:
    with pytest.raises(sld.StyleError, match="pin.png"):
        sld.parse(SE_STYLE)


@pytest.mark.parametrize(("document", "message"), [
    (b"<StyledLayerDescriptor", "well-formed"),
    (b"<Foo/>", "not StyledLayerDescriptor"),
    (b'<StyledLayerDescriptor version="1.0.0" xmlns="http://www.opengis.net/sld"/>', "no NamedLayer"),
    (SDK_STYLE.read_bytes().replace(b"#e94a4c", b"red-ish"), "not a colour"),
    (SDK_STYLE.read_bytes().replace(b">bevel<", b">sharp<"), "stroke-linejoin"),
    (SDK_STYLE.read_bytes().replace(b"PropertyIsEqualTo>", b"PropertyIsWeird>"), "Filter cannot be read"),
])
def test_refusals_say_what_is_wrong(document: bytes, message: str) -> None:
    with pytest.raises(sld.StyleError, match=message):
        sld.parse(document)


def test_entities_are_not_resolved(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("#123456")
    document = SDK_STYLE.read_bytes().replace(
        b'<StyledLayerDescriptor', f'<!DOCTYPE x [<!ENTITY s SYSTEM "file://{secret}">]><StyledLayerDescriptor'.encode(), 1
    ).replace(b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>", b"").replace(b"#e94a4c", b"&s;")
    with pytest.raises(sld.StyleError):
        style = sld.parse(document)
        assert "#123456" not in repr(style)
        raise sld.StyleError("entity left unresolved")


def _rule_filter(body: str) -> object:
    style = sld.parse(f"""<StyledLayerDescriptor version="1.0.0" xmlns="http://www.opengis.net/sld"
      xmlns:ogc="http://www.opengis.net/ogc" xmlns:gml="http://www.opengis.net/gml"><NamedLayer><Name>t</Name>
      <UserStyle><FeatureTypeStyle><Rule><ogc:Filter>{body}</ogc:Filter><PointSymbolizer/></Rule>
      </FeatureTypeStyle></UserStyle></NamedLayer></StyledLayerDescriptor>""".encode())
    return style.rules[0].filter


def test_gml2_geometries_and_filter_1_0_spellings() -> None:
    """SLD 1.0 styles (GeoServer's, the platform's) write GML 2 and Filter Encoding 1.0."""
    box = _rule_filter("<ogc:BBOX><ogc:PropertyName>geom</ogc:PropertyName><gml:Box><gml:coordinates>1,2 3,4"
                       "</gml:coordinates></gml:Box></ogc:BBOX>")
    assert isinstance(box, ast.Not) and isinstance(box.sub_node, ast.GeometryDisjoint)  # pygeofilter's BBOX
    polygon = _rule_filter("<ogc:Within><ogc:PropertyName>geom</ogc:PropertyName><gml:Polygon><gml:outerBoundaryIs>"
                           "<gml:LinearRing><gml:coordinates decimal=',' cs=';' ts=' '>0,5;0 10;0 10;10 0;0"
                           "</gml:coordinates></gml:LinearRing></gml:outerBoundaryIs></gml:Polygon></ogc:Within>")
    assert isinstance(polygon, ast.GeometryWithin)
    assert polygon.rhs.geometry["coordinates"] == [[(0.5, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 0.0)]]
    near = _rule_filter("<ogc:DWithin><ogc:PropertyName>geom</ogc:PropertyName><gml:Point><gml:coordinates>10,20"
                        "</gml:coordinates></gml:Point><ogc:Distance units='m'>5</ogc:Distance></ogc:DWithin>")
    assert isinstance(near, ast.DistanceWithin) and near.distance == 5 and near.rhs.geometry["coordinates"] == (10, 20)
    point = _rule_filter("<ogc:Intersects><ogc:PropertyName>geom</ogc:PropertyName><gml:Point><gml:coord><gml:X>1"
                         "</gml:X><gml:Y>2</gml:Y></gml:coord></gml:Point></ogc:Intersects>")
    assert isinstance(point, ast.GeometryIntersects) and point.rhs.geometry["coordinates"] == (1, 2)
