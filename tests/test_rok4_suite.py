"""ROK4's own functional suite of its server (github.com/rok4/tests, `server/`, mocha), replayed over
real HTTP against pyramids our writer builds from tests/data/sources/D972.tif (the Martinique DEM,
IGNF:UTM20W84MART, 250 m): TEST_ALTI (the DEM in UTM20W84MART_1M_MNT, levels 0-6), TEST_PENTE (its
slope in degrees, PM 0-13) and TEST_BDORTHO (an RGB picture of it, PM, JPEG). Layer bodies, requests
and expected statuses are ROK4's, in its order (create, update, WMS, WMTS, OGC API Tiles, TMS, health,
delete); its `xit` (skipped) cases are left out.

Deliberate divergences, each asserted as ours below:
- Pyramids are files, not S3 (`s3://pyramids/…` → `file://…`); TEST_BDORTHO stops at level 12 (ROK4's
  at 15: the deepest tile the suite asks is at 12, and levels 13-15 of a 250 m source would take a
  minute to build); slabs are 2×2 tiles (ROK4 16×16), which no request can see.
- The server-wide WMS CRS list (`wms_crs`) is set to CRS:84, EPSG:4326, EPSG:3857 so that the layers'
  own `wms.crs` lists decide, as in ROK4; our built-in list offers IGNF:LAMB93 to every layer, and
  "TEST_PENTE : wrong CRS" would then draw.
- GetFeatureInfo text/plain is the bare values as ROK4 (one number for these one-band layers); bands
  are comma-joined, where ROK4's encoder puts spaces, one line per queried layer.
- WMS 1.1.1 GetCapabilities: ROK4 answers 400 (it speaks 1.3.0 only); we speak 1.1.1 and answer 200.
- A WMTS or TMS tile outside the level's advertised limits: ROK4 404, ours 400 (WMTS: TileOutOfRange,
  OGC 07-057r7 §7.2.2.2.1, which OGC's WMTS suite asserts; TMS: the same rule, one policy) — the
  "TEST_BDORTHO : no data" cases. OGC API Tiles says 404 there, and both answer it.
- ROK4's OGC API Tiles paths put the column before the row (…/PM/12/1354/1881 for WMTS's row 1881,
  column 1354). OGC API Tiles (OGC 20-057 §7.4, asserted by ets-ogcapi-tiles10) is
  {tileMatrix}/{tileRow}/{tileCol}: the same tiles are asked here in the standard order.
- OGC API Tiles in a tile matrix set the collection does not offer ("unknown TMS", "wrong TMS"): ROK4
  400, ours 404, the standard's answer for a path naming no resource (20-057 /req/core/tc-error).
- GetFeatureInfo relayed to a WMS that does not answer ("misconfigured WMS server"): ROK4 500, ours
  502 Bad Gateway, the status of an upstream failure (RFC 9110 §15.6.3).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from apputil import DATA, live_server, make_settings
from lxml import etree

from tileserver.settings import Settings
from tileserver.storage import Storage
from tileserver.writer.build import build_async
from tileserver.writer.options import BuildOptions

D972 = DATA / "sources" / "D972.tif"
D972_CRS = "IGNF:UTM20W84MART"
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")  # ROK4's `/^-?\d+(\.\d+)?$/`: the whole body is one number


# --- the pyramids -------------------------------------------------------------------------------


def _derive_sources(directory: Path) -> tuple[Path, Path]:
    """PENTE.tif (slope, degrees, uint8, 255 = no data) and ORTHO.tif (an RGB tint of the heights, white
    outside), on D972's own lattice and georeferencing."""
    with tifffile.TiffFile(D972) as tif:
        page = tif.pages[0]
        heights = page.asarray().astype(np.float64)
        tags = [(33550, "d", 3, page.tags["ModelPixelScaleTag"].value),
                (33922, "d", 6, page.tags["ModelTiepointTag"].value)]
    valid = heights != -9999
    masked = np.where(valid, heights, np.nan)
    gy, gx = np.gradient(masked, 250.0)
    slope = np.degrees(np.arctan(np.hypot(gx, gy)))
    pente = np.where(np.isfinite(slope), np.clip(np.round(slope), 0, 90), 255).astype(np.uint8)
    t = np.where(valid, (heights - np.nanmin(masked)) / np.ptp(heights[valid]), 0.0)
    rgb = np.stack([60 + 150 * t, 140 + 320 * t * (1 - t) / 4, 60 + 100 * (1 - t)], axis=-1).astype(np.uint8)
    rgb[~valid] = 255
    tifffile.imwrite(directory / "PENTE.tif", pente, extratags=tags)
    tifffile.imwrite(directory / "ORTHO.tif", rgb, photometric="rgb", extratags=tags)
    return directory / "PENTE.tif", directory / "ORTHO.tif"


