"""GML 3.2.1 encoding of features (WFS 2.0 GetFeature) and the XML Schema describing them.

Written as text, feature by feature, so a collection streams; values pass through one escaping
function (XML 1.0 characters only, markup escaped), numbers keep Python's repr (round-trippable).
"""

from __future__ import annotations

import base64
import datetime
import re
from collections.abc import Iterable
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from tileserver.vector.base import Relation

GML_NS = "http://www.opengis.net/gml/3.2"
GML_SCHEMA = "http://schemas.opengis.net/gml/3.2.1/gml.xsd"
_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_NOT_NCNAME = re.compile(r"[^A-Za-z0-9_.\-]")

XSD_TYPES = {
    "integer": "xsd:long",
    "real": "xsd:double",
    "string": "xsd:string",
    "boolean": "xsd:boolean",
    "date": "xsd:date",
    "datetime": "xsd:dateTime",
    "binary": "xsd:base64Binary",
}
GEOMETRY_PROPERTY_TYPES = {
    "point": "gml:PointPropertyType",
    "linestring": "gml:CurvePropertyType",
    "polygon": "gml:SurfacePropertyType",
    "multipoint": "gml:MultiPointPropertyType",
    "multilinestring": "gml:MultiCurvePropertyType",
    "multipolygon": "gml:MultiSurfacePropertyType",
}


def text(value: Any) -> str:
    return escape(_NOT_XML.sub("?", str(value)))


def attr(value: Any) -> str:
    return quoteattr(_NOT_XML.sub("?", str(value)))


def gml_id(public_name: str, feature_id: Any) -> str:
    """`name.id`, an NCName (what RESOURCEID and GetFeatureById take back)."""
    return f"{public_name}.{_NOT_NCNAME.sub('_', str(feature_id))}"


def value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    return text(value)


# --- geometries ---------------------------------------------------------------------------------


def _poslist(coords: Any) -> str:
    return " ".join(f"{x!r} {y!r}" for x, y, *_ in coords)


class _Ids:
    """gml:id of geometries, unique within one feature."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"{self.prefix}.g{self.n}"


def _ring(ring: Any) -> str:
    return f'<gml:LinearRing><gml:posList srsDimension="2">{_poslist(ring.coords)}</gml:posList></gml:LinearRing>'


def _geometry(geom: Any, srs: str, ids: _Ids, top: bool) -> str:
    srs_attr = f" srsName={attr(srs)}" if top else ""
    kind = geom.geom_type
    gid = attr(ids())
    if kind == "Point":
        return f"<gml:Point gml:id={gid}{srs_attr}><gml:pos>{_poslist(geom.coords)}</gml:pos></gml:Point>"
    if kind == "LineString":
        return (f"<gml:LineString gml:id={gid}{srs_attr}><gml:posList srsDimension=\"2\">{_poslist(geom.coords)}"
                "</gml:posList></gml:LineString>")
    if kind == "Polygon":
        inner = "".join(f"<gml:interior>{_ring(r)}</gml:interior>" for r in geom.interiors)
        return f"<gml:Polygon gml:id={gid}{srs_attr}><gml:exterior>{_ring(geom.exterior)}</gml:exterior>{inner}</gml:Polygon>"
    members = {
        "MultiPoint": ("MultiPoint", "pointMember"),
        "MultiLineString": ("MultiCurve", "curveMember"),
        "MultiPolygon": ("MultiSurface", "surfaceMember"),
        "GeometryCollection": ("MultiGeometry", "geometryMember"),
    }
    name, member = members[kind]
    parts = "".join(f"<gml:{member}>{_geometry(g, srs, ids, False)}</gml:{member}>" for g in geom.geoms)
    return f"<gml:{name} gml:id={gid}{srs_attr}>{parts}</gml:{name}>"


def geometry(geom: Any, srs: str, id_prefix: str) -> str:
    """A shapely geometry (coordinates already in the written axis order) as GML 3.2."""
    return _geometry(geom, srs, _Ids(id_prefix), True)


def envelope(bbox: tuple[float, ...], srs: str) -> str:
    return (f"<gml:Envelope srsName={attr(srs)}><gml:lowerCorner>{bbox[0]!r} {bbox[1]!r}</gml:lowerCorner>"
            f"<gml:upperCorner>{bbox[2]!r} {bbox[3]!r}</gml:upperCorner></gml:Envelope>")


def feature(prefix: str, relation: Relation, public_name: str, fid: Any, properties: dict[str, Any],
            geom: Any, srs: str, names: Iterable[str] | None) -> str:
    """One feature element in the sequence its DescribeFeatureType schema declares."""
    ident = gml_id(public_name, fid)
    wanted = None if names is None else set(names)
    parts = [f"<{prefix}:{public_name} gml:id={attr(ident)}>"]
    for attribute in relation.attributes:
        if wanted is not None and attribute.name not in wanted:
            continue
        value = properties.get(attribute.name)
        if value is not None:
            parts.append(f"<{prefix}:{attribute.name}>{value_text(value)}</{prefix}:{attribute.name}>")
    column = relation.geometry_column
    if column and geom is not None and not geom.is_empty and (wanted is None or column in wanted):
        parts.append(f"<{prefix}:{column}>{geometry(geom, srs, ident)}</{prefix}:{column}>")
    parts.append(f"</{prefix}:{public_name}>")
    return "".join(parts)


# --- schema -------------------------------------------------------------------------------------


def geometry_property_type(relation: Relation) -> str:
    return GEOMETRY_PROPERTY_TYPES.get((relation.geometry_type or "").lower(), "gml:GeometryPropertyType")


def schema(prefix: str, namespace: str, types: Iterable[tuple[str, Relation]]) -> bytes:
    """DescribeFeatureType: one complex type and element per (public name, relation)."""
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>\n',
        f'<xsd:schema xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:gml="{GML_NS}" '
        f"xmlns:{prefix}={attr(namespace)} targetNamespace={attr(namespace)} "
        'elementFormDefault="qualified" version="1.0">\n',
        f'  <xsd:import namespace="{GML_NS}" schemaLocation="{GML_SCHEMA}"/>\n',
    ]
    for public_name, relation in types:
        out.append(f'  <xsd:complexType name="{public_name}Type"><xsd:complexContent>'
                   '<xsd:extension base="gml:AbstractFeatureType"><xsd:sequence>\n')
        for attribute in relation.attributes:
            out.append(f'    <xsd:element name="{attribute.name}" type="{XSD_TYPES.get(attribute.type, "xsd:string")}"'
                       ' minOccurs="0" nillable="true"/>\n')
        if relation.geometry_column:
            out.append(f'    <xsd:element name="{relation.geometry_column}" type="{geometry_property_type(relation)}"'
                       ' minOccurs="0" nillable="true"/>\n')
        out.append("  </xsd:sequence></xsd:extension></xsd:complexContent></xsd:complexType>\n")
        out.append(f'  <xsd:element name="{public_name}" type="{prefix}:{public_name}Type" '
                   'substitutionGroup="gml:AbstractFeature"/>\n')
    out.append("</xsd:schema>\n")
    return "".join(out).encode()
