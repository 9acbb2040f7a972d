"""WFS 2.0 at /wfs over a GeoPackage vector base, over real HTTP (uvicorn on loopback).

Checked with independent clients and readers: OWSLib reads the capabilities and features, pyogrio reads
the source, the official WFS 2.0 / GML 3.2.1 schemas (tests/schemas/ogc-wfs20, resolved offline)
validate the documents, and GDAL's own WFS client reads the service when gdal-bin is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
import shapely
from apputil import live_server, make_settings
from lxml import etree
from pyogrio.raw import read as raw_read
from vectorutil import make_gpkg

SCHEMAS = Path(__file__).parent / "schemas" / "ogc-wfs20"
WFS = "http://www.opengis.net/wfs/2.0"
GML = "http://www.opengis.net/gml/3.2"
OWS = "http://www.opengis.net/ows/1.1"
NS = {"wfs": WFS, "gml": GML, "ows": OWS}

_LOCAL = {
    "http://www.w3.org/2001/xml.xsd": "xml.xsd",
    "http://www.w3.org/2009/01/xml.xsd": "xml.xsd",
    "http://www.w3.org/1999/xlink.xsd": "xlink.xsd",
    "http://www.w3.org/XML/2008/06/xlink.xsd": "xlink.xsd",
    "http://schemas.opengis.net/gml/3.2.1/gml.xsd": "gml-3.2.1.xsd",
    "http://schemas.opengis.net/ows/1.1.0/owsAll.xsd": "ows-1.1.0.xsd",
    "http://schemas.opengis.net/filter/2.0/filterAll.xsd": "filter-2.0.2.xsd",
    "http://schemas.opengis.net/wfs/2.0/wfs.xsd": "wfs.xsd",
    **{f"http://schemas.opengis.net/iso/19139/20070417/{n}/{n}.xsd": f"{n}-2007.xsd"
       for n in ("gco", "gmd", "gsr", "gss", "gts")},
}


class OfflineSchemas(etree.Resolver):
    """The OASIS catalog of ets-wfs20 as an lxml resolver; `extra` maps URLs to documents in memory."""

    def __init__(self, extra: dict[str, bytes] | None = None) -> None:
        super().__init__()
        self.extra = extra or {}

    def resolve(self, url, pubid, context):  # noqa: ANN001
        if url in _LOCAL:
            return self.resolve_filename(str(SCHEMAS / _LOCAL[url]), context)
        if url in self.extra:
            return self.resolve_string(self.extra[url], context)
        raise AssertionError(f"schema {url} would be fetched from the network")


def schema(document: bytes, extra: dict[str, bytes] | None = None) -> etree.XMLSchema:
    parser = etree.XMLParser(no_network=True)
    parser.resolvers.add(OfflineSchemas(extra))
    return etree.XMLSchema(etree.fromstring(document, parser))


def wfs_schema() -> etree.XMLSchema:
    return schema(b'<xsd:schema xmlns:xsd="http://www.w3.org/2001/XMLSchema">'
                  b'<xsd:import namespace="http://www.opengis.net/wfs/2.0" '
                  b'schemaLocation="http://schemas.opengis.net/wfs/2.0/wfs.xsd"/></xsd:schema>')


def assert_valid(xsd: etree.XMLSchema, document: bytes) -> None:
    tree = etree.fromstring(document)
    if not xsd.validate(tree):
        raise AssertionError("\n".join(str(e) for e in xsd.error_log)[:3000])


# --- the server -----------------------------------------------------------------------------------

ADMIN = {"Authorization": "Bearer secret"}


def wfs_descriptor(gpkg: Path | str, restricted: bool = False, name: str = "bdtopo") -> dict:
    """`gpkg`: a GeoPackage file, or a PostGIS base's URL."""
    return {
        "title": "BD TOPO extract", "abstract": "two tables", "name": name,
        "wfs": {"base": gpkg if isinstance(gpkg, str) else f"file://{gpkg}", "relations": [
            {"native_name": "communes", "public_name": "commune", "title": "Communes", "keywords": ["admin"],
             "abstract": "polygons"},
            {"native_name": "gares", "public_name": "gare", "title": "Gares"},
        ]},
        **({"restricted": True} if restricted else {}),
    }