async def _build(directory: Path) -> None:
    pente, ortho = _derive_sources(directory)
    common = {"srs": D972_CRS, "top": "0", "interpolation": "nn", "width": 2, "height": 2}
    storage = Storage(Settings())
    await storage.start()
    try:
        for name, source, options in (
            ("ALTI", D972, {"tms": "UTM20W84MART_1M_MNT", "bottom": "6", "compression": "zip"}),
            ("PENTE", pente, {"tms": "PM", "bottom": "13", "compression": "zip", "nodata": (255,)}),
            ("BDORTHO", ortho, {"tms": "PM", "bottom": "12", "compression": "jpg"}),
        ):
            await build_async([str(source)], str(directory), name, BuildOptions(**common, **options), storage)
    finally:
        await storage.close()


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("rok4suite")
    asyncio.run(_build(directory))
    return directory


# --- ROK4's layer bodies (server/admin/*.js), pyramid paths on files ------------------------------


def _alti(pyramids: Path, title: str) -> dict:
    return {
        "wms": {"authorized": True, "crs": ["IGNF:LAMB93", "CRS:84", "IGNF:WGS84G", "EPSG:3857", "EPSG:4326"]},
        "tms": {"authorized": True},
        "keywords": ["UTM20W84MART_1M_MNT", "RASTER", "MNT"],
        "wmts": {"authorized": True},
        "pyramids": [{"top_level": "0", "path": f"file://{pyramids}/ALTI.json", "bottom_level": "6"}],
        "title": title,
        "resampling": "nn",
        "abstract": "Diffusion de la donnée brute ALTI",
        "styles": ["normal", "hypso"],
        "get_feature_info": {"type": "PYRAMID"},
    }


def _pente(pyramids: Path, title: str, server: str, tms: bool) -> dict:
    return {
        "title": title,
        "abstract": "Diffusion de la donnée brute PENTE",
        "wmts": {"authorized": True},
        "keywords": ["PM", "RASTER", "MNT"],
        "tms": {"authorized": tms},
        "styles": ["normal"],
        "pyramids": [{"path": f"file://{pyramids}/PENTE.json", "top_level": "0", "bottom_level": "13"}],
        "wms": {"crs": ["EPSG:3857", "CRS:84", "IGNF:WGS84G", "EPSG:4326"], "authorized": True},
        "get_feature_info": {"type": "EXTERNALWMS", "url": f"{server}/wms", "layers": "TEST_ALTI",
                             "query_layers": "TEST_ALTI", "version": "1.3.0", "service": "WMS"},
    }


def _bdortho(pyramids: Path, title: str, update: bool) -> dict:
    body = {
        "wms": {"authorized": True, "crs": ["EPSG:3857", "CRS:84", "IGNF:WGS84G", "EPSG:4326"]},
        "abstract": "Diffusion de la donnée BDORTHO",
        "title": title,
        "pyramids": [{"bottom_level": "12", "path": f"file://{pyramids}/BDORTHO.json", "top_level": "0"}],
        "styles": ["normal"],
        "tms": {"authorized": True},
        "wmts": {"authorized": True},
        "keywords": ["PM", "RASTER"],
    }
    if update:
        body["wmts"] = {"authorized": True, "tms": ["4326"]}
        body["get_feature_info"] = {"type": "EXTERNALWMS", "url": "http://fake/wms", "layers": "FAKE",
                                    "query_layers": "FAKE", "version": "1.3.0", "service": "WMS"}
    return body


ADMIN = {"Authorization": "Bearer secret"}


