"""OGC API Tiles tilesets: the scopes (dataset, collection, style) tilesets are listed in, and their documents."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from tileserver.catalog import PublishedLayer
from tileserver.render.model import style_usable
from tileserver.render.styles import Style
from tileserver.rok4.descriptor import TileLimits
from tileserver.runtime import get_runtime
from tileserver.services.ogcapi_common import (
    JSON,
    REGISTERED,
    REL,
    Ctx,
    data_type,
    invalid,
    link,
    not_found,
    self_links,
)
from tileserver.services.ogcapi_grids import extra_grid, grid_crs, grid_ids, registered_definition
from tileserver.services.ows import echo
from tileserver.services.stylebook import style_book
from tileserver.services.vectortables import tilejson_type, vector_tables

# --- tileset scopes -------------------------------------------------------------------------------


STYLED_MIME, STYLED_F = "image/png", "png"  # what a style that changes pixels renders to


def rendering_style(ctx: Ctx, published: PublishedLayer, name: str | None) -> Style | None:
    """The style tiles must be rendered with; None when they pass through as stored.

    No style segment, a style without a definition (a name only, as ROK4's `normal`) or an identity
    style pass through; a style that changes pixels is rendered (PNG), if the data can take it."""
    if name is None:
        return None
    book = style_book(get_runtime(ctx.request))
    style = book.get(name) or next((s for s in book.values() if s.identifier == name), None)
    if style is None or style.is_identity:
        return None
    if not style_usable(style, published.channels, published.format.sample_format):
        raise invalid(f"style {echo(name)} cannot be applied to the data of {echo(published.id)}")
    return style


def tile_type(ctx: Ctx, published: PublishedLayer, style: str | None) -> tuple[str, str]:
    """(media type, OGC `f` name) of the tiles of a layer in a style."""
    if rendering_style(ctx, published, style) is not None:
        return STYLED_MIME, STYLED_F
    return published.format.mime, published.format.ogc_f


@dataclass(frozen=True)
class Scope:
    """Whose tilesets: one collection, or the dataset (every visible collection of that data type)."""

    kind: str  # "map" or "vector"
    collection: PublishedLayer | None = None
    style: str | None = None

    def path(self) -> str:
        head = f"/collections/{quote(self.collection.id, safe='')}" if self.collection else ""
        styled = f"/styles/{quote(self.style, safe='')}" if self.style else ""
        return head + styled + ("/map/tiles" if self.kind == "map" else "/tiles")

    def layers(self, ctx: Ctx) -> list[PublishedLayer]:
        """Layers in the scope; 404 when the collection has no such tiles or the style is unknown."""
        if self.collection is not None:
            if data_type(self.collection) != self.kind:
                raise not_found(f"collection {echo(self.collection.id)} has no {self.kind} tiles")
            if self.style is not None and self.style not in collection_styles(ctx, self.collection):
                raise not_found(
                    f"style {echo(self.style)} is not a style of collection {echo(self.collection.id)}"
                )
            return [self.collection]
        layers = [p for p in ctx.visible() if data_type(p) == self.kind]
        if self.style is not None:
            layers = [p for p in layers if self.style in collection_styles(ctx, p)]
            if not layers:
                raise not_found(f"style {echo(self.style)} is not a style of any collection")
        return layers


def collection_styles(ctx: Ctx, published: PublishedLayer) -> list[str]:
    """The layer's styles its data can take: a style segment is advertised only where its tiles are
    served (hypso on an RGB picture would answer 400 for every tile of the tileset). A name without
    a definition (ROK4's `normal`) passes the tiles through, so it stays."""
    book = style_book(get_runtime(ctx.request))
    by_identifier = {s.identifier: s for s in book.values()}
    out = []
    for name in published.layer.styles:
        style = book.get(name) or by_identifier.get(name)
        if style is None or style_usable(style, published.channels, published.format.sample_format):
            out.append(name)
    return out


def make_scope(ctx: Ctx, kind: str, collection_id: str | None = None, style_id: str | None = None) -> Scope:
    collection = ctx.layer(collection_id) if collection_id is not None else None
    scope = Scope(kind, collection, style_id)
    scope.layers(ctx)  # validates collection kind and style
    return scope


def grid_levels(layers: list[PublishedLayer], grid: str) -> list[tuple[str, TileLimits]]:
    """Union of the limits per matrix in a tileset's grid, coarsest first: each layer's published
    ones where the grid is its own, those of its extra (reprojected) grid otherwise. A dataset
    tileset mixes both (`4326` is BDPARCELLAIRE's own grid and an extra grid of MONTAGNE)."""
    merged: dict[str, TileLimits] = {}
    cells: dict[str, float] = {}
    for published in layers:
        extra = extra_grid(published, grid)
        if extra is None:
            found = [(lv, published.limits[lv], published.matrix(lv).cell_size) for lv in published.level_ids]
        else:
            found = [(m.id, extra.limits[m.id], m.cell_size) for m in extra.matrices if m.id in extra.limits]
        for level, limits, cell in found:
            merged[level] = merged[level].union(limits) if level in merged else limits
            cells[level] = cell
    return [(level, merged[level]) for level in sorted(merged, key=lambda lv: -cells[lv])]


def _vector_layers(published: PublishedLayer) -> list[dict[str, Any]]:
    """Tileset `layers` of a vector pyramid: one per table, with the tile matrices holding it."""
    found: dict[str, dict[str, Any]] = {}
    for level, name, geometry, fields in vector_tables(published):
        entry = found.setdefault(name, {"id": name, "dataType": "vector", "minTileMatrix": level})
        entry["maxTileMatrix"] = level  # levels come top → bottom
        if geometry:
            entry["geometryType"] = geometry
        if fields:
            properties = entry.setdefault("propertiesSchema", {"type": "object", "properties": {}})[
                "properties"
            ]
            properties.update({field_name: {"type": tilejson_type(kind).lower(), "description": kind}
                               for field_name, kind in fields.items()})
    return list(found.values())


def tilesets_document(ctx: Ctx, scope: Scope) -> dict[str, Any]:
    layers = scope.layers(ctx)
    grids: dict[str, PublishedLayer] = {}
    for published in layers:
        for grid in grid_ids(published):
            grids.setdefault(grid, published)
    tilesets = []
    for grid, published in grids.items():
        item: dict[str, Any] = {
            "title": f"{published.layer.title if scope.collection else 'dataset'} ({grid})",
            "dataType": scope.kind,
            "crs": grid_crs(published, grid),
            "links": [
                link(ctx.url(f"{scope.path()}/{grid}", f="json"), "self", JSON, f"tileset in {grid}"),
                link(ctx.url(f"/tileMatrixSets/{grid}"), REL + "tiling-scheme", JSON, grid),
            ],
        }
        if grid in REGISTERED:
            item["tileMatrixSetURI"] = registered_definition(grid)["uri"]
        tilesets.append(item)
    return {"links": self_links(ctx, scope.path(), "tilesets"), "tilesets": tilesets}


def tileset_document(ctx: Ctx, scope: Scope, grid: str) -> dict[str, Any]:
    layers = [p for p in scope.layers(ctx) if grid in grid_ids(p)]
    if not layers:
        raise not_found(f"no tileset in tile matrix set {echo(grid)} here")
    first = layers[0]
    fmt = first.format
    mimes = {tile_type(ctx, p, scope.style)[0] for p in layers} if scope.collection else {STYLED_MIME}
    path = f"{scope.path()}/{grid}"
    template = ctx.url(f"{path}/{{tileMatrix}}/{{tileRow}}/{{tileCol}}")
    doc: dict[str, Any] = {
        "title": f"{first.layer.title if scope.collection else 'dataset'} ({grid})",
        "dataType": scope.kind,
        "crs": grid_crs(first, grid),
        "tileMatrixSetLimits": [
            {
                "tileMatrix": level,
                "minTileRow": lim.min_row,
                "maxTileRow": lim.max_row,
                "minTileCol": lim.min_col,
                "maxTileCol": lim.max_col,
            }
            for level, lim in grid_levels(layers, grid)
        ],
        "links": [
            *self_links(ctx, path, "tileset"),
            link(ctx.url(f"/tileMatrixSets/{grid}"), REL + "tiling-scheme", JSON, grid),
            link(template, "item", mimes.pop() if len(mimes) == 1 else None, "tiles", templated=True),
        ],
    }
    if scope.collection is not None:
        doc["description"] = first.layer.abstract
        doc["links"].append(
            link(ctx.url(f"/collections/{quote(first.id, safe='')}"), REL + "geodata", JSON, first.id)
        )
        if fmt.is_vector:
            doc["layers"] = _vector_layers(first) or [{"id": first.id, "dataType": "vector"}]
    else:
        doc["description"] = (
            "the collections drawn together (PNG); ?collections=<collection id> for one collection's own tiles"
        )
        doc["links"].append(link(ctx.url(""), REL + "dataset", JSON, "dataset"))
        doc["layers"] = [
            {
                "id": p.id,
                "title": p.layer.title,
                "dataType": scope.kind,
                "links": [link(ctx.url(f"/collections/{quote(p.id, safe='')}"), REL + "geodata", JSON, p.id)],
            }
            for p in layers
        ]
    if grid in REGISTERED:
        doc["tileMatrixSetURI"] = registered_definition(grid)["uri"]
    return doc
