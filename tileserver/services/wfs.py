"""WFS 2.0.0 (Basic, KVP GET) over the vector bases of WFS layer records, at `/wfs`.

Feature types are `<layer public name>:<relation public name>`, the warehouse's naming; the prefix is
an XML namespace prefix bound to the layer's namespace. GetCapabilities, DescribeFeatureType (XSD
derived from the relation's attributes), GetFeature (TYPENAMES, RESOURCEID, BBOX, FES 2.0 FILTER,
PROPERTYNAME, SORTBY, SRSNAME, COUNT/STARTINDEX paging with next/previous, RESULTTYPE=hits; GML 3.2
or GeoJSON), ListStoredQueries, DescribeStoredQueries and the mandatory GetFeatureById.

Answers stream: the count and the first batch are read before the status is sent (a streamed answer
cannot turn into an exception report), then features go out batch by batch from a reader thread
(`vector.stream`). Errors are OWS 1.1 exception reports (version 2.0.0) through the policy's family;
restricted layers are invisible without a key granting their record, as raster layers are.
"""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson
import shapely.geometry
from lxml import etree
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from tileserver.catalog import Catalog, FeatureType
from tileserver.runtime import get_runtime
from tileserver.services.numbers import shortest
from tileserver.services.ows import (
    KVP,
    OWS_NS,
    XLINK_NS,
    XML_DECLARATION,
    XSI_NS,
    OWSException,
    base_url,
    echo,
    exception_report,
    key_hash,
    xml_text,
)
from tileserver.services.policy import (
    ServiceError,
    document_headers,
    error_response,
    map_headers,
    register,
)
from tileserver.services.vectorquery import (
    Plan,
    batches,
    bbox_in,
    count_matched,
    features_json,
    key_value,
    open_stream,
    property_names,
    timestamp,
    written,
)
from tileserver.vector import crs as crslib
from tileserver.vector import geojson, gml
from tileserver.vector.base import Feature, Query, Relation
from tileserver.vector.stream import FeatureStream

log = logging.getLogger("tileserver.wfs")

WFS_NS = "http://www.opengis.net/wfs/2.0"
FES_NS = "http://www.opengis.net/fes/2.0"
WFS_SCHEMA = "http://schemas.opengis.net/wfs/2.0/wfs.xsd"
VERSIONS = ("2.0.0", "2.0.2")
GML32 = "application/gml+xml; version=3.2"
JSON = "application/json"
GEOJSON = "application/geo+json"
GET_FEATURE_BY_ID = "urn:ogc:def:query:OGC-WFS::GetFeatureById"
OTHER_CRS = ("EPSG:4326", "EPSG:3857")
# OUTPUTFORMAT values → writer
OUTPUT_FORMATS = {
    "application/gml+xml; version=3.2": "gml",
    "application/gml+xml;version=3.2": "gml",
    "text/xml; subtype=gml/3.2": "gml",
    "text/xml; subtype=gml/3.2.1": "gml",
    "gml32": "gml",
    "application/json": "json",
    "application/geo+json": "json",
    "json": "json",
    "geojson": "json",
}
ADVERTISED_FORMATS = (GML32, "text/xml; subtype=gml/3.2", JSON)
COMPARISONS = ("PropertyIsEqualTo", "PropertyIsNotEqualTo", "PropertyIsLessThan", "PropertyIsGreaterThan",
               "PropertyIsLessThanOrEqualTo", "PropertyIsGreaterThanOrEqualTo", "PropertyIsLike",
               "PropertyIsNull", "PropertyIsBetween")
SPATIAL = ("BBOX", "Intersects", "Within")


def invalid(locator: str, message: str) -> OWSException:
    return OWSException("InvalidParameterValue", locator, message)


def render_wfs(request: Request, error: ServiceError) -> Response:
    """The WFS error handler's format: an OWS 1.1 exception report, version 2.0.0."""
    return Response(exception_report([error], version="2.0.0"), status_code=error.status, media_type="application/xml")


# --- request context ------------------------------------------------------------------------------


@dataclass
class Ctx:
    request: Request
    kvp: KVP
    catalog: Catalog
    key: str | None
    settings: Any

    @property
    def url(self) -> str:
        return base_url(self.request) + "/wfs"

    def link(self, **params: str) -> str:
        query = {"SERVICE": "WFS", "VERSION": "2.0.0", **params}
        apikey = self.kvp.get("apikey")
        if apikey:
            query["apikey"] = apikey
        return self.url + "?" + urlencode(query)

    def types(self) -> list[FeatureType]:
        return self.catalog.feature_types(self.key)

    def find(self, name: str, locator: str = "typeNames") -> FeatureType:
        """A type by `prefix:name`, or by its local name alone (the first such type)."""
        name = name.strip()
        visible = self.types()
        found = next((t for t in visible if t.name == name), None)
        if found is None and ":" not in name:
            found = next((t for t in visible if t.public.public_name == name), None)
        if found is None:
            raise invalid(locator, f"unknown feature type {echo(name)}")
        return found