@pytest.fixture(scope="module", params=["gpkg", "postgis"])
def server(request, tmp_path_factory):
    """The server publishing make_gpkg's base: the file itself, then the same delivery integrated
    into a PostGIS schema (every test of this module runs on both backends)."""
    tmp = tmp_path_factory.mktemp("wfs")
    gpkg = make_gpkg(tmp / "base.gpkg")
    base: Path | str = gpkg
    vector_db_url = ""
    if request.param == "postgis":
        from tileserver.vector import pgintegrate, postgis
        from tileserver.vector.delivery import check_delivery

        vector_db_url = request.getfixturevalue("postgis_url")
        postgis.configure(vector_db_url)
        base = postgis.descriptor_url(vector_db_url, postgis.new_schema())
        report = check_delivery([gpkg], None, tmp / "work")
        assert report.ok, report.problems
        pgintegrate.integrate(report, base)
    settings = make_settings(tmp, vector_db_url=vector_db_url)
    with live_server(settings) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            r = client.post("/admin/layers/bdtopo", json=wfs_descriptor(base), headers=ADMIN)
            assert r.status_code == 204, r.text
            r = client.post("/admin/layers/prive", json=wfs_descriptor(base, True, "prive"), headers=ADMIN)
            assert r.status_code == 204, r.text
            key = client.post("/admin/keys", json={"name": "k", "layers": ["prive"]}, headers=ADMIN).json()["key"]
        yield {"url": url, "gpkg": gpkg, "key": key, "tmp": tmp}


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server["url"], timeout=30) as client:
        yield client


def get(http, **params):
    return http.get("/wfs", params={"SERVICE": "WFS", "VERSION": "2.0.0", **params})


def source(gpkg: Path, layer: str):
    """The relation read independently (GDAL through pyogrio): {fid: (properties, geometry)}."""
    meta, fids, geometry, fields = raw_read(gpkg, layer=layer, return_fids=True)
    names = list(meta["fields"])
    out = {}
    for i, fid in enumerate(fids):
        out[int(fid)] = ({n: (v[i].item() if hasattr(v[i], "item") else v[i]) for n, v in zip(names, fields, strict=True)},
                         shapely.from_wkb(geometry[i]))
    return out


def features_of(document: bytes, local: str = "commune", prefix_ns: str | None = None):
    root = etree.fromstring(document)
    out = {}
    for member in root.iterfind(f"{{{WFS}}}member"):
        feature = member[0]
        assert etree.QName(feature).localname == local
        fid = int(feature.get(f"{{{GML}}}id").rsplit(".", 1)[1])
        out[fid] = {etree.QName(c).localname: c for c in feature}
    return root, out


# --- capabilities and schemas ---------------------------------------------------------------------


def test_capabilities_read_by_owslib_and_valid(server, http):
    from owslib.wfs import WebFeatureService

    wfs = WebFeatureService(server["url"] + "/wfs", version="2.0.0")
    assert set(wfs.contents) == {"bdtopo:commune", "bdtopo:gare"}  # the restricted layer is invisible
    commune = wfs.contents["bdtopo:commune"]
    assert commune.title == "Communes"
    assert "EPSG:2154" in str(commune.crsOptions[0]) or "2154" in commune.crsOptions[0].getcode()
    west, south, east, north = commune.boundingBoxWGS84
    assert 0 < west < east < 10 and 40 < south < north < 52
    assert {op.name for op in wfs.operations} >= {"GetCapabilities", "DescribeFeatureType", "GetFeature"}
    body = get(http, REQUEST="GetCapabilities").content
    assert_valid(wfs_schema(), body)
    root = etree.fromstring(body)
    assert root.findtext(".//wfs:FeatureType/wfs:DefaultCRS", namespaces=NS) == "urn:ogc:def:crs:EPSG::2154"
    assert "fes:Filter_Capabilities" not in body.decode() or b"Intersects" in body


