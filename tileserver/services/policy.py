"""What every service answer obeys, whatever the protocol: one error family, the service switch, who
the caller is (API key), and the cache headers of tiles, maps and documents.

Protocol modules parse and build; they never write Cache-Control or Vary themselves and never map a
storage or render failure to a status (`storage_failure`, `render_failure`): a restricted answer
leaking into a shared cache, a 503 without Retry-After, or a switched-off service still answering
then cannot come back through one protocol that forgot (DESIGN.md §8).
`ServiceGate` decides the switch, the parameter limit and the caller's key once per request,
before protocol code runs; each protocol registers the one function rendering a `ServiceError`
in its own format (OWS exception report, TMS error, JSON problem).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote_plus

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tileserver.render.errors import RenderBusy, RenderError
from tileserver.rok4.codecs import CodecError
from tileserver.rok4.slab import NotASlabError

if TYPE_CHECKING:
    from tileserver.catalog import PublishedLayer

log = logging.getLogger("tileserver.policy")

KEY_HEADER = "X-Api-Key"
MAX_QUERY_FIELDS = 200  # more parameters than any request of these services needs
DISABLED_RETRY_AFTER = 60
DEADLINE_RETRY_AFTER = 5  # a map past the request deadline: the load that slowed it needs a moment to pass


# --- the error family ---------------------------------------------------------------------------


class ServiceError(Exception):
    """An answer other than 200. `status` is the HTTP status, `code` the OWS exception code, `kind`
    the problem type of JSON APIs; each protocol's renderer picks what its format shows."""

    status = 400
    code = "InvalidParameterValue"
    kind = "InvalidParameter"

    def __init__(
        self,
        message: str,
        *,
        locator: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        logged: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.locator = locator
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})
        self.logged = logged  # for the log only: never shown to the client


class BadRequest(ServiceError):
    pass


class NotFound(ServiceError):
    status = 404
    code = "Not Found"  # ROK4's code for "no data"
    kind = "ResourceNotFound"


class StorageUnavailable(ServiceError):
    status = 503
    code = "NoApplicableCode"
    kind = "StorageUnavailable"


class BadGateway(ServiceError):
    """The storage answered with something that is not what the pyramid promises."""

    status = 502
    code = "NoApplicableCode"
    kind = "StorageError"


class Disabled(ServiceError):
    """`PUT /admin/off`: every service refuses until `PUT /admin/on`."""

    status = 503
    code = "NoApplicableCode"
    kind = "ServiceDisabled"


def storage_failure(exc: BaseException, where: str) -> ServiceError:
    """The one mapping of a storage failure: unreadable data → 502, anything else → 503 with the
    Retry-After the storage suggests (a circuit breaker's `retry_after`, else 1 s)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, NotASlabError | CodecError):
        error: ServiceError = BadGateway("stored data is unreadable", logged=f"{where}: {exc}")
    else:
        retry = max(1, round(float(getattr(exc, "retry_after", 1) or 1)))
        error = StorageUnavailable(
            "storage is unavailable; retry later", headers={"Retry-After": str(retry)}, logged=f"{where}: {exc}"
        )
    error.__cause__ = exc
    return error


class Busy(ServiceError):
    """No render slot or memory within the wait, or a render past its deadline: the overload policy
    at work, worth retrying after the Retry-After it carries."""

    status = 503
    code = "NoApplicableCode"
    kind = "RenderBusy"


def render_failure(exc: RenderError | TimeoutError, where: str, deadline: float | None = None) -> ServiceError:
    """The one mapping of a failed render (a tile in any protocol, a WMS map, raster or vector) to an
    answer, so that no protocol forgets a Retry-After or shows a storage path: a render refused
    or past its deadline → 503 with Retry-After; a client mistake → its 4xx; unreadable stored data →
    502; storage failing → 503 with the Retry-After the storage suggests. `deadline` (seconds) names
    the request deadline an `asyncio.timeout` enforced (the TimeoutError case)."""
    if isinstance(exc, TimeoutError):
        limit = f" {deadline:g} s" if deadline is not None else " its deadline"
        return Busy(f"the map took longer than{limit}", headers={"Retry-After": str(DEADLINE_RETRY_AFTER)})
    if isinstance(exc, RenderBusy):
        # a shed render is counted by the gate, not a fault; one past its deadline is worth a log line
        logged = None if type(exc) is RenderBusy else f"{where}: {exc.message}"
        return Busy(exc.message, headers={"Retry-After": str(exc.retry_after or 1)}, logged=logged)
    if exc.status < 500:
        return NotFound(exc.message) if exc.status == 404 else BadRequest(exc.message, status=exc.status)
    if exc.status == 502:
        error: ServiceError = BadGateway("stored data is unreadable", logged=f"{where}: {exc.message}")
    else:
        cause = exc.__cause__
        retry = max(1, round(float(getattr(cause, "retry_after", None) or exc.retry_after or 1)))
        error = StorageUnavailable("storage is unavailable; retry later", headers={"Retry-After": str(retry)},
                                   logged=f"{where}: {exc.message}")
    error.__cause__ = exc
    return error


# Magic bytes of the formats served byte for byte: garbage behind a valid index is a 502, not an image.
_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8", "jpg90": b"\xff\xd8"}


def check_payload(compression: str, data: bytes, where: str) -> None:
    """Raise BadGateway when a passed-through payload does not start as its codec's files do."""
    magic = _MAGIC.get(compression)
    if magic is not None and not data.startswith(magic):
        raise BadGateway("stored data is unreadable", logged=f"{where}: not a {compression} payload")


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", "-"))


