"""The layer record a configuration publishes: what every configuration type adds the same way."""

from __future__ import annotations

from typing import Any

from tileserver.publication.model import Layer, parse_layer


def layer_record(descriptor: dict[str, Any], data: dict[str, Any], restricted: bool,
                 record_id: str | None) -> Layer:
    """A type's descriptor completed with the configuration's metadata, attribution and access; the
    record answers as the configuration's layer_name even when stored under another id."""
    if data.get("metadata"):
        descriptor["metadata"] = data["metadata"]
    if data.get("attribution"):
        descriptor["attribution"] = data["attribution"]
    if restricted:
        descriptor["restricted"] = True
    styles = vector_styles(data)
    if styles:
        descriptor["vector_styles"] = styles
    if record_id is not None and record_id != data["layer_name"]:
        descriptor["name"] = data["layer_name"]
    return parse_layer(record_id or data["layer_name"], descriptor)


def mapbox_entry(style: dict[str, Any]) -> dict[str, Any] | None:
    """The MapLibre / Mapbox GL document of an `extra.styles` item: the item itself when it has a `url`,
    else its `layers` entry without a `name` (cartes.gouv.fr's Mapbox file; named entries are per-table
    SLD or QML files)."""
    if style.get("url") or style.get("annexe_id"):
        return style
    layers = style.get("layers")
    return next((entry for entry in layers if isinstance(entry, dict) and not entry.get("name")), None) \
        if isinstance(layers, list) else None


def vector_styles(data: dict[str, Any]) -> list[dict[str, Any]]:
    """A WMTS-TMS configuration's `extra.styles` (checked by PATCH) as the layer record's `vector_styles`."""
    styles = (data.get("extra") or {}).get("styles") if data.get("type") == "WMTS-TMS" else None
    out = []
    for style in styles if isinstance(styles, list) else []:
        entry = mapbox_entry(style)
        if entry is not None and entry.get("url"):
            out.append({"name": style["technical_name"], "title": style.get("name", style["technical_name"]),
                        "url": entry["url"], "current": bool(style.get("current", False))})
    return out
