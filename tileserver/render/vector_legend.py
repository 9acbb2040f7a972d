"""GetLegendGraphic of a vector layer: one row per rule of its style, as GeoServer draws it.

Each row is a swatch (a rectangle for a rule with a PolygonSymbolizer, else a line for a
LineSymbolizer, else a point for a PointSymbolizer) drawn with every symbolizer of the rule, and the
rule's Title (else its Name) to its right. The swatches are drawn by mapnik with the same
translation of the symbolizers as the map (`vector_map`), so the legend matches the map; text
symbolizers draw nothing in a swatch (GeoServer's legends leave them out too). The sample
geometries are inline GeoJSON in a pixel coordinate space.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from lxml import etree

from tileserver.render import sld
from tileserver.render.vector_map import _face, _Writer, mapnik
from tileserver.vector.base import Attribute, Relation

_RULE = "ts_rule"
_LABEL = "ts_label"
_RELATION = Relation("legend", "TABLE", "geom", "Geometry", "EPSG:3857",
                     (Attribute(_RULE, "integer"), Attribute(_LABEL, "string")), ("fid",), None, 0)


def legend_rules(style: sld.Style, rule: str | None = None, scale: float | None = None) -> list[sld.Rule]:
    """The rules a legend shows: all, or the one named `rule` (GetLegendGraphic's RULE), or those
    active at `scale` (its SCALE: MinScaleDenominator <= scale < MaxScaleDenominator)."""
    rules = style.rules
    if rule is not None:
        rules = [r for r in rules if r.name == rule]
        if not rules:
            names = ", ".join(repr(r.name) for r in style.rules if r.name) or "none"
            raise ValueError(f"the style has no rule named {rule!r} (its rules: {names})")
    if scale is not None:
        rules = [r for r in rules if (r.min_scale is None or scale >= r.min_scale)
                 and (r.max_scale is None or scale < r.max_scale)]
    return rules


def _sample(rule: sld.Rule, x0: float, y0: float, width: float, height: float) -> dict[str, object]:
    kinds = {type(s) for s in rule.symbolizers}
    if sld.PolygonSymbolizer in kinds:
        ring = [[x0 + 1, y0 + 1], [x0 + width - 1, y0 + 1], [x0 + width - 1, y0 + height - 1],
                [x0 + 1, y0 + height - 1], [x0 + 1, y0 + 1]]
        return {"type": "Polygon", "coordinates": [ring]}
    if sld.LineSymbolizer in kinds:
        return {"type": "LineString", "coordinates": [[x0 + 1, y0 + height / 2], [x0 + width - 1, y0 + height / 2]]}
    return {"type": "Point", "coordinates": [x0 + width / 2, y0 + height / 2]}


def _label(rule: sld.Rule) -> str:
    return rule.title or rule.name or ""


def draw_legend(style: sld.Style, width: int = 20, height: int = 20, font_size: float = 12,
                transparent: bool = True, bgcolor: str = "#ffffff", rule: str | None = None,
                scale: float | None = None, labels: bool = True) -> np.ndarray:
    """The legend as an RGBA uint8 array: a `width` x `height` swatch per rule (top to bottom, in
    the style's order) with its title at its right when `labels`; ValueError when no rule is left
    (see `legend_rules`)."""
    rules = legend_rules(style, rule, scale)
    if not rules:
        raise ValueError("the style has no rule to show" + (f" at scale {scale:g}" if scale is not None else ""))
    gap, pad = 2, 6
    row = max(height, int(font_size * 1.4))
    text = max((len(_label(r)) for r in rules), default=0) if labels else 0
    canvas_w = width + (pad + int(font_size * 0.9 * text) + 8 if text else 0)
    canvas_h = len(rules) * row + (len(rules) - 1) * gap
    features = []
    for index, one in enumerate(rules):
        top = canvas_h - index * (row + gap)  # y up: the first rule at the top
        y0 = top - row + (row - height) / 2
        features.append({"type": "Feature", "properties": {_RULE: index, _LABEL: ""},
                         "geometry": _sample(one, 0, y0, width, height)})
        if labels and _label(one):
            features.append({"type": "Feature", "properties": {_RULE: -1, _LABEL: _label(one)},
                             "geometry": {"type": "Point", "coordinates": [width + pad, top - row / 2]}})
    root = etree.Element("Map", srs="epsg:3857", **{"background-color": "transparent"})
    writer = _Writer(_RELATION)
    swatches = etree.SubElement(root, "Style", name="swatches")
    for index, one in enumerate(rules):
        element = etree.SubElement(swatches, "Rule")
        etree.SubElement(element, "Filter").text = f"[{_RULE}] = {index}"
        for symbolizer in one.symbolizers:
            if not isinstance(symbolizer, sld.TextSymbolizer):
                writer.symbolizers(element, symbolizer)
    label_style = etree.SubElement(root, "Style", name="labels")
    label_rule = etree.SubElement(label_style, "Rule")
    etree.SubElement(label_rule, "Filter").text = f"[{_RULE}] = -1"
    etree.SubElement(label_rule, "TextSymbolizer", **{
        "face-name": _face(sld.Font()), "size": f"{font_size:g}", "fill": "#000000", "placement": "point",
        "horizontal-alignment": "right", "vertical-alignment": "middle", "allow-overlap": "true",
    }).text = f"[{_LABEL}]"
    layer = etree.SubElement(root, "Layer", name="legend", srs="epsg:3857")
    for name in ("swatches", "labels"):
        etree.SubElement(layer, "StyleName").text = name
    datasource = etree.SubElement(layer, "Datasource")
    etree.SubElement(datasource, "Parameter", name="type").text = "geojson"
    etree.SubElement(datasource, "Parameter", name="inline").text = json.dumps(
        {"type": "FeatureCollection", "features": features})
    mapnik_map = mapnik.Map(canvas_w, canvas_h)
    mapnik.load_map_from_string(mapnik_map, etree.tostring(root, encoding="unicode"), True)
    mapnik_map.zoom_to_box(mapnik.Box2d(0, 0, canvas_w, canvas_h))
    image = mapnik.Image(canvas_w, canvas_h)
    mapnik.render(mapnik_map, image)
    if image.premultiplied():
        image.demultiply()
    rgba = np.frombuffer(image.to_string(), dtype=np.uint8).reshape(canvas_h, canvas_w, 4).copy()
    used = np.flatnonzero(rgba[..., 3].any(axis=0))
    right = max(width, int(used[-1]) + 3 if used.size else width)
    rgba = rgba[:, :min(right, canvas_w)]
    if not transparent:
        rgba = _flatten(rgba, sld.color(bgcolor, "BGCOLOR"))
    return rgba


def _flatten(rgba: np.ndarray, background: str) -> np.ndarray:
    """`rgba` composited over an opaque colour."""
    value = background.lstrip("#")
    if len(value) == 3:
        value = "".join(c * 2 for c in value)
    colour = np.array([int(value[i:i + 2], 16) for i in (0, 2, 4)], dtype=np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255
    out = np.empty_like(rgba)
    out[..., :3] = np.round(rgba[..., :3] * alpha + colour * (1 - alpha)).astype(np.uint8)
    out[..., 3] = 255
    return out


def legend_size(styles: Sequence[sld.Style], width: int = 20, height: int = 20) -> tuple[int, int]:
    """(width, height) of the legends of `styles` stacked: for capabilities' LegendURL sizes."""
    images = [draw_legend(style, width, height) for style in styles]
    return max(image.shape[1] for image in images), sum(image.shape[0] for image in images)
