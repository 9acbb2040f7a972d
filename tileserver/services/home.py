"""The map page at `/`: every published layer on a Leaflet map, assets served locally (no CDN)."""

from __future__ import annotations

import html

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from tileserver.runtime import get_runtime
from tileserver.settings import PACKAGE_DIR

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="static/leaflet/leaflet.css">
<style>html,body{{margin:0;height:100%;font-family:sans-serif}}#map{{position:absolute;top:0;bottom:0;left:0;right:320px}}
#side{{position:absolute;top:0;bottom:0;right:0;width:320px;overflow:auto;padding:8px;box-sizing:border-box;font-size:13px}}
code{{word-break:break-all}}</style></head>
<body><div id="map"></div><div id="side"><h3>{title}</h3>
<p><a href="wmts?SERVICE=WMTS&amp;REQUEST=GetCapabilities">WMTS</a> ·
<a href="tms/1.0.0">TMS</a> · <a href="ogcapi">OGC API Tiles</a> ·
<a href="wms?SERVICE=WMS&amp;REQUEST=GetCapabilities">WMS</a> · <a href="healthcheck/info">health</a></p>
<ul id="layers">{items}</ul></div>
<script src="static/leaflet/leaflet.js"></script>
<script>
const layers = {layers};
const map = L.map('map', {{worldCopyJump: true}});
const overlays = {{}};
let bounds = null;
for (const l of layers) {{
  const t = l.xyz ? L.tileLayer(l.xyz, {{minZoom: 0, maxZoom: 22, minNativeZoom: l.minzoom, maxNativeZoom: l.maxzoom,
                                          bounds: l.bounds, attribution: l.attribution}})
                  : L.tileLayer.wms('wms', {{layers: l.id, format: 'image/png', transparent: true, version: '1.3.0'}});
  overlays[l.title] = t;
  t.addTo(map);
  const b = L.latLngBounds(l.bounds);
  bounds = bounds ? bounds.extend(b) : b;
}}
L.control.layers({{}}, overlays, {{collapsed: false}}).addTo(map);
if (bounds) map.fitBounds(bounds); else map.setView([46.5, 2.5], 5);
</script></body></html>
"""


def _layer_entry(published) -> dict:
    west, south, east, north = published.wgs84_bbox
    entry = {
        "id": published.id,
        "title": published.layer.title,
        "bounds": [[south, west], [north, east]],
        "attribution": (published.layer.attribution or {}).get("title", ""),
        "xyz": None,
    }
    if published.tms.id == "PM" and published.layer.enabled("tms") and not published.format.is_vector:
        zooms = [int(z) for z in published.level_ids if z.isdigit()]
        entry.update(
            xyz=f"tms/1.0.0/{published.id}/{{z}}/{{x}}/{{y}}.{published.format.tms_extension}",
            minzoom=min(zooms),
            maxzoom=max(zooms),
        )
    return entry


async def home(request: Request) -> Response:
    runtime = get_runtime(request)
    shown = [p for p in runtime.catalog.visible("tms") + runtime.catalog.visible("wms") if not p.format.is_vector]
    unique = {p.id: p for p in shown}
    entries = [_layer_entry(p) for p in unique.values()]
    items = "".join(
        f"<li><b>{html.escape(p.layer.title)}</b> <code>{html.escape(p.id)}</code> — {html.escape(p.tms.id)},"
        f" {html.escape(p.format.code)}</li>"
        for p in unique.values()
    )
    title = html.escape(runtime.settings.service_title)
    # </script> can't appear in JSON from orjson unless a title holds it: escape '<'
    layers_json = orjson.dumps(entries).decode().replace("<", "\\u003c")
    return HTMLResponse(PAGE.format(title=title, items=items, layers=layers_json), headers={"Cache-Control": "no-cache"})


def routes() -> list[BaseRoute]:
    return [
        Route("/", home),
        Mount("/static", app=StaticFiles(directory=str(PACKAGE_DIR / "static")), name="static"),
    ]
