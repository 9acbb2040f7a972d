"""The summary a platform shows for a stored pyramid (the Géoplateforme `stored_data` fields).

`srs`, `extent` (GeoJSON polygon, lon/lat, of the bottom level's limits), `size` (bytes),
`type_infos` {tms, levels (ids, top first), channels_format, channels_number, compression,
nodata_value} — built from a descriptor alone, so the warehouse can summarise any pyramid.
"""

from __future__ import annotations

from typing import Any

from tileserver.render.georef import reproject_bbox
from tileserver.rok4.descriptor import Descriptor
from tileserver.rok4.tms import TileMatrixSet


def wgs84_extent(descriptor: Descriptor, tms: TileMatrixSet) -> dict[str, Any]:
    """GeoJSON polygon (lon, lat) around the bottom level's tile limits."""
    bottom = min(descriptor.levels, key=lambda lv: tms.get(lv.id).cell_size)  # type: ignore[union-attr]
    matrix = tms.get(bottom.id)
    assert matrix is not None
    lim = bottom.tile_limits
    bbox = matrix.range_bbox(lim.min_col, lim.min_row, lim.max_col, lim.max_row)
    west, south, east, north = reproject_bbox(bbox, tms.crs, "EPSG:4326")
    west, south, east, north = max(west, -180.0), max(south, -90.0), min(east, 180.0), min(north, 90.0)
    ring = [[west, north], [east, north], [east, south], [west, south], [west, north]]
    return {"type": "Polygon", "coordinates": [[[round(x, 8), round(y, 8)] for x, y in ring]]}


def pyramid_summary(pyramid: Descriptor, tms: TileMatrixSet, size: int, **extra: Any) -> dict[str, Any]:
    """`extra` keys (descriptor path, slab counts…) are added as they are."""
    descriptor = pyramid
    levels = sorted(descriptor.levels, key=lambda lv: -tms.get(lv.id).cell_size)  # type: ignore[union-attr]
    raster = descriptor.raster
    assert raster is not None
    return {
        "type": "ROK4-PYRAMID-RASTER",
        "srs": tms.crs,
        "extent": wgs84_extent(descriptor, tms),
        "size": size,
        "type_infos": {
            "tms": descriptor.tile_matrix_set,
            "levels": [lv.id for lv in levels],
            "channels_format": descriptor.format.sample_format,
            "channels_number": raster.channels,
            "compression": descriptor.format.compression.upper(),
            "nodata_value": raster.to_dict()["nodata"],
        },
        **extra,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable form `pyramid build` prints."""
    infos = summary["type_infos"]
    ring = summary["extent"]["coordinates"][0]
    lons, lats = [p[0] for p in ring], [p[1] for p in ring]
    lines = [
        f"pyramid      {summary.get('descriptor', '')}",
        f"srs          {summary['srs']} (grid {infos['tms']})",
        f"extent       lon {min(lons):.6f} … {max(lons):.6f}, lat {min(lats):.6f} … {max(lats):.6f} (WGS84)",
        f"levels       {', '.join(infos['levels'])}",
        f"channels     {infos['channels_number']} × {infos['channels_format']}",
        f"compression  {infos['compression']}",
        f"nodata       {infos['nodata_value']}",
        f"size         {summary['size']} bytes in {summary.get('slabs', '?')} slabs",
    ]
    if summary.get("linked_slabs"):
        lines.append(f"linked       {summary['linked_slabs']} slabs shared with {summary.get('ancestor', 'the ancestor')}")
    return "\n".join(lines)