def test_describe_feature_type_is_a_valid_schema_matching_the_source(server, http):
    r = get(http, REQUEST="DescribeFeatureType", TYPENAMES="bdtopo:commune")
    assert r.status_code == 200
    xsd = schema(r.content)  # compiles against GML 3.2.1
    assert xsd is not None
    root = etree.fromstring(r.content)
    elements = {e.get("name"): e.get("type") for e in root.iter("{http://www.w3.org/2001/XMLSchema}element")}
    assert elements["nom"] == "xsd:string"
    assert elements["population"] == "xsd:long"
    assert elements["surface"] == "xsd:double"
    assert elements["geom"] == "gml:SurfacePropertyType"
    assert elements["commune"] == "bdtopo:communeType"
    assert get(http, REQUEST="DescribeFeatureType", TYPENAMES="gare").status_code == 200  # without the prefix


# --- GetFeature -----------------------------------------------------------------------------------


def feature_collection_schema(http, typename: str) -> etree.XMLSchema:
    """wfs.xsd plus the server's own DescribeFeatureType answer, resolved offline."""
    dft = get(http, REQUEST="DescribeFeatureType", TYPENAMES=typename).content
    namespace = etree.fromstring(dft).get("targetNamespace")
    return schema(
        ('<xsd:schema xmlns:xsd="http://www.w3.org/2001/XMLSchema">'
         '<xsd:import namespace="http://www.opengis.net/wfs/2.0" schemaLocation="http://schemas.opengis.net/wfs/2.0/wfs.xsd"/>'
         f'<xsd:import namespace="{namespace}" schemaLocation="urn:test:dft"/></xsd:schema>').encode(),
        {"urn:test:dft": dft},
    )


def test_getfeature_owslib_equals_source_and_gml_is_valid(server, http):
    from owslib.wfs import WebFeatureService

    wfs = WebFeatureService(server["url"] + "/wfs", version="2.0.0")
    body = wfs.getfeature(typename=["bdtopo:commune"]).read()
    expected = source(server["gpkg"], "communes")
    root, got = features_of(body)
    assert root.get("numberMatched") == str(len(expected)) == root.get("numberReturned")
    assert set(got) == set(expected)
    for fid, (props, geom) in expected.items():
        assert got[fid]["nom"].text == props["nom"]
        assert int(got[fid]["population"].text) == props["population"]
        assert float(got[fid]["surface"].text) == props["surface"]
        poslist = got[fid]["geom"].find(f".//{{{GML}}}posList").text.split()
        coords = list(zip(map(float, poslist[0::2]), map(float, poslist[1::2]), strict=True))
        assert shapely.Polygon(coords).equals(geom)
    assert_valid(feature_collection_schema(http, "bdtopo:commune"), body)


def test_geojson_output_equals_source(server, http):
    r = get(http, REQUEST="GetFeature", TYPENAMES="bdtopo:gare", OUTPUTFORMAT="application/json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/geo+json")
    doc = r.json()
    expected = source(server["gpkg"], "gares")
    assert doc["numberMatched"] == doc["numberReturned"] == len(expected) == len(doc["features"])
    for feature in doc["features"]:
        props, geom = expected[feature["id"]]
        assert feature["properties"]["nom"] == props["nom"]
        # EPSG:4326 as a URN is latitude first (WFS 2.0): the point comes back swapped
        assert shapely.geometry.shape(feature["geometry"]).equals(shapely.Point(geom.y, geom.x))


def test_paging_follows_next_links_to_the_end(server, http):
    seen: list[int] = []
    url = f"{server['url']}/wfs?" + urlencode({"SERVICE": "WFS", "VERSION": "2.0.0", "REQUEST": "GetFeature",
                                                "TYPENAMES": "bdtopo:commune", "COUNT": "10", "SORTBY": "population DESC"})
    pages = 0
    previous_population = None
    while url:
        r = http.get(url)
        assert r.status_code == 200
        root, got = features_of(r.content)
        assert root.get("numberMatched") == "37"
        assert int(root.get("numberReturned")) == len(got) <= 10
        for member in root.iterfind(f"{{{WFS}}}member"):
            population = int(member[0].findtext("{*}population"))
            assert previous_population is None or population <= previous_population
            previous_population = population
        seen += list(got)
        if pages:
            assert root.get("previous")
        url = root.get("next")
        pages += 1
    assert pages == 4
    assert sorted(seen) == sorted(source(server["gpkg"], "communes"))  # nothing lost or repeated


