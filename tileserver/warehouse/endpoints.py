"""The endpoints every datastore offers, named as on the Géoplateforme, and the URLs an offering of
a layer lists for each protocol the endpoint serves. WFS has an open and a private endpoint, as on
the platform: offerings on the private one are restricted to keys granted access."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

WMTS_TMS = "gpf-rok4-server-wmts-tms"
WMS_R = "gpf-rok4-server-wms-r"
WFS = "gpf-geoserver-wfs"
WFS_PRIVATE = "gpf-geoserver-wfs-private"
WMS_V = "gpf-geoserver-wms-v"
WMS_V_PRIVATE = "gpf-geoserver-wms-v-private"
_NAMESPACE = uuid.UUID("9d3c4e2a-5b0f-4c61-9f4e-1f2a7d0c6b11")


@dataclass(frozen=True)
class Endpoint:
    technical_name: str
    name: str
    type: str  # the configuration type it publishes
    services: tuple[str, ...]  # tileserver services serving its layers
    open: bool = True  # False: its offerings are restricted (`open: false`)

    @property
    def id(self) -> str:
        return str(uuid.uuid5(_NAMESPACE, self.technical_name))

    def view(self, base: str) -> dict[str, Any]:
        return {
            "_id": self.id,
            "name": self.name,
            "technical_name": self.technical_name,
            "type": self.type,
            "open": self.open,
            "public": self.open,
            "urls": [{"type": kind, "url": url} for kind, url in service_urls(self, base)],
        }


ENDPOINTS = (
    Endpoint(WMTS_TMS, "Diffusion WMTS, TMS et OGC API Tiles", "WMTS-TMS", ("wmts", "tms", "ogcapi")),
    Endpoint(WMS_R, "Diffusion WMS raster", "WMS-RASTER", ("wms",)),
    Endpoint(WFS, "Diffusion WFS et OGC API Features", "WFS", ("wfs", "ogcapi")),
    Endpoint(WFS_PRIVATE, "Diffusion WFS et OGC API Features privée", "WFS", ("wfs", "ogcapi"), open=False),
    Endpoint(WMS_V, "Diffusion WMS vecteur", "WMS-VECTOR", ("wms",)),
    Endpoint(WMS_V_PRIVATE, "Diffusion WMS vecteur privée", "WMS-VECTOR", ("wms",), open=False),
)
BY_ID = {e.id: e for e in ENDPOINTS}
BY_TYPE = {e.type: e for e in ENDPOINTS if e.open}


def find(ident: str) -> Endpoint | None:
    """By id or technical name."""
    return BY_ID.get(ident.lower()) or next((e for e in ENDPOINTS if e.technical_name == ident), None)


def service_urls(endpoint: Endpoint, base: str) -> list[tuple[str, str]]:
    if endpoint.type == "WFS":
        return [("WFS", f"{base}/wfs?SERVICE=WFS&VERSION=2.0.0&REQUEST=GetCapabilities"),
                ("OGCAPI-FEATURES", f"{base}/ogcapi/collections")]
    if endpoint.type in ("WMS-RASTER", "WMS-VECTOR"):
        return [("WMS", f"{base}/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetCapabilities")]
    return [
        ("WMTS", f"{base}/wmts?SERVICE=WMTS&VERSION=1.0.0&REQUEST=GetCapabilities"),
        ("TMS", f"{base}/tms/1.0.0"),
        ("OGCAPI-TILES", f"{base}/ogcapi/collections"),
    ]


def layer_urls(endpoint: Endpoint, base: str, layer: str, extension: str, tms: str,
               feature_types: tuple[str, ...] = (), vector: bool = False) -> list[dict[str, str]]:
    """What an offering lists: capabilities, then the layer's own URLs (tile templates; a WFS
    layer's feature types, `layer:public_name`, as OGC API Features items).

    A vector pyramid is served by TMS and OGC API vector tiles only (WMTS and OGC API maps are for
    pictures): its first TMS URL is the TileMap, so that `url + "/metadata.json"` is its TileJSON as
    cartes.gouv.fr builds it, then the tile template; then the OGC API vector tileset."""
    if endpoint.type == "WFS":
        return [{"type": "WFS", "url": f"{base}/wfs?SERVICE=WFS&VERSION=2.0.0&REQUEST=GetCapabilities"},
                *({"type": "OGCAPI-FEATURES", "url": f"{base}/ogcapi/collections/{layer}:{name}/items"}
                  for name in feature_types)]
    if endpoint.type in ("WMS-RASTER", "WMS-VECTOR"):
        return [{"type": "WMS", "url": f"{base}/wms?SERVICE=WMS&VERSION=1.3.0&REQUEST=GetCapabilities"}]
    if vector:
        return [
            {"type": "TMS", "url": f"{base}/tms/1.0.0/{layer}"},
            {"type": "TMS", "url": f"{base}/tms/1.0.0/{layer}/{{z}}/{{x}}/{{y}}.{extension}"},
            {"type": "OGCAPI-TILES", "url": f"{base}/ogcapi/collections/{layer}/tiles/{tms}"},
        ]
    return [
        {"type": "WMTS", "url": f"{base}/wmts?SERVICE=WMTS&VERSION=1.0.0&REQUEST=GetCapabilities"},
        {"type": "WMTS", "url": f"{base}/wmts/1.0.0/{layer}/normal/{tms}/{{TileMatrix}}/{{TileRow}}/{{TileCol}}.{extension}"},
        {"type": "TMS", "url": f"{base}/tms/1.0.0/{layer}/{{z}}/{{x}}/{{y}}.{extension}"},
        {"type": "OGCAPI-TILES", "url": f"{base}/ogcapi/collections/{layer}/map/tiles/{tms}"},
    ]
