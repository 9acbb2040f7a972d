"""Seed 004 through the API, as cartes.gouv.fr drives it (VECTOR.md journey rows 26–30): a
WMS-vector offering of this same server, restricted to a key, is harvested into a raster pyramid
("Calcul ou mise à jour de pyramide raster par moissonnage WMS", the key passed in
`harvest_extras`); its legend (GetLegendGraphic of the WMS-vector) becomes a published annex noted
in the stored data's `extra`; a WMTS-TMS configuration with a legend ROK4-STYLE static publishes the
pyramid; a WMTS tile then equals a GetMap of the WMS-vector over the same extent."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from pyproj import Transformer
from test_warehouse_support import BASE, api_client, wait_for, warehouse_server
from test_warehouse_vector import _ok, endpoint_id
from test_warehouse_wms_vector import SDK_DATA, add_static, canton_base, sdk_root, wmsv_configuration

from tileserver.rok4.tms import load_tms
from tileserver.warehouse.endpoints import WMTS_TMS
from tileserver.warehouse.processings import WMS_TO_PYRAMID

KEY = "seed-004-harvesting-key"
LEVEL = 13  # PM: 19 m per pixel; the cantons span about 20 km × 4 km


def _processing(client: httpx.Client, name: str) -> str:
    return client.get(f"{BASE}/processings", params={"name": name}).json()[0]["_id"]


def _rgb(answer: httpx.Response) -> np.ndarray:
    assert answer.status_code == 200, answer.text[:500]
    return np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB")).astype(np.int16)


def test_seed_004_harvest_a_wms_vector_offering_into_a_published_wmts(tmp_path: Path) -> None:
    # the harvested WMS is this server on loopback: the operator allows it (by default /api users'
    # outgoing requests reach public hosts only; in production the WMS-V URL is the public one)
    with warehouse_server(tmp_path, outbound_allow=("127.0.0.1",)) as (url, _settings):
        client = api_client(url)
        anonymous = httpx.Client(base_url=url, timeout=60)

        # seed 003's WMS-vector, on the private endpoint, and a key granted its offering
        stored = canton_base(client, tmp_path)
        style = add_static(client, "style_canton", "GEOSERVER-STYLE",
                           (sdk_root() / SDK_DATA / "CANTON_style.sld").read_bytes())
        wmsv = _ok(client.post(f"{BASE}/configurations", json=wmsv_configuration(
            stored["_id"], "cantons", [{"name": "canton", "style": style["_id"]}])), 201)
        offering = _ok(client.post(f"{BASE}/configurations/{wmsv['_id']}/offerings", json={
            "endpoint": endpoint_id(client, "gpf-geoserver-wms-v-private"), "open": False}), 201)
        key = _ok(client.post("/api/users/me/keys", json={"name": "moisson", "type": "HASH",
                                                          "type_infos": {"hash": KEY}}), 201)
        _ok(client.post(f"/api/users/me/keys/{key['_id']}/accesses", json={"offerings": [offering["_id"]]}), 201)

        # screen 27: the WMS-V's bbox as the harvest area, its layer harvested into a JPEG pyramid
        west, south, east, north = _extent_of(stored)
        area = f"POLYGON(({west} {south},{east} {south},{east} {north},{west} {north},{west} {south}))"
        execution = _ok(client.post(f"{BASE}/processings/executions", json={
            "processing": _processing(client, WMS_TO_PYRAMID), "inputs": {},
            "output": {"stored_data": {"name": "cantons_raster", "storage_tags": ["PYRAMIDE"]}},
            "parameters": {"samplesperpixel": 3, "sampleformat": "UINT8", "tms": "PM", "compression": "jpg",
                           "bottom": str(LEVEL), "top": str(LEVEL - 1), "harvest_levels": [str(LEVEL)],
                           "harvest_format": "image/jpeg", "harvest_url": f"{url}/wms",
                           "harvest_layers": "cantons", "harvest_area": area,
                           "harvest_extras": f"apikey={KEY}"}}), 201)
        pyramid_id = execution["output"]["stored_data"]["_id"]
        # the legend of the WMS-V, kept as a published annex and noted on the pyramid
        legend = anonymous.get("/wms", params={"SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetLegendGraphic",
                                               "LAYER": "cantons", "FORMAT": "image/png", "apikey": KEY})
        assert legend.status_code == 200 and legend.headers["content-type"] == "image/png", legend.text[:300]
        annexe = _ok(client.post(f"{BASE}/annexes", files={"file": ("legend.png", legend.content)},
                                 data={"paths": "/legend/cantons_raster.png", "labels": "type=legend",
                                       "published": "true"}), 201)
        legend_url = f"{url}/annexes/{client.get(BASE).json()['technical_name']}/legend/cantons_raster.png"
        assert anonymous.get(legend_url).content == legend.content
        patched = _ok(client.patch(f"{BASE}/stored_data/{pyramid_id}", json={
            "extra": {"legend": {"url": legend_url, "annexe_id": annexe["_id"]}}}))
        assert patched["extra"]["legend"]["annexe_id"] == annexe["_id"]
        _ok(client.post(f"{BASE}/processings/executions/{execution['_id']}/launch"))
        done = wait_for(lambda: (lambda e: e if e["status"] in ("SUCCESS", "FAILURE", "ABORTED") else None)(
            client.get(f"{BASE}/processings/executions/{execution['_id']}").json()), timeout=120)
        logs = client.get(f"{BASE}/processings/executions/{execution['_id']}/logs").json()
        assert done["status"] == "SUCCESS", logs
        assert KEY not in json.dumps(logs)  # the key never lands in the logs
        pyramid = _ok(client.get(f"{BASE}/stored_data/{pyramid_id}"))
        assert pyramid["type"] == "ROK4-PYRAMID-RASTER" and pyramid["status"] == "GENERATED"
        assert pyramid["type_infos"]["levels"] == [str(LEVEL - 1), str(LEVEL)]
        assert pyramid["extra"]["legend"]["url"] == legend_url

        # screen 29: a ROK4-STYLE legend static, the WMTS-TMS configuration naming it, an open offering
        legend_style = add_static(client, "config_tmp_legend", "ROK4-STYLE", json.dumps({
            "identifier": "legende_cantons", "title": "Légende des cantons",
            "legend": {"format": "image/png", "width": 200, "height": 100, "min_scale_denominator": 0,
                       "max_scale_denominator": 1e9, "url": legend_url}}).encode())
        configuration = _ok(client.post(f"{BASE}/configurations", json={
            "type": "WMTS-TMS", "name": "cantons_wmts", "layer_name": "cantons_wmts",
            "type_infos": {"title": "Cantons (raster)", "abstract": "Moissonnage du WMS-V", "keywords": ["Raster"],
                           "used_data": [{"stored_data": pyramid_id, "bottom_level": str(LEVEL),
                                          "top_level": str(LEVEL - 1)}],
                           "styles": [legend_style["_id"]]}}), 201)
        published = _ok(client.post(f"{BASE}/configurations/{configuration['_id']}/offerings",
                                    json={"endpoint": endpoint_id(client, WMTS_TMS), "open": True}), 201)
        assert published["status"] == "PUBLISHED"
        renamed = client.patch(f"{BASE}/statics/{legend_style['_id']}",
                               json={"name": f"config_{configuration['_id']}_style_wmts"})
        assert renamed.status_code == 200, renamed.text

        # screen 30: the WMTS shows the layer with its legend, and its tiles are the WMS-V's map
        caps = anonymous.get("/wmts", params={"SERVICE": "WMTS", "REQUEST": "GetCapabilities"}).text
        assert "<ows:Identifier>cantons_wmts</ows:Identifier>" in caps and legend_url in caps
        grid = load_tms("PM")
        matrix = grid.get(str(LEVEL))
        assert matrix is not None
        to_pm = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
        checked = 0
        for lon, lat in _canton_centres(stored):
            x, y = to_pm.transform(lon, lat)
            col, row = matrix.point_to_tile(x, y)
            tile = anonymous.get(f"/wmts/1.0.0/cantons_wmts/normal/PM/{LEVEL}/{row}/{col}.jpeg")
            x0, y0, x1, y1 = matrix.tile_bbox(col, row)
            drawn = anonymous.get("/wms", params={
                "SERVICE": "WMS", "VERSION": "1.3.0", "REQUEST": "GetMap", "LAYERS": "cantons", "STYLES": "",
                "CRS": "EPSG:3857", "BBOX": f"{x0},{y0},{x1},{y1}", "WIDTH": "256", "HEIGHT": "256",
                "FORMAT": "image/png", "apikey": KEY})
            harvested, direct = _rgb(tile), _rgb(drawn)
            assert harvested.shape == direct.shape == (256, 256, 3)
            difference = np.abs(harvested - direct).max(axis=2)
            # JPEG (quality of the writer) against PNG: small everywhere but on the polygons' edges
            assert difference.mean() < 3.0, difference.mean()
            assert np.percentile(difference, 99) < 48, np.percentile(difference, 99)
            assert (direct != 255).any()  # a canton is drawn there, not an empty tile compared with an empty map
            checked += 1
        assert checked >= 3


def _extent_of(stored: dict) -> tuple[float, float, float, float]:
    """The base's extent in degrees (stored data `extent`: a GeoJSON polygon in EPSG:4326)."""
    ring = np.asarray(stored["extent"]["coordinates"][0], dtype=float)
    return float(ring[:, 0].min()), float(ring[:, 1].min()), float(ring[:, 0].max()), float(ring[:, 1].max())


def _canton_centres(stored: dict) -> list[tuple[float, float]]:
    """Points inside the drawn cantons (departments with a rule in the SDK's SLD), in degrees."""
    from test_warehouse_wms_vector import DEPARTMENTS, canton_set

    geoms, _fields = canton_set()
    to_wgs84 = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True)
    centres = []
    for geom, dep in zip(geoms, DEPARTMENTS, strict=True):
        if dep in ("75", "92", "93", "94"):
            point = geom.representative_point()
            centres.append(to_wgs84.transform(point.x, point.y))
    return centres
