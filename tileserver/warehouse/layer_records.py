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
    if record_id is not None and record_id != data["layer_name"]:
        descriptor["name"] = data["layer_name"]
    return parse_layer(record_id or data["layer_name"], descriptor)
