"""What the services read: an immutable snapshot of the published layers, with their pyramids opened.

A new Catalog is built when the store changes and swapped in one assignment, so a request sees the
old layers or the new ones, never half an update. Documents derived from it (capabilities) are
cached on the Catalog itself and die with it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tileserver import transformers
from tileserver.publication.model import Layer, WfsRelation
from tileserver.pyramid import Pyramid, PyramidError, SlabIndexCache
from tileserver.rok4.descriptor import TileLimits
from tileserver.rok4.formats import PyramidFormat
from tileserver.rok4.tms import TileMatrix, TileMatrixSet
from tileserver.storage import Storage, StorageError

log = logging.getLogger("tileserver.catalog")


@dataclass(frozen=True)
class PublishedLayer:
    """A layer ready to serve: its record, the pyramid owning each published level, limits per level."""

    layer: Layer
    tms: TileMatrixSet
    format: PyramidFormat
    channels: int
    nodata: tuple[float, ...]
    level_ids: tuple[str, ...]  # published levels, top (coarsest) → bottom (finest)
    owners: dict[str, Pyramid]  # level id → pyramid holding it
    limits: dict[str, TileLimits]  # level id → inclusive limits advertised and served
    wgs84_bbox: tuple[float, float, float, float]
    native_bbox: tuple[float, float, float, float]  # bottom level extent in the grid's CRS
    restricted: bool = False

    @property
    def id(self) -> str:
        """The name services show and answer to (the record id unless the record names it otherwise)."""
        return self.layer.public_name

    @property
    def record_id(self) -> str:
        return self.layer.id

    @property
    def top_level(self) -> str:
        return self.level_ids[0]

    @property
    def bottom_level(self) -> str:
        return self.level_ids[-1]

    def matrix(self, level_id: str) -> TileMatrix:
        matrix = self.tms.get(level_id)
        assert matrix is not None
        return matrix

    def in_limits(self, level_id: str, col: int, row: int) -> bool:
        limits = self.limits.get(level_id)
        return limits is not None and limits.contains(col, row)

    async def get_tile(self, level_id: str, col: int, row: int) -> bytes | None:
        """Stored bytes of a tile inside the published limits, None where there is no data."""
        if not self.in_limits(level_id, col, row):
            return None
        return await self.owners[level_id].get_tile(level_id, col, row)


@dataclass(frozen=True)
class FeatureType:
    """A relation of a vector base published as `<layer public name>:<public_name>`."""

    published: VectorLayer
    public: WfsRelation
    relation: Any  # tileserver.vector.base.Relation
    wgs84_bbox: tuple[float, float, float, float] | None

    @property
    def name(self) -> str:
        return f"{self.published.id}:{self.public.public_name}"

    @property
    def base(self) -> Any:
        return self.published.base


@dataclass(frozen=True)
class VectorLayer:
    """A layer record publishing relations of a vector base (WFS, OGC API Features); the base is opened
    once per snapshot. Shares PublishedLayer's `layer`, `restricted` and `record_id`, which is all access
    and cache-header policy reads."""

    layer: Layer
    base: Any  # tileserver.vector.base.VectorBase
    types: tuple[FeatureType, ...] = ()
    restricted: bool = False

    @property
    def id(self) -> str:
        return self.layer.public_name

    @property
    def record_id(self) -> str:
        return self.layer.id


@dataclass(frozen=True)
class MapRelationStyle:
    """A relation a vector map draws, its parsed SLD (None: the default blue) and its FTL template."""

    relation: Any  # tileserver.vector.base.Relation
    style: Any  # tileserver.render.sld.Style | None
    template: str = ""


@dataclass(frozen=True)
class VectorMap:
    """A WMS layer drawn from a vector base (a WMS-VECTOR configuration): relations first-on-top.
    Shares PublishedLayer's `layer`, `restricted`, `record_id`, `id` and `wgs84_bbox`, which is all
    access, cache-header and capabilities policy read."""

    layer: Layer
    path: str  # the GeoPackage file mapnik reads
    base: Any  # tileserver.vector.base.VectorBase, for GetFeatureInfo
    relations: tuple[MapRelationStyle, ...]
    wgs84_bbox: tuple[float, float, float, float]
    restricted: bool = False

    @property
    def id(self) -> str:
        return self.layer.public_name

    @property
    def record_id(self) -> str:
        return self.layer.id


@dataclass
class Catalog:
    revision: int
    layers: dict[str, PublishedLayer]
    styles: dict[str, Any] = field(default_factory=dict)
    key_access: dict[str, frozenset[str]] = field(default_factory=dict)  # key hash → record ids ("*" = all)
    errors: dict[str, str] = field(default_factory=dict)  # layer id → why it is not served
    documents: dict[Any, Any] = field(default_factory=dict)  # per-snapshot cache (capabilities…)
    vector_layers: dict[str, VectorLayer] = field(default_factory=dict)  # record id → WFS layer
    vector_maps: dict[str, VectorMap] = field(default_factory=dict)  # record id → WMS-vector layer

    def maps_named(self) -> dict[str, VectorMap]:
        """WMS-vector layers by the name they show; a name a raster WMS layer shows stays the raster's."""
        def build() -> dict[str, VectorMap]:
            raster = self.named("wms")
            out: dict[str, VectorMap] = {}
            for record_id in sorted(self.vector_maps):
                published = self.vector_maps[record_id]
                if published.layer.enabled("wms") and published.id not in raster:
                    out.setdefault(published.id, published)
            return out

        return self.document(("maps_named",), build)

    def vector_map(self, name: str, key_hash: str | None = None) -> VectorMap | None:
        published = self.maps_named().get(name)
        if published is None or not self.allowed(published, key_hash):  # type: ignore[arg-type]
            return None
        return published

    def visible_maps(self, key_hash: str | None = None) -> list[VectorMap]:
        return [p for p in self.maps_named().values() if self.allowed(p, key_hash)]  # type: ignore[arg-type]

    def feature_types(self, key_hash: str | None = None, service: str = "wfs") -> list[FeatureType]:
        """Feature types the caller may see, by name; a name taken twice goes to the first record id."""
        def build() -> dict[str, FeatureType]:
            out: dict[str, FeatureType] = {}
            for record_id in sorted(self.vector_layers):
                published = self.vector_layers[record_id]
                if service == "wfs" or published.layer.enabled(service):
                    for feature_type in published.types:
                        out.setdefault(feature_type.name, feature_type)
            return out

        named: dict[str, FeatureType] = self.document(("feature_types", service), build)
        return [t for t in named.values() if self.allowed(t.published, key_hash)]  # type: ignore[arg-type]

    def feature_type(self, name: str, key_hash: str | None = None, service: str = "wfs") -> FeatureType | None:
        return next((t for t in self.feature_types(key_hash, service) if t.name == name), None)

    def allowed(self, published: PublishedLayer, key_hash: str | None) -> bool:
        """Grants name layer records, never public names: another tenant may show the same name."""
        if not published.restricted:
            return True
        if key_hash is None:
            return False
        granted = self.key_access.get(key_hash, frozenset())
        return "*" in granted or published.record_id in granted

    def visible(self, service: str, key_hash: str | None = None) -> list[PublishedLayer]:
        named = self.named(service)
        return [p for p in self.layers.values() if named.get(p.id) is p and self.allowed(p, key_hash)]

    def get(self, name: str, service: str, key_hash: str | None = None) -> PublishedLayer | None:
        published = self.named(service).get(name)
        if published is None or not self.allowed(published, key_hash):
            return None
        return published

    def named(self, service: str) -> dict[str, PublishedLayer]:
        """Layers of a service by the name it shows; a name taken twice goes to the first record id."""
        def build() -> dict[str, PublishedLayer]:
            out: dict[str, PublishedLayer] = {}
            for record_id in sorted(self.layers):
                published = self.layers[record_id]
                if published.layer.enabled(service):
                    out.setdefault(published.id, published)
            return out

        return self.document(("named", service), build)

    def document(self, key: Any, build: Callable[[], Any]) -> Any:
        """Build a derived document once per snapshot."""
        if key not in self.documents:
            self.documents[key] = build()
        return self.documents[key]


