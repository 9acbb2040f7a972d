"""Publication records: a layer as a ROK4 layer descriptor holds it (server 7 keys and legacy keys).

The same record backs ROK4's admin API, the CLI and the warehouse API's configurations.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

RESAMPLINGS = ("nn", "linear", "bicubic", "lanczos", "lanczos_2", "lanczos_3", "lanczos_4")
SERVICES = ("wms", "wmts", "tms", "ogcapi")
LAYER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_KNOWN_KEYS = {
    "title", "abstract", "keywords", "pyramids", "styles", "resampling", "bbox", "wms", "wmts", "tms",
    "ogcapi", "extra_crs", "extra_tilematrixsets", "get_feature_info", "metadata", "attribution",
    # tileserver extensions
    "empty_tile_404", "cache_control", "restricted", "name", "wfs", "vector_styles", "vector_map",
}  # fmt: skip
STYLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")  # a vector style's name in its URL
# a WFS feature type's local name and its prefix (the record's public name) must be XML names
NCNAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,127}$")


class LayerError(ValueError):
    """An invalid layer descriptor; `field` names the offending key (JSON pointer-like)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class LayerPyramid:
    path: str  # descriptor URL: file:///abs/NAME.json, /abs/NAME.json or s3://bucket/NAME.json
    bottom_level: str
    top_level: str


@dataclass(frozen=True)
class WfsRelation:
    """One table of a vector base published as a feature type `<layer public name>:<public_name>`."""

    native_name: str
    public_name: str
    title: str = ""
    abstract: str = ""
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class WfsSource:
    """A vector base (a GeoPackage file: path or file:// URL) and the relations it publishes."""

    base: str
    relations: tuple[WfsRelation, ...]
    bbox: tuple[float, float, float, float] | None = None  # WGS84 west, south, east, north

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"base": self.base, "relations": [
            {**asdict(r), "keywords": list(r.keywords)} for r in self.relations]}
        if self.bbox is not None:
            out["bbox"] = list(self.bbox)
        return out


@dataclass(frozen=True)
class MapRelation:
    """A table drawn by a WMS-vector layer: its SLD (None: the default style) and its GetFeatureInfo
    template. The documents travel in the record, so every process draws the same style."""

    name: str
    style: str = ""  # static id of the SLD, kept to find the layers a re-uploaded style changes
    sld: str = ""  # the SLD document
    ftl: str = ""  # static id of the FreeMarker template
    template: str = ""  # the template


@dataclass(frozen=True)
class MapSource:
    """A vector base drawn as one WMS layer: its relations, the first drawn on top."""

    base: str
    relations: tuple[MapRelation, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "relations": [{k: v for k, v in asdict(r).items() if v} for r in self.relations]}