@pytest.fixture(scope="module")
def server(pyramids, tmp_path_factory) -> Iterator[str]:
    settings = make_settings(tmp_path_factory.mktemp("rok4suite-server"), styles_directory=str(DATA / "styles"),
                             wms_crs=("CRS:84", "EPSG:4326", "EPSG:3857"))
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def http(server, pyramids) -> Iterator[httpx.Client]:
    """ROK4's "Server' initialisation": create the three layers, then update them (204 each)."""
    with httpx.Client(base_url=server, timeout=60, headers=ADMIN) as admin:
        for method, bodies in (("POST", (_alti(pyramids, "TEST_ALTI"), _pente(pyramids, "TEST_PENTE", server, True),
                                         _bdortho(pyramids, "TEST_BDORTHO", False))),
                               ("PUT", (_alti(pyramids, "TEST_ALTI modifié"),
                                        _pente(pyramids, "TEST_PENTE modifié", server, False),
                                        _bdortho(pyramids, "TEST_BDORTHO modifié", True)))):
            for name, body in zip(("TEST_ALTI", "TEST_PENTE", "TEST_BDORTHO"), bodies, strict=True):
                answer = admin.request(method, f"/admin/layers/{name}", json=body)
                assert answer.status_code == 204, (method, name, answer.text)
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


# --- the requests (server/{wms,wmts,ogcapitiles,tms,healthcheck}/*.js) ------------------------------

WMS_MAP = ("/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetMap&BBOX=14.32607995411024682,-61.33514779706757025,"
           "14.96302626285481452,-60.70632904706744171&CRS=EPSG:4326&WIDTH=843&HEIGHT=854")
WMS_INFO_3857 = ("/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetFeatureInfo&BBOX=-6850073.55233319289982319,"
                 "1594879.65237928181886673,-6710073.98623065836727619,1741451.25051501393318176&CRS=EPSG:3857"
                 "&WIDTH=916&HEIGHT=959")
WMTS_TILE = "/wmts?SERVICE=WMTS&REQUEST=GetTile&VERSION=1.0.0&LAYER=TEST_BDORTHO&STYLE=normal"
OGC = "/ogcapitiles"