def namespace(ctx: Ctx, prefix: str) -> str:
    return f"{ctx.url}/{prefix}"


# --- GetCapabilities ------------------------------------------------------------------------------


def _el(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    node = etree.SubElement(parent, tag, {k: v for k, v in attrs.items()})
    if text is not None:
        node.text = xml_text(text)
    return node


def _ows(name: str) -> str:
    return f"{{{OWS_NS}}}{name}"


def _constraint(parent: etree._Element, name: str, value: str) -> None:
    node = _el(parent, _ows("Constraint"), name=name)
    _el(node, _ows("NoValues"))
    _el(node, _ows("DefaultValue"), value)


def _operation(parent: etree._Element, ctx: Ctx, name: str, parameters: dict[str, Iterable[str]] | None = None) -> None:
    op = _el(parent, _ows("Operation"), name=name)
    http = _el(_el(op, _ows("DCP")), _ows("HTTP"))
    _el(http, _ows("Get"), **{f"{{{XLINK_NS}}}href": ctx.url + "?"})
    for pname, values in (parameters or {}).items():
        param = _el(op, _ows("Parameter"), name=pname)
        allowed = _el(param, _ows("AllowedValues"))
        for value in values:
            _el(allowed, _ows("Value"), value)


def capabilities(ctx: Ctx) -> bytes:
    settings = ctx.settings
    types = ctx.types()
    nsmap = {"wfs": WFS_NS, "ows": OWS_NS, "fes": FES_NS, "xlink": XLINK_NS, "gml": gml.GML_NS, "xsi": XSI_NS}
    for t in types:
        nsmap.setdefault(t.published.id, namespace(ctx, t.published.id))
    root = etree.Element(f"{{{WFS_NS}}}WFS_Capabilities", nsmap=nsmap, version="2.0.0")
    root.set(f"{{{XSI_NS}}}schemaLocation", f"{WFS_NS} {WFS_SCHEMA}")
    ident = _el(root, _ows("ServiceIdentification"))
    _el(ident, _ows("Title"), settings.service_title)
    _el(ident, _ows("Abstract"), settings.service_abstract)
    _el(ident, _ows("ServiceType"), "WFS", codeSpace="OGC")
    for version in VERSIONS:
        _el(ident, _ows("ServiceTypeVersion"), version)
    _el(ident, _ows("Fees"), "NONE")
    _el(ident, _ows("AccessConstraints"), "NONE")
    provider = _el(root, _ows("ServiceProvider"))
    _el(provider, _ows("ProviderName"), settings.provider_name)
    if settings.provider_site:
        _el(provider, _ows("ProviderSite"), **{f"{{{XLINK_NS}}}href": settings.provider_site})
    _el(provider, _ows("ServiceContact"))
    ops = _el(root, _ows("OperationsMetadata"))
    _operation(ops, ctx, "GetCapabilities", {"AcceptVersions": VERSIONS, "AcceptFormats": ("text/xml",)})
    _operation(ops, ctx, "DescribeFeatureType", {"outputFormat": (GML32,)})
    _operation(ops, ctx, "GetFeature", {"outputFormat": ADVERTISED_FORMATS, "resultType": ("results", "hits")})
    _operation(ops, ctx, "ListStoredQueries")
    _operation(ops, ctx, "DescribeStoredQueries")
    for name, value in (
        ("ImplementsBasicWFS", "TRUE"), ("ImplementsTransactionalWFS", "FALSE"), ("ImplementsLockingWFS", "FALSE"),
        ("KVPEncoding", "TRUE"), ("XMLEncoding", "FALSE"), ("SOAPEncoding", "FALSE"),
        ("ImplementsInheritance", "FALSE"), ("ImplementsRemoteResolve", "FALSE"), ("ImplementsResultPaging", "TRUE"),
        ("ImplementsStandardJoins", "FALSE"), ("ImplementsSpatialJoins", "FALSE"), ("ImplementsTemporalJoins", "FALSE"),
        ("ImplementsFeatureVersioning", "FALSE"), ("ManageStoredQueries", "FALSE"),
        ("CountDefault", str(settings.wfs_max_features)),
    ):
        _constraint(ops, name, value)
    type_list = _el(root, f"{{{WFS_NS}}}FeatureTypeList")
    for t in types:
        ft = _el(type_list, f"{{{WFS_NS}}}FeatureType")
        _el(ft, f"{{{WFS_NS}}}Name", t.name)
        _el(ft, f"{{{WFS_NS}}}Title", t.public.title or t.public.public_name)
        if t.public.abstract:
            _el(ft, f"{{{WFS_NS}}}Abstract", t.public.abstract)
        if t.public.keywords:
            keywords = _el(ft, _ows("Keywords"))
            for word in t.public.keywords:
                _el(keywords, _ows("Keyword"), word)
        _el(ft, f"{{{WFS_NS}}}DefaultCRS", crslib.urn(t.relation.srs))
        for other in OTHER_CRS:
            if not crslib.same(other, t.relation.srs):
                _el(ft, f"{{{WFS_NS}}}OtherCRS", crslib.urn(other))
        formats = _el(ft, f"{{{WFS_NS}}}OutputFormats")
        for fmt in ADVERTISED_FORMATS:
            _el(formats, f"{{{WFS_NS}}}Format", fmt)
        if t.wgs84_bbox is not None:
            box = _el(ft, _ows("WGS84BoundingBox"))
            west, south, east, north = (shortest(v) for v in t.wgs84_bbox)
            _el(box, _ows("LowerCorner"), f"{west} {south}")
            _el(box, _ows("UpperCorner"), f"{east} {north}")
    _filter_capabilities(root)
    return XML_DECLARATION + etree.tostring(root, encoding="UTF-8", pretty_print=True)


def _filter_capabilities(root: etree._Element) -> None:
    def fes(name: str) -> str:
        return f"{{{FES_NS}}}{name}"

    caps = _el(root, fes("Filter_Capabilities"))
    conformance = _el(caps, fes("Conformance"))
    for name, value in (
        ("ImplementsQuery", "TRUE"), ("ImplementsAdHocQuery", "TRUE"), ("ImplementsFunctions", "FALSE"),
        ("ImplementsResourceId", "TRUE"), ("ImplementsMinStandardFilter", "TRUE"),
        ("ImplementsStandardFilter", "TRUE"), ("ImplementsMinSpatialFilter", "TRUE"),
        ("ImplementsSpatialFilter", "FALSE"), ("ImplementsMinTemporalFilter", "FALSE"),
        ("ImplementsTemporalFilter", "FALSE"), ("ImplementsVersionNav", "FALSE"), ("ImplementsSorting", "TRUE"),
        ("ImplementsExtendedOperators", "FALSE"), ("ImplementsMinimumXPath", "FALSE"),
        ("ImplementsSchemaElementFunc", "FALSE"),
    ):
        node = _el(conformance, fes("Constraint"), name=name)
        _el(node, _ows("NoValues"))
        _el(node, _ows("DefaultValue"), value)
    _el(_el(caps, fes("Id_Capabilities")), fes("ResourceIdentifier"), name="fes:ResourceId")
    scalar = _el(caps, fes("Scalar_Capabilities"))
    _el(scalar, fes("LogicalOperators"))
    comparisons = _el(scalar, fes("ComparisonOperators"))
    for name in COMPARISONS:
        _el(comparisons, fes("ComparisonOperator"), name=name)
    spatial = _el(caps, fes("Spatial_Capabilities"))
    operands = _el(spatial, fes("GeometryOperands"))
    for name in ("gml:Envelope", "gml:Point", "gml:LineString", "gml:Polygon", "gml:MultiPoint",
                 "gml:MultiCurve", "gml:MultiSurface"):
        _el(operands, fes("GeometryOperand"), name=name)
    operators = _el(spatial, fes("SpatialOperators"))
    for name in SPATIAL:
        _el(operators, fes("SpatialOperator"), name=name)


async def get_capabilities(ctx: Ctx) -> Response:
    accept = ctx.kvp.get("acceptversions")
    if accept is not None and not any(v.strip() in VERSIONS for v in accept.split(",")):
        raise OWSException("VersionNegotiationFailed", None, f"only {', '.join(VERSIONS)} are served")
    body = capabilities(ctx)
    headers = document_headers(ctx.request, [t.published for t in ctx.types()])  # type: ignore[misc]
    return Response(body, media_type="application/xml", headers=headers)


# --- DescribeFeatureType --------------------------------------------------------------------------


def _type_names(ctx: Ctx) -> list[str]:
    raw = ctx.kvp.get("typenames") or ctx.kvp.get("typename") or ""
    raw = raw.strip()
    if raw.startswith("("):
        raise OWSException("OptionNotSupported", "typeNames", "one query per request: TYPENAMES takes no '(…)' lists")
    return [n for n in (v.strip() for v in raw.split(",")) if n]


async def describe_feature_type(ctx: Ctx) -> Response:
    fmt = ctx.kvp.get("outputformat")
    if fmt is not None and fmt.strip().lower() not in (GML32, "text/xml; subtype=gml/3.2", "xmlschema",
                                                        "application/gml+xml;version=3.2"):
        raise invalid("outputFormat", f"outputFormat {echo(fmt)} is not offered; use {GML32}")
    names = _type_names(ctx)
    types = [ctx.find(n) for n in names] if names else ctx.types()
    prefixes = list(dict.fromkeys(t.published.id for t in types))
    headers = document_headers(ctx.request, [t.published for t in types])  # type: ignore[misc]
    if len(prefixes) == 1:
        prefix = prefixes[0]
        body = gml.schema(prefix, namespace(ctx, prefix),
                          [(t.public.public_name, t.relation) for t in types if t.published.id == prefix])
        return Response(body, media_type=GML32, headers=headers)
    # types of several layers: one namespace each, imported from their own schemas
    parts = ['<?xml version="1.0" encoding="UTF-8"?>\n<xsd:schema xmlns:xsd="http://www.w3.org/2001/XMLSchema">\n']
    for prefix in prefixes:
        own = ",".join(t.name for t in types if t.published.id == prefix)
        url = ctx.link(REQUEST="DescribeFeatureType", TYPENAMES=own)
        parts.append(f"  <xsd:import namespace={gml.attr(namespace(ctx, prefix))} schemaLocation={gml.attr(url)}/>\n")
    parts.append("</xsd:schema>\n")
    return Response("".join(parts).encode(), media_type=GML32, headers=headers)


# --- stored queries -------------------------------------------------------------------------------


async def list_stored_queries(ctx: Ctx) -> Response:
    root = etree.Element(f"{{{WFS_NS}}}ListStoredQueriesResponse", nsmap={"wfs": WFS_NS, "xsi": XSI_NS})
    root.set(f"{{{XSI_NS}}}schemaLocation", f"{WFS_NS} {WFS_SCHEMA}")
    query = _el(root, f"{{{WFS_NS}}}StoredQuery", id=GET_FEATURE_BY_ID)
    _el(query, f"{{{WFS_NS}}}Title", "Get feature by identifier")
    for t in ctx.types():
        node = etree.SubElement(query, f"{{{WFS_NS}}}ReturnFeatureType", nsmap={t.published.id: namespace(ctx, t.published.id)})
        node.text = t.name
    return Response(XML_DECLARATION + etree.tostring(root, encoding="UTF-8"), media_type="application/xml",
                    headers=document_headers(ctx.request))


async def describe_stored_queries(ctx: Ctx) -> Response:
    wanted = ctx.kvp.get("storedquery_id")
    if wanted is not None and any(q.strip() != GET_FEATURE_BY_ID for q in wanted.split(",")):
        raise invalid("STOREDQUERY_ID", f"unknown stored query {echo(wanted)}")
    root = etree.Element(f"{{{WFS_NS}}}DescribeStoredQueriesResponse", nsmap={"wfs": WFS_NS, "xsi": XSI_NS})
    root.set(f"{{{XSI_NS}}}schemaLocation", f"{WFS_NS} {WFS_SCHEMA}")
    desc = _el(root, f"{{{WFS_NS}}}StoredQueryDescription", id=GET_FEATURE_BY_ID)
    _el(desc, f"{{{WFS_NS}}}Title", "Get feature by identifier")
    _el(desc, f"{{{WFS_NS}}}Abstract", "The feature whose gml:id is ID (404 NotFound when there is none)")
    parameter = etree.SubElement(desc, f"{{{WFS_NS}}}Parameter", nsmap={"xs": "http://www.w3.org/2001/XMLSchema"})
    parameter.set("name", "ID")
    parameter.set("type", "xs:string")
    expression = _el(desc, f"{{{WFS_NS}}}QueryExpressionText", isPrivate="true", language="urn:ogc:def:queryLanguage:OGC-WFS::WFSQueryExpression")
    expression.set("returnFeatureTypes", "")
    return Response(XML_DECLARATION + etree.tostring(root, encoding="UTF-8"), media_type="application/xml",
                    headers=document_headers(ctx.request))


# --- query parameters -----------------------------------------------------------------------------


def _int(ctx: Ctx, names: tuple[str, ...], default: int, minimum: int) -> int:
    for name in names:
        raw = ctx.kvp.get(name)
        if raw is not None:
            try:
                value = int(raw.strip())
            except ValueError:
                raise invalid(name, f"{name}={echo(raw)}: expected an integer") from None
            if value < minimum:
                raise invalid(name, f"{name} must be ≥ {minimum}")
            return value
    return default


def request_crs(text: str, locator: str) -> crslib.RequestCrs:
    try:
        return crslib.parse_crs(text)
    except ValueError:
        raise invalid(locator, f"unknown CRS {echo(text)}") from None


def parse_bbox(raw: str, relation: Relation, locator: str = "BBOX") -> tuple[float, float, float, float]:
    """`minx,miny,maxx,maxy[,crs]` in the CRS's axis order (no CRS: the type's default CRS)."""
    parts = [p.strip() for p in raw.split(",")]
    named = request_crs(parts.pop(), locator) if len(parts) == 5 else None
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or values[0] > values[2] or values[1] > values[3]:
        raise invalid(locator, f"{locator}={echo(raw)}: expected minx,miny,maxx,maxy[,crs]")
    if named is None:
        named = crslib.native(relation.srs)
    return bbox_in(relation, values, named)


def sort_by(raw: str | None, relation: Relation, locator: str = "SORTBY") -> tuple[tuple[str, bool], ...]:
    if raw is None or not raw.strip():
        return ()
    known = {a.name for a in relation.attributes}
    out = []
    for item in raw.split(","):
        words = item.split()
        if not words or len(words) > 2:
            raise invalid(locator, f"{echo(item)}: expected 'name [ASC|DESC]'")
        name = words[0].rsplit(":", 1)[-1]
        order = words[1].upper() if len(words) == 2 else "ASC"
        if name not in known or order not in ("ASC", "DESC", "A", "D"):
            raise invalid(locator, f"cannot sort by {echo(item)}")
        out.append((name, order.startswith("A")))
    return tuple(out)


# --- FES filters ----------------------------------------------------------------------------------

_GML_NAMESPACES = ("http://www.opengis.net/gml/3.2", "http://www.opengis.net/gml")


def _envelopes_to_polygons(root: etree._Element) -> None:
    """pygml reads an Envelope's corners without its srsName: write it as the Polygon it is."""
    for ns in _GML_NAMESPACES:
        for env in root.iter(f"{{{ns}}}Envelope"):
            lower = env.find(f"{{{ns}}}lowerCorner")
            upper = env.find(f"{{{ns}}}upperCorner")
            if lower is None or upper is None or not lower.text or not upper.text:
                raise invalid("FILTER", "an Envelope needs lowerCorner and upperCorner")
            (a, b), (c, d) = lower.text.split()[:2], upper.text.split()[:2]
            polygon = etree.Element(f"{{{ns}}}Polygon", nsmap={"gml": ns})
            if env.get("srsName"):
                polygon.set("srsName", env.get("srsName"))
            if ns == _GML_NAMESPACES[0]:
                polygon.set(f"{{{ns}}}id", "envelope")
            ring = etree.SubElement(etree.SubElement(polygon, f"{{{ns}}}exterior"), f"{{{ns}}}LinearRing")
            etree.SubElement(ring, f"{{{ns}}}posList").text = f"{a} {b} {a} {d} {c} {d} {c} {b} {a} {b}"
            parent = env.getparent()
            if parent is not None:
                parent.replace(env, polygon)


def parse_filter(raw: str, relation: Relation) -> Any:
    """FES 2.0 XML → pygeofilter AST in the relation's terms (attribute names, srs, value types)."""
    from pygeofilter.parsers.fes import parse as parse_fes

    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    try:
        root = etree.fromstring(raw.strip().encode(), parser)
    except etree.XMLSyntaxError as exc:
        raise invalid("FILTER", f"the filter is not well-formed XML: {xml_text(str(exc))[:200]}") from None
    if etree.QName(root).namespace != FES_NS or etree.QName(root).localname != "Filter":
        raise invalid("FILTER", "expected a fes:Filter (FES 2.0)")
    _envelopes_to_polygons(root)
    try:
        tree = parse_fes(root)
    except OWSException:
        raise
    except Exception as exc:  # pygeofilter raises bare errors on what it does not know
        raise invalid("FILTER", f"cannot read the filter: {type(exc).__name__}") from None
    return _rewrite(tree, relation)


def _rewrite(node: Any, relation: Relation) -> Any:
    from pygeofilter import ast, values

    allowed = (ast.And, ast.Or, ast.Not, ast.Equal, ast.NotEqual, ast.LessThan, ast.LessEqual, ast.GreaterThan,
               ast.GreaterEqual, ast.Between, ast.Like, ast.IsNull, ast.GeometryIntersects, ast.GeometryWithin,
               ast.GeometryDisjoint)
    types = {a.name: a.type for a in relation.attributes}
    geometry_column = relation.geometry_column

    def attribute(name: str) -> Any:
        local = name.strip().rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        if local not in types and local != geometry_column:
            raise invalid("FILTER", f"{echo(name)} is not a property of {relation.name}")
        return ast.Attribute(local)

    def geometry(value: Any) -> Any:
        from pygml.axisorder import is_crs_yx

        data = dict(value.geometry)
        name = (data.pop("crs", None) or {}).get("properties", {}).get("name")
        geom = shapely.geometry.shape(data)
        source = relation.srs
        if name:
            named = request_crs(name, "FILTER")
            try:
                swapped = is_crs_yx(name)
            except ValueError:
                swapped = False
            if swapped != named.yx:  # pygml's axis rule and ours differ for this form: follow ours
                geom = crslib.swap(geom)
            source = named.code
        geom = crslib.transform(geom, source, relation.srs)
        return values.Geometry(shapely.geometry.mapping(geom))

    def coerce(attr: Any, value: Any) -> Any:
        kind = types.get(attr.name) if isinstance(attr, ast.Attribute) else None
        if not isinstance(value, str) or kind is None:
            return value
        try:
            if kind == "integer":
                return int(value)
            if kind == "real":
                return float(value)
            if kind == "boolean":
                return value.strip().lower() in ("true", "1")
        except ValueError:
            raise invalid("FILTER", f"{echo(value)} is not a value of {attr.name}") from None
        return value

    def walk(item: Any) -> Any:
        if isinstance(item, ast.Attribute):
            return attribute(item.name)
        if isinstance(item, values.Geometry):
            return geometry(item)
        if isinstance(item, ast.Node):
            if not isinstance(item, allowed):
                raise OWSException("OptionNotSupported", "FILTER", f"{type(item).__name__} is not supported")
            new = copy.copy(item)
            for key, value in vars(item).items():
                setattr(new, key, walk(value))
            if isinstance(new, ast.GeometryDisjoint | ast.GeometryIntersects | ast.GeometryWithin) and new.lhs is None:
                if geometry_column is None:
                    raise invalid("FILTER", f"{relation.name} has no geometry")
                new.lhs = ast.Attribute(geometry_column)
            if isinstance(new, ast.Comparison | ast.Between):
                for key in ("rhs", "low", "high"):
                    if hasattr(new, key):
                        setattr(new, key, coerce(new.lhs, getattr(new, key)))
            return new
        if isinstance(item, list | tuple):
            return type(item)(walk(v) for v in item)
        if isinstance(item, datetime.timedelta):
            raise OWSException("OptionNotSupported", "FILTER", "temporal operators are not supported")
        return item

    return walk(node)


# --- GetFeature -----------------------------------------------------------------------------------


def _output(ctx: Ctx) -> str:
    raw = ctx.kvp.get("outputformat")
    if raw is None or not raw.strip():
        return "gml"
    fmt = OUTPUT_FORMATS.get(" ".join(raw.strip().lower().split()))
    if fmt is None:
        raise invalid("outputFormat", f"outputFormat {echo(raw)} is not offered ({', '.join(ADVERTISED_FORMATS)})")
    return fmt


def _split_id(ctx: Ctx, value: str, locator: str) -> tuple[FeatureType, Any]:
    """`public_name.fid` → (type, primary key value); unknown types are InvalidParameterValue."""
    name, dot, fid = value.strip().rpartition(".")
    if not dot or not name or not fid:
        raise invalid(locator, f"{echo(value)} is not a feature identifier (name.id)")
    feature_type = ctx.find(name, locator)
    return feature_type, key_value(feature_type.relation, fid)


def plan_get_feature(ctx: Ctx) -> Plan:
    kvp = ctx.kvp
    output = _output(ctx)
    stored = kvp.get("storedquery_id")
    by_id = False
    ids: tuple[Any, ...] | None = None
    if stored is not None:
        if stored.strip() != GET_FEATURE_BY_ID:
            raise invalid("STOREDQUERY_ID", f"unknown stored query {echo(stored)}")
        feature_type, fid = _split_id(ctx, kvp.require("ID"), "ID")
        ids, by_id = (fid,), True
    elif kvp.get("resourceid") or kvp.get("featureid"):
        locator = "RESOURCEID" if kvp.get("resourceid") else "FEATUREID"
        pairs = [_split_id(ctx, v, locator) for v in (kvp.get(locator) or "").split(",") if v.strip()]
        if len({p[0].name for p in pairs}) != 1:
            raise OWSException("OptionNotSupported", locator, "the identifiers must name features of one type")
        feature_type, ids = pairs[0][0], tuple(p[1] for p in pairs)
    else:
        names = _type_names(ctx)
        if not names:
            raise OWSException("MissingParameterValue", "typeNames", "parameter TYPENAMES is required")
        if len(names) > 1:
            raise OWSException("OptionNotSupported", "typeNames", "one feature type per request")
        feature_type = ctx.find(names[0])
    relation = feature_type.relation
    exclusive = [name for name in ("BBOX", "FILTER") if kvp.get(name)]
    if ids is not None and exclusive or len(exclusive) > 1:
        raise invalid(exclusive[-1], "BBOX, FILTER and RESOURCEID exclude each other")
    bbox = parse_bbox(kvp.get("BBOX") or "", relation) if kvp.get("BBOX") else None
    language = kvp.get("filter_language")
    if language and language.strip() not in ("urn:ogc:def:query:OGC-FES:Filter", "urn:ogc:def:queryLanguage:OGC-FES:Filter"):
        raise invalid("FILTER_LANGUAGE", f"{echo(language)}: only FES 2.0 filters are read")
    flt = parse_filter(kvp.get("FILTER") or "", relation) if kvp.get("FILTER") else None
    limit_max = ctx.settings.wfs_max_features
    count = min(_int(ctx, ("count", "maxfeatures"), limit_max, 0), limit_max)
    start = _int(ctx, ("startindex",), 0, 0)
    srs = kvp.get("srsname")
    out_crs = request_crs(srs, "SRSNAME") if srs and srs.strip() else crslib.native(relation.srs)
    result_type = (kvp.get("resulttype") or "results").strip().lower()
    if result_type not in ("results", "hits"):
        raise invalid("resultType", "resultType is results or hits")
    query = Query(
        relation=relation.name,
        bbox=bbox,
        filter=flt,
        ids=ids,
        properties=property_names(kvp.get("propertyname"), relation),
        sortby=sort_by(kvp.get("sortby"), relation),
        offset=0 if by_id else start,
        limit=1 if by_id else count,
    )
    return Plan(feature_type, query, output, out_crs, result_type == "hits", by_id)


def page_links(ctx: Ctx, plan: Plan, matched: int, returned: int) -> dict[str, str]:
    """`next`/`previous`: this request with STARTINDEX moved by COUNT."""
    q = plan.query
    count = q.limit or 0
    out: dict[str, str] = {}

    def moved(start: int) -> str:
        params = {k: v for k, v in _params(ctx).items() if k.lower() not in ("startindex", "count", "maxfeatures")}
        params["STARTINDEX"] = str(start)
        params["COUNT"] = str(count)
        return ctx.url + "?" + urlencode(params)

    if count and q.offset + returned < matched:
        out["next"] = moved(q.offset + count)
    if count and q.offset > 0:
        out["previous"] = moved(max(0, q.offset - count))
    return out


def _params(ctx: Ctx) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(ctx.request.url.query, keep_blank_values=True))