@dataclass(frozen=True)
class Layer:
    id: str
    title: str
    abstract: str
    pyramids: tuple[LayerPyramid, ...]
    keywords: tuple[str, ...] = ()
    styles: tuple[str, ...] = ("normal",)
    resampling: str = "lanczos_2"
    bbox: tuple[float, float, float, float] | None = None  # west, south, east, north (EPSG:4326 degrees)
    services: tuple[str, ...] = SERVICES  # enabled services
    extra_crs: tuple[str, ...] = ()
    extra_tilematrixsets: tuple[str, ...] = ()
    get_feature_info: dict[str, Any] | None = None  # {"type": "PYRAMID"} or {"type": "EXTERNALWMS", ...}
    metadata: tuple[dict[str, Any], ...] = ()
    attribution: dict[str, Any] | None = None
    empty_tile_404: bool = False  # restore ROK4's 404 for empty tiles inside the limits
    cache_control: str = ""  # per-layer Cache-Control; empty = server default
    restricted: bool = False  # served only with an API key granting it; never in anonymous capabilities
    # the name services show and answer to, when it is not the record id: one name may then be a
    # WMTS layer in one record and a WMS layer in another (the warehouse's layer_name per service)
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys kept for round trips
    wfs: WfsSource | None = None  # a vector layer (WFS, OGC API Features) instead of pyramids
    # client styles of a vector tile layer (MapLibre / Mapbox GL JSON documents elsewhere, e.g. the
    # warehouse's published annexes): ({"name", "title", "url", "current"}, …), offered next to its TileJSON
    vector_styles: tuple[dict[str, Any], ...] = ()
    vector_map: MapSource | None = None  # a WMS layer drawn from a vector base instead of pyramids

    def enabled(self, service: str) -> bool:
        return service in self.services

    @property
    def public_name(self) -> str:
        return self.name or self.id

    @property
    def queryable(self) -> bool:
        return self.get_feature_info is not None

    def to_descriptor(self) -> dict[str, Any]:
        """ROK4 server 7 layer descriptor (modern keys)."""
        out: dict[str, Any] = {
            "title": self.title,
            "abstract": self.abstract,
            "keywords": list(self.keywords),
            "pyramids": [asdict(p) for p in self.pyramids],
            "styles": list(self.styles),
            "resampling": self.resampling,
        }
        if self.wfs is not None:
            del out["pyramids"]
            out["wfs"] = self.wfs.to_dict()
        if self.vector_map is not None:
            del out["pyramids"]
            out["vector_map"] = self.vector_map.to_dict()
        for service in SERVICES:
            out[service] = {"enabled": service in self.services}
        if self.extra_crs:
            out["extra_crs"] = list(self.extra_crs)
        if self.extra_tilematrixsets:
            out["extra_tilematrixsets"] = list(self.extra_tilematrixsets)
        if self.bbox is not None:
            out["bbox"] = dict(zip(("west", "south", "east", "north"), self.bbox, strict=True))
        if self.get_feature_info is not None:
            out["get_feature_info"] = dict(self.get_feature_info)
        if self.metadata:
            out["metadata"] = [dict(m) for m in self.metadata]
        if self.attribution is not None:
            out["attribution"] = dict(self.attribution)
        if self.empty_tile_404:
            out["empty_tile_404"] = True
        if self.cache_control:
            out["cache_control"] = self.cache_control
        if self.restricted:
            out["restricted"] = True
        if self.name:
            out["name"] = self.name
        if self.vector_styles:
            out["vector_styles"] = [dict(s) for s in self.vector_styles]
        return out


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LayerError(where, "must be an array of strings")
    return tuple(value)


def _text(data: dict[str, Any], key: str, required: bool) -> str:
    value = data.get(key)
    if value is None:
        if required:
            raise LayerError(key, "is required")
        return ""
    if not isinstance(value, str):
        raise LayerError(key, "must be a string")
    return value


def _level_id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise LayerError(where, "must be a level id (string)")
    return str(value)


def _pyramids(value: Any) -> tuple[LayerPyramid, ...]:
    if not isinstance(value, list) or not value:
        raise LayerError("pyramids", "must be a non-empty array")
    out = []
    for i, item in enumerate(value):
        where = f"pyramids[{i}]"
        if not isinstance(item, dict):
            raise LayerError(where, "must be an object")
        path = item.get("path")
        if not isinstance(path, str) or not path.endswith(".json"):
            raise LayerError(f"{where}.path", "must be a pyramid descriptor path ending with .json")
        out.append(
            LayerPyramid(
                path=path,
                bottom_level=_level_id(item.get("bottom_level"), f"{where}.bottom_level"),
                top_level=_level_id(item.get("top_level"), f"{where}.top_level"),
            )
        )
    return tuple(out)


def _bbox(value: Any) -> tuple[float, float, float, float]:
    if not isinstance(value, dict):
        raise LayerError("bbox", "must be an object with west, south, east, north")
    coords = []
    for key in ("west", "south", "east", "north"):
        v = value.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise LayerError(f"bbox.{key}", "must be a number")
        coords.append(float(v))
    west, south, east, north = coords
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise LayerError("bbox", "must satisfy -180 ≤ west < east ≤ 180 and -90 ≤ south < north ≤ 90")
    return (west, south, east, north)


