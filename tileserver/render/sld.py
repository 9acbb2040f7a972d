"""SLD styles (1.0.0 as the platform accepts, SE/SLD 1.1.0 as QGIS writes) read into a small model.

The model holds only what the renderer draws, so that a translation to a map renderer (see
`vector_map`) has one input whatever the SLD version: elements are matched by local name (SLD 1.0
puts `Rule` in the sld namespace, 1.1 in se; `CssParameter` became `SvgParameter`), and filters
become pygeofilter ASTs (pygeofilter's FES parser reads ogc 1.0/1.1 and FES 2.0), the same AST the
vector bases already evaluate. Parsing never resolves entities nor reaches the network; external
graphics are resolved by the caller (a style's statics), never fetched.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree
from pygeofilter import ast
from pygeofilter.parsers.fes import parse as parse_fes

MAX_BYTES = 4 * 1024 * 1024  # a style file is a few kB; refuse a document meant to exhaust memory
WELL_KNOWN_MARKS = ("square", "circle", "triangle", "star", "cross", "x")
LINECAPS = ("butt", "round", "square")
LINEJOINS = ("miter", "mitre", "round", "bevel")


class StyleError(ValueError):
    """A style file the platform refuses; the message says what is wrong, for the producer."""


@dataclass(frozen=True)
class Stroke:
    color: str = "#000000"
    width: float = 1.0
    opacity: float = 1.0
    dasharray: tuple[float, ...] = ()
    linecap: str = "butt"
    linejoin: str = "miter"


@dataclass(frozen=True)
class Graphic:
    """A point graphic: a well-known mark (filled/stroked) or an external image (a local path)."""

    mark: str | None = "square"
    fill: Fill | None = None
    stroke: Stroke | None = None
    href: str | None = None  # resolved by the caller's function; None when the graphic is a mark
    size: float | None = None  # pixels; None: a mark's 6, an image's own size
    rotation: float = 0.0
    opacity: float = 1.0


@dataclass(frozen=True)
class Fill:
    color: str = "#808080"
    opacity: float = 1.0
    graphic: Graphic | None = None  # GraphicFill: a pattern


@dataclass(frozen=True)
class PointSymbolizer:
    graphic: Graphic


@dataclass(frozen=True)
class LineSymbolizer:
    stroke: Stroke
    offset: float = 0.0  # PerpendicularOffset, pixels, positive to the left of the line


@dataclass(frozen=True)
class PolygonSymbolizer:
    fill: Fill | None
    stroke: Stroke | None
    offset: float = 0.0


@dataclass(frozen=True)
class Font:
    family: str = "Sans"
    size: float = 10.0
    style: str = "normal"  # normal | italic | oblique
    weight: str = "normal"  # normal | bold


@dataclass(frozen=True)
class TextSymbolizer:
    label: tuple[tuple[str, str], ...]  # ("text", literal) or ("attribute", name), concatenated
    font: Font = field(default_factory=Font)
    fill: Fill = field(default_factory=lambda: Fill("#000000"))
    halo_radius: float = 0.0
    halo_fill: Fill | None = None
    placement: str = "point"  # point | line
    anchor: tuple[float, float] = (0.0, 0.5)
    displacement: tuple[float, float] = (0.0, 0.0)
    rotation: float = 0.0
    offset: float = 0.0  # line placement: PerpendicularOffset


Symbolizer = PointSymbolizer | LineSymbolizer | PolygonSymbolizer | TextSymbolizer


@dataclass(frozen=True)
class Rule:
    name: str | None
    title: str | None
    filter: ast.Node | None  # None: every feature (or the else rule)
    else_filter: bool
    min_scale: float | None
    max_scale: float | None
    symbolizers: tuple[Symbolizer, ...]


@dataclass(frozen=True)
class FeatureTypeStyle:
    """Rules drawn together; an ElseFilter rule applies to features no other rule here selected."""

    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Style:
    layer_name: str | None  # NamedLayer/Name: the table the style is meant for
    name: str | None
    title: str | None
    feature_type_styles: tuple[FeatureTypeStyle, ...]
    version: str

    @property
    def rules(self) -> list[Rule]:
        return [rule for fts in self.feature_type_styles for rule in fts.rules]


def _local(element: Any) -> str:
    return etree.QName(element).localname if isinstance(element.tag, str) else ""


def _children(element: Any, name: str) -> Iterator[Any]:
    return (child for child in element if _local(child) == name)


def _child(element: Any, name: str) -> Any:
    return next(_children(element, name), None)


def _text(element: Any, name: str) -> str | None:
    child = _child(element, name)
    if child is None or child.text is None:
        return None
    return child.text.strip() or None


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise StyleError(f"{what} must be a number, not {text!r}") from None


def _parameters(element: Any) -> dict[str, str]:
    """CssParameter (SLD 1.0) / SvgParameter (SE 1.1) values; a parameter holding an expression
    (ogc:Literal) keeps its text."""
    out: dict[str, str] = {}
    for child in element:
        if _local(child) in ("CssParameter", "SvgParameter"):
            value = "".join(child.itertext()).strip()
            if value:
                out[child.get("name", "")] = value
    return out


def color(value: str, what: str) -> str:
    """A #rrggbb (or #rgb) colour, lower case, or a StyleError naming `what`."""
    if len(value) in (4, 7) and value.startswith("#") and all(c in "0123456789abcdefABCDEF" for c in value[1:]):
        return value.lower()
    raise StyleError(f"{what}: {value!r} is not a colour (#rrggbb)")