async def get_feature(ctx: Ctx) -> Response:
    plan = plan_get_feature(ctx)
    feature_type = plan.type
    headers = map_headers([feature_type.published], ctx.settings)
    if plan.by_id:
        found, first = await open_stream(plan)
        found.close()
        if not first:
            raise OWSException("NotFound", "ID", f"no feature {echo(ctx.kvp.get('ID'))}", status=404)
        return Response(_single(ctx, plan, first[0]), media_type=GML32 if plan.output == "gml" else GEOJSON,
                        headers=headers)
    matched = await count_matched(plan)
    returned = 0 if plan.hits else max(0, min(plan.query.limit or 0, matched - plan.query.offset))
    links = {} if plan.hits else page_links(ctx, plan, matched, returned)
    stream = None if plan.hits or returned == 0 else (await open_stream(plan))[0]
    if plan.output == "json":
        body = _json_body(ctx, plan, matched, returned, links, stream)
        return StreamingResponse(body, media_type=GEOJSON, headers=headers)
    body = _gml_body(ctx, plan, matched, returned, links, stream)
    return StreamingResponse(body, media_type=GML32, headers=headers)


def _single(ctx: Ctx, plan: Plan, item: Feature) -> bytes:
    t = plan.type
    geom = written(item.geometry, t.relation, plan.out_crs)
    if plan.output == "json":
        return geojson.feature(item.id, item.properties, geom, plan.query.properties)
    prefix = t.published.id
    element = gml.feature(prefix, t.relation, t.public.public_name, item.id, item.properties, geom,
                          plan.out_crs.text, plan.query.properties)
    head = f"<{prefix}:{t.public.public_name} "
    declared = (f'{head}xmlns:{prefix}={gml.attr(namespace(ctx, prefix))} xmlns:gml="{gml.GML_NS}" '
                f'xmlns:xsi="{XSI_NS}" xsi:schemaLocation={gml.attr(_schema_location(ctx, plan))} ')
    return XML_DECLARATION + element.replace(head, declared, 1).encode()


