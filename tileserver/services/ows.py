"""What every OGC web service here shares: KVP parsing, OWS 1.1 exception reports, public URLs, API keys.

Kept protocol-neutral so WMTS and WMS use the same request parsing (names case-insensitive, values
not) and the same rules for echoing client input into XML (never a raw `<`, never a control char).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from lxml import etree
from starlette.requests import Request
from starlette.responses import Response

from tileserver.services.policy import (
    MAX_QUERY_FIELDS,
    ServiceError,
    error_response,
    hash_key,  # noqa: F401  (re-exported: services compare keys with it)
    presented_key,
    trusted_proxy,
)
from tileserver.services.policy import key_hash as policy_key_hash
from tileserver.settings import data_directory

log = logging.getLogger("tileserver.ows")

OWS_NS = "http://www.opengis.net/ows/1.1"
XLINK_NS = "http://www.w3.org/1999/xlink"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
XML_NS = "http://www.w3.org/XML/1998/namespace"
OWS_EXCEPTION_SCHEMA = "http://schemas.opengis.net/ows/1.1.0/owsExceptionReport.xsd"
XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'

MAX_KVP_FIELDS = MAX_QUERY_FIELDS  # more parameters than any OGC request needs: refuse, do not parse
MAX_ECHO = 80  # characters of a client value quoted back in a message
_RAW_BYTES = re.compile(rb"[\x80-\xff]")

# HTTP status per OWS 1.1 (OGC 06-121r3 table 28) and WMTS 1.0 (07-057r7 tables 24, 28) codes.
DEFAULT_STATUS: dict[str, int] = {
    "OperationNotSupported": 501,
    "OptionNotSupported": 501,
    "MissingParameterValue": 400,
    "InvalidParameterValue": 400,
    "VersionNegotiationFailed": 400,
    "InvalidUpdateSequence": 400,
    "TileOutOfRange": 400,
    "PointIJOutOfRange": 400,
    "NoApplicableCode": 500,
    "Not Found": 404,  # ROK4's code for "no data"
}


# --- request parameters -------------------------------------------------------------------------


class KVP:
    """Query parameters with case-insensitive names and untouched values; repeats are kept in order."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._values: dict[str, list[str]] = {}
        for name, value in pairs:
            self._values.setdefault(name.lower(), []).append(value)

    @classmethod
    def parse(cls, query: bytes | str) -> KVP:
        """Percent-decoded (`+` is a space), UTF-8 with replacement, blank values kept.

        Raises OWSException when the query is absurdly long in parameters.
        """
        raw = query.encode("utf-8") if isinstance(query, str) else query
        # raw non-ASCII bytes (some clients do not escape) become %XX, so one UTF-8 decoding applies to all
        text = _RAW_BYTES.sub(lambda m: b"%%%02X" % m.group()[0], raw).decode("ascii")
        try:
            pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_KVP_FIELDS, errors="replace")
        except ValueError:
            raise OWSException(
                "InvalidParameterValue", None, f"more than {MAX_KVP_FIELDS} parameters"
            ) from None
        return cls(pairs)

    @classmethod
    def from_request(cls, request: Request) -> KVP:
        return cls.parse(request.scope.get("query_string", b""))

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._values

    def get(self, name: str, default: str | None = None) -> str | None:
        """First value of a parameter (clients that repeat one, such as OWSLib, repeat it unchanged)."""
        values = self._values.get(name.lower())
        return values[0] if values else default

    def getall(self, name: str) -> list[str]:
        return list(self._values.get(name.lower(), ()))

    def require(self, name: str, locator: str | None = None) -> str:
        """The value, or MissingParameterValue when absent or blank."""
        value = self.get(name)
        if value is None or not value.strip():
            raise OWSException(
                "MissingParameterValue", locator or name, f"parameter {locator or name} is required"
            )
        return value

    def names(self) -> list[str]:
        return list(self._values)


def bbox_values(raw: str) -> tuple[float, float, float, float] | None:
    """An OGC API `bbox` parameter (4 numbers, or 6 with heights dropped) as minx, miny, maxx, maxy;
    None when malformed (not numbers, absurd magnitudes, or south above north)."""
    try:
        values = [float(v) for v in raw.split(",")]
    except ValueError:
        return None
    if len(values) == 6:
        values = [values[0], values[1], values[3], values[4]]
    if len(values) != 4 or not all(abs(v) < 1e9 for v in values) or values[1] > values[3]:
        return None
    return (values[0], values[1], values[2], values[3])


# --- echoing client input -----------------------------------------------------------------------

_NOT_XML = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_UNSAFE = re.compile(r"[<>&\"'`\\]")