# (ROK4's describe › it, path, ROK4's status, ours: the status we answer where we diverge, else None)
CASES = [
    ("WMS GetCapabilities › Version 1.3.0", "/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetCapabilities", 200, None),
    ("WMS GetCapabilities › Version 1.1.1", "/wms?SERVICE=WMS&VERSION=1.1.1&REQUEST=GetCapabilities", 400, 200),
    ("WMS GetMap › TEST_BDORTHO : valid", f"{WMS_MAP}&LAYERS=TEST_BDORTHO&STYLES=&FORMAT=image/jpeg", 200, None),
    ("WMS GetMap › TEST_ALTI : valid (hypso style)", f"{WMS_MAP}&LAYERS=TEST_ALTI&STYLES=hypso&FORMAT=image/png",
     200, None),
    ("WMS GetMap › TEST_PENTE : wrong CRS",
     "/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetMap&BBOX=-113531097.8245597482,-73613357.30627191067,"
     "114927363.7379055321,66945578.89708346128&CRS=IGNF:LAMB93&WIDTH=1126&HEIGHT=692&LAYERS=TEST_PENTE&STYLES="
     "&FORMAT=image/png", 400, None),
    ("WMS GetMap › TEST_PENTE : valid", f"{WMS_MAP}&LAYERS=TEST_PENTE&STYLES=&FORMAT=image/jpeg", 200, None),
    ("WMS GetFeatureInfo › TEST_BDORTHO : misconfigured WMS server",
     "/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetFeatureInfo&BBOX=47.65147770431939733,6.83756074517234325,"
     "47.6524660975958696,6.83985461742957668&CRS=EPSG:4326&WIDTH=1606&HEIGHT=692&LAYERS=TEST_BDORTHO&STYLES="
     "&FORMAT=image/jpeg&QUERY_LAYERS=TEST_BDORTHO&INFO_FORMAT=text/html&I=561&J=395&FEATURE_COUNT=10", 500, 502),
    ("WMS GetFeatureInfo › TEST_ALTI : valid (text/plain)",
     f"{WMS_INFO_3857}&LAYERS=TEST_ALTI&STYLES=&FORMAT=image/jpeg&QUERY_LAYERS=TEST_ALTI&INFO_FORMAT=text/plain"
     "&I=328&J=533&FEATURE_COUNT=10", 200, None),
    ("WMS GetFeatureInfo › TEST_PENTE : valid (text/html)",
     f"{WMS_INFO_3857}&LAYERS=TEST_PENTE&STYLES=&FORMAT=image/jpeg&QUERY_LAYERS=TEST_PENTE&INFO_FORMAT=text/html"
     "&I=328&J=533&FEATURE_COUNT=10", 200, None),
    ("WMTS GetCapabilities › Version 1.0.0", "/wmts?SERVICE=WMTS&VERSION=1.0.0&REQUEST=GetCapabilities", 200, None),
    ("WMTS GetCapabilities › Version 2.0.0", "/wmts?SERVICE=WMTS&VERSION=2.0.0&REQUEST=GetCapabilities", 400, None),
    ("WMTS GetTile › TEST_BDORTHO : no data",
     f"{WMTS_TILE}&FORMAT=image/png&TILEMATRIXSET=PM&TILEMATRIX=11&TILEROW=729&TILECOL=1038", 404, 400),
    ("WMTS GetTile › TEST_BDORTHO : unknown TMS",
     f"{WMTS_TILE}&FORMAT=image/png&TILEMATRIXSET=fake&TILEMATRIX=11&TILEROW=724&TILECOL=1037", 400, None),
    ("WMTS GetTile › TEST_BDORTHO : wrong TMS for this layer",
     f"{WMTS_TILE}&FORMAT=image/png&TILEMATRIXSET=PM_5cm&TILEMATRIX=11&TILEROW=724&TILECOL=1037", 400, None),
    ("WMTS GetTile › TEST_BDORTHO : valid (native TMS)",
     f"{WMTS_TILE}&FORMAT=image/jpeg&TILEMATRIXSET=PM&TILEMATRIX=12&TILEROW=1881&TILECOL=1354", 200, None),
    ("WMTS GetTile › TEST_BDORTHO : valid (additionnal TMS)",
     f"{WMTS_TILE}&FORMAT=image/jpeg&TILEMATRIXSET=4326&TILEMATRIX=7&TILEROW=53&TILECOL=84", 200, None),
    ("WMTS GetFeatureInfo › TEST_PENTE : valid (text/plain)",
     "/wmts?SERVICE=WMTS&REQUEST=GetFeatureInfo&VERSION=1.0.0&LAYER=TEST_PENTE&STYLE=normal&FORMAT=image/png"
     "&TILEMATRIXSET=PM&TILEMATRIX=12&TILEROW=1881&TILECOL=1354&INFOFORMAT=text/plain&I=52&J=149", 200, None),
    ("OGCAPI-Tiles GetTile › TEST_BDORTHO : no data",
     f"{OGC}/styles/normal/map/tiles/PM/2/1038/729?f=image%2Fjpeg&collections=TEST_BDORTHO", 404, None),
    ("OGCAPI-Tiles GetTile › TEST_BDORTHO : unknown TMS",
     f"{OGC}/styles/normal/map/tiles/fake/11/1037/724?f=image%2Fpng&collections=TEST_BDORTHO", 400, 404),
    ("OGCAPI-Tiles GetTile › TEST_BDORTHO : wrong TMS for this layer",
     f"{OGC}/styles/normal/map/tiles/PM_5cm/11/1037/724?f=image%2Fpng&collections=TEST_BDORTHO", 400, 404),
    ("OGCAPI-Tiles GetTile › TEST_BDORTHO : valid (native TMS)",
     f"{OGC}/styles/normal/map/tiles/PM/12/1881/1354?f=image%2Fjpeg&collections=TEST_BDORTHO", 200, None),
    ("OGCAPI-Tiles GetTile › TEST_BDORTHO : valid (call by default style)",
     f"{OGC}/map/tiles/PM/12/1881/1354?f=image%2Fjpeg&collections=TEST_BDORTHO", 200, None),
    ("OGCAPI-Tiles GetTile › TEST_BDORTHO : valid (call by collections)",
     f"{OGC}/collections/TEST_BDORTHO/styles/normal/map/tiles/PM/12/1881/1354?f=image%2Fjpeg", 200, None),
    ("OGCAPI-Tiles GetTile › TEST_BDORTHO : valid (call by collections / default style)",
     f"{OGC}/collections/TEST_BDORTHO/map/tiles/PM/12/1881/1354?f=image%2Fjpeg", 200, None),
    ("OGCAPI-Tiles GetTile › TEST_BDORTHO : valid (additionnal TMS)",
     f"{OGC}/styles/normal/map/tiles/4326/7/53/84?f=image%2Fjpeg&collections=TEST_BDORTHO", 200, None),
    ("TMS GetCapabilities › Version 1.0.0 : valid", "/tms/1.0.0", 200, None),
    ("TMS GetCapabilities › Version 2.0.0 : wrong", "/tms/2.0.0", 400, None),
    ("TMS GetLayer › FAKE : not a layer", "/tms/1.0.0/FAKE", 400, None),
    ("TMS GetLayer › TEST_BDORTHO : valid", "/tms/1.0.0/TEST_BDORTHO", 200, None),
    ("TMS GetLayer › TEST_ALTI : valid", "/tms/1.0.0/TEST_ALTI", 200, None),
    ("TMS GetLayer › TEST_PENTE : wrong (TMS disabled)", "/tms/1.0.0/TEST_PENTE", 400, None),
    ("TMS GetMetadataJson › FAKE : not a layer", "/tms/1.0.0/FAKE/metadata.json", 400, None),
    ("TMS GetMetadataJson › TEST_BDORTHO : valid", "/tms/1.0.0/TEST_BDORTHO/metadata.json", 200, None),
    ("TMS GetMetadataJson › TEST_ALTI : valid", "/tms/1.0.0/TEST_ALTI/metadata.json", 200, None),
    ("TMS GetMetadataJson › TEST_PENTE : wrong (TMS disabled)", "/tms/1.0.0/TEST_PENTE/metadata.json", 400, None),
    ("TMS GetGdalXml › FAKE : not a layer", "/tms/1.0.0/FAKE/gdal.xml", 400, None),
    ("TMS GetGdalXml › TEST_BDORTHO : valid", "/tms/1.0.0/TEST_BDORTHO/gdal.xml", 200, None),
    ("TMS GetGdalXml › TEST_ALTI : wrong (TMS is not a quad tree)", "/tms/1.0.0/TEST_ALTI/gdal.xml", 400, None),
    ("TMS GetGdalXml › TEST_PENTE : wrong (TMS disabled)", "/tms/1.0.0/TEST_PENTE/gdal.xml", 400, None),
    ("TMS GetTile › TEST_BDORTHO : no data", "/tms/1.0.0/TEST_BDORTHO/5/1038/729.png", 404, 400),
    ("TMS GetTile › TEST_BDORTHO : valid (native TMS)", "/tms/1.0.0/TEST_BDORTHO/12/1354/1881.jpeg", 200, None),
    ("TMS GetTile › TEST_PENTE : wrong (TMS disabled)", "/tms/1.0.0/TEST_PENTE/16/23940/33030.png", 400, None),
    ("Server' health check › Global", "/healthcheck", 200, None),
    ("Server' health check › Details", "/healthcheck/info", 200, None),
    ("Server' health check › Threads", "/healthcheck/threads", 200, None),
    ("Server' health check › Dependences", "/healthcheck/depends", 200, None),
]