def test_hits_count_only(http):
    r = get(http, REQUEST="GetFeature", TYPENAMES="bdtopo:commune", RESULTTYPE="hits")
    root = etree.fromstring(r.content)
    assert root.get("numberMatched") == "37" and root.get("numberReturned") == "0"
    assert root.find(f"{{{WFS}}}member") is None


def test_bbox_axis_order_and_srsname(server, http):
    expected = {fid for fid, (_, g) in source(server["gpkg"], "gares").items() if g.x <= 2.45 and g.y <= 48.3}
    assert 0 < len(expected) < 12
    # URN EPSG:4326 is lat,lon; short EPSG:4326 and CRS84 are lon,lat
    for bbox in ("47.9,1.9,48.3,2.45,urn:ogc:def:crs:EPSG::4326", "1.9,47.9,2.45,48.3,EPSG:4326",
                 "1.9,47.9,2.45,48.3,urn:ogc:def:crs:OGC:1.3:CRS84", "47.9,1.9,48.3,2.45"):
        r = get(http, REQUEST="GetFeature", TYPENAMES="bdtopo:gare", BBOX=bbox, OUTPUTFORMAT="json")
        assert {f["id"] for f in r.json()["features"]} == expected, bbox
    # reprojected: the communes in Lambert-93, asked for in Web Mercator and as lon/lat
    r = get(http, REQUEST="GetFeature", TYPENAMES="bdtopo:commune", SRSNAME="EPSG:3857", COUNT="1",
            RESOURCEID="commune.1", OUTPUTFORMAT="json")
    feature = r.json()["features"][0]
    from pyproj import Transformer

    props, geom = source(server["gpkg"], "communes")[1]
    to3857 = Transformer.from_crs("EPSG:2154", "EPSG:3857", always_xy=True)
    expected3857 = shapely.transform(geom, lambda xy: shapely.get_coordinates(
        shapely.points(*to3857.transform(xy[:, 0], xy[:, 1]))))
    assert shapely.geometry.shape(feature["geometry"]).equals_exact(expected3857, 1e-3)
    r = get(http, REQUEST="GetFeature", TYPENAMES="bdtopo:commune", SRSNAME="urn:ogc:def:crs:EPSG::4326",
            RESOURCEID="commune.1")
    pos = etree.fromstring(r.content).find(f".//{{{GML}}}posList").text.split()
    assert 40 < float(pos[0]) < 52 and 0 < float(pos[1]) < 10  # latitude first
    assert etree.fromstring(r.content).find(f".//{{{GML}}}Polygon").get("srsName") == "urn:ogc:def:crs:EPSG::4326"


FES = 'xmlns:fes="http://www.opengis.net/fes/2.0" xmlns:gml="http://www.opengis.net/gml/3.2"'