def _opacity(value: str | None, what: str) -> float:
    if value is None:
        return 1.0
    number = _number(value, what)
    if not 0 <= number <= 1:
        raise StyleError(f"{what} must lie between 0 and 1, not {value}")
    return number


def _expression_number(element: Any, name: str, default: float) -> float:
    child = _child(element, name)
    if child is None:
        return default
    text = "".join(child.itertext()).strip()
    return _number(text, name) if text else default


class _Reader:
    def __init__(self, resolve: Callable[[str], str] | None) -> None:
        self.resolve = resolve

    def stroke(self, element: Any | None) -> Stroke | None:
        if element is None:
            return None
        params = _parameters(element)
        dasharray: tuple[float, ...] = ()
        if "stroke-dasharray" in params:
            dasharray = tuple(_number(part, "stroke-dasharray")
                              for part in params["stroke-dasharray"].replace(",", " ").split())
            if any(part < 0 for part in dasharray) or (dasharray and not any(dasharray)):
                raise StyleError(f"stroke-dasharray {params['stroke-dasharray']!r} is not a dash pattern")
        linecap = params.get("stroke-linecap", "butt")
        linejoin = params.get("stroke-linejoin", "miter")
        if linecap not in LINECAPS:
            raise StyleError(f"stroke-linecap {linecap!r} is not one of {', '.join(LINECAPS)}")
        if linejoin not in LINEJOINS:
            raise StyleError(f"stroke-linejoin {linejoin!r} is not one of {', '.join(LINEJOINS)}")
        width = _number(params.get("stroke-width", "1"), "stroke-width")
        if width < 0:
            raise StyleError(f"stroke-width must not be negative, not {width}")
        return Stroke(
            color=color(params.get("stroke", "#000000"), "stroke"), width=width,
            opacity=_opacity(params.get("stroke-opacity"), "stroke-opacity"), dasharray=dasharray,
            linecap=linecap, linejoin="miter" if linejoin == "mitre" else linejoin,
        )

    def fill(self, element: Any | None, default: str = "#808080") -> Fill | None:
        if element is None:
            return None
        params = _parameters(element)
        graphic_fill = _child(element, "GraphicFill")
        graphic = self.graphic(_child(graphic_fill, "Graphic")) if graphic_fill is not None else None
        return Fill(color=color(params.get("fill", default), "fill"),
                    opacity=_opacity(params.get("fill-opacity"), "fill-opacity"), graphic=graphic)

    def graphic(self, element: Any | None) -> Graphic:
        if element is None:
            return Graphic()
        size_element = _child(element, "Size")
        size = None if size_element is None else _expression_number(element, "Size", 6.0)
        rotation = _expression_number(element, "Rotation", 0.0)
        opacity = _opacity(_text(element, "Opacity"), "Opacity")
        external = _child(element, "ExternalGraphic")
        if external is not None:
            resource = _child(external, "OnlineResource")
            href = None if resource is None else resource.get("{http://www.w3.org/1999/xlink}href")
            if not href:
                raise StyleError("ExternalGraphic without OnlineResource xlink:href")
            if self.resolve is None:
                raise StyleError(f"ExternalGraphic {href!r}: this style cannot refer to external graphics")
            return Graphic(mark=None, href=self.resolve(href), size=size, rotation=rotation, opacity=opacity)
        mark = _child(element, "Mark")
        if mark is None:
            return Graphic(size=size, rotation=rotation, opacity=opacity)
        name = (_text(mark, "WellKnownName") or "square").lower()
        if name not in WELL_KNOWN_MARKS:
            raise StyleError(f"WellKnownName {name!r} is not one of {', '.join(WELL_KNOWN_MARKS)}")
        return Graphic(mark=name, fill=self.fill(_child(mark, "Fill")), stroke=self.stroke(_child(mark, "Stroke")),
                       size=size, rotation=rotation, opacity=opacity)

    @staticmethod
    def offset(element: Any) -> float:
        return _expression_number(element, "PerpendicularOffset", 0.0)

    def label(self, element: Any) -> tuple[tuple[str, str], ...]:
        parts: list[tuple[str, str]] = []
        if element.text and element.text.strip():
            parts.append(("text", element.text.strip()))
        for child in element:
            name = _local(child)
            if name in ("PropertyName", "ValueReference"):
                attribute = (child.text or "").strip()
                if not attribute:
                    raise StyleError("Label holds an empty PropertyName")
                parts.append(("attribute", attribute))
            elif name == "Literal" and child.text:
                parts.append(("text", child.text))
            elif name:
                raise StyleError(f"Label: {name} is not supported (PropertyName and Literal are)")
            if child.tail and child.tail.strip():
                parts.append(("text", child.tail.strip()))
        if not parts:
            raise StyleError("TextSymbolizer without a Label")
        return tuple(parts)

    def text(self, element: Any) -> TextSymbolizer:
        label = _child(element, "Label")
        if label is None:
            raise StyleError("TextSymbolizer without a Label")
        font_element = _child(element, "Font")
        font = Font()
        if font_element is not None:
            params = _parameters(font_element)
            size = _number(params.get("font-size", "10"), "font-size")
            font = Font(family=params.get("font-family", "Sans"), size=size,
                        style=params.get("font-style", "normal"), weight=params.get("font-weight", "normal"))
        halo = _child(element, "Halo")
        halo_radius = _expression_number(halo, "Radius", 1.0) if halo is not None else 0.0
        halo_fill = (self.fill(_child(halo, "Fill"), "#ffffff") or Fill("#ffffff")) if halo is not None else None
        placement = "point"
        anchor, displacement, rotation, offset = (0.0, 0.5), (0.0, 0.0), 0.0, 0.0
        label_placement = _child(element, "LabelPlacement")
        if label_placement is not None:
            line = _child(label_placement, "LinePlacement")
            point = _child(label_placement, "PointPlacement")
            if line is not None:
                placement, offset = "line", self.offset(line)
            elif point is not None:
                anchor_el, displacement_el = _child(point, "AnchorPoint"), _child(point, "Displacement")
                if anchor_el is not None:
                    anchor = (_expression_number(anchor_el, "AnchorPointX", 0.0),
                              _expression_number(anchor_el, "AnchorPointY", 0.5))
                if displacement_el is not None:
                    displacement = (_expression_number(displacement_el, "DisplacementX", 0.0),
                                    _expression_number(displacement_el, "DisplacementY", 0.0))
                rotation = _expression_number(point, "Rotation", 0.0)
        return TextSymbolizer(
            label=self.label(label), font=font, fill=self.fill(_child(element, "Fill"), "#000000") or Fill("#000000"),
            halo_radius=halo_radius, halo_fill=halo_fill, placement=placement, anchor=anchor,
            displacement=displacement, rotation=rotation, offset=offset,
        )

    def symbolizer(self, element: Any) -> Symbolizer | None:
        kind = _local(element)
        if kind == "PointSymbolizer":
            return PointSymbolizer(self.graphic(_child(element, "Graphic")))
        if kind == "LineSymbolizer":
            return LineSymbolizer(self.stroke(_child(element, "Stroke")) or Stroke(), self.offset(element))
        if kind == "PolygonSymbolizer":
            return PolygonSymbolizer(self.fill(_child(element, "Fill")), self.stroke(_child(element, "Stroke")),
                                     self.offset(element))
        if kind == "TextSymbolizer":
            return self.text(element)
        if kind == "RasterSymbolizer":
            raise StyleError("RasterSymbolizer: a vector layer's style draws points, lines, polygons and text")
        return None

    def rule(self, element: Any) -> Rule:
        filter_element = _child(element, "Filter")
        filter_: ast.Node | None = None
        if filter_element is not None:
            try:
                filter_ = parse_fes(_filter_1_1(filter_element))
            except Exception as exc:  # pygeofilter raises bare errors for unknown operators
                name = _text(element, "Name") or "?"
                raise StyleError(f"rule {name!r}: the Filter cannot be read ({exc})") from None
        min_scale, max_scale = _text(element, "MinScaleDenominator"), _text(element, "MaxScaleDenominator")
        symbolizers = tuple(s for s in map(self.symbolizer, element) if s is not None)
        return Rule(
            name=_text(element, "Name"), title=_text(element, "Title") or _description_title(element),
            filter=filter_, else_filter=_child(element, "ElseFilter") is not None,
            min_scale=None if min_scale is None else _number(min_scale, "MinScaleDenominator"),
            max_scale=None if max_scale is None else _number(max_scale, "MaxScaleDenominator"),
            symbolizers=symbolizers,
        )