@pytest.mark.parametrize(("name", "path", "rok4", "ours"), CASES, ids=[c[0] for c in CASES])
def test_rok4_request(http, name, path, rok4, ours):
    answer = http.get(path)
    assert answer.status_code == (ours or rok4), answer.text[:500]


# --- ROK4's body checks -------------------------------------------------------------------------


def _path(name: str) -> str:
    return next(path for case, path, _, _ in CASES if case == name)


def test_wms_feature_info_text_plain_is_the_bare_value(http):
    """"TEST_ALTI : valid (text/plain)": the body is the height, nothing around it."""
    answer = http.get(_path("WMS GetFeatureInfo › TEST_ALTI : valid (text/plain)"))
    assert answer.status_code == 200 and NUMBER.match(answer.text), answer.text
    assert -10 < float(answer.text) < 1400  # a height of Martinique (Mont Pelée 1397 m)


def test_wms_feature_info_relayed_text_html(http):
    """"TEST_PENTE : valid (text/html)": PENTE's info is TEST_ALTI's, asked of our own WMS."""
    answer = http.get(_path("WMS GetFeatureInfo › TEST_PENTE : valid (text/html)"))
    assert answer.status_code == 200 and "<html><body><b>FeatureInfo :</b><br>" in answer.text
    plain = http.get(_path("WMS GetFeatureInfo › TEST_ALTI : valid (text/plain)"))
    assert f"<li>{plain.text}</li>" in answer.text  # the same pixel's height


def test_wmts_feature_info_is_relayed_to_the_external_wms(http):
    """TEST_PENTE's get_feature_info is EXTERNALWMS (TEST_ALTI on our WMS): WMTS relays it as ROK4 does,
    the tile being a 256×256 map of its bbox, and the body is TEST_ALTI's bare height there."""
    answer = http.get(_path("WMTS GetFeatureInfo › TEST_PENTE : valid (text/plain)"))
    assert answer.status_code == 200 and NUMBER.match(answer.text), answer.text
    origin, size = 20037508.342789244, 2 * 20037508.342789244 / 2**12  # PM level 12 tile
    west, north = -origin + 1354 * size, origin - 1881 * size
    bbox = f"{west!r},{north - size!r},{west + size!r},{north!r}"
    direct = http.get("/wms?VERSION=1.3.0&REQUEST=GetFeatureInfo&LAYERS=TEST_ALTI&QUERY_LAYERS=TEST_ALTI&STYLES="
                      f"&CRS=EPSG:3857&BBOX={bbox}&WIDTH=256&HEIGHT=256&I=52&J=149&INFO_FORMAT=text/plain")
    assert direct.status_code == 200 and answer.text == direct.text