def _limits_within_bbox(pub_tms: TileMatrixSet, level_id: str, limits: TileLimits,
                        bbox: tuple[float, float, float, float]) -> TileLimits | None:
    """Restrict a level's limits to a WGS84 bbox given by the layer, as ROK4 does."""
    transformer = transformers.transformer("EPSG:4326", pub_tms.pyproj_crs)
    native = transformer.transform_bounds(*bbox, densify_pts=21)
    if not all(math.isfinite(v) for v in native):
        return limits
    matrix = pub_tms.get(level_id)
    assert matrix is not None
    tiles = matrix.bbox_to_tile_range(native)
    if tiles is None:
        return None
    min_col, min_row, max_col, max_row = tiles
    inside = TileLimits(
        max(min_col, limits.min_col), min(max_col, limits.max_col), max(min_row, limits.min_row), min(max_row, limits.max_row)
    )
    if inside.min_col > inside.max_col or inside.min_row > inside.max_row:
        return None
    return inside


class PyramidPool:
    """Opened pyramids by descriptor URL, reused across snapshots while the descriptor is unchanged."""

    def __init__(self, storage: Storage, cache: SlabIndexCache, tms_directory: str) -> None:
        self.storage = storage
        self.cache = cache
        self.tms_directory = tms_directory
        self._opened: dict[str, Pyramid] = {}

    async def get(self, url: str, refresh: bool = False) -> Pyramid:
        if refresh or url not in self._opened:
            self._opened[url] = await Pyramid.open(url, self.storage, self.cache, self.tms_directory)
        return self._opened[url]

    def forget_except(self, urls: Iterable[str]) -> None:
        keep = set(urls)
        for url in list(self._opened):
            if url not in keep:
                del self._opened[url]

    def __len__(self) -> int:
        return len(self._opened)


