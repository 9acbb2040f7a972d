"""OGC API metadata documents: landing page, conformance, tile matrix sets, collections."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from tileserver.catalog import PublishedLayer
from tileserver.rok4.tms import TileMatrixSet, crs_uri
from tileserver.runtime import get_runtime
from tileserver.services.ogcapi_common import (
    CONFORMANCE,
    CRS84,
    ENCODING_CLASSES,
    HTML,
    JSON,
    OPENAPI,
    PROVIDERS,
    REL,
    Ctx,
    bbox_param,
    data_type,
    link,
    not_found,
    self_links,
)
from tileserver.services.ogcapi_grids import extra_grid, grid_crs, grid_ids, registered_definition
from tileserver.services.ogcapi_tilesets import STYLED_F, Scope, collection_styles
from tileserver.services.ows import echo

# --- metadata documents ---------------------------------------------------------------------------


def landing_document(ctx: Ctx) -> dict[str, Any]:
    settings = get_runtime(ctx.request).settings
    return {
        "title": settings.service_title,
        "description": settings.service_abstract,
        "links": [
            *self_links(ctx, "", "landing page"),
            link(ctx.url("/api"), "service-desc", OPENAPI, "API definition"),
            link(ctx.url("/api", f="html"), "service-doc", HTML, "API documentation"),
            link(ctx.url("/conformance"), "conformance", JSON, "conformance classes"),
            link(ctx.url("/conformance"), REL + "conformance", JSON, "conformance classes"),
            link(ctx.url("/collections"), "data", JSON, "collections"),
            link(ctx.url("/collections"), REL + "data", JSON, "collections"),
            link(ctx.url("/map/tiles"), REL + "tilesets-map", JSON, "map tilesets"),
            link(ctx.url("/tiles"), REL + "tilesets-vector", JSON, "vector tilesets"),
            link(ctx.url("/tileMatrixSets"), REL + "tiling-schemes", JSON, "tile matrix sets"),
        ],
    }


def served_encodings(ctx: Ctx) -> set[str]:
    """OGC `f` names of the tiles the caller's tilesets serve: each layer's stored format, and PNG
    wherever there is a map collection (dataset map tiles without `collections` are drawn to PNG, as
    are a collection's tiles in a style that changes pixels). OGC's suite tests every class declared."""
    out: set[str] = set()
    for published in ctx.visible():
        out.add(published.format.ogc_f)
        if not published.format.is_vector:
            out.add(STYLED_F)
    return out


def conformance_document(ctx: Ctx) -> dict[str, Any]:
    encodings = served_encodings(ctx)
    extra = [c for provider in PROVIDERS for c in provider.conformance(ctx)]
    classes = [*CONFORMANCE, *(uri for f, uri in ENCODING_CLASSES.items() if f in encodings), *extra]
    return {"conformsTo": list(dict.fromkeys(classes)), "links": self_links(ctx, "/conformance", "conformance")}


def _grids(ctx: Ctx) -> dict[str, tuple[TileMatrixSet, str | None]]:
    """Grid id → (grid, registered alias target or None) for every grid a visible layer uses."""
    out: dict[str, tuple[TileMatrixSet, str | None]] = {}
    for published in ctx.visible():
        for grid in grid_ids(published):
            extra = extra_grid(published, grid)
            if extra is not None:
                out.setdefault(grid, (extra.tms, None))
            else:
                out.setdefault(grid, (published.tms, grid if grid != published.tms.id else None))
    return out


def tile_matrix_set_document(ctx: Ctx, grid: str) -> dict[str, Any]:
    found = _grids(ctx).get(grid)
    if found is None:
        raise not_found(f"tile matrix set {echo(grid)} does not exist")
    tms, registered = found
    doc = dict(registered_definition(registered)) if registered else tms.to_ogc_dict()
    doc["links"] = self_links(ctx, f"/tileMatrixSets/{grid}", grid)
    return doc


def tile_matrix_sets_document(ctx: Ctx) -> dict[str, Any]:
    items = []
    for grid, (tms, registered) in _grids(ctx).items():
        item: dict[str, Any] = {
            "id": grid,
            "title": registered_definition(registered).get("title", grid)
            if registered
            else tms.title or grid,
            "crs": registered_definition(registered)["crs"] if registered else crs_uri(tms.crs),
            "links": [
                link(ctx.url(f"/tileMatrixSets/{grid}", f="json"), "self", JSON, grid),
                link(ctx.url(f"/tileMatrixSets/{grid}"), REL + "tiling-scheme", JSON, grid),
            ],
        }
        if registered:
            item["uri"] = registered_definition(registered)["uri"]
        items.append(item)
    return {"links": self_links(ctx, "/tileMatrixSets", "tile matrix sets"), "tileMatrixSets": items}


def collection_document(ctx: Ctx, published: PublishedLayer, full_links: bool = True) -> dict[str, Any]:
    layer = published.layer
    kind = data_type(published)
    path = f"/collections/{quote(published.id, safe='')}"
    crs = [grid_crs(published, grid) for grid in grid_ids(published)]
    cells = [published.matrix(level).cell_size for level in published.level_ids]
    links = (
        self_links(ctx, path, layer.title) if full_links else [link(ctx.url(path), "self", JSON, layer.title)]
    )
    tiles_scope = Scope(kind, published)
    styles = collection_styles(ctx, published) if kind == "map" else []
    links.append(link(ctx.url(tiles_scope.path()), REL + f"tilesets-{kind}", JSON, f"{kind} tilesets"))
    if kind == "map":
        for style in styles:
            styled = Scope(kind, published, style)
            links.append(
                link(ctx.url(styled.path()), REL + "tilesets-map", JSON, f"map tilesets, style {style}")
            )
    for meta in layer.metadata:
        links.append(
            link(
                str(meta["url"]),
                "describedby",
                str(meta.get("format", "")) or None,
                str(meta.get("type", "")),
            )
        )
    doc: dict[str, Any] = {
        "id": published.id,
        "title": layer.title,
        "description": layer.abstract,
        "keywords": list(layer.keywords),
        "extent": {"spatial": {"bbox": [list(published.wgs84_bbox)], "crs": CRS84}},
        "dataType": kind,
        "crs": list(dict.fromkeys(crs)),
        "storageCrs": crs_uri(published.tms.crs),
        "minCellSize": min(cells),
        "maxCellSize": max(cells),
        "links": links,
    }
    if styles:
        doc["styles"] = [{"id": s, "title": s} for s in styles]
        doc["defaultStyle"] = styles[0]
    if layer.attribution and layer.attribution.get("title"):
        doc["attribution"] = str(layer.attribution["title"])
    return doc


def collections_document(ctx: Ctx) -> dict[str, Any]:
    bbox = bbox_param(ctx, "west,south,east,north in CRS84")
    layers = ctx.visible()
    if bbox is not None:
        west, south, east, north = bbox

        def overlaps(p: PublishedLayer) -> bool:
            w, s, e, n = p.wgs84_bbox
            return s <= north and n >= south and (w <= east and e >= west if west <= east else True)

        layers = [p for p in layers if overlaps(p)]
    collections = [collection_document(ctx, p, full_links=False) for p in layers]
    collections += [doc for provider in PROVIDERS for doc in provider.collections(ctx, bbox)]
    return {
        "links": self_links(ctx, "/collections", "collections"),
        "numberMatched": len(collections),
        "numberReturned": len(collections),
        "collections": collections,
    }
