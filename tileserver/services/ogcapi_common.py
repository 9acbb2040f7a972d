"""What every OGC API here shares (OGC API - Common): media types, problems, content negotiation, the request context and links."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tileserver.catalog import Catalog, PublishedLayer
from tileserver.runtime import get_runtime
from tileserver.services.ows import KVP, base_url, bbox_values, echo, key_hash
from tileserver.services.policy import ServiceError

log = logging.getLogger("tileserver.ogcapi")

PREFIXES = ("/ogcapi", "/ogcapitiles")
REL = "http://www.opengis.net/def/rel/ogc/1.0/"
CRS84 = "http://www.opengis.net/def/crs/OGC/1.3/CRS84"
JSON = "application/json"
HTML = "text/html"
OPENAPI = "application/vnd.oai.openapi+json;version=3.0"
PROBLEM = "application/problem+json"

CONFORMANCE = (
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/landing-page",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/json",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/html",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/oas30",
    "http://www.opengis.net/spec/ogcapi-common-2/1.0/conf/collections",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/tileset",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/tilesets-list",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/geodata-tilesets",
    "http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/oas30",
)
# tile encodings: a class is declared only while some tileset serves it (PyramidFormat.ogc_f → class)
ENCODING_CLASSES = {
    f: f"http://www.opengis.net/spec/ogcapi-tiles-1/1.0/conf/{name}"
    for f, name in (("png", "png"), ("jpg", "jpeg"), ("tiff", "tiff"), ("mvt", "mvt"))
}

# other modules' collections and conformance classes (OGC API – Features adds its vector layers):
# objects with `conformance(ctx) -> [uri]`, `collections(ctx, bbox) -> [doc]`, `collection(ctx, id) -> doc | None`
PROVIDERS: list[Any] = []

# OGC-registered grids we may alias, in the 2D-TMS 2.0 definitions morecantile ships
REGISTERED = ("WebMercatorQuad", "WorldCRS84Quad")

# `f` for metadata: value → representation
METADATA_F = {"json": "json", JSON: "json", "html": "html", HTML: "html"}
# `f` for tiles: value → the OGC `f` name of a native format (PyramidFormat.ogc_f)
TILE_F = {
    "png": "png",
    "jpg": "jpg",
    "jpeg": "jpg",
    "tiff": "tiff",
    "tif": "tiff",
    "bil": "bil",
    "mvt": "mvt",
    "pbf": "mvt",
}


# --- errors ---------------------------------------------------------------------------------------


class Problem(ServiceError):
    """An RFC 7807 answer of OGC API's own; `kind` is ROK4's problem type name."""

    TITLES = {
        400: "Bad Request",
        404: "Not Found",
        406: "Not Acceptable",
        502: "Bad Gateway",
        503: "Service Unavailable",
    }

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail, status=status)
        self.kind = kind


def render_problem(request: Request, error: ServiceError) -> Response:
    """The OGC API error handler's format: any service error as an RFC 7807 problem."""
    body = {
        "type": error.kind,
        "title": Problem.TITLES.get(error.status, "Error"),
        "status": error.status,
        "detail": error.message,
    }
    return Response(orjson.dumps(body), error.status, media_type=PROBLEM)


def not_found(detail: str) -> Problem:
    return Problem(404, "ResourceNotFound", detail)


def invalid(detail: str) -> Problem:
    return Problem(400, "InvalidParameter", detail)


# --- content negotiation --------------------------------------------------------------------------