async def publish_layer(layer: Layer, pool: PyramidPool, restricted: bool = False) -> PublishedLayer:
    """Open a layer's pyramids and check they fit together; raises PyramidError with the reason."""
    owners: dict[str, Pyramid] = {}
    first: Pyramid | None = None
    for i, ref in enumerate(layer.pyramids):
        pyramid = await pool.get(ref.path)
        if first is None:
            first = pyramid
        elif (
            pyramid.tms.id != first.tms.id
            or pyramid.format.code != first.format.code
            or pyramid.descriptor.channels != first.descriptor.channels
        ):
            raise PyramidError(f"pyramids[{i}]: grid, format and channels must match the first pyramid")
        bottom, top = pyramid.tms.get(ref.bottom_level), pyramid.tms.get(ref.top_level)
        if bottom is None or top is None:
            raise PyramidError(f"pyramids[{i}]: levels {ref.top_level}–{ref.bottom_level} not in {pyramid.tms.id}")
        for level in pyramid.descriptor.levels:
            cell = pyramid.matrix(level.id).cell_size
            if bottom.cell_size * (1 - 1e-9) <= cell <= top.cell_size * (1 + 1e-9):
                if level.id in owners:
                    raise PyramidError(f"pyramids[{i}]: level {level.id} is already published by another pyramid")
                owners[level.id] = pyramid
        for level_id in (ref.bottom_level, ref.top_level):
            if pyramid.descriptor.level(level_id) is None:
                raise PyramidError(f"pyramids[{i}]: level {level_id} is not in {ref.path}")
    assert first is not None
    tms = first.tms
    level_ids = tuple(sorted(owners, key=lambda lv: -tms.get(lv).cell_size))  # type: ignore[union-attr]
    limits: dict[str, TileLimits] = {}
    for level_id in level_ids:
        lim = owners[level_id].level(level_id).tile_limits
        if layer.bbox is not None:
            restricted_lim = _limits_within_bbox(tms, level_id, lim, layer.bbox)
            if restricted_lim is None:
                continue
            lim = restricted_lim
        limits[level_id] = lim
    if not limits:
        raise PyramidError("the layer's bbox does not cover any published tile")
    level_ids = tuple(lv for lv in level_ids if lv in limits)
    bottom_id = level_ids[-1]
    lim = limits[bottom_id]
    native = tms.get(bottom_id).range_bbox(lim.min_col, lim.min_row, lim.max_col, lim.max_row)  # type: ignore[union-attr]
    if layer.bbox is not None:
        wgs84 = layer.bbox
    else:
        wgs84 = owners[bottom_id].wgs84_bbox(bottom_id)
    return PublishedLayer(
        layer=layer,
        tms=tms,
        format=first.format,
        channels=first.descriptor.channels,
        nodata=first.descriptor.nodata,
        level_ids=level_ids,
        owners=owners,
        limits=limits,
        wgs84_bbox=tuple(wgs84),  # type: ignore[arg-type]
        native_bbox=native,
        restricted=restricted,
    )