Renderer = Callable[[Request, ServiceError], Response]
_RENDERERS: dict[str, Renderer] = {}


def register(service: str, render: Renderer) -> None:
    """A protocol's one error renderer; the gate uses it too."""
    _RENDERERS[service] = render


def error_response(request: Request, error: ServiceError, render: Renderer | None = None,
                   service: str | None = None) -> Response:
    """Render an error in a protocol's format; 5xx are logged with their cause and request id, and
    no error answer is ever stored by a shared cache."""
    if error.status >= 500 and error.logged is not None:
        rid = request_id(request)
        # a storage failure is an operational fact: one line with its cause; anything else keeps its traceback
        cause = error.__cause__
        known = isinstance(error, StorageUnavailable | BadGateway)
        log.error("%s %s (%d): %s", rid, type(error).__name__, error.status, error.logged,
                  exc_info=None if known else cause)
        if "(request " not in error.message:
            error.message = f"{error.message} (request {rid})"
    chosen = render or _RENDERERS[service or ""]
    response = chosen(request, error)
    for name, value in {**error.headers, **_ERROR_HEADERS}.items():
        response.headers[name] = value
    return response


# --- who is asking ------------------------------------------------------------------------------


def hash_key(secret: str) -> str:
    """Same digest as PublicationStore.hash_key: the store never sees or keeps the key itself."""
    return hashlib.sha256(secret.encode()).hexdigest()


def presented_key(scope: Scope) -> str | None:
    """The API key presented: `X-Api-Key` header, else the `apikey` query parameter (any case)."""
    for name, value in scope["headers"]:
        if name == b"x-api-key" and value:
            return value.decode("latin-1")
    query: bytes = scope.get("query_string", b"")
    if b"=" in query:
        for pair in query.split(b"&"):
            name, _, value = pair.partition(b"=")
            if name.lower() == b"apikey" and value:
                return unquote_plus(value.decode("latin-1"))
    return None


def url_key(request: Request, key_access: Any) -> str | None:
    """A valid key the caller gave in the query string (`apikey`), to repeat in the URLs a document
    advertises (capabilities, TileJSON, styles): clients that cannot set headers keep sending it.
    `key_access`: the catalog's key hashes; an unknown key is never echoed."""
    query: bytes = request.scope.get("query_string", b"")
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if name.lower() == b"apikey" and value:
            key = unquote_plus(value.decode("latin-1"))
            return key if hash_key(key) in key_access else None
    return None


def key_hash(request: Request) -> str | None:
    """Hash of the caller's key, computed once per request by the gate (what Catalog.get expects)."""
    state = request.scope.setdefault("state", {})
    if "key_hash" not in state:
        key = presented_key(request.scope)
        state["key_hash"] = hash_key(key) if key else None
    return state["key_hash"]