def _schema_location(ctx: Ctx, plan: Plan) -> str:
    prefix = plan.type.published.id
    describe = ctx.link(REQUEST="DescribeFeatureType", TYPENAMES=plan.type.name)
    return f"{WFS_NS} {WFS_SCHEMA} {namespace(ctx, prefix)} {describe}"


async def _gml_body(ctx: Ctx, plan: Plan, matched: int, returned: int, links: dict[str, str],
                    stream: FeatureStream | None) -> AsyncIterator[bytes]:
    t = plan.type
    prefix = t.published.id
    attrs = " ".join(f"{k}={gml.attr(v)}" for k, v in links.items())
    yield XML_DECLARATION + (
        f'<wfs:FeatureCollection xmlns:wfs="{WFS_NS}" xmlns:gml="{gml.GML_NS}" xmlns:xsi="{XSI_NS}" '
        f"xmlns:{prefix}={gml.attr(namespace(ctx, prefix))} xsi:schemaLocation={gml.attr(_schema_location(ctx, plan))} "
        f'timeStamp="{timestamp()}" numberMatched="{matched}" numberReturned="{returned}" {attrs}>\n'
    ).encode()
    srs = plan.out_crs.text
    async for batch in batches(stream):
        parts = []
        for item in batch:
            geom = written(item.geometry, t.relation, plan.out_crs)
            element = gml.feature(prefix, t.relation, t.public.public_name, item.id, item.properties, geom, srs,
                                  plan.query.properties)
            parts.append(f"<wfs:member>{element}</wfs:member>\n")
        yield "".join(parts).encode()
    yield b"</wfs:FeatureCollection>\n"