def _get_feature_info(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise LayerError("get_feature_info", "must be an object")
    kind = value.get("type")
    if kind == "PYRAMID":
        return {"type": "PYRAMID"}
    if kind == "EXTERNALWMS":
        for key in ("url", "layers"):
            if not isinstance(value.get(key), str) or not value[key]:
                raise LayerError(f"get_feature_info.{key}", "is required for EXTERNALWMS")
        return dict(value)
    raise LayerError("get_feature_info.type", "must be PYRAMID or EXTERNALWMS")


def parse_layer(layer_id: str, data: Any) -> Layer:
    """Validate a ROK4 layer descriptor (server 7 or legacy keys) into a Layer."""
    if not LAYER_ID.match(layer_id or ""):
        raise LayerError("id", "must be 1–128 letters, digits, '_', '-' or '.', starting with a letter or digit")
    if not isinstance(data, dict):
        raise LayerError("(root)", "a layer descriptor must be a JSON object")
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        raise LayerError(unknown[0], "unknown key")
    services = []
    extra_crs: list[str] = []
    extra_tms: list[str] = []
    for service in SERVICES:
        section = data.get(service, {})
        if not isinstance(section, dict):
            raise LayerError(service, "must be an object")
        for key in ("enabled", "authorized"):
            if key in section and not isinstance(section[key], bool):
                raise LayerError(f"{service}.{key}", "must be true or false")
        if section.get("enabled", section.get("authorized", True)):
            services.append(service)
        if service == "wms" and "crs" in section:
            extra_crs.extend(_strings(section["crs"], "wms.crs"))
        if service == "wmts" and "tms" in section:
            extra_tms.extend(_strings(section["tms"], "wmts.tms"))
    if "extra_crs" in data:
        extra_crs.extend(_strings(data["extra_crs"], "extra_crs"))
    if "extra_tilematrixsets" in data:
        extra_tms.extend(_strings(data["extra_tilematrixsets"], "extra_tilematrixsets"))
    resampling = data.get("resampling", "lanczos_2")
    if resampling not in RESAMPLINGS:
        raise LayerError("resampling", f"must be one of {', '.join(RESAMPLINGS)}")
    styles = _strings(data["styles"], "styles") if "styles" in data else ("normal",)
    metadata = data.get("metadata", [])
    if not isinstance(metadata, list) or not all(isinstance(m, dict) and isinstance(m.get("url"), str) for m in metadata):
        raise LayerError("metadata", "must be an array of {format, url, type}")
    attribution = data.get("attribution")
    if attribution is not None and not (isinstance(attribution, dict) and isinstance(attribution.get("title", ""), str)):
        raise LayerError("attribution", "must be an object {title, url, logo}")
    empty_404, restricted = (data.get(key, False) for key in ("empty_tile_404", "restricted"))
    wfs = _wfs(data["wfs"]) if "wfs" in data else None
    vector_map = _vector_map(data["vector_map"]) if "vector_map" in data else None
    if vector_map is not None and ("pyramids" in data or wfs is not None):
        raise LayerError("vector_map", "a layer publishes either pyramids, a WFS base or a vector map")
    if wfs is not None and "pyramids" in data:
        raise LayerError("wfs", "a layer publishes either pyramids or a vector base, not both")
    if wfs is not None and not NCNAME.match(_public_name(data) or layer_id):
        raise LayerError("name", "a WFS layer's name prefixes its feature types: it must start with a letter"
                         " or '_' and hold only letters, digits, '_' and '-'")
    for key, value in (("empty_tile_404", empty_404), ("restricted", restricted)):
        if not isinstance(value, bool):
            raise LayerError(key, "must be true or false")
    return Layer(
        id=layer_id,
        title=_text(data, "title", required=True),
        abstract=_text(data, "abstract", required=True),
        keywords=_strings(data["keywords"], "keywords") if "keywords" in data else (),
        pyramids=() if wfs is not None or vector_map is not None else _pyramids(data.get("pyramids")),
        styles=styles or ("normal",),
        resampling=resampling,
        bbox=_bbox(data["bbox"]) if "bbox" in data else None,
        services=tuple(services),
        extra_crs=tuple(dict.fromkeys(extra_crs)),
        extra_tilematrixsets=tuple(dict.fromkeys(extra_tms)),
        get_feature_info=_get_feature_info(data.get("get_feature_info")),
        metadata=tuple(metadata),
        attribution=attribution,
        empty_tile_404=empty_404,
        cache_control=_text(data, "cache_control", required=False),
        restricted=restricted,
        name=_public_name(data),
        wfs=wfs,
        vector_styles=parse_vector_styles(data.get("vector_styles", [])),
        vector_map=vector_map,
    )


def parse_vector_styles(value: Any) -> tuple[dict[str, Any], ...]:
    """`[{"name", "url", "title"?, "current"?}]`: name unique and URL-safe, url http(s)."""
    if not isinstance(value, list):
        raise LayerError("vector_styles", "must be an array of {name, url, title?, current?}")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"vector_styles[{i}]"
        if not isinstance(item, dict):
            raise LayerError(where, "must be an object {name, url, title?, current?}")
        name, url = item.get("name"), item.get("url")
        if not isinstance(name, str) or not STYLE_NAME.match(name) or name == "default":
            raise LayerError(f"{where}.name", "must be 1–128 letters, digits, '_', '-' or '.' (not 'default')")
        if any(s["name"] == name for s in out):
            raise LayerError(f"{where}.name", f"{name} is given twice")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise LayerError(f"{where}.url", "must be an http(s) URL")
        title = item.get("title", name)
        if not isinstance(title, str):
            raise LayerError(f"{where}.title", "must be a string")
        if not isinstance(item.get("current", False), bool):
            raise LayerError(f"{where}.current", "must be true or false")
        out.append({"name": name, "title": title, "url": url, "current": bool(item.get("current", False))})
    return tuple(out)


def _vector_map(value: Any) -> MapSource:
    """`{"base", "relations": [{name, style?, sld?, ftl?, template?}]}`."""
    if not isinstance(value, dict) or set(value) - {"base", "relations"}:
        raise LayerError("vector_map", "must be an object {base, relations}")
    base = value.get("base")
    if not isinstance(base, str) or not base.strip():
        raise LayerError("vector_map.base", "must be the path or file:// URL of the vector base")
    items = value.get("relations")
    if not isinstance(items, list) or not items:
        raise LayerError("vector_map.relations", "must be a non-empty array")
    relations = []
    for i, item in enumerate(items):
        where = f"vector_map.relations[{i}]"
        if not isinstance(item, dict) or set(item) - {"name", "style", "sld", "ftl", "template"}:
            raise LayerError(where, "must be an object {name, style?, sld?, ftl?, template?}")
        if not isinstance(item.get("name"), str) or not item["name"]:
            raise LayerError(f"{where}.name", "is required")
        texts = {key: _text(item, key, required=False) for key in ("style", "sld", "ftl", "template")}
        relations.append(MapRelation(item["name"], **texts))
    return MapSource(base.strip(), tuple(relations))


def _wfs(value: Any) -> WfsSource:
    """`{"base", "relations": [{native_name, public_name?, title?, keywords?, abstract?}], "bbox"?}`."""
    if not isinstance(value, dict):
        raise LayerError("wfs", "must be an object {base, relations, bbox?}")
    unknown = sorted(set(value) - {"base", "relations", "bbox"})
    if unknown:
        raise LayerError(f"wfs.{unknown[0]}", "unknown key")
    base = value.get("base")
    if not isinstance(base, str) or not base.strip():
        raise LayerError("wfs.base", "must be the path or file:// URL of the vector base")
    items = value.get("relations")
    if not isinstance(items, list) or not items:
        raise LayerError("wfs.relations", "must be a non-empty array")
    relations: list[WfsRelation] = []
    for i, item in enumerate(items):
        where = f"wfs.relations[{i}]"
        if not isinstance(item, dict):
            raise LayerError(where, "must be an object")
        native = item.get("native_name")
        if not isinstance(native, str) or not native:
            raise LayerError(f"{where}.native_name", "is required")
        public = item.get("public_name") or native
        if not isinstance(public, str) or not NCNAME.match(public):
            raise LayerError(f"{where}.public_name", "must start with a letter or '_' and hold only letters,"
                             " digits, '_' and '-'")
        if any(r.public_name == public for r in relations):
            raise LayerError(f"{where}.public_name", f"{public} is published twice")
        texts = {key: _text(item, key, required=False) for key in ("title", "abstract")}
        keywords = _strings(item["keywords"], f"{where}.keywords") if item.get("keywords") is not None else ()
        relations.append(WfsRelation(native, public, texts["title"], texts["abstract"], keywords))
    bbox = None
    if value.get("bbox") is not None:
        raw = value["bbox"]
        if isinstance(raw, list) and len(raw) == 4:
            raw = dict(zip(("west", "south", "east", "north"), raw, strict=True))
        try:
            bbox = _bbox(raw)
        except LayerError as exc:
            raise LayerError("wfs.bbox", exc.message) from None
    return WfsSource(base.strip(), tuple(relations), bbox)


def _public_name(data: dict[str, Any]) -> str:
    name = _text(data, "name", required=False)
    if name and not LAYER_ID.match(name):
        raise LayerError("name", "1–128 letters, digits, '_', '-' or '.', starting with a letter or digit")
    return name
