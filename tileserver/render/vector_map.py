"""Maps of a GeoPackage base's relations drawn with SLD styles, by mapnik (the PyPI wheel, LGPL-2.1+).

mapnik draws antialiased polygons, strokes with dashes/caps/joins/offsets, markers, patterns and
labels with halos, line placement and collision avoidance, and reads the GeoPackage through its
`ogr` input plugin (R-tree used for the bbox), in a few ms: drawing that by hand would be slower and
worse. The `sld.Style` model is written out as a mapnik XML map (lxml escapes every attribute and
text), then loaded and rendered to an RGBA image that `render.encode` turns into any WMS format.

Filters become mapnik expressions from the pygeofilter AST: string values are single-quoted with
quotes and backslashes escaped, attribute names are the relation's own (checked) and never hold a
bracket, numbers are written by Python. Literals take the type of the attribute they are compared
with (an SLD literal is text: `insee_dep = 75` against a text column compares '75').
PropertyIsNull is `[x] = ''`: mapnik's ogr input leaves a null unset, which compares equal to ''
(so an empty text counts as null too); PropertyIsLike is an ICU regex match.

Spatial filters (BBOX, Intersects, Within, Contains, Disjoint, Touches, Crosses, Overlaps, Equals,
DWithin, Beyond) have no mapnik expression: the base evaluates each spatial node once (its geometry
is a literal of the style, so the answer depends on the base's content only) and the node becomes a
test of the feature's key against the matching keys, written as ranges; the layer then reads the
table through `layer_by_sql` to expose the key (`FID_ATTRIBUTE`; the ogr input has no feature id
in expressions). A node matching more than `MAX_SPATIAL_RANGES` key ranges is refused.

As in SLD, labels are drawn above every shape: text symbolizers go to a second pass (a second
style of the layer over the same features, cached by mapnik; with several layers, label layers
after all the shapes, the top layer's labels placed first). Halos up to `FAST_HALO_RADIUS` px use
mapnik's fast halo rasterizer (the full one strokes each glyph with FreeType: half the time of a
1024² labelled map). Polygons of a pixel or two (`LABEL_MIN_PIXELS`) get no label: the label
layer then reads the table through `layer_by_sql` with a test of the GeoPackage envelope (GDAL's
ST_MinX…), since mapnik shapes every label before finding it has no room — two thirds of a 256²
map of 100 k small polygons; GeoServer's default goodnessOfFit drops such labels too (MapServer
draws them where they do not collide). SE's PerpendicularOffset is positive to the left of a line, mapnik's to the
right: the sign is flipped.

Speed: loading a map from XML costs ~7 ms and `map_xml` ~1 ms a call, so loaded maps are kept in a
small pool per (XML, file identity); a map is checked out by one thread at a time (mapnik maps are
not thread-safe) and resized to each request's size. `mapnik.render` releases the GIL, so renders
run in worker threads in parallel.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import math
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from lxml import etree
from pygeofilter import ast
from pyproj import CRS

from tileserver import transformers
from tileserver.render import sld
from tileserver.vector.base import Query, QueryError, Relation
from tileserver.vector.geopackage import GeoPackageBase, like_regex
from tileserver.vector.postgis import PostGISBase, is_postgis, split


def _import_mapnik() -> Any:
    """mapnik's import points GDAL_DATA, PROJ_LIB and ICU_DATA of the whole process (and of every
    process it starts: workers, GDAL's tools) at the data of its own bundled libraries, whose PROJ
    database other PROJ versions cannot read; give the environment back as it was."""
    saved = {key: os.environ.get(key) for key in ("GDAL_DATA", "PROJ_LIB", "PROJ_DATA", "ICU_DATA")}
    import mapnik as module

    # ICU loads its data on first use, from ICU_DATA: use it now (a regex, as PropertyIsLike
    # filters do), while the variable still points at the wheel's data
    module.Expression("[a].match('(?i)a.-')")
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return module


mapnik = _import_mapnik()

DEFAULT_BLUE = "#3366cc"  # the platform draws a relation without style in blue
MARK_PIXELS = 6.0  # SLD's default mark size
LABEL_MIN_PIXELS = 2.0  # polygons under 1-2 px (see _smallest_labelled) are not labelled
FAST_HALO_RADIUS = 2.0  # halos up to this radius (px) are drawn by mapnik's fast halo rasterizer

_COMPARISONS = {
    ast.Equal: "=", ast.NotEqual: "!=", ast.LessThan: "<", ast.LessEqual: "<=",
    ast.GreaterThan: ">", ast.GreaterEqual: ">=",
}
_ARITHMETIC = {ast.Add: "+", ast.Sub: "-", ast.Mul: "*", ast.Div: "/"}
_NUMERIC = ("integer", "real")
_SPATIAL = (ast.SpatialComparisonPredicate, ast.BBox, ast.SpatialDistancePredicate, ast.Relate)
FID_ATTRIBUTE = "__tileserver_fid"  # the key, exposed to filters (mapnik's ogr input has no feature_id)
MAX_SPATIAL_RANGES = 2000  # a longer expression costs more per feature than it saves

SpatialIds = Callable[[Relation, ast.Node], Sequence[int]]


@dataclass(frozen=True)
class VectorLayer:
    """One relation of the base and its style (None: the platform's default blue)."""

    relation: Relation
    style: sld.Style | None = None


def default_style(relation: Relation) -> sld.Style:
    """The platform's look for a relation published without style: blue, by geometry type."""
    kind = (relation.geometry_type or "").lower()
    symbolizer: sld.Symbolizer
    if "point" in kind:
        symbolizer = sld.PointSymbolizer(sld.Graphic("circle", sld.Fill(DEFAULT_BLUE), sld.Stroke("#000000", 0.5), size=6))
    elif "line" in kind:
        symbolizer = sld.LineSymbolizer(sld.Stroke(DEFAULT_BLUE, 1.0))
    else:
        symbolizer = sld.PolygonSymbolizer(sld.Fill(DEFAULT_BLUE, 0.6), sld.Stroke(DEFAULT_BLUE, 1.0))
    rule = sld.Rule(None, None, None, False, None, None, (symbolizer,))
    return sld.Style(relation.name, "default", None, (sld.FeatureTypeStyle((rule,)),), "1.0.0")


# --- expressions --------------------------------------------------------------------------------


def quote_string(value: str) -> str:
    """A mapnik expression string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def id_ranges(ids: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted ids as inclusive (first, last) runs."""
    out: list[tuple[int, int]] = []
    for value in sorted(set(ids)):
        if out and value == out[-1][1] + 1:
            out[-1] = (out[-1][0], value)
        else:
            out.append((value, value))
    return out


class _Expressions:
    def __init__(self, relation: Relation, spatial_ids: SpatialIds | None = None) -> None:
        self.relation = relation
        self.types = {a.name: a.type for a in relation.attributes}
        self.spatial_ids = spatial_ids
        self.uses_fid = False  # a spatial filter tests the fid: the layer must expose it (FID_ATTRIBUTE)

    def spatial(self, node: Any) -> str:
        if self.spatial_ids is None:
            raise sld.StyleError(f"the filter {type(node).__name__} needs the base to be evaluated")
        ranges = id_ranges(self.spatial_ids(self.relation, node))
        if len(ranges) > MAX_SPATIAL_RANGES:
            raise sld.StyleError(f"the spatial filter {type(node).__name__} selects features scattered over "
                                 f"{len(ranges)} id ranges, more than the renderer's {MAX_SPATIAL_RANGES}")
        if not ranges:
            return "false"
        self.uses_fid = True
        fid = f"[{FID_ATTRIBUTE}]"
        return "(" + " or ".join(f"{fid} = {a}" if a == b else f"({fid} >= {a} and {fid} <= {b})"
                                 for a, b in ranges) + ")"

    def attribute(self, name: str) -> str:
        if name not in self.types or "[" in name or "]" in name:
            raise sld.StyleError(f"the style uses attribute {name!r} which table {self.relation.name!r} lacks")
        return f"[{name}]"

    def literal(self, value: Any, type_: str | None) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if type_ in _NUMERIC and isinstance(value, str):
            try:
                value = float(value) if type_ == "real" or not value.lstrip("+-").isdigit() else int(value)
            except ValueError:
                pass  # compared as text: no feature matches, as in SQL
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise sld.StyleError(f"the number {value} has no place in a filter")
            return str(value) if type_ not in ("string", "date", "datetime") else quote_string(str(value))
        if isinstance(value, dt.date | dt.datetime):
            return quote_string(value.isoformat())
        if isinstance(value, str):
            return quote_string(value)
        raise sld.StyleError(f"the value {value!r} cannot be drawn by a filter")

    def _type_of(self, node: Any) -> str | None:
        return self.types.get(node.name) if isinstance(node, ast.Attribute) else None

    def scalar(self, node: Any, type_: str | None = None) -> str:
        if isinstance(node, ast.Attribute):
            return self.attribute(node.name)
        operator = _ARITHMETIC.get(type(node))
        if operator:
            return f"({self.scalar(node.lhs, 'real')} {operator} {self.scalar(node.rhs, 'real')})"
        if isinstance(node, ast.Node):
            raise sld.StyleError(f"{type(node).__name__} is not supported in a style's filter")
        return self.literal(node, type_)

    def condition(self, node: Any) -> str:
        if isinstance(node, _SPATIAL):
            return self.spatial(node)
        if isinstance(node, ast.And | ast.Or):
            word = "and" if isinstance(node, ast.And) else "or"
            return f"({self.condition(node.lhs)} {word} {self.condition(node.rhs)})"
        if isinstance(node, ast.Not):
            inner = node.sub_node
            if isinstance(inner, ast.GeometryDisjoint):  # pygeofilter's BBOX: R-tree-backed as intersects
                return self.spatial(ast.GeometryIntersects(inner.lhs, inner.rhs))
            return f"(not {self.condition(inner)})"
        operator = _COMPARISONS.get(type(node))
        if operator:
            lhs, rhs = node.lhs, node.rhs
            type_ = self._type_of(lhs) or self._type_of(rhs)
            return f"({self.scalar(lhs, type_)} {operator} {self.scalar(rhs, type_)})"
        if isinstance(node, ast.Between):
            type_ = self._type_of(node.lhs)
            lhs = self.scalar(node.lhs, type_)
            inside = f"({lhs} >= {self.scalar(node.low, type_)} and {lhs} <= {self.scalar(node.high, type_)})"
            return f"(not {inside})" if node.not_ else inside
        if isinstance(node, ast.In):
            type_ = self._type_of(node.lhs)
            lhs = self.scalar(node.lhs, type_)
            inside = "(" + " or ".join(f"{lhs} = {self.scalar(v, type_)}" for v in node.sub_nodes) + ")"
            return f"(not {inside})" if node.not_ else inside
        if isinstance(node, ast.IsNull):
            test = f"({self.scalar(node.lhs)} = '')"  # ogr leaves a null unset, which equals ''; so does ''

            return f"(not {test})" if node.not_ else test
        if isinstance(node, ast.Like):
            regex = like_regex(node.pattern, node.wildcard, node.singlechar, node.escapechar)
            test = f"{self.scalar(node.lhs)}.match({quote_string(('(?i)' if node.nocase else '') + regex)})"
            return f"(not {test})" if node.not_ else test
        if isinstance(node, ast.Include | ast.Exclude):
            return "true" if isinstance(node, ast.Include) else "false"
        raise sld.StyleError(f"the filter {type(node).__name__} is not supported by the map renderer")


# --- graphics --------------------------------------------------------------------------------------

_MARK_PATHS = {
    "square": "M0 0 H10 V10 H0 Z",
    "circle": "M0 5 A5 5 0 1 0 10 5 A5 5 0 1 0 0 5 Z",
    "triangle": "M5 0 L10 10 H0 Z",
    "star": "M5 0 L6.2 3.5 L10 3.6 L7 6 L8.1 9.6 L5 7.5 L1.9 9.6 L3 6 L0 3.6 L3.8 3.5 Z",
    "cross": "M3.5 0 H6.5 V3.5 H10 V6.5 H6.5 V10 H3.5 V6.5 H0 V3.5 H3.5 Z",
    "x": "M1.5 0 L5 3.5 L8.5 0 L10 1.5 L6.5 5 L10 8.5 L8.5 10 L5 6.5 L1.5 10 L0 8.5 L3.5 5 L0 1.5 Z",
}
_mark_dir: Path | None = None
_mark_lock = threading.Lock()


def _mark_file(graphic: sld.Graphic) -> str:
    """An SVG file drawing a well-known mark in its colours (mapnik markers and patterns read files);
    written once per process per look, named by its content."""
    global _mark_dir
    fill, stroke = graphic.fill, graphic.stroke
    size = graphic.size or MARK_PIXELS
    paint = (f'fill="{fill.color}" fill-opacity="{fill.opacity}"' if fill else 'fill="none"') + " " + (
        f'stroke="{stroke.color}" stroke-opacity="{stroke.opacity}" stroke-width="{stroke.width * 10 / size}"'
        if stroke else 'stroke="none"')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" viewBox="0 0 10 10">'
           f'<path d="{_MARK_PATHS[graphic.mark or "square"]}" {paint}/></svg>')
    name = hashlib.sha256(svg.encode()).hexdigest()[:24] + ".svg"
    with _mark_lock:
        if _mark_dir is None:
            _mark_dir = Path(tempfile.mkdtemp(prefix="tileserver-marks-"))
        path = _mark_dir / name
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(svg)
            tmp.replace(path)
    return str(path)