async def _json_body(ctx: Ctx, plan: Plan, matched: int, returned: int, links: dict[str, str],
                     stream: FeatureStream | None) -> AsyncIterator[bytes]:
    t = plan.type
    head: dict[str, Any] = {"type": "FeatureCollection", "timeStamp": timestamp(), "numberMatched": matched,
                            "numberReturned": returned}
    if not crslib.same(plan.out_crs.code, "OGC:CRS84") or plan.out_crs.yx:
        head["crs"] = {"type": "name", "properties": {"name": plan.out_crs.text}}
    head["links"] = [{"href": href, "rel": rel, "type": GEOJSON} for rel, href in links.items()]
    yield orjson.dumps(head)[:-1] + b',"features":['
    sep = b""
    async for batch in batches(stream):
        yield sep + features_json(t.relation, batch, plan.out_crs, plan.query.properties)
        sep = b","
    yield b"]}"


# --- dispatch -------------------------------------------------------------------------------------

Operation = Callable[[Ctx], Any]
OPERATIONS: dict[str, Operation] = {
    "getcapabilities": get_capabilities,
    "describefeaturetype": describe_feature_type,
    "getfeature": get_feature,
    "liststoredqueries": list_stored_queries,
    "describestoredqueries": describe_stored_queries,
}


async def endpoint(request: Request) -> Response:
    try:
        kvp = KVP.from_request(request)
        service = kvp.get("service")
        name = kvp.require("request", "request")
        if service is not None and service.strip().upper() != "WFS":
            raise invalid("service", f"service {echo(service)} is not WFS")
        operation = OPERATIONS.get(name.strip().lower())
        if operation is None:
            raise OWSException("OperationNotSupported", "request", f"operation {echo(name)} is not supported")
        if name.strip().lower() != "getcapabilities":
            if service is None:
                raise OWSException("MissingParameterValue", "service", "parameter SERVICE is required")
            version = kvp.require("version", "version")
            if version.strip() not in VERSIONS:
                raise invalid("version", f"version {echo(version)} is not served ({', '.join(VERSIONS)})")
        runtime = get_runtime(request)
        ctx = Ctx(request, kvp, runtime.catalog, key_hash(request), runtime.settings)
        return await operation(ctx)
    except ServiceError as exc:
        return error_response(request, exc, render_wfs)


def routes() -> list[BaseRoute]:
    register("wfs", render_wfs)
    return [Route("/wfs", endpoint, methods=["GET"])]