def test_fes_filters(server, http):
    communes = source(server["gpkg"], "communes")

    def ids(flt: str, typename: str = "bdtopo:commune") -> set[int]:
        r = get(http, REQUEST="GetFeature", TYPENAMES=typename, FILTER=flt, OUTPUTFORMAT="json")
        assert r.status_code == 200, r.text
        return {f["id"] for f in r.json()["features"]}

    flt = (f'<fes:Filter {FES}><fes:And><fes:PropertyIsGreaterThan><fes:ValueReference>bdtopo:population'
           '</fes:ValueReference><fes:Literal>5000</fes:Literal></fes:PropertyIsGreaterThan>'
           '<fes:Not><fes:PropertyIsEqualTo><fes:ValueReference>nom</fes:ValueReference>'
           '<fes:Literal>commune-05</fes:Literal></fes:PropertyIsEqualTo></fes:Not></fes:And></fes:Filter>')
    assert ids(flt) == {f for f, (p, _) in communes.items() if p["population"] > 5000 and p["nom"] != "commune-05"}
    flt = (f'<fes:Filter {FES}><fes:PropertyIsLike wildCard="*" singleChar="." escapeChar="!">'
           '<fes:ValueReference>nom</fes:ValueReference><fes:Literal>commune-1*</fes:Literal></fes:PropertyIsLike></fes:Filter>')
    assert ids(flt) == {f for f, (p, _) in communes.items() if p["nom"].startswith("commune-1")}
    window = shapely.box(600000, 6800000, 605500, 6802500)
    flt = (f'<fes:Filter {FES}><fes:BBOX><fes:ValueReference>geom</fes:ValueReference>'
           '<gml:Envelope srsName="urn:ogc:def:crs:EPSG::2154"><gml:lowerCorner>600000 6800000</gml:lowerCorner>'
           '<gml:upperCorner>605500 6802500</gml:upperCorner></gml:Envelope></fes:BBOX></fes:Filter>')
    assert ids(flt) == {f for f, (_, g) in communes.items() if g.intersects(window)} != set()
    within = shapely.box(1.95, 47.95, 2.42, 48.5)
    gares = source(server["gpkg"], "gares")
    flt = (f'<fes:Filter {FES}><fes:Within><fes:ValueReference>geom</fes:ValueReference>'
           '<gml:Polygon gml:id="p1" srsName="urn:ogc:def:crs:EPSG::4326"><gml:exterior><gml:LinearRing><gml:posList>'
           '47.95 1.95 48.5 1.95 48.5 2.42 47.95 2.42 47.95 1.95</gml:posList></gml:LinearRing></gml:exterior>'
           '</gml:Polygon></fes:Within></fes:Filter>')
    assert ids(flt, "bdtopo:gare") == {f for f, (_, g) in gares.items() if g.within(within)} != set()
    flt = flt.replace("Within", "Intersects")
    assert ids(flt, "bdtopo:gare") == {f for f, (_, g) in gares.items() if g.intersects(within)}
    # errors: not XML, unknown property, unsupported operator
    for bad, code in (("<fes:Filter", "InvalidParameterValue"),
                      (f'<fes:Filter {FES}><fes:PropertyIsEqualTo><fes:ValueReference>nope</fes:ValueReference>'
                       '<fes:Literal>1</fes:Literal></fes:PropertyIsEqualTo></fes:Filter>', "InvalidParameterValue")):
        r = get(http, REQUEST="GetFeature", TYPENAMES="bdtopo:commune", FILTER=bad)
        assert r.status_code == 400
        assert etree.fromstring(r.content).find(f"{{{OWS}}}Exception").get("exceptionCode") == code


def test_propertyname_and_resourceid(http):
    r = get(http, REQUEST="GetFeature", TYPENAMES="bdtopo:commune", PROPERTYNAME="nom",
            RESOURCEID="commune.2,commune.7")
    root, got = features_of(r.content)
    assert set(got) == {2, 7}
    assert all(set(children) == {"nom"} for children in got.values())


def test_get_feature_by_id_stored_query(server, http):
    from owslib.wfs import WebFeatureService

    wfs = WebFeatureService(server["url"] + "/wfs", version="2.0.0")
    assert any(q.id == "urn:ogc:def:query:OGC-WFS::GetFeatureById" for q in wfs.storedqueries)
    r = get(http, REQUEST="GetFeature", STOREDQUERY_ID="urn:ogc:def:query:OGC-WFS::GetFeatureById", ID="gare.3")
    assert r.status_code == 200
    root = etree.fromstring(r.content)
    assert etree.QName(root).localname == "gare" and root.get(f"{{{GML}}}id") == "gare.3"
    assert root.findtext("{*}nom") == source(server["gpkg"], "gares")[3][0]["nom"]
    r = get(http, REQUEST="GetFeature", STOREDQUERY_ID="urn:ogc:def:query:OGC-WFS::GetFeatureById", ID="gare.999")
    assert r.status_code == 404
    assert etree.fromstring(r.content).find(f"{{{OWS}}}Exception").get("exceptionCode") == "NotFound"
    assert get(http, REQUEST="DescribeStoredQueries").status_code == 200