def echo(value: Any, limit: int = MAX_ECHO) -> str:
    """A client value made safe to quote in a message: quoted, truncated, no markup characters."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "…"
    text = _NOT_XML.sub("?", text)
    text = _UNSAFE.sub("?", text)
    return f"'{text}'"


def xml_text(value: str) -> str:
    """Text lxml accepts: characters XML 1.0 cannot carry become '?'."""
    return _NOT_XML.sub("?", value)


# --- exception reports --------------------------------------------------------------------------


class OWSException(ServiceError):
    """An OWS 1.1 exception: `code`, `locator` (the parameter name, or None) and the HTTP status."""

    def __init__(
        self,
        code: str,
        locator: str | None,
        message: str,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            message, locator=locator, status=status if status is not None else DEFAULT_STATUS.get(code, 400),
            headers=headers,
        )
        self.code = code

    def __repr__(self) -> str:
        return f"OWSException({self.code!r}, {self.locator!r}, {self.message!r}, {self.status})"

    def to_xml(self) -> bytes:
        return exception_report([self])

    def response(self) -> Response:
        return Response(
            self.to_xml(), status_code=self.status, media_type="application/xml", headers=self.headers
        )


def exception_report(exceptions: list[ServiceError], version: str = "1.0.0", lang: str = "en") -> bytes:
    """`ows:ExceptionReport` valid against owsExceptionReport.xsd; text is escaped by lxml."""
    nsmap = {None: OWS_NS, "xsi": XSI_NS}
    root = etree.Element(f"{{{OWS_NS}}}ExceptionReport", nsmap=nsmap)
    root.set(f"{{{XSI_NS}}}schemaLocation", f"{OWS_NS} {OWS_EXCEPTION_SCHEMA}")
    root.set("version", version)
    root.set(f"{{{XML_NS}}}lang", lang)
    for exc in exceptions:
        node = etree.SubElement(root, f"{{{OWS_NS}}}Exception", exceptionCode=xml_text(exc.code))
        if exc.locator:
            node.set("locator", xml_text(exc.locator))
        etree.SubElement(node, f"{{{OWS_NS}}}ExceptionText").text = xml_text(exc.message)
    return XML_DECLARATION + etree.tostring(root, encoding="UTF-8", pretty_print=True)


Endpoint = Callable[[Request], Awaitable[Response]]


def render_report(request: Request, error: ServiceError) -> Response:
    """Any service error as an OWS 1.1 exception report (WMTS)."""
    return Response(exception_report([error]), status_code=error.status, media_type="application/xml")


def error_report(request: Request, error: ServiceError) -> Response:
    """A WMTS error as answered: its exception report through the policy's `error_response` (5xx
    logged with the request id, never cached). The endpoints and the fast path's asynchronous
    answers (fastpath.py) word a failure through here, so both give the same bytes."""
    return error_response(request, error, render_report)


def ows_endpoint(handler: Endpoint) -> Endpoint:
    """The WMTS error handler: any ServiceError raised in a handler becomes its exception report."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except ServiceError as exc:
            return error_report(request, exc)

    return wrapper


# --- URLs and keys ------------------------------------------------------------------------------

_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62})?(?:\.[A-Za-z0-9\-]{1,63})*|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$"
)


def _first(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.split(",", 1)[0].strip()
    return value or None


def base_url(request: Request) -> str:
    """Public root URL of this server, without trailing slash.

    `settings.public_url` wins; otherwise X-Forwarded-Proto/Host (first hop only, validated so a
    forged header cannot inject markup) when the peer is a trusted proxy (`forwarded_allow_ips`),
    else the request's own scheme and Host. Documents built so vary on those headers
    (`policy.document_headers`).
    """
    settings = getattr(request.app.state, "settings", None)
    public = getattr(settings, "public_url", "") if settings is not None else ""
    if public:
        return public.rstrip("/")
    forwarded = trusted_proxy(request, settings)
    proto = _first(request.headers.get("x-forwarded-proto")) if forwarded else None
    if proto not in ("http", "https"):
        proto = request.url.scheme if request.url.scheme in ("http", "https") else "http"
    host = _first(request.headers.get("x-forwarded-host")) if forwarded else None
    if host is None or not _HOST.match(host):
        host = request.headers.get("host", "")
        if not _HOST.match(host):
            server = request.scope.get("server") or ("localhost", None)
            host = server[0] if server[1] in (None, 80, 443) else f"{server[0]}:{server[1]}"
    root = request.scope.get("root_path", "").rstrip("/")
    return f"{proto}://{host}{root}"


def api_key(request: Request, kvp: KVP | None = None) -> str | None:
    """The API key presented: `X-Api-Key` header, else the `apikey` query parameter (any case)."""
    return presented_key(request.scope)


def key_hash(request: Request, kvp: KVP | None = None) -> str | None:
    """Hash of the presented API key (what Catalog.get/visible expect), None without a key."""
    return policy_key_hash(request)


# --- capabilities skeletons ---------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(\w+)\}")
OPTIONAL_MARK = "data-optional"


def template_path(name: str) -> Path:
    """A skeleton from `capabilities_templates/` (source tree, or inside an installed package)."""
    path = data_directory("capabilities_templates") / name
    if not path.is_file():
        raise FileNotFoundError(f"capabilities template {name} not found")
    return path


@functools.lru_cache(maxsize=16)
def _template_bytes(name: str) -> bytes:
    return template_path(name).read_bytes()


def load_template(name: str) -> etree._Element:
    """A fresh, mutable tree of a skeleton (parsed once, copied per build); comments dropped."""
    parser = etree.XMLParser(
        remove_comments=True, remove_blank_text=True, resolve_entities=False, no_network=True
    )
    return etree.fromstring(_template_bytes(name), parser)


def fill_template(root: etree._Element, values: dict[str, str]) -> etree._Element:
    """Substitute `{name}` in texts and attribute values; drop `data-optional` elements left empty."""

    def substitute(text: str) -> tuple[str, bool]:
        used = _PLACEHOLDER.findall(text)
        filled = _PLACEHOLDER.sub(lambda m: xml_text(str(values.get(m.group(1), ""))), text)
        return filled, bool(used) and not any(values.get(name) for name in used)

    for element in list(root.iter(etree.Element)):
        empty = False
        if element.text and "{" in element.text:
            element.text, blank = substitute(element.text)
            empty |= blank
        for attr, value in element.attrib.items():
            if "{" in value:
                element.attrib[attr], blank = substitute(value)
                empty |= blank
        if element.attrib.pop(OPTIONAL_MARK, None) is not None and empty:
            element.getparent().remove(element)
    return root