def _rgba(color: str, opacity: float) -> str:
    value = color.lstrip("#")
    if len(value) == 3:
        value = "".join(c * 2 for c in value)
    r, g, b = (int(value[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{opacity:g})"


def _face(font: sld.Font) -> str:
    """The bundled DejaVu face closest to the SLD's font (the wheel ships DejaVu only)."""
    family = font.family.lower()
    bold = font.weight.lower() == "bold"
    slanted = font.style.lower() in ("italic", "oblique")
    if "mono" in family or "courier" in family:
        base, slant = "DejaVu Sans Mono", "Oblique"
    elif "serif" in family and "sans" not in family or "times" in family:
        base, slant = "DejaVu Serif", "Italic"
    else:
        base, slant = "DejaVu Sans", "Oblique"
    style = " ".join(w for w in (("Bold" if bold else ""), (slant if slanted else "")) if w) or "Book"
    return f"{base} {style}"


def _number(value: float) -> str:
    return f"{value:g}"


def _stroke_attributes(stroke: sld.Stroke) -> dict[str, str]:
    out = {"stroke": stroke.color, "stroke-width": _number(stroke.width), "stroke-opacity": _number(stroke.opacity),
           "stroke-linecap": stroke.linecap, "stroke-linejoin": stroke.linejoin}
    if stroke.dasharray:
        pattern = stroke.dasharray if len(stroke.dasharray) % 2 == 0 else stroke.dasharray * 2
        out["stroke-dasharray"] = ",".join(_number(v) for v in pattern)
    return out


def _image_file(href: str) -> str:
    """An external graphic's file: a local file (the resolver of `sld.parse` gives one), never a URL."""
    if "://" in href or not os.path.isfile(href):
        raise sld.StyleError(f"ExternalGraphic {href!r} is not a local file (see sld.local_resolver)")
    return href


def _marker_attributes(graphic: sld.Graphic) -> dict[str, str]:
    out = {"placement": "point", "allow-overlap": "true", "ignore-placement": "true",
           "opacity": _number(graphic.opacity)}
    if graphic.href is not None:
        out["file"] = _image_file(graphic.href)
        if graphic.size is not None:
            out["height"] = _number(graphic.size)
    else:
        out["file"] = _mark_file(graphic)
        out["width"] = out["height"] = _number(graphic.size or MARK_PIXELS)
    if graphic.rotation:
        out["transform"] = f"rotate({_number(graphic.rotation)})"
    return out


class _Writer:
    def __init__(self, relation: Relation, spatial_ids: SpatialIds | None = None) -> None:
        self.expressions = _Expressions(relation, spatial_ids)

    def symbolizers(self, parent: Any, symbolizer: sld.Symbolizer) -> None:
        if isinstance(symbolizer, sld.PolygonSymbolizer):
            fill = symbolizer.fill
            if fill is not None and fill.graphic is not None:
                file = _image_file(fill.graphic.href) if fill.graphic.href else _mark_file(fill.graphic)
                etree.SubElement(parent, "PolygonPatternSymbolizer", file=file)
            elif fill is not None:
                etree.SubElement(parent, "PolygonSymbolizer", fill=fill.color, **{"fill-opacity": _number(fill.opacity)})
            if symbolizer.stroke is not None:
                line = etree.SubElement(parent, "LineSymbolizer", **_stroke_attributes(symbolizer.stroke))
                if symbolizer.offset:
                    line.set("offset", _number(symbolizer.offset))
        elif isinstance(symbolizer, sld.LineSymbolizer):
            line = etree.SubElement(parent, "LineSymbolizer", **_stroke_attributes(symbolizer.stroke))
            if symbolizer.offset:  # SE: positive to the left of the line; mapnik: to its right
                line.set("offset", _number(-symbolizer.offset))
        elif isinstance(symbolizer, sld.PointSymbolizer):
            etree.SubElement(parent, "MarkersSymbolizer", **_marker_attributes(symbolizer.graphic))
        elif isinstance(symbolizer, sld.TextSymbolizer):
            self.text(parent, symbolizer)

    def text(self, parent: Any, symbolizer: sld.TextSymbolizer) -> None:
        parts = [self.expressions.attribute(value) if kind == "attribute" else quote_string(value)
                 for kind, value in symbolizer.label]
        attributes = {
            "face-name": _face(symbolizer.font), "size": _number(symbolizer.font.size),
            "fill": _rgba(symbolizer.fill.color, symbolizer.fill.opacity), "placement": symbolizer.placement,
        }
        if symbolizer.halo_fill is not None and symbolizer.halo_radius > 0:
            attributes["halo-radius"] = _number(symbolizer.halo_radius)
            attributes["halo-fill"] = _rgba(symbolizer.halo_fill.color, symbolizer.halo_fill.opacity)
            if symbolizer.halo_radius <= FAST_HALO_RADIUS:
                # the full rasterizer strokes every glyph's outline with FreeType each time: half of
                # a 1024² map with labels; the fast one draws the glyph around itself, alike at 1-2 px
                attributes["halo-rasterizer"] = "fast"
        if symbolizer.placement == "line":
            attributes["dy"] = _number(-symbolizer.offset)
            attributes["max-char-angle-delta"] = "30"
        else:
            ax, ay = symbolizer.anchor
            attributes["horizontal-alignment"] = "right" if ax < 1 / 3 else "left" if ax > 2 / 3 else "middle"
            attributes["vertical-alignment"] = "top" if ay < 1 / 3 else "bottom" if ay > 2 / 3 else "middle"
            attributes["dx"] = _number(symbolizer.displacement[0])
            attributes["dy"] = _number(-symbolizer.displacement[1])
            if symbolizer.rotation:
                attributes["orientation"] = _number(symbolizer.rotation)
        element = etree.SubElement(parent, "TextSymbolizer", **attributes)
        element.text = " + ".join(parts)

    def rule(self, parent: Any, rule: sld.Rule, labels: bool | None = None) -> None:
        """A mapnik rule drawing the rule's symbolizers: all (`labels` None), the text ones only
        (True) or all but them (False). A rule keeps its filter even when it draws nothing here, so
        that an ElseFilter rule next to it selects the same features in every pass."""
        element = etree.SubElement(parent, "Rule")
        if rule.else_filter:
            etree.SubElement(element, "ElseFilter")
        elif rule.filter is not None:
            etree.SubElement(element, "Filter").text = self.expressions.condition(rule.filter)
        if rule.min_scale is not None:
            etree.SubElement(element, "MinScaleDenominator").text = repr(float(rule.min_scale))
        if rule.max_scale is not None:
            etree.SubElement(element, "MaxScaleDenominator").text = repr(float(rule.max_scale))
        for symbolizer in rule.symbolizers:
            if labels is None or isinstance(symbolizer, sld.TextSymbolizer) is labels:
                self.symbolizers(element, symbolizer)


def _sql_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@lru_cache(maxsize=256)
def mapnik_srs(crs: str) -> str:
    """mapnik's spelling of a CRS ("epsg:2154"); CRS:84 draws as EPSG:4326 in lon/lat order."""
    if crs.upper() in ("CRS:84", "OGC:CRS84"):
        return "epsg:4326"
    authority = CRS.from_user_input(crs).to_authority()
    if authority is None:
        raise ValueError(f"{crs} has no authority code")
    return f"{authority[0].lower()}:{authority[1]}"


def _postgis_datasource(url: str, relation: Relation, sql: str | None) -> Any:
    """mapnik's `postgis` input over a PostGIS base's table (the credentials from the setting); the
    input adds the bbox test (`&&`, answered by the GiST index) around `sql`."""
    import urllib.parse

    from tileserver.vector.postgis import split

    conninfo, schema = split(url)
    parts = urllib.parse.urlsplit(conninfo)
    datasource = etree.Element("Datasource")
    source = [("type", "postgis"), ("host", parts.hostname or ""), ("port", str(parts.port or 5432)),
              ("dbname", urllib.parse.unquote(parts.path.lstrip("/"))),
              ("user", urllib.parse.unquote(parts.username or "")),
              ("password", urllib.parse.unquote(parts.password or "")),
              ("table", f"({sql}) AS t" if sql else f"{_sql_name(schema)}.{_sql_name(relation.name)}"),
              ("geometry_field", relation.geometry_column or ""), ("srid", mapnik_srs(relation.srs).split(":")[1]),
              ("estimate_extent", "false")]
    if relation.extent is not None:  # spares mapnik a read of the whole table for its extent
        source.append(("extent", ",".join(repr(float(v)) for v in relation.extent)))
    for key, value in source:
        etree.SubElement(datasource, "Parameter", name=key).text = value
    return datasource


def _table(path: str | Path, relation: Relation) -> str:
    """The relation as the SQL of its datasource names it (schema-qualified on PostGIS)."""
    if is_postgis(str(path)):
        return f"{_sql_name(split(str(path))[1])}.{_sql_name(relation.name)}"
    return _sql_name(relation.name)


def _datasource(path: str | Path, relation: Relation, sql: str | None) -> Any:
    if is_postgis(str(path)):
        return _postgis_datasource(str(path), relation, sql)
    datasource = etree.Element("Datasource")
    source = [("type", "ogr"), ("file", str(path))]
    source.append(("layer_by_sql", sql) if sql else ("layer", relation.name))
    if sql and relation.extent is not None:  # spares mapnik a read of the whole SQL layer for its extent
        source.append(("extent", ",".join(repr(float(v)) for v in relation.extent)))
    for key, value in source:
        etree.SubElement(datasource, "Parameter", name=key).text = value
    return datasource


def _transformer(source: str, target: str) -> Any:
    return transformers.transformer(source, target)


def _smallest_labelled(relation: Relation, crs: str, bbox: tuple[float, float, float, float], width: int,
                       height: int) -> float | None:
    """The smallest polygon (largest side, in the relation's units) that gets labels on this view:
    `LABEL_MIN_PIXELS` pixels rounded down to a power of two (so that maps of nearby scales share
    one pool key), so 1 to 2 px: far below what holds a label; None for points and lines, or when
    the view's pixel size is unknown."""
    if "polygon" not in (relation.geometry_type or "").lower() or width <= 0 or height <= 0:
        return None
    try:
        view_srs, layer_srs = mapnik_srs(crs), mapnik_srs(relation.srs)
        if view_srs != layer_srs:
            bbox = _transformer(view_srs, layer_srs).transform_bounds(*bbox)
    except Exception:  # noqa: BLE001 - no threshold is always right: every polygon labelled
        return None
    pixel = min((bbox[2] - bbox[0]) / width, (bbox[3] - bbox[1]) / height) * LABEL_MIN_PIXELS
    if not math.isfinite(pixel) or pixel <= 0:
        return None
    return 2.0 ** math.floor(math.log2(pixel))


def map_xml(path: str | Path, layers: Sequence[VectorLayer], crs: str, background: str,
            spatial_ids: SpatialIds | None = None,
            view: tuple[tuple[float, float, float, float], int, int] | None = None) -> str:
    """The mapnik XML map of `layers` over the GeoPackage at `path`; the first layer draws on top.
    `spatial_ids(relation, node)` gives the fids matching a spatial filter node (see the module
    docstring); without it a spatial filter is refused. `view` (bbox, width, height) lets polygons
    smaller than a pixel go without labels (see `_smallest_labelled`)."""
    root = etree.Element("Map", srs=mapnik_srs(crs), **{"background-color": background})
    label_layers: list[tuple[int, Any]] = []
    for index, layer in reversed(list(enumerate(layers))):
        relation = layer.relation
        if relation.geometry_column is None:
            raise sld.StyleError(f"relation {relation.name!r} has no geometry to draw")
        style = layer.style or default_style(relation)
        writer = _Writer(relation, spatial_ids)
        names, label_names = [], []
        for number, group in enumerate(style.feature_type_styles):
            name = f"s{index}-{number}"
            element = etree.SubElement(root, "Style", name=name)
            for rule in group.rules:
                writer.rule(element, rule, labels=False)
            names.append(name)
            if any(isinstance(s, sld.TextSymbolizer) for rule in group.rules for s in rule.symbolizers):
                label_name = f"t{index}-{number}"
                element = etree.SubElement(root, "Style", name=label_name)
                for rule in group.rules:
                    writer.rule(element, rule, labels=True)
                label_names.append(label_name)
        select = f"SELECT * FROM {_table(path, relation)}"
        if writer.expressions.uses_fid:  # GDAL's GeoPackage SQL layer still reads the R-tree for the bbox
            key = relation.primary_key[0] if len(relation.primary_key) == 1 else "fid"
            select = f"SELECT *, {_sql_name(key)} AS {FID_ATTRIBUTE} FROM {_table(path, relation)}"
        datasource = _datasource(path, relation, select if writer.expressions.uses_fid else None)
        layer_element = etree.SubElement(root, "Layer", name=f"l{index}", srs=mapnik_srs(relation.srs))
        for name in names:
            etree.SubElement(layer_element, "StyleName").text = name
        label_source = datasource
        smallest = None if view is None else _smallest_labelled(relation, crs, *view)
        if label_names and smallest is not None:
            # a polygon of a pixel or two gets no label: it cannot hold one (GeoServer's
            # goodnessOfFit drops such labels too); mapnik would shape every label before finding
            # it has no room, most of the time of a whole-layer map of many small polygons
            geometry = _sql_name(relation.geometry_column)
            larger, x0, x1, y0, y1 = (("greatest", "ST_XMin", "ST_XMax", "ST_YMin", "ST_YMax") if is_postgis(str(path))
                                      else ("max", "ST_MinX", "ST_MaxX", "ST_MinY", "ST_MaxY"))  # PostGIS / GDAL SQL
            label_source = _datasource(path, relation, (
                f"{select} WHERE {larger}({x1}({geometry}) - {x0}({geometry}), "
                f"{y1}({geometry}) - {y0}({geometry})) >= {smallest!r}"))
        elif label_names and len(layers) == 1:
            # labels after every shape (SLD draws them on top), from the same read of the features
            layer_element.set("cache-features", "true")
            for name in label_names:
                etree.SubElement(layer_element, "StyleName").text = name
            label_names = []
        if label_names:  # every label above every layer's shapes
            label_layer = etree.Element("Layer", name=f"labels{index}", srs=mapnik_srs(relation.srs))
            for name in label_names:
                etree.SubElement(label_layer, "StyleName").text = name
            label_layer.append(copy.deepcopy(label_source))
            label_layers.append((index, label_layer))
        layer_element.append(datasource)
    for _, label_layer in sorted(label_layers, key=lambda item: item[0]):  # the top layer's labels placed first
        root.append(label_layer)
    return etree.tostring(root, encoding="unicode")


class _MapPool:
    """Loaded mapnik maps, idle, by key; at most `per_key` idle maps a key and `keys` keys (least
    recently used dropped). A map is used by one thread at a time: checked out, then given back."""

    def __init__(self, keys: int = 32, per_key: int = 4) -> None:
        self.keys, self.per_key = keys, per_key
        self._idle: OrderedDict[Any, list[Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # maps built from XML: how often the pool missed

    @contextmanager
    def map(self, key: Any, xml: str, width: int, height: int) -> Iterator[Any]:
        with self._lock:
            idle = self._idle.get(key)
            mapnik_map = idle.pop() if idle else None
            if idle is not None:
                self._idle.move_to_end(key)
        if mapnik_map is None:
            mapnik_map = mapnik.Map(width, height)
            try:
                mapnik.load_map_from_string(mapnik_map, xml, True)
            except RuntimeError as exc:  # an image it cannot read, a font it lacks…
                raise sld.StyleError(f"the map renderer refused the style: {exc}") from None
            mapnik_map.aspect_fix_mode = mapnik.aspect_fix_mode.RESPECT  # WMS stretches the bbox to the size
            with self._lock:
                self.loads += 1
        else:
            mapnik_map.resize(width, height)
        yield mapnik_map
        with self._lock:
            idle = self._idle.setdefault(key, [])
            self._idle.move_to_end(key)
            if len(idle) < self.per_key:
                idle.append(mapnik_map)
            while len(self._idle) > self.keys:
                self._idle.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


_POOL = _MapPool()
_bases: OrderedDict[tuple[str, tuple[int, int, int]], tuple[GeoPackageBase | PostGISBase, dict[str, list[int]]]] = \
    OrderedDict()
_bases_lock = threading.Lock()


def _identity(path: str | Path) -> tuple[int, int, int]:
    """What changes when the file is rewritten or replaced: a map of the old file is not reused.
    A PostGIS base has none here (mapnik reads its tables live; `render` keys it by its relations)."""
    if is_postgis(str(path)):
        return 0, 0, 0
    stat = os.stat(path)
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _spatial_ids(path: str | Path, identity: tuple[int, int, int]) -> SpatialIds:
    """fids of the base matching a spatial filter node, remembered per (file, relation, node); the
    base is opened on the first spatial filter only."""
    key = (str(path), identity)

    def ids(relation: Relation, node: ast.Node) -> Sequence[int]:
        if len(relation.primary_key) != 1:
            raise sld.StyleError(f"relation {relation.name!r} has no single key: its spatial filters cannot be drawn")
        with _bases_lock:
            entry = _bases.get(key)
            if entry is None:
                entry = _bases[key] = (PostGISBase(str(path)) if is_postgis(str(path)) else GeoPackageBase(path), {})
                while len(_bases) > 8:
                    _bases.popitem(last=False)[1][0].close()
        base, answers = entry
        memo = f"{relation.name}\n{node!r}"
        found = answers.get(memo)
        if found is None:
            try:
                found = [int(f.id) for f in base.features(Query(relation.name, filter=node, properties=()))]
            except QueryError as exc:
                raise sld.StyleError(f"the style's spatial filter: {exc}") from None
            answers[memo] = found
        return found

    return ids


def render(path: str | Path, layers: Sequence[VectorLayer], bbox: tuple[float, float, float, float], crs: str,
           width: int, height: int, transparent: bool = True, bgcolor: str = "#ffffff") -> np.ndarray:
    """An RGBA uint8 array (height, width, 4) of `layers` over `bbox` (x/east first, in `crs`);
    a transparent map has alpha 0 where nothing is drawn. Safe to call from several threads."""
    background = "transparent" if transparent else sld.color(bgcolor, "BGCOLOR")
    identity = _identity(path)
    if is_postgis(str(path)):  # the relations as last opened: a changed base gets fresh spatial-filter answers
        identity = (0, 0, hash(tuple((x.relation.name, x.relation.count, x.relation.extent) for x in layers)))
    xml = map_xml(path, layers, crs, background, _spatial_ids(path, identity), (bbox, width, height))
    image = mapnik.Image(width, height)
    with _POOL.map((xml, identity), xml, width, height) as mapnik_map:
        mapnik_map.zoom_to_box(mapnik.Box2d(*bbox))
        mapnik.render(mapnik_map, image)
    if image.premultiplied():
        image.demultiply()
    return np.frombuffer(image.to_string(), dtype=np.uint8).reshape(height, width, 4).copy()