@pytest.mark.parametrize(
    ("params", "status", "code", "locator"),
    [
        ({"REQUEST": "GetFeature"}, 400, "MissingParameterValue", "typeNames"),
        ({"REQUEST": "GetFeature", "TYPENAMES": "bdtopo:nope"}, 400, "InvalidParameterValue", "typeNames"),
        ({"REQUEST": "Transaction"}, 501, "OperationNotSupported", "request"),
        ({"REQUEST": "GetFeature", "TYPENAMES": "bdtopo:gare", "COUNT": "x"}, 400, "InvalidParameterValue", "count"),
        ({"REQUEST": "GetFeature", "TYPENAMES": "bdtopo:gare", "BBOX": "1,2,3"}, 400, "InvalidParameterValue", "BBOX"),
        ({"REQUEST": "GetFeature", "TYPENAMES": "bdtopo:gare", "SRSNAME": "EPSG:999999"}, 400, "InvalidParameterValue",
         "SRSNAME"),
        ({"REQUEST": "GetFeature", "TYPENAMES": "bdtopo:gare", "OUTPUTFORMAT": "shape-zip"}, 400,
         "InvalidParameterValue", "outputFormat"),
        ({"REQUEST": "GetFeature", "TYPENAMES": "bdtopo:gare", "SORTBY": "nope DESC"}, 400, "InvalidParameterValue",
         "SORTBY"),
        ({"REQUEST": "GetFeature", "TYPENAMES": "bdtopo:gare", "VERSION": "3.0.0"}, 400, "InvalidParameterValue",
         "version"),
        # WFS 1.1.0 is not served (DESIGN.md, WFS): a 1.1.0 request is refused by name, never half-answered
        ({"REQUEST": "GetFeature", "TYPENAMES": "bdtopo:gare", "VERSION": "1.1.0"}, 400, "InvalidParameterValue",
         "version"),
        ({"REQUEST": "DescribeFeatureType", "TYPENAMES": "bdtopo:gare", "VERSION": "1.1.0"}, 400,
         "InvalidParameterValue", "version"),
        # OWS 1.1 §7.3.2: no version of AcceptVersions is served; Table 25: no locator
        ({"REQUEST": "GetCapabilities", "ACCEPTVERSIONS": "1.1.0"}, 400, "VersionNegotiationFailed", None),
        ({"REQUEST": "GetCapabilities", "ACCEPTVERSIONS": "1.1.0,1.0.0"}, 400, "VersionNegotiationFailed", None),
    ],
)
def test_errors_are_ows_exception_reports(http, params, status, code, locator):
    r = get(http, **params)
    assert r.status_code == status
    assert_valid(schema(b'<xsd:schema xmlns:xsd="http://www.w3.org/2001/XMLSchema"><xsd:import '
                        b'namespace="http://www.opengis.net/ows/1.1" '
                        b'schemaLocation="http://schemas.opengis.net/ows/1.1.0/owsAll.xsd"/></xsd:schema>'), r.content)
    root = etree.fromstring(r.content)
    assert root.get("version") == "2.0.0"
    exception = root.find(f"{{{OWS}}}Exception")
    assert (exception.get("exceptionCode"), exception.get("locator")) == (code, locator)
    assert r.headers["cache-control"] == "no-store"


def test_version_negotiation_offers_2_0_0(http):
    """GetCapabilities negotiates with AcceptVersions (its VERSION is not a constraint): a 1.1.0 client
    asking for capabilities learns the server's version from the answer, 2.0.0."""
    for params in ({"VERSION": "1.1.0"}, {"ACCEPTVERSIONS": "1.1.0,2.0.0"}, {"ACCEPTVERSIONS": "2.0.2"}):
        r = http.get("/wfs", params={"SERVICE": "WFS", "REQUEST": "GetCapabilities", **params})
        assert r.status_code == 200, params
        root = etree.fromstring(r.content)
        assert etree.QName(root).localname == "WFS_Capabilities" and root.get("version") == "2.0.0"
        versions = root.findall(f"{{{OWS}}}ServiceIdentification/{{{OWS}}}ServiceTypeVersion")
        assert "1.1.0" not in [v.text for v in versions]


