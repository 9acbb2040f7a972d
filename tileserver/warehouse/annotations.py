"""Tags, comments and events, which every warehouse entity carries in its JSON document.

Tags are a flat string map (the SDK filters on `tags[k]=v`); comments are `{_id, text, author,
creation}`; events record who did what (`last_event` is shown on entities).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .accounts import User, now_iso
from .errors import bad_request, not_found
from .web import Ctx, json_body, json_response, list_response, no_content, route

# (ctx, id) → the kind of the wh_entities row holding the entity's annotations, created if needed;
# raises ApiError(404) when the entity is not in the datastore
Ensure = Callable[[Ctx, str], Awaitable[str]]


def add_event(body: dict[str, Any], title: str, user: User | None) -> None:
    event = {"title": title, "date": now_iso(), "initiator": {"_id": user.id if user else None}}
    body.setdefault("events", []).append(event)
    body["last_event"] = event


def annotations_view(body: dict[str, Any]) -> dict[str, Any]:
    """The fields every entity shows."""
    out: dict[str, Any] = {"tags": dict(body.get("tags") or {})}
    if body.get("last_event"):
        out["last_event"] = body["last_event"]
    return out


def _checked_tags(data: Any) -> dict[str, str]:
    if not isinstance(data, dict) or not data:
        raise bad_request("the body must be a non-empty object of tags {\"key\": \"value\"}")
    problems = [f"tags.{k}: must be a string" for k, v in data.items() if not isinstance(v, str)]
    problems += [f"tag key {k!r}: must be 1–100 characters" for k in data if not 0 < len(k) <= 100]
    if problems:
        raise bad_request(*problems)
    return data


def annotation_routes(prefix: str, param: str, ensure: Ensure) -> list[BaseRoute]:
    """`{prefix}/{param}/tags|comments|events` for one entity type."""

    def ident(ctx: Ctx) -> str:
        return ctx.param(param).lower()  # ids are lowercase UUIDs; clients may send them upper-case

    async def entity(ctx: Ctx) -> str:
        return await ensure(ctx, ident(ctx))

    async def update(ctx: Ctx, change: Callable[[dict[str, Any]], Any]) -> Any:
        kind = await entity(ctx)
        return await asyncio.to_thread(ctx.wh.entities.update, kind, ident(ctx), change)

    @route
    async def add_tags(ctx: Ctx) -> Response:
        tags = _checked_tags(await json_body(ctx.request))

        def change(body: dict[str, Any]) -> None:
            body.setdefault("tags", {}).update(tags)
            add_event(body, "Ajout de tags", ctx.user)

        updated = await update(ctx, change)
        return json_response(updated.body.get("tags", {}))

    @route
    async def delete_tags(ctx: Ctx) -> Response:
        keys = ctx.request.query_params.getlist("tags") + ctx.request.query_params.getlist("tags[]")
        await update(ctx, lambda body: [body.setdefault("tags", {}).pop(k, None) for k in keys])
        return no_content()

    @route
    async def list_comments(ctx: Ctx) -> Response:
        kind = await entity(ctx)
        current = ctx.wh.entities.get(kind, ident(ctx))
        return list_response(ctx.request, (current.body.get("comments", []) if current else []))

    @route
    async def add_comment(ctx: Ctx) -> Response:
        data = await json_body(ctx.request)
        text = data.get("text")
        if not isinstance(text, str) or not text.strip():
            raise bad_request("text: must be a non-empty string")
        comment = {"_id": str(uuid.uuid4()), "text": text, "creation": now_iso(),
                   "author": {"_id": ctx.user.id, "first_name": ctx.user.first_name,
                              "last_name": ctx.user.last_name}}
        await update(ctx, lambda body: body.setdefault("comments", []).append(comment))
        return json_response(comment)

    @route
    async def remove_comment(ctx: Ctx) -> Response:
        comment_id = ctx.param("comment").lower()
        found: list[bool] = []

        def drop(body: dict[str, Any]) -> bool:
            before = body.get("comments", [])
            body["comments"] = [c for c in before if c["_id"] != comment_id]
            found.append(len(body["comments"]) != len(before))
            return found[-1]

        await update(ctx, drop)
        if not found or not found[0]:
            raise not_found("comment", comment_id)
        return no_content()

    @route
    async def list_events(ctx: Ctx) -> Response:
        kind = await entity(ctx)
        current = ctx.wh.entities.get(kind, ident(ctx))
        return list_response(ctx.request, (current.body.get("events", []) if current else []))

    base = f"{prefix}/{{{param}}}"
    return [
        Route(f"{base}/tags", add_tags, methods=["POST"]),
        Route(f"{base}/tags", delete_tags, methods=["DELETE"]),
        Route(f"{base}/comments", list_comments, methods=["GET"]),
        Route(f"{base}/comments", add_comment, methods=["POST"]),
        Route(f"{base}/comments/{{comment}}", remove_comment, methods=["DELETE"]),
        Route(f"{base}/events", list_events, methods=["GET"]),
    ]