def is_operator(settings: Any, request: Request) -> bool | None:
    """True with the admin token (bearer or ROK4's X-Rok4-Secret), False with a wrong one, None
    without one. With no token configured, only the demo is open, and only to clients on this machine
    (`tileserver serve` generates a token for the demo; this covers an app run by bare uvicorn)."""
    token = getattr(settings, "admin_token", "")
    headers = request.headers
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    presented = credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None
    presented = presented or headers.get("x-rok4-secret")
    if not token:
        return bool(getattr(settings, "demo", False)) and is_local(request)
    if presented is None:
        return None
    return hmac.compare_digest(presented.encode(), token.encode())


def is_local(request: Request) -> bool:
    """The client is this machine (uvicorn has applied trusted proxies' X-Forwarded-For)."""
    client = request.scope.get("client")
    try:
        address = ipaddress.ip_address(client[0]) if client else None
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address is not None and address.is_loopback


# --- public URLs --------------------------------------------------------------------------------


_NETWORKS: dict[str, tuple[Any, ...] | None] = {}


def _networks(value: Any) -> tuple[Any, ...] | None:
    """`forwarded_allow_ips` as networks (parsed once per value); None means every peer ("*")."""
    key = value if isinstance(value, str) else ",".join(map(str, value or ()))
    if key in _NETWORKS:
        return _NETWORKS[key]
    out: list[Any] | None = []
    for item in (i.strip() for i in key.split(",")):
        if item == "*":
            out = None
            break
        if item:
            try:
                out.append(ipaddress.ip_network(item, strict=False))  # type: ignore[union-attr]
            except ValueError:
                log.warning("forwarded_allow_ips: %r is not an address or network, ignored", item)
    _NETWORKS[key] = None if out is None else tuple(out)
    return _NETWORKS[key]


def _trusted_address(host: str, allowed: tuple[Any, ...] | None) -> bool:
    if allowed is None:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in allowed)


def apply_forwarded(scope: Scope, settings: Any) -> None:
    """A trusted proxy (`forwarded_allow_ips`) speaks for its clients: X-Forwarded-For and -Proto
    replace the client address and scheme, as uvicorn's proxy_headers would, and the request is
    marked so that X-Forwarded-Host may build public URLs. Done here rather than by uvicorn because
    uvicorn forgets the proxy's own address, which that last decision needs."""
    forwarded_for = proto = None
    any_forwarded = False
    for name, value in scope.get("headers", ()):
        if name.startswith(b"x-forwarded-"):
            any_forwarded = True
            if name == b"x-forwarded-for":
                forwarded_for = value
            elif name == b"x-forwarded-proto":
                proto = value
    client = scope.get("client")
    if not any_forwarded or not client:
        return
    allowed = _networks(getattr(settings, "forwarded_allow_ips", "127.0.0.1"))
    if not _trusted_address(client[0], allowed):
        return
    scope.setdefault("state", {})["forwarded"] = True
    if proto is not None:
        scheme = proto.decode("latin-1").split(",")[0].strip().lower()
        if scheme in ("http", "https"):
            scope["scheme"] = scheme
    if forwarded_for is not None:
        hops = [h.strip() for h in forwarded_for.decode("latin-1").split(",") if h.strip()]
        # the nearest hop that is not itself a trusted proxy is the client
        chosen = next((h for h in reversed(hops) if not _trusted_address(h, allowed)), hops[0] if hops else None)
        if chosen:
            scope["client"] = (chosen, 0)


def trusted_proxy(request: Request, settings: Any) -> bool:
    """Whether this request came through a trusted proxy (marked by `apply_forwarded`)."""
    return bool(request.scope.get("state", {}).get("forwarded"))


# --- cache headers ------------------------------------------------------------------------------

_ERROR_HEADERS = {"Cache-Control": "no-store", "Vary": KEY_HEADER}
_HOST_VARY = ("Host", "X-Forwarded-Host", "X-Forwarded-Proto")


