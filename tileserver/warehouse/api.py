"""The warehouse API's routes, mounted by the application under `/api`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import (
    account_routes,
    annexes,
    check_routes,
    client_styles,
    configurations,
    executions,
    keys,
    offerings,
    openapi,
    statics,
    stored_data,
    uploads,
)
from .errors import ApiError
from .service import shutdown, startup
from .web import public

ROUTE_MODULES = (account_routes, uploads, check_routes, executions, stored_data, configurations, offerings,
                  statics, keys, annexes, client_styles)


@public
async def unknown(request: Request) -> Response:
    raise ApiError(404, f"no route {request.method} {request.url.path}")


def routes() -> list[BaseRoute]:
    out: list[BaseRoute] = []
    for module in ROUTE_MODULES:
        out.extend(module.routes())
    out.extend(openapi.routes())
    out.append(Route("/api/{rest:path}", unknown, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]))
    return out


__all__ = ["routes", "shutdown", "startup"]
