"""`…/checks` (the check definitions) and `…/checks/executions` (their runs on uploads, with logs)."""

from __future__ import annotations

import asyncio

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .checks import BY_ID, CHECKS
from .errors import conflict, not_found
from .lifecycle import CHECK, FINAL
from .uploads import check_execution_view
from .web import Ctx, content_range, json_response, list_response, no_content, page_window, route

PREFIX = "/api/datastores/{datastore}/checks"


@route
async def list_checks(ctx: Ctx) -> Response:
    return list_response(ctx.request, [c.view() for c in CHECKS])


@route
async def get_check(ctx: Ctx) -> Response:
    check = BY_ID.get(ctx.param("check").lower())
    if check is None:
        raise not_found("check", ctx.param("check"))
    return json_response(check.view())


def _execution(ctx: Ctx):  # noqa: ANN202 - an Entity
    entity = ctx.wh.entities.get(CHECK, ctx.param("execution").lower())
    if entity is None or entity.datastore_id != ctx.datastore.id:
        raise not_found("check execution", ctx.param("execution"))
    return entity


@route
async def list_executions(ctx: Ctx) -> Response:
    items = [check_execution_view(e) for e in ctx.wh.entities.list(CHECK, ctx.datastore.id)]
    return list_response(ctx.request, items)


@route
async def get_execution(ctx: Ctx) -> Response:
    return json_response(check_execution_view(_execution(ctx)))


@route
async def delete_execution(ctx: Ctx) -> Response:
    entity = _execution(ctx)
    if entity.body.get("status") not in FINAL:
        raise conflict(f"check execution {entity.id} is {entity.body['status']}")
    await asyncio.to_thread(ctx.wh.entities.delete, entity.id)
    return no_content()


async def logs_response(ctx: Ctx, entity_id: str) -> Response:
    """Log lines as a JSON array, paginated like lists (`page`, `limit`, `Content-Range`)."""
    offset, limit = page_window(ctx.request, default_limit=2000)
    lines, total = await asyncio.to_thread(ctx.wh.entities.logs, entity_id, offset, limit)
    return json_response(lines, headers={"Content-Range": content_range(offset, len(lines), total)})


@route
async def execution_logs(ctx: Ctx) -> Response:
    return await logs_response(ctx, _execution(ctx).id)


def routes() -> list[BaseRoute]:
    return [
        Route(PREFIX, list_checks, methods=["GET"]),
        Route(PREFIX + "/executions", list_executions, methods=["GET"]),
        Route(PREFIX + "/executions/{execution}", get_execution, methods=["GET"]),
        Route(PREFIX + "/executions/{execution}", delete_execution, methods=["DELETE"]),
        Route(PREFIX + "/executions/{execution}/logs", execution_logs, methods=["GET"]),
        Route(PREFIX + "/{check}", get_check, methods=["GET"]),
    ]