def _private(cache_control: str) -> str:
    directives = [d.strip() for d in cache_control.split(",") if d.strip()]
    return ", ".join(["private"] + [d for d in directives if d.lower() not in ("public", "private")])


def tile_headers(published: PublishedLayer, settings: Any, content_encoding: str | None = None) -> dict[str, str]:
    """Cache-Control (the layer's or the server's; `private` for a restricted layer) and Vary of a tile,
    for the routed path and the fast path alike. A format stored deflated (ZIP FLOAT32) is sent
    deflated or inflated after Accept-Encoding: a shared cache must keep both apart."""
    vary = ("Accept-Encoding",) if published.format.content_encoding else ()
    return map_headers((published,), settings, content_encoding, vary)


class Served(Protocol):
    """What the cache policy reads of anything served (a pyramid layer, a WMS-vector map, a WFS
    feature type's layer): its record (for `cache_control`) and whether it is restricted."""

    @property
    def layer(self) -> Any: ...

    @property
    def restricted(self) -> bool: ...


def map_headers(
    layers: Iterable[Served], settings: Any, content_encoding: str | None = None, vary: tuple[str, ...] = ()
) -> dict[str, str]:
    """Headers of an image or value read from layers (GetMap, GetFeatureInfo, legends, tiles, features): a
    shared cache must never hand an answer about a restricted layer to someone without the key.
    `vary`: request headers the answer depends on besides the key (`Accept` of negotiated formats),
    merged here so that no caller writes Vary and drops the key from it."""
    layers = tuple(layers)
    cache_control = (layers[0].layer.cache_control if layers else "") or settings.cache_control
    headers: dict[str, str] = {}
    names = list(vary)
    if any(p.restricted for p in layers):
        cache_control = _private(cache_control or "no-cache")
        names.append(KEY_HEADER)
    if names:
        headers["Vary"] = ", ".join(dict.fromkeys(names))
    if cache_control:
        headers["Cache-Control"] = cache_control
    if content_encoding:
        headers["Content-Encoding"] = content_encoding
    return headers


def document_headers(request: Request, layers: Iterable[PublishedLayer] = (), vary: tuple[str, ...] = ()) -> dict[str, str]:
    """Headers of a metadata document (capabilities, TileMap, TileJSON, OGC API pages): revalidated
    with the ETag; `private` when it may show restricted layers (a key was presented, or one of
    `layers` is restricted); varying on the headers its URLs were built from unless `public_url` is set."""
    settings = request.app.state.settings
    restricted = key_hash(request) is not None or any(p.restricted for p in layers)
    names = [*vary, KEY_HEADER]
    if not getattr(settings, "public_url", ""):
        names += _HOST_VARY
    return {"Cache-Control": "private, no-cache" if restricted else "public, no-cache", "Vary": ", ".join(names)}


# --- the gate -----------------------------------------------------------------------------------

# first path segment → service whose renderer answers for it
SERVICES = {"wmts": "wmts", "wms": "wms", "tms": "tms", "xyz": "tms", "ogcapi": "ogcapi", "ogcapitiles": "ogcapi",
            "wfs": "wfs"}


def service_of(path: str) -> str | None:
    first = path[1:].split("/", 1)[0]
    return SERVICES.get(first)


class ServiceGate:
    """Before any protocol code: the switch, the parameter limit and the caller's key, once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = service_of(scope["path"]) if scope["type"] == "http" else None
        if service is not None and service in _RENDERERS:
            refusal = self._refusal(scope)
            if refusal is not None:
                response = error_response(Request(scope), refusal, service=service)
                await response(scope, receive, send)
                return
            key = presented_key(scope)
            scope.setdefault("state", {})["key_hash"] = hash_key(key) if key else None
        await self.app(scope, receive, send)

    @staticmethod
    def _refusal(scope: Scope) -> ServiceError | None:
        runtime = getattr(scope["app"].state, "runtime", None)
        if runtime is not None and not runtime.enabled:
            return Disabled("the service is switched off", headers={"Retry-After": str(DISABLED_RETRY_AFTER)})
        if scope.get("query_string", b"").count(b"&") >= MAX_QUERY_FIELDS:
            return BadRequest(f"more than {MAX_QUERY_FIELDS} parameters")
        return None
