"""What the TMS family's modules share: the version in its URLs, ROK4's `TileMapServerError`, the
service URL, a level's zoom in URLs, and the `?apikey=` that TileJSON-style documents carry on.

`tms.py` (TileMap documents, TileJSON, gdal.xml, tiles) and `vectorstyles.py` (MapLibre styles next
to a layer's TileJSON) both answer under `/tms/1.0.0/…`; they import this module, never each other.
"""

from __future__ import annotations

from urllib.parse import quote

from lxml import etree
from starlette.requests import Request
from starlette.responses import Response

from tileserver.catalog import PublishedLayer
from tileserver.runtime import get_runtime
from tileserver.services.ows import XML_DECLARATION, base_url, xml_text
from tileserver.services.policy import ServiceError, url_key

VERSION = "1.0.0"
XML_TYPE = "text/xml"


class TMSError(ServiceError):
    """An answer other than 200 of TMS's own, rendered as ROK4's TileMapServerError."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status=status)


def render_error(request: Request, error: ServiceError) -> Response:
    """The TMS error handler's format: any service error as ROK4's TileMapServerError."""
    root = etree.Element("TileMapServerError")
    etree.SubElement(root, "Message").text = xml_text(error.message)
    return Response(XML_DECLARATION + etree.tostring(root, encoding="UTF-8"), error.status, media_type=XML_TYPE)


def service_url(request: Request) -> str:
    return f"{base_url(request)}/tms/{VERSION}"


def level_order(published: PublishedLayer, level: str) -> int:
    """The zoom a client uses in URLs: the level id when numeric (ROK4 grids), else its rank from the top."""
    return int(level) if level.isdigit() else published.level_ids.index(level)


def key_query(request: Request) -> str:
    """`?apikey=…` when the caller gave a valid key in the URL: tile clients (MapLibre, Leaflet)
    that read this TileJSON cannot add a header, so the template carries the key on."""
    key = url_key(request, get_runtime(request).catalog.key_access)
    return f"?apikey={quote(key, safe='')}" if key else ""