def _filter_1_1(element: Any) -> Any:
    """The Filter in the spelling pygeofilter's FES parser reads: Filter Encoding 1.0 spells
    PropertyIsLike's escape `escape` (1.1 `escapeChar`) and DWithin's distance unit `units` (2.0
    `uom`); SLD 1.0 styles write GML 2 geometries (`coordinates`, `outerBoundaryIs`, `Box`), which
    become GML 3 (`pos`/`posList`, `exterior`, `Envelope`)."""
    copy = etree.fromstring(etree.tostring(element))
    for like in copy.iter("{*}PropertyIsLike"):
        if like.get("escapeChar") is None and like.get("escape") is not None:
            like.set("escapeChar", like.get("escape"))
    for distance in copy.iter("{*}Distance"):
        if distance.get("uom") is None:
            distance.set("uom", distance.get("units") or "")
    for node in list(copy.iter("{*}outerBoundaryIs", "{*}innerBoundaryIs")):
        ring = "exterior" if _local(node) == "outerBoundaryIs" else "interior"
        node.tag = f"{{{etree.QName(node).namespace}}}{ring}"
    for node in list(copy.iter("{*}coordinates")):
        _gml2_coordinates(node)
    for box in list(copy.iter("{*}Box")):
        namespace = etree.QName(box).namespace
        positions = [child for child in box if _local(child) in ("pos", "posList")]
        if len(positions) == 1 and len((positions[0].text or "").split()) in (4, 6):  # Box/coordinates
            numbers = positions[0].text.split()
            half = len(numbers) // 2
            lower, upper = " ".join(numbers[:half]), " ".join(numbers[half:])
        elif len(positions) == 2 and all(_local(p) == "pos" for p in positions):
            lower, upper = positions[0].text, positions[1].text
        else:
            raise StyleError("gml:Box needs two corners")
        box.tag = f"{{{namespace}}}Envelope"
        for child in list(box):
            box.remove(child)
        etree.SubElement(box, f"{{{namespace}}}lowerCorner").text = lower
        etree.SubElement(box, f"{{{namespace}}}upperCorner").text = upper
    for coord in list(copy.iter("{*}coord")):  # GML 2's <coord><X/><Y/></coord>
        namespace = etree.QName(coord).namespace
        numbers = " ".join((c.text or "").strip() for c in coord if _local(c) in ("X", "Y", "Z"))
        pos = etree.Element(f"{{{namespace}}}pos")
        pos.text, pos.tail = numbers, coord.tail
        coord.getparent().replace(coord, pos)
    return copy