async def build_catalog(
    revision: int,
    layers: Iterable[Layer],
    pool: PyramidPool,
    restricted: Iterable[str] = (),
    key_access: dict[str, frozenset[str]] | None = None,
    styles: dict[str, Any] | None = None,
) -> Catalog:
    """Open every layer; a layer that cannot be served is logged and left out, never fatal."""
    restricted_ids = set(restricted)
    published: dict[str, PublishedLayer] = {}
    errors: dict[str, str] = {}
    every = list(layers)
    layer_list = [layer for layer in every if layer.wfs is None and layer.vector_map is None]
    vector = await publish_vector_layers([layer for layer in every if layer.wfs is not None], restricted_ids, errors)
    maps = await publish_vector_maps([layer for layer in every if layer.vector_map is not None], restricted_ids,
                                     errors)
    for layer in layer_list:
        try:
            published[layer.id] = await publish_layer(layer, pool, layer.id in restricted_ids)
        except (PyramidError, StorageError, ValueError) as exc:
            errors[layer.id] = str(exc)
            log.warning("layer %s not served: %s", layer.id, exc)
    pool.forget_except(p.path for layer in layer_list for p in layer.pyramids)
    return Catalog(revision, published, styles or {}, key_access or {}, errors, vector_layers=vector,
                   vector_maps=maps)


# --- vector layers --------------------------------------------------------------------------------


def base_path(url: str) -> str:
    """A vector base's local path (`file://` URLs and plain paths; object storage comes later)."""
    from urllib.parse import unquote, urlparse

    if url.startswith("file://"):
        return unquote(urlparse(url).path)
    if "://" in url:
        raise ValueError(f"{url}: only local vector bases (path or file:// URL) are served")
    return url


def open_vector_base(url: str) -> Any:
    """The base behind a `wfs.base` (blocking: call in a thread): a GeoPackage file, or a PostGIS
    schema (`postgresql://…#schema`)."""
    from tileserver.vector.geopackage import GeoPackageBase
    from tileserver.vector.postgis import PostGISBase, is_postgis

    if is_postgis(url):
        return PostGISBase(url)
    return GeoPackageBase(base_path(url))


def vector_layer(layer: Layer, base: Any, restricted: bool = False) -> VectorLayer:
    """Match a record's relations with the base's; ValueError names what the base lacks."""
    from tileserver.vector import crs

    assert layer.wfs is not None
    types: list[FeatureType] = []
    holder = VectorLayer(layer, base, (), restricted)
    for i, public in enumerate(layer.wfs.relations):
        relation = base.relation(public.native_name)
        if relation is None:
            raise ValueError(f"wfs.relations[{i}].native_name: the base has no relation {public.native_name}")
        bbox = layer.wfs.bbox
        if bbox is None and relation.extent is not None:
            degrees = crs.transform_bbox(relation.extent, relation.srs, "OGC:CRS84")
            west, south, east, north = (float(v) for v in degrees)
            bbox = (west, south, east, north) if all(map(math.isfinite, (west, south, east, north))) else None
        types.append(FeatureType(holder, public, relation, bbox))
    object.__setattr__(holder, "types", tuple(types))  # the types point back at their layer
    return holder