def test_wmts_tile_out_of_range_is_the_ogc_code(http):
    """Our side of the "no data" divergence: OGC's TileOutOfRange, located at the row."""
    answer = http.get(_path("WMTS GetTile › TEST_BDORTHO : no data"))
    report = etree.fromstring(answer.content)
    exception = report.find("{http://www.opengis.net/ows/1.1}Exception")
    assert exception.get("exceptionCode") == "TileOutOfRange"


# --- what the layers' CRS lists do to our WMS (issue 12, part 2) --------------------------------


def test_a_crs_proj_cannot_reach_costs_its_bounding_box_not_the_document(http):
    """TEST_ALTI (IGNF:UTM20W84MART) lists IGNF:WGS84G, which PROJ cannot reach from its CRS ("Missing
    required parameter values in transformation"): the capabilities are served, with every layer, and
    that CRS is neither advertised for the layer nor given a BoundingBox."""
    from pyproj import Transformer
    from pyproj.exceptions import ProjError

    with pytest.raises(ProjError):  # the premise: PROJ refuses this pair
        Transformer.from_crs(D972_CRS, "IGNF:WGS84G", always_xy=True)
    answer = http.get("/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetCapabilities")
    assert answer.status_code == 200
    ns = {"wms": "http://www.opengis.net/wms"}
    root = etree.fromstring(answer.content)
    layers = {node.findtext("wms:Name", namespaces=ns): node for node in root.iterfind(".//wms:Layer[wms:Name]", ns)}
    assert set(layers) == {"TEST_ALTI", "TEST_PENTE", "TEST_BDORTHO"}
    alti = layers["TEST_ALTI"]
    own = [c.text for c in alti.findall("wms:CRS", ns)]
    boxes = [b.get("CRS") for b in alti.findall("wms:BoundingBox", ns)]
    assert "IGNF:UTM20W84MART" in own and "IGNF:LAMB93" in own and "IGNF:WGS84G" not in own
    assert "IGNF:WGS84G" not in boxes and {"IGNF:UTM20W84MART", "EPSG:3857", "EPSG:4326"} <= set(boxes)
    # the PM layers reach IGNF:WGS84G: they keep it
    assert "IGNF:WGS84G" in [c.text for c in layers["TEST_PENTE"].findall("wms:CRS", ns)]


def test_get_map_in_an_unreachable_crs_is_invalid_crs(http):
    answer = http.get("/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetMap&LAYERS=TEST_ALTI&STYLES=&CRS=IGNF:WGS84G"
                      "&BBOX=-61.3,14.3,-60.7,14.9&WIDTH=64&HEIGHT=64&FORMAT=image/png")
    assert answer.status_code == 400 and 'code="InvalidCRS"' in answer.text, answer.text
    # the same layer draws in every CRS it does advertise, among them the odd IGNF:LAMB93
    advertised = etree.fromstring(http.get("/wms?SERVICE=WMS&REQUEST=GetCapabilities").content)
    ns = {"wms": "http://www.opengis.net/wms"}
    alti = next(n for n in advertised.iterfind(".//wms:Layer[wms:Name]", ns) if n.findtext("wms:Name", namespaces=ns)
                == "TEST_ALTI")
    for box in alti.findall("wms:BoundingBox", ns):
        bbox = ",".join(box.get(k) for k in ("minx", "miny", "maxx", "maxy"))
        drawn = http.get(f"/wms?VERSION=1.3.0&REQUEST=GetMap&LAYERS=TEST_ALTI&STYLES=&CRS={box.get('CRS')}"
                         f"&BBOX={bbox}&WIDTH=32&HEIGHT=32&FORMAT=image/png")
        assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/png", (box.get("CRS"), drawn.text)


def test_deleting_the_layers(http):
    """ROK4's "Server' cleaning" (run last: the module's requests are done)."""
    for name in ("TEST_ALTI", "TEST_PENTE", "TEST_BDORTHO"):
        assert http.delete(f"/admin/layers/{name}", headers=ADMIN).status_code == 204