def _gml2_coordinates(node: Any) -> None:
    """gml:coordinates ("x,y x,y", separators given by cs/ts/decimal) as gml:pos (a point) or
    gml:posList (anything else)."""
    cs, ts, decimal = node.get("cs", ","), node.get("ts", " "), node.get("decimal", ".")
    text = (node.text or "").strip()
    tuples = [t for t in (text.split(ts) if ts.strip() else text.split()) if t.strip()]
    numbers = [n.strip().replace(decimal, ".") for t in tuples for n in t.split(cs) if n.strip()]
    namespace = etree.QName(node).namespace
    single = _local(node.getparent()) == "Point"
    node.tag = f"{{{namespace}}}{'pos' if single else 'posList'}"
    node.attrib.clear()
    node.text = " ".join(numbers)


def _description_title(element: Any) -> str | None:
    description = _child(element, "Description")  # SE 1.1 puts the title there
    return None if description is None else _text(description, "Title")


def local_resolver(directory: str | Path, names: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """An ExternalGraphic resolver over local files: `names` maps an href (a static's name, as a
    style refers to it) to a file name in `directory`; otherwise the href must be a relative path
    (a bare name or `file:` one) inside `directory`. URLs of other schemes, absolute paths and
    paths leaving the directory are refused: a style never makes the server fetch anything."""
    root = Path(directory).resolve()

    def resolve(href: str) -> str:
        target = (names or {}).get(href)
        if target is None:
            scheme = urllib.parse.urlsplit(href).scheme
            if scheme and scheme != "file" or len(scheme) == 1:  # "c:" is no scheme, but still absolute
                raise StyleError(f"ExternalGraphic {href!r}: only the style's own files can be drawn, not URLs")
            target = urllib.parse.unquote(href[5:] if scheme == "file" else href)
        path = (root / target).resolve()
        if Path(target).is_absolute() or not path.is_relative_to(root):
            raise StyleError(f"ExternalGraphic {href!r}: only the style's own files can be drawn")
        if not path.is_file():
            raise StyleError(f"ExternalGraphic {href!r}: no such file among the style's files")
        return str(path)

    return resolve


def parse(data: bytes, resolve: Callable[[str], str] | None = None) -> Style:
    """Read an SLD document (the first NamedLayer's first UserStyle). `resolve` maps an
    ExternalGraphic href to a local file path (or raises StyleError); without it external graphics
    are refused."""
    if len(data) > MAX_BYTES:
        raise StyleError(f"the style file exceeds {MAX_BYTES} bytes")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, remove_comments=True)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise StyleError(f"the style file is not well-formed XML: {exc}") from None
    if _local(root) != "StyledLayerDescriptor":
        raise StyleError(f"the root element is {_local(root) or '?'}, not StyledLayerDescriptor")
    version = root.get("version", "1.0.0")
    if version not in ("1.0.0", "1.1.0"):
        raise StyleError(f"SLD version {version!r} is not supported (1.0.0 and 1.1.0 are)")
    layer = _child(root, "NamedLayer")
    if layer is None:
        raise StyleError("the style has no NamedLayer")
    user_style = _child(layer, "UserStyle")
    if user_style is None:
        raise StyleError("the NamedLayer has no UserStyle")
    reader = _Reader(resolve)
    groups = tuple(FeatureTypeStyle(tuple(reader.rule(rule) for rule in _children(fts, "Rule")))
                   for fts in _children(user_style, "FeatureTypeStyle"))
    if not any(group.rules for group in groups):
        raise StyleError("the UserStyle has no Rule")
    return Style(layer_name=_text(layer, "Name"), name=_text(user_style, "Name"),
                 title=_text(user_style, "Title") or _description_title(user_style),
                 feature_type_styles=groups, version=version)