def many_points(path: Path, n: int) -> Path:
    """One table of `n` points (more than a GetFeature returns at once), written with pyogrio."""
    import numpy as np
    from pyogrio.raw import write

    points = [shapely.Point(2.0 + (i % 50) * 0.01, 48.0 + (i // 50) * 0.01) for i in range(n)]
    write(path, np.array(shapely.to_wkb(points), dtype=object), [np.arange(n, dtype=np.int64)], ["rang"],
          layer="points", driver="GPKG", geometry_type="Point", crs="EPSG:4326")
    return path


def _json_pages(http, url: str) -> list[dict]:
    pages = []
    while url:
        r = http.get(url)
        assert r.status_code == 200, r.text
        pages.append(r.json())
        url = next((link["href"] for link in pages[-1]["links"] if link["rel"] == "next"), None)
    return pages


@pytest.mark.parametrize(("overrides", "cap"), [({}, 1000), ({"wfs_max_features": 300}, 300)])
def test_get_feature_returns_at_most_the_cap_then_next(tmp_path, overrides, cap):
    """1000 features per GetFeature by default, as the platform (setting `wfs_max_features`): a request
    without COUNT, or with a larger one, gets the cap and a `next` link; the links reach every feature."""
    n = 1234
    gpkg = many_points(tmp_path / "points.gpkg", n)
    with live_server(make_settings(tmp_path, **overrides)) as url, httpx.Client(base_url=url, timeout=60) as http:
        descriptor = {"title": "points", "abstract": "many points", "name": "pts",
                      "wfs": {"base": f"file://{gpkg}", "relations": [{"native_name": "points", "public_name": "p"}]}}
        assert http.post("/admin/layers/pts", json=descriptor, headers=ADMIN).status_code == 204
        for count in ({}, {"COUNT": str(cap + 500)}):
            r = get(http, REQUEST="GetFeature", TYPENAMES="pts:p", OUTPUTFORMAT="application/json", **count)
            first = r.json()
            assert (first["numberMatched"], first["numberReturned"], len(first["features"])) == (n, cap, cap)
            assert [link["rel"] for link in first["links"]] == ["next"]
        gml = etree.fromstring(get(http, REQUEST="GetFeature", TYPENAMES="pts:p").content)
        assert gml.get("numberReturned") == str(cap) and f"COUNT={cap}" in gml.get("next")
        start = f"{url}/wfs?" + urlencode({"SERVICE": "WFS", "VERSION": "2.0.0", "REQUEST": "GetFeature",
                                           "TYPENAMES": "pts:p", "OUTPUTFORMAT": "application/json"})
        pages = _json_pages(http, start)
        assert [p["numberReturned"] for p in pages] == [min(cap, n - i) for i in range(0, n, cap)]
        ranks = [f["properties"]["rang"] for p in pages for f in p["features"]]
        assert sorted(ranks) == list(range(n))  # nothing lost or repeated
        # OGC API Features' `limit` has the same ceiling
        items = http.get("/ogcapi/collections/pts:p/items", params={"limit": str(cap + 500), "f": "json"}).json()
        assert items["numberReturned"] == cap


def test_restricted_layer_needs_its_key(server, http):
    r = get(http, REQUEST="GetFeature", TYPENAMES="prive:gare")
    assert r.status_code == 400
    assert b"prive:gare" not in get(http, REQUEST="GetCapabilities").content
    r = http.get("/wfs", params={"SERVICE": "WFS", "VERSION": "2.0.0", "REQUEST": "GetFeature",
                                 "TYPENAMES": "prive:gare"}, headers={"X-Api-Key": server["key"]})
    assert r.status_code == 200
    assert r.headers["cache-control"].startswith("private") and "X-Api-Key" in r.headers["vary"]
    assert len(features_of(r.content, "gare")[1]) == 12
    caps = http.get("/wfs", params={"REQUEST": "GetCapabilities"}, headers={"X-Api-Key": server["key"]})
    assert b"prive:gare" in caps.content and caps.headers["cache-control"].startswith("private")
    public = get(http, REQUEST="GetFeature", TYPENAMES="bdtopo:gare")
    assert public.headers["cache-control"].startswith("public")


def test_switched_off(server, http):
    assert http.put("/admin/off", headers=ADMIN).status_code == 204
    try:
        r = get(http, REQUEST="GetCapabilities")
        assert r.status_code == 503
        assert etree.fromstring(r.content).find(f"{{{OWS}}}Exception") is not None
    finally:
        http.put("/admin/on", headers=ADMIN)


def test_publication_checks_relations(server, http, tmp_path):
    outside = make_gpkg(tmp_path / "elsewhere.gpkg")
    r = http.post("/admin/layers/bad", json={**wfs_descriptor(outside), "wfs": {
        "base": str(outside), "relations": [{"native_name": "nope"}]}}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["field"] == "wfs.relations[0].native_name"


def test_publication_confines_the_base_to_the_publish_roots(tmp_path):
    import asyncio

    from apputil import app_client

    root = tmp_path / "published"
    root.mkdir()
    inside, outside = make_gpkg(root / "in.gpkg"), make_gpkg(tmp_path / "out.gpkg")

    async def run():
        async with app_client(make_settings(tmp_path, admin_roots=(str(root),))) as client:
            r = await client.post("/admin/layers/out", json=wfs_descriptor(outside), headers=ADMIN)
            assert r.status_code == 400 and r.json()["field"] == "wfs.base"
            r = await client.post("/admin/layers/in", json=wfs_descriptor(inside), headers=ADMIN)
            assert r.status_code == 204, r.text

    asyncio.run(run())


# --- GDAL's own clients ---------------------------------------------------------------------------

needs_gdal = pytest.mark.skipif(shutil.which("ogr2ogr") is None, reason="gdal-bin is not installed (apt-get install gdal-bin)")


@needs_gdal
def test_gdal_wfs_client_reads_the_same_count_and_extent(server, tmp_path):
    expected = source(server["gpkg"], "communes")
    info = subprocess.run(["ogrinfo", "-ro", "-so", "-al", f"WFS:{server['url']}/wfs?VERSION=2.0.0",
                           "bdtopo:commune"], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert f"Feature Count: {len(expected)}" in info.stdout
    out = tmp_path / "copy.gpkg"
    run = subprocess.run(["ogr2ogr", "-f", "GPKG", str(out), f"WFS:{server['url']}/wfs?VERSION=2.0.0",
                          "bdtopo:commune"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    meta, fids, geometry, fields = raw_read(out, return_fids=True)
    assert len(fids) == len(expected)
    copied = shapely.union_all(shapely.from_wkb(geometry)).bounds
    original = shapely.union_all([g for _, g in expected.values()]).bounds
    assert copied == pytest.approx(original, abs=1e-6)
    assert sorted(fields[list(meta["fields"]).index("nom")]) == sorted(p["nom"] for p, _ in expected.values())


def test_get_feature_streams_without_waiting_for_the_end(server):
    """A GetFeature answer leaves as it is made: no Content-Length or ETag (which would need the
    whole body first), the request id and CORS like any answer, and gzip applied on the fly."""
    import gzip
    import json

    params = {"SERVICE": "WFS", "VERSION": "2.0.0", "REQUEST": "GetFeature", "TYPENAMES": "bdtopo:commune",
              "OUTPUTFORMAT": "application/json"}
    with httpx.Client(base_url=server["url"], timeout=30) as client:
        plain = client.get("/wfs", params=params, headers={"Accept-Encoding": "identity"})
        with client.stream("GET", "/wfs", params=params, headers={"Accept-Encoding": "gzip"}) as zipped:
            raw = b"".join(zipped.iter_raw())
            headers = zipped.headers
    assert plain.status_code == 200 and "content-length" not in plain.headers and "etag" not in plain.headers
    assert plain.headers["x-request-id"] and plain.headers["access-control-allow-origin"] == "*"
    assert headers["content-encoding"] == "gzip" and "Accept-Encoding" in headers["vary"]
    assert json.loads(gzip.decompress(raw))["features"] == plain.json()["features"]


def test_admin_publishes_postgis_bases_of_the_configured_database_only(http, server):
    """A PostGIS base URL naming another server is refused before anything is opened."""
    record = wfs_descriptor("postgresql://someone@192.0.2.1:5432/elsewhere#vb_0123", name="ailleurs")
    r = http.post("/admin/layers/ailleurs", json=record, headers=ADMIN)
    assert r.status_code == 400 and "vector_db_url" in r.text, r.text