async def _publish_from_bases(layers: list[Layer], base_of: Callable[[Layer], str],
                              build: Callable[[Layer, Any, bool], Any], restricted_ids: set[str],
                              errors: dict[str, str]) -> dict[str, Any]:
    """Open each vector base once (layers sharing a base share it), build each layer from it off the
    loop; a layer that cannot be served (unreadable base, style that no longer fits) is logged and left
    out, never taking the others down."""
    import asyncio

    opened: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for layer in layers:
        base = base_of(layer)
        try:
            if base not in opened:
                opened[base] = await asyncio.to_thread(open_vector_base, base)
            out[layer.id] = await asyncio.to_thread(build, layer, opened[base], layer.id in restricted_ids)
        except Exception as exc:  # noqa: BLE001 - any failure is this layer's alone
            errors[layer.id] = str(exc)
            log.warning("layer %s not served: %s", layer.id, exc)
    return out


async def publish_vector_layers(
    layers: list[Layer], restricted_ids: set[str], errors: dict[str, str]
) -> dict[str, VectorLayer]:
    """WFS / OGC API Features layers."""
    return await _publish_from_bases(layers, lambda layer: layer.wfs.base,  # type: ignore[union-attr]
                                     vector_layer, restricted_ids, errors)


# --- WMS-vector layers ----------------------------------------------------------------------------


def empty_literals(style: Any) -> Any:
    """An empty `<ogc:Literal/>` compared with an attribute is the empty string (the SDK's own
    CANTON_style.sld has `insee_dep = ''`), not a missing value: pygeofilter reads it as None, which
    the map renderer cannot draw."""
    from dataclasses import is_dataclass, replace

    from pygeofilter import ast

    def fix(node: Any) -> Any:
        if not is_dataclass(node) or isinstance(node, type):
            return node
        if isinstance(node, ast.Comparison):
            lhs, rhs = fix(node.lhs), fix(node.rhs)
            return replace(node, lhs="" if lhs is None else lhs, rhs="" if rhs is None else rhs)
        if isinstance(node, ast.And | ast.Or):
            return replace(node, lhs=fix(node.lhs), rhs=fix(node.rhs))
        if isinstance(node, ast.Not):
            return replace(node, sub_node=fix(node.sub_node))
        return node

    groups = tuple(replace(group, rules=tuple(replace(rule, filter=fix(rule.filter)) for rule in group.rules))
                   for group in style.feature_type_styles)
    return replace(style, feature_type_styles=groups)


def vector_map(layer: Layer, base: Any, restricted: bool = False) -> VectorMap:
    """Match a WMS-vector record's relations with the base and parse their styles; ValueError (or the
    style's StyleError, a ValueError) names what does not fit."""
    from tileserver.render import sld
    from tileserver.vector import crs

    source = layer.vector_map
    assert source is not None
    relations = []
    boxes = []
    for i, item in enumerate(source.relations):
        relation = base.relation(item.name)
        if relation is None:
            raise ValueError(f"vector_map.relations[{i}].name: the base has no relation {item.name}")
        if relation.geometry_column is None:
            raise ValueError(f"vector_map.relations[{i}].name: relation {item.name} has no geometry to draw")
        style = None
        if item.sld:
            style = empty_literals(sld.parse(item.sld.encode()))
            sld.check_for_table(style, relation.name, [a.name for a in relation.attributes] + [relation.geometry_column])
        relations.append(MapRelationStyle(relation, style, item.template))
        if relation.extent is not None:
            west, south, east, north = (float(v) for v in crs.transform_bbox(relation.extent, relation.srs, "OGC:CRS84"))
            if all(map(math.isfinite, (west, south, east, north))):
                boxes.append((west, south, east, north))
    if layer.bbox is not None:
        bbox = layer.bbox
    elif boxes:
        bbox = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    else:
        bbox = (-180.0, -90.0, 180.0, 90.0)
    from tileserver.vector.postgis import is_postgis

    path = source.base if is_postgis(source.base) else base_path(source.base)  # mapnik's postgis input reads the URL
    return VectorMap(layer, path, base, tuple(relations), bbox, restricted)


async def publish_vector_maps(
    layers: list[Layer], restricted_ids: set[str], errors: dict[str, str]
) -> dict[str, VectorMap]:
    """WMS-vector layers."""
    return await _publish_from_bases(layers, lambda layer: layer.vector_map.base,  # type: ignore[union-attr]
                                     vector_map, restricted_ids, errors)