def accept_ranges(header: str) -> list[tuple[str, float]]:
    """(media range, q) pairs of an Accept header; malformed q counts as 1, parameters are ignored."""
    ranges = []
    for item in header.split(","):
        parts = [p.strip() for p in item.split(";")]
        if not parts[0]:
            continue
        q = 1.0
        for param in parts[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 1.0
        ranges.append((parts[0].lower(), q))
    return ranges


def quality(ranges: list[tuple[str, float]], media_type: str) -> tuple[float, int]:
    """(q, specificity) the most specific matching range gives a media type; (0, -1) if none."""
    kind = media_type.split(";")[0].strip().lower()
    major = kind.split("/")[0]
    best = (0.0, -1)
    levels = {kind: 2, f"{major}/*": 1, "*/*": 0}
    for media_range, q in ranges:
        specificity = levels.get(media_range, -1)
        if specificity > best[1]:
            best = (q, specificity)
    return best


def negotiate(request: Request, kvp: KVP, offers: dict[str, tuple[str, ...]]) -> str:
    """Pick a representation: `f` first (400 if unknown), else Accept (406 if none fits), JSON by default."""
    f = kvp.get("f")
    if f is not None:
        chosen = METADATA_F.get(f.strip().lower())
        if chosen is None and any(f.strip().lower() == t.lower() for t in offers.get("json", ())):
            chosen = "json"
        if chosen is None or chosen not in offers:
            raise invalid(f"f={echo(f)}: expected one of {', '.join(offers)}")
        return chosen
    header = request.headers.get("accept", "").strip()
    if not header:
        return next(iter(offers))
    ranges = accept_ranges(header)
    scored = []
    for rank, (name, media_types) in enumerate(offers.items()):
        q, specificity = max(quality(ranges, t) for t in media_types)
        if q > 0:
            scored.append((q, specificity, -rank, name))
    if not scored:
        raise Problem(
            406,
            "NotAcceptable",
            f"no representation matches Accept: {', '.join(t for v in offers.values() for t in v)}",
        )
    return max(scored)[3]


METADATA_OFFERS: dict[str, tuple[str, ...]] = {"json": (JSON,), "html": (HTML,)}
API_OFFERS: dict[str, tuple[str, ...]] = {"json": (OPENAPI, JSON), "html": (HTML,)}


# --- request context ------------------------------------------------------------------------------


@dataclass
class Ctx:
    """One request: where the API is mounted, the snapshot it reads, what the caller may see."""

    request: Request
    prefix: str
    catalog: Catalog
    kvp: KVP
    key: str | None
    root: str = ""
    fmt: str = "json"
    carried: dict[str, str] = field(default_factory=dict)  # query kept on every link (the API key)

    @classmethod
    def of(cls, request: Request, prefix: str) -> Ctx:
        kvp = KVP.from_request(request)
        ctx = cls(request, prefix, get_runtime(request).catalog, kvp, key_hash(request))
        ctx.root = base_url(request) + prefix
        apikey = kvp.get("apikey")
        if apikey:
            ctx.carried["apikey"] = apikey
        return ctx

    def url(self, path: str, **query: str) -> str:
        params = {**{k: v for k, v in query.items() if v}, **self.carried}
        return self.root + path + ("?" + urlencode(params, safe="{}") if params else "")

    def visible(self) -> list[PublishedLayer]:
        return sorted(self.catalog.visible("ogcapi", self.key), key=lambda p: p.id)

    def layer(self, collection_id: str) -> PublishedLayer:
        published = self.catalog.get(collection_id, "ogcapi", self.key)
        if published is None:
            raise not_found(f"collection {echo(collection_id)} does not exist")
        return published


def bbox_param(ctx: Ctx, expected: str) -> tuple[float, float, float, float] | None:
    """The `bbox` query parameter, four numbers (`expected` says which, for the problem); None if absent."""
    raw = ctx.kvp.get("bbox")
    if raw is None:
        return None
    values = bbox_values(raw)
    if values is None:
        raise invalid(f"bbox={echo(raw)}: expected {expected}")
    return values


def link(
    href: str, rel: str, media_type: str | None = None, title: str | None = None, **extra: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {"href": href, "rel": rel}
    if media_type:
        out["type"] = media_type
    if title:
        out["title"] = title
    out.update(extra)
    return out


def self_links(ctx: Ctx, path: str, title: str) -> list[dict[str, Any]]:
    """`self` in the representation being served, `alternate` in the other."""
    current, other = (
        (("json", JSON), ("html", HTML)) if ctx.fmt == "json" else (("html", HTML), ("json", JSON))
    )
    return [
        link(ctx.url(path, f=current[0]), "self", current[1], title),
        link(ctx.url(path, f=other[0]), "alternate", other[1], f"{title} ({other[0].upper()})"),
    ]


def data_type(published: PublishedLayer) -> str:
    return "vector" if published.format.is_vector else "map"