def _filter_attributes(node: Any, out: set[str]) -> None:
    if isinstance(node, ast.Attribute):
        out.add(node.name)
    elif isinstance(node, ast.Node):
        for child in node.get_sub_nodes():
            _filter_attributes(child, out)
    elif isinstance(node, list | tuple):
        for child in node:
            _filter_attributes(child, out)


def used_attributes(style: Style) -> list[str]:
    """The attributes the style reads (filters and labels), sorted: the platform's
    `type_infos.used_attributes`."""
    out: set[str] = set()
    for rule in style.rules:
        _filter_attributes(rule.filter, out)
        for symbolizer in rule.symbolizers:
            if isinstance(symbolizer, TextSymbolizer):
                out.update(value for kind, value in symbolizer.label if kind == "attribute")
    return sorted(out)


def check_for_table(style: Style, table: str, attributes: Iterable[str]) -> None:
    """Refuse a style meant for another table or reading attributes the table lacks, as the platform
    does (names compare case-insensitively, since the platform lower-cases table names: the
    SDK's `CANTON_style.sld` styles table `canton`; `attributes` includes the geometry column, which spatial filters name)."""
    if (style.layer_name or "").lower() != table.lower():  # tables are normalised to lower case
        raise StyleError(f"the style's NamedLayer/Name is {style.layer_name!r}, not the table's name {table!r}")
    available = set(attributes)
    missing = [name for name in used_attributes(style) if name not in available]
    if missing:
        raise StyleError(
            f"the style uses attribute(s) {', '.join(missing)} which table {table!r} lacks "
            f"(its attributes: {', '.join(sorted(available))})"
        )
